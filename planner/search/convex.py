"""The continuous allocation: model size and tokens as a geometric program (cvxpy), and the check
of the grid's recommendation against it.

The grid searches discrete sizes, layouts and token counts; the program optimizes (N, D) in the
continuum under the same budgets, with the recommended set-up's measured seconds per model FLOP.
Their agreement (``ContinuousCheck``) bounds what the grid's discreteness costs. cvxpy is imported
only when a program is solved.
"""

from __future__ import annotations

import math

from planner.errors import PlannerError
from planner.loss import scaling
from planner.search.plan import Candidate, ContinuousCheck


def allocation_gp(
    law: scaling.ScalingLaw,
    nd_caps: dict[str, float],
    tokens_cap: float | None = None,
    params_cap: float | None = None,
    efficiency: float = 1.0,
    tokens_per_param: tuple[float, float] | None = None,
) -> dict:
    """Model size and tokens as a geometric program (cvxpy, ``gp=True``).

    minimize A N^-alpha + B (eta D)^-beta subject to N D <= cap_i for each budget (FLOPs:
    C / 6; dollars, GPU-hours and the deadline become caps on N D through the cost of one model
    FLOP of the set-up), D <= the pool (no repetition) and N <= the largest model that fits.
    Posynomial objective, monomial constraints: convex after the log transform (Boyd et al.
    2007, "A tutorial on geometric programming"). Variables scaled by sqrt(min cap). Dual values
    are d log(objective) / d log(limit) (zero for a slack constraint).
    """
    import cvxpy as cp

    if law.form != "chinchilla":
        raise PlannerError(f"the geometric program needs a law of the form E + A/N^alpha + B/D^beta; {law.name} is {law.form}")
    if not nd_caps:
        raise PlannerError("the geometric program needs at least one budget on N x D")
    scale = math.sqrt(min(nd_caps.values()))
    n = cp.Variable(pos=True)
    d = cp.Variable(pos=True)
    objective = law.A * scale ** (-law.alpha) * n ** (-law.alpha) + law.B * (efficiency * scale) ** (-law.beta) * d ** (-law.beta)
    constraints = {name: n * d <= cap / scale**2 for name, cap in nd_caps.items()}
    if tokens_cap is not None:
        constraints["data_pool"] = d <= tokens_cap / scale
    if params_cap is not None:
        constraints["memory"] = n <= params_cap / scale
    if tokens_per_param is not None:  # the law's evidence (planner.loss.evidence): lo N <= D <= hi N, monomial
        constraints["tokens_per_param_max"] = d <= tokens_per_param[1] * n
        constraints["tokens_per_param_min"] = tokens_per_param[0] * n <= d
    problem = cp.Problem(cp.Minimize(objective), list(constraints.values()))
    problem.solve(gp=True, solver=cp.CLARABEL)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise PlannerError(f"the geometric program ended {problem.status}")
    duals = {name: float(c.dual_value) for name, c in constraints.items()}
    return {
        "params_n": float(n.value) * scale,
        "tokens_d": float(d.value) * scale,
        "loss": law.E + float(problem.value),
        "duals": duals,
        "binding": [k for k, v in duals.items() if v > 1e-6],
    }


def _nd_caps(ctx, rec: Candidate) -> dict[str, float]:
    """The request's budgets as caps on N x D at the recommended set-up's measured seconds per
    model FLOP (its scoring time taken out; at the request's confidence, as the grid holds them)."""
    req = ctx.request
    model_flops = scaling.FLOPS_PER_PARAM_TOKEN * rec.params * rec.tokens
    train_time = rec.time_s - (rec.scoring_flops / (rec.mfu * ctx.gpu.peak_flops_for(rec.precision) * rec.num_gpus))
    s_per_flop = train_time * rec.held_factor / model_flops  # at --confidence's quantile, as the grid held it
    caps = {}
    if req.compute_flops is not None:
        caps["compute_flops"] = req.compute_flops / scaling.FLOPS_PER_PARAM_TOKEN
    if req.budget_usd is not None:
        caps["budget_usd"] = req.budget_usd / (rec.num_gpus * ctx.price / 3600.0) / s_per_flop / 6.0
    if req.gpu_hours is not None:
        caps["gpu_hours"] = req.gpu_hours * 3600.0 / rec.num_gpus / s_per_flop / 6.0
    if req.deadline_s is not None:
        caps["deadline_s"] = req.deadline_s / s_per_flop / 6.0
    return caps


def check_grid(ctx, models: list, fits, rec: Candidate) -> ContinuousCheck | None:
    """Geometric program over (N, D) with the budgets as caps on N D at the recommended set-up's
    measured cost per model FLOP, the pool (no repetition) and the largest model that fits
    (``fits``: the fitting set-up rows). None for a law the program cannot hold or no budget."""
    law = ctx.law
    req = ctx.request
    if law.form != "chinchilla":
        return None
    caps = _nd_caps(ctx, rec)
    if not caps:
        return None
    notes = ["budgets as caps on N x D at the recommended set-up's measured seconds per model FLOP"]
    tokens_cap = req.data_pool_tokens
    if tokens_cap is not None and req.repeat and law.repetition is not None:
        notes.append("repetition allowed: the program solves the no-repetition case (D <= pool); the grid may repeat")
    fitting = sorted(set(fits["model"].tolist()))
    largest = max(models[int(i)].params_n for i in fitting)
    params_cap = None
    if len(fitting) < len(models) and largest >= rec.params * (1 - 1e-9):
        params_cap = largest
    if rec.selection not in ("all", "random") or rec.keep_fraction < 1:
        notes.append("the grid prunes the data; the program does not model selection")
    plaus = ctx.plausibility
    tpp = None if plaus is None else plaus.tokens_per_param
    sol = allocation_gp(law, caps, tokens_cap, params_cap, tokens_per_param=tpp)
    return ContinuousCheck(
        params=sol["params_n"], tokens=sol["tokens_d"], loss=sol["loss"], duals=sol["duals"], binding=sol["binding"],
        grid_params=rec.params, grid_tokens=rec.tokens, grid_loss=rec.loss,
        params_rel_diff=rec.params / sol["params_n"] - 1, tokens_rel_diff=rec.tokens / sol["tokens_d"] - 1,
        loss_rel_diff=rec.loss / sol["loss"] - 1, note="; ".join(notes),
    )
