"""prefect.yaml against a real Prefect server: deploy, schedule, validate, run by a worker.

Everything goes through the commands the README's Operations guide gives, run as
subprocesses against a throwaway ``prefect server start`` on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import polars as pl
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import StateType

from config.settings import PROJECT_ROOT
from flows.serve import deployment_specs, served_deployments
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


def wait_until_healthy(
    url: str, server: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


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
        "PREFECT_CLI_WRAP_LINES": "false",
        "COLUMNS": "200",
    }
    log = home / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(api_url, proc, log, timeout=90)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


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
        assert deployment.global_concurrency_limit is not None
        assert deployment.global_concurrency_limit.limit == spec["concurrency_limit"] == 1
        registered = [
            (s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules
        ]
        assert registered == [(s["cron"], s["timezone"], True) for s in spec["schedules"]]
        # Portable: the run locates the checkout itself, nothing machine-specific is stored.
        assert deployment.pull_steps == [{"flows.serve.enter_project_root": {}}]
        assert str(PROJECT_ROOT) not in json.dumps(deployment.pull_steps)

        properties = deployment.parameter_openapi_schema["properties"]
        for field in ("start_date", "end_date"):
            date_type, null_type = properties[field]["anyOf"]
            assert (date_type["type"], date_type["format"]) == ("string", "date")
            assert null_type == {"type": "null"}
        assert {"type": "integer", "minimum": 1, "maximum": 3660} in properties["window_days"][
            "anyOf"
        ]
        assert {"enum": ["auto", "local", "api"], "type": "string"} in properties["provider"][
            "anyOf"
        ]
        assert properties["refresh"]["type"] == "boolean"

    pool = client.read_work_pool(POOL)
    assert pool.type == "process"
    assert pool.concurrency_limit == 1


@pytest.mark.slow
def test_bad_date_is_refused_before_a_run_exists(
    deployed: dict[str, str], client: SyncPrefectClient
) -> None:
    deployment = client.read_deployment_by_name(f"{FLOW_NAME}/weekly-backfill")
    result = cli(
        deployed,
        "deployment", "run", f"{FLOW_NAME}/weekly-backfill",
        "-p", "start_date=2023-02-30",
        ok=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "start_date" in output
    assert "2023-02-30" in output, output
    assert "Traceback" not in output
    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
    )
    assert all(run.parameters.get("start_date") != "2023-02-30" for run in runs)


def hand_built_db(path: Path) -> Path:
    """Two converting users with journeys, one conversion without any session."""
    return build_db(
        path,
        sessions=[
            ("s1", "u1", "2023-09-01", "10:00:00", F, 1, 0, 0),
            ("s2", "u1", "2023-09-02", "09:00:00", D, 1, 1, 0),
            ("s3", "u2", "2023-09-02", "11:00:00", P, 0, 1, 1),
            ("s4", "u4", "2023-09-03", "07:00:00", F, 0, 0, 1),
        ],
        conversions=[
            ("c1", "u1", "2023-09-02", "12:00:00", 100.0),
            ("c2", "u2", "2023-09-03", "08:00:00", 40.0),
            ("c3", "u3", "2023-09-03", "09:00:00", 25.0),
        ],
        costs=[("s1", 10.0), ("s2", 0.0), ("s3", 5.0), ("s4", 2.5)],
    )


@pytest.mark.slow
def test_worker_runs_a_triggered_backfill_and_publishes_artifacts(
    deployed: dict[str, str], client: SyncPrefectClient, tmp_path: Path
) -> None:
    db = hand_built_db(tmp_path / "challenge.db")
    out = tmp_path / "report"
    result = cli(
        deployed,
        "deployment", "run", f"{FLOW_NAME}/weekly-backfill",
        "-p", "start_date=2023-09-01", "-p", "end_date=2023-09-03",
        "-p", f"db_path={db}", "-p", f"output_dir={out}",
    )  # fmt: skip
    created = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
    assert created, result.stdout
    run_id = UUID(created.group(1))
    # The worker starts elsewhere: the pull step must find the checkout by itself.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    worker = cli(deployed, "worker", "start", "--pool", POOL, "--run-once", cwd=elsewhere,
                 timeout=150)  # fmt: skip

    flow_run = client.read_flow_run(run_id)
    assert flow_run.state is not None
    assert flow_run.state.type == StateType.COMPLETED, worker.stdout + worker.stderr
    assert flow_run.parameters["start_date"] == "2023-09-01"

    artifacts = {
        a.key: a
        for a in client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    }
    assert set(artifacts) == {REPORT_ARTIFACT_KEY, SUMMARY_ARTIFACT_KEY}
    assert artifacts[REPORT_ARTIFACT_KEY].type == "table"
    assert artifacts[SUMMARY_ARTIFACT_KEY].type == "markdown"

    table = artifacts[REPORT_ARTIFACT_KEY].data
    rows = pl.DataFrame(json.loads(table) if isinstance(table, str) else table)
    exported = pl.read_csv(out / "channel_reporting.csv", infer_schema=False)
    assert rows.select("channel_name", "date", "cost").sort("channel_name", "date").rows() == (
        exported.select("channel_name", "date", "cost").sort("channel_name", "date").rows()
    )
    costs = {(r["channel_name"], r["date"]): float(r["cost"]) for r in rows.to_dicts()}
    assert costs == {
        (F, "2023-09-01"): 10.0,
        (D, "2023-09-02"): 0.0,
        (P, "2023-09-02"): 5.0,
        (F, "2023-09-03"): 2.5,
    }
    assert rows["ihc"].cast(pl.Float64).sum() == pytest.approx(2.0)
    assert rows["ihc_revenue"].cast(pl.Float64).sum() == pytest.approx(140.0)
    assert {date.fromisoformat(d) for d in rows["date"]} <= {
        date(2023, 9, 1), date(2023, 9, 2), date(2023, 9, 3)
    }  # fmt: skip

    summary = artifacts[SUMMARY_ARTIFACT_KEY].data
    assert isinstance(summary, str)
    assert summary.startswith("# Attribution run summary")
    assert "| Range (conversion dates) | 2023-09-01 … 2023-09-03 |" in summary
    assert "| Conversions in range | 3 |" in summary
    assert "| Attributed in this run | 2 |" in summary
    assert "| Unattributed (no session before the conversion) | 1 |" in summary
    assert "| Total cost (EUR) | 17.50 |" in summary


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
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
            (s["cron"], s["timezone"], s["active"]) for s in spec["schedules"]
        ]


def test_prefect_yaml_holds_no_absolute_paths() -> None:
    text = (PROJECT_ROOT / "prefect.yaml").read_text(encoding="utf-8")
    assert str(PROJECT_ROOT) not in text
    assert str(Path.home()) not in text
