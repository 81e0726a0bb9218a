"""The flow's run parameters as one typed model, validated before any work starts."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Provider = Literal["auto", "local", "api"]


class ParameterError(ValueError):
    """Run parameters that cannot be used; the message names the parameter."""


class RunParameters(BaseModel):
    """What one run attributes.

    ``start_date``/``end_date`` select conversions by conversion date (inclusive).
    ``window_days`` instead selects the last N full days before today (UTC), so a
    schedule can attribute "yesterday" (``window_days=1``) without fixed dates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_date: date | None = None
    end_date: date | None = None
    window_days: int | None = Field(None, ge=1, le=3660)
    provider: Provider | None = None
    refresh: bool = False
    db_path: str | None = None
    output_dir: str | None = None
    config_path: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RunParameters:
        if self.start_date and self.end_date and self.end_date < self.start_date:
            raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
        if self.window_days is not None and (self.start_date or self.end_date):
            raise ValueError("give either window_days or start_date/end_date, not both")
        return self

    def date_range(self, today: date | None = None) -> tuple[date | None, date | None]:
        """The inclusive conversion-date range this run covers."""
        if self.window_days is None:
            return self.start_date, self.end_date
        today = today or datetime.now(UTC).date()
        return today - timedelta(days=self.window_days), today - timedelta(days=1)


def parse_parameters(**values: object) -> RunParameters:
    """Validate raw parameters, raising ``ParameterError`` that names each bad one."""
    try:
        return RunParameters.model_validate(values)
    except ValidationError as exc:
        parts = []
        for item in exc.errors():
            name = ".".join(str(p) for p in item["loc"]) or "parameters"
            message = item["msg"].removeprefix("Value error, ")
            parts.append(f"{name}: {message}")
        raise ParameterError("invalid parameters: " + "; ".join(parts)) from None
