"""The IHC attribution flow: wiring only, one call per stage.

Run it with ``python -m flows.attribution --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import polars as pl
from prefect import State, flow, get_run_logger
from prefect.states import Failed

from config.settings import Settings, SettingsError, load_settings
from flows.parameters import (
    IsoDate,
    ParameterError,
    Provider,
    RunParameters,
    WindowDays,
    parse_parameters,
)
from tasks.attribution import AttributionOutcome, attribute_locally_task
from tasks.db import DatabaseError, prepare_database_task, run_lock
from tasks.export import FAILED_CSV, QUARANTINE_CSV, export_report_task, write_side_file
from tasks.ihc_client import (
    ApiKeyRejected,
    api_settings_from_env,
    attribute_with_api,
    resolve_api_key,
)
from tasks.journeys import build_journeys_task
from tasks.persist import attributed_conversion_ids_task, write_results_task
from tasks.sample_data import generate_sample_database
from tasks.sources import file_identity, read_snapshot_task, remember_snapshot_task
from tasks.summary import RunSummary, add_report_totals, publish_artifacts_task


class AttributionRunError(RuntimeError):
    """The run finished its writes but something needs the user's attention."""


class InvalidSourceRows(RuntimeError):
    """Unusable source rows were found and the settings say to fail on them."""


EXPECTED_FAILURES = (
    ParameterError,
    SettingsError,
    DatabaseError,
    InvalidSourceRows,
    AttributionRunError,
    ApiKeyRejected,
)


def _settings(params: RunParameters) -> Settings:
    overrides: dict[str, Any] = {}
    if params.db_path:
        overrides["database"] = {"path": params.db_path}
    if params.output_dir:
        overrides["output"] = {"dir": params.output_dir}
    if params.provider:
        overrides["attribution"] = {"provider": params.provider}
    settings = load_settings(Path(params.config_path) if params.config_path else None, overrides)
    return settings.model_copy(update={"api": api_settings_from_env(settings.api)})


def _ensure_database(settings: Settings, explicit: bool, logger: Any) -> bool:
    """Create sample data when the configured database is missing; True if it did.

    A path given explicitly (``--db``, the ``db_path`` parameter) must exist: a typo
    there should fail, not quietly produce a report on synthetic data.
    """
    db = settings.database.path
    if db.exists():
        return False
    if explicit:
        raise DatabaseError(f"database file not found: {db} (no sample data is made for it)")
    logger.warning(
        "No database at %s: generating SYNTHETIC sample data (scale %s, seed %s). "
        "The report below is NOT based on real data.",
        db,
        settings.sample_data.scale,
        settings.sample_data.seed,
    )
    generate_sample_database(db, scale=settings.sample_data.scale, seed=settings.sample_data.seed)
    return True


def _attribute(
    journeys: pl.DataFrame, settings: Settings, provider: str, api_key: Any
) -> AttributionOutcome:
    if provider == "local":
        return attribute_locally_task(
            journeys, settings.local_model, settings.api.redistribution_parameter
        )
    api = attribute_with_api(journeys, settings.api, api_key)
    stats = api.stats
    return AttributionOutcome(
        provider="api",
        results=api.results,
        failed=api.failed,
        stats={
            "requests": stats.requests,
            "retries": stats.retries,
            "truncated_journeys": stats.truncated_journeys,
            "cache_hits": stats.cache_hits,
        },
    )


@flow(name="ihc-attribution", validate_parameters=True)
def attribution_flow(
    start_date: IsoDate | None = None,
    end_date: IsoDate | None = None,
    window_days: WindowDays | None = None,
    provider: Provider | None = None,
    refresh: bool = False,
    db_path: str | None = None,
    output_dir: str | None = None,
    config_path: str | None = None,
) -> dict[str, Any] | State:
    """Attribute the conversions of a date range and rebuild the channel report.

    Args:
        start_date: First conversion date to attribute (YYYY-MM-DD, inclusive).
            Empty: from the earliest conversion.
        end_date: Last conversion date to attribute (YYYY-MM-DD, inclusive).
            Empty: up to the latest conversion.
        window_days: Instead of dates, the last N full days before today (UTC);
            1 = yesterday. Resolved when the run starts.
        provider: auto (IHC API when an API key is configured, else the local model),
            local or api. Empty: the setting attribution.provider.
        refresh: Recompute conversions that are already attributed.
        db_path: SQLite database. Empty: database.path from the settings.
        output_dir: Folder for the CSV/Parquet report. Empty: output.dir.
        config_path: Settings YAML. Empty: config/config.yaml.
    """
    try:
        params = parse_parameters(
            start_date=start_date,
            end_date=end_date,
            window_days=window_days,
            provider=provider,
            refresh=refresh,
            db_path=db_path,
            output_dir=output_dir,
            config_path=config_path,
        )
        return _attribute_range(params)
    except EXPECTED_FAILURES as exc:
        # A failed run, not a crash: one log line, no traceback. The exception rides
        # along, so a direct call (the CLI) still raises it and maps it to an exit code.
        get_run_logger().error("%s", exc)
        return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)


def _attribute_range(params: RunParameters) -> dict[str, Any]:
    logger = get_run_logger()
    start, end = params.date_range()
    settings = _settings(params)
    api_key = resolve_api_key()
    chosen = settings.attribution.provider
    if chosen == "auto":
        chosen = "api" if api_key is not None else "local"
    if chosen == "api" and api_key is None:
        raise SettingsError(
            "provider 'api' needs an API key: set IHC_API_KEY or create the Prefect "
            "Secret block 'ihc-api-key'"
        )
    summary = RunSummary(
        start_date=start.isoformat() if start else None,
        end_date=end.isoformat() if end else None,
        provider=chosen,
    )
    db = settings.database.path
    out = settings.output.dir
    summary.synthetic_data = _ensure_database(settings, params.db_path is not None, logger)
    with run_lock(db, settings.database.lock_timeout_s):
        prepare_database_task(db, settings.database.schema_path)
        state = read_snapshot_task(
            db,
            file_identity(db),
            settings.quality.max_examples,
            settings.database.memory_limit,
            return_state=True,
        )
        snapshot = state.result()
        summary.source_cache_hit = state.name == "Cached"
        if summary.source_cache_hit:
            logger.info("Source tables unchanged since the last run: snapshot served from cache")
        summary.invalid_rows = {
            f"{r['source_table']}: {r['reason']}": r["rows"]
            for r in snapshot.invalid_counts.to_dicts()
        }
        quarantine = write_side_file(snapshot.invalid_examples, out / QUARANTINE_CSV)
        if summary.invalid_rows:
            logger.warning(
                "Excluded %d unusable source row(s): %s (examples in %s)",
                sum(summary.invalid_rows.values()),
                summary.invalid_rows,
                quarantine,
            )
            if settings.quality.fail_on_invalid_rows:
                raise InvalidSourceRows(
                    f"unusable source rows found: {summary.invalid_rows}; examples in "
                    f"{quarantine} (quality.fail_on_invalid_rows is true)"
                )
        journey_set = build_journeys_task(
            snapshot.sessions,
            snapshot.conversions,
            start,
            end,
            settings.journeys.include_equal_timestamps,
            settings.journeys.lookback_days,
        )
        journeys = journey_set.journeys
        summary.conversions_in_range = journey_set.conversions_in_range.height
        summary.conversions_with_journey = journey_set.conversion_count
        summary.journey_sessions = journeys.height
        summary.unattributed_no_journey = journey_set.without_journey.height
        if summary.unattributed_no_journey:
            logger.info(
                "%d conversion(s) have no session before them and stay unattributed",
                summary.unattributed_no_journey,
            )
        done = attributed_conversion_ids_task(db)
        if not params.refresh:
            before = journeys["conversion_id"].n_unique()
            journeys = journeys.join(
                done.rename({"conv_id": "conversion_id"}), on="conversion_id", how="anti"
            )
            summary.already_attributed_skipped = before - journeys["conversion_id"].n_unique()
        summary.sent_conversions = journeys["conversion_id"].n_unique()
        outcome = _attribute(journeys, settings, chosen, api_key)
        failed = outcome.failed
        new_rows = outcome.results.select(
            pl.col("conversion_id").alias("conv_id"), "session_id", "ihc"
        ).sort("conv_id", "session_id")
        replace = new_rows["conv_id"].unique()
        if params.refresh:
            replace = pl.concat([replace, journey_set.without_journey["conv_id"]]).unique().sort()
        written = write_results_task(db, snapshot, new_rows, replace)
        if not written.report_changed:
            logger.info("channel_reporting already up to date: not rewritten")
        remember_snapshot_task(snapshot, file_identity(db), settings.quality.max_examples)
    summary.attributed_conversions = new_rows["conv_id"].n_unique()
    summary.rows_written = written.rows_written
    summary.failed_conversions = failed.height
    # Reasons grouped by kind: "ihc sums to 0.8 instead of 1" and "… to 1.2 …" are one.
    kinds = failed.group_by(pl.col("reason").str.replace_all(r"[0-9]+(\.[0-9]+)?", "N")).len()
    summary.failure_reasons = {r["reason"]: r["len"] for r in kinds.sort("reason").to_dicts()}
    for key in ("requests", "retries", "truncated_journeys", "cache_hits"):
        setattr(summary, key, int(outcome.stats.get(key, 0)))
    report, files = export_report_task(db, out, start, end)
    failed_file = write_side_file(failed.sort("conversion_id"), out / FAILED_CSV)
    summary.files = [str(p) for p in [*files, quarantine, failed_file] if p is not None]
    add_report_totals(summary, report)
    for line in summary.log_lines():
        logger.info(line)
    publish_artifacts_task(summary, report)
    if summary.failed_conversions:
        raise AttributionRunError(
            f"{summary.failed_conversions} conversion(s) failed ({summary.failure_reasons}); "
            f"they are listed in {failed_file} and are sent again by the next run"
        )
    return summary.as_dict()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.attribution",
        description="Attribute conversions with the IHC model and export the channel report "
        "(cost, ihc, ihc_revenue, CPO, ROAS per channel and day).",
    )
    parser.add_argument(
        "--start-date",
        type=date.fromisoformat,
        help="first conversion date, YYYY-MM-DD (inclusive)",
    )
    parser.add_argument(
        "--end-date", type=date.fromisoformat, help="last conversion date, YYYY-MM-DD (inclusive)"
    )
    parser.add_argument(
        "--window-days",
        type=int,
        help="attribute the last N full days (UTC) instead of a fixed range; 1 = yesterday",
    )
    parser.add_argument(
        "--db",
        dest="db_path",
        help="SQLite database (default from config: "
        "data/challenge.db, created with sample data when missing)",
    )
    parser.add_argument("--output-dir", help="where the CSV/Parquet report is written")
    parser.add_argument(
        "--config", dest="config_path", help="settings YAML (default config/config.yaml)"
    )
    parser.add_argument(
        "--provider",
        choices=["auto", "local", "api"],
        help="auto = api when an API key is configured, else local",
    )
    parser.add_argument(
        "--refresh", action="store_true", help="recompute conversions that are already attributed"
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve the scheduled deployments with flow.serve (no work pool)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k != "serve" and v not in (None, False)}
    try:
        parse_parameters(**values)
        if args.serve:
            from flows.serve import serve_deployments

            serve_deployments()
            return 0
        attribution_flow(**values)
    except KeyboardInterrupt:
        print("attribution: interrupted", file=sys.stderr)
        return 130
    except (ParameterError, SettingsError, DatabaseError, InvalidSourceRows) as exc:
        print(f"attribution: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"attribution: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
