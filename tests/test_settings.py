"""Settings: YAML defaults, environment overrides, errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.errors import ParameterError, SettingsError
from config.settings import PROJECT_ROOT, load_settings
from flows.parameters import parse_parameters


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ATTRIBUTION_ or IHC_ variable of the caller's leaks into these tests."""
    for name in list(os.environ):
        if name.startswith(("ATTRIBUTION_", "IHC_")):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_come_from_the_yaml_and_paths_are_anchored() -> None:
    settings = load_settings()
    assert settings.database.path == PROJECT_ROOT / "data" / "challenge.db"
    assert settings.api.max_journeys_per_request == 100
    assert settings.api.max_sessions_per_request == 3000
    assert settings.journeys.include_equal_timestamps is False
    assert settings.journeys.lookback_days is None
    assert settings.attribution.provider == "auto"
    assert settings.local_model.phase_weights.holder == 0.38


def test_environment_overrides_any_key_with_typed_values(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "ATTRIBUTION_API__CONCURRENCY": "8",
        "ATTRIBUTION_JOURNEYS__INCLUDE_EQUAL_TIMESTAMPS": "true",
        "ATTRIBUTION_JOURNEYS__LOOKBACK_DAYS": "30",
        "ATTRIBUTION_LOCAL_MODEL__PHASE_WEIGHTS__CLOSER": "0.5",
        "ATTRIBUTION_DATABASE__PATH": "/tmp/other.db",
        "ATTRIBUTION_MODELS__MARKOV_ORDERS": "[2, 1]",
    }.items():
        clean_environment.setenv(name, value)
    settings = load_settings(overrides={"output": {"dir": "elsewhere"}})
    assert settings.api.concurrency == 8
    assert settings.journeys.include_equal_timestamps is True
    assert settings.journeys.lookback_days == 30
    assert settings.local_model.phase_weights.closer == 0.5
    assert settings.database.path == Path("/tmp/other.db")
    assert settings.models.markov_orders == [1, 2]
    assert settings.output.dir == PROJECT_ROOT / "elsewhere"
    # Run parameters win over the environment, which wins over the YAML.
    clean_environment.setenv("ATTRIBUTION_OUTPUT__DIR", "/tmp/from-env")
    assert load_settings().output.dir == Path("/tmp/from-env")
    assert load_settings(overrides={"output": {"dir": "/tmp/p"}}).output.dir == Path("/tmp/p")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ATTRIBUTION_API__CONCURENCY": "8"}, "api.concurency: unknown setting"),
        ({"ATTRIBUTION_API__CONCURRENCY": "0"}, "api.concurrency: Input should be greater"),
        ({"ATTRIBUTION_API__CONCURRENCY": "many"}, "api.concurrency"),
        ({"ATTRIBUTION_ATTRIBUTION__PROVIDER": "cloud"}, "attribution.provider"),
        ({"ATTRIBUTION_JOURNEYS__LOOKBACK_DAYS": "-3"}, "journeys.lookback_days"),
        ({"ATTRIBUTION_API__MAX_SESSIONS_PER_REQUEST": "5000"}, "max_sessions_per_request"),
        ({"ATTRIBUTION_NOPE": "1"}, "ATTRIBUTION_NOPE"),
    ],
)
def test_bad_settings_are_rejected_naming_the_key(
    clean_environment: pytest.MonkeyPatch, environ: dict[str, str], message: str
) -> None:
    for name, value in environ.items():
        clean_environment.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_unknown_key_in_yaml_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("database:\n  path: x.db\n  colour: blue\n")
    with pytest.raises(SettingsError, match=r"database\.colour: unknown setting"):
        load_settings(config)


def test_end_before_start_is_rejected_naming_both() -> None:
    with pytest.raises(ParameterError, match="end_date 2023-09-01 is before start_date 2023-09-05"):
        parse_parameters(start_date="2023-09-05", end_date="2023-09-01")


def test_hostile_date_parameter_is_rejected_as_data() -> None:
    with pytest.raises(ParameterError, match="start_date"):
        parse_parameters(start_date="2023-01-01'; DROP TABLE conversions; --")


def test_window_days_resolves_to_full_days_before_today() -> None:
    from datetime import date

    params = parse_parameters(window_days=1)
    assert params.date_range(today=date(2023, 9, 8)) == (date(2023, 9, 7), date(2023, 9, 7))
    params = parse_parameters(window_days=7)
    assert params.date_range(today=date(2023, 9, 8)) == (date(2023, 9, 1), date(2023, 9, 7))
