"""Every run reads the sources as they are now: a change between runs shows in the next report."""

from __future__ import annotations

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
    assert_frame_equal(run(db, out)[1], BEFORE)

    apply_change(db)
    summary, exported = run(db, out)
    assert summary["attributed_conversions"] == newly_attributed
    assert_frame_equal(exported, expected)
