"""Read the source tables once: usable rows, quarantined rows, spend per channel-day."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from config.errors import InvalidSourceRows
from config.settings import DatabaseSettings, QualitySettings
from tasks.db import connect, sql

QUARANTINE_COLUMNS = {
    "session_sources": [
        "session_id",
        "user_id",
        "channel_name",
        "raw_event_date",
        "raw_event_time",
        "raw_holder_engagement",
        "raw_closer_engagement",
        "raw_impression_interaction",
    ],
    "conversions": ["conv_id", "user_id", "raw_conv_date", "raw_conv_time", "raw_revenue"],
    "session_costs": ["session_id", "raw_cost"],
}


@dataclass(frozen=True)
class SourceSnapshot:
    """What the pipeline needs from the source tables, small enough to cache.

    ``sessions`` holds only usable sessions of users who converted: every journey
    (whatever the look-back or tie setting) is drawn from them, and the report looks
    up attributed sessions there.
    """

    sessions: pl.DataFrame
    conversions: pl.DataFrame
    day_costs: pl.DataFrame
    invalid_counts: pl.DataFrame
    invalid_examples: pl.DataFrame
    total_cost: float

    def invalid_row_counts(self) -> dict[str, int]:
        """Unusable rows per "table: reason"."""
        return {
            f"{row['source_table']}: {row['reason']}": row["rows"]
            for row in self.invalid_counts.to_dicts()
        }


def _examples(con: duckdb.DuckDBPyConnection, table: str, staged: str, limit: int) -> pl.DataFrame:
    # Column and table names are constants of this module, never user input.
    columns = QUARANTINE_COLUMNS[table]
    values = ", ".join(f"CAST({c} AS VARCHAR)" for c in columns)
    keys = ", ".join(f"'{c}'" for c in columns)
    return con.execute(
        f"""
        SELECT ? AS source_table, invalid_reason AS reason,
               to_json(map([{keys}], [{values}])) AS row_values
        FROM {staged}
        WHERE invalid_reason IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY invalid_reason ORDER BY rowid) <= ?
        ORDER BY reason, row_values
        """,  # noqa: S608
        [table, limit],
    ).pl()


def _stage(con: duckdb.DuckDBPyConnection, name: str, source_view: str = "") -> None:
    """Run ``tasks/sql/<name>.sql`` over ``source_view``, robust to mistyped values.

    The typed scan is fast; a database with values of the wrong storage class (text in
    an INTEGER column, say) makes it fail, and then every column is read as text so
    the bad values are reported as unusable rows instead of stopping the run.
    """
    statements = f"{source_view};\n{sql(name)}" if source_view else sql(name)
    try:
        con.execute(statements)
    except duckdb.Error:
        con.execute("SET sqlite_all_varchar = true")
        try:
            con.execute(statements)
        finally:
            con.execute("SET sqlite_all_varchar = false")


def _counts(con: duckdb.DuckDBPyConnection, table: str, staged: str) -> pl.DataFrame:
    return con.execute(
        f"SELECT ? AS source_table, invalid_reason AS reason, count(*) AS rows "  # noqa: S608
        f"FROM {staged} WHERE invalid_reason IS NOT NULL GROUP BY ALL",
        [table],
    ).pl()


def _stage_conversions(con: duckdb.DuckDBPyConnection) -> None:
    _stage(
        con,
        "stage_conversions",
        "CREATE OR REPLACE TEMP VIEW conversion_rows AS SELECT * FROM src.conversions",
    )


def _usable_journey_sessions(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Usable rows of staged_sessions that belong to a user with a usable conversion."""
    sessions = con.execute(sql("converting_users_sessions")).pl()
    con.execute("DROP TABLE staged_sessions")
    return sessions


def _valid_conversions(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    return con.execute(
        "SELECT conv_id, user_id, conv_ts, conv_day, revenue FROM staged_conversions "
        "WHERE invalid_reason IS NULL ORDER BY conv_id"
    ).pl()


def read_journey_inputs(db_path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(sessions of converting users, conversions), both usable rows only.

    The journey builder's own read: it reads only the converting users' sessions, which
    is what makes it fast on large session tables. A session id duplicated with another
    user is not seen here; ``read_snapshot``, which checks every row, excludes it.
    """
    con = connect(db_path, read_only=True)
    try:
        _stage_conversions(con)
        _stage(
            con,
            "stage_sessions",
            "CREATE OR REPLACE TEMP VIEW session_rows AS SELECT * FROM src.session_sources "
            "WHERE user_id IN (SELECT user_id FROM src.conversions)",
        )
        return _usable_journey_sessions(con), _valid_conversions(con)
    finally:
        con.close()


def read_snapshot(
    db_path: Path, max_examples: int, memory_limit: str | None = None
) -> SourceSnapshot:
    """Check every source row, sum the spend, and read the journeys' inputs."""
    con = connect(db_path, read_only=True, memory_limit=memory_limit)
    try:
        _stage_conversions(con)
        _stage(
            con,
            "stage_sessions",
            "CREATE OR REPLACE TEMP VIEW session_rows AS SELECT * FROM src.session_sources",
        )
        _stage(con, "stage_costs")
        staged = {
            "session_sources": "staged_sessions",
            "conversions": "staged_conversions",
            "session_costs": "staged_costs",
        }
        invalid_counts = pl.concat(
            [_counts(con, table, name) for table, name in staged.items()],
            how="vertical_relaxed",
        ).sort("source_table", "reason")
        invalid_examples = pl.concat(
            [_examples(con, table, name, max_examples) for table, name in staged.items()],
            how="vertical_relaxed",
        )
        day_costs = con.execute(sql("day_costs")).pl()
        totals = con.execute(sql("source_totals")).fetchone()
        assert totals is not None
        sessions = _usable_journey_sessions(con)
        conversions = _valid_conversions(con)
        return SourceSnapshot(
            sessions=sessions,
            conversions=conversions,
            day_costs=day_costs,
            invalid_counts=invalid_counts.with_columns(pl.col("rows").cast(pl.Int64)),
            invalid_examples=invalid_examples,
            total_cost=float(totals[0]),
        )
    finally:
        con.close()


def quarantine_invalid_rows(
    sources: SourceSnapshot, output_dir: Path, quality: QualitySettings
) -> Path | None:
    """Write examples of unusable source rows to ``quarantine.csv``, warn, and fail the run
    instead when ``quality.fail_on_invalid_rows``. Returns the file, if there is one."""
    from tasks.export import QUARANTINE_CSV, write_side_file

    quarantine = write_side_file(sources.invalid_examples, output_dir / QUARANTINE_CSV)
    counts = sources.invalid_row_counts()
    if counts:
        get_run_logger().warning(
            "Excluded %d unusable source row(s): %s (examples in %s)",
            sum(counts.values()),
            counts,
            quarantine,
        )
        if quality.fail_on_invalid_rows:
            raise InvalidSourceRows(
                f"unusable source rows found: {counts}; examples in {quarantine} "
                "(quality.fail_on_invalid_rows is true)"
            )
    return quarantine


@task(name="read-source-tables", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def read_sources_task(
    db_path: Path, max_examples: int, database: DatabaseSettings
) -> SourceSnapshot:
    return read_snapshot(db_path, max_examples, database.memory_limit)
