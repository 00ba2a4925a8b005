"""The set-up side of the search: peak memory, step time and throughput of every set-up.

A set-up is a categorical combination (model, method, stack variant: precision, optimizer and the
stack's techniques, checkpointing, GPU count, ZeRO stage, tensor parallelism); each is evaluated over arrays of micro-batches and LoRA
ranks with one call of ``planner.cost.memory.phases.training_memory`` per accumulation regime and of
``planner.cost.timing.step_time.step_time`` at two accumulations (a step is affine in it). What does not
depend on the ZeRO stage, the GPU count or the accumulation (a micro-batch's activations and its
compute, ``memory_activations.activation_memory`` and ``step_time.micro_batch_work``) is computed
once per model and layout and shared; every result is memoized across the plans of one process
(compare, sensitivities, notebooks). A set-up whose lighter-checkpointing twin already fits at
every micro-batch is skipped unless ``exhaustive``, and so is an eager stack variant where its
compiled twin (or its twin without activation offloading) fits (``planner.search.stacks.twins_of``); a variant that steps the optimizer in
backward keeps only the micro-batches that fill a step alone (no accumulation). Step times are
priced on the request's cluster (``Context.cluster``). ``reduce_setups`` keeps the fastest set-up of
each (model, method, GPU count, tokens per step): the only ones that can be on the Pareto front.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import numpy as np

from planner.search.context import RELAX, Context
from planner.search.pipelines import fits_states_floor, pipeline_combos, wants_pipeline
from planner.search.stacks import (
    layout_allowed,
    layout_fields,
    priced,
    stack_variants,
    technique_fields,
    twins_of,
    unpriced_reason,
)
from planner.search.table import SetupTable, fastest_per_group

PRECISION_FOR_METHOD = {"full": "bf16-mixed", "lora": "bf16", "qlora": "bf16"}
"""Full training keeps fp32 weights under bf16 autocast (HF Trainer bf16=True); LoRA/QLoRA load the
base in bf16 (torch_dtype=bfloat16), adapters fp32 (peft's default)."""
FINETUNE_PRECISIONS = {"full": ("bf16-mixed", "bf16"), "lora": ("bf16",), "qlora": ("bf16",)}
"""Fine-tuning also tries full training in pure bf16 (weights, gradients and AdamW states in bf16,
torchtune's full-fine-tuning recipes' ``dtype: bf16``): half the states of mixed precision, so it
is what makes full fine-tuning fit on smaller GPUs. Pre-training keeps mixed precision."""
_CKPT_ORDER = {"none": 0, "selective": 1, "full": 2}


def grad_accum_for(global_batch_tokens: int, micro_batch, seq_len: int, data_parallel: int):
    """Micro-batches per optimizer step so that a step holds about ``global_batch_tokens`` tokens (>= 1)."""
    per_pass = np.asarray(micro_batch, dtype=np.float64) * seq_len * data_parallel
    return np.maximum(1, np.round(global_batch_tokens / per_pass)).astype(np.int64)


def _dominates(a: tuple, b: tuple) -> bool:
    """Set-up a = (ckpt rank, zero, tp, pp) is at least as fast as b at each micro-batch: same layout,
    less recompute. (No such order holds across ZeRO stages or tensor parallelism: sharding the
    optimizer step or splitting the matmuls can make a step faster.)"""
    return a[1:] == b[1:] and a[0] <= b[0]


# ----------------------------------------------------------------------------- memoized cost calls


_MEMO: dict = {}
_MEMO_MAX = 50_000


def _memo(ctx: Context, kind: str, entry, setup_key, mb, seq, rank_arg, compute):
    """``compute()``, memoized across the plans of one process. Keys: the kind, the architecture,
    what of the set-up the call reads, the GPU, the cluster, the calibration profile (kept with the value, so
    its identity is not reused) and the arrays' contents."""
    profile = id(ctx.profile) if ctx.profile is not None else None
    cluster = ctx.cluster.name if ctx.cluster is not None else None  # catalog names are unique; "default" per GPU
    key = (kind, entry.key, setup_key, ctx.gpu.name, profile, cluster, mb.tobytes(), mb.shape, seq, rank_arg.tobytes(),
           rank_arg.shape)
    hit = _MEMO.get(key)
    if hit is None or hit[0] is not ctx.profile:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        hit = (ctx.profile, compute())
        _MEMO[key] = hit
    return hit[1]


def _shared(ctx: Context, entry, mb, seq, rank_arg) -> dict:
    """The cache dict the cost formulas share parts in (``step_time(cache=)``,
    ``training_memory(cache=)``): one per model, GPU, profile and arrays."""
    return _memo(ctx, "shared", entry, None, mb, seq, rank_arg, dict)


def _memory_peak(ctx: Context, entry, setup, mb, seq, rank_arg):
    """Peak allocated bytes per GPU, or calibrated by the profile (``planner.cost.memory.device``, as every verb)."""
    from planner.cost.memory.device import peak_allocated_bytes

    cache = _shared(ctx, entry, mb, seq, rank_arg) if ctx.profile is None else None
    return np.asarray(peak_allocated_bytes(entry.spec, setup, mb, seq, rank_arg, ctx.profile, cache=cache), dtype=np.float64)


def _peak(ctx: Context, entry, setup, mb, seq, rank_arg, ga):
    """Peak bytes over (micro-batch x rank), with the accumulation each micro-batch implies
    (gradients live through forward when ga > 1)."""
    shape = (mb.size, rank_arg.shape[1])
    single = (ga == 1)[:, 0]
    peak = np.empty(shape)
    # a pipeline holds min(pp, m) micro-batches in flight: priced at m = pp (exact for m >= pp)
    if setup.optimizer_in_backward:  # steps in each backward: no accumulation (TrainingSetup refuses it)
        peak[~single] = np.inf
    for accumulate, rows in ((max(2, setup.pipeline_parallel), ~single), (1, single)):
        if rows.any() and not (setup.optimizer_in_backward and accumulate > 1):
            variant = setup.model_copy(update={"grad_accum": accumulate})
            value = _memo(ctx, "memory", entry, variant, mb[:, None], seq, rank_arg,
                          lambda v=variant: _memory_peak(ctx, entry, v, mb[:, None], seq, rank_arg))
            peak[rows] = np.broadcast_to(value, shape)[rows]
    return peak


class AffineStep(NamedTuple):
    """A set-up's step seconds as a function of its accumulation ``ga``: ``single`` at ga = 1, and
    ``ga x per_mb + per_step`` beyond (the line through ga = 2 and 3). Accumulation changes the
    step's shape once, at ga = 2: each micro-batch after the first adds its gradients into the
    accumulated ones, and a DDP / ZeRO-1 reduction overlaps a backward that does so."""

    per_mb: np.ndarray
    per_step: np.ndarray
    single: np.ndarray

    def at(self, ga):
        """Step seconds at accumulation ``ga`` (arrays broadcast)."""
        return np.where(np.asarray(ga) == 1, self.single, np.asarray(ga) * self.per_mb + self.per_step)


def _affine_step(ctx: Context, spec, setup, mb, seq, rank_arg, cache: dict | None = None) -> AffineStep:
    """``AffineStep`` of ``setup`` from ``planner.cost.timing.step_time.step_time`` at ga = 1, 2 and 3.
    Exact where step_time is affine in ga from 2 on (its terms are per micro-batch or per step);
    the host time's smooth exposure (``grounding.exposed_host_s``) bends it slightly where host and
    device times are close (within 2% at ga = 128 for an 8B model's full fine-tuning at 128
    tokens, ``tests/test_optimize.py``)."""
    from planner.cost.timing.step_time import step_time

    def at(ga: int) -> np.ndarray:
        return np.asarray(step_time(spec, setup.model_copy(update={"grad_accum": ga}), ctx.gpu, mb, seq, rank_arg,
                                    ctx.profile, cache, cluster=ctx.cluster)["step_time_s"], dtype=np.float64)

    one = at(1)
    if setup.optimizer_in_backward:  # one micro-batch per step (the rows with accumulation never fit)
        return AffineStep(one, 0.0 * one, one)
    two, three = at(2), at(3)
    return AffineStep(three - two, 3.0 * two - 2.0 * three, one)


def _track_lightest(stats, entry, setup, peak, ranks, micro_batches, grad_accum):
    i = np.unravel_index(int(np.argmin(peak)), peak.shape)
    value = float(peak[i])
    by_method = stats.setdefault("lightest_by_method", {})
    if setup.method not in by_method or value < by_method[setup.method]:
        by_method[setup.method] = value  # what memory excluded (planner.search.constraints)
    if stats["lightest"] is None or value < stats["lightest"][0]:
        # the set-up as evaluated at its lightest point: the micro-batch, accumulation and LoRA rank the
        # search priced there (the infeasibility message's fixes are priced on it: constraints.memory_shortfall)
        rank = int(ranks[i[1]])
        lightest = setup.model_copy(update={"micro_batch": int(micro_batches[i[0]]),
                                            "grad_accum": int(np.asarray(grad_accum).reshape(-1)[i[0]]),
                                            **({"lora_rank": rank} if setup.method != "full" and rank > 0 else {})})
        stats["lightest"] = (value, entry.name, lightest, int(ranks[i[1]]))


# ----------------------------------------------------------------------------- evaluation


class _Group(NamedTuple):
    """What the set-ups of one (model, method, optimizer) share."""

    model_row: int  # the model's index in the model list
    entry: object
    base: object  # TrainingSetup without the layout
    ranks: np.ndarray
    rank_arg: np.ndarray  # 1 x ranks, at least 1
    mb: np.ndarray
    work_ratio: np.ndarray  # 1 x ranks: the method's model FLOPs over full training's
    flops_mb: np.ndarray  # mb x ranks: model FLOPs of one micro-batch (no recompute)
    peak_rate: float
    key: tuple = ()  # (model row, method, the base's fields)
    twins: tuple = ()  # keys of the variants never slower at equal layout (planner.search.stacks.twins_of)


def _work_ratio(spec, base, seq: int, rank_arg):
    """Model FLOPs of the method over full training's, one sequence (full training: 1)."""
    from planner.cost.estimate import training_flops
    from planner.specs.setup import TrainingSetup

    if base.method == "full":
        return 1.0
    full_flops = float(training_flops(spec, TrainingSetup(seq_len=seq), 1, seq).model)
    return training_flops(spec, base, 1, seq, rank_arg).model / full_flops


def _bases(ctx: Context, spec, method: str) -> list[dict]:
    """The set-up fields (stack, precision, optimizer, techniques) of every base set-up of a method:
    the Hugging Face stack's precisions x the request's optimizers it prices, then each other stack
    asked for that can run the model (``planner.search.stacks.stack_variants``)."""
    req = ctx.request
    out = []
    for stack in req.stacks:
        if stack == "hf":
            if req.compile:
                continue  # the hf stack's memory is priced eager only (planner.search.stacks.check_compile)
            precisions = (PRECISION_FOR_METHOD[method],) if req.pretrain else FINETUNE_PRECISIONS[method]
            out += [{"precision": p, "optimizer": o} for p in precisions for o in req.optimizers if priced("hf", "optimizer", o)]
        elif unpriced_reason(stack, spec, req.pretrain) is None:
            out += stack_variants(stack, method, ctx.gpu, req)
    return out


def _key(fields: dict) -> tuple:
    return tuple(sorted(fields.items()))


def _groups(ctx: Context, models: list):
    """Every (model, method, base set-up) of the request, with its shared arrays."""
    from planner.cost.timing.step_time import micro_batch_flops
    from planner.specs.setup import TrainingSetup

    req = ctx.request
    mb = np.asarray(sorted(set(req.micro_batches)), dtype=np.int64)
    seq = req.seq_len
    for mi, entry in enumerate(models):
        spec = entry.spec
        for method in (req.methods if not req.pretrain else ("full",)):
            ranks = np.asarray(sorted(set(req.lora_ranks)) if method != "full" else [0], dtype=np.int64)
            rank_arg = np.maximum(ranks, 1)[None, :]
            for fields in _bases(ctx, spec, method):
                base = TrainingSetup(method=method, seq_len=seq, lora_rank=int(rank_arg.max()), **fields)
                work = np.broadcast_to(np.asarray(_work_ratio(spec, base, seq, rank_arg), dtype=np.float64),
                                       (1, ranks.size))
                # model FLOPs of one micro-batch (no recompute; the same for every layout)
                cache = _shared(ctx, entry, mb[:, None], seq, rank_arg)
                flops_mb = np.asarray(micro_batch_flops(spec, base, mb[:, None], seq, rank_arg, cache).model,
                                      dtype=np.float64)
                twins = tuple((mi, method, _key(t)) for t in twins_of(fields))
                yield _Group(mi, entry, base, ranks, rank_arg, mb, work, flops_mb, ctx.gpu.peak_flops_for(base.precision),
                             (mi, method, _key(fields)), twins)


def _combos(ctx: Context, g: int, method: str, layouts_for, spec=None, stack: str = "hf", offload: bool = False) -> list[tuple]:
    """(checkpointing rank, checkpointing, ZeRO, TP) to try on g GPUs that ``stack`` runs, lightest
    first; activation offloading moves the inputs of fully checkpointed layers (full only)."""
    from planner.search.candidates import layouts

    if layouts_for is not None:
        combos = [(_CKPT_ORDER[c], c, z, tp, *pp) for c, z, tp, *pp in layouts_for(g)]  # (pipeline degree)
    else:
        combos = [(_CKPT_ORDER[c], c, z, tp) for z, tp in layouts(ctx.request, g, method, spec)
                  for c in ctx.request.checkpointing]
    if stack != "hf":
        combos = [c for c in combos if layout_allowed(stack, g, c[1], c[2], c[3], *c[4:]) and (c[1] == "full" or not offload)]
    combos.sort(key=lambda t: (t[0] + t[2] + int(math.log2(t[3])), t[0], t[2], t[3]))
    return combos


def _rows(ctx: Context, grp: _Group, setup, ga, peak, keep) -> dict:
    """The table's columns for the (micro-batch x rank) cells ``keep`` of one set-up."""
    mb, seq, g = grp.mb, ctx.request.seq_len, setup.num_gpus
    dp = setup.data_parallel
    cache = _shared(ctx, grp.entry, mb[:, None], seq, grp.rank_arg)
    line = _memo(ctx, "time", grp.entry, setup, mb[:, None], seq, grp.rank_arg,
                 lambda: _affine_step(ctx, grp.entry.spec, setup, mb[:, None], seq, grp.rank_arg, cache))
    step = np.broadcast_to(line.at(ga), peak.shape)
    tokens_step = np.broadcast_to((mb[:, None] * seq * dp * ga).astype(np.float64), peak.shape)
    mfu = grp.flops_mb * ga * dp / step / (grp.peak_rate * g)
    sel = np.nonzero(keep)
    k = sel[0].size
    return {
        "model": np.full(k, grp.model_row), "method": np.full(k, setup.method, dtype=object),
        "lora_rank": grp.ranks[sel[1]], "precision": np.full(k, setup.precision, dtype=object),
        "optimizer": np.full(k, setup.optimizer, dtype=object), "stack": np.full(k, setup.stack, dtype=object),
        "variant": np.full(k, json.dumps(technique_fields(setup), sort_keys=True), dtype=object),
        "checkpointing": np.full(k, setup.checkpointing, dtype=object), "num_gpus": np.full(k, g),
        "zero": np.full(k, setup.zero), "tensor_parallel": np.full(k, setup.tensor_parallel),
        "pipeline_parallel": np.full(k, setup.pipeline_parallel),
        "sequence_parallel": np.full(k, setup.sequence_parallel),
        "micro_batch": mb[sel[0]], "grad_accum": np.broadcast_to(ga, peak.shape)[sel], "peak_bytes": peak[sel],
        "step_time_s": step[sel], "tokens_per_step": tokens_step[sel], "tokens_per_s": (tokens_step / step)[sel],
        "mfu": np.broadcast_to(mfu, peak.shape)[sel], "work_ratio": np.broadcast_to(grp.work_ratio, peak.shape)[sel],
    }


def _gpu_count_rows(ctx: Context, grp: _Group, g: int, combos: list[tuple], exhaustive: bool, stats: dict,
                    twins: dict | None = None) -> list:
    """Rows of every layout of one group on g GPUs that fits (or would with ``RELAX`` more memory);
    layouts dominated by a lighter one that fits everywhere, or by the compiled twin of the same
    layout (``twins``: (group key, g, layout) -> fits), are skipped unless ``exhaustive``."""
    req = ctx.request
    twins = {} if twins is None else twins
    done: list[tuple[tuple, np.ndarray]] = []  # (key, fits over mb x rank)
    out = []
    for combo in combos:
        ck_rank, ckpt, zero, tp, pp = (*combo, 1)[:5]  # pipeline layouts carry their degree
        key = (ck_rank, zero, tp, pp)
        stats["setups"] += 1
        lighter = [fits for k, fits in done if _dominates(k, key)]
        lighter += [twins[(t, g, key)] for t in grp.twins if (t, g, key) in twins]
        # a pipeline of the same layout that fits with no more stages and no more recompute is
        # preferred (smaller bubble, less recompute: planner.search.pipelines)
        shallower = [fits for k, fits in done if k[1:3] == key[1:3] and k[0] <= key[0] and 1 < k[3] <= key[3]]
        if not exhaustive and (any(f.all() for f in lighter) or any(f.any() for f in shallower)):
            stats["setups_skipped"] += 1
            continue
        setup = grp.base.model_copy(update={"checkpointing": ckpt, "num_gpus": g, "zero": zero, "tensor_parallel": tp,
                                            **layout_fields(grp.base.stack, tp, pp)})
        ga = grad_accum_for(req.global_batch_tokens, grp.mb, req.seq_len, setup.data_parallel)[:, None]
        if setup.optimizer_in_backward and not (ga == 1).any():  # no micro-batch fills a step alone
            stats["setups_skipped"] += 1
            continue
        peak = _peak(ctx, grp.entry, setup, grp.mb, req.seq_len, grp.rank_arg, ga)
        stats["memory_calls"] += 1
        fits = peak <= ctx.usable_bytes
        # rows within the memory sensitivity's 10% are kept too (filtered when reduced)
        near = peak <= ctx.usable_bytes * (1 + RELAX)
        _track_lightest(stats, grp.entry, setup, peak, grp.ranks, grp.mb, ga)
        done.append((key, fits))
        twins[(grp.key, g, key)] = fits
        useful = near.copy()
        if not exhaustive:
            for f in lighter:
                useful &= ~f
        if not useful.any():
            continue
        stats["time_calls"] += 2
        out.append(SetupTable(_rows(ctx, grp, setup, ga, peak, useful if not exhaustive else near)))
    return out


def evaluate_setups(ctx: Context, models: list, gpu_counts_for, exhaustive: bool = False,
                    layouts_for=None) -> tuple[SetupTable, dict]:
    """Peak memory, step time and throughput of every set-up, vectorized over micro-batch and rank.

    ``gpu_counts_for(entry, method)`` lists the GPU counts to try; ``layouts_for(g)``, when given,
    the (checkpointing, ZeRO, TP) triples to try on g GPUs (else every combination). Unless
    ``exhaustive``, a set-up is skipped (no calls) when the same layout with less activation
    checkpointing already fits at every micro-batch, and its step time is not computed where it
    fits at no micro-batch the lighter one leaves out: recompute never makes a step faster at
    equal micro-batch (the tests check the plan against ``exhaustive=True``).
    Returns the table (one row per set-up x micro-batch x rank that fits, or would with 10% more
    memory: the memory constraint's sensitivity) and counts.
    """
    stats = {"setups": 0, "setups_skipped": 0, "memory_calls": 0, "time_calls": 0, "lightest": None}
    tables = []
    twins: dict = {}  # (group key, g, layout) -> fits, for the twins (planner.search.stacks.twins_of)
    for grp in _groups(ctx, models):
        for g in gpu_counts_for(grp.entry, grp.base.method):
            combos = _combos(ctx, g, grp.base.method, layouts_for, grp.entry.spec, grp.base.stack,
                             grp.base.activation_offload)
            rows = _gpu_count_rows(ctx, grp, g, combos, exhaustive, stats, twins)
            # the model needs a pipeline where only ZeRO-2/3 (or nothing) fits
            fits = any(bool(((t["peak_bytes"] <= ctx.usable_bytes) & (t["zero"] <= 1)).any()) for t in rows)
            # given layouts (a refinement) carry their own pipeline degrees
            if layouts_for is None and grp.base.stack in ("hf", "megatron") and wants_pipeline(g, grp.base.method, fits):  # planner.search.pipelines
                pipelined = [c for c in pipeline_combos(combos, g, grp.entry.spec.num_layers)
                             if fits_states_floor(grp.base, grp.entry.total_params, c, ctx.usable_bytes)]
                rows += _gpu_count_rows(ctx, grp, g, pipelined, exhaustive, stats)
            tables += rows
    return SetupTable.concat(tables), stats


def reduce_setups(table: SetupTable, usable_bytes: float) -> SetupTable:
    """The fastest fitting set-up of each (model, method, GPU count, tokens per step): the only
    ones that can be on the front (equal loss for equal tokens, time and cost proportional to
    seconds per token, and at least as many tokens affordable)."""
    fit = table.take(table["peak_bytes"] <= usable_bytes)
    return fastest_per_group(fit, ("model", "method", "num_gpus", "tokens_per_step"), "tokens_per_s")

