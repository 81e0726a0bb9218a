"""Channel report with CPO and ROAS as CSV and Parquet, and the run's side files."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.db import connect

REPORT_CSV = "channel_reporting.csv"
REPORT_PARQUET = "channel_reporting.parquet"
QUARANTINE_CSV = "quarantine.csv"
FAILED_CSV = "failed_conversions.csv"


def with_cpo_roas(
    frame: pl.DataFrame, orders: str = "ihc", revenue: str = "ihc_revenue"
) -> pl.DataFrame:
    """``frame`` with cpo = cost / ``orders`` and roas = ``revenue`` / cost, NULL where
    the denominator is 0: the one place the rule is written."""
    return frame.with_columns(
        cpo=pl.when(pl.col(orders) != 0).then(pl.col("cost") / pl.col(orders)),
        roas=pl.when(pl.col("cost") != 0).then(pl.col(revenue) / pl.col("cost")),
    )


def report_totals(report: pl.DataFrame, by: str) -> pl.DataFrame:
    """The channel report summed per ``by`` (channel_name or date), with cpo and roas
    computed from the sums, never averaged from the rows' ratios."""
    return with_cpo_roas(report.group_by(by).agg(pl.col("cost", "ihc", "ihc_revenue").sum()))


def channel_totals(report: pl.DataFrame) -> pl.DataFrame:
    """The report per channel (cost, ihc, ihc_revenue, cpo, roas), by spend, highest first."""
    return report_totals(report, "channel_name").sort(
        ["cost", "channel_name"], descending=[True, False]
    )


def read_channel_report(db_path: Path) -> pl.DataFrame:
    """The whole channel_reporting table with ``cpo`` and ``roas``.

    cpo = cost / ihc and roas = ihc_revenue / cost; NULL where the denominator is 0.
    """
    con = connect(db_path, read_only=True)
    try:
        frame = con.execute(
            "SELECT CAST(channel_name AS VARCHAR) AS channel_name, "
            "CAST(date AS VARCHAR) AS date, cost, ihc, ihc_revenue "
            "FROM src.channel_reporting ORDER BY channel_name, date"
        ).pl()
    finally:
        con.close()
    frame = frame.with_columns(
        pl.col("date").str.to_date("%Y-%m-%d"),
        pl.col("cost", "ihc", "ihc_revenue").cast(pl.Float64),
    )
    return with_cpo_roas(frame).sort("channel_name", "date")


# A temporary file this old is a killed writer's, not one still being written.
STALE_TEMPORARY_S = 3600


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    A crash leaves the previous file or the new one, never a truncated one; the
    temporary files that crashed writers left behind are removed once they are stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = time.time() - STALE_TEMPORARY_S
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < stale:
                leftover.unlink()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Created as a plain open() would: 0o666 less the process umask (mkstemp's 0o600
    # would keep the report from other users and BI tools).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with tmp.open("rb") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_report(report: pl.DataFrame, output_dir: Path) -> list[Path]:
    """The channel report as CSV (NULL written as an empty field) and Parquet."""
    csv_path = output_dir / REPORT_CSV
    parquet_path = output_dir / REPORT_PARQUET
    write_atomically(csv_path, lambda p: report.write_csv(p, date_format="%Y-%m-%d"))
    write_atomically(parquet_path, lambda p: report.write_parquet(p))
    return [csv_path, parquet_path]


def write_side_file(frame: pl.DataFrame, path: Path) -> Path | None:
    """Write ``frame`` as CSV when it has rows; remove a stale file when it has none."""
    if frame.is_empty():
        path.unlink(missing_ok=True)
        return None
    write_atomically(path, lambda p: frame.write_csv(p))
    return path


@task(name="export-channel-report", cache_policy=NO_CACHE)
def export_report_task(
    db_path: Path, output_dir: Path, failed: pl.DataFrame
) -> tuple[pl.DataFrame, list[Path | None]]:
    """The whole report as CSV and Parquet, and the run's failed conversions (if any)."""
    report = read_channel_report(db_path)
    failed_file = write_side_file(failed.sort("conversion_id"), output_dir / FAILED_CSV)
    return report, [*export_report(report, output_dir), failed_file]
