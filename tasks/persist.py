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
from tasks.attribution import AttributionOutcome
from tasks.db import connect, sql
from tasks.journeys import JourneySet
from tasks.sources import SourceSnapshot

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


def attributed_conversion_ids(db_path: Path) -> pl.DataFrame:
    """The conversions that already have rows in attribution_customer_journey."""
    con = connect(db_path, read_only=True)
    try:
        return con.execute(
            "SELECT DISTINCT CAST(conv_id AS VARCHAR) AS conv_id "
            "FROM src.attribution_customer_journey ORDER BY conv_id"
        ).pl()
    finally:
        con.close()


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE)


def _reconcile(
    con: duckdb.DuckDBPyConnection, snapshot: SourceSnapshot
) -> tuple[float, int, float]:
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
    if not _close(cost, snapshot.total_cost):
        problems.append(f"report cost {cost:.6f} != total session cost {snapshot.total_cost:.6f}")
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
    snapshot: SourceSnapshot,
    new_rows: pl.DataFrame,
    replace_conv_ids: pl.Series,
) -> WriteOutcome:
    """Replace the attribution of ``replace_conv_ids`` by ``new_rows``, rebuild the report.

    One SQLite transaction: delete by conv_id, insert, rebuild channel_reporting,
    reconcile; any failure rolls everything back, so the tables are never half-written.
    ``new_rows`` has columns conv_id, session_id, ihc.
    """
    con = connect(db_path)
    try:
        con.register("snapshot_sessions", snapshot.sessions)
        con.register("snapshot_conversions", snapshot.conversions)
        con.register("snapshot_day_costs", snapshot.day_costs)
        con.register("replace_ids", pl.DataFrame({"conv_id": replace_conv_ids.cast(pl.String)}))
        con.register(
            "new_rows",
            new_rows.select(
                pl.col("conv_id").cast(pl.String),
                pl.col("session_id").cast(pl.String),
                pl.col("ihc").cast(pl.Float64),
            ),
        )
        con.execute("BEGIN TRANSACTION")
        try:
            deleted = con.execute(
                "SELECT count(*) FROM src.attribution_customer_journey "
                "WHERE conv_id IN (SELECT conv_id FROM replace_ids)"
            ).fetchone()[0]
            if replace_conv_ids.len():
                con.execute(sql("attributed_to_delete"))
            if new_rows.height:
                con.execute(
                    "INSERT INTO src.attribution_customer_journey (conv_id, session_id, ihc) "
                    "SELECT conv_id, session_id, ihc FROM new_rows ORDER BY conv_id, session_id"
                )
            con.execute(sql("channel_report"))
            cost, attributed, attributed_revenue = _reconcile(con, snapshot)
            changed = con.execute(
                "SELECT count(*) FROM ("
                "(SELECT channel_name, date, cost, ihc, ihc_revenue FROM new_channel_report "
                " EXCEPT ALL SELECT CAST(channel_name AS VARCHAR), CAST(date AS VARCHAR), "
                " cost, ihc, ihc_revenue FROM src.channel_reporting) UNION ALL "
                "(SELECT CAST(channel_name AS VARCHAR), CAST(date AS VARCHAR), cost, ihc, "
                " ihc_revenue FROM src.channel_reporting EXCEPT ALL "
                " SELECT channel_name, date, cost, ihc, ihc_revenue FROM new_channel_report))"
            ).fetchone()[0]
            if changed:
                con.execute("DELETE FROM src.channel_reporting")
                con.execute(
                    "INSERT INTO src.channel_reporting "
                    "(channel_name, date, cost, ihc, ihc_revenue) "
                    "SELECT channel_name, date, cost, ihc, ihc_revenue FROM new_channel_report "
                    "ORDER BY channel_name, date"
                )
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
            attributed_conversions=attributed,
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
    sources: SourceSnapshot,
    outcome: AttributionOutcome,
    journey_set: JourneySet,
    refresh: bool,
) -> WriteOutcome:
    new_rows, replace = rows_to_write(outcome, journey_set, refresh)
    written = write_results(db_path, sources, new_rows, replace)
    if not written.report_changed:
        get_run_logger().info("channel_reporting already up to date: not rewritten")
    return written


@task(name="read-attributed-conversions", cache_policy=NO_CACHE)
def attributed_conversion_ids_task(db_path: Path) -> pl.DataFrame:
    return attributed_conversion_ids(db_path)
