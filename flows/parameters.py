"""The flow's run parameters as one typed model, validated before any work starts."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from config.errors import ParameterError
from config.settings import Settings, load_settings

Provider = Literal["auto", "local", "api"]

# Prefect 3.9 checks a deployment run's parameters against the flow's schema (types,
# enums, bounds, patterns) when the run is created, but not JSON-schema formats: the
# pattern makes the API refuse a malformed date (2023-13-01, 2023-02-30, 01.09.2023)
# before a run exists. 29 February of a common year passes it and is refused by the
# flow's own validation when the run starts.
_ISO_DATE_PATTERN = (
    r"^[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-9]))$"
)
IsoDate = Annotated[
    date, WithJsonSchema({"type": "string", "format": "date", "pattern": _ISO_DATE_PATTERN})
]
WindowDays = Annotated[int, Field(ge=1, le=3660)]


class RunParameters(BaseModel):
    """What one run attributes.

    ``start_date``/``end_date`` select conversions by conversion date (inclusive).
    ``window_days`` instead selects the last N full days before today (UTC), so a
    schedule can attribute "yesterday" (``window_days=1``) without fixed dates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_date: IsoDate | None = None
    end_date: IsoDate | None = None
    window_days: WindowDays | None = None
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

    def settings(self) -> Settings:
        """The settings with this run's ``db_path``, ``output_dir`` and ``provider`` applied."""
        overrides: dict[str, Any] = {}
        if self.db_path:
            overrides["database"] = {"path": self.db_path}
        if self.output_dir:
            overrides["output"] = {"dir": self.output_dir}
        if self.provider:
            overrides["attribution"] = {"provider": self.provider}
        return load_settings(Path(self.config_path) if self.config_path else None, overrides)


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
