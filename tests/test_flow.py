"""The flow end to end: real SQLite files, real Prefect runs (one test server)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.settings import PROJECT_ROOT
from flows.attribution import attribution_flow
from flows.cli import main
from flows.report import report_flow
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
    # Every later run on that database says so too, not only the one that made it.
    caplog.clear()
    again = attribution_flow(output_dir=str(tmp_path / "out"), provider="local")
    assert again["synthetic_data"] is True
    assert again["attributed_conversions"] == 0
    assert "holds SYNTHETIC sample data" in caplog.text
    assert again["files"] and (tmp_path / "out" / "report.html").exists()
    # So does a report rebuilt from what is stored.
    caplog.clear()
    rebuilt = report_flow(output_dir=str(tmp_path / "out"))
    assert rebuilt["synthetic_data"] is True
    assert "holds SYNTHETIC sample data" in caplog.text


def test_a_hand_made_database_is_not_called_synthetic(known_db: Path, tmp_path: Path) -> None:
    summary = attribution_flow(db_path=str(known_db), output_dir=str(tmp_path), provider="local")
    assert summary["synthetic_data"] is False


def test_report_files_get_the_usual_permissions(
    known_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        attribution_flow(db_path=str(known_db), output_dir=str(out), provider="local")
    finally:
        os.umask(previous)
    written = sorted(path.name for path in out.iterdir())
    assert {"channel_reporting.csv", "channel_reporting.parquet", "report.html"} <= set(written)
    # As a plain open() under umask 022 makes them: readable by other users and BI tools.
    assert {oct(stat.S_IMODE((out / name).stat().st_mode)) for name in written} == {"0o644"}


def test_a_missing_database_is_reported_before_prefect_starts(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "flows.attribution", "--db", str(missing)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        check=False,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"attribution: database file not found: {missing} (no sample data is made for it)"
    )
    assert "Starting temporary server" not in result.stdout + result.stderr
    assert elapsed < 2.0
    assert not missing.exists()


def test_runs_are_named_after_what_they_cover_and_tagged(known_db: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    out = str(tmp_path / "out")
    args = ["--db", str(known_db), "--output-dir", out, "--provider", "local"]
    assert main([*args, "--start-date", "2023-09-02", "--end-date", "2023-09-03"]) == 0
    assert main([*args, "--start-date", "2023-09-02", "--end-date", "2023-09-02"]) == 0
    assert main([*args, "--refresh"]) == 0
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=3)
    assert [(run.name, sorted(run.tags)) for run in runs] == [
        ("all dates (refresh)", ["attribution", "mode:all dates", "provider:local"]),
        ("backfill 2023-09-02", ["attribution", "mode:backfill", "provider:local"]),
        ("backfill 2023-09-02..2023-09-03", ["attribution", "mode:backfill", "provider:local"]),
    ]


def test_bad_dates_are_refused_in_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--start-date", "2023-02-30"]) == 2
    assert capsys.readouterr().err == (
        "attribution: start_date 2023-02-30 is not a calendar date (YYYY-MM-DD)\n"
    )
    assert main(["--window-days", "0"]) == 2
    assert capsys.readouterr().err == (
        "attribution: window_days '0' is not valid: expected a whole number of days "
        "from 1 to 3660\n"
    )


def test_report_only_rebuilds_the_comparison_and_page_without_attributing(
    known_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--db", str(known_db), "--output-dir", str(out)]
    assert main([*args, "--provider", "local", "--start-date", "2023-09-02"]) == 0
    first = pl.read_csv(out / "model_comparison.csv")
    tables = {
        t: table_rows(known_db, t) for t in ("attribution_customer_journey", "channel_reporting")
    }
    for name in ("model_comparison.csv", "model_comparison.parquet", "report.html"):
        (out / name).unlink()
    assert main([*args, "--report-only", "--start-date", "2023-09-02"]) == 0
    assert_frame_equal(pl.read_csv(out / "model_comparison.csv"), first)
    assert "Spend and attributed revenue per channel" in (out / "report.html").read_text()
    assert {t: table_rows(known_db, t) for t in tables} == tables
    # One conversion per journey, one session each: every model gives FB and Direct one each.
    ihc = first.filter(pl.col("model") == "ihc").sort("channel_name")
    assert ihc.select("channel_name", "conversions").rows() == [(D, 1.0), (FB, 1.0)]
    assert main([*args, "--report-only", "--refresh"]) == 2


def test_a_failed_run_publishes_why_in_its_summary(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    missing = tmp_path / "missing.db"
    state = attribution_flow(db_path=str(missing), return_state=True)
    assert state.is_failed()
    assert state.message == (
        f"DatabaseError: database file not found: {missing} (no sample data is made for it)"
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    (summary,) = artifacts
    assert summary.key == "attribution-run-summary"
    assert summary.task_run_id is None
    assert summary.data.startswith("# Attribution run failed")
    assert f"**DatabaseError**: database file not found: {missing}" in summary.data
