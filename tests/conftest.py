"""Shared fixtures: one Prefect test server per session, isolated result storage."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Cached task results of test runs stay out of the user's ~/.prefect.
os.environ.setdefault(
    "PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="attribution-test-results-")
)
os.environ.pop("IHC_API_KEY", None)

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """Every test talks to this one server: no test starts a temporary one by accident."""
    with prefect_test_harness(server_startup_timeout=180):
        yield


# ---- IHC API client and server (tests/test_ihc_client.py, tests/test_ihc_server.py) ----

import contextlib  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from datetime import datetime  # noqa: E402

import polars as pl  # noqa: E402

from tasks.ihc_server import ServerConfig, ServerHandle, run_server  # noqa: E402

IHC_TEST_KEY = "test-key-5f0c2e9a1b"
_CHANNELS = ["Direct Traffic", "Paid Search Brand", "SEO", "Email", "Display"]


def _journeys(sizes: Sequence[int], prefix: str = "conv", shared: bool = False) -> pl.DataFrame:
    """Journeys of the given lengths, sorted as the pipeline hands them over.

    Sessions are 5–29 h apart with varied channels and flags; the last one converts.
    With ``shared``, journeys 2k and 2k+1 start with the same session (one user, two
    conversions), as real data has.
    """
    frame = pl.DataFrame({"journey": range(len(sizes)), "sessions": list(sizes)})
    rows = (
        frame.filter(pl.col("sessions") > 0)
        .select(pl.col("journey").repeat_by("sessions").explode())
        .with_columns(position=pl.int_range(pl.len()).over("journey"))
        .with_columns(last=pl.col("position") == pl.len().over("journey") - 1)
    )
    owner = pl.col("journey") // 2 * 2 if shared else pl.col("journey")
    # A shared session is the same session in both journeys: same id, time, channel, flags.
    session_owner = pl.when(pl.col("position") == 0).then(owner).otherwise(pl.col("journey"))
    mix = (session_owner * 31 + pl.col("position") * 17) % 97
    return rows.select(
        conversion_id=pl.format(
            "{}-{}", pl.lit(prefix), pl.col("journey").cast(pl.String).str.zfill(5)
        ),
        session_id=pl.format("s-{}-{}", session_owner, "position"),
        timestamp=pl.lit(datetime(2023, 9, 1))
        + pl.duration(hours=pl.col("position") * 29 + session_owner % 5 * 3 + mix % 7),
        channel_label=pl.lit(pl.Series(_CHANNELS)).gather(mix % len(_CHANNELS)),
        holder_engagement=(mix % 3 == 0).cast(pl.Int64),
        closer_engagement=(mix % 4 == 1).cast(pl.Int64),
        impression_interaction=(mix % 5 == 2).cast(pl.Int64),
        conversion=pl.col("last").cast(pl.Int64),
        event_day=pl.lit("ignored"),
    ).sort("conversion_id", "timestamp", "session_id")


@pytest.fixture
def make_journeys() -> Callable[..., pl.DataFrame]:
    """``make_journeys([3, 1, 5], prefix="conv", shared=False)``: journeys of those lengths."""
    return _journeys


@pytest.fixture
def ihc_api_key() -> str:
    return IHC_TEST_KEY


@pytest.fixture
def ihc_server() -> Iterator[Callable[..., ServerHandle]]:
    """``ihc_server(latency_ms=…, script=…, …)``: a loopback IHC server, stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(**options: object) -> ServerHandle:
            options.setdefault("api_key", IHC_TEST_KEY)
            return stack.enter_context(run_server(ServerConfig(**options)))  # type: ignore[arg-type]

        yield start
