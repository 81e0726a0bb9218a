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

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"

# One run at a time across all served deployments: every run writes the same database.
SERVE_LIMIT = 1


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


def serve_deployments(path: Path = PREFECT_YAML) -> None:
    """Serve the deployments of ``prefect.yaml`` until interrupted (Ctrl+C)."""
    from prefect import serve

    # Flow runs start from the project root, as the work pool's pull step does.
    os.chdir(PROJECT_ROOT)
    serve(*served_deployments(path), limit=SERVE_LIMIT)
