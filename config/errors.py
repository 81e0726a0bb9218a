"""Every failure a run ends with for a known reason, written once for the flow and the CLI.

Each derives from ``PipelineError``: the flow reports it in one line and ends Failed
without a traceback, and the command line exits with its ``exit_code`` (2: nothing was
done, fix the input; 1: the run did its work but something needs attention). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A run that ends for a known reason the message states (exit code 1)."""

    exit_code = 1


class UsageError(PipelineError):
    """Parameters, settings or a database that cannot be used: nothing was done."""

    exit_code = 2


class ParameterError(UsageError, ValueError):
    """Run parameters that cannot be used; the message names the parameter."""


class SettingsError(UsageError, ValueError):
    """Settings that cannot be used; the message names the offending key."""


class DatabaseError(UsageError):
    """The database cannot be used as it is; the message says what is wrong."""


class RunLockedError(DatabaseError):
    """Another run holds the database."""


class InvalidSourceRows(UsageError):
    """Unusable source rows were found and the settings say to fail on them."""


class ApiKeyRejected(PipelineError):
    """The IHC API refused the API key (401/403): the run cannot go on."""


class ReconciliationError(PipelineError):
    """A check every run makes before it commits failed; nothing was written."""


class AttributionRunError(PipelineError):
    """The run finished its writes but some conversions failed attribution."""
