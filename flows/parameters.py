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
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from config.errors import ParameterError
from config.settings import Settings, load_settings

Provider = Literal["auto", "local", "api"]

# The flow takes dates as text (the UI shows a date picker for the "date" format) and
# checks them itself: Prefect would refuse a bad one with its schema's regular
# expression, where the flow says what is wrong in a sentence.
IsoDate = Annotated[
    str, WithJsonSchema({"type": "string", "format": "date", "description": "YYYY-MM-DD"})
]
WindowDays = Annotated[int, Field(ge=1, le=3660)]


def _calendar_date(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, str):
        return value
    problem = ValueError(f"{info.field_name} {value} is not a calendar date (YYYY-MM-DD)")
    if len(value) != 10:  # fromisoformat would also take 20230901 or 2023-W35-1
        raise problem
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise problem from None


class RunParameters(BaseModel):
    """What one run attributes.

    ``start_date``/``end_date`` select conversions by conversion date (inclusive).
    ``window_days`` instead selects the last N full days before today (UTC), so a
    schedule can attribute "yesterday" (``window_days=1``) without fixed dates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_date: date | None = None
    end_date: date | None = None
    window_days: WindowDays | None = None
    provider: Provider | None = None
    refresh: bool = False
    db_path: str | None = None
    output_dir: str | None = None
    config_path: str | None = None

    _dates = field_validator("start_date", "end_date", mode="before")(_calendar_date)

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


# Sentences for what pydantic reports in its own words.
_EXPECTED = {
    "window_days": "a whole number of days from 1 to 3660",
    "provider": "one of auto, local, api",
    "refresh": "true or false",
}


def _sentence(item: dict[str, Any]) -> str:
    name = ".".join(str(part) for part in item["loc"])
    if item["type"] == "value_error" or not name:
        return str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"{name} is not a parameter of this flow"
    expected = _EXPECTED.get(name, str(item["msg"]).lower())
    return f"{name} {item.get('input')!r} is not valid: expected {expected}"


def parse_parameters(**values: object) -> RunParameters:
    """Validate raw parameters, raising ``ParameterError`` with a sentence per bad one."""
    try:
        return RunParameters.model_validate(values)
    except ValidationError as exc:
        raise ParameterError("; ".join(map(_sentence, exc.errors()))) from None


def run_mode(params: RunParameters) -> str:
    """daily, last N days, backfill or all dates: what kind of run this is."""
    if params.window_days == 1:
        return "daily"
    if params.window_days is not None:
        return f"last {params.window_days} days"
    return "backfill" if params.start_date or params.end_date else "all dates"


def run_name(params: RunParameters, today: date | None = None) -> str:
    """The flow run's name: what it covers, e.g. "daily 2023-09-07" or "all dates"."""
    mode = run_mode(params)
    start, end = params.date_range(today)
    if start is None and end is None:
        name = mode
    elif start == end:
        name = f"{mode} {start}"
    else:
        name = f"{mode} {start or 'first'}..{end or 'last'}"
    return f"{name} (refresh)" if params.refresh else name
