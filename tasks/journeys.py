"""Each conversion's customer journey: its user's sessions before it, in order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from config.settings import JourneySettings
from tasks.sources import Sources, conversions_in_range


@dataclass(frozen=True)
class JourneySet:
    """Journeys of the conversions in range, and the conversions that have none."""

    journeys: pl.DataFrame
    conversions_in_range: pl.DataFrame
    without_journey: pl.DataFrame

    @property
    def conversion_count(self) -> int:
        return self.journeys["conversion_id"].n_unique()


def build_journeys(
    sessions: pl.DataFrame,
    conversions: pl.DataFrame,
    *,
    start_date: date | None = None,
    end_date: date | None = None,
    include_equal_timestamps: bool = False,
    lookback_days: int | None = None,
) -> JourneySet:
    """Journeys per conversion, vectorised over all conversions at once.

    A journey holds the sessions of the conversion's user whose timestamp is strictly
    before the conversion's (at or before with ``include_equal_timestamps``), within
    ``lookback_days`` of it, ordered by (timestamp, session_id); its last session
    carries ``conversion = 1``. Journeys are per conversion: a session may sit in
    the journeys of two conversions of one user.
    """
    selected = conversions_in_range(conversions, start_date, end_date)
    before = (
        pl.col("ts") <= pl.col("conv_ts")
        if include_equal_timestamps
        else pl.col("ts") < pl.col("conv_ts")
    )
    if lookback_days is not None:
        before &= pl.col("ts") >= pl.col("conv_ts") - pl.duration(days=lookback_days)
    journeys = (
        selected.lazy()
        .select("conv_id", "user_id", "conv_ts", "revenue")
        .join(sessions.lazy(), on="user_id", how="inner")
        .filter(before)
        .sort("conv_id", "ts", "session_id")
        .with_columns(
            conversion=(
                pl.int_range(pl.len()).over("conv_id") == pl.len().over("conv_id") - 1
            ).cast(pl.Int8)
        )
        .select(
            pl.col("conv_id").alias("conversion_id"),
            "session_id",
            pl.col("ts").alias("timestamp"),
            pl.col("channel_name").alias("channel_label"),
            "holder_engagement",
            "closer_engagement",
            "impression_interaction",
            "conversion",
            "event_day",
            "revenue",
            pl.col("conv_ts").alias("conversion_timestamp"),
        )
        .collect()
        # Lazy results do not keep row order: the journey order is part of the contract.
        .sort("conversion_id", "timestamp", "session_id")
    )
    without = (
        selected.join(
            journeys.select(pl.col("conversion_id").alias("conv_id")).unique(),
            on="conv_id",
            how="anti",
        )
        .select("conv_id", "user_id", "conv_ts", "revenue")
        .sort("conv_id")
    )
    return JourneySet(
        journeys=journeys,
        conversions_in_range=selected.select("conv_id", "revenue").sort("conv_id"),
        without_journey=without,
    )


@task(name="build-customer-journeys", cache_policy=NO_CACHE)
def build_journeys_task(
    sources: Sources,
    start_date: date | None,
    end_date: date | None,
    settings: JourneySettings,
) -> JourneySet:
    journey_set = build_journeys(
        sources.sessions,
        sources.conversions,
        start_date=start_date,
        end_date=end_date,
        include_equal_timestamps=settings.include_equal_timestamps,
        lookback_days=settings.lookback_days,
    )
    unattributed = journey_set.without_journey.height
    if unattributed:
        get_run_logger().info(
            "%d conversion(s) have no session before them and stay unattributed", unattributed
        )
    return journey_set
