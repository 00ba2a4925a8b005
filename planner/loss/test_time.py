"""Test-time compute: coverage against the number of samples, and the choice between a bigger
model and more samples under a per-query budget.

Brown et al. 2024 ("Large Language Monkeys: Scaling Inference Compute with Repeated Sampling",
arXiv:2407.21787, sec. 4) model coverage (pass@k: the share of problems that any of k samples
solves) as an exponentiated power law, log c(k) = a k^b (a < 0, b < 0 for coverage rising to 1).
Coverage is what a perfect verifier (unit tests, a proof checker) turns into accuracy; without
one, majority voting and reward models plateau after a few hundred samples (Brown et al. sec. 5),
so coverage is then an upper bound.

Constants are data: ``models_catalog/test_time/brown2024.json`` (with the published curves it
was fitted to, ``brown2024_coverage.csv``: Brown et al.'s monkey_business samples). Per-size
coverage for the model choice comes from those curves (Pythia 70M-12B on MATH, Gemma and
Llama-3 on CodeContests) or from the user's own pass@k measurements (:func:`fit_coverage`).
Sampling k times costs k x 2 N x tokens per sample (one forward per generated or read token,
Kaplan et al. 2020; attention FLOPs left out) or k x the $ price of a sample.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from planner.errors import PlannerError
from planner.loss.fitting import require_finite_positive

FLOPS_PER_PARAM_TOKEN_INFERENCE = 2.0


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def coverage(k, a, b):
    """c(k) = exp(a k^b) (Brown et al. 2024, sec. 4.1)."""
    return np.exp(_arr(a) * _arr(k) ** _arr(b))


def samples_for_coverage(target, a, b):
    """k with c(k) = target: (log target / a)^(1/b)."""
    t = _arr(target)
    if np.any((t <= 0) | (t >= 1)):
        raise PlannerError("target coverage must be strictly between 0 and 1")
    return (np.log(t) / _arr(a)) ** (1.0 / _arr(b))


def pass_at_k(num_samples, num_correct, k):
    """Unbiased pass@k of one problem from n samples with c correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1)."""
    from scipy.special import gammaln

    n, c, k = _arr(num_samples), _arr(num_correct), _arr(k)
    if np.any(k > n):
        raise PlannerError("pass@k needs at least k samples per problem")
    with np.errstate(invalid="ignore"):
        log_ratio = gammaln(n - c + 1) - gammaln(n - c - k + 1) - gammaln(n + 1) + gammaln(n - k + 1)
    return np.where(n - c < k, 1.0, 1.0 - np.exp(log_ratio))


@dataclass(frozen=True)
class CoverageLaw:
    """One coverage curve: c(k) = exp(a k^b), the k it was fitted on, the model's size."""

    name: str
    a: float
    b: float
    params_n: float | None = None
    k_min: float = 1.0
    k_max: float = math.inf
    source: str = ""
    rmse_log: float = math.nan  # in-sample RMSE of log coverage
    heldout_rmse_log: float = math.nan  # leave-one-k-out, when fitted here

    def coverage(self, k):
        return coverage(k, self.a, self.b)

    def extrapolated(self, k):
        """True where k lies outside the fitted samples (a power law's tail is the weak part)."""
        kk = _arr(k)
        return (kk < self.k_min) | (kk > self.k_max)


def _fit_ab(k: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    """Least squares on log c (relative error of coverage), started from the line through
    log(-log c) against log k. Returns a, b, RMSE of log c."""
    from scipy.optimize import least_squares

    y = np.log(c)
    slope, intercept = np.polyfit(np.log(k), np.log(-y), 1)
    x0 = [intercept, slope]  # log(-a), b

    def residual(theta):
        return -np.exp(theta[0]) * k ** theta[1] - y

    res = least_squares(residual, x0)
    a, b = -math.exp(res.x[0]), float(res.x[1])
    return a, b, float(np.sqrt(np.mean(res.fun ** 2)))


def fit_coverage(k, coverage_values, name: str = "fitted", params_n: float | None = None) -> CoverageLaw:
    """Fit c(k) = exp(a k^b) to measured (k, coverage) pairs; coverage strictly in (0, 1).
    The held-out error is leave-one-k-out (each point predicted by a fit without it)."""
    kk = require_finite_positive("k", k)
    cc = require_finite_positive("coverage", coverage_values)
    if len(kk) != len(cc):
        raise PlannerError("k and coverage need the same number of values")
    if np.any(cc >= 1.0):
        raise PlannerError("coverage must be below 1 (a point at 1 carries no information about the law)")
    if len(np.unique(kk)) < 3:
        raise PlannerError(f"fitting a and b needs coverage at 3 or more distinct k; got {len(np.unique(kk))}")
    a, b, rmse = _fit_ab(kk, cc)
    heldout = []
    if len(kk) >= 4:
        for i in range(len(kk)):
            keep = np.arange(len(kk)) != i
            ai, bi, _ = _fit_ab(kk[keep], cc[keep])
            heldout.append(ai * kk[i] ** bi - math.log(cc[i]))
    hrmse = float(np.sqrt(np.mean(np.square(heldout)))) if heldout else math.nan
    return CoverageLaw(name, a, b, params_n, float(kk.min()), float(kk.max()), "fitted to the user's measurements", rmse, hrmse)


def read_pass_at_k_csv(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, float | None]]:
    """CSV with columns k and coverage (or pass_at_k), optionally model and params (one curve
    per model): {model: (k, coverage, params)}. Per-problem counts (problem, num_samples,
    num_correct) are turned into coverage at k = 1, 2, 4, ... with :func:`pass_at_k`."""
    path = Path(path)
    if not path.is_file():
        raise PlannerError(f"pass@k file {path} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PlannerError(f"{path} has no rows")
    cols = set(rows[0])
    curves: dict[str, tuple[list, list, float | None]] = {}
    if {"num_samples", "num_correct"} <= cols:
        by_model: dict[str, list] = {}
        for r in rows:
            by_model.setdefault(r.get("model") or "model", []).append(r)
        for model, rs in by_model.items():
            n = _arr([float(r["num_samples"]) for r in rs])
            c = _arr([float(r["num_correct"]) for r in rs])
            ks = 2.0 ** np.arange(0, int(math.log2(n.min())) + 1)
            cov = [float(np.mean(pass_at_k(n, c, k))) for k in ks]
            params = float(rs[0]["params"]) if rs[0].get("params") else None
            curves[model] = (list(ks), cov, params)
    else:
        value = "coverage" if "coverage" in cols else "pass_at_k" if "pass_at_k" in cols else None
        if "k" not in cols or value is None:
            raise PlannerError(f"{path}: need columns k and coverage (or pass_at_k), or problem, num_samples, num_correct; found {', '.join(sorted(cols))}")
        for i, r in enumerate(rows, start=2):
            try:
                k, v = float(r["k"]), float(r[value])
            except ValueError as exc:
                raise PlannerError(f"{path}: line {i}: k and {value} must be numbers") from exc
            entry = curves.setdefault(r.get("model") or "model", ([], [], float(r["params"]) if r.get("params") else None))
            entry[0].append(k)
            entry[1].append(v)
    return {m: (_arr(k), _arr(c), p) for m, (k, c, p) in curves.items()}


def _catalog_file(name: str):
    return files("models_catalog").joinpath("test_time", name)


def load_coverage_laws(name: str = "brown2024") -> dict[str, CoverageLaw]:
    """The curves of a catalog file (``models_catalog/test_time/<name>.json``), by curve name."""
    entry = _catalog_file(f"{name}.json")
    if not entry.is_file():
        raise PlannerError(f"unknown test-time law file {name!r}; known: brown2024")
    raw = json.loads(entry.read_text())
    return {c["name"]: CoverageLaw(c["name"], c["a"], c["b"], c.get("params"), c["k_min"], c["k_max"],
                                   f"{raw['citation']}; {c['fitted_by']}", c.get("rmse_log", math.nan),
                                   c.get("heldout_rmse_log", math.nan))
            for c in raw["curves"]}


def flops_per_sample(params_n, tokens_per_sample):
    """2 N FLOPs per token read or generated (the prompt counted once per sample)."""
    return FLOPS_PER_PARAM_TOKEN_INFERENCE * _arr(params_n) * _arr(tokens_per_sample)


@dataclass(frozen=True)
class SamplingChoice:
    """Per model (rows) and budget (columns): samples affordable, coverage, and the best model."""

    models: tuple[str, ...]
    budget: np.ndarray
    samples: np.ndarray  # floor(budget / cost per sample); 0 where one sample is unaffordable
    coverage: np.ndarray  # nan where no sample is affordable
    extrapolated: np.ndarray  # k outside the range the model's curve was fitted on
    best: np.ndarray  # index into models, -1 where no model is affordable

    def best_model(self) -> list[str | None]:
        return [self.models[i] if i >= 0 else None for i in self.best]


def choose_model_and_samples(laws: list[CoverageLaw], cost_per_sample, budget) -> SamplingChoice:
    """For each budget per query (FLOPs or $, the same unit as ``cost_per_sample``, one cost
    per law), the model whose affordable number of samples gives the highest coverage."""
    if not laws:
        raise PlannerError("give at least one model's coverage law")
    cost = require_finite_positive("cost per sample", np.atleast_1d(cost_per_sample))
    if len(cost) != len(laws):
        raise PlannerError(f"one cost per sample per model: {len(laws)} models, {len(cost)} costs")
    budget = require_finite_positive("budget", np.atleast_1d(budget))
    k = np.floor(budget[None, :] / cost[:, None])
    cov = np.full(k.shape, np.nan)
    ext = np.zeros(k.shape, dtype=bool)
    for i, law in enumerate(laws):
        ok = k[i] >= 1
        cov[i, ok] = law.coverage(k[i, ok])
        ext[i] = ok & law.extrapolated(k[i])
    filled = np.where(np.isnan(cov), -np.inf, cov)
    best = np.where(np.all(np.isnan(cov), axis=0), -1, np.argmax(filled, axis=0))
    return SamplingChoice(tuple(law.name for law in laws), budget, k, cov, ext, best)
