"""A synthetic challenge database that reproduces the published figures of the real one.

At scale 1 the file matches ``spec/dataset.md``: 450,616 sessions over 10 days and
16 channels, 2,000 conversions, 1,940 journeys with 3,703 sessions (1,946 / 3,709 when
ties at the conversion timestamp count), the published journey-length distribution,
27 sessions shared by two journeys, 293,876.85 EUR of spend, 39 channel-days without
cost and 39 without attribution. A scale multiplies sessions, users, conversions,
journeys and spend; the calendar and the channels stay the same.

Converting users are built explicitly, journey by journey length, so the journey
figures are exact rather than probable. Everyone else only browses: their user ids
never convert. Randomness is a counter-based SplitMix64 evaluated as polars
expressions, so the same seed gives the same rows on any machine and polars version.
Being counter-based, it also lets the sessions be computed a chunk of rows at a time,
in session-id order, so that memory stays bounded at any scale.

Channel costs: Direct Traffic, Organic Traffic and Untracked Conversions never cost
anything, Social Organic only on one day (a boosted post); Referral (partner
commissions) and Newsletter & Email (sending fees) carry small costs so that the
number of channel-days without cost is the published 39.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import sys
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import polars as pl

from config.settings import PROJECT_ROOT, DatabaseSettings, SettingsError, load_settings
from tasks.db import connect, create_table_statements

FIRST_DAY = date(2023, 8, 29)
DAYS = 10
SPAN_S = DAYS * 86_400

SESSIONS = 450_616
CONVERSIONS = 2_000
TIED_CONVERSIONS = 6  # their only session is at the conversion timestamp
SESSIONLESS_CONVERSIONS = 54
SAME_TIMESTAMP_JOURNEYS = 1
MIDNIGHT_JOURNEYS = 2  # a 23:59 session before a conversion a few minutes after midnight
LATER_TIME_OF_DAY_JOURNEYS = 3  # the session's time of day is later than the conversion's
ZERO_REVENUE_CONVERSIONS = 10
SESSIONS_PER_BROWSING_USER = 2.1

JOURNEY_LENGTHS = {
    1: 1132, 2: 412, 3: 197, 4: 81, 5: 47, 6: 30, 7: 6, 8: 14,
    9: 7, 10: 4, 11: 3, 13: 2, 14: 2, 18: 2, 37: 1,
}  # fmt: skip
JOURNEYS = sum(JOURNEY_LENGTHS.values())
JOURNEY_ROWS = sum(length * count for length, count in JOURNEY_LENGTHS.items())
# Users who convert twice, as (first, second) journey lengths: the first journey's
# sessions are also in the second, 27 shared sessions per cycle of 18 users.
TWO_CONVERSION_JOURNEYS = (
    (1, 2), (1, 3), (2, 3), (1, 1), (1, 2), (2, 4), (1, 2), (1, 3), (3, 5),
    (1, 2), (2, 3), (1, 1), (1, 2), (2, 4), (1, 3), (1, 2), (3, 6), (2, 3),
)  # fmt: skip
HOLDER_ROWS = 3_395  # journey rows with holder_engagement = 1
CLOSER_ROWS = 2_896

REVENUE_MEDIAN_CENTS = 4_462
REVENUE_MAX_CENTS = 128_320
ATTRIBUTED_REVENUE_CENTS = 11_172_166  # Σ revenue of the conversions with a journey
REVENUE_SIGMA = 0.7

# Tuesday 29 August … Thursday 7 September: quieter weekend, busier Monday.
DAY_FACTORS = (100, 102, 98, 93, 85, 90, 105, 103, 100, 97)


@dataclass(frozen=True)
class Channel:
    """A marketing channel as the generator shapes it; days count from 0 = FIRST_DAY."""

    name: str
    sessions_pm: int  # share of all sessions, per mille
    journey_pm: int  # share of converting users' sessions, per mille (0: never in a journey)
    cost_cents: int = 0  # spend at scale 1
    cost_days: tuple[int, ...] | None = None  # days with spend; None = every active day
    active_days: tuple[int, ...] = tuple(range(DAYS))
    no_journey_days: tuple[int, ...] = ()  # active days without converting users' sessions


CHANNELS = (
    Channel("Affiliate & Partnerships", 20, 30, 620_490, no_journey_days=(2, 4, 7, 9)),
    Channel("Direct Traffic", 215, 200),
    Channel("FB & IG Ads", 130, 120, 9_809_931),
    Channel("Lead Generation", 10, 0, 214_500),
    Channel("Microsoft Ads", 15, 30, 593_162, no_journey_days=(1, 3, 5, 6, 8)),
    Channel("Newsletter & Email", 25, 40, 54_000, no_journey_days=(3, 5)),
    Channel("Organic Traffic", 180, 160),
    Channel("Paid Search Brand", 60, 100, 1_230_645),
    Channel("Paid Search Non Brand", 70, 70, 2_341_879),
    Channel("Performance Max", 140, 140, 12_999_504),
    Channel("Pinterest Ads", 3, 0, 61_240, active_days=(6,)),
    Channel("Referral", 30, 50, 102_560),
    Channel("Social Organic", 45, 40, 23_820, cost_days=(3,)),
    Channel("TikTok Ads", 30, 30, 984_216, no_journey_days=(0, 1, 4, 5, 8, 9)),
    Channel("Untracked Conversions", 10, 30, no_journey_days=(0, 6)),
    Channel("YouTube Ads", 12, 0, 351_738, active_days=(0, 1, 2, 3, 4, 6, 7, 8, 9)),
)

CHANNEL = pl.Enum([channel.name for channel in CHANNELS])

SOURCE_TABLES = ("session_sources", "session_costs", "conversions")
GENERATOR = "tasks.sample_data"  # as recorded in sample_data_info
DEFAULT_CHUNK_SIZE = 1_000_000  # sessions computed and written at a time
_INSERT = {
    "session_sources": "INSERT INTO src.session_sources BY NAME SELECT * FROM frame",
    "session_costs": "INSERT INTO src.session_costs BY NAME SELECT * FROM frame",
    "conversions": "INSERT INTO src.conversions BY NAME SELECT * FROM frame",
}

_MASK = (1 << 64) - 1
_MASK_62 = (1 << 62) - 1
_GAMMA = 0x9E3779B97F4A7C15
_U64 = pl.UInt64


@dataclass(frozen=True)
class SampleSummary:
    """What a generated database holds; journey figures as the pipeline will find them."""

    path: Path
    scale: float
    seed: int
    sessions: int
    users: int
    converting_users: int
    conversions: int
    journeys: int  # conversions with a session strictly before them
    journey_sessions: int  # journey rows (a shared session counts once per journey)
    journeys_inclusive: int  # the same, sessions at the conversion timestamp included
    journey_sessions_inclusive: int
    shared_sessions: int  # sessions in two journeys
    total_cost: float
    attributable_revenue: float  # Σ revenue of the conversions with a journey

    def line(self) -> str:
        return (
            f"{self.path}: {self.sessions:,} sessions of {self.users:,} users, "
            f"{self.conversions:,} conversions ({self.journeys:,} with a journey of "
            f"{self.journey_sessions:,} sessions in all, {self.conversions - self.journeys:,} "
            f"without), cost {self.total_cost:,.2f} EUR (scale {self.scale:g}, seed {self.seed})"
        )


def _mix64(value: int) -> int:
    value &= _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def _mix64_expr(value: pl.Expr) -> pl.Expr:
    # Integer division by 2**k is the right shift polars lacks; u64 products wrap.
    value = (value ^ (value // pl.lit(1 << 30, _U64))) * pl.lit(0xBF58476D1CE4E5B9, _U64)
    value = (value ^ (value // pl.lit(1 << 27, _U64))) * pl.lit(0x94D049BB133111EB, _U64)
    return value ^ (value // pl.lit(1 << 31, _U64))


class _Random:
    """Value ``i`` of stream ``name`` is SplitMix64 of (seed, name, i): no state, no order."""

    def __init__(self, seed: int) -> None:
        self._seed = _mix64(seed)

    def bits(self, stream: str, counter: pl.Expr) -> pl.Expr:
        base = _mix64(self._seed ^ zlib.crc32(stream.encode()))
        return _mix64_expr(pl.lit(base, _U64) + counter.cast(_U64) * pl.lit(_GAMMA, _U64))

    def uniform(self, stream: str, counter: pl.Expr) -> pl.Expr:
        """Uniform in [0, 1) with 53 random bits."""
        return (self.bits(stream, counter) // pl.lit(1 << 11, _U64)).cast(pl.Float64) * 2.0**-53

    def below(self, stream: str, counter: pl.Expr, bound: pl.Expr | int) -> pl.Expr:
        """Uniform integer in [0, bound)."""
        bound = pl.lit(bound) if isinstance(bound, int) else bound
        return (self.uniform(stream, counter) * bound).floor().cast(pl.Int64)

    def ids(self, stream: str, counter: pl.Expr) -> pl.Expr:
        """Opaque 20-digit numbers, distinct for distinct counters.

        A SplitMix-style bijection on 62 bits plus 10**19: every id has 20 digits, so
        the ids sort the same as numbers and as text.
        """
        mask = pl.lit(_MASK_62, _U64)
        base = _mix64(self._seed ^ zlib.crc32(stream.encode()))
        value = (pl.lit(base, _U64) + counter.cast(_U64) * pl.lit(_GAMMA, _U64)) & mask
        value = (
            (value ^ (value // pl.lit(1 << 31, _U64))) * pl.lit(0xBF58476D1CE4E5B9, _U64)
        ) & mask
        value = (
            (value ^ (value // pl.lit(1 << 29, _U64))) * pl.lit(0x94D049BB133111EB, _U64)
        ) & mask
        return (value ^ (value // pl.lit(1 << 32, _U64))) + pl.lit(10**19, _U64)


def _apportion(weights: dict[int, int], total: int) -> dict[int, int]:
    """Integer counts proportional to ``weights`` summing to ``total`` (largest remainder)."""
    whole = sum(weights.values())
    exact = {key: weight * total / whole for key, weight in weights.items()}
    counts = {key: math.floor(value) for key, value in exact.items()}
    by_remainder = sorted(weights, key=lambda key: (counts[key] - exact[key], key))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def _scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def _conversion_plan(scale: float) -> pl.DataFrame:
    """One row per conversion: its kind, journey length and number of own sessions.

    Kinds: ``journey`` (sessions before it), ``same_time`` (a journey whose first two
    sessions share a timestamp), ``midnight`` and ``later_time`` (one session the day
    before), ``pair_first``/``pair_second`` (one user converting twice; the second's own
    sessions lie between the two conversions), ``tie`` (one session at the conversion
    timestamp), ``none`` (no session at all).
    """
    conversions = round(CONVERSIONS * scale)
    ties = _scaled(TIED_CONVERSIONS, scale)
    sessionless = _scaled(SESSIONLESS_CONVERSIONS, scale)
    lengths = _apportion(JOURNEY_LENGTHS, conversions - ties - sessionless)

    base_pairs = pl.DataFrame(
        TWO_CONVERSION_JOURNEYS, schema={"first": pl.Int64, "second": pl.Int64}, orient="row"
    )
    cycles, rest = divmod(_scaled(base_pairs.height, scale), base_pairs.height)
    pairs = pl.concat([base_pairs] * cycles + [base_pairs.head(rest)]).with_row_index("pair")
    used = Counter(pairs["first"].to_list() + pairs["second"].to_list())
    same_time_length = 3 if lengths.get(3, 0) - used[3] > 0 else 2
    used[same_time_length] += _scaled(SAME_TIMESTAMP_JOURNEYS, scale)
    used[1] += _scaled(MIDNIGHT_JOURNEYS, scale) + _scaled(LATER_TIME_OF_DAY_JOURNEYS, scale)
    plain = {length: lengths.get(length, 0) - used[length] for length in lengths | used}
    if min(plain.values()) < 0:
        raise ValueError(f"scale {scale:g} is too small to hold every kind of journey")

    def block(kind: str, length: int, count: int, own: int | None = None) -> pl.DataFrame:
        return pl.select(
            pl.repeat(kind, count, dtype=pl.String).alias("kind"),
            pl.repeat(length, count, dtype=pl.Int64).alias("length"),
            pl.repeat(length if own is None else own, count, dtype=pl.Int64).alias("own"),
        )

    blocks = [block("journey", length, count) for length, count in sorted(plain.items())]
    blocks += [
        block("same_time", same_time_length, _scaled(SAME_TIMESTAMP_JOURNEYS, scale)),
        block("midnight", 1, _scaled(MIDNIGHT_JOURNEYS, scale)),
        block("later_time", 1, _scaled(LATER_TIME_OF_DAY_JOURNEYS, scale)),
        block("tie", 0, ties, own=1),
        block("none", 0, sessionless, own=0),
    ]
    pair_rows = pairs.select(
        "pair",
        pl.concat_list(pl.lit("pair_first"), pl.lit("pair_second")).alias("kind"),
        pl.concat_list("first", "second").alias("length"),
        pl.concat_list("first", pl.col("second") - pl.col("first")).alias("own"),
    ).explode("kind", "length", "own")
    plan = pl.concat([*blocks, pair_rows], how="diagonal")
    return plan.with_row_index("conv").with_columns(
        pl.col("conv").cast(pl.Int64),
        pl.col("pair").cast(pl.Int64),
        ((pl.col("kind") != "pair_second").cum_sum() - 1).cast(pl.Int64).alias("user"),
    )


def _conversion_times(plan: pl.DataFrame, rng: _Random) -> pl.DataFrame:
    """Conversion offsets ``c`` (seconds from the first day) and own-session windows."""
    conv, pair, kind = pl.col("conv"), pl.col("pair"), pl.col("kind")
    second = rng.below("pair/second", pair, SPAN_S - 7_200) + 7_200
    # At least an hour between a user's two conversions, and an hour before the first.
    first = rng.below("pair/first", pair, second - 7_200) + 3_600
    day = rng.below("special/day", conv, DAYS - 1) + 1
    c = (
        pl.when(kind.is_in(["journey", "same_time"]))
        .then(rng.below("conv/time", conv, SPAN_S - 3_600) + 3_600)
        .when(kind == "pair_first")
        .then(first)
        .when(kind == "pair_second")
        .then(second)
        .when(kind == "midnight")
        .then(day * 86_400 + rng.below("conv/time", conv, 600))
        .when(kind == "later_time")
        .then(day * 86_400 + 21_600 + rng.below("conv/time", conv, 21_600))
        .otherwise(rng.below("conv/time", conv, SPAN_S))
    )
    return plan.with_columns(
        c.alias("c"),
        pl.when(kind == "pair_second").then(first + 1).otherwise(0).alias("lo"),
    )


def _journey_sessions(plan: pl.DataFrame, rng: _Random) -> pl.DataFrame:
    """The converting users' sessions, with timestamps ``ts`` in seconds."""
    sessions = (
        plan.filter(pl.col("own") > 0)
        .select("conv", "user", "kind", "c", "lo", pl.int_ranges(0, "own").alias("pos"))
        .explode("pos")
        .with_row_index("row")
        .with_columns(pl.col("row").cast(pl.Int64), pl.col("pos").cast(pl.Int64))
    )
    kind, c, row = pl.col("kind"), pl.col("c"), pl.col("row")
    windowed = kind.is_in(["journey", "same_time", "pair_first", "pair_second"])
    intended = (kind == "same_time") & (pl.col("pos") < 2)

    def drawn(stream: str) -> pl.Expr:
        # Skewed towards the conversion: most sessions come shortly before it.
        width = (c - pl.col("lo")).cast(pl.Float64)
        return c - 1 - (rng.uniform(stream, row) ** 3 * width).floor().cast(pl.Int64)

    day, tod = c // 86_400, c % 86_400
    sessions = sessions.with_columns(
        pl.when(windowed)
        .then(drawn("journey/ts"))
        .when(kind == "tie")
        .then(c)
        .when(kind == "midnight")
        .then(day * 86_400 - 60 + rng.below("midnight/s", row, 60))
        .otherwise(
            (day - 1 - rng.below("later/day", row, pl.min_horizontal(day, 3))) * 86_400
            + tod
            + 1
            + rng.below("later/time", row, 86_399 - tod)
        )
        .alias("ts")
    ).with_columns(
        pl.when(intended & (pl.col("pos") == 1))
        .then(pl.col("ts").shift(1))
        .otherwise(pl.col("ts"))
        .alias("ts")
    )
    # Only the designed same-timestamp journey may repeat a timestamp within a user.
    for attempt in range(1, 100):
        ranked = sessions.sort(
            "user", "ts", intended, "row", descending=[False, False, True, False]
        )
        clash = ranked.filter(
            (pl.int_range(pl.len()).over("user", "ts") > 0) & windowed & ~intended
        ).select("row")
        if clash.is_empty():
            return sessions
        sessions = sessions.with_columns(
            pl.when(row.is_in(clash["row"].implode()))
            .then(drawn(f"journey/ts/{attempt}"))
            .otherwise(pl.col("ts"))
            .alias("ts")
        )
    raise RuntimeError("could not draw distinct journey timestamps")


def _channel_days(*, journeys: bool) -> pl.DataFrame:
    """Channel-days with integer sampling weights and their cumulative upper bounds.

    ``journeys``: the days' weights for converting users' sessions, else each channel's
    share of all sessions spread over its active days.
    """
    rows = [
        (
            channel.name,
            day,
            (channel.journey_pm if journeys else channel.sessions_pm) * DAY_FACTORS[day] * DAYS,
        )
        for channel in CHANNELS
        for day in channel.active_days
        if not (journeys and day in channel.no_journey_days)
    ]
    frame = pl.DataFrame(
        rows, schema={"channel_name": CHANNEL, "day": pl.Int64, "weight": pl.Int64}, orient="row"
    )
    if not journeys:
        frame = frame.with_columns(pl.col("weight") // pl.len().over("channel_name"))
    frame = frame.filter(pl.col("weight") > 0).sort("day", "channel_name")
    return frame.with_columns(pl.col("weight").cum_sum().alias("upper"))


def _pick_channel(
    sessions: pl.DataFrame, channel_days: pl.DataFrame, target: pl.Expr
) -> pl.DataFrame:
    """Add the channel-day whose cumulative weight interval contains ``target``."""
    targets = sessions.select(target.alias("target"))["target"]
    picked = channel_days["upper"].search_sorted(targets, side="right")
    return sessions.with_columns(
        channel_days["channel_name"].gather(picked).alias("channel_name"),
        channel_days["day"].gather(picked).alias("channel_day"),
    )


def _journey_channels(sessions: pl.DataFrame, rng: _Random) -> pl.DataFrame:
    """A journey channel per session, among the channels allowed on the session's day.

    On each day the first sessions, in a random order, take the day's channels in turn,
    so that exactly the channel-days meant to lack attribution lack it.
    """
    channel_days = (
        _channel_days(journeys=True)
        .with_row_index("cover")
        .with_columns(pl.col("cover").cast(pl.Int64))
    )
    per_day = channel_days.group_by("day", maintain_order=True).agg(
        pl.col("cover").first().alias("first"),
        pl.len().alias("channels"),
        (pl.col("upper") - pl.col("weight")).first().alias("start"),
        pl.col("weight").sum().alias("total"),
    )
    row = pl.col("row")
    order = pl.when(pl.col("kind") != "tie").then(rng.uniform("journey/cover", row)).otherwise(2.0)
    turn = (order.rank("ordinal").over("day") - 1).cast(pl.Int64)
    sessions = (
        sessions.with_columns((pl.col("ts") // 86_400).alias("day"))
        .join(per_day, on="day", how="left", maintain_order="left")
        .with_columns(
            pl.when(turn < pl.col("channels")).then(pl.col("first") + turn).alias("cover")
        )
        .join(
            channel_days.select("cover", pl.col("upper").alias("cover_upper")),
            on="cover",
            how="left",
            maintain_order="left",
        )
    )
    target = (
        pl.when(pl.col("cover_upper").is_not_null())
        .then(pl.col("cover_upper") - 1)
        .otherwise(pl.col("start") + rng.below("journey/channel", row, pl.col("total")))
    )
    extra = ["first", "channels", "start", "total", "cover", "cover_upper", "channel_day"]
    return _pick_channel(sessions, channel_days, target).drop(extra)


def _journey_engagement(sessions: pl.DataFrame, rng: _Random) -> pl.DataFrame:
    """Exactly the published share of engaged journey rows (shared sessions count twice)."""
    kind, row = pl.col("kind"), pl.col("row")
    in_journey = kind != "tie"
    shared = kind == "pair_first"
    rows = sessions.select(pl.when(shared).then(2).when(in_journey).then(1).otherwise(0).sum())
    journey_rows = rows.item()
    flags = []
    for name, engaged_rows in (("holder", HOLDER_ROWS), ("closer", CLOSER_ROWS)):
        share = engaged_rows / JOURNEY_ROWS
        random_flag = rng.uniform(f"{name}/flag", row) < share
        shared_idle = sessions.select((shared & ~random_flag).sum()).item()
        idle = round((JOURNEY_ROWS - engaged_rows) / JOURNEY_ROWS * journey_rows)
        idle_plain = max(idle - 2 * shared_idle, 0)
        key = pl.when(in_journey & ~shared).then(rng.uniform(f"{name}/rank", row)).otherwise(2.0)
        flag = (
            pl.when(in_journey & ~shared)
            .then(key.rank("ordinal") > idle_plain)
            .otherwise(random_flag)
            .cast(pl.Int64)
            .alias(f"{name}_engagement")
        )
        flags.append(flag)
    return sessions.with_columns(flags)


def _browsing_sessions(rows: pl.Series, users: int, rng: _Random) -> pl.DataFrame:
    """Sessions ``rows`` (counted from 0) of users who never convert.

    Each is a function of its row alone, so any subset can be built on its own. The first
    rows visit each channel-day once: every channel-day gets at least one session.
    """
    channel_days = _channel_days(journeys=False)
    covering = channel_days["upper"] - 1
    row = pl.col("row")
    frame = pl.DataFrame({"row": rows})
    covered = covering.gather(rows.clip(upper_bound=covering.len() - 1))
    drawn = rng.below("browse/channel", row, int(channel_days["upper"][-1]))
    target = pl.when(row < covering.len()).then(pl.lit(covered)).otherwise(drawn)
    frame = _pick_channel(frame, channel_days, target)
    # Mostly daytime traffic, some around the clock.
    daytime = rng.uniform("browse/daytime", row) < 0.85
    tod = (
        pl.when(daytime)
        .then(25_200 + rng.below("browse/tod", row, 57_600))
        .otherwise(rng.below("browse/tod", row, 86_400))
    )
    # A few heavy users, many one-off visitors; every user has a session.
    heavy = (rng.uniform("browse/user", row) ** 1.5 * users).floor().cast(pl.Int64)
    return frame.select(
        "row",
        pl.when(row < users).then(row).otherwise(heavy).alias("user"),
        (pl.col("channel_day") * 86_400 + tod).alias("ts"),
        "channel_name",
        (rng.uniform("browse/holder", row) < 0.75).cast(pl.Int64).alias("holder_engagement"),
        (rng.uniform("browse/closer", row) < 0.55).cast(pl.Int64).alias("closer_engagement"),
    )


def _euros(cents: pl.Expr) -> pl.Expr:
    # Polars divides by multiplying with 0.01, which misses the nearest double (102.21
    # would become 102.21000000000001); rounding restores it.
    return (cents / 100).round(2)


def _budgets(scale: float) -> pl.DataFrame:
    """Each paid channel's budget in cents, on each of its days with spend."""
    return pl.DataFrame(
        [
            (channel.name, day, round(channel.cost_cents * scale))
            for channel in CHANNELS
            if channel.cost_cents
            for day in (channel.cost_days or channel.active_days)
        ],
        schema={"channel_name": CHANNEL, "day": pl.Int64, "budget": pl.Int64},
        orient="row",
    )


def _priced(sessions: pl.DataFrame, rng: _Random, budgets: pl.DataFrame) -> pl.DataFrame:
    """Sessions with their channel-day's budget (null: unpaid) and a random cost weight."""
    return (
        sessions.select("session_id", "channel_name", "row", (pl.col("ts") // 86_400).alias("day"))
        .join(budgets, on=["channel_name", "day"], how="left", maintain_order="left")
        .with_columns(
            pl.col("budget").is_not_null().alias("paid"),
            (0.25 + rng.uniform("cost/weight", pl.col("row"))).alias("weight"),
        )
    )


def _costs(
    priced: pl.DataFrame, rng: _Random, running: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Spend per session: each paid channel's budget split to the cent, NULL or 0 elsewhere.

    Cumulative rounding in key order: each session gets its share rounded down or up,
    and every channel's sessions add up to its budget to the cent. ``priced`` carries
    each channel's weight ``total`` over all its sessions; ``running`` holds, per paid
    channel, the weight summed and the cents reached by the sessions before this chunk,
    and is returned updated for the next one.
    """
    group = ("channel_name", "paid")
    # The running rows lead their channels, so the cumulative sums carry on exactly where
    # the previous chunk stopped.
    frame = pl.concat([running, priced], how="diagonal").with_columns(
        pl.col("weight").cum_sum().over(group)
    )
    # Times the reciprocal, as polars divides by a window sum: a true division would now
    # and then round a share to the other cent.
    share = pl.col("budget") * pl.col("weight") * (1 / pl.col("total"))
    frame = frame.with_columns(pl.coalesce("reached", share.round()).alias("reached"))
    step = pl.col("reached") - pl.col("reached").shift(1, fill_value=0).over(group)
    unpaid = pl.when(rng.uniform("cost/null", pl.col("row")) < 0.5).then(None).otherwise(0.0)
    costs = frame.with_columns(step.alias("step")).slice(running.height)
    costs = costs.select(
        pl.col("session_id").cast(pl.String),
        pl.when("paid").then(_euros(pl.col("step").cast(pl.Int64))).otherwise(unpaid).alias("cost"),
    )
    running = (
        frame.filter("paid")
        .select(running.columns)
        .unique("channel_name", keep="last", maintain_order=True)
    )
    return costs, running


def _revenue(plan: pl.DataFrame, rng: _Random) -> pl.DataFrame:
    """Revenue per conversion: log-normal around the published median, a few zeros, the
    published maximum, and attributable revenue matching the published total (scaled)."""
    conv = pl.col("conv")
    n = plan.height
    low_median, high_median = (n - 1) // 2, n // 2
    zeros = min(_scaled(ZERO_REVENUE_CONVERSIONS, n / CONVERSIONS), low_median)
    gauss = (-2 * (1 - rng.uniform("revenue/u1", conv)).log()).sqrt() * (
        2 * math.pi * rng.uniform("revenue/u2", conv)
    ).cos()
    draw = REVENUE_MEDIAN_CENTS * (REVENUE_SIGMA * gauss).exp()
    plan = plan.with_columns(draw.alias("draw")).with_columns(
        (pl.col("draw").rank("ordinal") - 1).cast(pl.Int64).alias("rank")
    )
    rank, draw = pl.col("rank"), pl.col("draw")
    value = (
        pl.when(rank < zeros)
        .then(0.0)
        .when(rank == n - 1)
        .then(float(REVENUE_MAX_CENTS))
        .when(rank.is_between(low_median, high_median))
        .then(float(REVENUE_MEDIAN_CENTS))
        .when(rank < low_median)
        .then(draw.clip(upper_bound=REVENUE_MEDIAN_CENTS))
        .otherwise(draw.clip(REVENUE_MEDIAN_CENTS, REVENUE_MAX_CENTS))
    )
    plan = plan.with_columns(value.alias("value"))
    attributed = pl.col("length") > 0
    # Stretch the attributable upper half around the median to hit the total exactly.
    variable = attributed & (rank > high_median) & (rank < n - 1)
    journeys = plan.select(attributed.sum()).item()
    target = round(ATTRIBUTED_REVENUE_CENTS * journeys / JOURNEYS)
    sums = plan.select(
        pl.col("value").filter(attributed & ~variable).round().sum().alias("fixed"),
        (pl.col("value") - REVENUE_MEDIAN_CENTS).filter(variable).sum().alias("excess"),
        variable.sum().alias("count"),
    ).row(0, named=True)
    if sums["count"] and sums["excess"] > 0:
        free = target - sums["fixed"] - sums["count"] * REVENUE_MEDIAN_CENTS
        stretch = max(free / sums["excess"], 0.0)
        stretched = REVENUE_MEDIAN_CENTS + stretch * (pl.col("value") - REVENUE_MEDIAN_CENTS)
        plan = plan.with_columns(
            pl.when(variable)
            .then(stretched.clip(upper_bound=REVENUE_MAX_CENTS))
            .otherwise(pl.col("value"))
            .alias("value")
        )
    plan = plan.with_columns(pl.col("value").round().cast(pl.Int64).alias("cents"))
    # Rounding leaves a few cents; the middle of the stretched values absorbs them. At
    # tiny scales the fixed values alone may exceed the target: the total stays inexact.
    rest = target - plan.select(pl.col("cents").filter(attributed).sum()).item()
    stretched_rows = plan.filter(variable).sort("rank")
    if rest and stretched_rows.height:
        middle = stretched_rows.row(stretched_rows.height // 2, named=True)
        if REVENUE_MEDIAN_CENTS <= middle["cents"] + rest <= REVENUE_MAX_CENTS:
            plan = plan.with_columns(
                pl.when(rank == middle["rank"])
                .then(pl.col("cents") + rest)
                .otherwise(pl.col("cents"))
                .alias("cents")
            )
    return plan.with_columns(_euros(pl.col("cents")).alias("revenue")).drop(
        "draw", "rank", "value", "cents"
    )


def _date_and_time(seconds: pl.Expr, prefix: str) -> list[pl.Expr]:
    moment = pl.lit(datetime.combine(FIRST_DAY, datetime.min.time())) + pl.duration(seconds=seconds)
    return [
        moment.dt.strftime("%Y-%m-%d").alias(f"{prefix}_date"),
        moment.dt.strftime("%H:%M:%S").alias(f"{prefix}_time"),
    ]


_SESSION_COLUMNS = ("row", "user", "ts", "channel_name", "holder_engagement", "closer_engagement")


@dataclass(frozen=True)
class _Sources:
    """What every chunk of sessions is computed from.

    Sessions are rows 0 … ``sessions`` - 1 of the row counter, converting users' first.
    Those are few and built whole, since their draws depend on one another; every later
    row is a function of the row alone.
    """

    rng: _Random
    scale: float
    impression_share: float
    plan: pl.DataFrame  # one row per conversion
    journey: pl.DataFrame  # converting users' sessions
    sessions: int
    converting_users: int
    browsing_users: int


def _build_sources(scale: float, seed: int, impression_share: float) -> _Sources:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, not {scale!r}")
    if not 0.0 <= impression_share <= 1.0:
        raise ValueError(f"impression_share must lie in [0, 1], not {impression_share!r}")
    rng = _Random(seed)
    plan = _revenue(_conversion_times(_conversion_plan(scale), rng), rng)
    journey = _journey_sessions(plan, rng)
    journey = _journey_engagement(_journey_channels(journey, rng), rng)
    sessions = round(SESSIONS * scale)
    browsing_count = sessions - journey.height
    if browsing_count < _channel_days(journeys=False).height:
        raise ValueError(f"scale {scale:g} is too small to give every channel-day a session")
    return _Sources(
        rng=rng,
        scale=scale,
        impression_share=impression_share,
        plan=plan,
        journey=journey.select(_SESSION_COLUMNS),
        sessions=sessions,
        converting_users=int(plan["user"].max()) + 1,
        browsing_users=max(1, round(browsing_count / SESSIONS_PER_BROWSING_USER)),
    )


def _session_order(sources: _Sources) -> pl.Series:
    """The row counter sorted by session id: the order the sessions are written in, so that
    SQLite appends to its primary-key index."""
    row = pl.int_range(sources.sessions, dtype=pl.Int64).alias("row")
    by_id = sources.rng.ids("session", pl.col("row"))
    # The streaming engine sorts in less memory than an in-memory arg_sort.
    return pl.LazyFrame().select(row).sort(by_id).collect(engine="streaming")["row"]


def _sessions(sources: _Sources, rows: pl.Series) -> pl.DataFrame:
    """The sessions of ``rows`` (row counters), in session-id order."""
    rng, first_browsing = sources.rng, sources.journey.height
    journey = sources.journey.join(rows.to_frame("row"), on="row", how="semi")
    browsing = _browsing_sessions(
        rows.filter(rows >= first_browsing) - first_browsing, sources.browsing_users, rng
    ).with_columns(pl.col("row") + first_browsing, pl.col("user") + sources.converting_users)
    row = pl.col("row")
    return (
        pl.concat([journey, browsing.select(_SESSION_COLUMNS)])
        .with_columns(
            rng.ids("session", row).alias("session_id"),
            rng.ids("user", pl.col("user")).alias("user_id"),
            (rng.uniform("impression", row) < sources.impression_share)
            .cast(pl.Int64)
            .alias("impression_interaction"),
        )
        .sort("session_id")
    )


def _session_sources(sessions: pl.DataFrame) -> pl.DataFrame:
    return sessions.select(
        pl.col("session_id").cast(pl.String),
        pl.col("user_id").cast(pl.String),
        *_date_and_time(pl.col("ts"), "event"),
        pl.col("channel_name").cast(pl.String),
        "holder_engagement",
        "closer_engagement",
        "impression_interaction",
    )


def _conversions(sources: _Sources) -> pl.DataFrame:
    rng = sources.rng
    return (
        sources.plan.select(
            rng.ids("conversion", pl.col("conv")).alias("conv_id"),
            rng.ids("user", pl.col("user")).cast(pl.String).alias("user_id"),
            *_date_and_time(pl.col("c"), "conv"),
            "revenue",
        )
        .sort("conv_id")
        .with_columns(pl.col("conv_id").cast(pl.String))
    )


def _journey_figures(sources: _Sources) -> dict[str, int]:
    """Journeys as the pipeline will build them, from the generated rows."""
    pairs = sources.plan.select("conv", "user", "c").join(
        sources.journey.select("row", "user", "ts"), on="user", how="inner"
    )
    strict = pairs.filter(pl.col("ts") < pl.col("c"))
    inclusive = pairs.filter(pl.col("ts") <= pl.col("c"))
    shared = strict.group_by("row").len().filter(pl.col("len") == 2).height
    return {
        "journeys": strict["conv"].n_unique(),
        "journey_sessions": strict.height,
        "journeys_inclusive": inclusive["conv"].n_unique(),
        "journey_sessions_inclusive": inclusive.height,
        "shared_sessions": shared,
    }


def _insert(duck: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame) -> None:
    duck.register("frame", frame.to_arrow())
    duck.execute(_INSERT[table])
    duck.unregister("frame")


def _write_session_sources(
    duck: duckdb.DuckDBPyConnection,
    sources: _Sources,
    order: pl.Series,
    chunk_size: int,
    budgets: pl.DataFrame,
) -> pl.DataFrame:
    """Insert session_sources chunk by chunk; return each paid channel's weight total."""
    paid = []
    for start in range(0, order.len(), chunk_size):
        sessions = _sessions(sources, order.slice(start, chunk_size))
        _insert(duck, "session_sources", _session_sources(sessions))
        priced = _priced(sessions, sources.rng, budgets)
        paid.append(priced.filter("paid").select("channel_name", "weight"))
    # The total is a window sum over the channel's weights in key order, which polars
    # folds with Kahan summation; adding up per-chunk sums would round differently and
    # move a cent here and there.
    totals = pl.concat(paid).select(
        "channel_name", pl.col("weight").sum().over("channel_name").alias("total")
    )
    return totals.unique("channel_name")


def _write_session_costs(
    duck: duckdb.DuckDBPyConnection,
    sources: _Sources,
    order: pl.Series,
    chunk_size: int,
    budgets: pl.DataFrame,
) -> int:
    """Insert session_costs chunk by chunk; return the total spend in cents."""
    running = budgets.select(
        pl.col("channel_name").unique(maintain_order=True),
        pl.lit(True).alias("paid"),
        pl.lit(0.0).alias("weight"),
        pl.lit(0.0).alias("reached"),
    )
    cents = 0
    for start in range(0, order.len(), chunk_size):
        sessions = _sessions(sources, order.slice(start, chunk_size))
        costs, running = _costs(_priced(sessions, sources.rng, budgets), sources.rng, running)
        _insert(duck, "session_costs", costs)
        cents += int(costs.select((pl.col("cost") * 100).round().sum()).item())
    return cents


def _write(
    path: Path, ddl: dict[str, str], info: dict[str, str], sources: _Sources, chunk_size: int
) -> int:
    """Write the database; return the total spend in cents.

    The sessions are computed twice, chunk by chunk in key order: a session's cost needs
    its channel's weight total over all sessions, known only after the first pass.
    """
    con = sqlite3.connect(path)
    try:
        with con:
            for table in SOURCE_TABLES:
                con.execute(ddl[table])
            con.execute("CREATE TABLE sample_data_info (key TEXT PRIMARY KEY, value TEXT)")
            con.executemany("INSERT INTO sample_data_info VALUES (?, ?)", info.items())
    finally:
        con.close()
    order = _session_order(sources)
    budgets = _budgets(sources.scale)
    duck = connect(path)
    try:
        # Every insert commits on its own: within one transaction the SQLite scanner holds
        # all pages written in memory. The file is still a temporary one, published only
        # when complete, so nothing half-written is ever visible.
        totals = _write_session_sources(duck, sources, order, chunk_size, budgets)
        budgets = budgets.join(totals, on="channel_name", how="left")
        cents = _write_session_costs(duck, sources, order, chunk_size, budgets)
        _insert(duck, "conversions", _conversions(sources))
    finally:
        duck.close()
    return cents


def _publish(built: Path, path: Path) -> None:
    """Move the finished file to ``path`` without ever replacing an existing file."""
    with built.open("rb") as handle:
        os.fsync(handle.fileno())
    try:
        os.link(built, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; not overwriting it") from None
    except OSError:
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it") from None
        os.replace(built, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def generate_sample_database(
    path: Path,
    scale: float = 1.0,
    seed: int = 42,
    *,
    schema_path: Path | None = None,
    impression_share: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SampleSummary:
    """Write a new challenge-shaped SQLite database at ``path``.

    Creates the three source tables, with the DDL of ``schema_path`` (default: the
    project's ``data/challenge_db_create.sql``), and ``sample_data_info``, which marks the
    file as synthetic (see ``is_synthetic``); the pipeline creates its output tables
    itself. Refuses to overwrite an existing file. The database is built in a temporary
    file beside ``path`` and appears there only when complete. Sessions are computed and
    written ``chunk_size`` at a time, which bounds the memory; the rows do not depend on it.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; not overwriting it")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size!r}")
    schema = schema_path or PROJECT_ROOT / DatabaseSettings().schema_path
    ddl = create_table_statements(schema)
    missing = [table for table in SOURCE_TABLES if table not in ddl]
    if missing:
        raise ValueError(f"schema file {schema} has no CREATE TABLE for {', '.join(missing)}")
    sources = _build_sources(scale, seed, impression_share)
    info = {
        "generator": GENERATOR,
        "scale": str(scale),
        "seed": str(seed),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }

    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per run, and created by SQLite itself so that it gets the usual permissions.
    built = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        cost_cents = _write(built, ddl, info, sources, chunk_size)
        _publish(built, path)
    finally:
        for leftover in (built, built.with_name(built.name + "-journal")):
            leftover.unlink(missing_ok=True)

    plan = sources.plan
    return SampleSummary(
        path=path,
        scale=scale,
        seed=seed,
        sessions=sources.sessions,
        users=sources.converting_users + sources.browsing_users,
        converting_users=int(plan["user"].n_unique()),
        conversions=plan.height,
        **_journey_figures(sources),
        total_cost=cost_cents / 100,
        attributable_revenue=round(float(plan.filter(pl.col("length") > 0)["revenue"].sum()), 2),
    )


def is_synthetic(db_path: Path) -> bool:
    """Whether this generator wrote ``db_path``, as its ``sample_data_info`` table says.

    Reads through a read-only connection, so it never creates or changes the file; a
    missing file or one that is not SQLite raises ``sqlite3.Error``.
    """
    con = sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        table = con.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sample_data_info'"
        ).fetchone()
        if table is None:
            return False
        generator = con.execute(
            "SELECT value FROM sample_data_info WHERE key = 'generator'"
        ).fetchone()
    finally:
        con.close()
    return generator == (GENERATOR,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.sample_data",
        description="Write a synthetic challenge database (defaults from config/config.yaml).",
    )
    parser.add_argument("--db", type=Path, help="database file to create (must not exist)")
    parser.add_argument("--scale", type=float, help="multiplies sessions, users, conversions")
    parser.add_argument("--seed", type=int, help="same seed, same rows")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        parser.exit(2, f"error: {exc}\n")
    started = time.perf_counter()
    try:
        summary = generate_sample_database(
            args.db or settings.database.path,
            args.scale if args.scale is not None else settings.sample_data.scale,
            args.seed if args.seed is not None else settings.sample_data.seed,
            schema_path=settings.database.schema_path,
        )
    except (FileExistsError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"{summary.line()} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
