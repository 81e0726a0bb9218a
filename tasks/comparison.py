"""The attribution models side by side, and the HTML report people look at.

Runs after the export, on what is stored: the journeys of the run's range, their
attribution rows (the ihc model), the null paths of the range (read from every session,
only when a Markov model is asked for) and the channel report. Writes
``model_comparison.csv`` / ``.parquet`` and ``report.html``, atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path

import duckdb
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from config.settings import Settings
from tasks.db import connect, sql
from tasks.journeys import JourneySet
from tasks.sources import Sources, in_date_range

REPORT_HTML = "report.html"


@dataclass(frozen=True)
class Comparison:
    """The comparison frame (empty when the models are switched off) and the files written."""

    frame: pl.DataFrame
    files: list[Path]


def report_header(
    start: date | None, end: date | None, provider: str, synthetic: bool
) -> dict[str, object]:
    """The facts the HTML report's header shows, in order."""
    return {
        "Conversions compared": f"{start or 'first'} to {end or 'last'} (conversion dates)",
        "Attribution": "IHC API" if provider == "api" else "local IHC model",
        "Data": "SYNTHETIC sample data" if synthetic else "the configured database",
        "Generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def channel_costs(report: pl.DataFrame, start: date | None, end: date | None) -> pl.DataFrame:
    """Spend per channel over the report dates in the range (all dates without one)."""
    in_range = report.filter(in_date_range("date", start, end))
    return in_range.group_by("channel_name").agg(pl.col("cost").sum()).sort("channel_name")


@task(name="compare-models-and-write-html-report", cache_policy=NO_CACHE)
def compare_models_task(
    db_path: Path,
    sources: Sources,
    journey_set: JourneySet,
    report: pl.DataFrame,
    start: date | None,
    end: date | None,
    settings: Settings,
    title_info: dict[str, object],
) -> Comparison:
    from tasks.models import compare_models, write_comparison
    from tasks.paths import last_conversion_times, null_paths
    from tasks.report_html import user_cache_dir, write_html_report

    started = time.perf_counter()
    models = settings.models
    journeys = journey_set.journeys
    con = connect(db_path, read_only=True, database=settings.database)
    try:
        nulls = pl.DataFrame(schema={"path": pl.List(pl.String), "nulls": pl.Int64})
        if models.enabled and "markov" in models.include:
            read_nulls = partial(
                null_paths,
                con,
                start_date=start,
                end_date=end,
                converting_users=last_conversion_times(sources.conversions),
                duplicated_sessions=sources.duplicated_sessions,
            )
            try:
                nulls = read_nulls()
            except duckdb.Error:
                # Values of the wrong storage class (text in an INTEGER column): read
                # every column as text; the checks leave such rows out.
                con.execute("SET sqlite_all_varchar = true")
                nulls = read_nulls()
        con.register("compared_conversions", journeys.select("conversion_id").unique())
        ihc_rows = con.execute(sql("ihc_rows")).pl()
    finally:
        con.close()
    costs = channel_costs(report, start, end)
    frame = compare_models(journeys, ihc_rows, nulls, costs, models)
    out = settings.output.dir
    files = write_comparison(frame, out) if frame.height else []
    html = write_html_report(
        report,
        frame,
        out / REPORT_HTML,
        title_info=title_info,
        cache_dir=user_cache_dir(),
    )
    files.append(html)
    get_run_logger().info(
        "Models compared (%s) and report written in %.1f s: %s",
        ", ".join(frame["model"].unique(maintain_order=True)) or "none",
        time.perf_counter() - started,
        ", ".join(str(path) for path in files),
    )
    return Comparison(frame, files)
