"""The flow through the IHC API: real HTTP to the project's IHC-compatible server."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from config.errors import AttributionRunError
from flows.attribution import attribution_flow
from flows.cli import main
from tasks.ihc_server import ServerHandle
from tasks.sample_data import generate_sample_database
from tests.helpers import table_rows

TABLES = ("attribution_customer_journey", "channel_reporting")


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api-sample") / "challenge.db"
    generate_sample_database(path, scale=0.05, seed=11)
    return path


@pytest.fixture
def api_env(
    monkeypatch: pytest.MonkeyPatch, ihc_server: Callable[..., ServerHandle], ihc_api_key: str
) -> Callable[..., ServerHandle]:
    def start(**options: object) -> ServerHandle:
        server = ihc_server(**options)
        monkeypatch.setenv("IHC_API_URL", server.url)
        monkeypatch.setenv("IHC_API_KEY", ihc_api_key)
        monkeypatch.setenv("ATTRIBUTION_API__BACKOFF_BASE_S", "0.01")
        monkeypatch.setenv("ATTRIBUTION_API__BACKOFF_MAX_S", "0.2")
        return server

    return start


def test_api_provider_writes_the_same_tables_as_the_local_model(
    sample_db: Path, tmp_path: Path, api_env: Callable[..., ServerHandle]
) -> None:
    local_db, api_db = tmp_path / "local.db", tmp_path / "api.db"
    shutil.copy(sample_db, local_db)
    shutil.copy(sample_db, api_db)
    attribution_flow(db_path=str(local_db), output_dir=str(tmp_path / "lo"), provider="local")
    server = api_env(max_sessions=200)
    summary = attribution_flow(db_path=str(api_db), output_dir=str(tmp_path / "ao"))
    assert summary["provider"] == "api"  # auto picks the API once a key is configured
    assert summary["requests"] == server.stats.requests > 0
    assert max(server.stats.sessions_per_request) <= 200
    for table in TABLES:
        assert table_rows(api_db, table) == table_rows(local_db, table)
    assert (tmp_path / "ao" / "channel_reporting.csv").read_bytes() == (
        tmp_path / "lo" / "channel_reporting.csv"
    ).read_bytes()

    again = attribution_flow(db_path=str(api_db), output_dir=str(tmp_path / "ao"))
    assert again["sent_conversions"] == 0
    assert server.stats.requests == summary["requests"]


def test_partial_failures_fail_the_run_and_the_next_run_completes_the_rest(
    sample_db: Path, tmp_path: Path, api_env: Callable[..., ServerHandle]
) -> None:
    db = tmp_path / "partial.db"
    shutil.copy(sample_db, db)
    api_env(partial_failure_rate=0.3, seed=5)
    state = attribution_flow(db_path=str(db), output_dir=str(tmp_path / "o"), return_state=True)
    assert state.is_failed()
    with pytest.raises(AttributionRunError, match=r"conversion\(s\) failed"):
        state.result()
    failed_file = tmp_path / "o" / "failed_conversions.csv"
    failed_ids = [line.split(",")[0] for line in failed_file.read_text().splitlines()[1:]]
    assert failed_ids
    # The run's summary says so, with a link to the file.
    with get_client(sync_client=True) as client:
        (summary,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["attribution-run-summary"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert (
        f"> **The run failed**: {len(failed_ids):,} conversion(s) could not be attributed; "
        f"they are listed in [failed_conversions.csv]({failed_file.resolve().as_uri()})"
    ) in summary.data
    attributed = {row[0] for row in table_rows(db, "attribution_customer_journey")}
    assert attributed.isdisjoint(failed_ids)

    for _ in range(10):
        try:
            attribution_flow(db_path=str(db), output_dir=str(tmp_path / "o"))
            break
        except AttributionRunError:
            continue
    attributed = {row[0] for row in table_rows(db, "attribution_customer_journey")}
    assert set(failed_ids) <= attributed
    assert not failed_file.exists()


def test_the_log_says_how_many_requests_were_retried_and_why(
    sample_db: Path,
    tmp_path: Path,
    api_env: Callable[..., ServerHandle],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "retried.db"
    shutil.copy(sample_db, db)
    server = api_env(script=("503",))  # every request's first attempt: 503
    summary = attribution_flow(db_path=str(db), output_dir=str(tmp_path / "o"))
    batches = server.stats.requests // 2
    assert summary["retries"] == batches > 0
    assert (
        f"{2 * batches} requests, {batches} retries (http_503: {batches}), 0 cache hits"
        in caplog.text
    )


def test_rejected_key_stops_the_run_without_showing_it(
    sample_db: Path,
    tmp_path: Path,
    api_env: Callable[..., ServerHandle],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = tmp_path / "key.db"
    shutil.copy(sample_db, db)
    api_env()
    wrong = "wrong-key-0123456789abcdef"
    monkeypatch.setenv("IHC_API_KEY", wrong)
    code = main(["--db", str(db), "--output-dir", str(tmp_path / "o"), "--provider", "api"])
    captured = capsys.readouterr()
    assert code == 1
    assert "rejected the API key" in captured.err
    assert wrong not in captured.err + captured.out
    # A known failure: one line from the flow, no traceback from the task that raised it.
    assert "Traceback" not in captured.err + captured.out + caplog.text
    assert table_rows(db, "attribution_customer_journey") == []


def test_api_provider_without_a_key_fails_at_once(
    sample_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("IHC_API_KEY", raising=False)
    code = main(["--db", str(sample_db), "--output-dir", str(tmp_path / "o"), "--provider", "api"])
    assert code == 2
    assert "provider 'api' needs an API key" in capsys.readouterr().err
