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


def rows_frame(rows: list[dict[str, Any]], schema: pl.Schema) -> pl.DataFrame:
    """JSON rows (dicts) as typed columns: missing keys and values of the wrong type become null.

    Built in one go from the rows; when a value is one polars cannot convert row-wise
    (a list or an object, text for a number, a huge integer), column by column instead,
    where such values become null.
    """
    try:
        return pl.DataFrame(rows, schema=schema, strict=False)
    except pl.exceptions.PolarsError:
        return pl.DataFrame(
            [
                pl.Series(name, [row.get(name) for row in rows], dtype=dtype, strict=False)
                for name, dtype in schema.items()
            ]
        )


def check_results(sent: pl.DataFrame, results: pl.DataFrame) -> pl.DataFrame:
    """[conversion_id, reason] of the sent conversions whose results break the contract.

    Every returned (conversion_id, session_id) must have been sent, every sent session
    must come back once, each ihc must be a number in [0, 1] and each conversion's ihc
    sum to 1 (within 1e-6). Failing conversions are reported, never renormalised.
    ``sent`` holds the pairs of the conversions expected back; ``results`` only rows of
    those conversions. One implementation for both providers.
    """
    return invalid_results(sent.lazy(), results.lazy()).collect(engine="in-memory")


def invalid_results(
    sent: pl.LazyFrame, results: pl.LazyFrame, *, aligned: bool = False
) -> pl.LazyFrame:
    """``check_results`` as a query, to be collected together with others.

    With ``aligned`` the caller has made sure that ``results`` holds exactly the sent
    pairs, each once (row for row the same ids as ``sent``): only the values are
    checked, without matching pairs.
    """
    ihc = pl.col("ihc")
    values = {
        "no_value": (pl.col("_got") & (ihc.is_null() | ihc.is_nan())).fill_null(False).sum(),
        "out_of_range": ((ihc < 0) | (ihc > 1)).fill_null(False).sum(),
        "total": ihc.sum(),
    }
    got = results.select("conversion_id", "session_id", "ihc").with_columns(_got=pl.lit(True))
    if aligned:
        counts = got.group_by("conversion_id").agg(
            unsent=pl.lit(0), missing=pl.lit(0), repeated=pl.lit(0), **values
        )
    else:
        sent_pairs = sent.select("conversion_id", "session_id").with_columns(_sent=pl.lit(True))
        pairs = sent_pairs.join(got, on=["conversion_id", "session_id"], how="full", coalesce=True)
        counts = pairs.group_by("conversion_id").agg(
            unsent=pl.col("_sent").is_null().sum(),
            missing=pl.col("_got").is_null().sum(),
            repeated=pl.col("session_id").is_duplicated().sum(),
            **values,
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
    )


def attribute_locally(
    journeys: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None = None,
) -> AttributionOutcome:
    """The built-in IHC model over all journeys at once."""
    results = compute_ihc(journeys, params, redistribution).select(RESULT_COLUMNS)
    failed = check_results(journeys, results)
    return AttributionOutcome(
        provider="local",
        results=results.join(failed, on="conversion_id", how="anti"),
        failed=failed,
        stats={"sessions": journeys.height},
    )


@task(name="attribute-with-local-ihc-model", cache_policy=NO_CACHE)
def attribute_locally_task(
    journeys: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None = None,
) -> AttributionOutcome:
    return attribute_locally(journeys, params, redistribution)
