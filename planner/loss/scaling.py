"""Loss as a function of model size and data: L(N, D), repeated data, compute-optimal allocation, fits.

Conventions: N (``params_n``) in parameters, D (``tokens_d``) in training tokens (repeats
counted), U (``unique_tokens``) in distinct tokens, C (``compute_flops``) in FLOPs with C = 6 N D
(Kaplan et al. 2020, section 2.1: 2 N FLOPs per token forward, 4 N backward). Every formula
takes scalars or numpy arrays and broadcasts. Laws are data: ``models_catalog/scaling_laws/*.json``
(constants, the parameter-count convention, the citation and where in the paper), loaded
into a frozen :class:`ScalingLaw`.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import PlannerError
from planner.loss import fitting

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D (Kaplan et al. 2020, section 2.1; Hoffmann et al. 2022, section 3)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Repetition(_Frozen):
    """Decay constants of repeated tokens (R_D*) and excess parameters (R_N*), Muennighoff et al. 2023."""

    r_d_star: float = Field(gt=0)
    r_n_star: float = Field(gt=0)
    source: str


class ScalingLaw(_Frozen):
    """One parametric loss law with its provenance.

    ``form="chinchilla"``: L = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Eq. 2).
    ``form="kaplan"``: L = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020, Eq. 1.5).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    form: Literal["chinchilla", "kaplan"]
    E: float | None = None
    A: float | None = None
    B: float | None = None
    alpha: float | None = None
    beta: float | None = None
    N_c: float | None = None
    D_c: float | None = None
    alpha_N: float | None = None
    alpha_D: float | None = None
    param_count: Literal["total", "non_embedding"]
    repetition: Repetition | None = None
    citation: str = ""
    where: str = ""
    notes: str = ""

    @model_validator(mode="after")
    def _check_form(self):
        needed = ("E", "A", "B", "alpha", "beta") if self.form == "chinchilla" else ("N_c", "D_c", "alpha_N", "alpha_D")
        missing = [k for k in needed if getattr(self, k) is None]
        if missing:
            raise ValueError(f"law {self.name!r} of form {self.form} lacks {', '.join(missing)}")
        bad = [k for k in needed if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0)]
        if bad:
            raise ValueError(f"law {self.name!r}: {', '.join(bad)} must be positive and finite")
        return self

    def loss(self, params_n, tokens_d, unique_tokens=None):
        """Predicted loss; with ``unique_tokens`` the data-constrained law of Muennighoff et al."""
        return predict_loss(self, params_n, tokens_d, unique_tokens)


# --------------------------------------------------------------------------------------------
# Catalog


def _laws_dir():
    return files("models_catalog").joinpath("scaling_laws")


def list_laws() -> list[str]:
    """Names of the laws shipped in ``models_catalog/scaling_laws``."""
    return sorted(p.name[:-5] for p in _laws_dir().iterdir() if p.name.endswith(".json"))


def load_law(name_or_path: str) -> ScalingLaw:
    """A catalog law by name, or a JSON file of the same shape given by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") and path.exists():
        text = path.read_text()
    else:
        entry = _laws_dir().joinpath(f"{name_or_path}.json")
        if not entry.is_file():
            raise PlannerError(f"unknown scaling law {name_or_path!r}; known: {', '.join(list_laws())} (or a path to a .json)")
        text = entry.read_text()
    try:
        return ScalingLaw.model_validate(json.loads(text))
    except ValueError as exc:  # pydantic ValidationError and json errors
        raise PlannerError(f"scaling law {name_or_path!r} is not valid: {str(exc).splitlines()[0]}") from exc


DEFAULT_LAW = "besiroglu2024"

# --------------------------------------------------------------------------------------------
# Loss formulas


def chinchilla_loss(params_n, tokens_d, E, A, B, alpha, beta):
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Eq. 2 and Eq. 10)."""
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    return E + A * n ** (-alpha) + B * d ** (-beta)


def kaplan_loss(params_n, tokens_d, N_c, D_c, alpha_N, alpha_D):
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020, Eq. 1.5).

    N counts non-embedding parameters only (Kaplan et al. 2020, section 1.2).
    """
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    return ((N_c / n) ** (alpha_N / alpha_D) + D_c / d) ** alpha_D


def effective_tokens(unique_tokens, tokens_d, r_d_star):
    """Effective data D' = U + U R_D* (1 - exp(-R_D / R_D*)), R_D = D / U - 1 repetitions.

    Muennighoff et al. 2023, Eq. (5): the k-th repetition of a token is worth less than a fresh
    one; as R_D grows D' saturates at U (1 + R_D*). With D <= U (no repetition) D' = D.
    """
    u = np.asarray(unique_tokens, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    u_used = np.minimum(u, d)
    r = np.maximum(d / u_used - 1.0, 0.0)
    return u_used + u_used * r_d_star * (1.0 - np.exp(-r / r_d_star))


def effective_params(params_n, unique_params_n, r_n_star):
    """Effective parameters N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)), R_N = N / U_N - 1.

    Muennighoff et al. 2023, Eq. (6): parameters beyond U_N, the compute-optimal size for the
    unique data, decay in value like repeated tokens.
    """
    n = np.asarray(params_n, dtype=np.float64)
    u_n = np.minimum(n, np.asarray(unique_params_n, dtype=np.float64))
    r = np.maximum(n / u_n - 1.0, 0.0)
    return u_n + u_n * r_n_star * (1.0 - np.exp(-r / r_n_star))


def allocation_constant(law: ScalingLaw) -> float:
    """G = (alpha A / (beta B))^(1 / (alpha + beta)) (Hoffmann et al. 2022, Eq. 4)."""
    _require_chinchilla(law, "the closed-form allocation")
    return (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))


def optimal_params_for_tokens(law: ScalingLaw, tokens_d):
    """N for which D tokens are compute-optimal: N = G (D G)^(beta / alpha).

    Inverts D* = G^-1 (C/6)^(alpha/(alpha+beta)); the `D_to_N` of huggingface/datablations
    (README, 'Parametric Fit'), used there for U_N.
    """
    g = allocation_constant(law)
    return g * (np.asarray(tokens_d, dtype=np.float64) * g) ** (law.beta / law.alpha)


def optimal_tokens_for_params(law: ScalingLaw, params_n):
    """D for which N parameters are compute-optimal: the inverse of :func:`optimal_params_for_tokens`."""
    g = allocation_constant(law)
    return (np.asarray(params_n, dtype=np.float64) / g) ** (law.alpha / law.beta) / g


def data_constrained_loss(law: ScalingLaw, params_n, tokens_d, unique_tokens):
    """L = E + A / N'^alpha + B / D'^beta with U_D = min(U, D), U_N = min(N, N*(U_D)).

    Muennighoff et al. 2023, Eq. (7), exactly as the `scaling_law(N, D, U)` of the
    huggingface/datablations README: D' from :func:`effective_tokens`, N' from
    :func:`effective_params` with U_N the compute-optimal size for the unique tokens.
    """
    _require_chinchilla(law, "the data-constrained law")
    if law.repetition is None:
        raise PlannerError(f"law {law.name!r} has no repetition constants (R_D*, R_N*); use one that has, e.g. muennighoff2023")
    rep = law.repetition
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    u = np.minimum(np.asarray(unique_tokens, dtype=np.float64), d)
    d_eff = effective_tokens(u, d, rep.r_d_star)
    n_eff = effective_params(n, optimal_params_for_tokens(law, u), rep.r_n_star)
    return law.E + law.A * n_eff ** (-law.alpha) + law.B * d_eff ** (-law.beta)


def predict_loss(law: ScalingLaw, params_n, tokens_d, unique_tokens=None):
    """The law's loss at (N, D); with ``unique_tokens`` (U) the data-constrained form."""
    if unique_tokens is not None:
        return data_constrained_loss(law, params_n, tokens_d, unique_tokens)
    if law.form == "chinchilla":
        return chinchilla_loss(params_n, tokens_d, law.E, law.A, law.B, law.alpha, law.beta)
    return kaplan_loss(params_n, tokens_d, law.N_c, law.D_c, law.alpha_N, law.alpha_D)


def _require_chinchilla(law: ScalingLaw, what: str) -> None:
    if law.form != "chinchilla":
        raise PlannerError(f"{what} needs a law of the form E + A/N^alpha + B/D^beta; {law.name!r} is {law.form}")


# --------------------------------------------------------------------------------------------
# Compute-optimal allocation


class Allocation(_Frozen):
    """One compute-optimal (N, D) and what it buys."""

    law: str
    param_count: str
    compute_flops: float
    params_n: float
    tokens_d: float
    unique_tokens: float | None = Field(None, description="distinct tokens used (min(D, pool)); None without a pool")
    epochs: float | None = Field(None, description="D / unique tokens; None without a pool")
    tokens_per_param: float
    loss: float
    method: str
    constraint: Literal["none", "data_pool_no_repeat", "data_pool_repeat"]
    data_pool_tokens: float | None = None


def _check_compute(compute_flops) -> np.ndarray:
    c = np.asarray(compute_flops, dtype=np.float64)
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise PlannerError(f"compute must be a positive number of FLOPs, got {compute_flops}")
    return c


def optimal_closed_form(law: ScalingLaw, compute_flops):
    """N*(C) = G (C/6)^(beta/(alpha+beta)), D*(C) = G^-1 (C/6)^(alpha/(alpha+beta)).

    Hoffmann et al. 2022, Eq. (4) with G = (alpha A / (beta B))^(1/(alpha+beta)): the minimum of
    E + A/N^alpha + B/D^beta on the line 6 N D = C. Returns (N, D), arrays if C is one.
    """
    g = allocation_constant(law)
    x = _check_compute(compute_flops) / FLOPS_PER_PARAM_TOKEN
    s = law.alpha + law.beta
    return g * x ** (law.beta / s), x ** (law.alpha / s) / g


def optimal_loss(law: ScalingLaw, compute_flops):
    """L*(C) = E + K (C/6)^(-alpha beta/(alpha+beta)), K = A G^-alpha + B G^beta (from Eq. 4 substituted in Eq. 2)."""
    g = allocation_constant(law)
    gamma = law.alpha * law.beta / (law.alpha + law.beta)
    k = law.A * g ** (-law.alpha) + law.B * g**law.beta
    return law.E + k * (_check_compute(compute_flops) / FLOPS_PER_PARAM_TOKEN) ** (-gamma)


def compute_shadow_price(law: ScalingLaw, compute_flops):
    """-dL*/dC in loss per FLOP at the compute-optimal frontier.

    The Lagrange multiplier of the budget 6 N D <= C at the optimum: what one more FLOP, spent
    optimally, buys. With L* from :func:`optimal_loss`: -dL*/dC = gamma (L* - E) / C,
    gamma = alpha beta / (alpha + beta). The threshold of ``planner.loss.stopping`` can be set to it.
    """
    c = _check_compute(compute_flops)
    gamma = law.alpha * law.beta / (law.alpha + law.beta)
    return gamma * (optimal_loss(law, c) - law.E) / c


def optimal_gp(law: ScalingLaw, compute_flops: float, data_pool_tokens: float | None = None) -> dict:
    """The allocation as a geometric program solved by cvxpy (``gp=True``).

    minimize A N^-alpha + B D^-beta  s.t.  6 N D <= C  [and D <= U without repetition].
    The objective is a posynomial and the constraints monomial, so the log-log transform is
    convex (Boyd et al. 2007, "A tutorial on geometric programming"). Variables are scaled by
    s = sqrt(C/6) for conditioning. Returns N, D, loss and the dual value of the compute
    constraint (d log(L - E) / d log C at the optimum, up to sign).
    """
    import cvxpy as cp

    _require_chinchilla(law, "the geometric program")
    c = float(_check_compute(compute_flops))
    s = math.sqrt(c / FLOPS_PER_PARAM_TOKEN)
    n = cp.Variable(pos=True)
    d = cp.Variable(pos=True)
    objective = law.A * s ** (-law.alpha) * n ** (-law.alpha) + law.B * s ** (-law.beta) * d ** (-law.beta)
    budget = n * d <= 1.0
    constraints = [budget]
    if data_pool_tokens is not None:
        constraints.append(d <= float(data_pool_tokens) / s)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(gp=True, solver=cp.CLARABEL)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise PlannerError(f"the geometric program ended {problem.status}")
    return {
        "params_n": float(n.value) * s,
        "tokens_d": float(d.value) * s,
        "loss": law.E + float(problem.value),
        "compute_dual": float(budget.dual_value),
    }


def _grid_loss(law, params_n, compute_flops, data_pool_tokens, repeat):
    tokens = compute_flops / (FLOPS_PER_PARAM_TOKEN * params_n)
    if data_pool_tokens is None:
        return predict_loss(law, params_n, tokens)
    if repeat:
        return data_constrained_loss(law, params_n, tokens, data_pool_tokens)
    loss = predict_loss(law, params_n, tokens)
    return np.where(tokens <= data_pool_tokens * (1 + 1e-12), loss, np.inf)


def optimal_grid(
    law: ScalingLaw,
    compute_flops: float,
    data_pool_tokens: float | None = None,
    repeat: bool = True,
    num: int = 20001,
    refine: bool = True,
) -> tuple[float, float, float]:
    """Brute force: L on a log-spaced grid of N (D = C / 6N) spanning 12 decades, then a bounded refine.

    The numeric path for laws without a closed form (Kaplan) and for the data-constrained law
    with repetition. Returns (N, D, loss). Grid spacing is 12/(num-1) decades; ``refine`` polishes
    the best cell with Brent's method (scipy ``minimize_scalar``, bounded to the neighbouring cells).
    """
    from scipy.optimize import minimize_scalar

    c = float(_check_compute(compute_flops))
    center = math.log10(math.sqrt(c / FLOPS_PER_PARAM_TOKEN))
    lo_log_n = center - 6.0
    if data_pool_tokens is not None and not repeat:
        # D <= U is N >= C / (6 U): start the grid exactly on that boundary, where the optimum sits
        # whenever the pool binds.
        lo_log_n = max(lo_log_n, math.log10(c / (FLOPS_PER_PARAM_TOKEN * data_pool_tokens)))
    log_n = np.linspace(lo_log_n, center + 6.0, num)
    n = 10.0**log_n
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        losses = _grid_loss(law, n, c, data_pool_tokens, repeat)
    losses = np.where(np.isfinite(losses), losses, np.inf)
    i = int(np.argmin(losses))
    if not np.isfinite(losses[i]):
        raise PlannerError("no allocation satisfies the constraints (is the data pool too small for any model?)")
    best_log_n, best_loss = log_n[i], float(losses[i])
    if refine:
        lo, hi = log_n[max(i - 1, 0)], log_n[min(i + 1, num - 1)]
        res = minimize_scalar(
            lambda x: float(_grid_loss(law, 10.0**x, c, data_pool_tokens, repeat)),
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-10},
        )
        if res.success and np.isfinite(res.fun) and res.fun <= best_loss:
            best_log_n, best_loss = float(res.x), float(res.fun)
    n_best = 10.0**best_log_n
    return n_best, c / (FLOPS_PER_PARAM_TOKEN * n_best), best_loss


def compute_optimal(
    law: ScalingLaw,
    compute_flops: float,
    data_pool_tokens: float | None = None,
    repeat: bool = True,
    method: Literal["auto", "closed_form", "gp", "grid"] = "auto",
) -> Allocation:
    """Compute-optimal N*, D* for C FLOPs, optionally limited to a pool of U unique tokens.

    Without a pool: the closed form (Hoffmann et al. 2022, Eq. 4) for Chinchilla-form laws, the
    grid for Kaplan's. With a pool and ``repeat=False``: D <= U (the geometric program; the
    closed form clipped to D = U, N = C/(6U) when D* > U gives the same point). With a pool and
    ``repeat=True``: the data-constrained law of Muennighoff et al. 2023 by grid search, where
    epochs = D / U can exceed 1 and repeated tokens are worth less.
    """
    c = float(_check_compute(compute_flops))
    if data_pool_tokens is not None and not (math.isfinite(data_pool_tokens) and data_pool_tokens > 0):
        raise PlannerError(f"the data pool must be a positive number of tokens, got {data_pool_tokens}")
    if method == "auto":
        if law.form == "kaplan" or (data_pool_tokens is not None and repeat):
            method = "grid"
        elif data_pool_tokens is None:
            method = "closed_form"
        else:
            method = "gp"
    if law.form == "kaplan" and data_pool_tokens is not None and repeat:
        raise PlannerError("kaplan2020 has no repetition constants; pass --no-repeat or a Chinchilla-form law")
    if method == "closed_form":
        n, d = (float(v) for v in optimal_closed_form(law, c))
        if data_pool_tokens is not None:
            if repeat:
                raise PlannerError("the closed form has no repetition term; use method 'grid'")
            if d > data_pool_tokens:
                d = float(data_pool_tokens)
                n = c / (FLOPS_PER_PARAM_TOKEN * d)
        loss = float(predict_loss(law, n, d))
    elif method == "gp":
        if data_pool_tokens is not None and repeat:
            raise PlannerError("repetition is not a posynomial; the geometric program covers no-repeat pools only")
        sol = optimal_gp(law, c, data_pool_tokens)
        n, d, loss = sol["params_n"], sol["tokens_d"], sol["loss"]
    elif method == "grid":
        n, d, loss = optimal_grid(law, c, data_pool_tokens, repeat)
    else:
        raise PlannerError(f"unknown method {method!r}; use auto, closed_form, gp or grid")
    unique = None if data_pool_tokens is None else min(d, float(data_pool_tokens))
    constraint = "none" if data_pool_tokens is None else ("data_pool_repeat" if repeat else "data_pool_no_repeat")
    return Allocation(
        law=law.name,
        param_count=law.param_count,
        compute_flops=c,
        params_n=n,
        tokens_d=d,
        unique_tokens=unique,
        epochs=None if unique is None else d / unique,
        tokens_per_param=d / n,
        loss=float(loss),
        method=method,
        constraint=constraint,
        data_pool_tokens=data_pool_tokens,
    )


# --------------------------------------------------------------------------------------------
# Fitting a law to the user's runs


class ScalingFitResult(_Frozen):
    """Fitted constants of L = E + A/N^alpha + B/D^beta with intervals and goodness of fit."""

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
        self.delta = delta
        self.grid = grid
        self.num_bootstrap = num_bootstrap
        self.confidence = confidence
        self.exclude_highest_loss = exclude_highest_loss
        self.seed = seed

    def fit(self, params_n, tokens_d, loss) -> ScalingLawFitter:
        with fitting.single_threaded_blas():
            return self._fit(params_n, tokens_d, loss)

    def _fit(self, params_n, tokens_d, loss) -> ScalingLawFitter:
        n = fitting.require_finite_positive("params", params_n)
        d = fitting.require_finite_positive("tokens", tokens_d)
        lo = fitting.require_finite_positive("loss", loss)
        if not (n.shape == d.shape == lo.shape) or n.ndim != 1:
            raise PlannerError("params, tokens and loss must be 1-D columns of the same length")
        keep = np.ones(n.size, dtype=bool)
        if self.exclude_highest_loss:
            # Besiroglu et al. keep losses strictly below the k-th highest (notebook cell "indices").
            threshold = np.sort(lo)[-self.exclude_highest_loss]
            keep = lo < threshold
        n, d, lo = n[keep], d[keep], lo[keep]
        if n.size < self.MIN_POINTS:
            raise PlannerError(f"need at least {self.MIN_POINTS} runs to fit 5 constants, got {n.size}")
        if np.unique(n).size < 2 or np.unique(d).size < 2:
            raise PlannerError("the runs must vary both params and tokens (at least two distinct values of each)")
        log_n, log_d, log_l = np.log(n), np.log(d), np.log(lo)
        grid = fitting.COARSE_GRID if self.grid == "coarse" else fitting.HOFFMANN_GRID
        theta, objective = _screened_multistart(log_n, log_d, log_l, self.delta, fitting.grid_starts(grid))
        self.theta_ = theta
        self.objective_ = objective
        self.num_excluded_ = int((~keep).sum())
        self.params_n_, self.tokens_d_, self.loss_ = n, d, lo
        self.bootstrap_ = self._bootstrap(log_n, log_d, log_l, theta)
        return self

    def _bootstrap(self, log_n, log_d, log_l, theta) -> np.ndarray:
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
        p = self.params_
        boot = self.bootstrap_
        intervals: dict[str, tuple[float, float]] = {}
        if boot.shape[0] and np.isfinite(boot).all(axis=1).sum() >= 2:
            natural = np.column_stack([np.exp(boot[:, 2]), np.exp(boot[:, 0]), np.exp(boot[:, 1]), boot[:, 3], boot[:, 4]])
            lo, hi = fitting.percentile_interval(natural, self.confidence)
            intervals = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(("E", "A", "B", "alpha", "beta"))}
        pred = self.predict(self.params_n_, self.tokens_d_)
        law = self.to_law()
        n_opt, d_opt = optimal_closed_form(law, 1e21)
        return ScalingFitResult(
            **p,
            intervals=intervals,
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


def _screened_multistart(log_n, log_d, log_l, delta, starts, screen_iters: int = 20, polish: int = 10):
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


def fit_scaling_law(params_n, tokens_d, loss, **kwargs) -> ScalingFitResult:
    """Fit L = E + A/N^alpha + B/D^beta to runs; keyword arguments go to :class:`ScalingLawFitter`."""
    return ScalingLawFitter(**kwargs).fit(params_n, tokens_d, loss).result()


def read_runs_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns ``params``, ``tokens`` (or ``flops``, then tokens = flops / 6 params) and ``loss``."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise PlannerError(f"no such file: {path}")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise PlannerError(f"{path} is empty; expected columns params, tokens, loss") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PlannerError(f"{path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if "tokens" not in frame.columns and "flops" in frame.columns and "params" in frame.columns:
        flops = fitting.require_finite_positive("flops", pd.to_numeric(frame["flops"], errors="coerce"))
        frame["tokens"] = flops / (FLOPS_PER_PARAM_TOKEN * pd.to_numeric(frame["params"], errors="coerce"))
    missing = [c for c in ("params", "tokens", "loss") if c not in frame.columns]
    if missing:
        raise PlannerError(f"{path} lacks column(s) {', '.join(missing)}; expected params, tokens, loss (found {', '.join(frame.columns) or 'none'})")
    if frame.empty:
        raise PlannerError(f"{path} has a header but no rows")
    cols = [pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64) for c in ("params", "tokens", "loss")]
    return (
        fitting.require_finite_positive("params", cols[0]),
        fitting.require_finite_positive("tokens", cols[1]),
        fitting.require_finite_positive("loss", cols[2]),
    )
