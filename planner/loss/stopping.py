"""When to stop: the marginal loss gain per unit of cost against a threshold lambda.

The rule. Continuing a run from step t costs ``cost_per_step`` (FLOPs, GPU-hours or $: any unit,
as long as lambda is in loss per that unit) and buys -dL/dt of loss per step. Stop at the first
step where -dL/dt / cost_per_step < lambda. For a convex, decreasing loss curve this is the
first-order condition of minimizing L(t) + lambda * cost_per_step * t, so lambda is the price
of one unit of cost in loss: either given by the user, or the shadow price of a budget, e.g.
:func:`planner.loss.scaling.compute_shadow_price` (what one more FLOP buys when spent on a
compute-optimal run) or :func:`run_budget_threshold` (what the last step of a step budget buys).

For a run in progress the curve is fitted to the logged prefix: the power law
L(t) = E + A t^-alpha and the alternatives exponential (E + A exp(-k t)) and log-linear
(a - b log t), chosen by AICc (Hurvich & Tsai 1989), BIC, or error on the last 20% held out.
The stopping step has a closed form for each; its interval comes from a moving-block bootstrap
of the residuals (Kunsch 1989), which respects their autocorrelation. The backtest replays the
rule on complete curves and reports regret against the oracle that knows the whole curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import least_squares

from planner.errors import PlannerError
from planner.loss import fitting

ModelName = Literal["power", "exponential", "loglinear"]
MODELS: tuple[str, ...] = ("power", "exponential", "loglinear")
MIN_POINTS = 8


# --------------------------------------------------------------------------------------------
# Curve models. Time is scaled, tau = t / t_scale, so that every parameter is O(1).


@dataclass(frozen=True)
class CurveFit:
    """A fitted curve. ``params`` are the natural parameters; t is in steps."""

    model: str
    params: dict[str, float]
    t_scale: float
    rss: float
    num_points: int

    @property
    def num_params(self) -> int:
        return len(self.params)

    def predict(self, t):
        return curve_value(self.model, self.params, np.asarray(t, dtype=np.float64))

    def slope(self, t):
        """dL/dt in loss per step."""
        return curve_slope(self.model, self.params, np.asarray(t, dtype=np.float64))

    def step_where_gain_equals(self, gain_per_step: float) -> float:
        """The step t at which -dL/dt = gain_per_step (closed form; inf or 0 at the extremes)."""
        return gain_crossing_step(self.model, self.params, gain_per_step)


def curve_value(model: str, p: dict[str, float], t):
    """L(t): power E + A t^-alpha, exponential E + A exp(-k t), log-linear a - b log t (t in steps)."""
    if model == "power":
        return p["E"] + p["A"] * t ** (-p["alpha"])
    if model == "exponential":
        return p["E"] + p["A"] * np.exp(-p["k"] * t)
    if model == "loglinear":
        return p["a"] - p["b"] * np.log(t)
    raise PlannerError(f"unknown curve model {model!r}; use {', '.join(MODELS)}")


def curve_slope(model: str, p: dict[str, float], t):
    """dL/dt of :func:`curve_value`."""
    if model == "power":
        return -p["alpha"] * p["A"] * t ** (-p["alpha"] - 1.0)
    if model == "exponential":
        return -p["k"] * p["A"] * np.exp(-p["k"] * t)
    if model == "loglinear":
        return -p["b"] / t
    raise PlannerError(f"unknown curve model {model!r}; use {', '.join(MODELS)}")


def gain_crossing_step(model: str, p: dict[str, float], gain_per_step: float) -> float:
    """Solve -dL/dt = g for t: the stopping step of the rule with g = lambda * cost_per_step.

    power: t = (alpha A / g)^(1/(alpha+1)); exponential: t = ln(k A / g) / k;
    log-linear: t = b / g. All three slopes decrease monotonically in t, so the rule stops at the
    first (only) crossing; a curve that does not decrease (A <= 0 or b <= 0) stops at once (t = 0).
    """
    g = float(gain_per_step)
    if not g > 0:
        return math.inf
    if model == "power":
        num = p["alpha"] * p["A"]
        return (num / g) ** (1.0 / (p["alpha"] + 1.0)) if num > 0 else 0.0
    if model == "exponential":
        num = p["k"] * p["A"]
        return max(math.log(num / g) / p["k"], 0.0) if num > 0 and p["k"] > 0 else 0.0
    if model == "loglinear":
        return p["b"] / g if p["b"] > 0 else 0.0
    raise PlannerError(f"unknown curve model {model!r}; use {', '.join(MODELS)}")


def _unpack(model: str, x, t_scale: float) -> dict[str, float]:
    """Optimizer vector (scaled time, logs of positive parameters) to natural parameters in steps."""
    if model == "power":
        e, log_a, log_alpha = x
        alpha = math.exp(log_alpha)
        return {"E": float(e), "A": math.exp(log_a) * t_scale**alpha, "alpha": alpha}
    if model == "exponential":
        e, log_a, log_k = x
        return {"E": float(e), "A": math.exp(log_a), "k": math.exp(log_k) / t_scale}
    a, b = x
    return {"a": float(a + b * math.log(t_scale)), "b": float(b)}


def _residual_fn(model: str, tau, y):
    if model == "power":
        return lambda x: x[0] + np.exp(x[1]) * tau ** (-np.exp(x[2])) - y
    if model == "exponential":
        return lambda x: x[0] + np.exp(x[1]) * np.exp(-np.exp(x[2]) * tau) - y
    return lambda x: x[0] - x[1] * np.log(tau) - y


def _jacobian_fn(model: str, tau):
    log_tau = np.log(tau)
    ones = np.ones_like(tau)
    if model == "power":

        def jac(x):
            alpha = np.exp(x[2])
            g = np.exp(x[1]) * tau ** (-alpha)
            return np.column_stack([ones, g, -g * log_tau * alpha])

    elif model == "exponential":

        def jac(x):
            k = np.exp(x[2])
            g = np.exp(x[1]) * np.exp(-k * tau)
            return np.column_stack([ones, g, -g * tau * k])

    else:

        def jac(x):
            return np.column_stack([ones, -log_tau])

    return jac


def _starts(model: str, tau, y) -> list[np.ndarray]:
    lo, span = float(np.min(y)), float(np.ptp(y)) or 1e-3
    if model == "loglinear":
        b, a = np.polyfit(-np.log(tau), y, 1)
        return [np.array([a, b])]
    starts = []
    for e_off in (0.02, 0.3, 1.0, 3.0):
        e = lo - e_off * span
        for log_rate in ((-1.5, -0.5, 0.5) if model == "power" else (0.0, 1.0, 2.0)):
            a = max(float(y[0]) - e, 1e-6) * (float(tau[0]) ** math.exp(log_rate) if model == "power" else 1.0)
            starts.append(np.array([e, math.log(a), log_rate]))
    return starts


def fit_curve(steps, losses, model: str, x0: np.ndarray | None = None) -> tuple[CurveFit, np.ndarray]:
    """Least-squares fit of one curve model (multi-start trust-region, scipy ``least_squares``).

    The power law's asymptote E is bounded above by the smallest observed loss plus the noise
    scale, which keeps the fit from trading E against A far outside the data. Returns the fit and
    the optimizer vector (to warm-start bootstrap refits).
    """
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    t_scale = float(t[-1])
    tau = t / t_scale
    fun = _residual_fn(model, tau, y)
    best = None
    if model == "loglinear":
        starts = [x0] if x0 is not None else _starts(model, tau, y)
        bounds = (-np.inf, np.inf)
    else:
        starts = [x0] if x0 is not None else _starts(model, tau, y)
        # E within ten ranges of the data below its minimum, rates within [0.01, 20] of t_scale:
        # outside them the power law degenerates into the log-linear limit (alpha -> 0, E -> -inf).
        span = float(np.ptp(y)) or 1e-3
        bounds = ([float(np.min(y)) - 10.0 * span, -30.0, math.log(0.01)], [float(np.min(y)) + span, 30.0, math.log(20.0)])
    for s in starts:
        s = np.clip(s, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9) if model != "loglinear" else s
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = least_squares(fun, s, jac=_jacobian_fn(model, tau), bounds=bounds, method="trf", x_scale="jac", max_nfev=500)
        if np.all(np.isfinite(res.fun)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise PlannerError(f"the {model} curve could not be fitted to the log")
    rss = float(np.sum(best.fun**2))
    return CurveFit(model=model, params=_unpack(model, best.x, t_scale), t_scale=t_scale, rss=rss, num_points=t.size), best.x


def select_curve(steps, losses, models=MODELS, criterion: Literal["aicc", "bic", "holdout"] = "aicc"):
    """Fit each model and keep the best by AICc, BIC or RMSE on the last 20% of the points.

    Returns (best fit, its optimizer vector, table of scores per model).
    """
    with fitting.single_threaded_blas():
        return _select_curve(steps, losses, models, criterion)


def _select_curve(steps, losses, models, criterion):
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    scores: dict[str, float] = {}
    fits = {}
    for m in models:
        fit, x = fit_curve(t, y, m)
        fits[m] = (fit, x)
        if criterion == "aicc":
            scores[m] = fitting.gaussian_aicc(fit.rss, t.size, fit.num_params + 1)
        elif criterion == "bic":
            scores[m] = fitting.gaussian_bic(fit.rss, t.size, fit.num_params + 1)
        elif criterion == "holdout":
            cut = max(int(round(0.8 * t.size)), MIN_POINTS - 2)
            if t.size - cut < 2:
                raise PlannerError(f"holdout selection needs at least {cut + 2} points, got {t.size}")
            head, _ = fit_curve(t[:cut], y[:cut], m)
            scores[m] = float(np.sqrt(np.mean((head.predict(t[cut:]) - y[cut:]) ** 2)))
        else:
            raise PlannerError(f"unknown criterion {criterion!r}; use aicc, bic or holdout")
    best = min(scores, key=scores.get)
    return fits[best][0], fits[best][1], scores


# --------------------------------------------------------------------------------------------
# The recommendation


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
    criterion: Literal["aicc", "bic", "holdout"] = "aicc",
    num_bootstrap: int = 200,
    confidence: float = 0.9,
    seed: int = 0,
    num_excluded: int = 0,
) -> StopRecommendation:
    """Stopping step for a run in progress from its logged (step, loss) prefix."""
    with fitting.single_threaded_blas():
        return _recommend_stop(steps, losses, cost_per_step, threshold, max_steps, model, criterion, num_bootstrap, confidence, seed, num_excluded)


def _recommend_stop(steps, losses, cost_per_step, threshold, max_steps, model, criterion, num_bootstrap, confidence, seed, num_excluded):
    t, y = _check_log(steps, losses)
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
    models = MODELS if model == "auto" else (model,)
    fit, x_best, scores = select_curve(t, y, models, criterion)
    gain = lam * c
    now = float(t[-1])

    def decide(f: CurveFit) -> float:
        return min(max(f.step_where_gain_equals(gain), now), float(max_steps) if max_steps is not None else math.inf)

    t_star = decide(fit)
    if not math.isfinite(t_star):
        raise PlannerError("the fitted curve never reaches the threshold and no --max-steps bounds the run")
    # Moving-block residual bootstrap: refit the chosen model on fitted + resampled residuals.
    rng = np.random.default_rng(seed)
    resid = y - fit.predict(t)
    block = max(2, int(round(t.size ** (1.0 / 3.0))))
    boot_t, boot_l = [], []
    for _ in range(num_bootstrap):
        y_b = fit.predict(t) + resid[fitting.block_indices(t.size, block, rng)]
        try:
            f_b, _ = fit_curve(t, y_b, fit.model, x0=x_best)
        except PlannerError:
            continue
        tb = decide(f_b)
        if math.isfinite(tb):
            boot_t.append(tb)
            boot_l.append(float(f_b.predict(tb)))
    if boot_t:
        (t_lo, l_lo), (t_hi, l_hi) = (np.percentile(np.column_stack([boot_t, boot_l]), q, axis=0) for q in (50 * (1 - confidence), 100 - 50 * (1 - confidence)))
    else:
        t_lo = t_hi = t_star
        l_lo = l_hi = float(fit.predict(t_star))
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


def run_budget_threshold(fit: CurveFit, max_steps: float, cost_per_step: float) -> float:
    """Shadow price of a step budget: -dL/dt / cost at the last affordable step.

    With this lambda the rule stops exactly at ``max_steps``: it is the marginal value of the
    budget at its optimum (using it all), the Lagrange multiplier of t <= max_steps.
    """
    return float(-fit.slope(float(max_steps))) / float(cost_per_step)


def _check_log(steps, losses) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------------
# Reading logs


def read_loss_log(path: str | Path, metric: str = "loss") -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, losses, number of rows excluded) from a CSV (columns step, loss) or an HF trainer_state.json.

    trainer_state.json: the entries of ``log_history`` that carry both ``step`` and ``metric``
    (``loss`` is the training loss the Trainer logs every ``logging_steps``; ``eval_loss`` also
    works). Rows at step 0 (the loss before any update) are excluded, and counted, because the
    curve models need t > 0. Missing, NaN or non-numeric values are errors, never dropped.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PlannerError(f"no such file: {path}")
    if path.suffix == ".json":
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PlannerError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        history = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(history, list):
            raise PlannerError(f"{path} has no log_history list (is it a Hugging Face trainer_state.json?)")
        rows = [(e["step"], e[metric]) for e in history if isinstance(e, dict) and "step" in e and metric in e]
        if not rows:
            raise PlannerError(f"{path}: no log_history entry has both 'step' and {metric!r}")
        steps = np.array([r[0] for r in rows], dtype=np.float64)
        losses = np.array([r[1] if r[1] is not None else np.nan for r in rows], dtype=np.float64)
    else:
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise PlannerError(f"{path} is empty; expected columns step, {metric}") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise PlannerError(f"{path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
        frame.columns = [str(c).strip().lower() for c in frame.columns]
        missing = [c for c in ("step", metric) if c not in frame.columns]
        if missing:
            raise PlannerError(f"{path} lacks column(s) {', '.join(missing)}; expected step, {metric} (found {', '.join(frame.columns) or 'none'})")
        if frame.empty:
            raise PlannerError(f"{path} has a header but no rows")
        steps = pd.to_numeric(frame["step"], errors="coerce").to_numpy(dtype=np.float64)
        losses = pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(steps) & np.isfinite(losses))
    if bad.any():
        raise PlannerError(f"{path}: missing, NaN or non-numeric value at row {int(np.argmax(bad)) + 1}")
    zero = steps <= 0
    if np.any(steps < 0):
        raise PlannerError(f"{path}: negative step at row {int(np.argmax(steps < 0)) + 1}")
    return steps[~zero], losses[~zero], int(zero.sum())


# --------------------------------------------------------------------------------------------
# Backtest


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
    criterion: Literal["aicc", "bic", "holdout"] = "aicc",
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
            rows.append(
                BacktestRow(
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
            )
    return rows


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
