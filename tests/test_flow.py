"""The flow end to end: real SQLite files, real Prefect runs (one test server)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from flows.attribution import attribution_flow
from flows.cli import main
from tasks.sample_data import generate_sample_database
from tests.helpers import build_db, build_db_missing_columns, table_rows

pytestmark = pytest.mark.usefixtures("prefect_harness")

FB = "FB & IG Ads"
D = "Direct Traffic"


@pytest.fixture
def known_db(tmp_path: Path) -> Path:
    """Single-session journeys, so every ihc is 1 and the report is known exactly."""
    return build_db(
        tmp_path / "known.db",
        sessions=[
            ("s1", "u1", "2023-09-01", "10:00:00", FB, 1, 1, 0),
            ("s2", "u2", "2023-09-01", "11:00:00", D, 1, 0, 0),
            ("s3", "u3", "2023-09-02", "09:00:00", FB, 0, 0, 0),
            ("s4", "u1", "2023-09-03", "10:00:00", FB, 1, 1, 0),
        ],
        conversions=[
            ("c1", "u1", "2023-09-02", "10:00:00", 100.0),
            ("c2", "u2", "2023-09-02", "12:00:00", 0.0),
            ("c3", "u9", "2023-09-02", "12:00:00", 50.0),
        ],
        costs=[("s1", 5.0), ("s2", None), ("s3", 3.0), ("s4", 2.0)],
    )


def test_flow_writes_the_known_report_and_exports_cpo_and_roas(
    known_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = attribution_flow(db_path=str(known_db), output_dir=str(out), provider="local")
    assert table_rows(known_db, "attribution_customer_journey") == [
        ("c1", "s1", 1.0),
        ("c2", "s2", 1.0),
    ]
    assert table_rows(known_db, "channel_reporting") == [
        (D, "2023-09-01", 0.0, 1.0, 0.0),
        (FB, "2023-09-01", 5.0, 1.0, 100.0),
        (FB, "2023-09-02", 3.0, 0.0, 0.0),
        (FB, "2023-09-03", 2.0, 0.0, 0.0),
    ]
    assert (out / "channel_reporting.csv").read_text().splitlines() == [
        "channel_name,date,cost,ihc,ihc_revenue,cpo,roas",
        "Direct Traffic,2023-09-01,0.0,1.0,0.0,0.0,",
        "FB & IG Ads,2023-09-01,5.0,1.0,100.0,5.0,20.0",
        "FB & IG Ads,2023-09-02,3.0,0.0,0.0,,0.0",
        "FB & IG Ads,2023-09-03,2.0,0.0,0.0,,0.0",
    ]
    parquet = pl.read_parquet(out / "channel_reporting.parquet")
    assert parquet["cpo"].to_list() == [0.0, 5.0, None, None]
    assert parquet["roas"].to_list() == [None, 20.0, 0.0, 0.0]
    assert summary["conversions_in_range"] == 3
    assert summary["conversions_with_journey"] == 2
    assert summary["unattributed_no_journey"] == 1
    assert summary["attributed_conversions"] == 2
    assert summary["total_cost"] == pytest.approx(10.0)
    assert summary["attributed_revenue"] == pytest.approx(100.0)
    assert summary["overall_cpo"] == pytest.approx(5.0)
    assert summary["overall_roas"] == pytest.approx(10.0)


def test_a_ranged_run_attributes_its_range_and_exports_the_whole_report(
    known_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    attribution_flow(
        db_path=str(known_db),
        output_dir=str(out),
        provider="local",
        start_date="2023-09-03",
        end_date="2023-09-03",
    )
    # No conversion on 2023-09-03: nothing attributed, yet the files hold every channel-day.
    assert table_rows(known_db, "attribution_customer_journey") == []
    lines = (out / "channel_reporting.csv").read_text().splitlines()
    assert [tuple(line.split(",")[:2]) for line in lines[1:]] == [
        (D, "2023-09-01"),
        (FB, "2023-09-01"),
        (FB, "2023-09-02"),
        (FB, "2023-09-03"),
    ]
    attribution_flow(
        db_path=str(known_db),
        output_dir=str(out),
        provider="local",
        start_date="2023-09-02",
        end_date="2023-09-02",
    )
    # The journeys of conversions in the range reached back to 2023-09-01.
    assert table_rows(known_db, "attribution_customer_journey") == [
        ("c1", "s1", 1.0),
        ("c2", "s2", 1.0),
    ]
    assert pl.read_parquet(out / "channel_reporting.parquet").height == 4


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "challenge.db"
    generate_sample_database(path, scale=0.05, seed=7)
    return path


def independent_totals(db: Path) -> tuple[float, int, float]:
    """Σ all session cost, attributed conversions, their revenue: straight from SQLite."""
    con = sqlite3.connect(db)
    try:
        cost = con.execute(
            "SELECT sum(c.cost) FROM session_costs c JOIN session_sources s USING (session_id)"
        ).fetchone()[0]
        attributed, revenue = con.execute(
            "SELECT count(*), sum(revenue) FROM conversions WHERE conv_id IN "
            "(SELECT conv_id FROM attribution_customer_journey)"
        ).fetchone()
    finally:
        con.close()
    return cost, attributed, revenue


def report_sums(db: Path) -> tuple[float, float, float]:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "SELECT sum(cost), sum(ihc), sum(ihc_revenue) FROM channel_reporting"
        ).fetchone()
    finally:
        con.close()


def test_sample_data_report_reconciles_and_reruns_are_idempotent(
    sample_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = attribution_flow(db_path=str(sample_db), output_dir=str(out), provider="local")
    cost, attributed, revenue = independent_totals(sample_db)
    assert attributed == first["conversions_with_journey"] > 0
    assert report_sums(sample_db) == pytest.approx((cost, attributed, revenue), rel=1e-9)
    tables = [
        table_rows(sample_db, t) for t in ("attribution_customer_journey", "channel_reporting")
    ]
    csv_bytes = (out / "channel_reporting.csv").read_bytes()

    again = attribution_flow(db_path=str(sample_db), output_dir=str(out), provider="local")
    assert again["sent_conversions"] == 0
    assert again["already_attributed_skipped"] == first["conversions_with_journey"]
    assert [
        table_rows(sample_db, t) for t in ("attribution_customer_journey", "channel_reporting")
    ] == tables
    assert (out / "channel_reporting.csv").read_bytes() == csv_bytes

    refreshed = attribution_flow(
        db_path=str(sample_db), output_dir=str(out), provider="local", refresh=True
    )
    assert refreshed["sent_conversions"] == first["conversions_with_journey"]
    assert [
        table_rows(sample_db, t) for t in ("attribution_customer_journey", "channel_reporting")
    ] == tables


def test_cli_refuses_a_missing_explicit_database_without_making_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.db"
    assert main(["--db", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"database file not found: {missing}" in capsys.readouterr().err
    assert not missing.exists()


def test_cli_names_the_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = build_db_missing_columns(tmp_path / "broken.db", ["session_id", "user_id"])
    assert main(["--db", str(db), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "table 'session_sources' lacks column(s)" in err
    assert "'event_date'" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_rejects_end_before_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--start-date", "2023-09-05", "--end-date", "2023-09-01", "--db", str(tmp_path / "x.db")]
    )
    assert code == 2
    assert "end_date 2023-09-01 is before start_date 2023-09-05" in capsys.readouterr().err


def test_cli_help_lists_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flows.attribution", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0
    for option in (
        "--start-date",
        "--end-date",
        "--db",
        "--output-dir",
        "--config",
        "--provider",
        "--refresh",
        "--serve",
    ):
        assert option in result.stdout


def test_missing_configured_database_is_created_with_synthetic_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "data" / "challenge.db"
    monkeypatch.setenv("ATTRIBUTION_DATABASE__PATH", str(db))
    monkeypatch.setenv("ATTRIBUTION_SAMPLE_DATA__SCALE", "0.02")
    summary = attribution_flow(output_dir=str(tmp_path / "out"), provider="local")
    assert db.exists()
    assert summary["synthetic_data"] is True
    assert summary["attributed_conversions"] > 0
    assert "SYNTHETIC sample data" in caplog.text
    assert (tmp_path / "out" / "channel_reporting.csv").exists()
