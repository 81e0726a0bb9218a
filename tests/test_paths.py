"""Null, converting and distinct paths from hand-built data, compared whole."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks import paths
from tasks.db import connect
from tasks.paths import conversion_paths, distinct_paths, last_conversion_times, null_paths
from tests.helpers import build_db

D = "Direct Traffic"
P = "Paid Search Brand"
F = "FB & IG Ads"
E = "Email"

SESSIONS = [
    # u1 converts at 2023-09-02 12:00 (c1) and at 2023-09-04 10:00 (c2): only what
    # comes strictly after c2 is a null path; s13 sits exactly at c2's timestamp.
    ("s11", "u1", "2023-09-01", "08:00:00", D, 0, 0, 0),
    ("s12", "u1", "2023-09-03", "09:00:00", P, 0, 0, 0),
    ("s13", "u1", "2023-09-04", "10:00:00", F, 0, 0, 0),
    ("s14", "u1", "2023-09-05", "07:00:00", E, 0, 0, 0),
    ("s15", "u1", "2023-09-04", "18:30:00", D, 0, 0, 0),
    # u2 never converts: all its sessions, in time order, stored out of order.
    ("s23", "u2", "2023-09-03", "10:00:00", F, 0, 0, 0),
    ("s21", "u2", "2023-09-01", "10:00:00", D, 0, 0, 0),
    ("s22", "u2", "2023-09-02", "10:00:00", P, 0, 0, 0),
    # u3 never converts; two sessions at one timestamp: session_id decides ("s310" < "s39").
    ("s39", "u3", "2023-09-02", "10:00:00", D, 0, 0, 0),
    ("s310", "u3", "2023-09-02", "10:00:00", E, 0, 0, 0),
    # u4 has the same path as u2; u5 only rows that cannot be used.
    ("s41", "u4", "2023-09-01", "23:00:00", D, 0, 0, 0),
    ("s42", "u4", "2023-09-02", "00:00:00", P, 0, 0, 0),
    ("s43", "u4", "2023-09-03", "01:00:00", F, 0, 0, 0),
    ("s51", "u5", "2023-09-31", "10:00:00", D, 0, 0, 0),
    ("s52", "u5", "2023-09-02", "25:00:00", D, 0, 0, 0),
    ("s53", "u5", "2023-09-02", "10:00:00", " ", 0, 0, 0),
    # u6 converts once, after all its sessions: no null path.
    ("s61", "u6", "2023-09-01", "10:00:00", D, 0, 0, 0),
]
CONVERSIONS = [
    ("c1", "u1", "2023-09-02", "12:00:00", 40.0),
    ("c2", "u1", "2023-09-04", "10:00:00", 60.0),
    ("c6", "u6", "2023-09-01", "11:00:00", 10.0),
]


@pytest.fixture
def con(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    db = build_db(tmp_path / "paths.db", SESSIONS, CONVERSIONS)
    connection = connect(db, read_only=True)
    yield connection
    connection.close()


def converting_users() -> pl.DataFrame:
    conversions = pl.DataFrame(
        {
            "conv_id": ["c1", "c2", "c6"],
            "user_id": ["u1", "u1", "u6"],
            "conv_ts": [
                datetime(2023, 9, 2, 12),
                datetime(2023, 9, 4, 10),
                datetime(2023, 9, 1, 11),
            ],
        }
    )
    return last_conversion_times(conversions)


def expected(rows: list[tuple[list[str], int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"path": pl.List(pl.String), "nulls": pl.Int64}, orient="row"
    ).sort("path")


def test_last_conversion_times_are_each_users_latest() -> None:
    assert_frame_equal(
        converting_users().sort("user_id"),
        pl.DataFrame(
            {
                "user_id": ["u1", "u6"],
                "last_conversion_ts": [datetime(2023, 9, 4, 10), datetime(2023, 9, 1, 11)],
            }
        ),
    )


def test_null_paths_of_the_whole_database(con: duckdb.DuckDBPyConnection) -> None:
    found = null_paths(con, converting_users=converting_users())
    assert_frame_equal(
        found,
        expected(
            [
                ([D, E], 1),  # u1 after its last conversion: s15, s14
                ([D, P, F], 2),  # u2 and u4
                ([E, D], 1),  # u3: tie broken by session_id
            ]
        ),
    )


def test_null_paths_within_a_date_range(con: duckdb.DuckDBPyConnection) -> None:
    found = null_paths(
        con,
        start_date=date(2023, 9, 2),
        end_date=date(2023, 9, 4),
        converting_users=converting_users(),
    )
    # u1 keeps s15 (09-04), loses s14 (09-05); u2 and u4 lose their 09-01 sessions.
    assert_frame_equal(found, expected([([D], 1), ([P, F], 2), ([E, D], 1)]))


def test_null_paths_with_open_range_ends(con: duckdb.DuckDBPyConnection) -> None:
    found = null_paths(con, start_date=date(2023, 9, 3), converting_users=converting_users())
    assert_frame_equal(found, expected([([D, E], 1), ([F], 2)]))
    found = null_paths(con, end_date=date(2023, 9, 1), converting_users=converting_users())
    assert_frame_equal(found, expected([([D], 2)]))


def test_every_user_is_a_null_path_when_nobody_converted(
    con: duckdb.DuckDBPyConnection,
) -> None:
    nobody = pl.DataFrame(schema={"user_id": pl.String, "last_conversion_ts": pl.Datetime("us")})
    found = null_paths(con, converting_users=nobody)
    assert_frame_equal(
        found,
        expected([([D, P, F, D, E], 1), ([D, P, F], 2), ([E, D], 1), ([D], 1)]),
    )


@pytest.mark.parametrize("batch_rows", [1, 2, 3])
def test_users_cut_by_a_batch_boundary_stay_whole(
    con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch, batch_rows: int
) -> None:
    whole = null_paths(con, converting_users=converting_users())
    monkeypatch.setattr(paths, "NULL_PATH_BATCH_ROWS", batch_rows)
    assert_frame_equal(null_paths(con, converting_users=converting_users()), whole)


def test_no_null_path_in_an_empty_range(con: duckdb.DuckDBPyConnection) -> None:
    found = null_paths(
        con,
        start_date=date(2024, 1, 1),
        end_date=date(2024, 1, 31),
        converting_users=converting_users(),
    )
    assert_frame_equal(found, expected([]))


def journeys(rows: list[tuple[str, str, str, str, float]]) -> pl.DataFrame:
    """(conversion_id, session_id, timestamp, channel, revenue) rows as build_journeys gives."""
    return pl.DataFrame(
        [(c, s, datetime.fromisoformat(t), ch, r) for c, s, t, ch, r in rows],
        schema={
            "conversion_id": pl.String,
            "session_id": pl.String,
            "timestamp": pl.Datetime("us"),
            "channel_label": pl.String,
            "revenue": pl.Float64,
        },
        orient="row",
    )


JOURNEYS = journeys(
    [
        ("c2", "s3", "2023-09-01 10:00:00", F, 20.0),
        ("c1", "s2", "2023-09-01 10:00:00", P, 10.0),
        ("c1", "s1", "2023-09-01 10:00:00", D, 10.0),  # same timestamp: s1 first
        ("c3", "s4", "2023-09-01 09:00:00", D, 5.0),
        ("c3", "s5", "2023-09-01 09:30:00", P, 5.0),
        ("c2", "s9", "2023-08-30 10:00:00", D, 20.0),
    ]
)


def test_conversion_paths_follow_journey_order() -> None:
    assert_frame_equal(
        conversion_paths(JOURNEYS),
        pl.DataFrame(
            {
                "conversion_id": ["c1", "c2", "c3"],
                "path": [[D, P], [D, F], [D, P]],
                "revenue": [10.0, 20.0, 5.0],
            }
        ),
    )


def test_distinct_paths_merge_converting_and_null_counts() -> None:
    nulls = expected([([D, P], 4), ([E], 2), ([E], 1)])
    assert_frame_equal(
        distinct_paths(conversion_paths(JOURNEYS), nulls),
        pl.DataFrame(
            {
                "path": [[D, F], [D, P], [E]],
                "conversions": [1, 2, 0],
                "nulls": [0, 4, 3],
                "value": [20.0, 15.0, 0.0],
            }
        ),
    )
