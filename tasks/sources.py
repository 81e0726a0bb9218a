"""Read what the run needs from the source tables, checking every row on the way.

- ``conversions``, a small table, is read whole and checked row by row.
- Spend per channel and day, the total spend and the checks that must see every session
  and cost row come from one aggregate pass of DuckDB over session_sources ⋈
  session_costs (``spend_and_checks.sql``): no table is copied, so memory and spilled
  data stay bounded whatever the table sizes. Duplicate ids are looked for only where
  the table has no unique index on them (the challenge schema's primary keys).
- The sessions of the run's users are looked up through the index on
  ``session_sources(user_id)`` by SQLite itself (DuckDB's scanner reads whole tables and
  uses no SQLite index) and checked by the same rules (``check_sessions.sql``).

An unusable row is excluded, counted per reason and listed (up to ``max_examples`` per
reason) for ``quarantine.csv``.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from config.errors import InvalidSourceRows
from config.settings import DatabaseSettings, QualitySettings
from tasks.db import SOURCE_COLUMNS, connect, sql, sqlite_reader, table_indexes

SESSION_COLUMNS = SOURCE_COLUMNS["session_sources"]
_ID_SCHEMA = pl.Schema({"session_id": pl.String})
# What a session costs the spend join in DuckDB, about (measured at scale 100: 45 M
# sessions in one pass under a 1 GB limit spilled 3.8 GB, in two passes 1.5 GB).
JOIN_BYTES_PER_SESSION = 40
_DAY_COSTS = pl.Schema({"channel_name": pl.String, "date": pl.Date, "cost": pl.Float64})


def in_date_range(column: str, start_date: date | None, end_date: date | None) -> pl.Expr:
    """Whether ``column`` (a date) lies in the inclusive range (open ends allowed)."""
    condition = pl.lit(True)
    if start_date is not None:
        condition &= pl.col(column) >= start_date
    if end_date is not None:
        condition &= pl.col(column) <= end_date
    return condition


def conversions_in_range(
    conversions: pl.DataFrame, start_date: date | None, end_date: date | None
) -> pl.DataFrame:
    """Conversions whose ``conv_date`` lies in the inclusive range (open ends allowed)."""
    return conversions.filter(in_date_range("conv_day", start_date, end_date))


@dataclass(frozen=True)
class Sources:
    """What the run needs from the source tables.

    ``sessions`` holds the usable sessions of the run's users (those with a usable
    conversion in the run's range): every journey of the run is drawn from them.
    ``duplicated_sessions`` lists session ids that occur more than once (unusable).
    """

    conversions: pl.DataFrame
    sessions: pl.DataFrame
    day_costs: pl.DataFrame
    total_cost: float
    invalid_counts: pl.DataFrame
    invalid_examples: pl.DataFrame
    duplicated_sessions: pl.DataFrame

    def invalid_row_counts(self) -> dict[str, int]:
        """Unusable rows per "table: reason"."""
        return {
            f"{row['source_table']}: {row['reason']}": row["rows"]
            for row in self.invalid_counts.to_dicts()
        }


def _unique_session_id(reader: sqlite3.Connection, table: str) -> bool:
    """Whether SQLite guarantees session_id is unique in ``table`` (a key or unique index)."""
    return any(
        unique and columns == ("session_id",) for unique, columns in table_indexes(reader, table)
    )


def _typed_or_text(
    con: duckdb.DuckDBPyConnection, query: str, parameters: list[object] | None = None
) -> pl.DataFrame:
    """The result of ``query``; if a value of the wrong storage class (text in an INTEGER
    column) breaks DuckDB's typed scan, of the query reading every column as text, so the
    bad values are reported as unusable rows instead of stopping the run. Once switched,
    the connection goes on reading text."""
    try:
        return con.execute(query, parameters).pl()
    except duckdb.Error:
        con.execute("SET sqlite_all_varchar = true")
        return con.execute(query, parameters).pl()


def _duplicates(
    con: duckdb.DuckDBPyConnection, reader: sqlite3.Connection, table: str, query: str
) -> pl.DataFrame:
    """Session ids found twice in ``table``; looked for only where no index rules it out."""
    if _unique_session_id(reader, table):
        return pl.DataFrame(schema=_ID_SCHEMA)
    return _typed_or_text(con, sql(query))


def _read_conversions(con: duckdb.DuckDBPyConnection, limit: int) -> tuple[pl.DataFrame, ...]:
    """(usable conversions, unusable counts, examples)."""
    _typed_or_text(con, sql("stage_conversions"))
    usable = con.execute(sql("usable_conversions")).pl()
    counts = con.execute(sql("conversion_checks")).pl()
    examples = con.execute(sql("conversion_examples"), [limit]).pl() if counts.height else None
    return usable, counts, examples


def check_session_rows(
    con: duckdb.DuckDBPyConnection, rows: pl.DataFrame, duplicated: pl.DataFrame
) -> pl.DataFrame:
    """The usable ones of ``rows`` (session_sources rows, any types), parsed and checked
    by the same rules as the aggregate pass."""
    con.register("looked_up_sessions", rows)
    con.register("duplicated_sessions", duplicated)
    con.execute(sql("looked_up_sessions"))
    con.execute(sql("check_sessions"))
    return con.execute(sql("usable_sessions")).pl()


def lookup_session_rows(
    reader: sqlite3.Connection, column: str, keys: Iterable[str]
) -> pl.DataFrame:
    """session_sources rows whose ``column`` (user_id or session_id) is one of ``keys``,
    found through SQLite's index on that column; every value as text."""
    reader.execute("CREATE TEMP TABLE IF NOT EXISTS lookup_keys (key TEXT PRIMARY KEY)")
    reader.execute("DELETE FROM lookup_keys")
    reader.executemany("INSERT OR IGNORE INTO lookup_keys VALUES (?)", ((key,) for key in keys))
    rows = reader.execute(sql("sqlite_sessions_by_key"), {"column": column}).fetchall()
    return pl.DataFrame(
        rows, schema=dict.fromkeys(SESSION_COLUMNS, pl.String), orient="row", strict=False
    )


def read_sessions_by_id(
    db_path: Path, session_ids: pl.Series, duplicated: pl.DataFrame
) -> pl.DataFrame:
    """The usable sessions with these ids (the report's attributed sessions)."""
    reader = sqlite_reader(db_path)
    con = duckdb.connect()
    try:
        rows = lookup_session_rows(reader, "session_id", session_ids.to_list())
        return check_session_rows(con, rows, duplicated)
    finally:
        con.close()
        reader.close()


def _source_views(con: duckdb.DuckDBPyConnection, passes: int = 1, part: int = 0) -> None:
    """Point the checks at every source row, or at part ``part`` of ``passes``."""
    # Two integers of ours go in as literals (see source_views.sql).
    con.execute(sql("source_views").format(passes=int(passes), part=int(part)))


def spend_passes(reader: sqlite3.Connection, memory_limit_bytes: int) -> int:
    """How many passes the spend join needs so each holds about ``memory_limit`` (about
    ``JOIN_BYTES_PER_SESSION`` per session); the rowid bound is read without a scan."""
    (rows,) = reader.execute("SELECT coalesce(max(rowid), 0) FROM session_sources").fetchone()
    return max(1, math.ceil(rows * JOIN_BYTES_PER_SESSION / memory_limit_bytes))


def _spend_pass(
    con: duckdb.DuckDBPyConnection, max_examples: int, passes: int
) -> tuple[pl.DataFrame, pl.DataFrame, list[pl.DataFrame]]:
    """(spend per channel-day, unusable session and cost rows per reason, examples)."""
    parts = []
    for part in range(passes):
        _source_views(con, passes, part)
        con.execute(sql("check_sessions"))
        con.execute(sql("check_costs"))
        parts.append(_typed_or_text(con, sql("spend_and_checks")))
    _source_views(con)
    con.register("spend_pass", pl.concat(parts))
    counts = con.execute(sql("session_and_cost_checks")).pl()
    examples = (
        [_typed_or_text(con, sql("session_and_cost_examples"), [max_examples])]
        if counts.height
        else []
    )
    return con.execute(sql("day_costs")).pl(), counts, examples


def read_sources(
    db_path: Path,
    start_date: date | None,
    end_date: date | None,
    max_examples: int = 20,
    database: DatabaseSettings | None = None,
    *,
    spend: bool = True,
) -> Sources:
    """Check every source row, sum the spend, and read the sessions of the run's users.

    Without ``spend`` (a report rebuilt from what is stored), the aggregate pass over
    every session and cost is left out: no spend, no session or cost checks.
    """
    con = connect(db_path, read_only=True, database=database)
    reader = sqlite_reader(db_path)
    try:
        conversions, conversion_counts, conversion_examples = _read_conversions(con, max_examples)
        _source_views(con)
        duplicated_sessions = _duplicates(con, reader, "session_sources", "duplicated_sessions")
        con.register("duplicated_sessions", duplicated_sessions)
        con.register(
            "duplicated_costs", _duplicates(con, reader, "session_costs", "duplicated_costs")
        )
        day_costs = pl.DataFrame(
            schema={"channel_name": pl.String, "date": pl.Date, "cost": pl.Float64}
        )
        counts, examples = conversion_counts, []
        if spend:
            limit = (
                database.memory_limit_bytes if database else DatabaseSettings().memory_limit_bytes
            )
            passes = spend_passes(reader, limit)
            day_costs, session_counts, examples = _spend_pass(con, max_examples, passes)
            counts = pl.concat([counts, session_counts], how="vertical_relaxed")
        if conversion_examples is not None:
            examples.insert(0, conversion_examples)
        in_range = conversions_in_range(conversions, start_date, end_date)
        rows = lookup_session_rows(reader, "user_id", in_range["user_id"].unique().to_list())
        sessions = check_session_rows(con, rows, duplicated_sessions)
        return Sources(
            conversions=conversions,
            sessions=sessions.sort("user_id", "ts", "session_id"),
            day_costs=day_costs,
            total_cost=float(day_costs["cost"].sum()),
            invalid_counts=counts.with_columns(pl.col("rows").cast(pl.Int64)).sort(
                "source_table", "reason"
            ),
            invalid_examples=pl.concat(
                [pl.DataFrame(schema=dict.fromkeys(_EXAMPLE_COLUMNS, pl.String)), *examples],
                how="vertical_relaxed",
            ),
            duplicated_sessions=duplicated_sessions,
        )
    finally:
        reader.close()
        con.close()


_EXAMPLE_COLUMNS = ("source_table", "reason", "row_values")


def quarantine_invalid_rows(
    sources: Sources, output_dir: Path, quality: QualitySettings
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
    db_path: Path,
    start_date: date | None,
    end_date: date | None,
    max_examples: int,
    database: DatabaseSettings,
    spend: bool = True,
) -> Sources:
    return read_sources(db_path, start_date, end_date, max_examples, database, spend=spend)
