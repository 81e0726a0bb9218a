"""``python -m flows.attribution``: the flow from the command line, with exit codes.

Parameters, settings and the database path are checked before Prefect is imported, so
a mistake is reported in well under two seconds instead of after a server started.
"""

from __future__ import annotations

import argparse
import sys

from config.errors import DatabaseError, ParameterError, PipelineError
from flows.parameters import parse_parameters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.attribution",
        description="Attribute conversions with the IHC model and export the channel report "
        "(cost, ihc, ihc_revenue, CPO, ROAS per channel and day).",
    )
    parser.add_argument("--start-date", help="first conversion date, YYYY-MM-DD (inclusive)")
    parser.add_argument("--end-date", help="last conversion date, YYYY-MM-DD (inclusive)")
    parser.add_argument(
        "--window-days",
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
        "--report-only",
        action="store_true",
        help="rebuild model_comparison.* and report.html from what is stored, attributing "
        "nothing (takes --start-date/--end-date/--window-days, --db, --output-dir, --config)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve the scheduled deployments with flow.serve (no work pool)",
    )
    return parser


def check(values: dict[str, object]) -> None:
    """What can be checked without Prefect: parameters, settings, an explicit database."""
    params = parse_parameters(**values)
    settings = params.settings()
    db = settings.database.path
    if params.db_path is not None and not db.exists():
        raise DatabaseError(f"database file not found: {db} (no sample data is made for it)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = ("serve", "report_only")
    values = {k: v for k, v in vars(args).items() if k not in options and v not in (None, False)}
    try:
        if args.report_only and {"provider", "refresh"} & set(values):
            raise ParameterError("--report-only attributes nothing: drop --provider/--refresh")
        check(values)
        if args.serve:
            from flows.serve import serve_deployments

            serve_deployments()
        elif args.report_only:
            from flows.report import report_flow

            report_flow(**values)
        else:
            from flows.attribution import attribution_flow

            attribution_flow(**values)
    except KeyboardInterrupt:
        print("attribution: interrupted", file=sys.stderr)
        return 130
    except PipelineError as exc:
        print(f"attribution: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        print(f"attribution: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
