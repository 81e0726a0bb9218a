"""Settings: YAML defaults, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT, SettingsError, load_settings
from flows.parameters import ParameterError, parse_parameters


def test_defaults_come_from_the_yaml_and_paths_are_anchored() -> None:
    settings = load_settings(environ={})
    assert settings.database.path == PROJECT_ROOT / "data" / "challenge.db"
    assert settings.api.max_journeys_per_request == 100
    assert settings.api.max_sessions_per_request == 3000
    assert settings.journeys.include_equal_timestamps is False
    assert settings.journeys.lookback_days is None
    assert settings.attribution.provider == "auto"
    assert settings.local_model.phase_weights.holder == 0.38


def test_environment_overrides_any_key_with_typed_values() -> None:
    settings = load_settings(
        environ={
            "ATTRIBUTION_API__CONCURRENCY": "8",
            "ATTRIBUTION_JOURNEYS__INCLUDE_EQUAL_TIMESTAMPS": "true",
            "ATTRIBUTION_LOCAL_MODEL__PHASE_WEIGHTS__CLOSER": "0.5",
            "ATTRIBUTION_DATABASE__PATH": "/tmp/other.db",
        }
    )
    assert settings.api.concurrency == 8
    assert settings.journeys.include_equal_timestamps is True
    assert settings.local_model.phase_weights.closer == 0.5
    assert settings.database.path == Path("/tmp/other.db")


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
def test_bad_settings_are_rejected_naming_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_unknown_key_in_yaml_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("database:\n  path: x.db\n  colour: blue\n")
    with pytest.raises(SettingsError, match=r"database\.colour: unknown setting"):
        load_settings(config, environ={})


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
