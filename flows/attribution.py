"""The IHC attribution flow: parameters in, one call per stage, summary out.

Run it with ``python -m flows.attribution --help``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # The command line checks parameters, settings and files before Prefect is imported
    # (a few seconds), so a mistake there is reported at once; it then runs this module's
    # flow as ``flows.attribution``.
    from flows.cli import main

    sys.exit(main())

import os
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import State, flow, get_run_logger
from prefect.states import Failed

from config.errors import AttributionRunError, ParameterError, PipelineError
from config.secrets import resolve_api_key
from flows.parameters import (
    IsoDate,
    Provider,
    WindowDays,
    parse_parameters,
    run_mode,
    run_name,
)
from flows.runs import log_known_failures_once, tag_flow_run
from tasks.attribution import attribute, choose_provider, journeys_to_send
from tasks.comparison import compare_models_task, report_header
from tasks.db import ensure_database, prepare_database_task, run_lock, scratch_directory
from tasks.export import export_report_task
from tasks.journeys import build_journeys_task
from tasks.persist import read_attribution_task, write_results_task
from tasks.sources import quarantine_invalid_rows, read_sources_task
from tasks.summary import (
    publish_failure,
    publish_summary,
    raise_for_failed_conversions,
    summarize,
)

log_known_failures_once()


def _run_name() -> str:
    """What the run covers, e.g. "daily 2023-09-07" (runs with bad parameters say so)."""
    from prefect.runtime import flow_run

    try:
        return run_name(parse_parameters(**flow_run.parameters))
    except ParameterError:
        return "invalid parameters"


@flow(name="ihc-attribution", flow_run_name=_run_name, validate_parameters=True)
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
        params = parse_parameters(**locals())  # the flow's parameters, nothing else yet
        settings = params.settings()
        start, end = params.date_range()
        api_key = resolve_api_key()
        chosen = choose_provider(settings.attribution.provider, api_key)
        tag_flow_run("attribution", f"mode:{run_mode(params)}", f"provider:{chosen}")
        db, out = settings.database.path, settings.output.dir
        synthetic = ensure_database(settings, explicit=params.db_path is not None)
        database = settings.database
        with run_lock(db, database.lock_timeout_s), scratch_directory(database):
            prepare_database_task(db, database.schema_path)
            sources = read_sources_task(db, start, end, settings.quality.max_examples, database)
            quarantine = quarantine_invalid_rows(sources, out, settings.quality)
            journey_set = build_journeys_task(sources, start, end, settings.journeys)
            attributed = read_attribution_task(db)
            to_send, skipped = journeys_to_send(journey_set.journeys, attributed, params.refresh)
            outcome = attribute(to_send, chosen, settings.api, settings.local_model, api_key)
            write_results_task(
                db, sources, attributed, outcome, journey_set, params.refresh, database
            )
        report, files = export_report_task(db, out, outcome.failed)
        comparison = compare_models_task(
            db, sources, journey_set, report, start, end, settings,
            report_header(start, end, chosen, synthetic),
        )  # fmt: skip
        summary = summarize(
            start=start,
            end=end,
            synthetic=synthetic,
            sources=sources,
            journey_set=journey_set,
            attributed=attributed,
            skipped=skipped,
            outcome=outcome,
            report=report,
            comparison=comparison.frame,
            files=[*files, *comparison.files, quarantine],
        )
        publish_summary(summary, report)
        raise_for_failed_conversions(summary)
        return summary.as_dict()
    except PipelineError as exc:
        # A failed run, not a crash: one log line, no traceback. The exception rides
        # along, so a direct call (the CLI) still raises it and maps it to an exit code.
        get_run_logger().error("%s", exc)
        if not isinstance(exc, AttributionRunError):  # that one's summary is out already
            publish_failure(exc)
        return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)
