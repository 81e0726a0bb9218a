"""Journeys from hand-built databases, compared whole with the known answer."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.journeys import JourneySet, build_journeys
from tasks.sources import read_sources
from tests.helpers import build_db

D = "Direct Traffic"
P = "Paid Search Brand"
F = "FB & IG Ads"


def journeys_of(
    db: Path,
    *,
    include_equal: bool = False,
    lookback_days: int | None = None,
    start: date | None = None,
    end: date | None = None,
) -> JourneySet:
    snapshot = read_sources(db, None, None)
    return build_journeys(
        snapshot.sessions,
        snapshot.conversions,
        start_date=start,
        end_date=end,
        include_equal_timestamps=include_equal,
        lookback_days=lookback_days,
    )


def expected(rows: list[tuple]) -> pl.DataFrame:
    """(conversion_id, session_id, timestamp, channel, h, c, conversion) rows."""
    return pl.DataFrame(
        [(r[0], r[1], datetime.fromisoformat(r[2]), r[3], r[4], r[5], r[6]) for r in rows],
        schema={
            "conversion_id": pl.String,
            "session_id": pl.String,
            "timestamp": pl.Datetime("us"),
            "channel_label": pl.String,
            "holder_engagement": pl.Int8,
            "closer_engagement": pl.Int8,
            "conversion": pl.Int8,
        },
        orient="row",
    )


def core(js: JourneySet) -> pl.DataFrame:
    return js.journeys.select(
        "conversion_id",
        "session_id",
        "timestamp",
        "channel_label",
        "holder_engagement",
        "closer_engagement",
        "conversion",
    )


@pytest.fixture
def tie_db(tmp_path: Path) -> Path:
    # u1 converts at 2023-09-02 12:00:00; s3 sits exactly at that timestamp.
    return build_db(
        tmp_path / "tie.db",
        sessions=[
            ("s1", "u1", "2023-09-01", "08:00:00", D, 1, 0, 0),
            ("s2", "u1", "2023-09-02", "11:59:59", P, 1, 1, 0),
            ("s3", "u1", "2023-09-02", "12:00:00", F, 0, 1, 0),
            ("s4", "u1", "2023-09-02", "12:00:01", F, 1, 1, 0),
        ],
        conversions=[("c1", "u1", "2023-09-02", "12:00:00", 50.0)],
    )


def test_strict_rule_excludes_the_session_at_the_conversion_timestamp(tie_db: Path) -> None:
    assert_frame_equal(
        core(journeys_of(tie_db)),
        expected(
            [
                ("c1", "s1", "2023-09-01 08:00:00", D, 1, 0, 0),
                ("c1", "s2", "2023-09-02 11:59:59", P, 1, 1, 1),
            ]
        ),
    )


def test_at_or_before_rule_includes_it_and_moves_the_conversion_flag(tie_db: Path) -> None:
    assert_frame_equal(
        core(journeys_of(tie_db, include_equal=True)),
        expected(
            [
                ("c1", "s1", "2023-09-01 08:00:00", D, 1, 0, 0),
                ("c1", "s2", "2023-09-02 11:59:59", P, 1, 1, 0),
                ("c1", "s3", "2023-09-02 12:00:00", F, 0, 1, 1),
            ]
        ),
    )


def test_date_and_time_are_compared_as_one_timestamp(tmp_path: Path) -> None:
    db = build_db(
        tmp_path / "ts.db",
        sessions=[
            # 23:59 the day before a 00:01 conversion: belongs.
            ("late", "u1", "2023-09-01", "23:59:00", D, 1, 0, 0),
            # Later time of day, but on an earlier date: belongs.
            ("earlier_day", "u1", "2023-08-30", "18:00:00", P, 1, 1, 0),
            # Same date, later time than the conversion: does not belong.
            ("after", "u1", "2023-09-02", "00:02:00", F, 1, 1, 0),
        ],
        conversions=[("c1", "u1", "2023-09-02", "00:01:00", 10.0)],
    )
    assert_frame_equal(
        core(journeys_of(db)),
        expected(
            [
                ("c1", "earlier_day", "2023-08-30 18:00:00", P, 1, 1, 0),
                ("c1", "late", "2023-09-01 23:59:00", D, 1, 0, 1),
            ]
        ),
    )


def test_two_conversions_of_one_user_share_sessions_and_each_has_its_last_flag(
    tmp_path: Path,
) -> None:
    db = build_db(
        tmp_path / "shared.db",
        sessions=[
            ("s1", "u1", "2023-09-01", "10:00:00", D, 1, 0, 0),
            ("s2", "u1", "2023-09-02", "10:00:00", P, 1, 1, 0),
            ("s3", "u1", "2023-09-04", "10:00:00", F, 0, 1, 0),
            ("x1", "u2", "2023-09-01", "10:00:00", F, 1, 1, 0),
        ],
        conversions=[
            ("c2", "u1", "2023-09-05", "09:00:00", 20.0),
            ("c1", "u1", "2023-09-03", "09:00:00", 10.0),
        ],
    )
    assert_frame_equal(
        core(journeys_of(db)),
        expected(
            [
                ("c1", "s1", "2023-09-01 10:00:00", D, 1, 0, 0),
                ("c1", "s2", "2023-09-02 10:00:00", P, 1, 1, 1),
                ("c2", "s1", "2023-09-01 10:00:00", D, 1, 0, 0),
                ("c2", "s2", "2023-09-02 10:00:00", P, 1, 1, 0),
                ("c2", "s3", "2023-09-04 10:00:00", F, 0, 1, 1),
            ]
        ),
    )


def test_ties_are_ordered_by_session_id(tmp_path: Path) -> None:
    db = build_db(
        tmp_path / "order.db",
        sessions=[
            ("sb", "u1", "2023-09-01", "10:00:00", P, 1, 1, 0),
            ("sa", "u1", "2023-09-01", "10:00:00", D, 1, 0, 0),
        ],
        conversions=[("c1", "u1", "2023-09-02", "09:00:00", 10.0)],
    )
    assert core(journeys_of(db))["session_id"].to_list() == ["sa", "sb"]
    assert core(journeys_of(db))["conversion"].to_list() == [0, 1]


def test_conversion_without_earlier_session_is_counted_not_lost(tmp_path: Path) -> None:
    db = build_db(
        tmp_path / "none.db",
        sessions=[
            ("s1", "u1", "2023-09-03", "10:00:00", D, 1, 0, 0),
            ("s2", "u2", "2023-09-01", "10:00:00", D, 1, 0, 0),
        ],
        conversions=[
            ("c_after_only", "u1", "2023-09-02", "10:00:00", 5.0),
            ("c_no_sessions", "u9", "2023-09-02", "10:00:00", 6.0),
            ("c_ok", "u2", "2023-09-02", "10:00:00", 7.0),
        ],
    )
    js = journeys_of(db)
    assert js.journeys["conversion_id"].unique().to_list() == ["c_ok"]
    assert js.without_journey["conv_id"].to_list() == ["c_after_only", "c_no_sessions"]
    assert js.conversions_in_range.height == 3


def test_lookback_window_limits_how_far_back_a_journey_reaches(tmp_path: Path) -> None:
    db = build_db(
        tmp_path / "lookback.db",
        sessions=[
            ("old", "u1", "2023-08-29", "09:59:59", D, 1, 0, 0),
            ("edge", "u1", "2023-08-29", "10:00:00", P, 1, 0, 0),
            ("new", "u1", "2023-09-01", "10:00:00", F, 1, 1, 0),
        ],
        conversions=[("c1", "u1", "2023-09-01", "10:00:00", 5.0)],
    )
    assert core(journeys_of(db))["session_id"].to_list() == ["old", "edge"]
    assert core(journeys_of(db, lookback_days=3))["session_id"].to_list() == ["edge"]


def test_time_range_selects_conversions_by_date_but_keeps_earlier_sessions(
    tmp_path: Path,
) -> None:
    db = build_db(
        tmp_path / "range.db",
        sessions=[
            ("s1", "u1", "2023-08-29", "10:00:00", D, 1, 0, 0),
            ("s2", "u2", "2023-08-30", "10:00:00", P, 1, 1, 0),
        ],
        conversions=[
            ("c_before", "u1", "2023-09-01", "10:00:00", 1.0),
            ("c_in", "u1", "2023-09-02", "00:00:00", 2.0),
            ("c_in_end", "u2", "2023-09-03", "23:59:59", 3.0),
            ("c_after", "u2", "2023-09-04", "00:00:00", 4.0),
        ],
    )
    js = journeys_of(db, start=date(2023, 9, 2), end=date(2023, 9, 3))
    assert_frame_equal(
        core(js),
        expected(
            [
                ("c_in", "s1", "2023-08-29 10:00:00", D, 1, 0, 1),
                ("c_in_end", "s2", "2023-08-30 10:00:00", P, 1, 1, 1),
            ]
        ),
    )
    assert js.conversions_in_range["conv_id"].to_list() == ["c_in", "c_in_end"]
