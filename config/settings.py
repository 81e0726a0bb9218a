"""One typed settings model, loaded from YAML and the environment, validated up front."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "config.yaml"
ENV_PREFIX = "ATTRIBUTION_"


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    path: Path = Path("data/challenge.db")
    schema_path: Path = Path("data/challenge_db_create.sql")
    lock_timeout_s: float = Field(0.0, ge=0)
    memory_limit: str = Field("1GB", pattern=r"^[0-9]+(\.[0-9]+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


class OutputSettings(_Section):
    dir: Path = Path("output")


class JourneySettings(_Section):
    include_equal_timestamps: bool = False
    lookback_days: int | None = Field(None, gt=0)


class AttributionSettings(_Section):
    provider: Literal["auto", "local", "api"] = "auto"


class RedistributionRule(_Section):
    direction: Literal["earlier_sessions_only", "later_sessions_only", "any_session"]
    receive_threshold: float = Field(0.0, ge=0, le=1)
    redistribution_channel_labels: list[str] = Field(min_length=1)


class RedistributionParameter(_Section):
    initializer: RedistributionRule | None = None
    holder: RedistributionRule | None = None
    closer: RedistributionRule | None = None

    def as_payload(self) -> dict[str, Any]:
        """The JSON object the IHC API expects (phases without a rule left out)."""
        return self.model_dump(exclude_none=True)


class ApiSettings(_Section):
    base_url: str = "https://api.ihc-attribution.com"
    conv_type_id: str = Field("default", min_length=1)
    max_journeys_per_request: int = Field(100, gt=0, le=100)
    max_sessions_per_request: int = Field(3000, gt=0, le=3000)
    long_journey_policy: Literal["keep_recent", "fail"] = "keep_recent"
    concurrency: int = Field(4, gt=0, le=256)
    ramp_up_s: float = Field(0.03, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    progress_every_batches: int = Field(10, gt=0)
    redistribution_parameter: RedistributionParameter | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class PhaseWeights(_Section):
    initializer: float = Field(0.35, ge=0)
    holder: float = Field(0.38, ge=0)
    closer: float = Field(0.27, ge=0)

    @model_validator(mode="after")
    def _positive_total(self) -> PhaseWeights:
        if self.initializer + self.holder + self.closer <= 0:
            raise ValueError("phase weights must not all be 0")
        return self


class LocalModelSettings(_Section):
    initializer_start_h: float = Field(48.0, ge=0)
    initializer_end_h: float = Field(480.0, gt=0)
    closer_half_h: float = Field(12.0, gt=0)
    closer_shape: float = Field(0.5, gt=0)
    impression_weight: float = Field(0.5, ge=0)
    phase_weights: PhaseWeights = PhaseWeights()

    @model_validator(mode="after")
    def _ramp_ordered(self) -> LocalModelSettings:
        if self.initializer_end_h <= self.initializer_start_h:
            raise ValueError("initializer_end_h must be greater than initializer_start_h")
        return self


class QualitySettings(_Section):
    fail_on_invalid_rows: bool = False
    max_examples: int = Field(20, gt=0)


class SampleDataSettings(_Section):
    scale: float = Field(1.0, gt=0)
    seed: int = 42


ModelName = Literal[
    "last_touch", "first_touch", "linear", "position", "time_decay", "markov", "shapley", "ihc"
]
MODEL_NAMES: tuple[ModelName, ...] = (
    "last_touch", "first_touch", "linear", "position", "time_decay", "markov", "shapley", "ihc",
)  # fmt: skip


class ModelsSettings(_Section):
    """The attribution models compared side by side (``shared/spec/models.md``)."""

    enabled: bool = True
    include: list[ModelName] = Field(default_factory=lambda: list(MODEL_NAMES), min_length=1)
    markov_orders: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    time_decay_half_life_days: float = Field(7.0, gt=0)
    bootstrap_resamples: int = Field(200, ge=0, le=10_000)
    bootstrap_seed: int = 42

    @field_validator("markov_orders")
    @classmethod
    def _orders(cls, value: list[int]) -> list[int]:
        if any(order < 1 or order > 4 for order in value):
            raise ValueError("Markov orders must be between 1 and 4")
        return sorted(set(value))


class Settings(_Section):
    database: DatabaseSettings = DatabaseSettings()
    output: OutputSettings = OutputSettings()
    journeys: JourneySettings = JourneySettings()
    attribution: AttributionSettings = AttributionSettings()
    api: ApiSettings = ApiSettings()
    local_model: LocalModelSettings = LocalModelSettings()
    quality: QualitySettings = QualitySettings()
    sample_data: SampleDataSettings = SampleDataSettings()
    models: ModelsSettings = ModelsSettings()

    def resolved(self, base: Path = PROJECT_ROOT) -> Settings:
        """The same settings with relative paths anchored at ``base``."""

        def anchor(path: Path) -> Path:
            return path if path.is_absolute() else base / path

        return self.model_copy(
            update={
                "database": self.database.model_copy(
                    update={
                        "path": anchor(self.database.path),
                        "schema_path": anchor(self.database.schema_path),
                    }
                ),
                "output": self.output.model_copy(update={"dir": anchor(self.output.dir)}),
            }
        )


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """ATTRIBUTION_<SECTION>__<KEY>[__<SUBKEY>] values, parsed as YAML scalars."""
    overrides: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if len(keys) < 2 or not all(keys):
            raise SettingsError(
                f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY>"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise SettingsError(f"environment variable {name}: not a valid value ({exc})") from exc
        _set_path(overrides, keys, value)
    return overrides


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown setting")
        else:
            parts.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def load_settings(
    config_path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults from YAML, then ``ATTRIBUTION_*`` variables, then explicit overrides.

    Relative paths are resolved against the project root. Raises ``SettingsError``
    naming every key that is unknown or has a wrong value.
    """
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    if not path.is_file():
        raise SettingsError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SettingsError(f"config file {path} must hold a mapping of sections")
    data = _merge(loaded, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, overrides)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(f"invalid settings: {_describe(exc)}") from None
    return settings.resolved()
