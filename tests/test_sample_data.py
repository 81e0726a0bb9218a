"""The sample database reproduces the published figures, checked with plain SQL."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from tasks import sample_data
from tasks.db import create_table_statements
from tasks.sample_data import (
    CHANNELS,
    SampleSummary,
    generate_sample_database,
    is_synthetic,
    main,
)
from tests.helpers import ORIGINAL_SCHEMA, build_db, table_rows

SMALL = 0.05
CHANNEL_NAMES = {
    "Affiliate & Partnerships", "Direct Traffic", "FB & IG Ads", "Lead Generation",
    "Microsoft Ads", "Newsletter & Email", "Organic Traffic", "Paid Search Brand",
    "Paid Search Non Brand", "Performance Max", "Pinterest Ads", "Referral",
    "Social Organic", "TikTok Ads", "Untracked Conversions", "YouTube Ads",
}  # fmt: skip
FREE_CHANNELS = {"Direct Traffic", "Organic Traffic", "Untracked Conversions"}

STRICT = "SELECT count(DISTINCT conv_id), count(*) FROM journey_strict"
INCLUSIVE = "SELECT count(DISTINCT conv_id), count(*) FROM journey_inclusive"
WITHOUT_JOURNEY = (
    "SELECT count(*) FROM conversions WHERE conv_id NOT IN (SELECT conv_id FROM journey_{})"
)
SHARED = (
    "SELECT count(*) FROM (SELECT session_id FROM journey_strict GROUP BY 1 HAVING count(*) = 2)"
)
CHANNEL_DAYS = (
    "SELECT count(*) FROM (SELECT DISTINCT channel_name, event_date FROM session_sources)"
)
SAME_TIMESTAMP = """
    SELECT count(DISTINCT conv_id) FROM (
        SELECT conv_id FROM journey_strict
        GROUP BY conv_id, event_date, event_time HAVING count(*) > 1
    )
"""
MIDNIGHT = """
    SELECT count(*) FROM journey_strict AS j JOIN conversions AS c USING (conv_id)
    WHERE c.conv_time < '00:10:00' AND j.event_time >= '23:59:00'
      AND j.event_date = date(c.conv_date, '-1 day')
"""
LATER_TIME_OF_DAY = """
    SELECT count(*) FROM journey_strict AS j JOIN conversions AS c USING (conv_id)
    WHERE j.event_date < c.conv_date AND j.event_time > c.conv_time
"""
CONVERTERS_SESSIONS_SQL = """
    CREATE TEMP TABLE converters_sessions AS
    SELECT * FROM session_sources WHERE user_id IN (SELECT user_id FROM conversions)
"""
JOURNEY_ROWS_SQL = """
    CREATE TEMP TABLE journey_{name} AS
    SELECT c.conv_id, s.session_id, s.channel_name, s.event_date, s.event_time,
           s.holder_engagement, s.closer_engagement
    FROM conversions AS c
    JOIN converters_sessions AS s
      ON s.user_id = c.user_id
     AND datetime(s.event_date || ' ' || s.event_time)
         {op} datetime(c.conv_date || ' ' || c.conv_time)
"""


class Db:
    """A generated database with its journeys (strict ``<`` and ``<=``) as temp tables."""

    def __init__(self, path: Path, summary: SampleSummary) -> None:
        self.path = path
        self.summary = summary
        self.con = sqlite3.connect(path)
        self.con.execute(CONVERTERS_SESSIONS_SQL)
        self.con.execute(JOURNEY_ROWS_SQL.format(name="strict", op="<"))
        self.con.execute(JOURNEY_ROWS_SQL.format(name="inclusive", op="<="))

    def one(self, sql: str) -> tuple:
        return self.con.execute(sql).fetchone()

    def all(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def value(self, sql: str) -> object:
        return self.one(sql)[0]


def _generate(path: Path, scale: float, seed: int = 42) -> Db:
    return Db(path, generate_sample_database(path, scale=scale, seed=seed))


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    db = _generate(tmp_path_factory.mktemp("scale1") / "challenge.db", 1.0)
    yield db
    db.con.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    db = _generate(tmp_path_factory.mktemp("small") / "challenge.db", SMALL)
    yield db
    db.con.close()


@pytest.fixture(params=["full", "small"])
def any_db(request: pytest.FixtureRequest) -> Db:
    return request.getfixturevalue(request.param)


def test_scale_one_has_the_published_row_counts_calendar_and_channels(full: Db) -> None:
    assert full.one(
        "SELECT (SELECT count(*) FROM session_sources), (SELECT count(*) FROM session_costs),"
        " (SELECT count(*) FROM conversions)"
    ) == (450_616, 450_616, 2_000)
    assert full.one(
        "SELECT min(event_date), max(event_date), count(DISTINCT event_date) FROM session_sources"
    ) == ("2023-08-29", "2023-09-07", 10)
    channels = {name for (name,) in full.all("SELECT DISTINCT channel_name FROM session_sources")}
    assert channels == CHANNEL_NAMES
    assert full.value(CHANNEL_DAYS) == 150
    days = dict(
        full.all(
            "SELECT channel_name, count(DISTINCT event_date) FROM session_sources"
            " WHERE channel_name IN ('Pinterest Ads', 'YouTube Ads') GROUP BY 1"
        )
    )
    assert days == {"Pinterest Ads": 1, "YouTube Ads": 9}


def test_scale_one_has_the_published_journeys(full: Db) -> None:
    assert full.one(STRICT) == (1940, 3703)
    assert full.one(INCLUSIVE) == (1946, 3709)
    assert full.value(WITHOUT_JOURNEY.format("strict")) == 60
    assert full.value(WITHOUT_JOURNEY.format("inclusive")) == 54
    assert full.value(SHARED) == 27
    assert full.value(SAME_TIMESTAMP) == 1
    no_triples = "SELECT max(n) FROM (SELECT count(*) AS n FROM journey_strict GROUP BY session_id)"
    assert full.value(no_triples) == 2
    lengths = dict(
        full.all(
            "SELECT n, count(*) FROM (SELECT count(*) AS n FROM journey_strict GROUP BY conv_id)"
            " GROUP BY n"
        )
    )
    assert lengths == {
        1: 1132, 2: 412, 3: 197, 4: 81, 5: 47, 6: 30, 7: 6, 8: 14,
        9: 7, 10: 4, 11: 3, 13: 2, 14: 2, 18: 2, 37: 1,
    }  # fmt: skip
    assert full.one(
        "SELECT sum(holder_engagement), sum(closer_engagement) FROM journey_strict"
    ) == (3395, 2896)
    journey_less = {
        name
        for (name,) in full.all(
            "SELECT DISTINCT channel_name FROM session_sources"
            " EXCEPT SELECT channel_name FROM journey_strict"
        )
    }
    assert journey_less == {"Lead Generation", "Pinterest Ads", "YouTube Ads"}
    assert full.value("SELECT sum(impression_interaction) FROM session_sources") == 0


def test_scale_one_has_the_published_revenue(full: Db) -> None:
    assert full.one("SELECT min(revenue), max(revenue) FROM conversions") == (0.0, 1283.2)
    assert full.all("SELECT revenue FROM conversions ORDER BY revenue LIMIT 2 OFFSET 999") == [
        (44.62,),
        (44.62,),
    ]
    attributed = full.value(
        "SELECT round(sum(revenue), 2) FROM conversions"
        " WHERE conv_id IN (SELECT conv_id FROM journey_strict)"
    )
    assert attributed == 111_721.66


def test_scale_one_has_the_published_spend(full: Db) -> None:
    assert full.value("SELECT round(sum(cost), 2) FROM session_costs") == 293_876.85
    by_channel = dict(
        full.all(
            "SELECT channel_name, sum(cost) FROM session_sources JOIN session_costs"
            " USING (session_id) GROUP BY 1"
        )
    )
    assert by_channel["Performance Max"] == pytest.approx(129_995, abs=1)
    assert by_channel["FB & IG Ads"] == pytest.approx(98_099, abs=1)
    day_figures = """
        WITH days AS (
            SELECT channel_name, event_date, coalesce(sum(cost), 0) AS cost
            FROM session_sources JOIN session_costs USING (session_id)
            GROUP BY 1, 2
        )
        SELECT
            sum(cost = 0),
            sum(NOT EXISTS (SELECT 1 FROM journey_strict AS j
                            WHERE j.channel_name = days.channel_name
                              AND j.event_date = days.event_date)),
            sum(cost > 0 AND NOT EXISTS (SELECT 1 FROM journey_strict AS j
                                         WHERE j.channel_name = days.channel_name
                                           AND j.event_date = days.event_date))
        FROM days
    """
    without_cost, without_attribution, cost_but_no_attribution = full.one(day_figures)
    assert (without_cost, without_attribution) == (39, 39)
    assert cost_but_no_attribution > 0


def test_summary_reports_what_sql_finds(any_db: Db) -> None:
    summary = any_db.summary
    users = """
        SELECT count(DISTINCT user_id)
        FROM (SELECT user_id FROM session_sources UNION ALL SELECT user_id FROM conversions)
    """
    attributable = """
        SELECT round(sum(revenue), 2) FROM conversions
        WHERE conv_id IN (SELECT conv_id FROM journey_strict)
    """
    assert summary.sessions == any_db.value("SELECT count(*) FROM session_sources")
    assert summary.conversions == any_db.value("SELECT count(*) FROM conversions")
    assert summary.users == any_db.value(users)
    assert summary.converting_users == any_db.value(
        "SELECT count(DISTINCT user_id) FROM conversions"
    )
    assert (summary.journeys, summary.journey_sessions) == any_db.one(STRICT)
    assert (summary.journeys_inclusive, summary.journey_sessions_inclusive) == any_db.one(INCLUSIVE)
    assert summary.shared_sessions == any_db.value(SHARED)
    assert summary.total_cost == any_db.value("SELECT round(sum(cost), 2) FROM session_costs")
    assert summary.attributable_revenue == any_db.value(attributable)


def test_small_scale_multiplies_the_counts(small: Db) -> None:
    assert small.summary.sessions == round(450_616 * SMALL)
    assert small.summary.conversions == round(2_000 * SMALL)
    assert small.value("SELECT count(*) FROM session_costs") == small.summary.sessions
    assert small.value("SELECT count(DISTINCT event_date) FROM session_sources") == 10
    assert small.value(CHANNEL_DAYS) == 150
    total_cost = small.value("SELECT round(sum(cost), 2) FROM session_costs")
    assert total_cost == pytest.approx(293_876.85 * SMALL, abs=0.1)


def test_every_scale_holds_the_cases_the_pipeline_must_handle(any_db: Db) -> None:
    strict, inclusive = any_db.one(STRICT), any_db.one(INCLUSIVE)
    # Ties at the conversion timestamp: each adds one journey of one session with <=.
    assert inclusive[0] > strict[0]
    assert inclusive[1] - strict[1] == inclusive[0] - strict[0]
    assert any_db.value(WITHOUT_JOURNEY.format("inclusive")) >= 1
    assert any_db.value(SHARED) >= 1
    assert any_db.value(SAME_TIMESTAMP) == max(1, round(any_db.summary.scale))
    assert any_db.value(MIDNIGHT) >= 1
    assert any_db.value(LATER_TIME_OF_DAY) >= 1
    assert any_db.value("SELECT count(*) FROM conversions WHERE revenue = 0") >= 1
    assert any_db.value("SELECT count(*) FROM conversions WHERE revenue < 0") == 0


def test_only_converting_users_convert_and_only_after_their_sessions(any_db: Db) -> None:
    after_last_conversion = """
        SELECT count(*)
        FROM session_sources AS s
        JOIN (SELECT user_id, max(datetime(conv_date || ' ' || conv_time)) AS last
              FROM conversions GROUP BY user_id) AS c USING (user_id)
        WHERE datetime(s.event_date || ' ' || s.event_time) > c.last
    """
    converters_sessions = (
        "SELECT count(*) FROM session_sources WHERE user_id IN (SELECT user_id FROM conversions)"
    )
    assert any_db.value(after_last_conversion) == 0
    # Every session of a converting user is in a journey (a tie only with <=).
    assert any_db.value(converters_sessions) == any_db.value(
        "SELECT count(DISTINCT session_id) FROM journey_inclusive"
    )
    first, last = any_db.one("SELECT min(conv_date), max(conv_date) FROM conversions")
    assert "2023-08-29" <= first <= last <= "2023-09-07"


def test_costs_lie_only_on_paid_channels(any_db: Db) -> None:
    rows = any_db.all(
        """
        SELECT channel_name, event_date, sum(cost IS NULL), sum(cost > 0), sum(cost < 0)
        FROM session_sources JOIN session_costs USING (session_id)
        GROUP BY 1, 2
        """
    )
    paid_days = {
        (channel.name, day)
        for channel in CHANNELS
        if channel.cost_cents
        for day in (channel.cost_days or channel.active_days)
    }
    first = sample_data.FIRST_DAY.toordinal()
    for channel, event_date, nulls, positive, negative in rows:
        day = date.fromisoformat(event_date).toordinal() - first
        assert negative == 0
        if (channel, day) in paid_days:
            assert positive > 0 and nulls == 0, (channel, event_date)
        else:
            assert positive == 0, (channel, event_date)
    assert not {(channel, day) for channel in FREE_CHANNELS for day in range(10)} & paid_days
    # Unpaid sessions carry NULL as well as 0; every cost is a whole number of cents.
    kinds = "SELECT sum(cost IS NULL) > 0, sum(cost = 0) > 0, sum(cost <> round(cost, 2))"
    assert any_db.one(f"{kinds} FROM session_costs") == (1, 1, 0)
    without_cost_row = """
        SELECT count(*) FROM session_sources AS s
        WHERE NOT EXISTS (SELECT 1 FROM session_costs AS c WHERE c.session_id = s.session_id)
    """
    assert any_db.value(without_cost_row) == 0


def test_schema_is_the_challenge_schema_without_output_tables(small: Db) -> None:
    expected = create_table_statements(ORIGINAL_SCHEMA)
    tables = dict(small.all("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert tables == {
        **{name: expected[name] for name in sample_data.SOURCE_TABLES},
        "sample_data_info": "CREATE TABLE sample_data_info (key TEXT PRIMARY KEY, value TEXT)",
    }
    kinds = small.one(
        "SELECT group_concat(DISTINCT typeof(session_id) || typeof(user_id)"
        " || typeof(event_date) || typeof(holder_engagement)) FROM session_sources"
    )
    assert kinds == ("texttexttextinteger",)
    assert small.value("SELECT group_concat(DISTINCT typeof(revenue)) FROM conversions") == "real"


def test_same_seed_gives_identical_rows_and_another_seed_other_rows(
    small: Db, tmp_path: Path
) -> None:
    again = generate_sample_database(tmp_path / "again.db", scale=SMALL, seed=42)
    other = generate_sample_database(tmp_path / "other.db", scale=SMALL, seed=7)
    assert again == dataclasses.replace(small.summary, path=again.path)
    for table in sample_data.SOURCE_TABLES:
        assert table_rows(again.path, table) == table_rows(small.path, table)
        assert table_rows(other.path, table) != table_rows(small.path, table)
    # Another seed changes the rows, not the published structure.
    assert other.journeys == small.summary.journeys
    assert other.shared_sessions == small.summary.shared_sessions


def test_chunk_size_changes_nothing_in_the_rows_or_their_order(small: Db, tmp_path: Path) -> None:
    # ``small`` fits in one chunk; here 23 chunks carry the cost shares across boundaries.
    chunked = generate_sample_database(tmp_path / "chunked.db", scale=SMALL, chunk_size=1_000)
    assert small.summary.sessions > 22 * 1_000
    assert chunked == dataclasses.replace(small.summary, path=chunked.path)
    for table in sample_data.SOURCE_TABLES:
        assert table_rows(chunked.path, table) == table_rows(small.path, table)


def test_generated_databases_are_marked_synthetic(small: Db, tmp_path: Path) -> None:
    assert is_synthetic(small.path)
    info = dict(small.all("SELECT key, value FROM sample_data_info"))
    assert info.keys() == {"generator", "scale", "seed", "created_at"}
    assert (info["generator"], float(info["scale"]), int(info["seed"])) == (
        "tasks.sample_data",
        SMALL,
        42,
    )
    assert datetime.fromisoformat(info["created_at"]).utcoffset() == timedelta(0)

    session = ("s1", "u1", "2023-09-01", "10:00:00", "Direct Traffic", 1, 0, 0)
    conversion = ("c1", "u1", "2023-09-01", "11:00:00", 10.0)
    # A name that a file: URI must escape.
    real = build_db(tmp_path / "real #1?.db", [session], [conversion])
    before = real.read_bytes()
    assert not is_synthetic(real)
    assert real.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real #1?.db"]
    with pytest.raises(sqlite3.OperationalError):
        is_synthetic(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_refuses_to_overwrite_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "challenge.db"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        generate_sample_database(target, scale=SMALL)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["challenge.db"]


def test_a_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last table's insert fails after the first two were written.
    monkeypatch.setitem(
        sample_data._INSERT, "conversions", "INSERT INTO src.no_such_table SELECT * FROM frame"
    )
    with pytest.raises(duckdb.Error, match="no_such_table"):
        generate_sample_database(tmp_path / "challenge.db", scale=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_creates_missing_parent_directories(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "challenge.db"
    summary = generate_sample_database(target, scale=0.01)
    assert summary.path == target
    assert table_rows(target, "conversions")
    assert sorted(p.name for p in target.parent.iterdir()) == ["challenge.db"]


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), 0.001])
def test_rejects_scales_that_cannot_hold_the_data(tmp_path: Path, scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        generate_sample_database(tmp_path / "challenge.db", scale=scale)
    assert list(tmp_path.iterdir()) == []


def test_rejects_an_empty_chunk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        generate_sample_database(tmp_path / "challenge.db", scale=0.01, chunk_size=0)
    assert list(tmp_path.iterdir()) == []


def test_impression_share_sets_impression_interaction(tmp_path: Path) -> None:
    target = tmp_path / "challenge.db"
    generate_sample_database(target, scale=0.01, impression_share=0.5)
    con = sqlite3.connect(target)
    share = con.execute("SELECT avg(impression_interaction) FROM session_sources").fetchone()[0]
    con.close()
    assert 0.4 < share < 0.6


def test_cli_prints_a_summary_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "cli.db"
    assert main(["--db", str(target), "--scale", "0.01", "--seed", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{target}: 4,506 sessions")
    assert "20 conversions" in line and "seed 3" in line
    with pytest.raises(SystemExit) as exited:
        main(["--db", str(target), "--scale", "0.01"])
    assert exited.value.code == 1
    assert "already exists" in capsys.readouterr().err
