"""The pipeline as a real process: start it, wait for it, kill it, read what it said.

Used by the crash, concurrency, soak and secrets tests. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import prefect.settings

from tests.helpers import ROOT, table_rows

OUTPUT_TABLES = ("attribution_customer_journey", "channel_reporting")
RUN_TIMEOUT_S = 180.0

_SUMMARY = re.compile(
    r"sent (?P<sent>\d+), attributed (?P<attributed>\d+), failed (?P<failed>\d+), "
    r"truncated journeys (?P<truncated>\d+), requests (?P<requests>\d+), "
    r"retries (?P<retries>\d+)"
)
_API_DONE = re.compile(
    r"IHC API done: (?P<conversions>\d+) conversions in (?P<batches>\d+) batches, "
    r"(?P<requests>\d+) requests, (?P<retries>\d+) retries(?: \([^)]*\))?, "
    r"(?P<cache_hits>\d+) cache hits"
)


def pipeline_env(results_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a pipeline process: the session's Prefect test server, its own
    result storage (so batch caches of different scenarios never meet), no inherited key.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IHC_", "ATTRIBUTION_"))}
    env.update(
        PREFECT_API_URL=str(prefect.settings.PREFECT_API_URL.value()),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOCAL_STORAGE_PATH=str(results_dir),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Finished:
    returncode: int
    output: str
    # Peak resident set size of the process, in KiB.
    max_rss_kib: int


class PipelineProcess:
    """``python -m flows.attribution ARGS`` with stdout and stderr in one log file."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.attribution", *args],
                cwd=ROOT,
                env=dict(env),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self._finished: Finished | None = None

    def __enter__(self) -> PipelineProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """A test that stops early leaves no process behind."""
        if self.running():
            self.kill()

    def running(self) -> bool:
        return self._finished is None and self._reap(os.WNOHANG) is None

    def _reap(self, options: int) -> Finished | None:
        pid, status, usage = os.wait4(self.proc.pid, options)
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        self._finished = Finished(code, self.log.read_text(errors="replace"), usage.ru_maxrss)
        return self._finished

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> Finished:
        deadline = time.monotonic() + timeout
        while self._finished is None:
            if self._reap(os.WNOHANG) is not None:
                break
            if time.monotonic() > deadline:
                self.kill()
                log = self.log.read_text()
                raise AssertionError(f"pipeline still running after {timeout:.0f} s:\n{log}")
            time.sleep(0.05)
        return self._finished

    def kill(self) -> Finished:
        """SIGKILL: no cleanup, no finally blocks, no atexit; as a power cut would."""
        if self._finished is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self._reap(0)
        assert self._finished is not None
        return self._finished


def run_pipeline(
    args: Sequence[str], env: Mapping[str, str], log: Path, timeout: float = RUN_TIMEOUT_S
) -> Finished:
    return PipelineProcess(args, env, log).wait(timeout)


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.01,
    while_running: PipelineProcess | None = None,
) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` or when the process has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if while_running is not None and not while_running.running():
            log = while_running.log.read_text()
            raise AssertionError(f"the pipeline ended before {what}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def summary_counts(output: str) -> dict[str, int]:
    """The run summary's counts (sent, attributed, failed, requests, retries, …) from its log.

    With an API run, also ``batches`` and ``cache_hits`` from the client's closing line.
    """
    found = _SUMMARY.findall(output)
    assert len(found) == 1, f"expected one summary line, found {len(found)}:\n{output}"
    counts = {k: int(v) for k, v in _SUMMARY.search(output).groupdict().items()}  # type: ignore[union-attr]
    api = _API_DONE.search(output)
    if api is not None:
        counts["batches"] = int(api["batches"])
        counts["cache_hits"] = int(api["cache_hits"])
    return counts


def output_tables(db: Path) -> dict[str, list[tuple]]:
    return {table: table_rows(db, table) for table in OUTPUT_TABLES}
