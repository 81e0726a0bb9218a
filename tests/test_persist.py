"""Writing attribution and the channel report: fan-out free, idempotent, all or nothing."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.errors import ReconciliationError
from tasks.db import prepare_database
from tasks.export import export_report, read_channel_report
from tasks.persist import read_attribution, write_results
from tasks.sources import read_sources
from tests.helpers import ORIGINAL_SCHEMA, build_db, table_rows

D = "Direct Traffic"
F = "FB & IG Ads"
P = "Performance Max"


@pytest.fixture
def shared_db(tmp_path: Path) -> Path:
    """u1 converts twice; s1 and s2 sit in both journeys. P spends with no attribution."""
    db = build_db(
        tmp_path / "shared.db",
        sessions=[
            ("s1", "u1", "2023-09-01", "10:00:00", F, 1, 0, 0),
            ("s2", "u1", "2023-09-02", "10:00:00", D, 1, 1, 0),
            ("s3", "u1", "2023-09-03", "10:00:00", F, 1, 1, 0),
            ("p1", "u2", "2023-09-01", "11:00:00", P, 1, 1, 0),
            ("p2", "u3", "2023-09-01", "12:00:00", P, 1, 1, 0),
        ],
        conversions=[
            ("c1", "u1", "2023-09-02", "20:00:00", 100.0),
            ("c2", "u1", "2023-09-03", "20:00:00", 50.0),
        ],
        costs=[("s1", 10.0), ("s2", None), ("s3", 4.0), ("p1", 7.5), ("p2", 2.5)],
    )
    prepare_database(db, ORIGINAL_SCHEMA)
    return db


def rows(*triples: tuple[str, str, float]) -> pl.DataFrame:
    return pl.DataFrame(triples, schema=["conv_id", "session_id", "ihc"], orient="row")


ATTRIBUTION = rows(
    ("c1", "s1", 0.25),
    ("c1", "s2", 0.75),
    ("c2", "s1", 0.5),
    ("c2", "s2", 0.25),
    ("c2", "s3", 0.25),
)


def write(db: Path, new: pl.DataFrame, replace: list[str] | None = None):
    ids = pl.Series("conv_id", replace if replace is not None else new["conv_id"].unique())
    return write_results(db, read_sources(db, None, None), read_attribution(db), new, ids)


def test_report_counts_shared_session_cost_once_and_keeps_unattributed_spend(
    shared_db: Path,
) -> None:
    outcome = write(shared_db, ATTRIBUTION)
    assert outcome.rows_written == 5
    assert table_rows(shared_db, "channel_reporting") == [
        # s1 is in two journeys: its cost 10 counts once; ihc 0.25 + 0.5; revenue
        # 0.25·100 + 0.5·50.
        (D, "2023-09-02", 0.0, 1.0, 0.75 * 100 + 0.25 * 50),
        (F, "2023-09-01", 10.0, 0.75, 0.25 * 100 + 0.5 * 50),
        (F, "2023-09-03", 4.0, 0.25, 0.25 * 50),
        # Spend without attribution stays, with ihc 0.
        (P, "2023-09-01", 10.0, 0.0, 0.0),
    ]
    assert outcome.report_cost == pytest.approx(24.0)
    assert outcome.attributed_conversions == 2
    assert outcome.attributed_revenue == pytest.approx(150.0)


def test_export_has_null_cpo_and_roas_where_the_denominator_is_zero(
    shared_db: Path, tmp_path: Path
) -> None:
    write(shared_db, ATTRIBUTION)
    report = read_channel_report(shared_db)
    expected = pl.DataFrame(
        {
            "channel_name": [D, F, F, P],
            "date": [date(2023, 9, 2), date(2023, 9, 1), date(2023, 9, 3), date(2023, 9, 1)],
            "cost": [0.0, 10.0, 4.0, 10.0],
            "ihc": [1.0, 0.75, 0.25, 0.0],
            "ihc_revenue": [87.5, 50.0, 12.5, 0.0],
            "cpo": [0.0, 10.0 / 0.75, 16.0, None],
            "roas": [None, 5.0, 12.5 / 4.0, 0.0],
        }
    )
    assert_frame_equal(report, expected)
    out = tmp_path / "out"
    csv_path, parquet_path = export_report(report, out)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "channel_name,date,cost,ihc,ihc_revenue,cpo,roas"
    assert lines[1] == "Direct Traffic,2023-09-02,0.0,1.0,87.5,0.0,"
    assert lines[4] == "Performance Max,2023-09-01,10.0,0.0,0.0,,0.0"
    assert "inf" not in csv_path.read_text().lower()
    assert "nan" not in csv_path.read_text().lower()
    assert_frame_equal(pl.read_parquet(parquet_path), expected)
    assert sorted(p.name for p in out.iterdir()) == [
        "channel_reporting.csv",
        "channel_reporting.parquet",
    ]


def test_the_exported_report_is_the_whole_table_with_cpo_and_roas(shared_db: Path) -> None:
    write(shared_db, ATTRIBUTION)
    report = read_channel_report(shared_db)
    stored = table_rows(shared_db, "channel_reporting")
    assert report.select("channel_name", "date").rows() == [
        (name, date.fromisoformat(day)) for name, day, *_ in stored
    ]
    for row in report.iter_rows(named=True):
        assert row["cpo"] == (row["cost"] / row["ihc"] if row["ihc"] else None)
        assert row["roas"] == (row["ihc_revenue"] / row["cost"] if row["cost"] else None)


def test_rewriting_the_same_conversions_leaves_identical_tables(shared_db: Path) -> None:
    write(shared_db, ATTRIBUTION)
    first = (
        table_rows(shared_db, "attribution_customer_journey"),
        table_rows(shared_db, "channel_reporting"),
    )
    second_outcome = write(shared_db, ATTRIBUTION.reverse())
    second = (
        table_rows(shared_db, "attribution_customer_journey"),
        table_rows(shared_db, "channel_reporting"),
    )
    assert second == first
    assert second_outcome.rows_deleted == 5


def test_replacing_a_conversion_replaces_all_its_rows(shared_db: Path) -> None:
    write(shared_db, ATTRIBUTION)
    write(shared_db, rows(("c2", "s3", 1.0)))
    assert table_rows(shared_db, "attribution_customer_journey") == [
        ("c1", "s1", 0.25),
        ("c1", "s2", 0.75),
        ("c2", "s3", 1.0),
    ]


def test_a_failed_check_writes_nothing(shared_db: Path) -> None:
    write(shared_db, ATTRIBUTION)
    before = (
        table_rows(shared_db, "attribution_customer_journey"),
        table_rows(shared_db, "channel_reporting"),
    )
    with pytest.raises(ReconciliationError, match="do not sum to 1"):
        write(shared_db, rows(("c1", "s1", 0.5), ("c1", "s2", 0.4)))
    after = (
        table_rows(shared_db, "attribution_customer_journey"),
        table_rows(shared_db, "channel_reporting"),
    )
    assert after == before


def test_attribution_of_a_session_that_disappeared_fails_reconciliation(
    shared_db: Path,
) -> None:
    write(shared_db, ATTRIBUTION)
    con = sqlite3.connect(shared_db)
    con.execute("DELETE FROM session_sources WHERE session_id = 's3'")
    con.commit()
    con.close()
    with pytest.raises(ReconciliationError, match="reference sessions missing"):
        write(shared_db, rows(("c1", "s1", 0.25), ("c1", "s2", 0.75)))
