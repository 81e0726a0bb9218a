"""Requests for the IHC API: whole journeys packed into as few batches as the limits allow.

Packing is greedy in journey order: a batch takes journeys until the next one would
break the journey or the session cap. For batches that keep the journeys' order
(contiguous runs of journeys) this greedy cut is optimal — no order-preserving
packing has fewer batches — and any two neighbouring batches together exceed a
limit. The loop runs once per batch and finds each cut by bisection over the
cumulative session counts, so 20k journeys pack in a few milliseconds.

Journeys longer than the session cap follow ``long_journey_policy``: ``keep_recent``
keeps the most recent ``max_sessions`` sessions (the converting one is the last, so
it stays) and reports the conversion as truncated; ``fail`` leaves the journey out
and reports the conversion as failed with the reason.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Literal

import polars as pl

LongJourneyPolicy = Literal["keep_recent", "fail"]
FAILED_SCHEMA = pl.Schema({"conversion_id": pl.String, "reason": pl.String})


@dataclass(frozen=True)
class PackResult:
    """Journeys ready to send, cut into batches, and what packing changed.

    ``sessions`` holds every journey that is sent (truncated ones already cut), in
    input order; batch ``i`` is rows ``bounds[i][0]:bounds[i][1]`` of it.
    """

    sessions: pl.DataFrame
    bounds: list[tuple[int, int]]
    # How many journeys (conversions) ``sessions`` holds.
    journeys: int = 0
    truncated: list[str] = field(default_factory=list)
    failed: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=FAILED_SCHEMA))

    @property
    def batches(self) -> Iterator[pl.DataFrame]:
        """Each batch as a zero-copy slice of ``sessions``."""
        return (self.sessions.slice(start, end - start) for start, end in self.bounds)

    def __len__(self) -> int:
        return len(self.bounds)


def cut_points(sizes: list[int], max_journeys: int, max_sessions: int) -> list[int]:
    """Journey indices where batches start, plus the end: greedy, order-preserving.

    Every size must be at most ``max_sessions``.
    """
    return _cuts([0, *accumulate(sizes)], max_journeys, max_sessions)


def _cuts(cumulative: list[int], max_journeys: int, max_sessions: int) -> list[int]:
    """``cut_points`` from the cumulative sizes ``[0, s0, s0 + s1, …]``."""
    journeys = len(cumulative) - 1
    cuts = [0]
    start = 0
    while start < journeys:
        # Largest end with cumulative[end] - cumulative[start] <= max_sessions.
        by_sessions = bisect_right(cumulative, cumulative[start] + max_sessions) - 1
        start = min(start + max_journeys, by_sessions, journeys)
        cuts.append(start)
    return cuts


def pack_batches(
    journeys: pl.DataFrame,
    max_journeys: int,
    max_sessions: int,
    long_journey_policy: LongJourneyPolicy,
) -> PackResult:
    """Cut ``journeys`` (sorted by conversion_id, timestamp, session_id) into batches.

    Each batch holds at most ``max_journeys`` whole journeys and ``max_sessions``
    sessions. ``ValueError`` if a conversion's rows are not contiguous, which would
    mean the frame is not sorted and a journey could be split.
    """
    if max_journeys < 1 or max_sessions < 1:
        raise ValueError("max_journeys and max_sessions must be at least 1")
    if journeys.height == 0:
        return PackResult(sessions=journeys, bounds=[])
    runs = (
        journeys.select(pl.col("conversion_id").rle().alias("run"))
        .unnest("run")
        .rename({"len": "sessions", "value": "id"})
    )
    # Runs of a frame sorted by conversion_id have distinct ids; only another order
    # needs the (dearer) count of distinct ids.
    ids = runs["id"]
    if not ids.is_sorted() and runs.height != ids.n_unique():
        raise ValueError("journeys must be sorted by conversion_id: a conversion's rows are split")
    truncated: list[str] = []
    failed = pl.DataFrame(schema=FAILED_SCHEMA)
    sessions = journeys
    if runs["sessions"].max() > max_sessions:
        long = runs.filter(pl.col("sessions") > max_sessions)
        if long_journey_policy == "keep_recent":
            truncated = long["id"].to_list()
            # Rows are in time order within a journey: keep the last max_sessions.
            # Rows left to the end of its journey = journey end offset - row index.
            run_end = pl.lit(runs["sessions"].cum_sum()).gather(pl.col("conversion_id").rle_id())
            sessions = journeys.filter(run_end - pl.int_range(pl.len()) <= max_sessions)
        else:
            failed = long.select(
                pl.col("id").alias("conversion_id"),
                pl.format(
                    "journey has {} sessions, more than max_sessions_per_request ({}) "
                    "and long_journey_policy is 'fail'",
                    "sessions",
                    pl.lit(max_sessions),
                ).alias("reason"),
            )
            sessions = journeys.filter(
                ~pl.col("conversion_id").is_in(failed["conversion_id"].implode())
            )
            runs = runs.filter(pl.col("sessions") <= max_sessions)
    sizes = runs["sessions"].clip(upper_bound=max_sessions)
    row_offsets = [0, *sizes.cum_sum().to_list()]
    cuts = _cuts(row_offsets, max_journeys, max_sessions)
    bounds = [(row_offsets[a], row_offsets[b]) for a, b in pairwise(cuts)]
    return PackResult(
        sessions=sessions,
        bounds=bounds,
        journeys=len(sizes),
        truncated=truncated,
        failed=failed,
    )
