"""Write attribution_customer_journey and channel_reporting in one checked transaction."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from config.errors import DatabaseError, ReconciliationError
from config.settings import DatabaseSettings
from tasks.attribution import AttributionOutcome
from tasks.db import connect, sql
from tasks.journeys import JourneySet
from tasks.sources import Sources, read_sessions_by_id

RELATIVE_TOLERANCE = 1e-9
ABSOLUTE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class WriteOutcome:
    rows_deleted: int
    rows_written: int
    report_changed: bool
    attributed_conversions: int
    attributed_revenue: float
    report_cost: float


def read_attribution(db_path: Path) -> pl.DataFrame:
    """(conv_id, session_id) of every attribution row written so far."""
    con = connect(db_path, read_only=True)
    try:
        return con.execute(sql("attribution_rows")).pl()
    finally:
        con.close()


def report_sessions(
    db_path: Path, sources: Sources, attributed: pl.DataFrame, new_rows: pl.DataFrame
) -> pl.DataFrame:
    """The usable sessions the report joins: those of the attribution rows after this
    write, from the run's sessions or, for earlier runs' rows, looked up by id."""
    needed = pl.concat([attributed["session_id"], new_rows["session_id"]]).unique()
    known = sources.sessions.filter(pl.col("session_id").is_in(needed.implode()))
    missing = needed.filter(~needed.is_in(known["session_id"].implode()))
    if missing.is_empty():
        return known
    looked_up = read_sessions_by_id(db_path, missing, sources.duplicated_sessions)
    return pl.concat([known, looked_up], how="vertical_relaxed")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE)


def _reconcile(con: duckdb.DuckDBPyConnection, sources: Sources) -> tuple[float, int, float]:
    """(report cost, attributed conversions, their revenue), or ReconciliationError."""
    row = con.execute(sql("report_checks")).fetchone()
    assert row is not None
    (cost, ihc, revenue, attributed, attributed_revenue, bad_sums, unknown_s, unknown_c) = row
    problems = []
    if bad_sums:
        problems.append(f"{bad_sums} conversion(s) whose ihc values do not sum to 1")
    if unknown_s:
        problems.append(
            f"{unknown_s} attribution row(s) reference sessions missing from session_sources "
            "(or quarantined); rerun with --refresh after fixing the source data"
        )
    if unknown_c:
        problems.append(
            f"{unknown_c} attribution row(s) reference conversions missing from conversions "
            "(or quarantined)"
        )
    if not _close(cost, sources.total_cost):
        problems.append(f"report cost {cost:.6f} != total session cost {sources.total_cost:.6f}")
    if not _close(ihc, float(attributed)):
        problems.append(f"report ihc {ihc:.9f} != attributed conversions {attributed}")
    if not _close(revenue, attributed_revenue):
        problems.append(
            f"report ihc_revenue {revenue:.6f} != attributed revenue {attributed_revenue:.6f}"
        )
    if problems:
        raise ReconciliationError("reconciliation failed: " + "; ".join(problems))
    return float(cost), int(attributed), float(attributed_revenue)


def write_results(
    db_path: Path,
    sources: Sources,
    attributed: pl.DataFrame,
    new_rows: pl.DataFrame,
    replace_conv_ids: pl.Series,
    database: DatabaseSettings | None = None,
) -> WriteOutcome:
    """Replace the attribution of ``replace_conv_ids`` by ``new_rows``, rebuild the report.

    One SQLite transaction: delete by conv_id, insert, rebuild channel_reporting,
    reconcile; any failure rolls everything back, so the tables are never half-written.
    ``attributed`` holds the rows written before (``read_attribution``); ``new_rows``
    has columns conv_id, session_id, ihc.
    """
    kept = attributed.filter(~pl.col("conv_id").is_in(replace_conv_ids.implode()))
    sessions = report_sessions(db_path, sources, kept, new_rows)
    con = connect(db_path, database=database)
    try:
        con.register("report_sessions", sessions)
        con.register("usable_conversions", sources.conversions)
        con.register("day_costs", sources.day_costs)
        con.register("replace_ids", pl.DataFrame({"conv_id": replace_conv_ids.cast(pl.String)}))
        con.register(
            "new_rows",
            new_rows.select(
                pl.col("conv_id", "session_id").cast(pl.String), pl.col("ihc").cast(pl.Float64)
            ),
        )
        con.execute("BEGIN TRANSACTION")
        try:
            deleted = con.execute(sql("count_replaced")).fetchone()[0]
            if replace_conv_ids.len():
                con.execute(sql("attributed_to_delete"))
            if new_rows.height:
                con.execute(sql("insert_attribution"))
            con.execute(sql("channel_report"))
            cost, attributed_count, attributed_revenue = _reconcile(con, sources)
            changed = con.execute(sql("report_changed")).fetchone()[0]
            if changed:
                con.execute(sql("replace_channel_report"))
            if new_rows.height or replace_conv_ids.len() or changed:
                con.execute("COMMIT")
            else:
                con.execute("ROLLBACK")
        except BaseException as exc:
            # A failed COMMIT has ended the transaction already: report its error, not ROLLBACK's.
            with contextlib.suppress(duckdb.TransactionException):
                con.execute("ROLLBACK")
            if isinstance(exc, duckdb.Error) and "database is locked" in str(exc):
                raise DatabaseError(
                    f"cannot write to {db_path}: another program holds it in a transaction "
                    "(SQLite: database is locked); nothing was written, run again when it is done"
                ) from exc
            raise
        return WriteOutcome(
            rows_deleted=int(deleted),
            rows_written=new_rows.height,
            report_changed=bool(changed),
            attributed_conversions=attributed_count,
            attributed_revenue=attributed_revenue,
            report_cost=cost,
        )
    finally:
        con.close()


def rows_to_write(
    outcome: AttributionOutcome, journey_set: JourneySet, refresh: bool
) -> tuple[pl.DataFrame, pl.Series]:
    """(new attribution rows, conv_ids whose rows they replace).

    A refresh also clears conversions of the range that no longer have a journey; a
    conversion that fails keeps whatever attribution it had.
    """
    new_rows = outcome.results.select(
        pl.col("conversion_id").alias("conv_id"), "session_id", "ihc"
    ).sort("conv_id", "session_id")
    replace = new_rows["conv_id"].unique()
    if refresh:
        replace = pl.concat([replace, journey_set.without_journey["conv_id"]]).unique().sort()
    return new_rows, replace


@task(name="write-attribution-and-channel-report", cache_policy=NO_CACHE)
def write_results_task(
    db_path: Path,
    sources: Sources,
    attributed: pl.DataFrame,
    outcome: AttributionOutcome,
    journey_set: JourneySet,
    refresh: bool,
    database: DatabaseSettings,
) -> WriteOutcome:
    new_rows, replace = rows_to_write(outcome, journey_set, refresh)
    written = write_results(db_path, sources, attributed, new_rows, replace, database)
    if not written.report_changed:
        get_run_logger().info("channel_reporting already up to date: not rewritten")
    return written


@task(name="read-attribution", cache_policy=NO_CACHE)
def read_attribution_task(db_path: Path) -> pl.DataFrame:
    return read_attribution(db_path)
