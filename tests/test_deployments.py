"""prefect.yaml against a real Prefect server: deploy, schedule, validate, run.

Everything goes through the commands of the README's Operations guide, run as
subprocesses against a throwaway ``prefect server start`` on a free loopback port.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import Log, StateType

from config.settings import PROJECT_ROOT
from flows.serve import deployment_specs, served_deployments
from tasks.attribution import PROGRESS_ARTIFACT_KEY
from tasks.export import REPORT_CSV
from tasks.summary import REPORT_ARTIFACT_KEY, SUMMARY_ARTIFACT_KEY
from tests.helpers import build_db

FLOW_NAME = "ihc-attribution"
POOL = "attribution-pool"
PREFECT = str(Path(sys.executable).with_name("prefect"))
F, D, P = "FB & IG Ads", "Direct Traffic", "Performance Max"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    log: Path,
    process: subprocess.Popen[bytes],
) -> None:
    """Poll ``condition`` until it holds; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_bytes()[-4000:].decode(errors="replace")
    pytest.fail(f"{what}: not within {timeout:.0f} s; log {log}:\n{tail}")


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Prefect server; yields the environment that points the CLI at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
        "COLUMNS": "200",
    }
    log = home / "server.log"
    process = start(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 90, "prefect server healthy", log, process)
        yield env
    finally:
        stop(process)


def cli(
    env: dict[str, str], *args: str, cwd: Path = PROJECT_ROOT, timeout: float = 60, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PREFECT, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if ok and result.returncode != 0:
        pytest.fail(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def client(server: dict[str, str]) -> Iterator[SyncPrefectClient]:
    with SyncPrefectClient(server["PREFECT_API_URL"]) as c:
        yield c


@pytest.fixture(scope="module")
def deployed(server: dict[str, str]) -> dict[str, str]:
    """The work pool as the README creates it and both deployments of prefect.yaml."""
    cli(server, "work-pool", "create", POOL, "--type", "process")
    cli(server, "work-pool", "set-concurrency-limit", POOL, "1")
    cli(server, "deploy", "--all", "--no-prompt", timeout=120)
    return server


def spec_by_name() -> dict[str, dict[str, Any]]:
    return {spec["name"]: spec for spec in deployment_specs()}


def schedules_of(spec: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [(s["cron"], s["timezone"], s["active"]) for s in spec["schedules"]]


def single_session_journeys_db(path: Path) -> Path:
    """Each journey is one session (ihc 1 exactly); c3 has no session; P only spends."""
    return build_db(
        path,
        sessions=[
            ("s1", "u1", "2023-09-01", "10:00:00", F, 1, 0, 0),
            ("s2", "u2", "2023-09-02", "11:00:00", D, 1, 1, 0),
            ("s3", "u3", "2023-09-02", "12:00:00", P, 0, 1, 1),
        ],
        conversions=[
            ("c1", "u1", "2023-09-01", "18:00:00", 100.0),
            ("c2", "u2", "2023-09-03", "09:00:00", 40.0),
            ("c3", "u9", "2023-09-03", "10:00:00", 25.0),
        ],
        costs=[("s1", 10.0), ("s2", 4.0), ("s3", 2.5)],
    )


# The report table artifact as the UI shows it: values as text, NULL as "".
EXPECTED_TABLE = [
    {"channel_name": D, "date": "2023-09-02", "cost": "4.0", "ihc": "1.0",
     "ihc_revenue": "40.0", "cpo": "4.0", "roas": "10.0"},
    {"channel_name": F, "date": "2023-09-01", "cost": "10.0", "ihc": "1.0",
     "ihc_revenue": "100.0", "cpo": "10.0", "roas": "10.0"},
    {"channel_name": P, "date": "2023-09-02", "cost": "2.5", "ihc": "0.0",
     "ihc_revenue": "0.0", "cpo": "", "roas": "0.0"},
]  # fmt: skip


def trigger_backfill(env: dict[str, str], db: Path, out: Path) -> UUID:
    result = cli(
        env,
        "deployment", "run", f"{FLOW_NAME}/weekly-backfill",
        "-p", "start_date=2023-09-01", "-p", "end_date=2023-09-03",
        "-p", f"db_path={db}", "-p", f"output_dir={out}",
    )  # fmt: skip
    created = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert created, result.stdout
    return UUID(created.group(1))


@pytest.mark.slow
def test_deployments_registered_as_written_in_prefect_yaml(
    deployed: dict[str, str], client: SyncPrefectClient
) -> None:
    specs = spec_by_name()
    assert set(specs) == {"daily", "weekly-backfill"}
    assert specs["daily"]["parameters"] == {"window_days": 1}
    assert specs["weekly-backfill"]["parameters"] == {}
    for name, spec in specs.items():
        deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        assert deployment.entrypoint == "flows/attribution.py:attribution_flow"
        assert deployment.work_pool_name == POOL
        assert deployment.parameters == spec["parameters"]
        assert deployment.enforce_parameter_schema is True
        assert sorted(deployment.tags) == sorted(spec["tags"])
        assert deployment.global_concurrency_limit is not None
        assert deployment.global_concurrency_limit.limit == spec["concurrency_limit"] == 1
        registered = [
            (s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules
        ]
        assert registered == schedules_of(spec)
        # Portable: the run finds the checkout itself, nothing machine-specific is stored.
        assert deployment.pull_steps == [{"flows.serve.enter_project_root": {}}]

        properties = deployment.parameter_openapi_schema["properties"]
        for field in ("start_date", "end_date"):
            date_type, null_type = properties[field]["anyOf"]
            assert (date_type["type"], date_type["format"]) == ("string", "date")
            assert null_type == {"type": "null"}
        window_type, _ = properties["window_days"]["anyOf"]
        assert window_type == {"type": "integer", "minimum": 1, "maximum": 3660}
        provider_type, _ = properties["provider"]["anyOf"]
        assert provider_type == {"enum": ["auto", "local", "api"], "type": "string"}
        assert properties["refresh"]["type"] == "boolean"

    pool = client.read_work_pool(POOL)
    assert pool.type == "process"
    assert pool.concurrency_limit == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("window_days", "0"),
        ("provider", "remote"),
    ],
)
def test_bad_parameter_is_refused_before_a_run_exists(
    deployed: dict[str, str], client: SyncPrefectClient, parameter: str, value: str
) -> None:
    deployment = client.read_deployment_by_name(f"{FLOW_NAME}/weekly-backfill")
    result = cli(
        deployed,
        "deployment", "run", f"{FLOW_NAME}/weekly-backfill", "-p", f"{parameter}={value}",
        ok=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"Validation failed for field '{parameter}'" in output, output
    assert value in output
    assert "Traceback" not in output
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    )
    assert all(parameter not in run.parameters for run in runs)


@pytest.mark.slow
def test_worker_runs_a_triggered_backfill_and_publishes_artifacts(
    deployed: dict[str, str], client: SyncPrefectClient, tmp_path: Path
) -> None:
    db = single_session_journeys_db(tmp_path / "challenge.db")
    out = tmp_path / "report"
    run_id = trigger_backfill(deployed, db, out)
    # The worker starts elsewhere: the pull step must find the checkout by itself.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    worker = cli(deployed, "worker", "start", "--pool", POOL, "--run-once", cwd=elsewhere,
                 timeout=150)  # fmt: skip

    flow_run = client.read_flow_run(run_id)
    assert flow_run.state is not None
    assert flow_run.state.type == StateType.COMPLETED, worker.stdout + worker.stderr
    assert flow_run.parameters["start_date"] == "2023-09-01"
    assert flow_run.name == "backfill 2023-09-01..2023-09-03"
    assert "Traceback" not in worker.stdout + worker.stderr
    assert (out / REPORT_CSV).is_file()

    artifacts = {
        a.key: a
        for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    }
    # All of them the flow run's own (the UI's "Flow run" column), none a task run's.
    assert set(artifacts) == {REPORT_ARTIFACT_KEY, SUMMARY_ARTIFACT_KEY, PROGRESS_ARTIFACT_KEY}
    assert {artifact.task_run_id for artifact in artifacts.values()} == {None}
    assert artifacts[PROGRESS_ARTIFACT_KEY].data == 100.0
    assert artifacts[REPORT_ARTIFACT_KEY].type == "table"
    table = artifacts[REPORT_ARTIFACT_KEY].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert sorted(rows, key=lambda r: (r["channel_name"], r["date"])) == EXPECTED_TABLE

    assert artifacts[SUMMARY_ARTIFACT_KEY].type == "markdown"
    summary = artifacts[SUMMARY_ARTIFACT_KEY].data
    assert isinstance(summary, str)
    assert summary.startswith("# Attribution run: conversion dates 2023-09-01 to 2023-09-03")
    for row in (
        "| Conversions in the range | 3 |",
        "| Attributed in this run | 2 (local provider) |",
        "| … without a session before them (unattributed) | 1 |",
        "## The whole report: session dates 2023-09-01 to 2023-09-02",
        "| €16.50 | 2.0 | €140.00 | €8.25 | 8.48 |",
        "| Performance Max | €2.50 | 0.0 | €0.00 | n/a | 0.00 |",
        f"- [report.html]({(out / 'report.html').resolve().as_uri()})",
    ):
        assert row in summary, summary


@pytest.mark.slow
def test_a_daily_run_keeps_the_whole_report_in_the_exported_files(
    deployed: dict[str, str], client: SyncPrefectClient, tmp_path: Path
) -> None:
    db = single_session_journeys_db(tmp_path / "challenge.db")
    out = tmp_path / "report"
    first = trigger_backfill(deployed, db, out)
    cli(deployed, "worker", "start", "--pool", POOL, "--run-once", timeout=150)
    assert client.read_flow_run(first).state.type == StateType.COMPLETED
    before = (out / REPORT_CSV).read_text()
    assert len(before.splitlines()) == 4

    # Yesterday (UTC) has no conversion in this database: the run attributes nothing,
    # warns, and the files still hold every channel and day.
    daily = trigger(deployed, "daily", f"db_path={db}", f"output_dir={out}")
    worker = cli(deployed, "worker", "start", "--pool", POOL, "--run-once", timeout=150)
    flow_run = client.read_flow_run(daily)
    assert flow_run.state.type == StateType.COMPLETED, worker.stdout + worker.stderr
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    assert flow_run.name == f"daily {yesterday}"
    assert sorted(flow_run.tags) == ["attribution", "mode:daily", "provider:local"]
    assert (out / REPORT_CSV).read_text() == before
    assert "No conversions in the range" in worker.stdout + worker.stderr
    summary = next(
        a.data
        for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[daily]))
        )
        if a.key == SUMMARY_ARTIFACT_KEY
    )
    assert "> **No conversions in this range**" in summary
    assert "| €16.50 | 2.0 | €140.00 | €8.25 | 8.48 |" in summary


@pytest.mark.slow
def test_a_bad_date_fails_the_run_at_its_start_in_one_sentence(
    deployed: dict[str, str], client: SyncPrefectClient
) -> None:
    run_id = trigger(deployed, "weekly-backfill", "start_date=2023-02-30")
    worker = cli(deployed, "worker", "start", "--pool", POOL, "--run-once", timeout=150)
    flow_run = client.read_flow_run(run_id)
    assert flow_run.name == "invalid parameters"
    assert flow_run.state.type == StateType.FAILED, worker.stdout + worker.stderr
    assert flow_run.state.message == (
        "ParameterError: start_date 2023-02-30 is not a calendar date (YYYY-MM-DD)"
    )


@pytest.mark.slow
def test_a_run_with_conflicting_parameters_fails_with_one_clear_line(
    deployed: dict[str, str], client: SyncPrefectClient, tmp_path: Path
) -> None:
    """daily keeps window_days 1: a start date as well fails the run, naming the rule."""
    db = single_session_journeys_db(tmp_path / "challenge.db")
    result = cli(
        deployed,
        "deployment", "run", f"{FLOW_NAME}/daily",
        "-p", "start_date=2023-09-01", "-p", f"db_path={db}",
    )  # fmt: skip
    created = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert created, result.stdout
    worker = cli(deployed, "worker", "start", "--pool", POOL, "--run-once", timeout=150)

    state = client.read_flow_run(UUID(created.group(1))).state
    assert state is not None
    assert state.type == StateType.FAILED, worker.stdout + worker.stderr
    assert "give either window_days or start_date/end_date, not both" in (state.message or "")
    # The flow logs the reason as one line, and nothing logs a traceback.
    log = worker.stdout + worker.stderr
    assert re.search(
        r"ERROR +\| Flow run 'invalid parameters' - give either .+, not both\n", log
    ), log
    assert "Encountered exception during execution" not in log
    assert "Traceback" not in log


MISSING_DB = "/nonexistent.db"
MISSING_DB_REASON = f"database file not found: {MISSING_DB} (no sample data is made for it)"


def trigger(env: dict[str, str], deployment: str, *parameters: str) -> UUID:
    args = [arg for parameter in parameters for arg in ("-p", parameter)]
    result = cli(env, "deployment", "run", f"{FLOW_NAME}/{deployment}", *args)
    created = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert created, result.stdout
    return UUID(created.group(1))


def run_log(client: SyncPrefectClient, run_id: UUID, until: str) -> list[Log]:
    """The flow run's log as the UI shows it, read from the API once it holds ``until``."""

    def read() -> list[Log]:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))

    deadline = time.monotonic() + 20
    logs = read()
    while not any(until in log.message for log in logs) and time.monotonic() < deadline:
        time.sleep(0.5)
        logs = read()
    return logs


def text_of(logs: list[Log]) -> str:
    return "\n".join(log.message for log in logs)


@pytest.mark.slow
def test_a_worker_run_failing_for_a_known_reason_states_it_in_one_line(
    deployed: dict[str, str], client: SyncPrefectClient
) -> None:
    run_id = trigger(deployed, "weekly-backfill", f"db_path={MISSING_DB}")
    worker = cli(deployed, "worker", "start", "--pool", POOL, "--run-once", timeout=150)
    output = worker.stdout + worker.stderr

    state = client.read_flow_run(run_id).state
    assert state is not None
    assert state.type == StateType.FAILED, output
    assert state.message == f"DatabaseError: {MISSING_DB_REASON}"
    # The flow logs the reason once, as an error of the run, in the worker's output and in
    # the run's log in the UI; it raised nothing and the worker saw no crash.
    assert re.search(rf"ERROR +\| Flow run '[^']+' - {re.escape(MISSING_DB_REASON)}\n", output)
    logs = run_log(client, run_id, until=MISSING_DB_REASON)
    errors = [log.message.splitlines()[0] for log in logs if log.level == logging.ERROR]
    assert errors.count(MISSING_DB_REASON) == 1, errors
    for text in (output, text_of(logs)):
        assert "Encountered exception during execution" not in text
        assert "as crashed" not in text
        assert "exited with unexpected exception" not in text
        assert "Traceback" not in text
    assert errors == [MISSING_DB_REASON]


@pytest.mark.slow
def test_serve_refuses_pool_deployments_then_serves_and_runs_them(
    deployed: dict[str, str], client: SyncPrefectClient, tmp_path: Path
) -> None:
    """Last against the server: it replaces the pool deployments by served ones."""
    serve = [sys.executable, "-m", "flows.attribution", "--serve"]
    refused = subprocess.run(
        serve, cwd=PROJECT_ROOT, env=deployed, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("attribution: DeploymentConflict: "), refused.stderr
    assert "Traceback" not in refused.stderr
    deletes = re.findall(r"prefect deployment delete '([^']+)'", refused.stderr)
    assert sorted(deletes) == [f"{FLOW_NAME}/daily", f"{FLOW_NAME}/weekly-backfill"]
    for name in deletes:
        cli(deployed, "deployment", "delete", name)

    log = tmp_path / "serve.log"
    serving = start(serve, deployed, log)
    try:
        wait_for(
            lambda: b"being served" in log.read_bytes(), 60, "deployments served", log, serving
        )
        for name, spec in spec_by_name().items():
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
            assert deployment.work_pool_name is None
            assert deployment.parameters == spec["parameters"]
            assert [
                (s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules
            ] == schedules_of(spec)

        # No worker runs: the serving process itself runs the triggered run.
        out = tmp_path / "report"
        run_id = trigger_backfill(deployed, single_session_journeys_db(tmp_path / "c.db"), out)

        def finished() -> bool:
            state = client.read_flow_run(run_id).state
            return state is not None and state.is_final()

        wait_for(finished, 90, "served run finished", log, serving)
        state = client.read_flow_run(run_id).state
        assert state is not None
        assert state.type == StateType.COMPLETED, log.read_text(errors="replace")
        assert (out / REPORT_CSV).is_file()
    finally:
        stop(serving)
    assert b"All deployments have been paused" in log.read_bytes()


def test_serve_uses_the_deployments_of_prefect_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT_ROOT)  # serve_deployments serves from the project root
    specs = spec_by_name()
    served = {d.name: d for d in served_deployments()}
    assert set(served) == set(specs)
    for name, deployment in served.items():
        spec = specs[name]
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.parameters == spec["parameters"]
        assert deployment.concurrency_limit == spec["concurrency_limit"]
        assert deployment.enforce_parameter_schema is spec["enforce_parameter_schema"]
        assert [
            (s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules
        ] == schedules_of(spec)


def test_prefect_yaml_holds_no_machine_specific_paths() -> None:
    text = (PROJECT_ROOT / "prefect.yaml").read_text(encoding="utf-8")
    assert str(PROJECT_ROOT) not in text
    assert str(Path.home()) not in text
