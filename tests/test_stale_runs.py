"""A run killed with SIGKILL does not stay "Running": it ends Crashed (flows/runs.py).

A command-line run has no worker watching its process, so nothing reports its end when it
is killed. Against a real ``prefect server start`` (the fixture of test_deployments):
the next run on the same database marks it Crashed, and without a next run the heartbeat
automation does.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.runs import FLOW_NAME, ensure_zombie_automation, zombie_automation
from tasks.ihc_server import ServerHandle
from tasks.sample_data import generate_sample_database
from tests.pipeline_process import PipelineProcess, run_pipeline, wait_until
from tests.test_deployments import client, server  # noqa: F401  (fixtures: a real server)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 100 conversions: some 25 API requests of 4 journeys."""
    path = tmp_path_factory.mktemp("stale-source") / "challenge.db"
    generate_sample_database(path, scale=0.05, seed=11)
    return path


@dataclass
class Setup:
    db: Path
    out: Path
    env: dict[str, str]
    api: ServerHandle  # the local IHC API the runs use

    def args(self) -> list[str]:
        return ["--provider", "api", "--db", str(self.db), "--output-dir", str(self.out)]


@pytest.fixture
def setup(
    server: dict[str, str],  # noqa: F811
    source_db: Path,
    ihc_server: Callable[..., ServerHandle],
    ihc_api_key: str,
    tmp_path: Path,
) -> Setup:
    """A copy of the database; command-line runs reporting to the test server and using
    an IHC API that answers 4 journeys in 0.3 s, one request at a time (about 8 s).
    """
    db = tmp_path / "challenge.db"
    shutil.copyfile(source_db, db)
    api = ihc_server(latency_ms=300)
    env = {k: v for k, v in server.items() if not k.startswith(("IHC_", "ATTRIBUTION_"))}
    env |= {
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PYTHONUNBUFFERED": "1",
        "IHC_API_KEY": ihc_api_key,
        "IHC_API_URL": api.url,
        "ATTRIBUTION_API__MAX_JOURNEYS_PER_REQUEST": "4",
        "ATTRIBUTION_API__CONCURRENCY": "1",
    }
    return Setup(db, tmp_path / "report", env, api)


def running_run_on(api: SyncPrefectClient, db: Path) -> FlowRun | None:
    """The run of the flow on ``db`` that the server shows as Running."""
    runs = api.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
        ),
    )
    on_db = [run for run in runs if run.parameters.get("db_path") == str(db)]
    return on_db[0] if on_db else None


def start_and_kill(
    setup: Setup, api: SyncPrefectClient, log: Path, kill_when: Callable[[FlowRun], bool]
) -> tuple[FlowRun, int]:
    """Start a run, SIGKILL it once it is Running and ``kill_when(run)``; the run, its pid."""
    with PipelineProcess(setup.args(), setup.env, log) as process:
        wait_until(
            lambda: running_run_on(api, setup.db) is not None,
            timeout=90,
            what="the run Running",
            interval=0.2,
            while_running=process,
        )
        run = running_run_on(api, setup.db)
        assert run is not None
        wait_until(lambda: kill_when(run), 60, "the moment to kill", 0.2, process)
        assert process.kill().returncode == -9
    return run, process.proc.pid


def state_of(api: SyncPrefectClient, run_id: UUID) -> tuple[StateType, str]:
    state = api.read_flow_run(run_id).state
    assert state is not None
    return state.type, state.message or ""


def test_a_killed_run_is_marked_crashed_by_the_next_run_on_its_database(
    client: SyncPrefectClient,  # noqa: F811
    setup: Setup,
    tmp_path: Path,
) -> None:
    # Killed in its API step, while it holds the database (the lock).
    def api_step_under_way(_: FlowRun) -> bool:
        return sum(r.outcome == "200" for r in setup.api.stats.log) >= 4

    killed, pid = start_and_kill(setup, client, tmp_path / "killed.log", api_step_under_way)
    # The defect: nothing reports the end of a killed command-line run.
    time.sleep(2)
    assert state_of(client, killed.id)[0] == StateType.RUNNING

    rerun = run_pipeline(setup.args(), setup.env, tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.output
    state, message = state_of(client, killed.id)
    assert state == StateType.CRASHED, message
    assert message.startswith(f"the process of this run (pid {pid}) ended without reporting")
    assert "(killed?); found by run '" in message
    assert message.endswith(f"' on {setup.db}")
    # The run that found it says so in its log, and leaves the lock file unnamed.
    assert f"Run '{killed.name}' (pid {pid}) ended without reporting while it held" in (
        rerun.output
    )
    assert setup.db.with_name(setup.db.name + ".lock").read_text() == ""


def heartbeat_received(api_url: str, run_id: UUID) -> bool:
    """Whether the server stored a heartbeat event of the flow run."""
    body = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{run_id}"]},
        },
        "limit": 1,
    }
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    return bool(response.json()["events"])


def test_without_a_next_run_the_heartbeat_automation_marks_a_killed_run_crashed(
    server: dict[str, str],  # noqa: F811
    client: SyncPrefectClient,  # noqa: F811
    setup: Setup,
    tmp_path: Path,
) -> None:
    """The automation of flows/runs.py, with 15 s instead of 9 minutes, on a local server."""
    api_url = server["PREFECT_API_URL"]
    after = timedelta(seconds=15)
    with temporary_settings({PREFECT_API_URL: api_url}):
        automation = ensure_zombie_automation(after)
        assert ensure_zombie_automation(after).id == automation.id  # updated, not doubled
    try:
        # Heartbeats every 30 s, the shortest Prefect allows; the first when the run starts.
        setup.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "30"
        killed, _ = start_and_kill(
            setup, client, tmp_path / "killed.log", lambda run: heartbeat_received(api_url, run.id)
        )
        assert state_of(client, killed.id)[0] == StateType.RUNNING

        def crashed() -> bool:
            return state_of(client, killed.id)[0] == StateType.CRASHED

        wait_until(crashed, timeout=45, what="the killed run marked Crashed", interval=1)
        assert state_of(client, killed.id)[1] == zombie_automation(after).actions[0].message
    finally:
        with temporary_settings({PREFECT_API_URL: api_url}):
            automation.delete()
