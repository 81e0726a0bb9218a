"""Two things at once on one database: a second run refuses (or waits), a reader holding
the file makes the commit fail cleanly; the data stays what one clean run leaves.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks.db import prepare_database
from tasks.ihc_server import ServerHandle
from tasks.sample_data import generate_sample_database
from tests.helpers import ORIGINAL_SCHEMA
from tests.pipeline_process import (
    PipelineProcess,
    output_tables,
    pipeline_env,
    run_pipeline,
    summary_counts,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("concurrency-source") / "challenge.db"
    generate_sample_database(path, scale=0.05, seed=23)
    return path


@pytest.fixture(scope="module")
def clean_tables(source_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tables one uninterrupted run leaves (the local model, as the API server uses)."""
    folder = tmp_path_factory.mktemp("concurrency-clean")
    db = folder / "challenge.db"
    shutil.copyfile(source_db, db)
    finished = run_pipeline(
        ["--provider", "local", "--db", str(db), "--output-dir", str(folder / "out")],
        pipeline_env(folder / "results"),
        folder / "clean.log",
    )
    assert finished.returncode == 0, finished.output
    return output_tables(db)


def slow_api_env(tmp_path: Path, server: ServerHandle, key: str, **extra: str) -> dict:
    """Batches of 4 journeys, one at a time: with 0.35 s a request the API step takes 8 s."""
    return pipeline_env(
        tmp_path / "results",
        IHC_API_KEY=key,
        IHC_API_URL=server.url,
        ATTRIBUTION_API__MAX_JOURNEYS_PER_REQUEST="4",
        ATTRIBUTION_API__CONCURRENCY="1",
        **extra,
    )


@contextlib.contextmanager
def two_runs(
    db: Path, tmp_path: Path, env: dict[str, str], server: ServerHandle
) -> Iterator[tuple[PipelineProcess, PipelineProcess]]:
    """A run, and a second one on the same database once the first is in its API step."""
    args = ["--provider", "api", "--db", str(db), "--output-dir", str(tmp_path / "out")]
    with PipelineProcess(args, env, tmp_path / "first.log") as first:
        wait_until(
            lambda: len(server.stats.log) >= 1,
            timeout=120,
            what="the first run's first API request",
            while_running=first,
        )
        with PipelineProcess(args, env, tmp_path / "second.log") as second:
            yield first, second


def test_a_second_run_on_the_same_database_refuses_with_a_clear_message(
    source_db: Path,
    clean_tables: dict,
    tmp_path: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
) -> None:
    server = ihc_server(latency_ms=350)
    db = tmp_path / "challenge.db"
    shutil.copyfile(source_db, db)
    with two_runs(db, tmp_path, slow_api_env(tmp_path, server, ihc_api_key), server) as runs:
        first, second = runs
        refused = second.wait(timeout=120)
        assert first.running(), "the first run ended before the second was refused: no overlap"
        finished = first.wait()
    assert refused.returncode == 2
    assert refused.output.strip().splitlines()[-1] == (
        f"attribution: another attribution run is using {db} (lock {db}.lock); "
        "wait for it to finish or raise database.lock_timeout_s"
    )
    assert finished.returncode == 0, finished.output
    # The refused run sent nothing: every request came from the first, each batch once.
    counts = summary_counts(finished.output)
    assert len(server.stats.log) == counts["requests"] == counts["batches"]
    assert output_tables(db) == clean_tables


def test_with_a_lock_timeout_the_second_run_waits_then_finds_everything_done(
    source_db: Path,
    clean_tables: dict,
    tmp_path: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
) -> None:
    server = ihc_server(latency_ms=350)
    db = tmp_path / "challenge.db"
    shutil.copyfile(source_db, db)
    env = slow_api_env(tmp_path, server, ihc_api_key, ATTRIBUTION_DATABASE__LOCK_TIMEOUT_S="120")
    with two_runs(db, tmp_path, env, server) as (first, second):
        finished = first.wait()
        waited = second.wait()
    assert finished.returncode == 0, finished.output
    assert waited.returncode == 0, waited.output
    # It said whom it waited for, and took the lock only after the first let go of it.
    first_run = re.search(r"Beginning flow run '([^']+)'", finished.output)
    assert first_run, finished.output
    assert f"run '{first_run[1]}' is using {db}: waiting up to 120 s" in waited.output
    took = re.search(r"Took the lock on .+ after ([\d.]+) s", waited.output)
    assert took and float(took[1]) > 0.5, waited.output
    counts = summary_counts(waited.output)
    assert counts["sent"] == 0 and counts["requests"] == 0
    assert len(server.stats.log) == summary_counts(finished.output)["requests"]
    assert output_tables(db) == clean_tables


def test_a_reader_holding_the_database_fails_the_commit_cleanly_and_the_rerun_completes(
    source_db: Path, clean_tables: dict, tmp_path: Path
) -> None:
    db = tmp_path / "challenge.db"
    shutil.copyfile(source_db, db)
    prepare_database(db, ORIGINAL_SCHEMA)
    args = ["--provider", "local", "--db", str(db), "--output-dir", str(tmp_path / "out")]
    env = pipeline_env(tmp_path / "results")

    # Someone reads the database in a long transaction: SQLite cannot commit a write meanwhile.
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM conversions").fetchone()
        started = time.monotonic()
        blocked = run_pipeline(args, env, tmp_path / "blocked.log")
        elapsed = time.monotonic() - started
        assert output_tables(db) == {"attribution_customer_journey": [], "channel_reporting": []}
    finally:
        reader.close()
    assert blocked.returncode == 2
    last = blocked.output.strip().splitlines()[-1]
    assert last == (
        f"attribution: cannot write to {db}: another program holds it in a transaction "
        "(SQLite: database is locked); nothing was written, run again when it is done"
    ), last
    assert elapsed < 60

    rerun = run_pipeline(args, env, tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.output
    assert output_tables(db) == clean_tables
