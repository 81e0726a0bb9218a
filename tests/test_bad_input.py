"""Rows that cannot be used: excluded, counted per reason, listed; hostile values stay data."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest

from flows.attribution import attribution_flow
from flows.cli import main
from tasks.sources import read_sources
from tests.helpers import build_db, table_rows

FB = "FB & IG Ads"

GOOD_SESSIONS = [
    ("g1", "u1", "2023-09-01", "10:00:00", FB, 1, 1, 0),
    ("g2", "u2", "2023-09-01", "11:00:00", FB, 1, 0, 0),
]
GOOD_CONVERSIONS = [
    ("c1", "u1", "2023-09-02", "10:00:00", 10.0),
    ("c2", "u2", "2023-09-02", "10:00:00", 20.0),
]


@pytest.fixture
def dirty_db(tmp_path: Path) -> Path:
    """Every kind of unusable row, in a database without primary keys."""
    return build_db(
        tmp_path / "dirty.db",
        with_keys=False,
        sessions=[
            *GOOD_SESSIONS,
            ("b_date", "u1", "2023-13-45", "10:00:00", FB, 1, 1, 0),
            ("b_time", "u1", "2023-09-01", "25:99", FB, 1, 1, 0),
            ("b_chan", "u1", "2023-09-01", "10:00:00", "", 1, 1, 0),
            ("b_null", "u1", "2023-09-01", "10:00:00", None, 1, 1, 0),
            ("b_flag", "u1", "2023-09-01", "10:00:00", FB, 2, 1, 0),
            ("b_text", "u1", "2023-09-01", "10:00:00", FB, 1, "yes", 0),
            ("dup", "u1", "2023-09-01", "09:00:00", FB, 1, 1, 0),
            ("dup", "u2", "2023-09-01", "09:00:00", FB, 1, 1, 0),
        ],
        conversions=[
            *GOOD_CONVERSIONS,
            ("c_date", "u1", "02.09.2023", "10:00:00", 5.0),
            ("c_neg", "u2", "2023-09-02", "10:00:00", -5.0),
            ("c_dup", "u1", "2023-09-02", "11:00:00", 1.0),
            ("c_dup", "u1", "2023-09-02", "12:00:00", 2.0),
        ],
        costs=[("g1", 4.0), ("g2", -1.0), ("ghost", 9.0), ("b_date", "abc")],
    )


EXPECTED_COUNTS = {
    "conversions: duplicate conv_id": 2,
    "conversions: negative revenue": 1,
    "conversions: unparsable conv_date/conv_time": 1,
    "session_costs: cost without a session in session_sources": 1,
    "session_costs: negative cost": 1,
    "session_costs: unparsable cost": 1,
    "session_sources: closer_engagement not 0/1": 1,
    "session_sources: duplicate session_id": 2,
    "session_sources: empty channel_name": 2,
    "session_sources: holder_engagement not 0/1": 1,
    "session_sources: unparsable event_date/event_time": 2,
}


def test_unusable_rows_are_excluded_counted_and_listed(dirty_db: Path) -> None:
    snapshot = read_sources(dirty_db, None, None, max_examples=10)
    counts = {
        f"{r['source_table']}: {r['reason']}": r["rows"] for r in snapshot.invalid_counts.to_dicts()
    }
    assert counts == EXPECTED_COUNTS
    assert sorted(snapshot.sessions["session_id"]) == ["g1", "g2"]
    assert sorted(snapshot.conversions["conv_id"]) == ["c1", "c2"]
    # g2's negative cost is not spend; g1's 4.0 is.
    assert snapshot.total_cost == 4.0
    examples = {
        (r["reason"], json.loads(r["row_values"]).get("session_id"))
        for r in snapshot.invalid_examples.filter(
            snapshot.invalid_examples["source_table"] == "session_sources"
        ).to_dicts()
    }
    assert ("unparsable event_date/event_time", "b_time") in examples
    assert ("closer_engagement not 0/1", "b_text") in examples


def test_the_run_succeeds_without_them_and_writes_the_quarantine_file(
    dirty_db: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = attribution_flow(db_path=str(dirty_db), output_dir=str(out), provider="local")
    assert summary["invalid_rows"] == EXPECTED_COUNTS
    assert table_rows(dirty_db, "attribution_customer_journey") == [
        ("c1", "g1", 1.0),
        ("c2", "g2", 1.0),
    ]
    with (out / "quarantine.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["source_table"] for r in rows} == {"session_sources", "conversions", "session_costs"}
    assert any('"raw_event_time":"25:99"' in r["row_values"] for r in rows)
    assert any('"raw_cost":"abc"' in r["row_values"] for r in rows)


def test_fail_on_invalid_rows_stops_before_writing(
    dirty_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ATTRIBUTION_QUALITY__FAIL_ON_INVALID_ROWS", "true")
    code = main(
        ["--db", str(dirty_db), "--output-dir", str(tmp_path / "out"), "--provider", "local"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "unusable source rows found" in err
    assert "quarantine.csv" in err
    assert table_rows(dirty_db, "attribution_customer_journey") == []
    assert table_rows(dirty_db, "channel_reporting") == []
    assert (tmp_path / "out" / "quarantine.csv").exists()
    assert not (tmp_path / "out" / "channel_reporting.csv").exists()


HOSTILE_CHANNEL = "Paid \"Search\"; DROP TABLE conversions; --\nÜnïcødé ✓ 'q'"
HOSTILE_USER = "u'1\"; --"
HOSTILE_SESSION = "s'; DELETE FROM session_sources; --"


def test_hostile_values_are_handled_as_data(tmp_path: Path) -> None:
    db = build_db(
        tmp_path / "hostile.db",
        sessions=[
            (HOSTILE_SESSION, HOSTILE_USER, "2023-09-01", "10:00:00", HOSTILE_CHANNEL, 1, 1, 0)
        ],
        conversions=[("c'1", HOSTILE_USER, "2023-09-02", "10:00:00", 7.0)],
        costs=[(HOSTILE_SESSION, 3.0)],
    )
    out = tmp_path / "out"
    attribution_flow(db_path=str(db), output_dir=str(out), provider="local")
    assert table_rows(db, "attribution_customer_journey") == [("c'1", HOSTILE_SESSION, 1.0)]
    assert table_rows(db, "channel_reporting") == [(HOSTILE_CHANNEL, "2023-09-01", 3.0, 1.0, 7.0)]
    assert len(table_rows(db, "conversions")) == 1
    with (out / "channel_reporting.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["channel_name"] == HOSTILE_CHANNEL


def test_hostile_date_parameter_is_rejected_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = build_db(tmp_path / "h.db", GOOD_SESSIONS, GOOD_CONVERSIONS)
    before = sqlite3.connect(db).execute("SELECT count(*) FROM sqlite_master").fetchone()
    code = main(["--start-date", "2023-01-01'; DROP TABLE conversions; --", "--db", str(db)])
    assert code == 2
    assert "start_date" in capsys.readouterr().err
    after = sqlite3.connect(db).execute("SELECT count(*) FROM sqlite_master").fetchone()
    assert after == before


def test_the_spend_pass_in_parts_counts_the_same(
    dirty_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tables are read in several passes (by a hash of session_id): same figures."""
    whole = read_sources(dirty_db, None, None, max_examples=10)
    # Few rows, yet as if each took the memory of a million: one pass per session or so.
    monkeypatch.setattr("tasks.sources.JOIN_BYTES_PER_SESSION", 10**9 // 4)
    parts = read_sources(dirty_db, None, None, max_examples=10)
    assert parts.invalid_row_counts() == whole.invalid_row_counts() == EXPECTED_COUNTS
    assert parts.day_costs.equals(whole.day_costs)
    assert parts.total_cost == whole.total_cost == 4.0
