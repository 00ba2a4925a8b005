"""What the limits do to a plan: which bind and what relaxing each would buy, where to stop the
run, and, when nothing is feasible, by how much and why.

The sensitivities re-run the scoring (not the set-up side) with one limit loosened by ``RELAX``;
the stopping threshold is the shadow price of the binding budget (a 1% finite difference over the
same search); the shortfalls name the limit at fault and the cheapest fixes.
"""

from __future__ import annotations

import numpy as np

from planner.cost.timing.bounds import quantile_factor
from planner.errors import PlannerError
from planner.search.context import RELAX, Context, Limits
from planner.search.pareto import choose
from planner.search.plan import Candidate, ConstraintReport, Stopping
from planner.search.scoring import budget_flops_per_token, candidate_loss, score_candidates
from planner.search.setups import reduce_setups

UNITS = {"compute_flops": "FLOP", "budget_usd": "USD", "gpu_hours": "GPU-hour", "deadline_s": "s", "usable_bytes": "bytes"}
CONSTRAINT_NAMES = {"compute_flops": "compute", "budget_usd": "dollars", "gpu_hours": "gpu_hours",
                    "deadline_s": "deadline", "usable_bytes": "memory_per_gpu", "data_pool_tokens": "data_pool"}
BUDGETS = ("compute_flops", "budget_usd", "gpu_hours", "deadline_s")


def best_value(ctx: Context, state, data, limits: Limits, objective: str) -> float | None:
    """The objective's value of the best plan under ``limits`` (None: nothing feasible)."""
    rows = reduce_setups(state.table, limits.usable_bytes)
    if rows.empty:
        return None
    scored = score_candidates(ctx, state.models, rows, data, limits)
    i = choose(scored, objective, ctx.request.target_loss, ctx.request.loss_tolerance)
    if i is None:
        return None
    return float(scored[{"loss": "loss", "cost": "cost_usd", "time": "time_s"}[objective]][i])


TIME_BUDGETS = ("budget_usd", "gpu_hours", "deadline_s")
"""The budgets a run uses in proportion to its time: held at the request's confidence (``--confidence``)."""


def _used(rec: Candidate) -> dict[str, float]:
    """What the recommended run uses of each limit; time, dollars and GPU-hours at the request's
    confidence (the search held them there: ``scoring._token_caps``), not at the median."""
    held = rec.held_factor
    return {"compute_flops": rec.compute_flops, "budget_usd": rec.cost_usd * held, "gpu_hours": rec.gpu_hours * held,
            "deadline_s": rec.time_s * held, "usable_bytes": rec.peak_bytes}


def constraints(ctx: Context, state, data, limits: Limits, rec: Candidate) -> list[ConstraintReport]:
    """Each limit of the request: its use by the recommended run, whether it binds, and how the
    objective changes with the limit ``RELAX`` looser."""
    req = ctx.request
    objective = req.objective
    now = best_value(ctx, state, data, limits, objective)
    used = _used(rec)
    out = []
    for name in (*BUDGETS, "usable_bytes"):
        limit = getattr(limits, name)
        if limit is None:
            continue
        relaxed = best_value(ctx, state, data, limits.scaled(name, 1 + RELAX), objective)
        change = None if (relaxed is None or now is None) else relaxed - now
        ratio = used[name] / limit
        binding = ratio >= 1 - 1e-6 if name != "usable_bytes" else (change is not None and change < -1e-12)
        out.append(ConstraintReport(name=CONSTRAINT_NAMES[name], limit=limit, used=used[name], unit=UNITS[name],
                                    binding=bool(binding), slack_fraction=1 - ratio, loss_change_if_relaxed=change,
                                    kind="hardware" if name == "usable_bytes" else "budget",
                                    quantile=req.confidence if name in TIME_BUDGETS else None))
    if req.data_pool_tokens is not None:
        unique = rec.unique_tokens or 0.0
        out.append(ConstraintReport(name="data_pool", limit=req.data_pool_tokens, used=unique, unit="tokens",
                                    binding=bool(rec.tokens >= rec.keep_fraction * req.data_pool_tokens * (1 - 1e-9)),
                                    slack_fraction=1 - unique / req.data_pool_tokens, loss_change_if_relaxed=None,
                                    kind="data"))
    from planner.search.plausible import memory_exclusion, plausibility_reports  # the evidence's limits

    excluded = memory_exclusion(ctx, state, data, rec)
    if excluded:  # memory decided the method: it binds even where 10% more would not fit the better one
        out = [c.model_copy(update={"binding": True, "source": excluded}) if c.name == "memory_per_gpu" else c for c in out]
    return out + plausibility_reports(ctx, state, data, limits, rec, now)


def choice_index(data, c: Candidate) -> int:
    """The data choice of a candidate."""
    for j in range(data.size):
        if (data.selection[j] == c.selection and abs(data.keep_fraction[j] - c.keep_fraction) < 1e-12
                and (data.strategy[j] == c.strategy or (c.strategy == "none" and data.theta_deg[j] >= 90))):
            return j
    raise PlannerError("internal: the recommended data choice is not in the grid")


def _binding_budget(limits: Limits, rec: Candidate) -> str | None:
    """The first budget the recommended run uses up."""
    used = _used(rec)
    for name in BUDGETS:
        limit = getattr(limits, name)
        if limit is not None and used[name] >= limit * (1 - 1e-6):
            return name
    return None


def _loss_curve(ctx: Context, state, data, rec: Candidate):
    """(steps, expected loss) of the recommended run up to its planned steps."""
    steps = max(rec.steps, 1)
    # the sorted distinct steps (np.unique without return_index would import numpy.ma: ~10 ms a process)
    t = np.unique(np.concatenate([np.geomspace(max(1.0, steps / 1000.0), steps, 200).round(), [steps]]), return_index=True)[0]
    tokens = t * rec.global_batch_tokens
    entry = next(m for m in state.models if m.name == rec.model)
    j = choice_index(data, rec)
    loss = candidate_loss(ctx, entry.params_n, rec.method, tokens, data.keep_fraction[j], data.theta_deg[j],
                          str(data.strategy[j]))
    return t, loss


def stopping(ctx: Context, state, data, limits: Limits, rec: Candidate) -> Stopping:
    """The expected loss curve of the recommended run and where to stop it.

    lambda is the shadow price of the binding budget: -dL*/d(limit), the loss the best plan gains
    per unit of budget (a 1% finite difference over the same search). The run should stop where
    its own marginal gain per unit of that budget, -dL/dstep / cost_per_step, falls below lambda
    (``planner.loss.stopping``'s rule). At a compute-optimal allocation the two agree at the planned end.
    """
    steps = max(rec.steps, 1)
    t, loss = _loss_curve(ctx, state, data, rec)
    held = rec.held_factor  # a time budget held at the request's confidence is spent at that quantile's pace
    per_step = {
        "compute_flops": rec.compute_flops / rec.tokens * rec.global_batch_tokens,
        "budget_usd": rec.cost_usd * held / rec.tokens * rec.global_batch_tokens,
        "gpu_hours": rec.gpu_hours * held / rec.tokens * rec.global_batch_tokens,
        "deadline_s": rec.step_time_s * held,
    }
    binding = _binding_budget(limits, rec)
    threshold = None
    stop = steps
    note = "no budget binds: the run ends at the planned tokens"
    if binding is not None:
        now = best_value(ctx, state, data, limits, "loss")
        up = best_value(ctx, state, data, limits.scaled(binding, 1.01), "loss")
        limit = getattr(limits, binding)
        if now is not None and up is not None and up < now:
            threshold = (now - up) / (0.01 * limit)
            slope = -np.gradient(loss, t) / per_step[binding]
            below = np.flatnonzero((slope < threshold) & (t >= 1))
            stop = int(t[below[0]]) if below.size else steps
            stop = min(stop, steps)
            note = (f"stop when the run's loss gain per {UNITS[binding]} falls below lambda, what one more "
                    f"{UNITS[binding]} of {CONSTRAINT_NAMES[binding]} buys the best plan")
    loss_at_stop = float(np.interp(stop, t, loss))
    return Stopping(threshold=threshold, threshold_unit=f"loss per {UNITS[binding]}" if binding else "-",
                    cost_per_step=per_step[binding] if binding else None, planned_steps=steps, stop_step=int(stop),
                    loss_at_stop=loss_at_stop, curve_step=t.tolist(), curve_loss=np.asarray(loss).tolist(), note=note)


# ----------------------------------------------------------------------------- infeasible


def memory_shortfall(ctx: Context, state) -> str:
    """Why nothing fits: the lightest set-up tried, how much it is over, the cheapest fixes."""
    from planner.search.fit import cheapest_fixes
    from planner.units import fmt_bytes

    lightest = state.stats["lightest"]
    if lightest is None:
        return "no set-up was evaluated: check the search axes (methods, GPU counts, layouts)"
    peak, name, setup, _ = lightest
    entry = next(m for m in state.models if m.name == name)
    short = peak - ctx.usable_bytes
    fixes = cheapest_fixes(entry.spec, ctx.gpu, setup, ctx.request.seq_len, ctx.usable_bytes,
                           max(ctx.request.seq_len, 4096), ctx.profile)
    fix_text = "; ".join(f["fix"] for f in fixes) if fixes else (
        "no single change tried fits it (a smaller micro-batch, a shorter sequence, ZeRO-3 over up to 128 GPUs, a "
        "larger catalog GPU): change the method (LoRA / QLoRA), the model, or several of these at once")
    from planner.specs.techniques import stack_label

    stack = "" if setup.stack == "hf" else f" on {stack_label(setup)}"
    return (f"nothing fits in memory: the lightest set-up ({name}, {setup.method}{stack}, checkpointing {setup.checkpointing}, "
            f"{setup.num_gpus} GPU(s) ZeRO-{setup.zero} TP {setup.tensor_parallel}, micro-batch {setup.micro_batch}) needs "
            f"{fmt_bytes(peak)} per GPU, {fmt_bytes(short)} more than the {fmt_bytes(ctx.usable_bytes)} usable on "
            f"{ctx.gpu.name}; relax: {fix_text}")


def _one_step_shortfalls(ctx: Context, state, rows) -> list[str]:
    """The budgets that cannot pay for one optimizer step of the fastest set-up."""
    from planner.units import fmt_count, fmt_flops, fmt_seconds, fmt_usd

    req = ctx.request
    tps = rows["tokens_per_step"].astype(np.float64)
    low, high, _ = ctx.time_log_bounds(rows["num_gpus"], rows["method"], rows["precision"], rows["micro_batch"])
    held = quantile_factor(low, high, req.confidence)  # one step at --confidence's quantile (1: the median)
    i = int(np.argmin(rows["step_time_s"] * held * rows["num_gpus"]))
    g = int(rows["num_gpus"][i])
    step_s = float(rows["step_time_s"][i] * held[i])
    flops_step = float(budget_flops_per_token(state.models[int(rows["model"][i])].params_n,
                                              rows["work_ratio"][i])) * float(tps[i])
    parts = []
    if req.compute_flops is not None and req.compute_flops < flops_step:
        parts.append(f"--compute {fmt_flops(req.compute_flops)} is short by {fmt_flops(flops_step - req.compute_flops)} "
                     f"of one optimizer step ({fmt_count(tps[i])} tokens)")
    cost_step = step_s * g * ctx.price / 3600
    at = "" if req.confidence is None else f" at the {req.confidence:.0%} quantile"
    if req.budget_usd is not None and req.budget_usd < cost_step:
        parts.append(f"--budget-usd {fmt_usd(req.budget_usd)} is short by {fmt_usd(cost_step - req.budget_usd)} of one "
                     f"step{at}")
    if req.deadline_s is not None and req.deadline_s < step_s:
        parts.append(f"the deadline {fmt_seconds(req.deadline_s)} is shorter than one step{at} ({fmt_seconds(step_s)})")
    if req.gpu_hours is not None and req.gpu_hours < step_s * g / 3600:
        parts.append(f"--gpu-hours {req.gpu_hours:g} is short of one step{at} ({step_s * g / 3600:.3g} GPU-hours)")
    return parts


def budget_shortfall(ctx: Context, state, rows, scored) -> str:
    """Why no candidate is feasible: the loss target out of reach, or the budgets that cannot pay
    for one optimizer step of the fastest set-up."""
    req = ctx.request
    if req.objective != "loss" and req.target_loss is not None and scored["feasible"].any():
        best = float(scored["loss"][scored["feasible"]].min())
        return (f"the target loss {req.target_loss:g} is out of reach: the best feasible plan predicts {best:.4f} "
                f"({best - req.target_loss:.4f} above); relax a budget or raise --target-loss")
    parts = _one_step_shortfalls(ctx, state, rows)
    if req.tokens is not None or req.epochs is not None:
        parts.append("the fixed tokens/epochs exceed what the budgets allow (or are less than one optimizer step)")
    if not parts:
        parts.append("no candidate satisfies every limit (scoring the pool may use up the budget)")
    return "infeasible: " + "; ".join(parts) + "; relax that limit or lower --global-batch-tokens"
