"""API faults soak: about 2,000 conversions against a server that fails often, rerun until
every conversion is attributed, exactly once, with the server's values.
"""

from __future__ import annotations

import csv
import gc
import logging
import shutil
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from config.settings import ApiSettings
from tasks.export import FAILED_CSV
from tasks.ihc_client import attribute_journeys
from tasks.ihc_server import ServerHandle
from tasks.journeys import build_journeys
from tasks.local_model import compute_ihc
from tasks.sample_data import generate_sample_database
from tasks.sources import read_sources
from tests.helpers import ihc_server_process, table_rows
from tests.pipeline_process import pipeline_env, run_pipeline, summary_counts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

FAULTS = {
    "rate_500": 0.05,
    "rate_503": 0.05,
    "rate_429": 0.05,
    "drop_rate": 0.02,
    "partial_failure_rate": 0.05,
    "wrong_sums_rate": 0.01,
}
RETRIED = ("429", "500", "503", "drop")
MAX_RETRIES = 5
MAX_RUNS = 8


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scale 1: 450,616 sessions, 1,940 conversions with a journey."""
    path = tmp_path_factory.mktemp("soak-source") / "challenge.db"
    generate_sample_database(path, scale=1.0, seed=42)
    return path


def failed_ids(out: Path) -> set[str]:
    path = out / FAILED_CSV
    if not path.exists():
        return set()
    with path.open(newline="") as handle:
        return {row["conversion_id"] for row in csv.DictReader(handle)}


def test_every_conversion_ends_attributed_once_with_the_servers_values(
    source_db: Path,
    tmp_path: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
) -> None:
    db = tmp_path / "challenge.db"
    shutil.copyfile(source_db, db)
    out = tmp_path / "out"
    server = ihc_server(seed=7, retry_after="1", **FAULTS)
    env = pipeline_env(
        tmp_path / "results",
        IHC_API_KEY=ihc_api_key,
        IHC_API_URL=server.url,
        ATTRIBUTION_API__MAX_JOURNEYS_PER_REQUEST="20",
        ATTRIBUTION_API__CONCURRENCY="4",
        ATTRIBUTION_API__MAX_RETRIES=str(MAX_RETRIES),
        ATTRIBUTION_API__BACKOFF_BASE_S="0.01",
        ATTRIBUTION_API__BACKOFF_MAX_S="1",
    )
    sources = read_sources(db, None, None)
    journeys = build_journeys(sources.sessions, sources.conversions).journeys
    everything = set(journeys["conversion_id"])
    assert len(everything) == 1940

    to_send = everything
    attributed = 0
    peak_rss_kib: list[int] = []
    seen: defaultdict[str, int] = defaultdict(int)
    for number in range(MAX_RUNS):
        start = len(server.stats.log)
        server.stats.partial_failures.clear()
        server.stats.wrong_sums.clear()
        finished = run_pipeline(
            ["--provider", "api", "--db", str(db), "--output-dir", str(out)],
            env,
            tmp_path / f"run{number}.log",
        )
        records = server.stats.log[start:]
        counts = summary_counts(finished.output)
        peak_rss_kib.append(finished.max_rss_kib)

        # Each attempt of a batch carries the same conversions; a batch that got no answer
        # in 1 + max_retries attempts gave up, and its last fault was not retried.
        attempts = defaultdict(list)
        for record in records:
            attempts[tuple(record.conversion_ids)].append(record.outcome)
            seen[record.outcome] += 1
        faulted = sum(record.outcome in RETRIED for record in records)
        gave_up = [
            batch
            for batch, outcomes in attempts.items()
            if len(outcomes) == MAX_RETRIES + 1 and all(o in RETRIED for o in outcomes)
        ]
        expected_failed = (
            set(server.stats.partial_failures)
            | server.stats.wrong_sums
            | {c for batch in gave_up for c in batch}
        )
        seen["partial_failures"] += len(server.stats.partial_failures)
        seen["wrong_sums"] += len(server.stats.wrong_sums)

        # Only what is not attributed yet is sent: everything first, then what failed.
        assert {c for r in records for c in r.conversion_ids} == to_send
        assert counts["sent"] == len(to_send)
        # The summary counts what the server saw.
        assert counts["requests"] == len(records)
        assert counts["retries"] == faulted - len(gave_up)
        assert counts["failed"] == len(expected_failed)
        assert failed_ids(out) == expected_failed
        assert counts["attributed"] == len(to_send) - len(expected_failed)
        attributed += counts["attributed"]
        if not expected_failed:
            assert finished.returncode == 0, finished.output
            break
        assert finished.returncode == 1, finished.output
        to_send = expected_failed
    else:
        pytest.fail(f"conversions still failing after {MAX_RUNS} runs")

    # The faults did happen.
    for kind in (*RETRIED, "partial_failures", "wrong_sums"):
        assert seen[kind] > 0, kind
    assert attributed == len(everything)
    # Exactly the server's values: the local model over all journeys at once.
    expected = (
        compute_ihc(journeys)
        .select(pl.col("conversion_id").alias("conv_id"), "session_id", "ihc")
        .sort("conv_id", "session_id")
        .rows()
    )
    assert sorted(table_rows(db, "attribution_customer_journey")) == expected
    # Memory stays flat: no rerun grows past the first (full) run.
    assert max(peak_rss_kib[1:]) < peak_rss_kib[0] * 1.2, peak_rss_kib
    assert peak_rss_kib[0] < 1.5 * 1024 * 1024, peak_rss_kib


@pytest.fixture
def faulty_server_process(tmp_path: Path, ihc_api_key: str) -> Iterator[str]:
    """The IHC server with the soak's faults in its own process, so its growing request
    log is not counted in this process's memory. Yields its base URL."""
    flags = [f"--{name.replace('_', '-')}={rate}" for name, rate in FAULTS.items()]
    with ihc_server_process(ihc_api_key, "--seed=3", "--retry-after=0", *flags) as url:
        yield url


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_the_api_client_does_not_grow_over_repeated_faulty_runs(
    source_db: Path, faulty_server_process: str, ihc_api_key: str
) -> None:
    sources = read_sources(source_db, None, None)
    journeys = build_journeys(sources.sessions, sources.conversions).journeys
    settings = ApiSettings(
        base_url=faulty_server_process,
        max_journeys_per_request=20,
        concurrency=4,
        max_retries=MAX_RETRIES,
        backoff_base_s=0.01,
        backoff_max_s=1.0,
    )
    quiet = logging.getLogger("soak-quiet")
    quiet.disabled = True
    traced, resident = [], []
    tracemalloc.start()
    try:
        for _ in range(6):
            outcome = attribute_journeys(journeys, settings, ihc_api_key, log=quiet)
            assert outcome.stats.retries > 0 and outcome.failed.height > 0
            assert outcome.results["conversion_id"].n_unique() + outcome.failed.height == 1940
            del outcome
            # The run keeps the GC off older objects while it lasts, and only then.
            assert gc.get_freeze_count() == 0
            gc.collect()
            traced.append(tracemalloc.get_traced_memory()[0])
            resident.append(rss_kib())
    finally:
        tracemalloc.stop()
    # The first round warms caches and pools; after it, nothing accumulates.
    assert max(traced[2:]) - traced[1] < 256 * 1024, traced
    assert max(resident[2:]) - resident[1] < 32 * 1024, resident
