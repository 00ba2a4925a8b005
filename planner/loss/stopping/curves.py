"""Loss-curve families of one run and their fits: power law, exponential, log-linear.

L(t) = E + A t^-alpha, E + A exp(-k t) and a - b log t, with their slopes and the closed-form step
at which -dL/dt falls to a given gain per step (what the stopping rule solves). Each family is
fitted by multi-start trust-region least squares (scipy ``least_squares``, imported when a fit
runs) on time scaled to the last logged step, so that every parameter is O(1); the families are
compared by AICc (Hurvich & Tsai 1989), BIC, or error on the last 20% of the points held out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from planner.errors import PlannerError
from planner.loss import fitting

ModelName = Literal["power", "exponential", "loglinear"]
Criterion = Literal["aicc", "bic", "holdout"]
MODELS: tuple[str, ...] = ("power", "exponential", "loglinear")
MIN_POINTS = 8


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


# --------------------------------------------------------------------------------------------
# The families in natural parameters (t in steps)


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


# --------------------------------------------------------------------------------------------
# The optimizer's view: scaled time tau = t / t_scale, logs of the positive parameters


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


def _bounds(model: str, y) -> tuple:
    """E within ten ranges of the data below its minimum, rates within [0.01, 20] of t_scale.

    Outside them the power law degenerates into the log-linear limit (alpha -> 0, E -> -inf);
    the log-linear model is unbounded.
    """
    if model == "loglinear":
        return (-np.inf, np.inf)
    span = float(np.ptp(y)) or 1e-3
    return ([float(np.min(y)) - 10.0 * span, -30.0, math.log(0.01)], [float(np.min(y)) + span, 30.0, math.log(20.0)])


# --------------------------------------------------------------------------------------------
# Fitting and choosing a family


def fit_curve(steps, losses, model: str, x0: np.ndarray | None = None) -> tuple[CurveFit, np.ndarray]:
    """Least-squares fit of one curve model (multi-start trust-region, scipy ``least_squares``).

    The power law's asymptote E is bounded above by the smallest observed loss plus the noise
    scale, which keeps the fit from trading E against A far outside the data. Returns the fit and
    the optimizer vector (to warm-start bootstrap refits).
    """
    from scipy.optimize import least_squares

    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    t_scale = float(t[-1])
    tau = t / t_scale
    fun = _residual_fn(model, tau, y)
    starts = [x0] if x0 is not None else _starts(model, tau, y)
    bounds = _bounds(model, y)
    best = None
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


def select_curve(steps, losses, models=MODELS, criterion: Criterion = "aicc"):
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
            scores[m] = _holdout_rmse(t, y, m)
        else:
            raise PlannerError(f"unknown criterion {criterion!r}; use aicc, bic or holdout")
    best = min(scores, key=scores.get)
    return fits[best][0], fits[best][1], scores


def _holdout_rmse(t: np.ndarray, y: np.ndarray, model: str) -> float:
    """RMSE on the last 20% of the points of the model fitted to the first 80%."""
    cut = max(int(round(0.8 * t.size)), MIN_POINTS - 2)
    if t.size - cut < 2:
        raise PlannerError(f"holdout selection needs at least {cut + 2} points, got {t.size}")
    head, _ = fit_curve(t[:cut], y[:cut], model)
    return float(np.sqrt(np.mean((head.predict(t[cut:]) - y[cut:]) ** 2)))
