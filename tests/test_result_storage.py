"""Result storage stays bounded: runs add nothing to it but the IHC API's new answers.

The flow's tasks cache nothing (``NO_CACHE``); the only entries it writes are the API
client's batch cache (``ResultStoreBatchCache``), one per batch the API answered. Each
test points Prefect's result storage (``results.local_storage_path``, the setting behind
``PREFECT_LOCAL_STORAGE_PATH``) at a folder of its own and runs the flow in-process,
repeatedly, on a small sample database.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from flows.attribution import attribution_flow
from tasks.ihc_server import ServerHandle
from tasks.sample_data import generate_sample_database

DAY = "2023-09-07"


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("storage-sample") / "template.db"
    generate_sample_database(path, scale=0.02, seed=17)
    return path


@pytest.fixture
def db(sample_db: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "challenge.db"
    copy.write_bytes(sample_db.read_bytes())
    return copy


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Path]:
    """The result storage of the test's runs (created by Prefect on its first write)."""
    folder = tmp_path / "results"
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: folder}):
        yield folder


def stored(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` and its size."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_local_provider_stores_nothing(db: Path, tmp_path: Path, storage: Path) -> None:
    out = str(tmp_path / "out")
    runs = [
        attribution_flow(db_path=str(db), output_dir=out, provider="local"),
        attribution_flow(db_path=str(db), output_dir=out, provider="local"),
        attribution_flow(db_path=str(db), output_dir=out, provider="local", refresh=True),
    ]
    assert runs[0]["attributed_conversions"] > 0
    assert runs[1]["sent_conversions"] == 0
    assert runs[2]["sent_conversions"] == runs[0]["sent_conversions"]
    assert stored(storage) == {}


def test_api_provider_stores_one_entry_per_new_answer(
    db: Path,
    tmp_path: Path,
    storage: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = ihc_server()
    monkeypatch.setenv("IHC_API_URL", server.url)
    monkeypatch.setenv("IHC_API_KEY", ihc_api_key)
    # Several batches even on a small database.
    monkeypatch.setenv("ATTRIBUTION_API__MAX_JOURNEYS_PER_REQUEST", "10")
    out = str(tmp_path / "out")

    def run(**options: object) -> tuple[dict[str, object], int, dict[str, int]]:
        before_requests, before = server.stats.requests, stored(storage)
        summary = attribution_flow(db_path=str(db), output_dir=out, provider="api", **options)
        after = stored(storage)
        # Entries are written once and never rewritten.
        kept = before.keys() & after.keys()
        assert {name: after[name] for name in kept} == {name: before[name] for name in kept}
        return summary, server.stats.requests - before_requests, after

    # First run: one entry per batch, all of them answered by the server.
    first, requests, entries = run()
    assert first["sent_conversions"] > 0 and first["failed_conversions"] == 0
    assert first["retries"] == 0 and first["cache_hits"] == 0
    assert requests == first["requests"] > 1
    assert len(entries) == requests
    assert all(name.startswith("ihc-api-batch-") for name in entries)

    # Rerun: everything is attributed already, nothing is sent, nothing stored.
    rerun, requests, after = run()
    assert rerun["sent_conversions"] == 0 and requests == 0
    assert after == entries

    # Refresh: the same journeys in the same batches, identical bodies: all cache hits.
    refresh, requests, after = run(refresh=True)
    assert refresh["sent_conversions"] == first["sent_conversions"]
    assert refresh["cache_hits"] == len(entries) and requests == 0
    assert after == entries

    # A one-day refresh packs other batches: new answers, one new entry each.
    day, requests, after = run(refresh=True, start_date=DAY, end_date=DAY)
    assert day["sent_conversions"] > 0 and day["retries"] == 0
    assert requests == day["requests"] > 0
    assert len(after) == len(entries) + requests
    requests_day = requests

    # Answers older than the cache's 7 days are deleted by the next API run, not kept.
    old = time.time() - 8 * 86_400
    for name in entries:
        os.utime(storage / name, (old, old))
    again, requests, after = run()
    assert again["sent_conversions"] == 0 and requests == 0
    assert not set(after) & set(entries)
    assert len(after) == requests_day
