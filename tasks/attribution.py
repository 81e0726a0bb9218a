"""Each journey's credit per session, from the local IHC model or the IHC API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from config.settings import LocalModelSettings, RedistributionParameter
from tasks.local_model import compute_ihc

RESULT_COLUMNS = ["conversion_id", "session_id", "initializer", "holder", "closer", "ihc"]
SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AttributionOutcome:
    """Per-session results of the conversions that succeeded, and those that failed."""

    provider: str
    results: pl.DataFrame
    failed: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def check_results(sent: pl.DataFrame, results: pl.DataFrame) -> pl.DataFrame:
    """Conversions whose results break the contract, with the reason (empty = all good).

    Every returned (conversion_id, session_id) must have been sent, every sent session
    must come back, each ihc must lie in [0, 1] and each conversion's ihc sum to 1.
    """
    sent_pairs = sent.select("conversion_id", "session_id").with_columns(sent=pl.lit(True))
    got = results.select("conversion_id", "session_id", "ihc").with_columns(got=pl.lit(True))
    pairs = sent_pairs.join(got, on=["conversion_id", "session_id"], how="full", coalesce=True)
    return (
        pairs.group_by("conversion_id")
        .agg(
            unsent=pl.col("sent").is_null().sum(),
            missing=pl.col("got").is_null().sum(),
            out_of_range=((pl.col("ihc") < 0) | (pl.col("ihc") > 1) | pl.col("ihc").is_nan())
            .fill_null(False)
            .sum(),
            total=pl.col("ihc").sum(),
        )
        .with_columns(
            reason=pl.when(pl.col("unsent") > 0)
            .then(pl.format("{} returned session(s) were not sent", "unsent"))
            .when(pl.col("missing") > 0)
            .then(pl.format("{} sent session(s) missing from the result", "missing"))
            .when(pl.col("out_of_range") > 0)
            .then(pl.lit("ihc outside [0, 1]"))
            .when((pl.col("total") - 1).abs() > SUM_TOLERANCE)
            .then(pl.format("ihc sums to {} instead of 1", pl.col("total").round(9)))
        )
        .filter(pl.col("reason").is_not_null())
        .select("conversion_id", "reason")
        .sort("conversion_id")
    )


def attribute_locally(
    journeys: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None = None,
) -> AttributionOutcome:
    """The built-in IHC model over all journeys at once."""
    results = compute_ihc(journeys, params, redistribution)
    return AttributionOutcome(
        provider="local",
        results=results.select(RESULT_COLUMNS),
        failed=pl.DataFrame(schema={"conversion_id": pl.String, "reason": pl.String}),
        stats={"sessions": journeys.height},
    )


@task(name="attribute-with-local-ihc-model", cache_policy=NO_CACHE)
def attribute_locally_task(
    journeys: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None = None,
) -> AttributionOutcome:
    return attribute_locally(journeys, params, redistribution)
