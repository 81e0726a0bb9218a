"""The local IHC model: hand-computed journeys, a per-journey reference, and its invariants."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from config.settings import (
    LocalModelSettings,
    PhaseWeights,
    RedistributionParameter,
    RedistributionRule,
)
from tasks.local_model import OUTPUT_SCHEMA, PHASES, compute_ihc

T0 = datetime(2024, 3, 1, 8, 0)
DIRECT = "Direct Traffic"
CHANNELS = [DIRECT, "SEO", "SEA", "Email"]
# Session: (session_id, hours after T0, channel, holder, closer, impression, conversion).
Session = tuple[str, float, str, int, int, int, int]


def sessions_frame(journeys: dict[str, Sequence[Session]]) -> pl.DataFrame:
    rows = [
        {
            "conversion_id": conversion_id,
            "session_id": session_id,
            "timestamp": T0 + timedelta(hours=hours),
            "channel_label": channel,
            "holder_engagement": h,
            "closer_engagement": c,
            "impression_interaction": m,
            "conversion": conversion,
        }
        for conversion_id, sessions in journeys.items()
        for session_id, hours, channel, h, c, m, conversion in sessions
    ]
    return pl.DataFrame(
        rows,
        schema={
            "conversion_id": pl.String,
            "session_id": pl.String,
            "timestamp": pl.Datetime("us"),
            "channel_label": pl.String,
            "holder_engagement": pl.Int64,
            "closer_engagement": pl.Int64,
            "impression_interaction": pl.Int64,
            "conversion": pl.Int64,
        },
    )


def expected_frame(rows: list[tuple[str, str, float, float, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=OUTPUT_SCHEMA, orient="row")


def closer_rule(direction: str, threshold: float = 0.0) -> RedistributionParameter:
    return RedistributionParameter(
        closer=RedistributionRule(
            direction=direction,
            receive_threshold=threshold,
            redistribution_channel_labels=[DIRECT],
        )
    )


# --- worked examples -------------------------------------------------------------


def test_one_session_journey_gets_everything() -> None:
    # rI = 1; rH = 1·(1 − 1/2) = 0.5 → share 1; rC = 1/(1 + 0) = 1 (d = 0) → share 1.
    # All phases present: ihc = 0.35 + 0.38 + 0.27 = 1.
    # "b" has no engagement: only I is present, ihc = 0.35·1 / 0.35 = 1.
    frame = sessions_frame(
        {
            "a": [("s1", 0, "SEO", 1, 1, 0, 1)],
            "b": [("s9", 5, DIRECT, 0, 0, 0, 1)],
        }
    )
    expected = expected_frame([("a", "s1", 1.0, 1.0, 1.0, 1.0), ("b", "s9", 1.0, 0.0, 0.0, 1.0)])
    assert_frame_equal(compute_ihc(frame), expected)


def test_three_session_journey_by_hand() -> None:
    # s1 at 0 h, s2 at 264 h, s3 at 276 h (converts, impression).
    # rI = [1, ramp(264) = (264−48)/(480−48) = 0.5, ramp(12) = 0]      → I = [2/3, 1/3, 0]
    # rH = [1·(1 − 1/2), 1·(1 − 0.5/2), 0]  = [0.5, 0.75, 0]           → H = [0.4, 0.6, 0]
    # rC = [0, 1/(1 + (12/12)^0.5) = 0.5, 1/(1 + 0)·0.5 (impression)] → C = [0, 0.5, 0.5]
    # ihc = 0.35·I + 0.38·H + 0.27·C:
    #   s1 = 0.35·2/3 + 0.38·0.4 = 0.3853…; s2 = 0.35/3 + 0.38·0.6 + 0.27·0.5 = 0.4796…;
    #   s3 = 0.27·0.5 = 0.135.
    frame = sessions_frame(
        {
            "a": [
                ("s1", 0, "SEO", 1, 0, 0, 0),
                ("s2", 264, DIRECT, 1, 1, 0, 0),
                ("s3", 276, "SEA", 0, 1, 1, 1),
            ]
        }
    )
    expected = expected_frame(
        [
            ("a", "s1", 2 / 3, 0.4, 0.0, 0.35 * 2 / 3 + 0.38 * 0.4),
            ("a", "s2", 1 / 3, 0.6, 0.5, 0.35 / 3 + 0.38 * 0.6 + 0.27 * 0.5),
            ("a", "s3", 0.0, 0.0, 0.5, 0.27 * 0.5),
        ]
    )
    assert_frame_equal(compute_ihc(frame), expected)


def test_initializer_ramp_and_holder_without_closer() -> None:
    # Gaps 24 h, 264 h, 600 h → ramp 0 (below 48), 0.5, 1 (clipped).
    # rI = [1, 0, 0.5, 1], Σ 2.5 → I = [0.4, 0, 0.2, 0.4]
    # rH = 1 − rI/2 = [0.5, 1, 0.75, 0.5], Σ 2.75 → H = [2/11, 4/11, 3/11, 2/11]
    # No closer engagement: C absent, ihc = (0.35·I + 0.38·H) / 0.73.
    frame = sessions_frame(
        {
            "j": [
                ("a", 0, "SEO", 1, 0, 0, 0),
                ("b", 24, "SEO", 1, 0, 0, 0),
                ("c", 288, "SEO", 1, 0, 0, 0),
                ("d", 888, "SEO", 1, 0, 0, 1),
            ]
        }
    )
    shares = [("a", 0.4, 2 / 11), ("b", 0.0, 4 / 11), ("c", 0.2, 3 / 11), ("d", 0.4, 2 / 11)]
    expected = expected_frame(
        [("j", s, i, h, 0.0, (0.35 * i + 0.38 * h) / 0.73) for s, i, h in shares]
    )
    assert_frame_equal(compute_ihc(frame), expected)


def test_closer_membership_halves_at_twelve_hours() -> None:
    # d = 48, 12, 0 h → rC = 1/(1+√4) = 1/3, 1/(1+1) = 1/2, 1; Σ 11/6 → C = [2/11, 3/11, 6/11].
    # Gaps 36 h and 12 h are below 48 h: I = [1, 0, 0]. No holder engagement: H absent.
    # ihc = (0.35·I + 0.27·C) / 0.62.
    frame = sessions_frame(
        {
            "j": [
                ("a", 0, "SEO", 0, 1, 0, 0),
                ("b", 36, DIRECT, 0, 1, 0, 0),
                ("c", 48, "SEA", 0, 1, 0, 1),
            ]
        }
    )
    shares = [("a", 1.0, 2 / 11), ("b", 0.0, 3 / 11), ("c", 0.0, 6 / 11)]
    expected = expected_frame(
        [("j", s, i, 0.0, c, (0.35 * i + 0.27 * c) / 0.62) for s, i, c in shares]
    )
    assert_frame_equal(compute_ihc(frame), expected)


def test_unflagged_journey_converts_at_its_last_session() -> None:
    # No conversion flag: t_conv = last session (12 h).
    # d = [12, 0] → rC = [1/2, 1] → C = [1/3, 2/3].
    # I = [1, 0] (gap 12 h); H absent. ihc = (0.35·I + 0.27·C) / 0.62.
    frame = sessions_frame({"j": [("a", 0, "SEO", 0, 1, 0, 0), ("b", 12, "SEO", 0, 1, 0, 0)]})
    expected = expected_frame(
        [
            ("j", "a", 1.0, 0.0, 1 / 3, (0.35 + 0.27 / 3) / 0.62),
            ("j", "b", 0.0, 0.0, 2 / 3, 0.27 * 2 / 3 / 0.62),
        ]
    )
    assert_frame_equal(compute_ihc(frame), expected)


def test_flagged_session_sets_conversion_time_and_later_sessions_count_as_at_it() -> None:
    # Flag on the middle session (12 h): d = [12, 0, −12 → 0]
    # → rC = [1/2, 1, 1] → C = [0.2, 0.4, 0.4].
    frame = sessions_frame(
        {
            "j": [
                ("a", 0, "SEO", 0, 1, 0, 0),
                ("b", 12, "SEO", 0, 1, 0, 1),
                ("c", 24, "SEO", 0, 1, 0, 0),
            ]
        }
    )
    assert compute_ihc(frame)["closer"].to_list() == pytest.approx([0.2, 0.4, 0.4])


def test_impression_weight_scales_every_membership_of_impression_sessions() -> None:
    # s1 (impression) at 0 h, s2 at 600 h: unweighted rI = [1, 1], rH = [0.5, 0.5].
    # impression_weight 0.25: rI = [0.25, 1] → I = [0.2, 0.8]; rH = [0.125, 0.5] → H = [0.2, 0.8].
    # (Had the holder used the weighted rI it would be 1·(1 − 0.125)·0.25 = 0.21875 for s1.)
    # ihc = (0.35·I + 0.38·H) / 0.73 = I.
    frame = sessions_frame({"j": [("a", 0, "SEO", 1, 0, 1, 0), ("b", 600, "SEO", 1, 0, 0, 1)]})
    params = LocalModelSettings(impression_weight=0.25)
    expected = expected_frame([("j", "a", 0.2, 0.2, 0.0, 0.2), ("j", "b", 0.8, 0.8, 0.0, 0.8)])
    assert_frame_equal(compute_ihc(frame, params), expected)
    # With weight 1 the two sessions are alike.
    alike = compute_ihc(frame, LocalModelSettings(impression_weight=1.0))
    assert alike["ihc"].to_list() == pytest.approx([0.5, 0.5])


def test_settings_drive_the_model() -> None:
    # closer_half_h 24, closer_shape 1: d = [48, 0] → rC = [1/(1+2), 1] → C = [0.25, 0.75].
    # Only the closer weighs: ihc = C.
    frame = sessions_frame({"j": [("a", 0, "SEO", 1, 1, 0, 0), ("b", 48, "SEO", 1, 1, 0, 1)]})
    params = LocalModelSettings(
        closer_half_h=24,
        closer_shape=1,
        phase_weights=PhaseWeights(initializer=0, holder=0, closer=1),
    )
    result = compute_ihc(frame, params)
    assert result["closer"].to_list() == pytest.approx([0.25, 0.75])
    assert result["ihc"].to_list() == pytest.approx([0.25, 0.75])


def test_journey_with_only_zero_weight_phases_is_split_equally() -> None:
    # Closer-only weights but no closer engagement: no weighted phase present → 1/n each.
    frame = sessions_frame(
        {
            "j": [
                ("a", 0, "SEO", 1, 0, 0, 0),
                ("b", 1, "SEO", 0, 0, 0, 0),
                ("c", 2, "SEA", 0, 0, 0, 1),
            ]
        }
    )
    params = LocalModelSettings(phase_weights=PhaseWeights(initializer=0, holder=0, closer=1))
    assert compute_ihc(frame, params)["ihc"].to_list() == pytest.approx([1 / 3] * 3)


# --- redistribution ----------------------------------------------------------------

# Closer shares before redistribution: d = 48, 12, 0 h → C = [2/11, 3/11, 6/11] (see above);
# the middle session is Direct Traffic.
THREE = {
    "j": [
        ("a", 0, "SEO", 0, 1, 0, 0),
        ("b", 36, DIRECT, 0, 1, 0, 0),
        ("c", 48, "SEA", 0, 1, 0, 1),
    ]
}


def with_closer(base: pl.DataFrame, closer: list[float]) -> pl.DataFrame:
    """``base`` with new closer shares and the ihc they give (H absent: weights 0.35, 0.27)."""
    return base.with_columns(closer=pl.Series(closer)).with_columns(
        ihc=(0.35 * pl.col("initializer") + 0.27 * pl.col("closer")) / 0.62
    )


@pytest.mark.parametrize(
    ("direction", "threshold", "closer"),
    [
        # Direct's 3/11 goes to the earlier SEO session.
        ("earlier_sessions_only", 0.0, [5 / 11, 0.0, 6 / 11]),
        # … to the later SEA session.
        ("later_sessions_only", 0.0, [2 / 11, 0.0, 9 / 11]),
        # … to both, 2 : 6 → a gets 3/11·1/4, c gets 3/11·3/4: [1/4, 0, 3/4].
        ("any_session", 0.0, [0.25, 0.0, 0.75]),
        # Threshold 0.2 excludes a (2/11 ≈ 0.18): everything to c.
        ("any_session", 0.2, [2 / 11, 0.0, 9 / 11]),
        # Threshold 0.6 excludes both receivers: Direct keeps its share.
        ("any_session", 0.6, [2 / 11, 3 / 11, 6 / 11]),
    ],
)
def test_closer_redistribution_moves_direct_share(
    direction: str, threshold: float, closer: list[float]
) -> None:
    frame = sessions_frame(THREE)
    base = compute_ihc(frame)
    result = compute_ihc(frame, redistribution=closer_rule(direction, threshold))
    assert_frame_equal(result, with_closer(base, closer))


def test_receive_threshold_is_strict() -> None:
    # a and b both at d = 12 h, c at d = 0: rC = [1/2, 1/2, 1] → C = [0.25, 0.25, 0.5] exactly.
    # Threshold 0.25: a's share is not above it, so Direct b's 0.25 all goes to c.
    frame = sessions_frame(
        {
            "j": [
                ("a", 36, "SEO", 0, 1, 0, 0),
                ("b", 36, DIRECT, 0, 1, 0, 0),
                ("c", 48, "SEA", 0, 1, 0, 1),
            ]
        }
    )
    base = compute_ihc(frame)
    result = compute_ihc(frame, redistribution=closer_rule("any_session", 0.25))
    assert_frame_equal(result, with_closer(base, [0.25, 0.0, 0.75]))


def test_redistribution_without_receiver_keeps_share() -> None:
    # Direct is the first session: nobody earlier can receive.
    frame = sessions_frame({"j": [("a", 0, DIRECT, 0, 1, 0, 0), ("b", 12, "SEO", 0, 1, 0, 1)]})
    base = compute_ihc(frame)
    result = compute_ihc(frame, redistribution=closer_rule("earlier_sessions_only"))
    assert_frame_equal(result, base)
    assert result["closer"].to_list() == pytest.approx([1 / 3, 2 / 3])


def test_several_donors_split_by_shares_before_redistribution() -> None:
    # d = 192, 108, 48, 0 h → rC = 1/(1+4), 1/(1+3), 1/(1+2), 1 → C = [12, 15, 20, 60] / 107.
    # Earlier only: b (Direct) gives 15 to a; d (Direct) gives 60 to a and c by their
    # pre-redistribution shares 12 : 20 → a + 22.5, c + 37.5.
    # C = [12 + 15 + 22.5, 0, 20 + 37.5, 0] / 107 = [49.5, 0, 57.5, 0] / 107.
    frame = sessions_frame(
        {
            "j": [
                ("a", 0, "SEO", 0, 1, 0, 0),
                ("b", 84, DIRECT, 0, 1, 0, 0),
                ("c", 144, "SEA", 0, 1, 0, 0),
                ("d", 192, DIRECT, 0, 1, 0, 1),
            ]
        }
    )
    base = compute_ihc(frame)
    assert base["closer"].to_list() == pytest.approx([12 / 107, 15 / 107, 20 / 107, 60 / 107])
    result = compute_ihc(frame, redistribution=closer_rule("earlier_sessions_only"))
    assert_frame_equal(result, with_closer(base, [49.5 / 107, 0.0, 57.5 / 107, 0.0]))


def test_redistribution_rules_apply_to_their_own_phase() -> None:
    # Initializer rule only: I = [1, 0, 0] has nothing on Direct; a holder rule moves Direct's
    # holder share. Closer stays as without redistribution.
    frame = sessions_frame(
        {
            "j": [
                ("a", 0, DIRECT, 1, 1, 0, 0),
                ("b", 36, "SEO", 1, 1, 0, 0),
                ("c", 48, DIRECT, 0, 1, 0, 1),
            ]
        }
    )
    # rH = [0.5, 1, 0] → H = [1/3, 2/3, 0]; Direct a's 1/3 goes to b (any session) → [0, 1, 0].
    rule = RedistributionRule(direction="any_session", redistribution_channel_labels=[DIRECT])
    base = compute_ihc(frame)
    result = compute_ihc(frame, redistribution=RedistributionParameter(holder=rule))
    assert result["initializer"].to_list() == base["initializer"].to_list() == [1.0, 0.0, 0.0]
    assert result["closer"].to_list() == base["closer"].to_list()
    assert result["holder"].to_list() == pytest.approx([0.0, 1.0, 0.0])
    assert result["ihc"].to_list() == pytest.approx(
        [0.35 + 0.27 * (2 / 11), 0.38 + 0.27 * (3 / 11), 0.27 * (6 / 11)]
    )


# --- input handling ----------------------------------------------------------------


def test_empty_input_gives_empty_result() -> None:
    assert_frame_equal(compute_ihc(sessions_frame({})), pl.DataFrame(schema=OUTPUT_SCHEMA))


def test_missing_column_is_named() -> None:
    frame = sessions_frame(THREE).drop("closer_engagement")
    with pytest.raises(ValueError, match="closer_engagement"):
        compute_ihc(frame)


def test_null_timestamp_is_refused() -> None:
    frame = sessions_frame(THREE).with_columns(
        timestamp=pl.when(pl.col("session_id") == "b").then(None).otherwise(pl.col("timestamp"))
    )
    with pytest.raises(ValueError, match="timestamp"):
        compute_ihc(frame)


def test_null_flags_count_as_zero() -> None:
    frame = sessions_frame(THREE)
    nulls = frame.with_columns(
        pl.when(pl.col("session_id") == "a")
        .then(None)
        .otherwise(pl.col("holder_engagement", "closer_engagement", "impression_interaction"))
        .name.keep()
    )
    zeros = frame.with_columns(
        pl.when(pl.col("session_id") == "a")
        .then(0)
        .otherwise(pl.col("holder_engagement", "closer_engagement", "impression_interaction"))
        .name.keep()
    )
    assert_frame_equal(compute_ihc(nulls), compute_ihc(zeros))
    assert compute_ihc(nulls)["closer"].to_list() == pytest.approx([0.0, 1 / 3, 2 / 3])


def test_extra_columns_time_unit_and_integer_widths_do_not_matter() -> None:
    frame = sessions_frame(THREE)
    variant = frame.with_columns(
        pl.col("timestamp").cast(pl.Datetime("ns", "UTC")),
        pl.col("holder_engagement", "closer_engagement").cast(pl.Int8),
        user_id=pl.lit("u1"),
        ihc=pl.lit(0.5),
    ).select(pl.all().reverse())
    assert_frame_equal(compute_ihc(variant), compute_ihc(frame))


def test_sessions_at_the_same_time_are_ordered_by_session_id() -> None:
    # Both at 0 h: "a" comes first (rI 1), "b" second (gap 0, rI 0).
    frame = sessions_frame({"j": [("b", 0, "SEO", 0, 0, 0, 1), ("a", 0, "SEO", 0, 0, 0, 0)]})
    expected = expected_frame([("j", "a", 1.0, 0.0, 0.0, 1.0), ("j", "b", 0.0, 0.0, 0.0, 0.0)])
    assert_frame_equal(compute_ihc(frame), expected)


# --- properties --------------------------------------------------------------------


def reference_ihc(
    frame: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None,
) -> pl.DataFrame:
    """The spec written out journey by journey, donor by donor (slow, obviously right)."""
    out = []
    for (conversion_id,), rows in frame.sort("conversion_id", "timestamp", "session_id").group_by(
        "conversion_id", maintain_order=True
    ):
        s = rows.to_dicts()
        hours = [(r["timestamp"] - T0) / timedelta(hours=1) for r in s]
        flagged = [t for t, r in zip(hours, s, strict=True) if r["conversion"] == 1]
        t_conv = max(flagged) if flagged else hours[-1]
        raw: dict[str, list[float]] = {p: [] for p in PHASES}
        for i, r in enumerate(s):
            gap = hours[i] - hours[i - 1] if i else None
            r_i = 1.0 if gap is None else (gap - params.initializer_start_h)
            if gap is not None:
                span = params.initializer_end_h - params.initializer_start_h
                r_i = min(max(r_i / span, 0.0), 1.0)
            d = max(t_conv - hours[i], 0.0)
            r_c = r["closer_engagement"] / (1 + (d / params.closer_half_h) ** params.closer_shape)
            r_h = r["holder_engagement"] * (1 - r_i / 2)
            m = params.impression_weight if r["impression_interaction"] == 1 else 1.0
            for phase, value in zip(PHASES, (r_i, r_h, r_c), strict=True):
                raw[phase].append(value * m)
        shares = {p: [v / sum(raw[p]) if sum(raw[p]) > 0 else 0.0 for v in raw[p]] for p in PHASES}
        for phase in PHASES:
            rule = getattr(redistribution, phase, None) if redistribution else None
            if rule is None:
                continue
            before = shares[phase]
            after = list(before)
            labelled = [r["channel_label"] in rule.redistribution_channel_labels for r in s]
            for k, p_k in enumerate(before):
                if not labelled[k] or p_k <= 0:
                    continue
                receivers = [
                    j
                    for j, p_j in enumerate(before)
                    if not labelled[j]
                    and p_j > rule.receive_threshold
                    and {
                        "earlier_sessions_only": j < k,
                        "later_sessions_only": j > k,
                        "any_session": j != k,
                    }[rule.direction]
                ]
                pool = sum(before[j] for j in receivers)
                if receivers:
                    after[k] -= p_k
                    for j in receivers:
                        after[j] += p_k * before[j] / pool
            shares[phase] = after
        weights = {p: getattr(params.phase_weights, p) if sum(raw[p]) > 0 else 0 for p in PHASES}
        total = sum(weights.values())
        for i, r in enumerate(s):
            ihc = (
                sum(weights[p] * shares[p][i] for p in PHASES) / total if total > 0 else 1 / len(s)
            )
            out.append((conversion_id, r["session_id"], *(shares[p][i] for p in PHASES), ihc))
    return expected_frame(out)


@st.composite
def journeys(draw: st.DrawFn) -> pl.DataFrame:
    result: dict[str, list[Session]] = {}
    for n_journey in range(draw(st.integers(1, 5))):
        length = draw(st.integers(1, 8))
        ids = draw(st.permutations([f"s{i}" for i in range(length)]))
        flags = draw(st.sampled_from(["last", "none", "any"]))
        hours = 0.0
        sessions = []
        for i, session_id in enumerate(ids):
            hours += draw(
                st.one_of(st.sampled_from([0, 12, 24, 48, 264, 480, 600]), st.integers(0, 800))
            )
            flag = {"last": i == length - 1, "none": False, "any": draw(st.booleans())}[flags]
            h, c, m = (draw(st.integers(0, 1)) for _ in range(3))
            sessions.append((session_id, hours, draw(st.sampled_from(CHANNELS)), h, c, m, flag))
        result[f"c{n_journey}"] = sessions
    return sessions_frame(result)


rules = st.builds(
    RedistributionRule,
    direction=st.sampled_from(["earlier_sessions_only", "later_sessions_only", "any_session"]),
    receive_threshold=st.sampled_from([0.0, 0.0, 0.1, 0.3]),
    redistribution_channel_labels=st.sampled_from([[DIRECT], [DIRECT, "SEO"]]),
)
redistributions = st.one_of(
    st.none(),
    st.builds(
        RedistributionParameter,
        initializer=st.none() | rules,
        holder=st.none() | rules,
        closer=st.none() | rules,
    ),
)
model_params = st.one_of(
    st.just(LocalModelSettings()),
    st.builds(
        lambda start, span, half, shape, impression, w: LocalModelSettings(
            initializer_start_h=start,
            initializer_end_h=start + span,
            closer_half_h=half,
            closer_shape=shape,
            impression_weight=impression,
            phase_weights=PhaseWeights(initializer=w[0], holder=w[1], closer=w[2]),
        ),
        st.sampled_from([0.0, 24.0, 48.0]),
        st.sampled_from([24.0, 432.0]),
        st.sampled_from([6.0, 12.0]),
        st.sampled_from([0.5, 1.0, 2.0]),
        st.sampled_from([0.0, 0.5, 1.0]),
        st.sampled_from([(0.35, 0.38, 0.27), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.2, 0.0, 0.8)]),
    ),
)
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(journeys(), model_params, redistributions)
def test_matches_the_reference_model(
    frame: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None,
) -> None:
    assert_frame_equal(
        compute_ihc(frame, params, redistribution),
        reference_ihc(frame, params, redistribution),
        abs_tol=1e-12,
    )


@FAST
@given(journeys(), model_params, redistributions)
def test_values_in_range_and_sums_hold(
    frame: pl.DataFrame,
    params: LocalModelSettings,
    redistribution: RedistributionParameter | None,
) -> None:
    result = compute_ihc(frame, params, redistribution)
    assert result.height == frame.height
    values = result.select(*PHASES, "ihc")
    assert values.select(pl.all().is_between(0.0, 1.0).all()).row(0) == (True,) * 4
    sums = result.group_by("conversion_id").agg(pl.col(*PHASES, "ihc").sum())
    assert ((sums["ihc"] - 1).abs() <= 1e-9).all()
    for phase in PHASES:
        assert (((sums[phase] - 1).abs() <= 1e-9) | (sums[phase] == 0)).all(), phase


@FAST
@given(journeys(), redistributions, st.integers(0, 2**32 - 1))
def test_deterministic_and_invariant_to_row_order(
    frame: pl.DataFrame, redistribution: RedistributionParameter | None, seed: int
) -> None:
    params = LocalModelSettings()
    first = compute_ihc(frame, params, redistribution)
    assert_frame_equal(compute_ihc(frame, params, redistribution), first)
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)
    assert_frame_equal(compute_ihc(shuffled, params, redistribution), first)


@FAST
@given(journeys())
def test_absent_closer_weight_is_shared_by_the_other_phases(frame: pl.DataFrame) -> None:
    # Every session holder-engaged, none closer-engaged: I and H present, C absent.
    result = compute_ihc(
        frame.with_columns(holder_engagement=pl.lit(1), closer_engagement=pl.lit(0))
    )
    assert (result["closer"] == 0).all()
    expected = (0.35 * result["initializer"] + 0.38 * result["holder"]) / 0.73
    assert (result["ihc"] - expected).abs().max() <= 1e-12


def test_a_journeys_values_do_not_depend_on_the_other_journeys_in_the_frame(
    make_journeys,
) -> None:
    # Reruns and API requests group journeys differently: a journey must score the same
    # to the last bit whatever it is computed with.
    journeys = make_journeys([1, 2, 3, 5, 8, 13, 1, 4, 7, 2, 9, 1, 6] * 7, shared=True)
    whole = compute_ihc(journeys)
    ids = journeys["conversion_id"].unique(maintain_order=True).to_list()
    for size in (1, 2, 5, 17):
        parts = [
            compute_ihc(journeys.filter(pl.col("conversion_id").is_in(ids[i : i + size])))
            for i in range(0, len(ids), size)
        ]
        assert_frame_equal(pl.concat(parts), whole, check_exact=True)
