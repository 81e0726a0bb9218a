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
