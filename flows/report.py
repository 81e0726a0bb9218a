"""The report-only flow: the model comparison and report.html rebuilt from what is stored.

Nothing is attributed or written to the database: the journeys of the range are built
again, the stored attribution is the ihc model, and the stored channel_reporting is the
report. Run it with ``python -m flows.attribution --report-only``.
"""

from __future__ import annotations

from typing import Any

from prefect import State, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from config.errors import PipelineError
from flows.parameters import IsoDate, WindowDays, parse_parameters, run_name
from flows.runs import log_known_failures_once, tag_flow_run
from tasks.comparison import compare_models_task, report_header
from tasks.db import ensure_database, prepare_database_task, run_lock, scratch_directory
from tasks.export import read_channel_report
from tasks.journeys import build_journeys_task
from tasks.sources import read_sources_task
from tasks.summary import SUMMARY_ARTIFACT_KEY, model_disagreements

log_known_failures_once()


@flow(name="ihc-report", flow_run_name=lambda: "report only", validate_parameters=True)
def report_flow(
    start_date: IsoDate | None = None,
    end_date: IsoDate | None = None,
    window_days: WindowDays | None = None,
    db_path: str | None = None,
    output_dir: str | None = None,
    config_path: str | None = None,
) -> dict[str, Any] | State:
    """Rebuild model_comparison.csv/.parquet and report.html from the database as it is.

    Args:
        start_date: First conversion date compared (YYYY-MM-DD). Empty: the first.
        end_date: Last conversion date compared (YYYY-MM-DD). Empty: the last.
        window_days: Instead of dates, the last N full days before today (UTC).
        db_path: SQLite database. Empty: database.path from the settings.
        output_dir: Folder of the files. Empty: output.dir.
        config_path: Settings YAML. Empty: config/config.yaml.
    """
    try:
        params = parse_parameters(**locals())  # the flow's parameters, nothing else yet
        settings = params.settings()
        start, end = params.date_range()
        tag_flow_run("attribution", "mode:report")
        db, database = settings.database.path, settings.database
        synthetic = ensure_database(settings, explicit=True)  # never makes one here
        with run_lock(db, database.lock_timeout_s), scratch_directory(database):
            prepare_database_task(db, database.schema_path)
            sources = read_sources_task(
                db, start, end, settings.quality.max_examples, database, spend=False
            )
            journey_set = build_journeys_task(sources, start, end, settings.journeys)
        report = read_channel_report(db)
        header = report_header(start, end, "stored", synthetic)
        comparison = compare_models_task(
            db, sources, journey_set, report, start, end, settings, header
        )
        lines = [f"# Report rebuilt: {run_name(params)}", ""]
        if synthetic:
            lines += ["**SYNTHETIC sample data**: not based on real data.", ""]
        lines += ["Files:", ""]
        lines += [f"- [{path.name}]({path.resolve().as_uri()})" for path in comparison.files]
        if disagreements := model_disagreements(comparison.frame):
            lines += ["", "Where the models disagree most:", "", *map("- {}".format, disagreements)]
        create_markdown_artifact(key=SUMMARY_ARTIFACT_KEY, markdown="\n".join(lines) + "\n")
        return {"files": [str(path) for path in comparison.files], "synthetic_data": synthetic}
    except PipelineError as exc:
        get_run_logger().error("%s", exc)
        return Failed(message=f"{type(exc).__name__}: {exc}", data=exc)
