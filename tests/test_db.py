"""The database gate: schema file loading, source validation, clear errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tasks.db import DatabaseError, create_table_statements, prepare_database, run_lock
from tests.helpers import ORIGINAL_SCHEMA, build_db, build_db_missing_columns, table_rows

SESSION = ("s1", "u1", "2023-09-01", "10:00:00", "Direct Traffic", 1, 0, 0)
CONVERSION = ("c1", "u1", "2023-09-02", "10:00:00", 5.0)


def output_ddl(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT name, sql FROM sqlite_master WHERE name IN "
            "('attribution_customer_journey', 'channel_reporting')"
        ).fetchall()
    finally:
        con.close()
    return dict(rows)


def test_original_schema_file_with_python_header_is_accepted(tmp_path: Path) -> None:
    assert ORIGINAL_SCHEMA.read_text().startswith("# -*- coding")
    db = build_db(tmp_path / "a.db", [SESSION], [CONVERSION], [("s1", 1.0)])
    created = prepare_database(db, ORIGINAL_SCHEMA)
    assert created == [
        "table attribution_customer_journey",
        "table channel_reporting",
        "index idx_session_sources_user_id",  # session_id has the primary key's index
    ]
    ddl = output_ddl(db)
    assert "PRIMARY KEY(conv_id, session_id)" in ddl["attribution_customer_journey"]
    assert "PRIMARY KEY(channel_name, date)" in ddl["channel_reporting"]
    # The file's DROP statements never run: the source rows are still there.
    assert table_rows(db, "session_sources") == [SESSION]
    assert table_rows(db, "conversions") == [CONVERSION]
    # A second run creates nothing.
    assert prepare_database(db, ORIGINAL_SCHEMA) == []


def test_clean_schema_file_is_accepted(tmp_path: Path) -> None:
    clean = tmp_path / "clean.sql"
    clean.write_text(
        "CREATE TABLE IF NOT EXISTS attribution_customer_journey (conv_id TEXT NOT NULL, "
        "session_id TEXT NOT NULL, ihc REAL NOT NULL, PRIMARY KEY (conv_id, session_id));\n"
        "CREATE TABLE channel_reporting (channel_name TEXT NOT NULL, date TEXT NOT NULL, "
        "cost REAL NOT NULL, ihc REAL NOT NULL, ihc_revenue REAL NOT NULL, "
        "PRIMARY KEY (channel_name, date));\n"
    )
    assert set(create_table_statements(clean)) == {
        "attribution_customer_journey",
        "channel_reporting",
    }
    db = build_db(tmp_path / "b.db", [SESSION], [CONVERSION], with_keys=False)
    assert prepare_database(db, clean) == [
        "table attribution_customer_journey",
        "table channel_reporting",
        "index idx_session_sources_user_id",
        "index idx_session_sources_session_id",
    ]
    plans = sqlite3.connect(db).execute(
        "EXPLAIN QUERY PLAN SELECT * FROM session_sources WHERE user_id = 'u1'"
    )
    assert "USING INDEX idx_session_sources_user_id" in str(plans.fetchall())


def test_missing_column_is_named(tmp_path: Path) -> None:
    db = build_db_missing_columns(
        tmp_path / "c.db",
        [
            "session_id",
            "user_id",
            "event_date",
            "channel_name",
            "holder_engagement",
            "closer_engagement",
            "impression_interaction",
        ],
    )
    with pytest.raises(
        DatabaseError, match=r"table 'session_sources' lacks column\(s\) 'event_time'"
    ):
        prepare_database(db, ORIGINAL_SCHEMA)
    # Nothing was created on a database that failed validation.
    assert output_ddl(db) == {}


def test_missing_table_is_named(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE session_costs (session_id TEXT, cost REAL)")
    con.commit()
    con.close()
    with pytest.raises(DatabaseError) as info:
        prepare_database(db, ORIGINAL_SCHEMA)
    assert "table 'session_sources' is missing" in str(info.value)
    assert "table 'conversions' is missing" in str(info.value)


def test_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.db"
    fake.write_text("session_id,user_id\n1,2\n")
    with pytest.raises(DatabaseError, match="is not an SQLite database"):
        prepare_database(fake, ORIGINAL_SCHEMA)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match=r"database file not found: .*nope\.db"):
        prepare_database(tmp_path / "nope.db", ORIGINAL_SCHEMA)


def test_second_holder_of_the_run_lock_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    with (
        run_lock(db),
        pytest.raises(DatabaseError, match="another attribution run"),
        run_lock(db, timeout_s=0.3),
    ):
        pass
    with run_lock(db):
        pass
