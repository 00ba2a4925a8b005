"""Training plus lifetime inference: the run that reaches the same loss at the least total cost
(Sardana, Portes, Doubov, Frankle 2024, "Beyond Chinchilla-Optimal", arXiv:2401.00448).

A model that will serve T tokens costs 2 N T FLOPs more over its life (one forward pass per
token, their Eq. 2). The plan fixes the quality first: the request's --target-loss, or the best
loss its budgets buy when training is all that counts; then among the candidates reaching that
loss it chooses the least training + inference total, in FLOPs when compute is the only budget
(Sardana et al.'s sec. 2) and in dollars otherwise (sec. 3: an inference FLOP priced as the run's
training FLOP times ``inference_cost_ratio``, since serving runs at its own utilization). The
budgets then bound the quality, not the training: reaching the same loss with a smaller model
takes more training, which the serving pays back (the plan reports both totals). The continuous
optimum of ``planner.loss.inference_aware`` is reported beside the grid's choice.
"""

from __future__ import annotations

import math

import numpy as np

from planner.loss.inference_aware import INFERENCE_FLOPS_PER_PARAM_TOKEN
from planner.search.plan import Candidate, InferenceAware

TRAINING_SLACK = 16.0
"""Budgets scaled by this for the lifetime search: a smaller model trained longer for the same
loss may spend more than the training-only optimum (Sardana et al. Fig. 1: 7B trained on more
data instead of a 13B)."""


def inference_flops(params_n, inference_tokens: float, ratio: float = 1.0):
    """2 N T x the cost ratio of an inference FLOP (Sardana et al. 2024, Eq. 2)."""
    return INFERENCE_FLOPS_PER_PARAM_TOKEN * np.asarray(params_n, dtype=np.float64) * inference_tokens * ratio


def _unit(req) -> str:
    others = (req.budget_usd, req.gpu_hours, req.deadline_s)
    return "FLOP" if req.compute_flops is not None and all(v is None for v in others) else "USD"


def totals(req, params_n, compute_flops, cost_usd):
    """Training + inference per candidate in the unit of the request (``_unit``)."""
    inf = inference_flops(params_n, req.inference_tokens, req.inference_cost_ratio)
    if _unit(req) == "FLOP":
        return np.asarray(compute_flops) + inf
    return np.asarray(cost_usd) * (1.0 + inf / np.asarray(compute_flops))


def lifetime_choice(ctx, state, rows, data, limits, scored, best: int):
    """(scored, index) of the least lifetime cost reaching the target loss, on the request's
    set-ups with the budgets loosened by ``TRAINING_SLACK``, and the target."""
    from planner.search.scoring import score_candidates

    req = ctx.request
    target = req.target_loss if req.target_loss is not None else float(scored["loss"][best])
    wide = limits
    for name in ("compute_flops", "budget_usd", "gpu_hours", "deadline_s"):
        if getattr(limits, name) is not None:
            wide = wide.scaled(name, TRAINING_SLACK)
    more = score_candidates(ctx, state.models, rows, data, wide)
    params = np.array([m.params_n for m in state.models])[rows["model"][more["row"]]]
    total = totals(req, params, more["compute_flops"], more["cost_usd"])
    ok = more["feasible"] & (more["loss"] <= target * (1 + 1e-9))
    if not ok.any():
        return scored, best, target
    return more, int(np.flatnonzero(ok)[np.argmin(total[ok])]), target


def report(ctx, rec: Candidate, training_only: Candidate, target: float) -> InferenceAware:
    """The split of the recommended and the training-only plans, and Sardana et al.'s optimum."""
    req = ctx.request
    unit = _unit(req)
    rec_total = float(totals(req, rec.params, rec.compute_flops, rec.cost_usd))
    base_total = float(totals(req, training_only.params, training_only.compute_flops, training_only.cost_usd))
    n_star = d_star = None
    if req.pretrain and ctx.law.form == "chinchilla" and target > ctx.law.E:
        from planner.loss.inference_aware import inference_optimal

        opt = inference_optimal(ctx.law, target, req.inference_tokens, inference_cost_per_flop=req.inference_cost_ratio)
        n_star, d_star = float(opt.params_n), float(opt.tokens_d)
    saving = 1.0 - rec_total / base_total if base_total > 0 else 0.0
    note = (f"same loss {target:.4f}: {rec.model} trained on {rec.tokens:.3g} tokens instead of {training_only.model} on "
            f"{training_only.tokens:.3g}; training + inference {unit} {rec_total:.4g} vs {base_total:.4g} ({saving:+.1%} saved)")
    if not math.isfinite(saving):
        saving = 0.0
    return InferenceAware(inference_tokens=req.inference_tokens, target_loss=target, unit=unit, training_only=training_only,
                          training_only_total=base_total, recommended_total=rec_total, savings_fraction=saving,
                          analytic_params=n_star, analytic_tokens=d_star, note=note)
