"""The flow as a user runs it, the journey path against a plain SQLite query, the local
model's throughput: ``python -m tests.benchmarks [--scales 1 10 100 | --scale100]``.

Per scale, on fresh copies of ``<source-dir>/scale<S>.db`` (generated when missing):

- Three CLI runs (``python -m flows.attribution … --provider local``) on one copy: full
  (creates the user_id index), a rerun (all attributed already) and ``--refresh`` of one
  day. Each: wall time, peak RSS (``os.wait4``: the process and the children it reaped,
  i.e. the temporary Prefect server) and peak disk use of DuckDB's temporary files
  (``ATTRIBUTION_DATABASE__TEMP_DIR``, polled every 0.2 s, as is the RSS of the process
  itself, to tell during which stage each peaked). Stage times come from the
  log: a task's time runs from the previous task's "Finished" (the first: from
  "Beginning flow run") to its own, so the flow's work between tasks counts towards the
  next task, and start-up + stages + tail + exit add up to the wall time.
- In one child process on another copy (no user_id index): the peers' SQLite query
  without the index, CREATE INDEX (as ``prepare_database``), the query with it, and the
  flow's journey path (conversions, index lookup of the users' sessions, checks,
  ``build_journeys``); then ``compute_ihc`` on those journeys, median of 5.

Not a test: run it by hand, read the figures. It writes nothing outside its work dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DAY = "2023-09-07"
PEER_SQL = """
SELECT c.conv_id, s.session_id, s.event_date, s.event_time, s.channel_name
FROM conversions c JOIN session_sources s ON s.user_id = c.user_id
WHERE datetime(s.event_date || ' ' || s.event_time) < datetime(c.conv_date || ' ' || c.conv_time)
ORDER BY c.conv_id, s.event_date, s.event_time, s.session_id
"""
STAGES = (
    "prepare-database",
    "read-source-tables",
    "build-customer-journeys",
    "read-attribution",
    "attribute-with-local-ihc-model",
    "write-attribution-and-channel-report",
    "export-channel-report",
    "compare-models-and-write-html-report",
)
FLOW = ("-m", "flows.attribution", "--provider", "local")
MODELS = "compare-models-and-write-html-report"
_LOG = re.compile(
    r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+ *\| "
    r"(?:Task run '(?P<task>.+)-\w+'|Flow run '[^']+'|prefect) - (?P<message>.*)$"
)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# ---- child: the peers' query, the flow's journey path, the local model ----


def _peer_rows(db: Path) -> int:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return len(con.execute(PEER_SQL).fetchall())
    finally:
        con.close()


def _flow_journey_path(db: Path, settings: Any) -> tuple[dict[str, float], Any]:
    """What the flow runs from the database file to the journeys frame, step by step."""
    from tasks.db import connect, sqlite_reader
    from tasks.journeys import build_journeys
    from tasks.sources import (
        _duplicates,
        _read_conversions,
        _source_views,
        check_session_rows,
        conversions_in_range,
        lookup_session_rows,
    )

    steps, mark = {}, time.perf_counter()

    def step(name: str) -> None:
        nonlocal mark
        steps[name], mark = time.perf_counter() - mark, time.perf_counter()

    con = connect(db, read_only=True, database=settings.database)
    reader = sqlite_reader(db)
    step("open_s")
    try:
        conversions, _, _ = _read_conversions(con, settings.quality.max_examples)
        step("conversions_s")
        _source_views(con)
        duplicated = _duplicates(con, reader, "session_sources", "duplicated_sessions")
        users = conversions_in_range(conversions, None, None)["user_id"].unique().to_list()
        rows = lookup_session_rows(reader, "user_id", users)
        step("lookup_s")
        sessions = check_session_rows(con, rows, duplicated).sort("user_id", "ts", "session_id")
        step("checks_s")
    finally:
        reader.close()
        con.close()
    journey_set = build_journeys(
        sessions,
        conversions,
        include_equal_timestamps=settings.journeys.include_equal_timestamps,
        lookback_days=settings.journeys.lookback_days,
    )
    step("build_s")
    return steps, journey_set


def journeys_child(db: Path, repeat: int) -> dict[str, Any]:
    from config.settings import load_settings
    from tasks.db import prepare_database, scratch_directory
    from tasks.local_model import compute_ihc

    settings = load_settings()
    figures: dict[str, Any] = {}
    figures["peer_noindex_s"], peer_rows = _timed(lambda: _peer_rows(db))
    figures["index_s"], created = _timed(
        lambda: prepare_database(db, settings.database.schema_path)
    )
    assert "index idx_session_sources_user_id" in created, created
    peer_times, path_runs = [], []
    with scratch_directory(settings.database):
        for _ in range(repeat):
            peer_times.append(_timed(lambda: _peer_rows(db))[0])
            path_runs.append(_timed(lambda: _flow_journey_path(db, settings)))
    figures["peer_indexed_s"] = statistics.median(peer_times)
    figures["flow_path_s"] = statistics.median(seconds for seconds, _ in path_runs)
    steps, journey_set = min(path_runs, key=lambda run: abs(run[0] - figures["flow_path_s"]))[1]
    figures.update(steps)
    figures["ratio"] = figures["peer_indexed_s"] / figures["flow_path_s"]
    journeys = journey_set.journeys
    figures.update(peer_rows=peer_rows, journey_rows=journeys.height)
    figures["conversions"] = journey_set.conversions_in_range.height

    def model() -> Any:
        return compute_ihc(journeys, settings.local_model, settings.api.redistribution_parameter)

    model()
    figures["model_s"] = statistics.median(_timed(model)[0] for _ in range(5))
    figures["model_sessions_per_s"] = journeys.height / figures["model_s"]
    return figures


# ---- parent: copies, child processes, the flow's log ----


def _disk_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # a file removed meanwhile
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _spawn(args: list[str], log: Path, env: dict[str, str], watch: Path | None) -> dict[str, Any]:
    """Run ``python ARGS`` to the end: wall time, peak RSS, peak disk use of ``watch``, and
    when (epoch s) the sampled RSS of the process itself and the disk use peaked."""
    started, clock = time.time(), time.perf_counter()
    rss = temp = (0, started)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = max(rss, (_rss_bytes(proc.pid), time.time()))
        if watch is not None:
            temp = max(temp, (_disk_bytes(watch), time.time()))
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited with {proc.returncode}:\n{text[-4000:]}")
    wall = time.perf_counter() - clock
    return {
        "started": started,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_temp_mb": temp[0] / 2**20,
        "log": text,
        "peaks_at": {"rss": rss[1], "temp": temp[1] if temp[0] else None},
    }


def _stage_times(
    text: str, started: float, ended: float, peaks_at: dict[str, float | None]
) -> dict[str, Any]:
    """Start-up, per-task and closing times from a flow log (see the module docstring), and
    the stage during which each of ``peaks_at`` happened."""
    day = datetime.fromtimestamp(started).date()
    figures: dict[str, Any] = {}
    finishes = []
    mark = begin = server = end = None
    for line in text.splitlines():
        match = _LOG.match(line)
        if match is None:
            continue
        h, m, s, ms = (int(part) for part in match.groups()[:4])
        at = datetime(day.year, day.month, day.day, h, m, s, ms * 1000).timestamp()
        at += 86400 if at < started - 60 else 0  # the run went past midnight
        task, message = match["task"], match["message"]
        if message.startswith("Starting temporary server"):
            server = at
        elif message.startswith("Beginning flow run"):
            begin = mark = at
        elif task and message.startswith("Finished in state"):
            figures[f"{task}_s"], mark = at - mark, at
            finishes.append((at, task))
        elif task == "prepare-database" and "index" in message:
            figures["index_logged_s"] = float(re.search(r"\(([\d.]+) s\)$", message)[1])
        elif not task and message.startswith("Finished in state"):
            end = at
    if begin is None or end is None:
        raise SystemExit(f"no flow run found in the log:\n{text[-4000:]}")
    figures["startup_s"] = begin - started
    figures["server_s"] = begin - server if server is not None else None
    figures["flow_tail_s"], figures["exit_s"] = end - mark, ended - end
    for what, at in peaks_at.items():
        during = [task for finish, task in finishes if at is not None and finish >= at]
        stage = None if at is None else "start-up" if at < begin else "tail/exit"
        figures[f"peak_{what}_stage"] = during[0] if during and at >= begin else stage
    return figures


def bench_scale(scale: float, source_dir: Path, work: Path, repeat: int) -> dict[str, Any]:
    source = source_dir / f"scale{scale:g}.db"
    if not source.is_file():
        source = work / f"generated-{scale:g}.db"
        if not source.is_file():
            args = ["-m", "tasks.sample_data", "--db", str(source), "--scale", str(scale)]
            subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    temp = work / "duckdb-tmp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IHC_", "ATTRIBUTION_"))}
    env.update(
        ATTRIBUTION_DATABASE__TEMP_DIR=str(temp),
        PYTHONUNBUFFERED="1",
        PREFECT_LOCAL_STORAGE_PATH=str(work / "results"),
    )
    figures: dict[str, Any] = {"scale": scale, "db_mb": source.stat().st_size / 2**20}
    copy = work / f"scale{scale:g}.db"
    shutil.copyfile(source, copy)
    child = ["-m", "tests.benchmarks", "--child", str(copy), "--repeat", str(repeat)]
    done = _spawn(child, work / "journeys.log", env, None)
    copy.unlink()
    figures["journeys"] = json.loads(done["log"].strip().splitlines()[-1])
    figures["journeys"]["child_peak_rss_mb"] = done["peak_rss_mb"]
    shutil.copyfile(source, copy)
    runs = {"full": [], "rerun": [], "day": ["--start-date", DAY, "--end-date", DAY, "--refresh"]}
    for label, extra in runs.items():
        args = [*FLOW, "--db", str(copy), "--output-dir", str(work / "out"), *extra]
        run = _spawn(args, work / f"flow-{label}.log", env, temp)
        ended = run["started"] + run["wall_s"]
        run.update(_stage_times(run.pop("log"), run["started"], ended, run.pop("peaks_at")))
        run["models_share"] = run.get(f"{MODELS}_s", 0.0) / run["wall_s"]
        figures[label] = run
    copy.unlink()
    return figures


def _print(f: dict[str, Any]) -> None:
    j = f["journeys"]
    print(
        f"\n== scale {f['scale']:g}: {f['db_mb']:,.0f} MB database, {j['conversions']:,} "
        f"conversions, {j['journey_rows']:,} journey rows =="
    )
    print(f"{'flow CLI run, --provider local':42s}{'full':>9s}{'rerun':>9s}{'1 day':>9s}")
    rows = [
        ("wall s", "wall_s"),
        ("peak RSS MB", "peak_rss_mb"),
        ("peak DuckDB temp MB", "peak_temp_mb"),
        ("Prefect start-up s", "startup_s"),
        ("  of which temporary server s", "server_s"),
        *((f"{stage} s", f"{stage}_s") for stage in STAGES),
        ("flow tail s (summary)", "flow_tail_s"),
        ("exit s (server stop)", "exit_s"),
        ("  index creation s (logged)", "index_logged_s"),
        ("models share of wall % (target <= 10)", "models_share"),
    ]
    for name, key in rows:
        values = [f[run].get(key) for run in ("full", "rerun", "day")]
        scale = 100 if key == "models_share" else 1
        cells = "".join(f"{v * scale:9.2f}" if v is not None else f"{'-':>9s}" for v in values)
        print(f"  {name:40s}{cells}")
    for what, name in (("rss", "RSS of the flow process"), ("temp", "DuckDB temp")):
        stages = ", ".join(
            f"{run} {f[run][f'peak_{what}_stage'] or '-'}" for run in ("full", "rerun", "day")
        )
        print(f"  peak {name} during: {stages}")
    print(f"journeys (one child, peak RSS {j['child_peak_rss_mb']:,.0f} MB)")
    print(f"  peer SQLite query, no index s           {j['peer_noindex_s']:9.2f}")
    print(f"  CREATE INDEX on user_id s               {j['index_s']:9.2f}")
    print(f"  peer SQLite query, indexed s            {j['peer_indexed_s']:9.2f}")
    print(
        f"  flow journey path s                     {j['flow_path_s']:9.2f}  (open "
        f"{j['open_s']:.2f} + conversions {j['conversions_s']:.2f} + lookup "
        f"{j['lookup_s']:.2f} + checks {j['checks_s']:.2f} + build {j['build_s']:.2f})"
    )
    print(f"  peer indexed / flow path                {j['ratio']:9.2f}  (target >= 1, aim 2)")
    same = "equal" if j["journey_rows"] == j["peer_rows"] else "DIFFERENT"
    print(f"  rows: journeys {j['journey_rows']:,}, peer {j['peer_rows']:,} ({same})")
    print(
        f"local model: compute_ihc {j['model_s']:.3f} s, median of 5: "
        f"{j['model_sessions_per_s'] / 1e6:.2f} M sessions/s (target >= 1 M/s at scale 10)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--scale100", action="store_true", help="add scale 100 (8.7 GB)")
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=Path("/work/bench"),
        help="where scale<S>.db are; missing ones are generated",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the work dir (default: tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="median of N for the journey path")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(journeys_child(args.child, args.repeat)))
        return 0
    scales = sorted({*args.scales, *([100.0] if args.scale100 else [])})
    with tempfile.TemporaryDirectory(prefix="attribution-bench-", dir=args.workdir) as tmp:
        for scale in scales:
            figures = bench_scale(scale, args.source_dir, Path(tmp), args.repeat)
            _print(figures)
            print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
