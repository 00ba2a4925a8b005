"""How sure a step time is: its 80% interval and its quantiles, in log space, vectorized over set-ups.

Uncalibrated, the interval is the committed one of the set-up's regime (single GPU, one node, several
nodes: the leave-one-source-out errors on published throughput, ``planner.cost.timing.fit``). A
calibration profile replaces it with the spread of its own held-out points, but only inside what the
profile timed (``ProfileScope``): beyond it (another method or precision, longer micro-batches, more
GPUs than it ran) the profile's points say nothing, and the interval is the wider of the two. A
budget held at a confidence (``plan --confidence``) is held at the quantile of the same interval, so
the 90% quantile is the interval's top.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost.timing import grounding as time_model

PROFILE_TOKENS_REACH = 4
"""How far past its largest timed micro-batch (in tokens) a calibration profile's interval is trusted."""
INTERVAL_QUANTILE = 0.9
"""The upper end of the central 80% interval, as a one-sided quantile."""


def calibrated_log_interval(profile) -> tuple[float, float] | None:
    """(low, high) log(measured / calibrated step time) over the profile's held-out points (their
    10th and 90th percentiles; the extremes with fewer than 5 points), None without any."""
    ratios = [np.log(row.measured_step_time_s / row.after_step_time_s) for row in getattr(profile, "accuracy", [])
              if row.split == "holdout" and row.measured_step_time_s and row.after_step_time_s]
    if not ratios:
        return None
    if len(ratios) < 5:
        return float(min(min(ratios), 0.0)), float(max(max(ratios), 0.0))
    low, high = np.quantile(ratios, (0.1, 0.9))
    return float(low), float(high)


class ProfileScope(NamedTuple):
    """What a calibration profile timed: its (method, precision) pairs, its largest micro-batch in tokens
    and its most GPUs."""

    pairs: frozenset
    tokens: int
    num_gpus: int


def profile_scope(profile) -> ProfileScope | None:
    """The scope of the profile's timed runs (None: it timed none)."""
    timed = [m.setup for m in getattr(profile, "measurements", []) if m.status == "ok" and m.step_time_s]
    if not timed:
        return None
    return ProfileScope(frozenset((t.method, t.precision) for t in timed), max(t.micro_batch * t.seq_len for t in timed),
                        max(t.num_gpus for t in timed))


def outside_scope(scope: ProfileScope | None, method, precision, tokens, num_gpus) -> np.ndarray:
    """Per set-up (arrays or scalars): whether it lies beyond what the profile timed."""
    g = np.asarray(num_gpus)
    if scope is None:
        return np.zeros(g.shape, bool)
    timed = [f"{m}|{p}" for m, p in scope.pairs]
    untimed = ~np.isin(np.char.add(np.char.add(np.asarray(method, dtype=str), "|"), np.asarray(precision, dtype=str)),
                       timed)
    return untimed | (np.asarray(tokens) > PROFILE_TOKENS_REACH * scope.tokens) | (g > scope.num_gpus)


def scope_gaps(scope: ProfileScope | None, setup) -> list[str]:
    """In words, how ``setup`` goes beyond what the profile timed (empty: it does not)."""
    if scope is None:
        return []
    timed = ", ".join(f"{m} {p}" for m, p in sorted(scope.pairs))
    tokens = setup.micro_batch * setup.seq_len
    return [what for what, out in (
        (f"{setup.method} at {setup.precision} (timed: {timed})", (setup.method, setup.precision) not in scope.pairs),
        (f"{tokens:,} tokens per micro-batch (timed: up to {scope.tokens:,})", tokens > PROFILE_TOKENS_REACH * scope.tokens),
        (f"{setup.num_gpus} GPUs (timed: up to {scope.num_gpus})", setup.num_gpus > scope.num_gpus)) if out]


def regime_log_bounds(num_gpus, gpus_per_node: int) -> tuple[np.ndarray, np.ndarray]:
    """The committed 80% interval of each set-up's regime (``constants.json``'s ``interval_log_ratio``)."""
    g = np.asarray(num_gpus, dtype=np.float64)
    table = time_model.load_constants()["interval_log_ratio"]

    def pick(end: int) -> np.ndarray:
        return np.where(g <= 1, table["single-gpu"][end],
                        np.where(g <= gpus_per_node, table["single-node"][end], table["multi-node"][end]))

    return pick(0), pick(1)


def time_log_bounds(num_gpus, gpus_per_node: int, profile, method, precision, tokens):
    """(low, high) log(measured / predicted time) of each set-up's 80% interval and whether it is beyond
    what ``profile`` timed: the profile's held-out spread inside its scope, the wider of it and the
    regime's outside, the regime's without a profile (``method``, ``precision``, ``tokens`` per
    micro-batch and ``num_gpus``: scalars or arrays of one shape)."""
    low, high = regime_log_bounds(num_gpus, gpus_per_node)
    own = None if profile is None else calibrated_log_interval(profile)
    if own is None:
        return low, high, np.zeros(np.shape(low), bool)
    outside = outside_scope(profile_scope(profile), method, precision, tokens, num_gpus)
    return (np.where(outside, np.minimum(own[0], low), own[0]), np.where(outside, np.maximum(own[1], high), own[1]),
            outside)


def quantile_factor(low, high, quantile: float | None):
    """The time not exceeded with probability ``quantile`` over the predicted time, for an interval whose
    ends are the 10th and 90th percentiles of a normal log error: ``exp(centre + z_q x spread)``; 1 for
    ``quantile`` None (the median prediction). At 0.9 it is the interval's top."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if quantile is None:
        return np.ones_like(low)
    # imported only when a confidence is asked (statistics imports fractions and decimal)
    from statistics import NormalDist

    z_q, z_top = NormalDist().inv_cdf(quantile), NormalDist().inv_cdf(INTERVAL_QUANTILE)
    return np.exp((low + high) / 2.0 + z_q * (high - low) / (2.0 * z_top))


def interval_factors(num_gpus: int, gpus_per_node: int, profile, method: str, precision: str,
                     tokens: int) -> tuple[float, float, str]:
    """(low, high, basis) of one set-up: its 80% interval as factors of the predicted time, and where the
    interval comes from in words (``time_log_bounds``)."""
    low, high, outside = time_log_bounds(num_gpus, gpus_per_node, profile, method, precision, tokens)
    regime = time_model.regime(num_gpus, gpus_per_node)
    calibrated = profile is not None and calibrated_log_interval(profile) is not None
    return float(np.exp(low)), float(np.exp(high)), basis_words(regime, calibrated, bool(outside))


def basis_words(regime: str, calibrated: bool, outside: bool) -> str:
    """Where an interval comes from, in words."""
    published = f"leave-one-source-out errors of the {regime} regime (published throughput)"
    if not calibrated:
        return published
    if outside:
        return f"wider of the calibration profile's held-out points and the {published}: beyond what the profile timed"
    return "calibration profile's held-out points"
