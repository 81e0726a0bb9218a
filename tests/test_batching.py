"""Packing journeys into IHC API requests: whole journeys, limits held, few batches."""

from __future__ import annotations

import math
import time
from itertools import pairwise

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.batching import cut_points, pack_batches


def journeys_of(sizes: list[int]) -> pl.DataFrame:
    """Journey j has sizes[j] sessions in time order; the last one converts."""
    ids = [f"c{j:05d}" for j, size in enumerate(sizes) for _ in range(size)]
    return (
        pl.DataFrame({"conversion_id": ids}, schema={"conversion_id": pl.String})
        .with_columns(position=pl.int_range(pl.len()).over("conversion_id"))
        .with_columns(
            session_id=pl.format("{}-{}", "conversion_id", "position"),
            conversion=(pl.col("position") == pl.len().over("conversion_id") - 1).cast(pl.Int8),
        )
    )


journey_sizes = st.lists(st.integers(min_value=1, max_value=40), max_size=120)
limits = st.tuples(st.integers(1, 12), st.integers(1, 60))


@settings(max_examples=300, deadline=None)
@given(sizes=journey_sizes, limit=limits)
def test_every_journey_whole_in_one_batch_in_order_within_limits(
    sizes: list[int], limit: tuple[int, int]
) -> None:
    max_journeys, max_sessions = limit
    packed = pack_batches(journeys_of(sizes), max_journeys, max_sessions, "keep_recent")
    batches = list(packed.batches)
    seen: list[str] = []
    for batch in batches:
        ids = batch["conversion_id"].unique(maintain_order=True).to_list()
        assert len(ids) <= max_journeys
        assert batch.height <= max_sessions
        seen += ids
    # Exactly once each, in input order: no journey split or reordered.
    assert seen == [f"c{j:05d}" for j in range(len(sizes))]
    sent = packed.sessions.group_by("conversion_id").len()
    expected = {f"c{j:05d}": min(size, max_sessions) for j, size in enumerate(sizes)}
    assert dict(sent.iter_rows()) == expected


def fewest_ordered_batches(sizes: list[int], max_journeys: int, max_sessions: int) -> int:
    """The fewest batches of consecutive journeys within the limits (dynamic programming)."""
    best = [0] + [len(sizes) + 1] * len(sizes)
    for end in range(1, len(sizes) + 1):
        for start in range(max(0, end - max_journeys), end):
            if sum(sizes[start:end]) <= max_sessions:
                best[end] = min(best[end], best[start] + 1)
    return best[-1]


@settings(max_examples=300, deadline=None)
@given(sizes=journey_sizes, limit=limits)
def test_packing_is_minimal_among_order_preserving_packings(
    sizes: list[int], limit: tuple[int, int]
) -> None:
    max_journeys, max_sessions = limit
    capped = [min(size, max_sessions) for size in sizes]
    packed = pack_batches(journeys_of(sizes), max_journeys, max_sessions, "keep_recent")
    batches = list(packed.batches)
    # Greedy: the first journey of each batch did not fit into the one before.
    for before, after in pairwise(batches):
        first = after.filter(pl.col("conversion_id") == after["conversion_id"][0]).height
        assert (
            before["conversion_id"].n_unique() + 1 > max_journeys
            or before.height + first > max_sessions
        )
    lower_bound = max(math.ceil(len(sizes) / max_journeys), math.ceil(sum(capped) / max_sessions))
    assert len(packed) >= lower_bound
    assert len(packed) == fewest_ordered_batches(capped, max_journeys, max_sessions)


def test_cut_points_on_hand_made_cases() -> None:
    assert cut_points([5, 1, 1, 5, 2, 2, 2, 9], 3, 9) == [0, 3, 6, 7, 8]
    assert cut_points([1] * 9, 4, 100) == [0, 4, 8, 9]
    assert cut_points([9, 9, 9], 5, 9) == [0, 1, 2, 3]
    assert cut_points([], 2, 2) == [0]


def test_long_journey_keeps_its_most_recent_sessions_and_the_conversion() -> None:
    journeys = journeys_of([3, 12, 2])
    packed = pack_batches(
        journeys, max_journeys=10, max_sessions=5, long_journey_policy="keep_recent"
    )
    assert packed.truncated == ["c00001"]
    kept = packed.sessions.filter(pl.col("conversion_id") == "c00001")
    assert kept["position"].to_list() == [7, 8, 9, 10, 11]
    assert kept["conversion"].to_list() == [0, 0, 0, 0, 1]
    assert packed.failed.height == 0
    assert [batch.height for batch in packed.batches] == [3, 5, 2]


def test_long_journey_fails_with_a_reason_under_policy_fail() -> None:
    packed = pack_batches(journeys_of([3, 12, 2, 6]), 10, 5, "fail")
    assert packed.failed["conversion_id"].to_list() == ["c00001", "c00003"]
    assert packed.failed["reason"][0] == (
        "journey has 12 sessions, more than max_sessions_per_request (5) "
        "and long_journey_policy is 'fail'"
    )
    assert packed.truncated == []
    assert packed.sessions["conversion_id"].unique(maintain_order=True).to_list() == [
        "c00000",
        "c00002",
    ]
    assert packed.bounds == [(0, 5)]


def test_rows_of_one_conversion_apart_are_refused() -> None:
    unsorted = journeys_of([2, 2]).sort("position")
    with pytest.raises(ValueError, match="sorted by conversion_id"):
        pack_batches(unsorted, 10, 100, "keep_recent")
    # Grouped by conversion in another order (another collation, say): whole journeys.
    grouped = journeys_of([2, 3, 1]).sort("conversion_id", "position", descending=[True, False])
    packed = pack_batches(grouped, 2, 100, "keep_recent")
    assert packed.bounds == [(0, 4), (4, 6)]
    assert packed.journeys == 3


def test_no_journeys_give_no_batches() -> None:
    packed = pack_batches(journeys_of([]), 10, 100, "keep_recent")
    assert packed.bounds == []
    assert list(packed.batches) == []


def test_twenty_thousand_journeys_pack_in_well_under_100_ms() -> None:
    sizes = [1 + (j * 7919) % 13 for j in range(20_000)]
    sizes[123] = 5_000
    journeys = journeys_of(sizes)
    pack_batches(journeys, 100, 3000, "keep_recent")
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        packed = pack_batches(journeys, 100, 3000, "keep_recent")
        best = min(best, time.perf_counter() - started)
    assert len(packed) >= 200
    assert best < 0.1
