"""Fitting a Chinchilla-form law to the user's runs (read from a CSV), with bootstrap intervals.

:class:`ScalingLawFitter` follows Hoffmann et al. 2022 as replicated by Besiroglu et al. 2024: a
Huber loss on log-loss residuals of the log-sum-exp parametrization, L-BFGS from a grid of
starting points (screened, then the best polished), and a bootstrap over runs for percentile
intervals. It keeps scikit-learn's conventions (``fit`` returns self, fitted attributes end in
``_``) and reports a frozen :class:`ScalingFitResult`. The optimizer and objective live in
``planner.loss.fitting``; scipy.optimize is imported only when a fit runs. An optional
``progress`` callback is called once per bootstrap replicate, so a caller can draw a bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlannerError
from planner.loss import fitting
from planner.loss.csv_files import numeric_columns, read_csv_frame
from planner.loss.scaling.allocation import optimal_closed_form
from planner.loss.scaling.laws import FLOPS_PER_PARAM_TOKEN, ScalingLaw, chinchilla_loss

RUN_COLUMNS = ("params", "tokens", "loss")

Progress = Callable[[int], object]
"""Called with 1 after each bootstrap replicate (e.g. a progress bar's ``update``)."""


class ScalingFitResult(BaseModel):
    """Fitted constants of L = E + A/N^alpha + B/D^beta with intervals and goodness of fit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]] = Field(description="bootstrap percentile intervals")
    confidence: float
    num_bootstrap: int
    num_points: int
    num_excluded: int
    huber_delta: float
    objective: float = Field(description="sum of Huber losses of log-loss residuals at the optimum")
    rmse_log_loss: float
    mae_loss: float
    r2_loss: float
    tokens_per_param_optimal: float = Field(description="D*/N* implied at C = 1e21 FLOP (scale-dependent unless alpha = beta)")
    grid: str


class ScalingLawFitter:
    """Huber fit of log L = LSE(a - alpha log N, b - beta log D, e) from a grid of L-BFGS starts.

    The protocol of Hoffmann et al. 2022 (section 3.3, appendix D.2) as replicated by Besiroglu
    et al. 2024: Huber loss (delta = 1e-3) on log-loss residuals, L-BFGS from a grid of initial
    values, the best optimum kept. Each start first runs 20 L-BFGS iterations; the ten best are
    then run to convergence (on the Chinchilla points this finds the optimum of running every
    start to convergence, objective equal to 1e-12; see benchmarks/loss.md). Intervals: a
    bootstrap over runs (rows resampled with replacement, each refit from the point estimate, as
    Besiroglu et al. do), percentile intervals. scikit-learn conventions: ``fit`` returns self,
    fitted attributes end in ``_``.
    """

    MIN_POINTS = 8

    def __init__(
        self,
        delta: float = 1e-3,
        grid: Literal["coarse", "hoffmann"] = "coarse",
        num_bootstrap: int = 200,
        confidence: float = 0.95,
        exclude_highest_loss: int = 0,
        seed: int = 0,
    ):
        if grid not in ("coarse", "hoffmann"):
            raise PlannerError(f"unknown grid {grid!r}; use coarse or hoffmann")
        if not 0 < confidence < 1:
            raise PlannerError(f"confidence must be in (0, 1), got {confidence}")
        if num_bootstrap < 0 or exclude_highest_loss < 0:
            raise PlannerError("num_bootstrap and exclude_highest_loss must be >= 0")
        if num_bootstrap > fitting.MAX_BOOTSTRAP:
            raise PlannerError(f"{num_bootstrap} bootstrap replicates is more than percentile intervals need: "
                               f"use at most {fitting.MAX_BOOTSTRAP:,} (200 to 2,000 is plenty)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise PlannerError(f"the random seed must be a non-negative integer, got {seed!r}")
        if not (math.isfinite(delta) and delta > 0):
            raise PlannerError(f"the Huber delta must be a positive number (Hoffmann et al. use 1e-3), got {delta}")
        self.delta = delta
        self.grid = grid
        self.num_bootstrap = num_bootstrap
        self.confidence = confidence
        self.exclude_highest_loss = exclude_highest_loss
        self.seed = seed

    def fit(self, params_n, tokens_d, loss, progress: Progress | None = None) -> ScalingLawFitter:
        """Fit the runs; ``progress(1)`` is called after each of the ``num_bootstrap`` replicates."""
        with fitting.single_threaded_blas():
            return self._fit(params_n, tokens_d, loss, progress)

    def _fit(self, params_n, tokens_d, loss, progress: Progress | None) -> ScalingLawFitter:
        n, d, lo, keep = self._kept_runs(params_n, tokens_d, loss)
        log_n, log_d, log_l = np.log(n), np.log(d), np.log(lo)
        grid = fitting.COARSE_GRID if self.grid == "coarse" else fitting.HOFFMANN_GRID
        theta, objective = _screened_multistart(log_n, log_d, log_l, self.delta, fitting.grid_starts(grid))
        self.theta_ = theta
        self.objective_ = objective
        self.num_excluded_ = int((~keep).sum())
        self.params_n_, self.tokens_d_, self.loss_ = n, d, lo
        self.bootstrap_ = self._bootstrap(log_n, log_d, log_l, theta, progress)
        return self

    def _kept_runs(self, params_n, tokens_d, loss):
        """The validated columns less the excluded highest-loss runs, and the mask of those kept."""
        n = fitting.require_finite_positive("params", params_n)
        d = fitting.require_finite_positive("tokens", tokens_d)
        lo = fitting.require_finite_positive("loss", loss)
        if not (n.shape == d.shape == lo.shape) or n.ndim != 1:
            raise PlannerError("params, tokens and loss must be 1-D columns of the same length")
        keep = np.ones(n.size, dtype=bool)
        if self.exclude_highest_loss and n.size - self.exclude_highest_loss < self.MIN_POINTS:
            raise PlannerError(f"excluding the {self.exclude_highest_loss} highest-loss runs of {n.size} leaves fewer than "
                               f"the {self.MIN_POINTS} a fit needs: exclude at most {max(n.size - self.MIN_POINTS, 0)}")
        if self.exclude_highest_loss:
            # Besiroglu et al. keep losses strictly below the k-th highest (notebook cell "indices").
            threshold = np.sort(lo)[-self.exclude_highest_loss]
            keep = lo < threshold
        n, d, lo = n[keep], d[keep], lo[keep]
        if n.size < self.MIN_POINTS:
            raise PlannerError(f"need at least {self.MIN_POINTS} runs to fit 5 constants, got {n.size}")
        if np.unique(n).size < 2 or np.unique(d).size < 2:
            raise PlannerError("the runs must vary both params and tokens (at least two distinct values of each)")
        return n, d, lo, keep

    def _bootstrap(self, log_n, log_d, log_l, theta, progress: Progress | None) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        out = np.full((self.num_bootstrap, 5), np.nan)
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(self.num_bootstrap):
                idx = rng.integers(0, log_n.size, size=log_n.size)
                x, f, ok = fitting.lbfgs(
                    lambda t, i=idx: fitting.lse_huber_objective(t, log_n[i], log_d[i], log_l[i], self.delta), theta
                )
                if ok and np.isfinite(f):
                    out[k] = x
                if progress is not None:
                    progress(1)
        return out

    @property
    def params_(self) -> dict[str, float]:
        a, b, e, alpha, beta = self.theta_
        return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta)}

    def predict(self, params_n, tokens_d):
        p = self.params_
        return chinchilla_loss(params_n, tokens_d, p["E"], p["A"], p["B"], p["alpha"], p["beta"])

    def to_law(self, name: str = "fitted") -> ScalingLaw:
        return ScalingLaw(name=name, form="chinchilla", param_count="total", citation="fitted by planner", **self.params_)

    def result(self) -> ScalingFitResult:
        boot = self.bootstrap_
        pred = self.predict(self.params_n_, self.tokens_d_)
        n_opt, d_opt = optimal_closed_form(self.to_law(), 1e21)
        return ScalingFitResult(
            **self.params_,
            intervals=self._intervals(),
            confidence=self.confidence,
            num_bootstrap=int(np.isfinite(boot).all(axis=1).sum()),
            num_points=int(self.loss_.size),
            num_excluded=self.num_excluded_,
            huber_delta=self.delta,
            objective=self.objective_,
            rmse_log_loss=float(np.sqrt(np.mean((np.log(pred) - np.log(self.loss_)) ** 2))),
            mae_loss=float(np.mean(np.abs(pred - self.loss_))),
            r2_loss=fitting.r_squared(self.loss_, pred),
            tokens_per_param_optimal=float(d_opt / n_opt),
            grid=self.grid,
        )

    def _intervals(self) -> dict[str, tuple[float, float]]:
        """Percentile intervals of the natural constants over the converged replicates (none below two)."""
        boot = self.bootstrap_
        if not (boot.shape[0] and np.isfinite(boot).all(axis=1).sum() >= 2):
            return {}
        natural = np.column_stack([np.exp(boot[:, 2]), np.exp(boot[:, 0]), np.exp(boot[:, 1]), boot[:, 3], boot[:, 4]])
        lo, hi = fitting.percentile_interval(natural, self.confidence)
        return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(("E", "A", "B", "alpha", "beta"))}


def _screened_multistart(log_n, log_d, log_l, delta, starts, screen_iters: int = 20, polish: int = 10):
    """Run every start for ``screen_iters`` L-BFGS iterations, then the ``polish`` best to convergence."""
    from scipy.optimize import minimize

    fun = lambda t: fitting.lse_huber_objective(t, log_n, log_d, log_l, delta)  # noqa: E731
    screened = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for x0 in starts:
            res = minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": screen_iters})
            if np.isfinite(res.fun) and np.all(np.isfinite(res.x)):
                screened.append((float(res.fun), res.x))
    if not screened:
        raise PlannerError("the scaling-law fit diverged from every starting point")
    screened.sort(key=lambda t: t[0])
    return fitting.multistart_lse_fit(log_n, log_d, log_l, delta, np.array([x for _, x in screened[:polish]]))


def fit_scaling_law(params_n, tokens_d, loss, progress: Progress | None = None, **kwargs) -> ScalingFitResult:
    """Fit L = E + A/N^alpha + B/D^beta to runs; keyword arguments go to :class:`ScalingLawFitter`."""
    return ScalingLawFitter(**kwargs).fit(params_n, tokens_d, loss, progress=progress).result()


def read_runs_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns ``params``, ``tokens`` (or ``flops``, then tokens = flops / 6 params) and ``loss``."""
    import pandas as pd

    path = Path(path)
    frame = read_csv_frame(path, RUN_COLUMNS)
    if "tokens" not in frame.columns and "flops" in frame.columns and "params" in frame.columns:
        flops = fitting.require_finite_positive("flops", pd.to_numeric(frame["flops"], errors="coerce"))
        frame["tokens"] = flops / (FLOPS_PER_PARAM_TOKEN * pd.to_numeric(frame["params"], errors="coerce"))
    params, tokens, loss = numeric_columns(frame, path, RUN_COLUMNS)
    return (
        fitting.require_finite_positive("params", params),
        fitting.require_finite_positive("tokens", tokens),
        fitting.require_finite_positive("loss", loss),
    )
