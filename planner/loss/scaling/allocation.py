"""Compute-optimal allocation: the model size N* and tokens D* that minimize loss for C FLOPs.

Three solvers, which agree where they overlap: the closed form of Hoffmann et al. 2022 (Eq. 4)
for Chinchilla-form laws, with the optimal loss and the shadow price of compute that follow from
it; a geometric program in cvxpy for a pool of unique tokens that may not repeat; and a log grid
of N with a bounded scipy refine for Kaplan's law and for the data-constrained law with
repetition. :func:`compute_optimal` picks the solver, runs it and returns an :class:`Allocation`.
cvxpy and scipy.optimize are imported inside the solver that uses them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlannerError
from planner.loss.scaling.laws import (
    FLOPS_PER_PARAM_TOKEN,
    ScalingLaw,
    allocation_constant,
    data_constrained_loss,
    predict_loss,
    require_chinchilla_form,
)

Method = Literal["auto", "closed_form", "gp", "grid"]


class Allocation(BaseModel):
    """One compute-optimal (N, D) and what it buys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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


# --------------------------------------------------------------------------------------------
# The closed form and what follows from it


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


# --------------------------------------------------------------------------------------------
# The geometric program


def optimal_gp(law: ScalingLaw, compute_flops: float, data_pool_tokens: float | None = None) -> dict:
    """The allocation as a geometric program solved by cvxpy (``gp=True``).

    minimize A N^-alpha + B D^-beta  s.t.  6 N D <= C  [and D <= U without repetition].
    The objective is a posynomial and the constraints monomial, so the log-log transform is
    convex (Boyd et al. 2007, "A tutorial on geometric programming"). Variables are scaled by
    s = sqrt(C/6) for conditioning. Returns N, D, loss and the dual value of the compute
    constraint (d log(L - E) / d log C at the optimum, up to sign).
    """
    import cvxpy as cp

    require_chinchilla_form(law, "the geometric program")
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


# --------------------------------------------------------------------------------------------
# The grid


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
    the best cell by zooming: three more grids of 1001 points between the best point's neighbours,
    which brings the spacing to ~1e-12 decades (numpy only: a plan with a data pool imports no
    solver library).
    """
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
    best_log_n, best_loss = float(log_n[i]), float(losses[i])
    if refine:
        best_log_n, best_loss = _zoom(law, c, data_pool_tokens, repeat, log_n, i, best_loss)
    n_best = 10.0**best_log_n
    return n_best, c / (FLOPS_PER_PARAM_TOKEN * n_best), best_loss


def _zoom(law, c: float, data_pool_tokens, repeat: bool, log_n, i: int, best_loss: float, rounds: int = 3):
    """Refine a grid minimum: a 1001-point grid between the best point's neighbours, ``rounds`` times."""
    best_log_n = float(log_n[i])
    for _ in range(rounds):
        lo, hi = log_n[max(i - 1, 0)], log_n[min(i + 1, len(log_n) - 1)]
        log_n = np.linspace(lo, hi, 1001)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            losses = _grid_loss(law, 10.0**log_n, c, data_pool_tokens, repeat)
        losses = np.where(np.isfinite(losses), losses, np.inf)
        i = int(np.argmin(losses))
        if losses[i] <= best_loss:
            best_log_n, best_loss = float(log_n[i]), float(losses[i])
    return best_log_n, best_loss


# --------------------------------------------------------------------------------------------
# Choosing a solver


def compute_optimal(
    law: ScalingLaw,
    compute_flops: float,
    data_pool_tokens: float | None = None,
    repeat: bool = True,
    method: Method = "auto",
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
    method = _choose_method(law, data_pool_tokens, repeat, method)
    n, d, loss = _solve(law, c, data_pool_tokens, repeat, method)
    if n < 1 or d < 1:
        raise PlannerError(f"{c:g} FLOP is too small a budget to train any model: under {law.name} the compute-optimal "
                           f"model would have {n:.3g} parameters and {d:.3g} tokens; give a larger compute budget")
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


def _choose_method(law: ScalingLaw, data_pool_tokens: float | None, repeat: bool, method: str) -> str:
    """The solver for ``method="auto"``: grid for Kaplan or repetition, else closed form or, with a pool, the GP."""
    if method == "auto":
        if law.form == "kaplan" or (data_pool_tokens is not None and repeat):
            method = "grid"
        elif data_pool_tokens is None:
            method = "closed_form"
        else:
            method = "gp"
    if law.form == "kaplan" and data_pool_tokens is not None and repeat:
        raise PlannerError("kaplan2020 has no repetition constants; pass --no-repeat or a Chinchilla-form law")
    return method


def _solve(law: ScalingLaw, c: float, data_pool_tokens: float | None, repeat: bool, method: str) -> tuple[float, float, float]:
    """(N, D, loss) from the named solver."""
    if method == "closed_form":
        return _clipped_closed_form(law, c, data_pool_tokens, repeat)
    if method == "gp":
        if data_pool_tokens is not None and repeat:
            raise PlannerError("repetition is not a posynomial; the geometric program covers no-repeat pools only")
        sol = optimal_gp(law, c, data_pool_tokens)
        return sol["params_n"], sol["tokens_d"], sol["loss"]
    if method == "grid":
        return optimal_grid(law, c, data_pool_tokens, repeat)
    raise PlannerError(f"unknown method {method!r}; use auto, closed_form, gp or grid")


def _clipped_closed_form(law: ScalingLaw, c: float, data_pool_tokens: float | None, repeat: bool) -> tuple[float, float, float]:
    """The closed form; with a pool that D* exceeds, D = U and N = C / (6 U) (the GP's optimum)."""
    n, d = (float(v) for v in optimal_closed_form(law, c))
    if data_pool_tokens is not None:
        if repeat:
            raise PlannerError("the closed form has no repetition term; use method 'grid'")
        if d > data_pool_tokens:
            d = float(data_pool_tokens)
            n = c / (FLOPS_PER_PARAM_TOKEN * d)
    return n, d, float(predict_loss(law, n, d))
