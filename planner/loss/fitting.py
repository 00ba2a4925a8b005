"""Fitting helpers shared by the scaling-law fit and the loss-curve fit of a run.

Pure numpy/scipy: a robust Huber objective, multi-start L-BFGS, the log-sum-exp
parametrization of the Chinchilla law, residual bootstraps and information criteria.
No plotting, no I/O: callers (``planner.loss.scaling``, ``planner.loss.stopping``) validate input.
scipy is imported inside the functions that call it (:func:`lbfgs`, :func:`lse_log_loss`), not with this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from planner.errors import PlannerError

# The grid of initial values of Hoffmann et al. 2022 (appendix D.2) that Besiroglu et al. 2024
# (arXiv 2404.10102, section 2 and the notebook `data_analysis.ipynb` of
# epoch-research/analyzing-chinchilla) also use: alpha, beta in {0, 0.5, ..., 2},
# e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}; 4500 starts in the order (alpha, beta, e, a, b).
HOFFMANN_GRID = {
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
    "e": np.arange(-1.0, 1.5, 0.5),
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
}
# A coarser grid over the same ranges (243 starts) for interactive use; the benchmark compares it
# with the full grid on the Chinchilla points (same optimum to 1e-9 in the objective).
COARSE_GRID = {
    "alpha": np.array([0.0, 1.0, 2.0]),
    "beta": np.array([0.0, 1.0, 2.0]),
    "e": np.array([-1.0, 0.0, 1.0]),
    "a": np.array([0.0, 10.0, 20.0]),
    "b": np.array([0.0, 10.0, 20.0]),
}

LSE_NAMES = ("a", "b", "e", "alpha", "beta")  # A = exp(a), B = exp(b), E = exp(e)


MAX_BOOTSTRAP = 100_000
"""Most bootstrap replicates a fit accepts: percentile intervals settle long before (200 to 2,000)."""


@functools.cache
def _openblas_thread_setters() -> tuple:
    """``openblas_set_num_threads_local`` of the OpenBLAS builds bundled with numpy and scipy wheels."""
    import numpy
    import scipy

    setters = []
    for pkg in (numpy, scipy):
        root = Path(pkg.__file__).parent
        for lib in (*root.parent.glob(f"{pkg.__name__}.libs/*openblas*"), *root.glob(".dylibs/*openblas*")):
            try:
                fn = ctypes.CDLL(str(lib)).openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            setters.append(fn)
    return tuple(setters)


@contextlib.contextmanager
def single_threaded_blas():
    """Run small optimizations with one BLAS thread.

    scipy's L-BFGS-B and least_squares call BLAS on vectors of 3 to 5 numbers; OpenBLAS's thread
    pool then costs up to 1000x the arithmetic (measured on a loaded 2-core machine: 2 ms against
    5 us per L-BFGS-B iteration). Thread-local setting (OpenBLAS >= 0.3.27); without a bundled
    OpenBLAS this does nothing and only speed differs.
    """
    previous = [(fn, fn(1)) for fn in _openblas_thread_setters()]
    try:
        yield
    finally:
        for fn, old in previous:
            fn(old)


def huber(residual, delta: float):
    """Huber loss of each residual: r^2/2 inside [-delta, delta], delta (|r| - delta/2) outside.

    Huber 1964, "Robust estimation of a location parameter"; Hoffmann et al. 2022 use it on
    log-loss residuals with delta = 1e-3 (section 3.3).
    """
    r = np.asarray(residual, dtype=np.float64)
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def huber_grad(residual, delta: float):
    """d huber / d residual: r inside [-delta, delta], delta * sign(r) outside."""
    r = np.asarray(residual, dtype=np.float64)
    return np.clip(r, -delta, delta)


def lse_log_loss(theta, log_n, log_d):
    """log L(N, D) for L = exp(e) + exp(a)/N^alpha + exp(b)/D^beta, as a log-sum-exp.

    The parametrization of Hoffmann et al. 2022 (Eq. 10 and appendix D.2): log L =
    LSE(a - alpha log N, b - beta log D, e), which keeps A, B, E positive and the fit well scaled.
    """
    from scipy.special import logsumexp

    a, b, e, alpha, beta = theta
    terms = np.stack(
        [a - alpha * np.asarray(log_n), b - beta * np.asarray(log_d), np.full_like(log_n, e, dtype=float)]
    )
    return logsumexp(terms, axis=0)


def lse_huber_objective(theta, log_n, log_d, log_loss, delta: float):
    """Sum of Huber(log L_pred - log L_obs) and its gradient in (a, b, e, alpha, beta).

    Written out by hand (max-shifted log-sum-exp and its softmax weights): the optimizer calls it
    some 10^5 times in a grid fit, and scipy.special.logsumexp costs ten times more per call.
    """
    a, b, e, alpha, beta = theta
    t0 = a - alpha * log_n
    t1 = b - beta * log_d
    m = np.maximum(np.maximum(t0, t1), e)
    x0, x1, x2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = x0 + x1 + x2
    r = m + np.log(s) - log_loss
    absr = np.abs(r)
    inside = absr <= delta
    value = float(np.sum(np.where(inside, 0.5 * r * r, delta * (absr - 0.5 * delta))))
    g_r = np.clip(r, -delta, delta) / s
    g0, g1 = g_r * x0, g_r * x1
    grad = np.array([g0.sum(), g1.sum(), float(np.dot(g_r, x2)), -float(np.dot(g0, log_n)), -float(np.dot(g1, log_d))])
    return value, grad


def grid_starts(grid: dict[str, np.ndarray]) -> np.ndarray:
    """All combinations of the grid, as rows (a, b, e, alpha, beta), in Hoffmann's loop order."""
    rows = [
        (a, b, e, alpha, beta)
        for alpha, beta, e, a, b in itertools.product(
            grid["alpha"], grid["beta"], grid["e"], grid["a"], grid["b"]
        )
    ]
    return np.asarray(rows, dtype=np.float64)


def lbfgs(fun_and_grad: Callable, x0, bounds=None) -> tuple[np.ndarray, float, bool]:
    """One L-BFGS-B run to tight tolerances (the default ftol stops Huber objectives of ~1e-3 early)."""
    from scipy.optimize import minimize

    res = minimize(
        fun_and_grad,
        np.asarray(x0, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20},
    )
    return np.asarray(res.x), float(res.fun), bool(res.success) or res.status == 2


def multistart_lse_fit(log_n, log_d, log_loss, delta: float, starts: np.ndarray) -> tuple[np.ndarray, float]:
    """Best L-BFGS optimum of the LSE/Huber objective over the given starts.

    As Besiroglu et al. (notebook cell "Replicate exactly"), keep the lowest objective among the
    converged runs; a run that returns NaN or overflows is skipped.
    """
    best_x, best_f = None, math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        for x0 in starts:
            x, f, ok = lbfgs(lambda t: lse_huber_objective(t, log_n, log_d, log_loss, delta), x0)
            if ok and np.isfinite(f) and np.all(np.isfinite(x)) and f < best_f:
                best_x, best_f = x, f
    if best_x is None:
        raise PlannerError("the scaling-law fit did not converge from any starting point")
    return best_x, best_f


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed percentile interval of bootstrap samples along axis 0 (Efron & Tibshirani 1993)."""
    lo = (1.0 - confidence) / 2.0 * 100.0
    return np.nanpercentile(samples, lo, axis=0), np.nanpercentile(samples, 100.0 - lo, axis=0)


def gaussian_aicc(rss: float, n: int, k: int) -> float:
    """Corrected Akaike criterion of a least-squares fit with Gaussian errors.

    AIC = n log(RSS/n) + 2k (Akaike 1974), AICc adds 2k(k+1)/(n-k-1) (Hurvich & Tsai 1989).
    """
    rss = max(rss, 1e-300)
    aic = n * math.log(rss / n) + 2 * k
    return aic + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else math.inf)


def gaussian_bic(rss: float, n: int, k: int) -> float:
    """Bayesian information criterion n log(RSS/n) + k log n (Schwarz 1978)."""
    return n * math.log(max(rss, 1e-300) / n) + k * math.log(n)


def block_indices(n: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """Moving-block bootstrap indices (Kunsch 1989): n indices made of random blocks of length `block`."""
    block = max(1, min(block, n))
    num_blocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=num_blocks)
    idx = (starts[:, None] + np.arange(block)[None, :]).ravel()
    return idx[:n]


def r_squared(observed, predicted) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot."""
    y = np.asarray(observed, dtype=np.float64)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - np.asarray(predicted)) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def require_finite_positive(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Float array, all finite and > 0, or a PlannerError naming the column and the first bad row."""
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise PlannerError(f"{name} has a missing or non-numeric value at row {int(np.argmax(bad)) + 1}")
    bad = arr <= 0
    if bad.any():
        raise PlannerError(f"{name} must be positive; row {int(np.argmax(bad)) + 1} is {arr[bad][0]:g}")
    return arr
