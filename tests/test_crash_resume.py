"""A pipeline process killed (SIGKILL) mid-API or mid-write, then run again, ends exactly
as a run that was never interrupted: same rows in the same order, nothing paid for twice
that was already received.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from subprocess import PIPE, Popen

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prefect.results import ResultRecord

from tasks.export import REPORT_CSV, REPORT_PARQUET, STALE_TEMPORARY_S, export_report
from tasks.ihc_server import ServerHandle
from tasks.sample_data import generate_sample_database
from tests.pipeline_process import (
    ROOT,
    PipelineProcess,
    output_tables,
    pipeline_env,
    run_pipeline,
    summary_counts,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

JOURNEYS_PER_REQUEST = 4
CONCURRENCY = 2
# Conversions up to this day are attributed by a first run, before the interrupted one.
FIRST_RANGE_END = "2023-09-02"


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 100 conversions: some 24 API requests of 4 journeys."""
    path = tmp_path_factory.mktemp("crash-source") / "challenge.db"
    generate_sample_database(path, scale=0.05, seed=11)
    return path


def copy_db(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def api_env(results_dir: Path, server: ServerHandle, key: str) -> dict[str, str]:
    return pipeline_env(
        results_dir,
        IHC_API_KEY=key,
        IHC_API_URL=server.url,
        ATTRIBUTION_API__MAX_JOURNEYS_PER_REQUEST=str(JOURNEYS_PER_REQUEST),
        ATTRIBUTION_API__CONCURRENCY=str(CONCURRENCY),
    )


def cli_args(db: Path, out: Path, *extra: str) -> list[str]:
    return ["--provider", "api", "--db", str(db), "--output-dir", str(out), *extra]


def cached_batches(results_dir: Path) -> list[list[str]]:
    """The conversions of each API answer kept in the batch cache (Prefect result storage)."""
    batches = []
    for entry in results_dir.glob("ihc-api-batch-*"):
        with contextlib.suppress(ValueError):  # an entry the kill cut short is no answer
            batches.append(ResultRecord.deserialize(entry.read_bytes()).result["conversion_id"])
    return batches


def cached_conversions(results_dir: Path) -> set[str]:
    return {conversion for batch in cached_batches(results_dir) for conversion in batch}


def sent(server: ServerHandle, since: int = 0) -> list[str]:
    return [c for record in server.stats.log[since:] for c in record.conversion_ids]


def answered(server: ServerHandle) -> set[str]:
    return {c for r in server.stats.log if r.outcome == "200" for c in r.conversion_ids}


def assert_same_outputs(db: Path, out: Path, clean_db: Path, clean_out: Path) -> None:
    assert output_tables(db) == output_tables(clean_db)
    assert (out / REPORT_CSV).read_bytes() == (clean_out / REPORT_CSV).read_bytes()
    assert_frame_equal(
        pl.read_parquet(out / REPORT_PARQUET), pl.read_parquet(clean_out / REPORT_PARQUET)
    )


def test_killed_during_the_api_step_the_rerun_completes_without_paying_twice(
    source_db: Path,
    tmp_path: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
) -> None:
    clean_server = ihc_server()
    clean_db, clean_out = copy_db(source_db, tmp_path / "clean" / "challenge.db"), tmp_path / "co"
    finished = run_pipeline(
        cli_args(clean_db, clean_out),
        api_env(tmp_path / "clean-results", clean_server, ihc_api_key),
        tmp_path / "clean.log",
    )
    assert finished.returncode == 0, finished.output
    everything = {row[0] for row in output_tables(clean_db)["attribution_customer_journey"]}
    batches = summary_counts(finished.output)["batches"]
    assert batches >= 20

    # The same database, a slow API: each request takes 0.3 s, the API step several seconds.
    server = ihc_server(latency_ms=300)
    db, out = copy_db(source_db, tmp_path / "db" / "challenge.db"), tmp_path / "o"
    results = tmp_path / "results"
    env = api_env(results, server, ihc_api_key)
    with PipelineProcess(cli_args(db, out), env, tmp_path / "killed.log") as run:
        wait_until(
            lambda: sum(r.outcome == "200" for r in server.stats.log) >= 6,
            timeout=90,
            what="six answered API requests",
            while_running=run,
        )
        killed = run.kill()
    assert killed.returncode == -9
    received = answered(server)
    assert len(received) < len(everything), "the kill came too late: the API step had ended"
    # Results are written in one transaction after the API step: nothing was written.
    assert output_tables(db) == {"attribution_customer_journey": [], "channel_reporting": []}
    assert not (out / REPORT_CSV).exists()
    cached = cached_conversions(results)
    kept_batches = len(cached_batches(results))
    # The answers that reached the client were kept in the batch cache as they arrived.
    assert cached and cached <= received
    # Lost: answers sent but not read or not yet stored when the kill came, a few per worker.
    lost_in_flight = received - cached
    assert len(lost_in_flight) <= 2 * CONCURRENCY * JOURNEYS_PER_REQUEST

    before_rerun = len(server.stats.log)
    rerun = run_pipeline(cli_args(db, out), env, tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.output
    resent = sent(server, before_rerun)
    # Exactly the conversions whose answers were not kept are asked for, each once.
    assert sorted(resent) == sorted(everything - cached)
    counts = summary_counts(rerun.output)
    assert counts["cache_hits"] == kept_batches
    assert counts["requests"] == batches - kept_batches
    assert counts["attributed"] == len(everything)
    assert_same_outputs(db, out, clean_db, clean_out)


def journal_of(db: Path) -> Path:
    return db.with_name(db.name + "-journal")


JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def journal_header(journal: Path) -> bytes:
    try:
        with journal.open("rb") as handle:
            return handle.read(8)
    except FileNotFoundError:
        return b""


def kill_during_write(run: PipelineProcess, journal: Path, moment: str) -> bytes | None:
    """SIGKILL the run at ``moment`` of its write transaction; the journal's header after.

    SQLite (rollback journal, synchronous FULL) first copies the pages it will change
    into ``<db>-journal``, its header's magic still zero: "started" kills then. At commit
    it syncs the journal, writes the magic, writes the changed pages into the database
    file and deletes the journal: "committing" kills once the magic is there, "writing"
    once the database file has changed too. None when the journal was gone: the commit
    had finished.
    """
    db = journal.with_name(journal.name.removesuffix("-journal"))
    untouched = db.stat().st_mtime_ns

    def reached() -> bool:
        header = journal_header(journal)
        if moment == "started":
            return len(header) == 8
        if moment == "committing":
            return header == JOURNAL_MAGIC
        return header == JOURNAL_MAGIC and db.stat().st_mtime_ns != untouched

    deadline = time.monotonic() + 120
    while not reached():
        if not run.running():
            raise AssertionError(f"the run ended without writing:\n{run.log.read_text()}")
        if time.monotonic() > deadline:
            run.kill()
            raise AssertionError("no write transaction within 120 s")
    run.kill()
    return journal_header(journal) if journal.exists() else None


def test_killed_during_the_database_write_sqlite_rolls_back_and_the_rerun_completes(
    source_db: Path,
    tmp_path: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
) -> None:
    server = ihc_server()
    clean_db, clean_out = copy_db(source_db, tmp_path / "clean" / "challenge.db"), tmp_path / "co"
    clean_env = api_env(tmp_path / "clean-results", server, ihc_api_key)
    for args in (("--end-date", FIRST_RANGE_END), ()):
        finished = run_pipeline(cli_args(clean_db, clean_out, *args), clean_env, tmp_path / "c.log")
        assert finished.returncode == 0, finished.output

    # A first run attributes part of the data; the second is killed inside its write.
    first_db = copy_db(source_db, tmp_path / "first" / "challenge.db")
    env = api_env(tmp_path / "results", server, ihc_api_key)
    out = tmp_path / "o"
    finished = run_pipeline(
        cli_args(first_db, out, "--end-date", FIRST_RANGE_END), env, tmp_path / "first.log"
    )
    assert finished.returncode == 0, finished.output
    before = output_tables(first_db)
    assert before["attribution_customer_journey"] and before["channel_reporting"]

    landed: dict[str, Path] = {}
    moments = ["started", "committing", "writing"]
    # A kill aimed at one moment may land at a later one (the commit goes on until the
    # signal arrives): aim again at the moments not hit yet.
    for attempt in range(12):
        missing = [moment for moment in moments if moment not in landed]
        if not missing:
            break
        moment = missing[0]
        db = copy_db(first_db, tmp_path / f"attempt{attempt}" / "challenge.db")
        journal = journal_of(db)
        with PipelineProcess(cli_args(db, out), env, tmp_path / f"killed{attempt}.log") as run:
            header = kill_during_write(run, journal, moment)
        half_written = db.read_bytes() != first_db.read_bytes()
        con = sqlite3.connect(db)
        try:
            # The first reader rolls a hot journal back; the file is sound afterwards.
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            con.close()
        tables = output_tables(db)
        if header is None:
            # The commit was done before the kill arrived: all of it is there.
            assert tables == output_tables(clean_db)
            continue
        assert tables == before, f"a write killed when {moment} left part of its changes"
        if header == JOURNAL_MAGIC:
            assert not journal.exists(), "the hot journal was not rolled back"
        else:
            # SQLite writes no page into the file before the journal is synced.
            assert not half_written
        kind = "writing" if half_written else "committing" if header == JOURNAL_MAGIC else "started"
        landed.setdefault(kind, db)
    assert set(landed) == set(moments), f"kills landed: {set(landed)}"

    db = landed["writing"]
    before_rerun = len(server.stats.log)
    rerun = run_pipeline(cli_args(db, out), env, tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.output
    # The killed run had every answer already: the rerun takes them all from the cache.
    assert len(server.stats.log) == before_rerun
    counts = summary_counts(rerun.output)
    assert counts["requests"] == 0
    assert counts["cache_hits"] == counts["batches"] > 0
    assert_same_outputs(db, out, clean_db, clean_out)


# ---- a kill while the report files are being written ------------------------------------

WRITER = """
import sys
from pathlib import Path

import polars as pl

from tasks.export import REPORT_CSV, export_report

mode, out, *sources = sys.argv[1:]
reports = [pl.read_parquet(source) for source in sources]
print("ready", flush=True)
for turn in range(1_000):
    report = reports[turn % 2]
    if mode == "atomic":
        export_report(report, Path(out))
    else:
        report.write_csv(Path(out) / REPORT_CSV, date_format="%Y-%m-%d")
"""


def big_report(rows: int, shift: float) -> pl.DataFrame:
    """A channel report of ``rows`` rows (20 MB of CSV); ``shift`` makes versions differ."""
    index = pl.int_range(rows)
    return pl.select(
        channel_name=pl.format("channel {}", index % 40),
        date=pl.lit(date(2023, 1, 1)) + pl.duration(days=index // 40),
        cost=index * 0.37 + shift,
        ihc=index / 7 + shift,
        ihc_revenue=index * 1.13 + shift,
        cpo=pl.when(index % 5 > 0).then(index * 0.05 + shift),
        roas=pl.when(index % 7 > 0).then(index * 0.02 + shift),
    )


@contextlib.contextmanager
def writer_process(mode: str, out: Path, sources: list[Path], log: Path) -> Iterator[Popen]:
    """The writer loop in its own process, SIGKILLed when the block ends."""
    with log.open("wb") as sink:
        writer = Popen(
            [sys.executable, "-c", WRITER, mode, str(out), *map(str, sources)],
            cwd=ROOT,
            stdout=PIPE,
            stderr=sink,
        )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n", log.read_text()
        yield writer
    finally:
        writer.kill()
        writer.wait(timeout=30)


def poll_until(condition: Callable[[], bool], writer: Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert writer.poll() is None, "the writer stopped before the moment to kill it"
        assert time.monotonic() < deadline, f"no such moment within {timeout:.0f} s"


def temporary_files(out: Path) -> list[Path]:
    return list(out.glob(".channel_reporting.*.tmp"))


def a_temporary_file_has_data(out: Path) -> bool:
    for path in temporary_files(out):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size > 0:
                return True
    return False


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two versions of a large report, as Parquet inputs and as the expected CSV bytes."""
    folder = tmp_path_factory.mktemp("reports")
    versions = {"old": big_report(300_000, 0.0), "new": big_report(300_000, 0.5)}
    sources, csv_bytes = [], {}
    for name, frame in versions.items():
        sources.append(folder / f"{name}.parquet")
        frame.write_parquet(sources[-1])
        export_report(frame, folder / name)
        csv_bytes[name] = (folder / name / REPORT_CSV).read_bytes()
    return {"frames": versions, "sources": sources, "csv": csv_bytes}


def report_version(out: Path, two_reports: dict) -> str | None:
    """ "old" or "new" when both files hold that whole version; None otherwise."""
    csv = (out / REPORT_CSV).read_bytes()
    matches = [name for name, expected in two_reports["csv"].items() if csv == expected]
    if not matches:
        return None
    try:
        parquet = pl.read_parquet(out / REPORT_PARQUET)
    except Exception:
        return None
    frames = two_reports["frames"]
    if not any(parquet.equals(frames[name]) for name in frames):
        return None
    return matches[0]


def test_a_kill_during_export_leaves_the_previous_report_or_the_new_one(
    tmp_path: Path, two_reports: dict
) -> None:
    out = tmp_path / "output"
    export_report(two_reports["frames"]["old"], out)
    rng = random.Random(5)
    for attempt in range(8):
        # The writer writes the new version, then the old, then the new… without a pause.
        sources = two_reports["sources"][::-1]
        with writer_process("atomic", out, sources, tmp_path / "writer.log") as writer:
            time.sleep(rng.uniform(0, 0.6))
            # Once a temporary file has data in it, kill at a random moment soon after.
            poll_until(lambda: a_temporary_file_has_data(out), writer, timeout=60)
            time.sleep(rng.uniform(0, 0.03))
        assert report_version(out, two_reports), f"kill {attempt} left a broken report"
    # The kills did land in the middle of writes: half-written temporary files are left.
    leftovers = temporary_files(out)
    assert leftovers
    assert {p.name for p in out.iterdir()} - {p.name for p in leftovers} == {
        REPORT_CSV,
        REPORT_PARQUET,
    }
    # The next export removes them once they are stale, and leaves a recent one (a
    # writer still at work) alone.
    an_hour_ago = time.time() - STALE_TEMPORARY_S - 1
    for leftover in leftovers:
        os.utime(leftover, (an_hour_ago, an_hour_ago))
    at_work = out / ".channel_reporting.csv.at-work.tmp"
    at_work.write_bytes(b"channel_name")
    export_report(two_reports["frames"]["new"], out)
    assert temporary_files(out) == [at_work]
    assert report_version(out, two_reports) == "new"


def test_the_check_above_does_catch_a_half_written_file(tmp_path: Path, two_reports: dict) -> None:
    """Control: the same kill of a plain (non-atomic) write does leave a truncated report."""
    out = tmp_path / "output"
    export_report(two_reports["frames"]["old"], out)
    whole = {len(body) for body in two_reports["csv"].values()}
    broken = []
    for _ in range(5):
        with writer_process("direct", out, two_reports["sources"], tmp_path / "w.log") as writer:
            poll_until(lambda: 0 < (out / REPORT_CSV).stat().st_size not in whole, writer, 60)
        broken.append(report_version(out, two_reports) is None)
        if broken[-1]:
            break
    assert any(broken)
