"""The flow's deployments, declared once in ``prefect.yaml``.

``prefect deploy --all`` registers them for a process work pool; ``serve_deployments``
(``python -m flows.attribution --serve``) serves the same deployments, with the same
schedules, parameters and limits, from this process for users without a work pool.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from config.settings import PROJECT_ROOT
from flows.runs import ensure_zombie_automation

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"

# One run at a time across all served deployments: every run writes the same database.
SERVE_LIMIT = 1


class DeploymentConflict(RuntimeError):
    """A deployment to serve is already deployed to a work pool under the same name."""


def enter_project_root() -> dict[str, str]:
    """Pull step of the deployments: run the flow from this checkout, wherever it is.

    The worker's Python environment has the project installed (``pip install -e .``),
    so this module's location is the checkout the worker belongs to; no path from the
    machine that deployed is stored in the deployment.
    """
    os.chdir(PROJECT_ROOT)
    return {"directory": str(PROJECT_ROOT)}


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` entries of ``prefect.yaml``, anchors and merge keys resolved."""
    with path.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    return list(document["deployments"])


def served_deployments(path: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    """The deployments of ``prefect.yaml`` as deployments this process serves."""
    from prefect.schedules import Cron

    from flows.attribution import attribution_flow

    deployments = []
    for spec in deployment_specs(path):
        schedules = [
            Cron(
                s["cron"],
                timezone=s.get("timezone"),
                active=s.get("active", True),
                parameters=s.get("parameters") or {},
            )
            for s in spec.get("schedules") or []
        ]
        deployments.append(
            attribution_flow.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec.get("parameters") or {},
                schedules=schedules,
                concurrency_limit=spec.get("concurrency_limit"),
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
            )
        )
    return deployments


def check_not_deployed_to_a_pool(deployments: list[RunnerDeployment]) -> None:
    """Refuse to serve a deployment that ``prefect deploy`` registered for a work pool.

    Serving updates a registered deployment in place; a pool deployment updated so
    loses the location of its code (Prefect 3.9) and its runs crash.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    pooled = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                registered = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            if registered.work_pool_name:
                pooled.append(deployment.full_name)
    if pooled:
        raise DeploymentConflict(
            f"already deployed to a work pool and run by a worker: {', '.join(pooled)}. "
            "To serve them instead, delete them first: "
            + "; ".join(f"prefect deployment delete '{name}'" for name in pooled)
        )


def serve_deployments(path: Path = PREFECT_YAML) -> None:
    """Serve the deployments of ``prefect.yaml`` until interrupted (Ctrl+C)."""
    from prefect import serve

    # Flow runs start from the project root, as the work pool's pull step does.
    os.chdir(PROJECT_ROOT)
    deployments = served_deployments(path)
    check_not_deployed_to_a_pool(deployments)
    # Runs whose process is killed end Crashed, not Running forever (flows/runs.py).
    ensure_zombie_automation()
    serve(*deployments, limit=SERVE_LIMIT)
