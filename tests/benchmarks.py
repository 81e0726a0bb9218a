"""Stage timings and peak memory at scale 1 and 10: ``python -m tests.benchmarks``.

Each scale runs in a fresh child process, so its peak memory (ru_maxrss) is its own.
In the same child it times the straightforward alternative — one SQLite query joining
conversions to session_sources on user_id with datetime() comparisons — and reports
the journey builder as a ratio to it. Not a test: run it by hand, read the figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

BASELINE_SQL = """
SELECT c.conv_id, s.session_id, s.event_date, s.event_time, s.channel_name
FROM conversions AS c
JOIN session_sources AS s ON s.user_id = c.user_id
WHERE datetime(s.event_date || ' ' || s.event_time)
    < datetime(c.conv_date || ' ' || c.conv_time)
ORDER BY c.conv_id, s.event_date, s.event_time, s.session_id
"""


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(scale: float, workdir: Path) -> dict[str, Any]:
    """A fresh sample database at ``scale`` (child process of its own)."""
    from tasks.db import prepare_database
    from tasks.sample_data import generate_sample_database
    from tests.helpers import ORIGINAL_SCHEMA

    db = workdir / f"challenge-{scale:g}.db"
    db.unlink(missing_ok=True)
    seconds, _ = _timed(lambda: generate_sample_database(db, scale=scale, seed=42))
    prepare_database(db, ORIGINAL_SCHEMA)
    return {"generate_s": seconds}


def run_flow(scale: float, workdir: Path) -> dict[str, Any]:
    """The whole flow, as a user runs it, on a fresh copy of the scale's database."""
    import shutil

    from flows.attribution import attribution_flow

    db = workdir / f"flow-{scale:g}.db"
    shutil.copy(workdir / f"challenge-{scale:g}.db", db)
    seconds, summary = _timed(
        lambda: attribution_flow(
            db_path=str(db), output_dir=str(workdir / f"flow-out-{scale:g}"), provider="local"
        )
    )
    assert summary["attributed_conversions"] > 0
    return {"flow_run_s": seconds, "flow_peak_memory_mb": _peak_mb()}


def run_scale(scale: float, workdir: Path, api: bool, api_repeat: int = 1) -> dict[str, Any]:
    """Every stage once at ``scale``; runs inside a child process of its own."""
    from config.settings import LocalModelSettings, load_settings
    from tasks.attribution import attribute_locally
    from tasks.export import export_report, read_channel_report
    from tasks.journeys import build_journeys
    from tasks.local_model import compute_ihc
    from tasks.persist import write_results
    from tasks.sources import read_journey_inputs, read_snapshot

    db = workdir / f"challenge-{scale:g}.db"
    figures: dict[str, Any] = {"scale": scale}

    def baseline() -> int:
        con = sqlite3.connect(db)
        try:
            return len(con.execute(BASELINE_SQL).fetchall())
        finally:
            con.close()

    figures["sqlite_baseline_s"], baseline_rows = _timed(baseline)

    def journeys_alone() -> Any:
        sessions, conversions = read_journey_inputs(db)
        return build_journeys(sessions, conversions)

    figures["journey_builder_s"], alone = _timed(journeys_alone)
    assert alone.journeys.height == baseline_rows, "journey builder and baseline disagree"
    figures["journey_rows"] = baseline_rows
    figures["journey_speedup_vs_sqlite"] = (
        figures["sqlite_baseline_s"] / figures["journey_builder_s"]
    )

    pipeline_start = time.perf_counter()
    memory_limit = load_settings().database.memory_limit
    figures["source_snapshot_s"], snapshot = _timed(lambda: read_snapshot(db, 20, memory_limit))
    figures["journeys_from_snapshot_s"], journey_set = _timed(
        lambda: build_journeys(snapshot.sessions, snapshot.conversions)
    )
    journeys = journey_set.journeys
    params = LocalModelSettings()
    compute_ihc(journeys.head(1000), params)
    figures["local_model_s"], outcome = _timed(lambda: attribute_locally(journeys, params))
    figures["local_model_sessions_per_s"] = journeys.height / figures["local_model_s"]
    new_rows = outcome.results.select(pl.col("conversion_id").alias("conv_id"), "session_id", "ihc")
    figures["write_and_report_s"], _ = _timed(
        lambda: write_results(db, snapshot, new_rows, new_rows["conv_id"].unique())
    )
    out = workdir / f"out-{scale:g}"
    figures["export_s"], _ = _timed(lambda: export_report(read_channel_report(db), out))
    figures["pipeline_stages_s"] = time.perf_counter() - pipeline_start
    figures["peak_memory_mb"] = _peak_mb()

    # The model's throughput on a larger input than one scale's journeys.
    big = pl.concat([journeys.with_columns(pl.col("conversion_id") + f"-{i}") for i in range(30)])
    seconds, _ = _timed(lambda: compute_ihc(big, params))
    figures["local_model_large_sessions"] = big.height
    figures["local_model_large_sessions_per_s"] = big.height / seconds
    if api:
        from tests.bench_api import run_api_benchmark

        figures["api"] = run_api_benchmark(journeys, repeat=api_repeat)
    return figures


def _print(figures: dict[str, Any]) -> None:
    print(f"\n== scale {figures['scale']:g}: {figures['journey_rows']:,} journey rows ==")
    for key, value in figures.items():
        if key in ("scale", "api"):
            continue
        print(f"  {key:36s} {value:,.3f}" if isinstance(value, float) else f"  {key:36s} {value}")
    for row in figures.get("api", []):
        print("  api", json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument(
        "--api",
        action="store_true",
        help="also attribute through the local IHC server at C = 1, 4, 16 (on the largest scale)",
    )
    parser.add_argument(
        "--api-repeat",
        type=int,
        default=3,
        help="runs per concurrency with --api; the median is reported",
    )
    parser.add_argument("--child", choices=["generate", "stages", "flow"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "generate":
        print(json.dumps(generate(args.scale, args.workdir)))
        return 0
    if args.child == "stages":
        print(json.dumps(run_scale(args.scale, args.workdir, args.api, args.api_repeat)))
        return 0
    if args.child == "flow":
        print(json.dumps(run_flow(args.scale, args.workdir)))
        return 0
    with tempfile.TemporaryDirectory(prefix="attribution-bench-") as tmp:
        for scale in args.scales:
            figures: dict[str, Any] = {}
            for child in ("generate", "flow", "stages"):
                command = [
                    sys.executable,
                    "-m",
                    "tests.benchmarks",
                    "--child",
                    child,
                    "--scale",
                    str(scale),
                    "--workdir",
                    tmp,
                ]
                if child == "stages" and args.api and scale == max(args.scales):
                    command += ["--api", "--api-repeat", str(args.api_repeat)]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    print(result.stderr, file=sys.stderr)
                    return result.returncode
                figures.update(json.loads(result.stdout.strip().splitlines()[-1]))
            _print(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
