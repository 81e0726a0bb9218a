"""Source snapshot caching: an unchanged database is served from cache, a changed one never is."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from flows.attribution import attribution_flow
from tasks.export import REPORT_PARQUET
from tests.helpers import build_db

F, D, P = "FB & IG Ads", "Direct Traffic", "Performance Max"
CACHE_HIT_LOG = "Source tables unchanged since the last run: snapshot served from cache"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Every journey is one session, so each attributed session carries ihc 1 exactly."""
    return build_db(
        tmp_path / "challenge.db",
        sessions=[
            ("s1", "u1", "2023-09-01", "10:00:00", F, 1, 0, 0),
            ("s2", "u2", "2023-09-02", "11:00:00", D, 1, 1, 0),
            ("s3", "u3", "2023-09-02", "12:00:00", P, 0, 1, 1),
        ],
        conversions=[
            ("c1", "u1", "2023-09-01", "18:00:00", 100.0),
            ("c2", "u2", "2023-09-03", "09:00:00", 40.0),
        ],
        costs=[("s1", 10.0), ("s2", 4.0), ("s3", 2.5)],
    )


def report(*rows: tuple[str, str, float, float, float, float | None, float | None]):
    return pl.DataFrame(
        [(c, date.fromisoformat(d), *rest) for c, d, *rest in rows],
        schema={
            "channel_name": pl.String,
            "date": pl.Date,
            "cost": pl.Float64,
            "ihc": pl.Float64,
            "ihc_revenue": pl.Float64,
            "cpo": pl.Float64,
            "roas": pl.Float64,
        },
        orient="row",
    )


BEFORE = report(
    (D, "2023-09-02", 4.0, 1.0, 40.0, 4.0, 10.0),
    (F, "2023-09-01", 10.0, 1.0, 100.0, 10.0, 10.0),
    (P, "2023-09-02", 2.5, 0.0, 0.0, None, 0.0),
)


def run(db: Path, out: Path) -> tuple[dict[str, Any], pl.DataFrame]:
    summary = attribution_flow(db_path=str(db), output_dir=str(out), provider="local")
    exported = pl.read_parquet(out / REPORT_PARQUET).sort("channel_name", "date")
    return summary, exported


def execute(db: Path, statement: str) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute(statement)
        con.commit()
    finally:
        con.close()


def test_unchanged_rerun_serves_the_snapshot_from_cache(
    prefect_harness: None, db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    first, first_report = run(db, out)
    assert first["source_cache_hit"] is False
    assert_frame_equal(first_report, BEFORE)

    with caplog.at_level(logging.INFO):
        second, second_report = run(db, out)
    assert second["source_cache_hit"] is True
    assert CACHE_HIT_LOG in caplog.text
    assert second["already_attributed_skipped"] == 2
    assert second["attributed_conversions"] == 0
    assert_frame_equal(second_report, BEFORE)


CHANGES: dict[str, tuple[Callable[[Path], None], pl.DataFrame, int]] = {
    # Same row count, same file size: only the contents change.
    "cost updated": (
        lambda db: execute(db, "UPDATE session_costs SET cost = 12.0 WHERE session_id = 's1'"),
        report(
            (D, "2023-09-02", 4.0, 1.0, 40.0, 4.0, 10.0),
            (F, "2023-09-01", 12.0, 1.0, 100.0, 12.0, 100.0 / 12.0),
            (P, "2023-09-02", 2.5, 0.0, 0.0, None, 0.0),
        ),
        0,
    ),
    "conversion added": (
        lambda db: execute(
            db, "INSERT INTO conversions VALUES ('c3', 'u3', '2023-09-02', '20:00:00', 60.0)"
        ),
        report(
            (D, "2023-09-02", 4.0, 1.0, 40.0, 4.0, 10.0),
            (F, "2023-09-01", 10.0, 1.0, 100.0, 10.0, 10.0),
            (P, "2023-09-02", 2.5, 1.0, 60.0, 2.5, 24.0),
        ),
        1,
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_sources_are_read_again_and_reported(
    prefect_harness: None, db: Path, tmp_path: Path, change: str
) -> None:
    apply_change, expected, newly_attributed = CHANGES[change]
    out = tmp_path / "out"
    run(db, out)
    assert run(db, out)[0]["source_cache_hit"] is True

    apply_change(db)
    summary, exported = run(db, out)
    assert summary["source_cache_hit"] is False
    assert summary["attributed_conversions"] == newly_attributed
    assert_frame_equal(exported, expected)

    assert run(db, out)[0]["source_cache_hit"] is True
