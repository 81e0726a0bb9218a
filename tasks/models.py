"""Attribution models side by side (``shared/spec/models.md``), with bootstrap intervals.

Every model runs on distinct paths (``tasks.paths.distinct_paths``), so its cost grows
with distinct paths, not with sessions. Choices where the spec is silent:

- Credit matrices. Every model but Markov is linear in the paths: its credit is a matrix
  of conversions (and one of revenue) per distinct converting path and channel, so its
  totals are column sums and a bootstrap resample is one matrix product. The path-only
  rules (first/last touch, linear, position, Shapley) are computed once per distinct
  path. Time decay depends on each session's time to its conversion and ihc on each
  conversion's own rows, so their matrices are summed from the journey rows (few: only
  converting journeys) into the row of the conversion's path.
- Markov. The absorption probabilities solve x = Qx + r on the transient states, one
  column of x per system: nothing removed, then each channel removed (its states' rows
  zeroed). They are computed by fixed-point iteration on the sparse transition matrix
  until the steps still to come add less than 1e-13 — the chain contracts by its
  spectral radius per step (0.4–0.5 on the sample data: about 30 steps). A direct LU
  fills in almost completely: at order 3 (4,242 states on the scale-10 sample) one
  sparse or dense LU takes about 2 s, and each removal is a system of its own.
- Bootstrap. One Poisson(1) draw per distinct path and resample multiplies both its
  converting and its null count; every model uses the same draws. The draws come from
  two generators spawned from ``default_rng(seed)``: one for the paths with conversions
  (every model), one for the null-only paths (only Markov needs them), so the other
  models' intervals do not depend on whether Markov runs. A resample without any
  conversion has no shares and is left out. Interval: the 2.5 and 97.5 percentiles.
- ihc covers the conversions of the journeys that have attribution rows, joined on
  (conversion_id, session_id); conversions without rows (failed) are not in its totals.
- Channels: every channel of the costs and of the paths (converting or null); a channel
  missing from the costs has cost 0. A channel seen only in null paths gets nothing from
  the path-based models, but Markov can credit it: its removal cuts the walks that pass
  through it into states that convert (ChannelAttribution does the same).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import sparse

from config.settings import MODEL_NAMES, ModelsSettings
from tasks.export import with_cpo_roas, write_atomically
from tasks.paths import conversion_paths, distinct_paths

COMPARISON_CSV = "model_comparison.csv"
COMPARISON_PARQUET = "model_comparison.parquet"
COMPARISON_SCHEMA = {
    "model": pl.String,
    "channel_name": pl.String,
    "conversions": pl.Float64,
    "revenue": pl.Float64,
    "share": pl.Float64,
    "share_low": pl.Float64,
    "share_high": pl.Float64,
    "cost": pl.Float64,
    "cpo": pl.Float64,
    "roas": pl.Float64,
}
INTERVAL_PERCENTILES = (2.5, 97.5)
MARKOV_TOLERANCE = 1e-13
# The resamples only feed percentiles: shares right to ~1e-7 are plenty, and the looser
# tolerance saves a third of the steps.
MARKOV_RESAMPLE_TOLERANCE = 1e-9
MARKOV_MAX_STEPS = 10_000
DAY_US = 86_400 * 1_000_000


class MarkovError(RuntimeError):
    """The Markov chain's absorption probabilities did not converge."""


@dataclass(frozen=True)
class _Credit:
    """A linear model's credit per distinct converting path (rows) and channel (columns)."""

    conversions: np.ndarray
    revenue: np.ndarray


@dataclass(frozen=True)
class _Paths:
    """Distinct paths as flat arrays: every path's channel codes, one path after another."""

    channels: list[str]
    codes: np.ndarray
    lengths: np.ndarray
    conversions: np.ndarray
    nulls: np.ndarray
    value: np.ndarray
    converting: int  # the first ``converting`` paths have conversions

    @property
    def count(self) -> int:
        return len(self.lengths)

    def step_path(self) -> np.ndarray:
        return np.repeat(np.arange(self.count), self.lengths)

    def step_position(self) -> np.ndarray:
        starts = np.cumsum(self.lengths) - self.lengths
        return np.arange(len(self.codes)) - np.repeat(starts, self.lengths)


@dataclass(frozen=True)
class _Steps:
    """The steps of the converting paths, one entry per session."""

    path: np.ndarray
    code: np.ndarray
    position: np.ndarray
    length: np.ndarray


def model_names(settings: ModelsSettings) -> list[str]:
    """The models to run, in the spec's order, ``markov`` expanded to one per order."""
    names: list[str] = []
    for name in MODEL_NAMES:
        if name not in settings.include:
            continue
        if name == "markov":
            names += [f"markov_{order}" for order in settings.markov_orders]
        else:
            names.append(name)
    return names


def _channel_codes(values: pl.Series, channels: list[str]) -> np.ndarray:
    return values.replace_strict(channels, range(len(channels)), return_dtype=pl.Int64).to_numpy()


def _encode(paths: pl.DataFrame, channels: list[str]) -> _Paths:
    conversions = paths["conversions"].to_numpy().astype(np.float64)
    return _Paths(
        channels=channels,
        codes=_channel_codes(paths["path"].explode(), channels),
        lengths=paths["path"].list.len().to_numpy().astype(np.int64),
        conversions=conversions,
        nulls=paths["nulls"].to_numpy().astype(np.float64),
        value=paths["value"].to_numpy().astype(np.float64),
        converting=int(np.count_nonzero(conversions)),
    )


def _converting_steps(paths: _Paths) -> _Steps:
    steps = int(paths.lengths[: paths.converting].sum())
    path = paths.step_path()[:steps]
    return _Steps(
        path=path,
        code=paths.codes[:steps],
        position=paths.step_position()[:steps],
        length=paths.lengths[path],
    )


def _last_touch(steps: _Steps) -> np.ndarray:
    return (steps.position == steps.length - 1).astype(np.float64)


def _first_touch(steps: _Steps) -> np.ndarray:
    return (steps.position == 0).astype(np.float64)


def _linear(steps: _Steps) -> np.ndarray:
    return 1.0 / steps.length


def _position(steps: _Steps) -> np.ndarray:
    at_end = (steps.position == 0) | (steps.position == steps.length - 1)
    middle = 0.2 / np.maximum(steps.length - 2, 1)
    return np.select([steps.length == 1, steps.length == 2, at_end], [1.0, 0.5, 0.4], middle)


def _shapley(steps: _Steps) -> np.ndarray:
    # Each distinct channel of a path gets 1 / (distinct channels), shared by its sessions.
    width = int(steps.code.max(initial=0)) + 1
    cells, cell, sessions = np.unique(
        steps.path * width + steps.code, return_inverse=True, return_counts=True
    )
    distinct = np.bincount(cells // width)
    return 1.0 / (distinct[steps.path] * sessions[cell])


PATH_RULES: dict[str, Callable[[_Steps], np.ndarray]] = {
    "last_touch": _last_touch,
    "first_touch": _first_touch,
    "linear": _linear,
    "position": _position,
    "shapley": _shapley,
}


def _cell_sums(
    path: np.ndarray, code: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    cells = path * shape[1] + code
    sums = np.bincount(cells, weights=weights, minlength=shape[0] * shape[1])
    # bincount gives integers when there is nothing to sum (no conversion at all).
    return sums.astype(np.float64).reshape(shape)


def _path_rule_credit(paths: _Paths, steps: _Steps, rule: str) -> _Credit:
    shape = (paths.converting, len(paths.channels))
    share = PATH_RULES[rule](steps)
    return _Credit(
        conversions=_cell_sums(
            steps.path, steps.code, share * paths.conversions[steps.path], shape
        ),
        revenue=_cell_sums(steps.path, steps.code, share * paths.value[steps.path], shape),
    )


def _row_credit(rows: pl.DataFrame, paths: _Paths, share: str) -> _Credit:
    """Credit from journey rows with ``path_index``, ``channel_label``, ``revenue``, ``share``."""
    shape = (paths.converting, len(paths.channels))
    path = rows["path_index"].to_numpy()
    code = _channel_codes(rows["channel_label"], paths.channels)
    weight = rows[share].to_numpy()
    return _Credit(
        conversions=_cell_sums(path, code, weight, shape),
        revenue=_cell_sums(path, code, weight * rows["revenue"].to_numpy(), shape),
    )


def _time_decay_credit(journeys: pl.DataFrame, paths: _Paths, half_life_days: float) -> _Credit:
    days = (pl.col("conversion_timestamp") - pl.col("timestamp")).dt.total_microseconds() / DAY_US
    # Measured from the conversion's latest session: the normalised weights are the same,
    # and a journey far in the past never underflows to 0 / 0.
    weight = (2.0 ** (-(days - days.min().over("conversion_id")) / half_life_days)).alias("w")
    rows = journeys.with_columns(weight).with_columns(
        share=pl.col("w") / pl.col("w").sum().over("conversion_id")
    )
    return _row_credit(rows, paths, "share")


def _ihc_credit(journeys: pl.DataFrame, ihc_rows: pl.DataFrame, paths: _Paths) -> _Credit:
    rows = ihc_rows.select("conversion_id", "session_id", pl.col("ihc").cast(pl.Float64)).join(
        journeys, on=["conversion_id", "session_id"], how="inner"
    )
    return _row_credit(rows, paths, "ihc")


@dataclass(frozen=True)
class _Chain:
    """An order-k chain's structure; ``usage`` maps path weights to transition counts.

    Transient states are numbered from 0 (start); ``target`` is a state, ``absorbing``
    (conversion) or ``absorbing + 1`` (null). Transitions are sorted by (source, target).
    """

    order: int
    absorbing: int
    source: np.ndarray
    target: np.ndarray
    contains: np.ndarray
    usage: sparse.csr_matrix

    def conversion_probabilities(
        self, counts: np.ndarray, tolerance: float = MARKOV_TOLERANCE
    ) -> np.ndarray:
        """P(conversion) from start: with nothing removed, then with each channel removed."""
        states = self.absorbing
        leaving = np.bincount(self.source, weights=counts, minlength=states)
        probability = np.divide(
            counts, leaving[self.source], out=np.zeros_like(counts), where=counts > 0
        )
        moves = self.target < states
        # Transitions are sorted by source: the moving ones are already in CSR order.
        step = sparse.csr_matrix(
            (
                probability[moves],
                self.target[moves],
                np.searchsorted(self.source[moves], np.arange(states + 1)),
            ),
            shape=(states, states),
        )
        converts = np.bincount(
            self.source,
            weights=np.where(self.target == states, probability, 0.0),
            minlength=states,
        )
        # Removing a channel sends every state that holds it to null: its row becomes 0.
        keep = np.column_stack([np.ones(states), ~self.contains])
        absorbed = keep * converts[:, None]
        x = np.zeros_like(keep)
        previous_change: float | None = None
        for _ in range(MARKOV_MAX_STEPS):
            updated = keep * (step @ x) + absorbed
            change = float(np.abs(updated - x).max())
            x = updated
            if change == 0.0:
                return x[0]
            if previous_change is not None:
                # The changes shrink by about `rate` per step, so the steps still to come
                # add about change × rate / (1 − rate): stop when that is below tolerance.
                rate = change / previous_change
                if rate < 1.0 and change * rate <= tolerance * (1.0 - rate):
                    return x[0]
            previous_change = change
        raise MarkovError(
            f"markov_{self.order}: absorption probabilities did not converge "
            f"in {MARKOV_MAX_STEPS} steps"
        )

    def shares(self, counts: np.ndarray, tolerance: float = MARKOV_TOLERANCE) -> np.ndarray:
        """Removal-effect shares per channel; NaN when nothing converts."""
        probabilities = self.conversion_probabilities(counts, tolerance)
        if probabilities[0] <= 0:
            return np.full(len(probabilities) - 1, np.nan)
        effects = 1.0 - probabilities[1:] / probabilities[0]
        return effects / effects.sum()


def _dense_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, two to three times faster (polars)."""
    ids = pl.Series(values).rank("dense").to_numpy().astype(np.int64) - 1
    distinct = np.empty(int(ids.max(initial=-1)) + 1, dtype=values.dtype)
    distinct[ids] = values
    return distinct, ids


def _chain(paths: _Paths, order: int) -> _Chain:
    channels = len(paths.channels)
    path = paths.step_path()
    position = paths.step_position()
    step = np.arange(len(paths.codes))
    # A state is the last `order` channels (fewer at the start of a path), written as one
    # integer in base channels + 1, the digit 0 standing for "no channel".
    key = np.zeros(len(step), dtype=np.int64)
    for back in range(order):
        earlier = np.where(position >= back, paths.codes[np.maximum(step - back, 0)] + 1, 0)
        key += earlier * (channels + 1) ** back
    keys, state = _dense_ids(key)
    state = state + 1
    states = len(keys) + 1
    contains = np.zeros((states, channels), dtype=bool)
    for back in range(order):
        digit = keys // (channels + 1) ** back % (channels + 1)
        has = digit > 0
        contains[np.flatnonzero(has) + 1, digit[has] - 1] = True

    first = position == 0
    last = position == paths.lengths[path] - 1
    moving = paths.conversions + paths.nulls
    every_path = np.arange(paths.count)
    source = np.concatenate(
        [np.zeros(paths.count, dtype=np.int64), state[~last], state[last], state[last]]
    )
    target = np.concatenate(
        [
            state[first],
            state[np.flatnonzero(~last) + 1],
            np.full(paths.count, states),
            np.full(paths.count, states + 1),
        ]
    )
    used_by = np.concatenate([every_path, path[~last], every_path, every_path])
    weight = np.concatenate([moving, moving[path[~last]], paths.conversions, paths.nulls])
    taken = weight > 0
    transitions, transition = _dense_ids(source[taken] * (states + 2) + target[taken])
    usage = sparse.csr_matrix(
        (weight[taken], (transition, used_by[taken])), shape=(len(transitions), paths.count)
    )
    return _Chain(
        order=order,
        absorbing=states,
        source=transitions // (states + 2),
        target=transitions % (states + 2),
        contains=contains,
        usage=usage,
    )


def _interval(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Percentile interval per channel over the resamples that have shares."""
    valid = shares[np.isfinite(shares).all(axis=1)]
    if len(valid) == 0:
        return None
    low, high = np.percentile(valid, INTERVAL_PERCENTILES, axis=0)
    return low, high


def _credit_shares(weights: np.ndarray, credit: np.ndarray) -> np.ndarray:
    resampled = weights @ credit
    totals = resampled.sum(axis=1, keepdims=True)
    return np.divide(resampled, totals, out=np.full_like(resampled, np.nan), where=totals > 0)


def _bootstrap(
    paths: _Paths,
    credits: dict[str, _Credit],
    chains: dict[str, _Chain],
    resamples: int,
    seed: int,
) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    converting_rng, null_rng = np.random.default_rng(seed).spawn(2)
    converting = converting_rng.poisson(1.0, (resamples, paths.converting)).astype(np.float64)
    intervals = {
        name: _interval(_credit_shares(converting, credit.conversions))
        for name, credit in credits.items()
    }
    if chains:
        markov = {name: np.empty((resamples, len(paths.channels))) for name in chains}
        for resample in range(resamples):
            # Drawn per resample: the null-only paths are many (90,000 at scale 10).
            nulls = null_rng.poisson(1.0, paths.count - paths.converting)
            weights = np.concatenate([converting[resample], nulls])
            for name, chain in chains.items():
                counts = chain.usage @ weights
                markov[name][resample] = chain.shares(counts, MARKOV_RESAMPLE_TOLERANCE)
        intervals |= {name: _interval(shares) for name, shares in markov.items()}
    return intervals


def _model_rows(
    name: str,
    channels: list[str],
    conversions: np.ndarray,
    revenue: np.ndarray,
    interval: tuple[np.ndarray, np.ndarray] | None,
) -> pl.DataFrame:
    unknown = np.full(len(channels), np.nan)
    total = conversions.sum()
    low, high = interval if interval is not None else (unknown, unknown)
    return pl.DataFrame(
        {
            "model": [name] * len(channels),
            "channel_name": channels,
            "conversions": conversions,
            "revenue": revenue,
            "share": conversions / total if total > 0 else unknown,
            "share_low": low,
            "share_high": high,
        }
    ).fill_nan(None)


def compare_models(
    journeys: pl.DataFrame,
    ihc_rows: pl.DataFrame,
    null_paths: pl.DataFrame,
    channel_costs: pl.DataFrame,
    settings: ModelsSettings,
) -> pl.DataFrame:
    """Every enabled model's conversions, revenue and share per channel, with intervals.

    ``journeys`` is ``build_journeys``'s frame; ``ihc_rows`` the pipeline's attribution
    rows (``conversion_id, session_id, ihc``); ``null_paths`` is ``tasks.paths.null_paths``'s
    frame; ``channel_costs`` has ``channel_name, cost``. One row per model and channel,
    sorted by model (the spec's order) then channel; cpo = cost / conversions and
    roas = revenue / cost, NULL where the denominator is 0.
    """
    names = model_names(settings) if settings.enabled else []
    if not names:
        return pl.DataFrame(schema=COMPARISON_SCHEMA)
    per_conversion = conversion_paths(journeys)
    distinct = distinct_paths(per_conversion, null_paths)
    costs = channel_costs.group_by("channel_name").agg(pl.col("cost").sum().cast(pl.Float64))
    channels = sorted(
        set(costs["channel_name"].to_list()) | set(distinct["path"].explode().to_list())
    )
    if not channels:  # no spend and no session in the range: nothing to compare
        return pl.DataFrame(schema=COMPARISON_SCHEMA)
    paths = _encode(distinct, channels)
    path_index = per_conversion.join(
        distinct.select("path").with_row_index("path_index"), on="path"
    ).select("conversion_id", pl.col("path_index").cast(pl.Int64))
    rows = journeys.join(path_index, on="conversion_id")

    steps = _converting_steps(paths)
    credits: dict[str, _Credit] = {}
    chains: dict[str, _Chain] = {}
    for name in names:
        if name in PATH_RULES:
            credits[name] = _path_rule_credit(paths, steps, name)
        elif name == "time_decay":
            credits[name] = _time_decay_credit(rows, paths, settings.time_decay_half_life_days)
        elif name == "ihc":
            credits[name] = _ihc_credit(rows, ihc_rows, paths)
        else:
            chains[name] = _chain(paths, int(name.removeprefix("markov_")))

    intervals = (
        _bootstrap(paths, credits, chains, settings.bootstrap_resamples, settings.bootstrap_seed)
        if settings.bootstrap_resamples > 0
        else {}
    )
    total_conversions = float(paths.conversions.sum())
    total_revenue = float(paths.value.sum())
    frames = []
    for name in names:
        if name in credits:
            conversions = credits[name].conversions.sum(axis=0)
            revenue = credits[name].revenue.sum(axis=0)
        else:
            shares = np.nan_to_num(chains[name].shares(chains[name].usage @ np.ones(paths.count)))
            conversions = shares * total_conversions
            revenue = shares * total_revenue
        frames.append(_model_rows(name, channels, conversions, revenue, intervals.get(name)))
    return (
        pl.concat(frames)
        .join(costs, on="channel_name", how="left")
        .with_columns(pl.col("cost").fill_null(0.0))
        .pipe(with_cpo_roas, orders="conversions", revenue="revenue")
        .with_columns(order=pl.col("model").replace_strict(names, range(len(names))))
        .sort("order", "channel_name")
        .select(list(COMPARISON_SCHEMA))
    )


def write_comparison(frame: pl.DataFrame, output_dir: Path) -> list[Path]:
    """``model_comparison.csv`` (NULL as an empty field) and ``.parquet``, written atomically."""
    csv_path = output_dir / COMPARISON_CSV
    parquet_path = output_dir / COMPARISON_PARQUET
    write_atomically(csv_path, lambda p: frame.write_csv(p))
    write_atomically(parquet_path, lambda p: frame.write_parquet(p))
    return [csv_path, parquet_path]
