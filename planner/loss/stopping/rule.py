"""The stop rule for a run in progress: stop where the marginal loss gain per unit of cost falls below lambda.

Continuing from step t costs ``cost_per_step`` and buys -dL/dt of loss per step; the rule stops at
the first step where -dL/dt / cost_per_step < lambda, the first-order condition of minimizing
L(t) + lambda * cost_per_step * t on a convex, decreasing curve. :func:`recommend_stop` checks the
logged (step, loss) prefix, fits the curve families of ``curves`` and keeps the best, solves for
the stopping step in closed form (clipped to the last logged step and to a step budget), and gets
its interval from a moving-block bootstrap of the residuals (Kunsch 1989), which respects their
autocorrelation. :func:`run_budget_threshold` is the lambda at which a step budget is used exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlannerError
from planner.loss import fitting
from planner.loss.stopping.curves import MIN_POINTS, MODELS, Criterion, CurveFit, fit_curve, select_curve

Progress = Callable[[int], object]
"""Called with 1 after each bootstrap replicate (e.g. a progress bar's ``update``)."""


class StopRecommendation(BaseModel):
    model_config = ConfigDict(frozen=True)

    stop_step: int = Field(description="recommended step to stop at (>= the last logged step)")
    stop_step_interval: tuple[float, float] = Field(description="bootstrap percentile interval of the stopping step")
    confidence: float
    threshold: float = Field(description="lambda, loss per unit of cost")
    cost_per_step: float
    status: Literal["continue", "stop_now", "budget_bound"]
    current_step: int
    loss_now: float = Field(description="fitted loss at the last logged step")
    loss_at_stop: float
    loss_at_stop_interval: tuple[float, float]
    gain_to_stop: float = Field(description="loss_now - loss_at_stop")
    cost_to_stop: float = Field(description="(stop_step - current_step) * cost_per_step")
    marginal_gain_per_cost_now: float = Field(description="-dL/dt / cost_per_step at the last logged step")
    max_steps: int | None = None
    loss_at_max_steps: float | None = None
    gain_beyond_stop: float | None = Field(None, description="what continuing from stop_step to max_steps would still buy")
    model: str
    params: dict[str, float]
    model_scores: dict[str, float]
    criterion: str
    num_points: int
    num_excluded: int
    rmse: float


def recommend_stop(
    steps,
    losses,
    cost_per_step: float,
    threshold: float,
    max_steps: int | None = None,
    model: Literal["auto", "power", "exponential", "loglinear"] = "auto",
    criterion: Criterion = "aicc",
    num_bootstrap: int = 200,
    confidence: float = 0.9,
    seed: int = 0,
    num_excluded: int = 0,
    progress: Progress | None = None,
) -> StopRecommendation:
    """Stopping step for a run in progress from its logged (step, loss) prefix.

    ``progress(1)`` is called after each of the ``num_bootstrap`` replicates, failed refits included.
    """
    with fitting.single_threaded_blas():
        return _recommend_stop(steps, losses, cost_per_step, threshold, max_steps, model, criterion, num_bootstrap, confidence, seed, num_excluded, progress)


def _recommend_stop(steps, losses, cost_per_step, threshold, max_steps, model, criterion, num_bootstrap, confidence, seed, num_excluded, progress):
    t, y = _check_log(steps, losses)
    c, lam = _check_rule_inputs(t, cost_per_step, threshold, max_steps, confidence)
    _check_bootstrap(num_bootstrap)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PlannerError(f"the random seed must be a non-negative integer, got {seed!r}")
    fit, x_best, scores = select_curve(t, y, MODELS if model == "auto" else (model,), criterion)
    gain = lam * c
    now = float(t[-1])
    t_star = _stop_step(fit, gain, now, max_steps)
    if not math.isfinite(t_star):
        raise PlannerError("the fitted curve never reaches the threshold and no --max-steps bounds the run")
    (t_lo, t_hi), (l_lo, l_hi) = _bootstrap_interval(t, y, fit, x_best, t_star, gain, max_steps, num_bootstrap, confidence, seed, progress)
    stop_step = int(math.ceil(t_star - 1e-9))
    status = "stop_now" if stop_step <= now else ("budget_bound" if max_steps is not None and stop_step >= max_steps else "continue")
    loss_now = float(fit.predict(now))
    loss_stop = float(fit.predict(stop_step))
    loss_max = float(fit.predict(max_steps)) if max_steps is not None else None
    return StopRecommendation(
        stop_step=stop_step,
        stop_step_interval=(float(t_lo), float(t_hi)),
        confidence=confidence,
        threshold=lam,
        cost_per_step=c,
        status=status,
        current_step=int(now),
        loss_now=loss_now,
        loss_at_stop=loss_stop,
        loss_at_stop_interval=(float(min(l_lo, l_hi)), float(max(l_lo, l_hi))),
        gain_to_stop=loss_now - loss_stop,
        cost_to_stop=(stop_step - now) * c,
        marginal_gain_per_cost_now=float(-fit.slope(now)) / c,
        max_steps=max_steps,
        loss_at_max_steps=loss_max,
        gain_beyond_stop=None if loss_max is None else loss_stop - loss_max,
        model=fit.model,
        params=fit.params,
        model_scores=scores,
        criterion=criterion,
        num_points=int(t.size),
        num_excluded=num_excluded,
        rmse=math.sqrt(fit.rss / t.size),
    )


def _check_rule_inputs(t: np.ndarray, cost_per_step, threshold, max_steps, confidence) -> tuple[float, float]:
    """(cost per step, lambda) as floats, after checking them, the step budget and the confidence."""
    c = float(cost_per_step)
    lam = float(threshold)
    if not (math.isfinite(c) and c > 0):
        raise PlannerError(f"cost per step must be positive, got {cost_per_step}")
    if not (math.isfinite(lam) and lam > 0):
        raise PlannerError(f"the threshold lambda must be positive (loss per unit of cost), got {threshold}")
    if max_steps is not None and max_steps < t[-1]:
        raise PlannerError(f"max steps ({max_steps}) is before the last logged step ({int(t[-1])})")
    if not 0 < confidence < 1:
        raise PlannerError(f"confidence must be in (0, 1), got {confidence}")
    return c, lam


def _check_bootstrap(num_bootstrap: int) -> None:
    if not 0 <= num_bootstrap <= fitting.MAX_BOOTSTRAP:
        raise PlannerError(f"the number of bootstrap replicates must be between 0 and {fitting.MAX_BOOTSTRAP:,} "
                           f"(200 to 2,000 is plenty), got {num_bootstrap}")


def _stop_step(fit: CurveFit, gain: float, now: float, max_steps: int | None) -> float:
    """Where -dL/dt falls to ``gain`` on the fitted curve, no earlier than now nor later than the budget."""
    return min(max(fit.step_where_gain_equals(gain), now), float(max_steps) if max_steps is not None else math.inf)


def _bootstrap_interval(t, y, fit: CurveFit, x_best, t_star, gain, max_steps, num_bootstrap, confidence, seed, progress):
    """Percentile intervals ((step lo, hi), (loss lo, hi)) of the stop from a moving-block residual bootstrap.

    Each replicate refits the chosen model on the fitted curve plus resampled residuals; without a
    usable replicate both intervals collapse to the point estimate.
    """
    rng = np.random.default_rng(seed)
    fitted = fit.predict(t)
    resid = y - fitted
    block = max(2, int(round(t.size ** (1.0 / 3.0))))
    now = float(t[-1])
    boot_t, boot_l = [], []
    for _ in range(num_bootstrap):
        y_b = fitted + resid[fitting.block_indices(t.size, block, rng)]
        try:
            f_b, _ = fit_curve(t, y_b, fit.model, x0=x_best)
        except PlannerError:
            f_b = None
        tb = math.inf if f_b is None else _stop_step(f_b, gain, now, max_steps)
        if math.isfinite(tb):
            boot_t.append(tb)
            boot_l.append(float(f_b.predict(tb)))
        if progress is not None:
            progress(1)
    if not boot_t:
        return (t_star, t_star), (float(fit.predict(t_star)),) * 2
    tail = 50 * (1 - confidence)
    (t_lo, l_lo), (t_hi, l_hi) = (np.percentile(np.column_stack([boot_t, boot_l]), q, axis=0) for q in (tail, 100 - tail))
    return (t_lo, t_hi), (l_lo, l_hi)


def run_budget_threshold(fit: CurveFit, max_steps: float, cost_per_step: float) -> float:
    """Shadow price of a step budget: -dL/dt / cost at the last affordable step.

    With this lambda the rule stops exactly at ``max_steps``: it is the marginal value of the
    budget at its optimum (using it all), the Lagrange multiplier of t <= max_steps.
    """
    return float(-fit.slope(float(max_steps))) / float(cost_per_step)


def _check_log(steps, losses) -> tuple[np.ndarray, np.ndarray]:
    """Steps and losses as float arrays: 1-D, as long as each other, enough points, finite, steps positive and increasing."""
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if t.ndim != 1 or t.shape != y.shape:
        raise PlannerError("steps and losses must be 1-D and of the same length")
    if t.size < MIN_POINTS:
        raise PlannerError(f"need at least {MIN_POINTS} logged points to fit a loss curve, got {t.size}")
    if not np.all(np.isfinite(t)) or not np.all(np.isfinite(y)):
        raise PlannerError("the log has a missing, NaN or infinite value")
    if np.any(t <= 0):
        raise PlannerError("steps must be positive")
    if np.any(np.diff(t) <= 0):
        raise PlannerError(f"steps must be strictly increasing; step {int(t[np.argmax(np.diff(t) <= 0) + 1])} repeats or goes back")
    return t, y
