"""Backtesting the stop rule: replay it on complete loss curves and measure regret against an oracle.

For each curve and each prefix length the rule sees only the prefix, recommends a stop, and is
scored by J(t) = L(t) + lambda * cost * t on a reference curve (the noise-free curve when known,
else a running mean of the observed one) against the oracle step that minimizes J over the rest
of the curve. :func:`law_curve` makes test curves from a Chinchilla-form law.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from planner.loss.stopping.curves import MIN_POINTS, Criterion
from planner.loss.stopping.rule import recommend_stop


class BacktestRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    curve: str
    prefix_fraction: float
    prefix_step: int
    recommended_step: int
    oracle_step: int
    model: str
    regret: float = Field(description="J(recommended) - J(oracle), J(t) = L(t) + lambda cost t, in loss units")
    relative_regret: float = Field(description="regret / (J(prefix end) - J(oracle)); 0 is perfect, 1 = no better than stopping at once")
    stop_in_interval: bool = Field(description="oracle step within the bootstrap interval, widened by one logging interval")


def oracle_stop(steps, reference_loss, cost_per_step: float, threshold: float, start_step: float) -> tuple[int, float]:
    """The step in [start_step, end] minimizing J(t) = L(t) + lambda * cost * t on the reference curve."""
    t = np.asarray(steps, dtype=np.float64)
    j = np.asarray(reference_loss, dtype=np.float64) + threshold * cost_per_step * t
    mask = t >= start_step
    i = int(np.argmin(np.where(mask, j, np.inf)))
    return int(t[i]), float(j[i])


def backtest(
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    cost_per_step: float,
    threshold: float,
    prefix_fractions=(0.2, 0.3, 0.5),
    num_bootstrap: int = 100,
    criterion: Criterion = "aicc",
) -> list[BacktestRow]:
    """Replay the rule on complete curves: fit each prefix, stop, compare with the oracle.

    ``curves`` maps a name to (steps, observed losses, reference losses or None). The reference
    is the noise-free curve when known (curves from known laws); otherwise the observed losses
    smoothed by a centered running mean over 5% of the points. The recommendation is clipped to
    the curve's last step, the oracle searches the same range [prefix end, last step].
    """
    rows = []
    for name, (steps, observed, reference) in curves.items():
        t = np.asarray(steps, dtype=np.float64)
        y = np.asarray(observed, dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64) if reference is not None else _running_mean(y, max(3, t.size // 20))
        for frac in prefix_fractions:
            rows.append(_replay_prefix(name, t, y, ref, frac, cost_per_step, threshold, num_bootstrap, criterion))
    return rows


def _replay_prefix(name, t, y, ref, frac, cost_per_step, threshold, num_bootstrap, criterion) -> BacktestRow:
    """The rule on the first ``frac`` of one curve, scored against the oracle on the reference."""
    k = max(MIN_POINTS, int(round(frac * t.size)))
    rec = recommend_stop(t[:k], y[:k], cost_per_step, threshold, max_steps=int(t[-1]), num_bootstrap=num_bootstrap, criterion=criterion)
    rec_step = min(rec.stop_step, int(t[-1]))
    j_rec = float(np.interp(rec_step, t, ref)) + threshold * cost_per_step * rec_step
    oracle_t, oracle_j = oracle_stop(t, ref, cost_per_step, threshold, t[k - 1])
    # The oracle is resolved to the log's spacing only: allow one spacing around the interval.
    spacing = float(np.max(np.diff(t[max(0, np.searchsorted(t, oracle_t) - 1): np.searchsorted(t, oracle_t) + 2])))
    j0 = float(ref[k - 1]) + threshold * cost_per_step * t[k - 1]
    regret = j_rec - oracle_j
    denom = j0 - oracle_j
    return BacktestRow(
        curve=name,
        prefix_fraction=frac,
        prefix_step=int(t[k - 1]),
        recommended_step=rec_step,
        oracle_step=oracle_t,
        model=rec.model,
        regret=regret,
        relative_regret=regret / denom if denom > 0 else 0.0,
        stop_in_interval=bool(rec.stop_step_interval[0] - spacing <= oracle_t <= rec.stop_step_interval[1] + spacing),
    )


def _running_mean(y: np.ndarray, window: int) -> np.ndarray:
    pad = window // 2
    padded = np.pad(y, pad, mode="edge")
    kernel = np.ones(window) / window
    return np.convolve(padded, kernel, mode="valid")[: y.size]


def law_curve(E: float, A: float, B: float, alpha: float, beta: float, params_n: float, tokens_per_step: float, steps):
    """Loss along a run from a Chinchilla-form law: L(t) = E + A / N^alpha + B / (t tokens_per_step)^beta.

    A power law in t with floor E + A/N^alpha. Caveat: the law describes the final loss of runs
    whose schedule was set for their length (Hoffmann et al. 2022, section 3); treating it as
    the curve within one run is an approximation used to generate backtest curves.
    """
    t = np.asarray(steps, dtype=np.float64)
    return E + A * params_n ** (-alpha) + B * (t * tokens_per_step) ** (-beta)
