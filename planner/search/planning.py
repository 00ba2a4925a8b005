"""The plan: a request -> the search -> the recommended run, the Pareto front, the binding
constraints, the stopping threshold (``make_plan``).

Evaluation is factored in two vectorized halves that meet in one broadcast: the set-up side
(``planner.search.setups``: peak memory, step time and throughput of every categorical set-up over
micro-batches and ranks) and the data side (``planner.search.scoring``: the law's loss over tokens,
kept fractions and selection methods). Loss does not depend on the set-up beyond the model and the
method, and cost is time x GPUs x price, so among set-ups of one (model, method, GPU count) only
the fastest that fits can be on the Pareto front; ``make_plan`` keeps that one before crossing
with the data side, which is exact (``evaluate_candidates`` keeps every set-up, and the tests
check the two fronts agree). Pre-training searches a coarse ladder of model sizes, then a fine
one around the best. The continuous part (model size and tokens under the budgets and the pool)
is a geometric program (``planner.search.convex``, cvxpy) cross-checked against the grid; the
library runs it by default, `planner plan` with --continuous-check (importing cvxpy alone takes
longer than the rest of a plan).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.search import candidates as cand
from planner.search.constraints import budget_shortfall, constraints, memory_shortfall, stopping
from planner.search.context import Context, limits_of, make_context
from planner.search.finetuning import finetune_notes
from planner.search.lifetime import inference_flops
from planner.search.pareto import choose, grouped_front
from planner.search.plan import Candidate, Plan, PlanRequest, SearchStats
from planner.search.plausible import evidence_report
from planner.search.scoring import score_candidates
from planner.search.setups import evaluate_setups, reduce_setups
from planner.search.stacks import candidate_setup, check_compile, check_stacks, stacks_note
from planner.search.table import SetupTable


@dataclass
class SearchState:
    models: list
    table: SetupTable
    stats: dict


def _merge_stats(stats: dict, more: dict) -> None:
    for k in ("setups", "setups_skipped", "memory_calls", "time_calls"):
        stats[k] += more[k]
    if more["lightest"] is not None and (stats["lightest"] is None or more["lightest"][0] < stats["lightest"][0]):
        stats["lightest"] = more["lightest"]


def _refine_ladder(ctx: Context, state: SearchState, exhaustive: bool) -> SearchState:
    """Add the fine ladder around the coarse ladder's best size, on the layouts that won for the
    coarse sizes near it."""
    models, table, stats = state.models, state.table, state.stats
    reduced = reduce_setups(table, ctx.usable_bytes)
    if reduced.empty:
        return state
    data, _ = cand.data_choices(ctx.request, ctx.law, ctx.plausibility)
    scored = score_candidates(ctx, models, reduced, data, limits_of(ctx), only_max=True)
    best = choose(scored, "loss", None, 0.0)
    if best is None:
        return state
    n_best = models[int(reduced["model"][scored["row"][best]])].total_params
    have = {(m.spec.num_layers, m.spec.hidden_size) for m in models}
    extra = [m for m in cand.ladder_models(cand.ladder_sizes(n_best, fine=True), ctx.law)
             if (m.spec.num_layers, m.spec.hidden_size) not in have]
    step = 1.0 / cand.LADDER_COARSE_PER_DECADE
    near = [i for i, m in enumerate(models) if abs(math.log10(m.total_params / n_best)) <= step * 1.01]
    won = reduced.take(np.isin(reduced["model"], near))
    layouts = {(int(won["num_gpus"][i]), won["checkpointing"][i], int(won["zero"][i]), int(won["tensor_parallel"][i]),
                int(won["pipeline_parallel"][i])) for i in range(len(won))}
    counts_won = tuple(sorted({g for g, *_ in layouts}))
    if not (extra and layouts):
        return state
    t2, s2 = evaluate_setups(ctx, extra, lambda entry, method: counts_won, exhaustive,
                             lambda g: sorted({(c, z, t, p) for gg, c, z, t, p in layouts if gg == g}))
    t2 = t2.with_column("model", t2["model"] + len(models))
    _merge_stats(stats, s2)
    return SearchState(models + extra, SetupTable.concat([table, t2]), stats)


def search_setups(ctx: Context, exhaustive: bool = False) -> SearchState:
    """Evaluate the set-up side for every model (fine-tuning) or a coarse-then-fine size ladder."""
    req = ctx.request
    counts = cand.gpu_counts_for(ctx)
    check_compile(req)
    if not req.pretrain:
        models = cand.catalog_models(req.models, ctx.law, req)
        check_stacks(req, models)
        table, stats = evaluate_setups(ctx, models, counts, exhaustive)
        return SearchState(models, table, stats)
    models = cand.ladder_models(cand.ladder_sizes(cand.ladder_center(ctx)), ctx.law)
    check_stacks(req, models)
    table, stats = evaluate_setups(ctx, models, counts, exhaustive)
    return _refine_ladder(ctx, SearchState(models, table, stats), exhaustive)


def evaluate_candidates(request: PlanRequest, exhaustive: bool = True):
    """Every candidate as one flat table (a pandas DataFrame, no reduction): set-up rows x data
    choices x token fractions, with loss, cost, time, FLOPs and feasibility. For tests and
    benchmarks; ``make_plan`` reduces first."""
    import pandas as pd

    ctx = make_context(request)
    state = search_setups(ctx, exhaustive=exhaustive)
    data, _ = cand.data_choices(request, ctx.law, ctx.plausibility)
    table = state.table.take(state.table["peak_bytes"] <= ctx.usable_bytes)
    if table.empty:
        return pd.DataFrame()
    scored = score_candidates(ctx, state.models, table, data, limits_of(ctx))
    frame = table.take(scored["row"]).to_frame()
    frame["model_name"] = [state.models[i].name for i in frame["model"]]
    frame["params"] = [state.models[i].params_n for i in frame["model"]]
    for key in ("tokens", "loss", "time_s", "cost_usd", "compute_flops", "feasible"):
        frame[key] = scored[key]
    frame["selection"] = data.selection[scored["choice"]]
    frame["keep_fraction"] = data.keep_fraction[scored["choice"]]
    frame["strategy"] = data.strategy[scored["choice"]]
    return frame


def make_plan(request: PlanRequest, exhaustive: bool = False, continuous_check: bool = True) -> Plan:
    """The recommended run, the Pareto front, the binding constraints, the stopping threshold.

    ``exhaustive``: evaluate every set-up (no dominance pruning). ``continuous_check``: for a
    pre-training plan, also solve the geometric program over (N, D) and compare (``Plan.continuous``;
    it imports cvxpy, most of a plan's time: `planner plan` runs it with --continuous-check)."""
    start = time.perf_counter()
    ctx = make_context(request)
    req = ctx.request
    data, notes = cand.data_choices(req, ctx.law, ctx.plausibility)  # bad data requests fail before the search
    state = search_setups(ctx, exhaustive=exhaustive)
    limits = limits_of(ctx)
    rows = reduce_setups(state.table, ctx.usable_bytes)
    if rows.empty:
        raise PlannerError(memory_shortfall(ctx, state))
    scored = score_candidates(ctx, state.models, rows, data, limits)
    best = choose(scored, req.objective, req.target_loss, req.loss_tolerance)
    if best is None:
        raise PlannerError(budget_shortfall(ctx, state, rows, scored))
    front = grouped_front(scored, rows)
    front = front[np.argsort(scored["cost_usd"][front], kind="stable")]
    rec = _candidate(ctx, state, rows, data, scored, best)
    inference = None
    if req.inference_tokens:  # training + lifetime inference for the same loss (planner.search.lifetime)
        from planner.search import lifetime

        more, i, target = lifetime.lifetime_choice(ctx, state, rows, data, limits, scored, best)
        training_only, rec = rec, _candidate(ctx, state, rows, data, more, i)
        inference = lifetime.report(ctx, rec, training_only, target)
    return Plan(
        request=req,
        mode="pretrain" if req.pretrain else "finetune",
        gpu=ctx.gpu.name,
        price_usd_per_hour=ctx.price,
        law=ctx.law.name,
        recommended=rec,
        pareto=[_candidate(ctx, state, rows, data, scored, int(i)) for i in front],
        constraints=constraints(ctx, state, data, limits, rec),
        stopping=stopping(ctx, state, data, limits, rec),
        continuous=_continuous(ctx, state, rows, rec) if req.pretrain and continuous_check else None,
        assumptions=list(ctx.assumptions) + notes + _standing_assumptions(ctx) + _profile_reach(ctx, rec),
        search=_search_stats(ctx, state, data, scored, start),
        evidence=evidence_report(ctx, state, limits, rec),
        inference=inference,
    )


def _continuous(ctx: Context, state: SearchState, rows: SetupTable, rec: Candidate):
    from planner.search.convex import check_grid  # cvxpy: only when the check runs

    return check_grid(ctx, state.models, rows, rec)


def _search_stats(ctx: Context, state: SearchState, data, scored, start: float) -> SearchStats:
    req = ctx.request
    rows_feasible = int((state.table["peak_bytes"] <= ctx.usable_bytes).sum())
    per_row = data.size * (1 if req.tokens or req.epochs else req.token_grid + 1)
    return SearchStats(
        setups_evaluated=int(state.stats["setups"] - state.stats["setups_skipped"]),
        rows_feasible=rows_feasible,
        candidates=rows_feasible * per_row,
        candidates_scored=int(scored["loss"].size),
        wall_s=time.perf_counter() - start,
    )


def _profile_reach(ctx: Context, rec: Candidate) -> list[str]:
    """The calibration profile's reach over the recommended run, in words: beyond what it timed, the run's
    interval is the wider of the profile's and the published one (``planner.cost.timing.bounds``)."""
    if ctx.profile is None:
        return []
    from planner.cost.timing.intervals import profile_range_note

    note = profile_range_note(ctx.profile, candidate_setup(rec))
    return [note.removeprefix("time: ") + " (the recommended run)"] if note else []


def _standing_assumptions(ctx: Context) -> list[str]:
    req = ctx.request
    out = [f"loss: {ctx.law.name} law ({ctx.law.citation.split(',')[0]}); budget FLOPs counted as 6 N D"]
    out += finetune_notes(req)
    if not req.pretrain and any(m != "full" for m in req.methods) and (req.peft_efficiency or not req.uses_finetune_law):
        eff = ", ".join(f"{m} {req.efficiency(m):g}" for m in req.methods if m != "full")
        source = "given" if req.peft_efficiency else "assumed, see planner.search.plan.DEFAULT_PEFT_TOKEN_EFFICIENCY"
        out.append(f"PEFT token efficiency ({source}): {eff}")
    if req.task is None:
        out.append(f"task: {ctx.plausibility.task} (none given; --task chooses the selection methods with evidence)")
    if req.inference_tokens:
        out.append(f"inference: {req.inference_tokens:.3g} tokens served, 2 N FLOPs each (Sardana et al. 2024), an inference "
                   f"FLOP costing {req.inference_cost_ratio:g} x a training FLOP (--inference-cost-ratio)")
    if req.gpu_counts is not None:
        out.append(f"GPU counts tried: {', '.join(map(str, req.gpu_counts))}")
    elif req.num_gpus is None:
        out.append("GPU count free: " + ("powers of 2 up to 8 (one node)" if not req.pretrain else "powers of 4 up to 4096"))
    else:
        out.append(f"GPU count: all {req.num_gpus} (--gpu-counts to try fewer)")
    out.append(f"global batch about {req.global_batch_tokens} tokens (gradient accumulation fills it)")
    from planner.cost.timing.intervals import TIME_LEAVES_OUT

    out.append(TIME_LEAVES_OUT)
    if req.stacks != ("hf",):
        out.append(stacks_note(req, ctx.gpu))
    return out


def _candidate(ctx: Context, state: SearchState, rows: SetupTable, data, scored, i: int) -> Candidate:
    row = rows.row(int(scored["row"][i]))
    j = int(scored["choice"][i])
    entry = state.models[int(row["model"])]
    tokens = float(scored["tokens"][i])
    pool = ctx.request.data_pool_tokens
    f = float(data.keep_fraction[j])
    unique = None if pool is None else min(tokens, f * pool)
    tps = float(row["tokens_per_step"])
    loss_law, trust, factor = _provenance(ctx, entry, str(row["method"]), tokens, data, j)
    flops = float(scored["compute_flops"][i])
    inf_flops = 0.0 if not ctx.request.inference_tokens else float(
        inference_flops(entry.params_n, ctx.request.inference_tokens, ctx.request.inference_cost_ratio))
    return _with_techniques(Candidate(
        **_interval_fields(ctx, row, float(scored["time_s"][i]), float(scored["cost_usd"][i])),
        loss_law=loss_law, loss_trust=trust, loss_extrapolation=factor, inference_flops=inf_flops,
        inference_cost_usd=float(scored["cost_usd"][i]) * inf_flops / flops if flops > 0 else 0.0,
        model=entry.name,
        params=entry.params_n,
        tokens=tokens,
        loss=float(scored["loss"][i]),
        cost_usd=float(scored["cost_usd"][i]),
        time_s=float(scored["time_s"][i]),
        gpu_hours=float(scored["time_s"][i]) * int(row["num_gpus"]) / 3600.0,
        compute_flops=float(scored["compute_flops"][i]),
        method=str(row["method"]),
        lora_rank=int(row["lora_rank"]) if row["method"] != "full" else None,
        precision=str(row["precision"]),
        optimizer=str(row["optimizer"]),
        checkpointing=str(row["checkpointing"]),
        num_gpus=int(row["num_gpus"]),
        zero=int(row["zero"]),
        tensor_parallel=int(row["tensor_parallel"]),
        pipeline_parallel=int(row.get("pipeline_parallel", 1)),
        sequence_parallel=bool(row.get("sequence_parallel", False)),
        micro_batch=int(row["micro_batch"]),
        grad_accum=int(row["grad_accum"]),
        seq_len=ctx.request.seq_len,
        global_batch_tokens=int(tps),
        steps=int(math.ceil(tokens / tps - 1e-9)),
        step_time_s=float(row["step_time_s"]),
        tokens_per_s=float(row["tokens_per_s"]),
        mfu=float(row["mfu"]),
        peak_bytes=float(row["peak_bytes"]),
        usable_bytes=ctx.usable_bytes,
        selection=str(data.selection[j]),
        keep_fraction=f,
        strategy=str(data.strategy[j]) if data.theta_deg[j] < 90 else "none",
        unique_tokens=unique,
        epochs=None if unique is None else tokens / (f * pool),
        scoring_flops=float(data.scoring_flops[j]),
        stack=str(row.get("stack", "hf")),
        setup_fields=json.loads(row.get("variant") or "{}"),
    ))


def _interval_fields(ctx: Context, row, time_s: float, cost_usd: float) -> dict:
    """A candidate's 80% intervals (``planner.cost.timing.bounds``: its regime's, or the calibration
    profile's inside what it timed) and its time at the request's confidence over the median (the
    quantile of the same interval, as the search held it: ``scoring._Rows``)."""
    from planner.cost.timing.bounds import interval_factors, quantile_factor

    low, high, basis = interval_factors(int(row["num_gpus"]), ctx.gpus_per_node, ctx.profile, str(row["method"]),
                                        str(row["precision"]), int(row["micro_batch"]) * ctx.request.seq_len)
    step, tps, mfu = float(row["step_time_s"]), float(row["tokens_per_s"]), float(row["mfu"])
    held = float(quantile_factor(np.log(low), np.log(high), ctx.request.confidence))
    return {"time_s_low": time_s * low, "time_s_high": time_s * high, "cost_usd_low": cost_usd * low,
            "cost_usd_high": cost_usd * high, "step_time_s_low": step * low, "step_time_s_high": step * high,
            "tokens_per_s_low": tps / high, "tokens_per_s_high": tps / low, "mfu_low": mfu / high, "mfu_high": mfu / low,
            "interval_basis": basis, "confidence": ctx.request.confidence, "held_factor": held}


def _with_techniques(c: Candidate) -> Candidate:
    """The candidate with its techniques in words (``planner.specs.techniques``)."""
    from planner.specs.techniques import technique_words

    return c.model_copy(update={"techniques": technique_words(candidate_setup(c))})


def _provenance(ctx: Context, entry, method: str, tokens: float, data, j: int) -> tuple[str, str, float]:
    """Which law produced a candidate's loss, and where the point sits in its evidence."""
    from planner.search.finetuning import finetune_provenance, pretraining_provenance

    if not ctx.request.uses_finetune_law:
        return pretraining_provenance(ctx.law, entry.params_n, tokens)
    from planner.search.finetuning import data_tokens

    d_eff = data_tokens(ctx, entry.params_n, tokens, data.keep_fraction[j], data.theta_deg[j], str(data.strategy[j]),
                        ctx.request.efficiency(method))
    return finetune_provenance(ctx, entry.params_n, method, float(d_eff))
