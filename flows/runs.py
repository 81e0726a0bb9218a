"""Run bookkeeping: a flow run whose process died is marked Crashed, not left Running.

A process killed with SIGKILL (``kill -9``, the OOM killer, a reboot) cannot report its
end, so its flow run stays "Running" in the UI. A worker or ``--serve`` notices when the
flow-run process it started dies and marks the run Crashed itself; nothing does for a
command-line run, or when the worker dies too. Two things end such runs here:

1. **The database lock names its holder.** ``tasks.db.run_lock`` writes the flow run and
   process id of its holder into ``<db>.lock`` and clears them when it lets go. The OS
   releases the lock of a process that dies, but nobody clears the name: a run that takes
   the lock and still finds another run named there knows that run's process died while
   it held the database. ``crash_abandoned_run`` sets that run Crashed if the API still
   has it unfinished. No server set-up, works for command-line runs, but only once a next
   run comes, and only for a process that died while it held the lock.

2. **Heartbeats.** Every flow run sends a ``prefect.flow-run.heartbeat`` event every
   ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by default). The automation of
   ``zombie_automation`` sets a run of this flow Crashed when its last heartbeat was
   followed by neither another one nor a final state within ``ZOMBIE_AFTER`` (9 minutes:
   three missed heartbeats). Automations run on a local ``prefect server start`` too.
   ``python -m flows.runs`` creates or updates it; ``--serve`` does so itself.

And a run that fails for a known reason says so once: ``log_known_failures_once``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

if TYPE_CHECKING:
    from prefect.automations import Automation

FLOW_NAME = "ihc-attribution"
ZOMBIE_AUTOMATION = f"{FLOW_NAME}: crash runs whose heartbeat stopped"
ZOMBIE_AFTER = timedelta(minutes=9)


@dataclass(frozen=True)
class LockHolder:
    """Who holds a database lock: a process, and the flow run it executes (if any)."""

    pid: int
    flow_run_id: str | None = None
    flow_run_name: str | None = None

    @classmethod
    def this_process(cls) -> LockHolder:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        run = context.flow_run if context is not None else None
        if run is None:
            return cls(os.getpid())
        return cls(os.getpid(), str(run.id), run.name)

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder a lock file names; None for an empty (released) or unreadable one."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        return f"run '{self.flow_run_name}'" if self.flow_run_name else f"process {self.pid}"


# What Prefect's run_flow logs, with the traceback, when the flow run it was asked the
# result of ended Failed (prefect.flow_engine.run_flow).
ENGINE_RERAISE = "Engine execution exited with unexpected exception"


class _KnownFailureFilter(logging.Filter):
    """No traceback in the run's log for a failure of ``config.errors``.

    Prefect's task engine logs a task's exception with its traceback ("Task run failed
    with exception: …"): the line stays, without the traceback. Its flow engine, where a
    worker or ``serve`` runs the flow, logs the Failed run's exception once more as an
    "unexpected exception": that record is dropped. The flow logs the reason itself.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from config.errors import PipelineError

        if not (record.exc_info and isinstance(record.exc_info[1], PipelineError)):
            return True
        if record.msg == ENGINE_RERAISE:
            return False
        record.exc_info = record.exc_text = None
        return True


def log_known_failures_once() -> None:
    """Keep tracebacks out of the run's log for known failures (see ``_KnownFailureFilter``);
    any other exception keeps its traceback."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        runs = logging.getLogger(name)
        if not any(isinstance(f, _KnownFailureFilter) for f in runs.filters):
            runs.addFilter(_KnownFailureFilter())


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger, or this module's outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def crash_abandoned_run(abandoned: LockHolder, found_by: LockHolder, db: Path) -> bool:
    """Set the flow run of ``abandoned``, whose process died holding ``db``, Crashed.

    Only if the API still has it unfinished: a worker may have marked it already. Never
    fails the calling run; whether the run was marked is returned and logged.
    """
    if abandoned.flow_run_id is None or abandoned.flow_run_id == found_by.flow_run_id:
        return False
    from prefect import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    message = (
        f"the process of this run (pid {abandoned.pid}) ended without reporting (killed?); "
        f"found by {found_by.describe()} on {db}"
    )
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(abandoned.flow_run_id))
            if run.state is None or run.state.is_final():
                return False
            result = client.set_flow_run_state(run.id, Crashed(message=message))
    except ObjectNotFound:
        return False  # a run of another Prefect server or database
    except Exception as exc:  # bookkeeping must not fail the run
        run_logger().warning(
            "Could not check %s named in %s.lock: %s", abandoned.describe(), db, exc
        )
        return False
    marked = result.status == SetStateStatus.ACCEPT
    if marked:
        run_logger().warning(
            "%s (pid %s) ended without reporting while it held %s (killed?): marked it Crashed",
            abandoned.describe().capitalize(),
            abandoned.pid,
            db,
        )
    return marked


def tag_flow_run(*tags: str) -> None:
    """Add ``tags`` to the current flow run, for the UI's filters.

    On the run itself rather than through ``prefect.tags()``: tags in that context also
    go to every task run, and Prefect then asks its API for a tag concurrency slot
    around each task.
    """
    from prefect import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run = context.flow_run
    merged = sorted({*(run.tags or []), *tags})
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=merged)


def zombie_automation(after: timedelta = ZOMBIE_AFTER) -> Automation:
    """Crash a run of this flow whose last heartbeat had no successor within ``after``.

    Prefect's "zombie flow run" automation, limited to this flow. ``after`` must leave
    room for a few heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, 180 s by default).
    """
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that stops sending heartbeats without ending was killed.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
            after={"prefect.flow-run.heartbeat"},
            # Any event of the same run: a heartbeat, or a state (Completed, Failed…).
            expect={"prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=after,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat from this run for {after}: its process ended "
                "without reporting (killed?)",
            )
        ],
    )


def ensure_zombie_automation(after: timedelta = ZOMBIE_AFTER) -> Automation:
    """Create the automation of ``zombie_automation`` on the API's server, or update it."""
    from prefect.automations import Automation

    wanted = zombie_automation(after)
    try:
        existing = Automation.read(name=wanted.name)
    except ValueError:  # not there yet
        return wanted.create()
    wanted.id = existing.id
    wanted.update()
    return wanted


def main() -> int:
    """``python -m flows.runs``: put the automation on the server PREFECT_API_URL names."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("flows.runs: set PREFECT_API_URL to the server to create the automation on")
        return 2
    automation = ensure_zombie_automation()
    print(f"automation '{automation.name}' is on {PREFECT_API_URL.value()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
