"""Each journey's credit per session, from the local IHC model or the IHC API.

This stage decides which provider attributes (``choose_provider``), which journeys are
sent (``journeys_to_send``: conversions already attributed are skipped unless a refresh
is asked for), runs the provider, and checks every answer with one function for both
providers (``check_results``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from config.secrets import API_KEY_ENV, SECRET_BLOCK
from config.settings import (
    ApiSettings,
    LocalModelSettings,
    RedistributionParameter,
    SettingsError,
)
from tasks.local_model import OUTPUT_SCHEMA, compute_ihc

if TYPE_CHECKING:
    from prefect.results import ResultStore

SUM_TOLERANCE = 1e-6
PROGRESS_ARTIFACT_KEY = "attribution-progress"


@dataclass(frozen=True)
class AttributionOutcome:
    """Per-session results of the conversions that succeeded, and those that failed."""

    provider: str
    results: pl.DataFrame
    failed: pl.DataFrame
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    truncated_journeys: int = 0
    elapsed_s: float = 0.0
    retry_reasons: dict[str, int] = field(default_factory=dict)

    def failure_reasons(self) -> dict[str, int]:
        """Failed conversions per kind of reason: "ihc sums to 0.8 …" and "… 1.2 …" are one."""
        kinds = self.failed.group_by(
            pl.col("reason").str.replace_all(r"[0-9]+(\.[0-9]+)?", "N")
        ).len()
        return {row["reason"]: row["len"] for row in kinds.sort("reason").to_dicts()}


def choose_provider(setting: str, api_key: SecretStr | None) -> str:
    """``local`` or ``api``: ``auto`` means the API when a key is configured."""
    if setting == "auto":
        return "api" if api_key is not None else "local"
    if setting == "api" and api_key is None:
        raise SettingsError(
            f"provider 'api' needs an API key: set {API_KEY_ENV} or create the Prefect "
            f"Secret block '{SECRET_BLOCK}'"
        )
    return setting


def journeys_to_send(
    journeys: pl.DataFrame, attributed: pl.DataFrame, refresh: bool
) -> tuple[pl.DataFrame, int]:
    """The journeys to attribute and how many conversions were skipped as already done.

    ``attributed`` holds the attribution rows written so far (``conv_id``, …); their
    conversions are sent again only with ``refresh``.
    """
    if refresh:
        return journeys, 0
    done = attributed.select(pl.col("conv_id").alias("conversion_id")).unique()
    to_send = journeys.join(done, on="conversion_id", how="anti")
    skipped = journeys["conversion_id"].n_unique() - to_send["conversion_id"].n_unique()
    return to_send, skipped


def check_results(sent: pl.DataFrame, results: pl.DataFrame) -> pl.DataFrame:
    """[conversion_id, reason] of the sent conversions whose results break the contract.

    Every returned (conversion_id, session_id) must have been sent, every sent session
    must come back once, each ihc must be a number in [0, 1] and each conversion's ihc
    sum to 1 (within 1e-6). Failing conversions are reported, never renormalised.
    ``sent`` holds the pairs of the conversions expected back; ``results`` only rows of
    those conversions. Cheap enough to run on every API answer.
    """
    ihc = pl.col("ihc")
    sent_pairs = sent.lazy().select("conversion_id", "session_id").with_columns(_sent=pl.lit(True))
    got = (
        results.lazy().select("conversion_id", "session_id", "ihc").with_columns(_got=pl.lit(True))
    )
    counts = (
        sent_pairs.join(got, on=["conversion_id", "session_id"], how="full", coalesce=True)
        .group_by("conversion_id")
        .agg(
            unsent=pl.col("_sent").is_null().sum(),
            missing=pl.col("_got").is_null().sum(),
            repeated=pl.col("session_id").is_duplicated().sum(),
            no_value=(pl.col("_got") & (ihc.is_null() | ihc.is_nan())).fill_null(False).sum(),
            out_of_range=((ihc < 0) | (ihc > 1)).fill_null(False).sum(),
            total=ihc.sum(),
        )
    )
    return (
        counts.with_columns(
            reason=pl.when(pl.col("unsent") > 0)
            .then(pl.format("{} returned session(s) were not sent", "unsent"))
            .when(pl.col("missing") > 0)
            .then(pl.format("{} sent session(s) missing from the result", "missing"))
            .when(pl.col("repeated") > 0)
            .then(pl.lit("a session is returned more than once"))
            .when(pl.col("no_value") > 0)
            .then(pl.lit("ihc missing or not a number"))
            .when(pl.col("out_of_range") > 0)
            .then(pl.lit("ihc outside [0, 1]"))
            .when((pl.col("total") - 1).abs() > SUM_TOLERANCE)
            .then(pl.format("ihc sums to {} instead of 1", pl.col("total").round(9)))
        )
        .filter(pl.col("reason").is_not_null())
        .select("conversion_id", "reason")
        .sort("conversion_id")
        .collect(engine="in-memory")
    )


def attribute_locally(
    journeys: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None = None,
) -> AttributionOutcome:
    """The built-in IHC model over all journeys at once."""
    started = time.perf_counter()
    results = compute_ihc(journeys, params, redistribution).select(OUTPUT_SCHEMA.names())
    failed = check_results(journeys, results)
    return AttributionOutcome(
        provider="local",
        results=results.join(failed, on="conversion_id", how="anti"),
        failed=failed,
        elapsed_s=time.perf_counter() - started,
    )


@task(name="attribute-with-local-ihc-model", cache_policy=NO_CACHE)
def attribute_locally_task(
    journeys: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None,
    progress_artifact: Any,
) -> AttributionOutcome:
    outcome = attribute_locally(journeys, params, redistribution)
    conversions = journeys["conversion_id"].n_unique()
    get_run_logger().info(
        "Local IHC model: %d/%d conversions attributed (%d sessions), %d failed, %.2f s",
        conversions - outcome.failed.height,
        conversions,
        journeys.height,
        outcome.failed.height,
        outcome.elapsed_s,
    )
    _show_progress(progress_artifact, 100.0)
    return outcome


@task(name="attribute-with-ihc-api", cache_policy=NO_CACHE)
def attribute_with_api_task(
    journeys: pl.DataFrame, settings: ApiSettings, api_key: SecretStr, progress_artifact: Any
) -> AttributionOutcome:
    """The IHC API with a batch cache in Prefect's result storage and progress in the UI."""
    from tasks.ihc_client import ApiStats, attribute_journeys

    logger = get_run_logger()
    last_update = 0.0

    def show(event: ApiStats) -> None:
        nonlocal last_update
        # Each update is a blocking API call inside the event loop: at most one a second.
        now = time.monotonic()
        if now - last_update >= 1.0 or event.done_batches == event.batches:
            last_update = now
            _show_progress(progress_artifact, event.percent)

    cache = ResultStoreBatchCache()
    if pruned := cache.prune():
        logger.info("IHC API batch cache: %d expired answer(s) deleted", pruned)
    api = attribute_journeys(journeys, settings, api_key, cache=cache, on_progress=show, log=logger)
    stats = api.stats
    # e.g. "3 retries (http_503: 2, timeout: 1)", or "0 retries".
    reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(stats.retry_reasons.items()))
    logger.info(
        "IHC API done: %d conversions in %d batches, %d requests, %d retries%s, "
        "%d cache hits, %d failed conversions, %d truncated journeys, %.1f s",
        stats.conversions_sent,
        stats.batches,
        stats.requests,
        stats.retries,
        f" ({reasons})" if reasons else "",
        stats.cache_hits,
        stats.failed_conversions,
        stats.truncated_journeys,
        stats.elapsed_s,
    )
    return AttributionOutcome(
        provider="api",
        results=api.results,
        failed=api.failed,
        requests=stats.requests,
        retries=stats.retries,
        cache_hits=stats.cache_hits,
        truncated_journeys=stats.truncated_journeys,
        elapsed_s=stats.elapsed_s,
        retry_reasons=dict(stats.retry_reasons),
    )


class ResultStoreBatchCache:
    """Batch results in Prefect's result storage (local files unless a block is configured).

    Without ``store``, the current run's result store (or the default storage) is used.
    Entries expire after ``ttl``, so a retrained model is asked again after a while.
    """

    prefix = "ihc-api-batch-"

    def __init__(
        self, store: ResultStore | None = None, ttl: timedelta | None = timedelta(days=7)
    ) -> None:
        from prefect.results import get_default_result_storage, get_result_store

        store = store if store is not None else get_result_store()
        if store.result_storage is None:
            # Resolved now, outside the event loop: resolving may call the Prefect API.
            storage = get_default_result_storage(_sync=True)
            store = store.model_copy(update={"result_storage": storage})
        self._store = store
        self._ttl = ttl

    def prune(self) -> int:
        """Delete the expired entries of local result storage; returns how many.

        Prefect treats an expired record as missing but leaves its file: without this the
        cache would grow by every batch ever answered. Remote storage (a block) keeps its
        own lifecycle rules.
        """
        from prefect.filesystems import LocalFileSystem

        storage = self._store.result_storage
        if self._ttl is None or not isinstance(storage, LocalFileSystem):
            return 0
        oldest = time.time() - self._ttl.total_seconds()
        expired = [
            entry
            for entry in Path(storage.basepath).expanduser().glob(f"{self.prefix}*")
            if entry.stat().st_mtime < oldest
        ]
        for entry in expired:
            entry.unlink(missing_ok=True)
        return len(expired)

    async def get(self, key: str) -> pl.DataFrame | None:
        try:
            if not await self._store.aexists(self.prefix + key):
                return None
            record = await self._store.aread(self.prefix + key)
        except ValueError:
            # An entry a killed run left half-written: as good as none.
            return None
        return pl.DataFrame(record.result, schema=OUTPUT_SCHEMA)

    async def put(self, key: str, results: pl.DataFrame) -> None:
        expiration = datetime.now(UTC) + self._ttl if self._ttl is not None else None
        # Plain lists, so any result serializer (pickle or json) can store them.
        await self._store.awrite(
            results.select(OUTPUT_SCHEMA.names()).to_dict(as_series=False),
            key=self.prefix + key,
            expiration=expiration,
        )


def _show_progress(artifact_id: Any, percent: float) -> None:
    from prefect.artifacts import update_progress_artifact

    if artifact_id is None:
        return
    try:
        update_progress_artifact(artifact_id=artifact_id, progress=percent, _sync=True)
    except Exception as exc:
        get_run_logger().debug("progress artifact not updated: %r", exc)


def attribute(
    journeys: pl.DataFrame,
    provider: str,
    api: ApiSettings,
    local_model: LocalModelSettings,
    api_key: SecretStr | None,
) -> AttributionOutcome:
    """Attribute ``journeys`` with ``provider``; call it from the flow.

    The progress artifact is created here, in the flow run's context, so it belongs to
    the flow run; the provider's task updates it.
    """
    from prefect.artifacts import create_progress_artifact

    progress = create_progress_artifact(
        progress=0.0,
        key=PROGRESS_ARTIFACT_KEY,
        description=f"Conversions attributed with the {provider} provider",
        _sync=True,
    )
    if provider == "api":
        assert api_key is not None
        return attribute_with_api_task(journeys, api, api_key, progress)
    return attribute_locally_task(journeys, local_model, api.redistribution_parameter, progress)
