"""The attribution models: the spec's worked examples, properties, and the comparison file."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from config.settings import ModelsSettings
from tasks.models import (
    COMPARISON_SCHEMA,
    _chain,
    _encode,
    compare_models,
    model_names,
    write_comparison,
)
from tasks.paths import conversion_paths, distinct_paths

BASE = datetime(2023, 9, 10, 12)
ALL_MODELS = [
    "last_touch",
    "first_touch",
    "linear",
    "position",
    "time_decay",
    "markov_1",
    "markov_2",
    "markov_3",
    "shapley",
    "ihc",
]
JOURNEY_SCHEMA = {
    "conversion_id": pl.String,
    "session_id": pl.String,
    "timestamp": pl.Datetime("us"),
    "channel_label": pl.String,
    "revenue": pl.Float64,
    "conversion_timestamp": pl.Datetime("us"),
}
Conversion = tuple[Sequence[str], float]


def journeys(conversions: Sequence[Conversion], days_before: Sequence[float] = ()) -> pl.DataFrame:
    """One journey per (channels, revenue); sessions a day apart, the last a day before
    its conversion, unless ``days_before`` gives each session's distance in days."""
    rows = []
    for number, (channels, revenue) in enumerate(conversions):
        gaps = days_before or range(len(channels), 0, -1)
        for position, (channel, gap) in enumerate(zip(channels, gaps, strict=True)):
            rows.append(
                (
                    f"c{number:04d}",
                    f"c{number:04d}-s{position}",
                    BASE - timedelta(days=gap),
                    channel,
                    revenue,
                    BASE,
                )
            )
    return pl.DataFrame(rows, schema=JOURNEY_SCHEMA, orient="row")


def repeated(*paths: tuple[str, int], revenue: float = 1.0) -> list[Conversion]:
    """``count`` conversions of each ``"A>B"`` path."""
    return [(path.split(">"), revenue) for path, count in paths for _ in range(count)]


def nulls(*paths: tuple[str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"path": [p.split(">") for p, _ in paths], "nulls": [n for _, n in paths]},
        schema={"path": pl.List(pl.String), "nulls": pl.Int64},
    )


def linear_ihc(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("conversion_id", "session_id", ihc=1.0 / pl.len().over("conversion_id"))


def run(
    journey_frame: pl.DataFrame,
    null_frame: pl.DataFrame | None = None,
    costs: pl.DataFrame | None = None,
    ihc_rows: pl.DataFrame | None = None,
    **options: object,
) -> pl.DataFrame:
    return compare_models(
        journey_frame,
        linear_ihc(journey_frame) if ihc_rows is None else ihc_rows,
        nulls() if null_frame is None else null_frame,
        pl.DataFrame(schema={"channel_name": pl.String, "cost": pl.Float64})
        if costs is None
        else costs,
        ModelsSettings(**{"bootstrap_resamples": 0, **options}),
    )


def credit(frame: pl.DataFrame, model: str, column: str = "conversions") -> dict[str, float]:
    rows = frame.filter(pl.col("model") == model)
    values = zip(rows["channel_name"], rows[column], strict=True)
    return {name: round(value, 6) for name, value in values}


# ---- the spec's worked examples ----


def test_loop_example() -> None:
    frame = run(journeys(repeated(("A>B>A>B>B>A", 1), ("A>B>B>A>A", 1), ("A>A", 1))))
    assert credit(frame, "markov_1") == {"A": 2.0, "B": 1.0}
    assert credit(frame, "linear") == {"A": 2.1, "B": 0.9}
    assert credit(frame, "first_touch") == {"A": 3.0, "B": 0.0}
    assert credit(frame, "last_touch") == {"A": 3.0, "B": 0.0}


def removal_effects(
    conversions: list[Conversion], null_frame: pl.DataFrame, order: int
) -> dict[str, float]:
    distinct = distinct_paths(conversion_paths(journeys(conversions)), null_frame)
    channels = sorted(set(distinct["path"].explode().to_list()))
    paths = _encode(distinct, channels)
    chain = _chain(paths, order)
    probabilities = chain.conversion_probabilities(chain.usage @ np.ones(paths.count))
    effects = 1 - probabilities[1:] / probabilities[0]
    return dict(zip(channels, np.round(effects, 9).tolist(), strict=True))


def test_two_channel_example() -> None:
    conversions = repeated(("google ads", 2), ("mailing", 1), ("google ads>mailing", 1))
    null_frame = nulls(("google ads", 1))
    assert removal_effects(conversions, null_frame, 1) == {"google ads": 0.75, "mailing": 0.5}
    frame = run(journeys(conversions), null_frame)
    assert credit(frame, "markov_1") == {"google ads": 2.4, "mailing": 1.6}
    assert credit(frame, "linear") == {"google ads": 2.5, "mailing": 1.5}
    assert credit(frame, "shapley") == {"google ads": 2.5, "mailing": 1.5}


def test_time_decay_and_position_example() -> None:
    conversion = [(["T38", "T33", "T26", "T8", "T0"], 12_000.0)]
    frame = run(journeys(conversion, days_before=[38, 33, 26, 8, 0]))
    decay = {
        name: round(value, 2) for name, value in credit(frame, "time_decay", "revenue").items()
    }
    assert decay == {"T38": 175.20, "T33": 287.44, "T26": 574.88, "T8": 3417.04, "T0": 7545.45}
    assert credit(frame, "position", "revenue") == {
        "T38": 4800.0,
        "T33": 800.0,
        "T26": 800.0,
        "T8": 800.0,
        "T0": 4800.0,
    }


def test_time_decay_follows_the_half_life_setting() -> None:
    conversion = [(["Old", "New"], 300.0)]
    frame = run(journeys(conversion, days_before=[2, 0]), time_decay_half_life_days=2.0)
    assert credit(frame, "time_decay", "revenue") == {"New": 200.0, "Old": 100.0}


def test_position_with_one_and_two_sessions() -> None:
    frame = run(journeys([(["A"], 10.0), (["A", "B"], 10.0)]))
    assert credit(frame, "position", "revenue") == {"A": 15.0, "B": 5.0}


def test_shapley_example() -> None:
    conversions = repeated(("A", 10), ("B", 5), ("A>B", 6), ("A>B>C", 9), revenue=2.0)
    frame = run(journeys(conversions))
    assert credit(frame, "shapley") == {"A": 16.0, "B": 11.0, "C": 3.0}
    assert credit(frame, "shapley", "revenue") == {"A": 32.0, "B": 22.0, "C": 6.0}


def test_shapley_counts_a_repeated_channel_once() -> None:
    frame = run(journeys(repeated(("A>A>A>B", 1))))
    assert credit(frame, "shapley") == {"A": 0.5, "B": 0.5}
    assert credit(frame, "linear") == {"A": 0.75, "B": 0.25}


def test_a_channel_seen_only_in_null_paths_leads_into_conversions_under_markov() -> None:
    # start → Z → A and start → A; A converts half the time. Without Z, the half of the
    # walks that start at Z never reach A: RE(Z) = 0.5, RE(A) = 1.
    frame = run(journeys(repeated(("A", 1))), nulls(("Z>A", 1)))
    assert credit(frame, "markov_1", "share") == {"A": round(2 / 3, 6), "Z": round(1 / 3, 6)}
    assert credit(frame, "linear") == {"A": 1.0, "Z": 0.0}


# ---- the absorbing chain against a dense solve built independently ----


def dense_removal_effects(
    conversions: Sequence[Sequence[str]], null_paths: Sequence[Sequence[str]], order: int
) -> dict[str, float]:
    counts: Counter[tuple[tuple[str, ...], object]] = Counter()
    for path, outcome in [(p, "conversion") for p in conversions] + [
        (p, "null") for p in null_paths
    ]:
        state: tuple[str, ...] = ()
        for position in range(len(path)):
            following = tuple(path[max(0, position - order + 1) : position + 1])
            counts[(state, following)] += 1
            state = following
        counts[(state, outcome)] += 1
    leaving: defaultdict[tuple[str, ...], float] = defaultdict(float)
    for (state, _), count in counts.items():
        leaving[state] += count
    states = sorted(leaving)
    index = {state: i for i, state in enumerate(states)}

    def converts(removed: str | None) -> float:
        matrix = np.eye(len(states))
        absorbed = np.zeros(len(states))
        for (state, target), count in counts.items():
            if removed in state:
                continue
            if target == "conversion":
                absorbed[index[state]] += count / leaving[state]
            elif target != "null":
                matrix[index[state], index[target]] -= count / leaving[state]
        return float(np.linalg.solve(matrix, absorbed)[index[()]])

    full = converts(None)
    channels = sorted({c for p in [*conversions, *null_paths] for c in p})
    return {c: 1 - converts(c) / full for c in channels}


paths_strategy = st.lists(
    st.lists(st.sampled_from("ABCD"), min_size=1, max_size=6), min_size=1, max_size=12
)


@settings(max_examples=40, deadline=None)
@given(conversions=paths_strategy, null_paths=paths_strategy, order=st.integers(1, 3))
def test_markov_matches_a_dense_solve(
    conversions: list[list[str]], null_paths: list[list[str]], order: int
) -> None:
    null_frame = pl.DataFrame(
        {"path": null_paths, "nulls": [1] * len(null_paths)},
        schema={"path": pl.List(pl.String), "nulls": pl.Int64},
    )
    found = removal_effects([(p, 1.0) for p in conversions], null_frame, order)
    expected = dense_removal_effects(conversions, null_paths, order)
    assert found == pytest.approx(expected, abs=1e-9)


# ---- properties ----

conversions_strategy = st.lists(
    st.tuples(
        st.lists(st.sampled_from(["A", "B", "C"]), min_size=1, max_size=5),
        st.floats(0, 1000, allow_nan=False).map(lambda r: round(r, 2)),
    ),
    min_size=1,
    max_size=15,
)
null_strategy = st.lists(
    st.tuples(
        st.lists(st.sampled_from(["A", "B", "C", "N"]), min_size=1, max_size=5),
        st.integers(1, 5),
    ),
    max_size=10,
)
COSTS = pl.DataFrame({"channel_name": ["A", "B", "Spend only"], "cost": [100.0, 0.0, 50.0]})


def nulls_frame(rows: list[tuple[list[str], int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"path": [p for p, _ in rows], "nulls": [n for _, n in rows]},
        schema={"path": pl.List(pl.String), "nulls": pl.Int64},
    )


@settings(max_examples=30, deadline=None)
@given(conversions=conversions_strategy, null_rows=null_strategy)
def test_every_model_attributes_every_conversion_and_euro(
    conversions: list[Conversion], null_rows: list[tuple[list[str], int]]
) -> None:
    frame = run(journeys(conversions), nulls_frame(null_rows), COSTS, bootstrap_resamples=3)
    totals = frame.group_by("model").agg(pl.col("conversions", "revenue").sum())
    assert sorted(totals["model"]) == sorted(ALL_MODELS)
    assert totals["conversions"].to_list() == pytest.approx([len(conversions)] * len(ALL_MODELS))
    revenue = sum(r for _, r in conversions)
    assert totals["revenue"].to_list() == pytest.approx([revenue] * len(ALL_MODELS), abs=1e-6)
    # Never in a converting path: nothing, under any model ("N" only leads into null
    # paths' states under Markov, which can credit it).
    never = frame.filter(pl.col("channel_name") == "Spend only")
    assert never["conversions"].to_list() == [0.0] * len(ALL_MODELS)
    assert never["revenue"].to_list() == [0.0] * len(ALL_MODELS)
    assert never["cost"].to_list() == [50.0] * len(ALL_MODELS)
    null_only = frame.filter(
        (pl.col("channel_name") == "N") & ~pl.col("model").str.starts_with("markov")
    )
    assert null_only["conversions"].to_list() == [0.0] * len(null_only)
    numbers = frame.select(pl.col(pl.Float64))
    assert not any(numbers.select(pl.all().is_nan().any() | pl.all().is_infinite().any()).row(0))


@settings(max_examples=15, deadline=None)
@given(conversions=conversions_strategy, null_rows=null_strategy, seed=st.integers(0, 2**32))
def test_results_do_not_depend_on_row_order(
    conversions: list[Conversion], null_rows: list[tuple[list[str], int]], seed: int
) -> None:
    journey_frame = journeys(conversions)
    null_frame = nulls_frame(null_rows)
    ihc_rows = linear_ihc(journey_frame)
    first = run(journey_frame, null_frame, COSTS, ihc_rows, bootstrap_resamples=5)
    shuffled = run(
        journey_frame.sample(fraction=1.0, shuffle=True, seed=seed),
        null_frame.sample(fraction=1.0, shuffle=True, seed=seed + 1),
        COSTS.reverse(),
        ihc_rows.sample(fraction=1.0, shuffle=True, seed=seed + 2),
        bootstrap_resamples=5,
    )
    assert_frame_equal(shuffled, first, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)


# ---- bootstrap ----

SAMPLE = journeys(
    repeated(
        *[("A", 40), ("B", 25), ("A>B", 20), ("B>C>A", 10), ("C", 5), ("B>A", 12)],
        *[("C>A", 8), ("A>A>B", 6), ("C>B", 9), ("A>C", 7), ("B>B", 11), ("C>C>A", 4)],
        revenue=10.0,
    )
)
SAMPLE_NULLS = nulls(("A", 300), ("B>A", 120), ("C", 80), ("C>C", 40))


def test_bootstrap_is_reproducible_by_seed() -> None:
    first = run(SAMPLE, SAMPLE_NULLS, bootstrap_resamples=50, bootstrap_seed=7)
    again = run(SAMPLE, SAMPLE_NULLS, bootstrap_resamples=50, bootstrap_seed=7)
    other = run(SAMPLE, SAMPLE_NULLS, bootstrap_resamples=50, bootstrap_seed=8)
    assert_frame_equal(again, first)
    for model in ALL_MODELS:
        interval = pl.col("share_low", "share_high").filter(pl.col("model") == model)
        assert not first.select(interval).equals(other.select(interval))


def test_intervals_surround_the_share_and_lie_in_0_1() -> None:
    frame = run(SAMPLE, SAMPLE_NULLS, bootstrap_resamples=200)
    assert frame["share_low"].null_count() == 0
    assert (frame["share_low"] <= frame["share"] + 1e-12).all()
    assert (frame["share"] <= frame["share_high"] + 1e-12).all()
    assert (frame["share_low"] >= 0).all()
    assert (frame["share_high"] <= 1).all()


def test_no_resamples_no_interval() -> None:
    frame = run(SAMPLE, SAMPLE_NULLS, bootstrap_resamples=0)
    assert frame["share_low"].null_count() == frame.height
    assert frame["share_high"].null_count() == frame.height


def test_heuristic_intervals_do_not_depend_on_markov_running() -> None:
    with_markov = run(SAMPLE, SAMPLE_NULLS, bootstrap_resamples=30)
    without = run(
        SAMPLE, SAMPLE_NULLS, bootstrap_resamples=30, include=["linear", "shapley", "ihc"]
    )
    assert_frame_equal(
        without, with_markov.filter(pl.col("model").is_in(["linear", "shapley", "ihc"]))
    )


# ---- the ihc model, costs, order, output ----


def test_ihc_sums_the_attribution_rows_of_the_runs_journeys() -> None:
    journey_frame = journeys([(["A", "B"], 100.0), (["B"], 50.0), (["A"], 20.0)])
    ihc_rows = pl.DataFrame(
        {
            "conversion_id": ["c0000", "c0000", "c0001", "other"],
            "session_id": ["c0000-s0", "c0000-s1", "c0001-s0", "x"],
            "ihc": [0.25, 0.75, 1.0, 1.0],
        }
    )
    # c0002 has no attribution rows (failed): not in ihc's totals; "other" is no journey.
    frame = run(journey_frame, ihc_rows=ihc_rows)
    assert credit(frame, "ihc") == {"A": 0.25, "B": 1.75}
    assert credit(frame, "ihc", "revenue") == {"A": 25.0, "B": 125.0}
    assert credit(frame, "ihc", "share") == {"A": 0.125, "B": 0.875}


def test_costs_cpo_and_roas() -> None:
    costs = pl.DataFrame({"channel_name": ["A", "B", "B", "D"], "cost": [30.0, 0.0, 0.0, 8.0]})
    frame = run(journeys([(["A"], 60.0), (["C"], 10.0)]), costs=costs, include=["last_touch"])
    assert_frame_equal(
        frame,
        pl.DataFrame(
            {
                "model": ["last_touch"] * 4,
                "channel_name": ["A", "B", "C", "D"],
                "conversions": [1.0, 0.0, 1.0, 0.0],
                "revenue": [60.0, 0.0, 10.0, 0.0],
                "share": [0.5, 0.0, 0.5, 0.0],
                "share_low": [None] * 4,
                "share_high": [None] * 4,
                "cost": [30.0, 0.0, 0.0, 8.0],
                "cpo": [30.0, None, 0.0, None],
                "roas": [2.0, None, None, 0.0],
            },
            schema=COMPARISON_SCHEMA,
        ),
    )


def test_models_come_in_the_spec_order() -> None:
    frame = run(journeys(repeated(("B>A", 2))), include=list(reversed(ModelsSettings().include)))
    assert frame["model"].unique(maintain_order=True).to_list() == ALL_MODELS
    assert frame["channel_name"].to_list() == ["A", "B"] * len(ALL_MODELS)
    assert model_names(ModelsSettings(include=["markov", "ihc"], markov_orders=[2])) == [
        "markov_2",
        "ihc",
    ]


def test_disabled_comparison_is_empty() -> None:
    frame = run(journeys(repeated(("A", 1))), enabled=False)
    assert frame.is_empty()
    assert frame.schema == pl.Schema(COMPARISON_SCHEMA)


def test_no_conversions_gives_zero_credit_and_no_share() -> None:
    empty = journeys([])
    frame = run(empty, nulls(("A>B", 3)), COSTS, bootstrap_resamples=5)
    assert frame.height == len(ALL_MODELS) * 3
    assert frame["conversions"].to_list() == [0.0] * frame.height
    assert frame["share"].null_count() == frame.height
    assert frame["share_low"].null_count() == frame.height


def test_write_comparison(tmp_path: Path) -> None:
    frame = run(SAMPLE, SAMPLE_NULLS, COSTS, bootstrap_resamples=10)
    written = write_comparison(frame, tmp_path / "output")
    assert [p.name for p in written] == ["model_comparison.csv", "model_comparison.parquet"]
    assert_frame_equal(pl.read_parquet(written[1]), frame)
    assert_frame_equal(pl.read_csv(written[0], schema=COMPARISON_SCHEMA), frame)
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == [
        "model_comparison.csv",
        "model_comparison.parquet",
    ]


def test_a_range_without_sessions_or_spend_compares_nothing() -> None:
    journeys = pl.DataFrame(schema=JOURNEY_SCHEMA)
    ihc = pl.DataFrame(
        schema={"conversion_id": pl.String, "session_id": pl.String, "ihc": pl.Float64}
    )
    nulls = pl.DataFrame(schema={"path": pl.List(pl.String), "nulls": pl.Int64})
    no_costs = pl.DataFrame(schema={"channel_name": pl.String, "cost": pl.Float64})
    assert compare_models(journeys, ihc, nulls, no_costs, ModelsSettings()).is_empty()
    # Spend without conversions: every model gives every channel 0, shares unknown.
    costs = pl.DataFrame({"channel_name": ["A", "B"], "cost": [1.0, 2.0]})
    frame = compare_models(journeys, ihc, nulls, costs, ModelsSettings())
    assert frame["conversions"].to_list() == [0.0] * frame.height
    assert frame["share"].null_count() == frame.height
    assert frame["cpo"].null_count() == frame.height


def test_model_costs_are_the_spend_of_the_range_session_dates() -> None:
    from datetime import date

    from tasks.comparison import channel_costs

    report = pl.DataFrame(
        {
            "channel_name": ["A", "A", "B", "B"],
            "date": [date(2023, 9, 1), date(2023, 9, 2), date(2023, 9, 2), date(2023, 9, 3)],
            "cost": [1.0, 2.0, 4.0, 8.0],
        }
    )

    def costs(start: date | None, end: date | None) -> list[tuple[str, float]]:
        return channel_costs(report, start, end).rows()

    assert costs(None, None) == [("A", 3.0), ("B", 12.0)]
    assert costs(date(2023, 9, 2), None) == [("A", 2.0), ("B", 12.0)]
    assert costs(None, date(2023, 9, 2)) == [("A", 3.0), ("B", 4.0)]
    assert costs(date(2023, 9, 3), date(2023, 9, 3)) == [("B", 8.0)]
