"""One typed settings model, loaded from YAML and the environment, validated up front.

pydantic-settings merges, lowest first: ``config/config.yaml`` (or ``--config``), the
``ATTRIBUTION_<SECTION>__<KEY>`` variables, ``IHC_API_URL`` / ``IHC_CONV_TYPE_ID``, and
the run's parameters. The API key is not a setting: ``config.secrets`` reads it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings import (
    SettingsError as SettingsSourceError,
)

from config.errors import SettingsError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "config.yaml"
ENV_PREFIX = "ATTRIBUTION_"
API_URL_ENV = "IHC_API_URL"
CONV_TYPE_ENV = "IHC_CONV_TYPE_ID"
# The YAML file of the ``load_settings`` call under way (pydantic-settings builds its
# sources inside the model's constructor, which takes no file argument).
_CONFIG_FILE: ContextVar[Path] = ContextVar("config_file", default=DEFAULT_CONFIG_PATH)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# A relative path in the settings is relative to the project root, wherever the run starts.
ProjectPath = Annotated[
    Path, AfterValidator(lambda path: path if path.is_absolute() else PROJECT_ROOT / path)
]


_BYTES = {
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip


class DatabaseSettings(_Section):
    path: ProjectPath = Path("data/challenge.db")
    schema_path: ProjectPath = Path("data/challenge_db_create.sql")
    lock_timeout_s: float = Field(0.0, ge=0)
    memory_limit: str = Field("1GB", pattern=r"^[0-9]+(\.[0-9]+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
    temp_dir: ProjectPath = Path("output/.tmp")

    @property
    def memory_limit_bytes(self) -> int:
        number, unit = re.fullmatch(r"([0-9.]+)\s*(\w+)", self.memory_limit).groups()  # type: ignore[union-attr]
        return int(float(number) * _BYTES[unit])


class OutputSettings(_Section):
    dir: ProjectPath = Path("output")


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
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)


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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
        extra="forbid",
        frozen=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    output: OutputSettings = OutputSettings()
    journeys: JourneySettings = JourneySettings()
    attribution: AttributionSettings = AttributionSettings()
    api: ApiSettings = ApiSettings()
    local_model: LocalModelSettings = LocalModelSettings()
    quality: QualitySettings = QualitySettings()
    sample_data: SampleDataSettings = SampleDataSettings()
    models: ModelsSettings = ModelsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _IhcVariables(settings_cls),
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=_CONFIG_FILE.get()),
        )


class _IhcVariables(PydanticBaseSettingsSource):
    """``IHC_API_URL`` and ``IHC_CONV_TYPE_ID``, the names the IHC service's own examples use."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        api = {
            key: os.environ[name].strip()
            for name, key in ((API_URL_ENV, "base_url"), (CONV_TYPE_ENV, "conv_type_id"))
            if os.environ.get(name, "").strip()
        }
        return {"api": api} if api else {}


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown setting")
        else:
            parts.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(parts)


def _check_variable_names() -> None:
    """pydantic-settings ignores ATTRIBUTION_ variables that name no section: refuse them."""
    sections = {name.upper() for name in Settings.model_fields}
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX):
            section, _, key = name[len(ENV_PREFIX) :].partition("__")
            if section not in sections or not key:
                raise SettingsError(
                    f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY> "
                    f"with a section of {', '.join(sorted(sections))}"
                )


def load_settings(
    config_path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Defaults from YAML, then ``ATTRIBUTION_*`` variables, then ``IHC_API_URL`` /
    ``IHC_CONV_TYPE_ID``, then explicit ``overrides`` (run parameters).

    Relative paths are anchored at the project root. Raises ``SettingsError``
    naming every key that is unknown or has a wrong value.
    """
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    if not path.is_file():
        raise SettingsError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict | None):
        raise SettingsError(f"config file {path} must hold a mapping of sections")
    _check_variable_names()
    token = _CONFIG_FILE.set(path)
    try:
        settings = Settings(**(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(f"invalid settings: {_describe(exc)}") from None
    except SettingsSourceError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
    finally:
        _CONFIG_FILE.reset(token)
    return settings
