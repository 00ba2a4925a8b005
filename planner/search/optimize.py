"""The search: candidate grid -> vectorized evaluation -> constraints -> Pareto front -> Plan.

A candidate is a training run: a model (a catalog entry to fine-tune, or a Llama-shaped model of
a chosen size to pre-train), a method (full, LoRA with a rank, QLoRA), an optimizer, a precision,
activation checkpointing, micro-batch and gradient accumulation, a number of GPUs with a ZeRO
stage and a tensor-parallel degree, the training tokens, and the data (which selection method,
what fraction of the pool is kept, and so how many epochs).

Evaluation is factored in two vectorized halves that meet in one broadcast:

* the set-up side (``evaluate_setups``): for every categorical combination (model, method,
  precision, optimizer, checkpointing, GPUs, ZeRO, TP) one call of ``memory.training_memory``
  and of ``throughput.step_time`` over arrays of micro-batches and LoRA ranks gives the peak
  bytes per GPU, the step time and tokens per second;
* the data side: the loss of the law in use (``predicted_loss``: Chinchilla / Kaplan,
  Muennighoff et al.'s repetition, the pruning model of ``planner.loss.pruning``) over arrays of
  tokens, kept fractions and selection methods.

Loss does not depend on the set-up beyond the model and the method, and cost is time x GPUs x
price, so among set-ups of one (model, method, GPU count) only the fastest that fits can be on
the Pareto front; ``make_plan`` keeps that one before crossing with the data side, which is exact
(``evaluate_candidates`` keeps every set-up, and the tests check the two fronts agree).

The continuous part (model size and tokens under the budgets and the pool) is a geometric
program (``allocation_gp``, cvxpy) cross-checked against the grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from planner.errors import PlannerError
from planner.loss import pruning, scaling
from planner.search.plan import (
    Candidate,
    ConstraintReport,
    ContinuousCheck,
    Plan,
    PlanRequest,
    SearchStats,
    Stopping,
)

# ----------------------------------------------------------------------------- defaults

DEFAULT_GPU = "h100-sxm"
"""GPU used when a request names none (reported in the plan's assumptions)."""
FINETUNE_MAX_GPUS = 8
"""Fine-tuning with no --num-gpus: up to one 8-GPU node (powers of two)."""
PRETRAIN_GPU_COUNTS = (1, 4, 16, 64, 256, 1024, 4096)
"""Pre-training with no --num-gpus: powers of four; each size tries the smallest
PRETRAIN_GPU_OPTIONS counts on which it fits."""
PRETRAIN_GPU_OPTIONS = 3
PRETRAIN_ZERO = (1, 3)
"""Pre-training default layouts (unless the request sets zero / tensor_parallel): ZeRO-1 (a
sharded optimizer, Megatron's distributed optimizer) or ZeRO-3 / FSDP, tensor parallel 1 or 8
(a whole node); the request's zero / tensor_parallel widen them."""
PRETRAIN_TENSOR_PARALLEL = (1, 8)
MAX_TENSOR_PARALLEL = 8
"""Tensor parallelism stays inside one NVLink domain of 8 GPUs (Narayanan et al. 2021, sec. 3.3)."""
PRECISION_FOR_METHOD = {"full": "bf16-mixed", "lora": "bf16", "qlora": "bf16"}
"""Full training keeps fp32 weights under bf16 autocast (HF Trainer bf16=True); LoRA/QLoRA load the
base in bf16 (torch_dtype=bfloat16), adapters fp32 (peft's default)."""
NOMINAL_MFU = 0.4
"""Only to centre the pre-training size ladder before any set-up is evaluated."""
KEEP_GRID = 8
"""Kept fractions per selection method: log-spaced from the method's smallest measured fraction to 1."""
RELAX = 0.10
"""Sensitivities: each limit loosened by 10%."""
LADDER_COARSE_PER_DECADE = 4
LADDER_COARSE_SPAN = (-1.25, 0.75)
"""Decades around the size the budgets imply at a nominal MFU (``_ladder_center``)."""
LADDER_FINE_PER_DECADE = 32
LADDER_BOUNDS = (1e7, 1e13)
SYNTHETIC_VOCAB = 32000
"""Vocabulary of the synthetic models: the Llama-2 tokenizer (Touvron et al. 2023)."""
SYNTHETIC_ASPECT = 128
"""hidden / layers of the synthetic models: Llama-2-7B 4096/32, GPT-3 175B 12288/96; Kaplan et al.
2020 (sec. 3.1, Fig. 5) find loss nearly flat in the aspect ratio over a wide range."""


# ----------------------------------------------------------------------------- formulas


def synthetic_llama_config(params_n: float, vocab_size: int = SYNTHETIC_VOCAB, aspect: int = SYNTHETIC_ASPECT) -> dict:
    """An HF Llama config.json with about ``params_n`` parameters in total.

    Shape rule: per layer 4 h^2 (attention, MHA) + 3 h i with i ~ 8h/3 (SwiGLU MLP, Shazeer 2020)
    = 12 h^2, plus untied embeddings 2 V h; choose the layer count L whose width h solving
    12 L h^2 + 2 V h = N is closest to ``aspect`` x L, then snap h to a multiple of the head
    dimension (64 below 2048, else 128) and i to a multiple of 256 (Llama's rounding).
    """
    n = float(params_n)
    if not (math.isfinite(n) and n > 0):
        raise PlannerError(f"model size must be a positive number of parameters, got {params_n}")
    layers = np.arange(1, 257, dtype=np.float64)
    a, b = 12.0 * layers, 2.0 * vocab_size
    width = (-b + np.sqrt(b * b + 4.0 * a * n)) / (2.0 * a)
    best = int(np.argmin(np.abs(np.log(np.maximum(width, 1e-9) / (aspect * layers)))))
    num_layers = int(layers[best])
    head_dim = 64 if width[best] < 2048 else 128
    hidden = max(head_dim, int(round(width[best] / head_dim)) * head_dim)
    inter = max(256, int(math.ceil(8 * hidden / 3 / 256)) * 256)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": hidden // head_dim,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }


def budget_flops_per_token(params_n, work_ratio):
    """Budget FLOPs per training token: 6 N (Kaplan et al. 2020 sec. 2.1, the convention of the
    laws' C = 6 N D) times the method's work relative to full training (LoRA skips the frozen
    weights' gradients: about 2/3, as ``planner.cost.flops`` counts it)."""
    return scaling.FLOPS_PER_PARAM_TOKEN * np.asarray(params_n, dtype=np.float64) * np.asarray(work_ratio, dtype=np.float64)


def run_cost_usd(time_s, num_gpus, price_usd_per_hour: float):
    """Dollars: wall time x GPUs x price per GPU-hour."""
    return np.asarray(time_s, dtype=np.float64) * np.asarray(num_gpus, dtype=np.float64) * price_usd_per_hour / 3600.0


def grad_accum_for(global_batch_tokens: int, micro_batch, seq_len: int, data_parallel: int):
    """Micro-batches per optimizer step so that a step holds about ``global_batch_tokens`` tokens (>= 1)."""
    per_pass = np.asarray(micro_batch, dtype=np.float64) * seq_len * data_parallel
    return np.maximum(1, np.round(global_batch_tokens / per_pass)).astype(np.int64)


def predicted_loss(
    law: scaling.ScalingLaw,
    params_n,
    tokens_d,
    pool_tokens=None,
    keep_fraction=1.0,
    theta_deg=90.0,
    strategy: str = "hard",
    efficiency=1.0,
):
    """Loss of N parameters trained on D tokens with token efficiency eta (see
    ``planner.search.plan.DEFAULT_PEFT_TOKEN_EFFICIENCY``): the law at (N, eta D); with a pool of U unique
    tokens, ``planner.loss.pruning.pruned_loss`` at (N, eta D, eta U, f, theta), which is Muennighoff et
    al.'s data-constrained law when f = 1 or the metric is random (theta = 90). A law without
    repetition constants (Kaplan) is evaluated without the pool; callers keep D <= f U for it.
    """
    eta = np.asarray(efficiency, dtype=np.float64)
    d = eta * np.asarray(tokens_d, dtype=np.float64)
    if pool_tokens is None or law.repetition is None:
        return scaling.predict_loss(law, params_n, d)
    u = eta * np.asarray(pool_tokens, dtype=np.float64)
    return pruning.pruned_loss(law, params_n, d, u, keep_fraction, theta_deg, strategy)


def pareto_mask(objectives) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``objectives`` (n x k, every column minimized).

    A row is dominated when another is <= in every column and < in one. Rows with identical
    objective vectors: the first is kept. Sort by the columns lexicographically; a row can only be
    dominated by an earlier one, so each block of rows is checked against the front found so far
    and against the earlier rows of its own block (vectorized; O(n x front)).
    """
    f = np.asarray(objectives, dtype=np.float64)
    if f.ndim != 2:
        raise PlannerError("objectives must be a 2-D array (candidates x objectives)")
    n = f.shape[0]
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    order = np.lexsort(f.T[::-1])
    s = f[order]
    front = np.empty((0, f.shape[1]))
    kept = []
    block = 512
    for start in range(0, n, block):
        chunk = s[start : start + block]
        dominated = np.zeros(chunk.shape[0], dtype=bool)
        for fs in range(0, front.shape[0], 2048):
            fr = front[fs : fs + 2048]
            dominated |= np.all(fr[None, :, :] <= chunk[:, None, :], axis=2).any(axis=1)
        # an earlier row of the same block that is <= everywhere (a dominator or a duplicate); by
        # transitivity a row dominated by a non-front row is also dominated by a front row
        le = np.all(chunk[None, :, :] <= chunk[:, None, :], axis=2) & np.tri(chunk.shape[0], k=-1, dtype=bool)
        dominated |= le.any(axis=1)
        keep = start + np.flatnonzero(~dominated)
        kept.append(keep)
        front = np.vstack([front, s[keep]])
    mask[order[np.concatenate(kept)]] = True
    return mask


def allocation_gp(
    law: scaling.ScalingLaw,
    nd_caps: dict[str, float],
    tokens_cap: float | None = None,
    params_cap: float | None = None,
    efficiency: float = 1.0,
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


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelEntry:
    name: str
    spec: object
    params_n: float  # as the law counts (total or non-embedding)
    total_params: float

    @property
    def key(self) -> tuple:
        """A cheap hashable identity of the architecture (memo keys)."""
        key = self.__dict__.get("_key")
        if key is None:
            key = (self.spec.name, hash(self.spec))
            object.__setattr__(self, "_key", key)
        return key


def _entry(spec, law: scaling.ScalingLaw, name: str) -> ModelEntry:
    from planner.cost.params import count_params

    counts = count_params(spec)
    n = counts.non_embedding if law.param_count == "non_embedding" else counts.total
    return ModelEntry(name=name, spec=spec, params_n=float(n), total_params=float(counts.total))


def catalog_models(names, law) -> list[ModelEntry]:
    from planner.specs.catalog import load_spec

    return [_entry(load_spec(name), law, load_spec(name).name) for name in names]


def ladder_models(sizes, law) -> list[ModelEntry]:
    """Synthetic Llama-shaped models near each size (duplicate shapes dropped)."""
    from planner.specs.model import model_spec_from_config

    seen, out = set(), []
    for size in sizes:
        cfg = synthetic_llama_config(size)
        key = (cfg["num_hidden_layers"], cfg["hidden_size"])
        if key in seen:
            continue
        seen.add(key)
        entry = _entry(model_spec_from_config(cfg, name="x"), law, "x")
        name = f"llama-like-{_short(entry.total_params)}"
        out.append(ModelEntry(name=name, spec=entry.spec, params_n=entry.params_n, total_params=entry.total_params))
    return out


def _short(n: float) -> str:
    for unit, s in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= s:
            return f"{n / s:.3g}{unit}"
    return f"{n:.3g}"


# ----------------------------------------------------------------------------- hardware context


@dataclass(frozen=True)
class Context:
    request: PlanRequest
    law: scaling.ScalingLaw
    gpu: object
    price: float
    usable_bytes: float
    profile: object
    assumptions: tuple[str, ...]


def make_context(request: PlanRequest) -> Context:
    """The GPU, its price, the law and the calibration profile of a request.

    With a calibration profile (``planner calibrate``) the GPU defaults to the profile's device;
    step times and peak memory are the calibrated ones (``planner.cost.step_time.step_time(profile=)``,
    ``planner.cost.calibrated.calibrated_peak_bytes``) and the usable memory is the profile's measured
    context and allocator reserve (``planner.cost.calibrated.usable_allocated_bytes``)."""
    from planner.cost.step_time import price_usd_per_gpu_hour
    from planner.search.fit import usable_allocated_bytes
    from planner.specs.catalog import load_gpu

    notes = []
    law = scaling.load_law(request.law)
    profile = None
    if request.calibration:
        from planner.cost.calibrated import usable_allocated_bytes
        from planner.specs.profile import load_profile

        profile = load_profile(request.calibration)
    if request.gpu is not None:
        gpu = load_gpu(request.gpu)
        if profile is not None and not profile.matches(gpu):
            raise PlannerError(f"calibration profile {request.calibration} was measured on {profile.device.name}, not "
                               f"{gpu.name}: calibrate on {gpu.name} or leave out --gpu")
    elif profile is not None:
        gpu = profile.device_spec()
        notes.append(f"GPU: {gpu.name}, the calibration profile's device")
    else:
        gpu = load_gpu(DEFAULT_GPU)
        notes.append(f"GPU: {DEFAULT_GPU} (none given; pass --gpu)")
    price = request.price_usd_per_hour or price_usd_per_gpu_hour(gpu)
    if price is None:
        raise PlannerError(f"GPU {gpu.name} has no price in the catalog or throughput defaults; pass --price-usd-per-hour")
    if request.price_usd_per_hour is None:
        source = "catalog" if gpu.price_usd_per_hour is not None else "planner.cost.step_time default"
        notes.append(f"price: ${price}/GPU-hour for {gpu.name} ({source}, indicative; pass --price-usd-per-hour)")
    if profile is not None:
        from planner.cost.calibrated import usable_allocated_bytes
        from planner.specs.profile import load_profile

        usable = usable_allocated_bytes(profile, gpu)
        notes.append(f"calibration: {request.calibration} ({profile.device.name}, fitted: "
                     f"{', '.join(profile.corrections.fitted) or 'nothing'})")
    else:
        usable = usable_allocated_bytes(gpu)
    return Context(request, law, gpu, float(price), float(usable), profile, tuple(notes))


# ----------------------------------------------------------------------------- set-up side


_CKPT_ORDER = {"none": 0, "selective": 1, "full": 2}


def _layouts(request: PlanRequest, num_gpus: int, method: str, pretrain: bool) -> list[tuple[int, int]]:
    """(ZeRO stage, tensor parallel) pairs for a GPU count, lightest-communication first."""
    set_fields = request.model_fields_set
    zeros = request.zero if (not pretrain or "zero" in set_fields) else PRETRAIN_ZERO
    tps = request.tensor_parallel if (not pretrain or "tensor_parallel" in set_fields) else PRETRAIN_TENSOR_PARALLEL
    if num_gpus == 1:
        return [(0, 1)]
    if method != "full" and "zero" not in set_fields:
        # ZeRO-1/2 shard only the adapters' states and gradients (megabytes): stage 0 or 3 matter
        zeros = tuple(z for z in zeros if z in (0, 3)) or zeros
    out = []
    for tp in sorted(tps):
        if tp > min(num_gpus, MAX_TENSOR_PARALLEL) or num_gpus % tp:
            continue
        for z in sorted(zeros):
            out.append((z, tp))
    return out


def _dominates(a: tuple, b: tuple) -> bool:
    """Set-up a = (ckpt rank, zero, tp) is at least as fast as b at each micro-batch: same layout,
    less recompute. (No such order holds across ZeRO stages or tensor parallelism: sharding the
    optimizer step or splitting the matmuls can make a step faster.)"""
    return a[1:] == b[1:] and a[0] <= b[0]


def evaluate_setups(
    ctx: Context,
    models: list[ModelEntry],
    gpu_counts_for,
    exhaustive: bool = False,
    layouts_for=None,
) -> tuple[pd.DataFrame, dict]:
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
    from planner.cost.estimate import training_flops
    from planner.specs.setup import TrainingSetup

    req = ctx.request
    mb = np.asarray(sorted(set(req.micro_batches)), dtype=np.int64)
    seq = req.seq_len
    pretrain = req.pretrain
    columns: dict[str, list] = {k: [] for k in (
        "model", "method", "lora_rank", "precision", "optimizer", "checkpointing", "num_gpus", "zero",
        "tensor_parallel", "micro_batch", "grad_accum", "peak_bytes", "step_time_s", "tokens_per_step",
        "tokens_per_s", "mfu", "work_ratio")}
    stats = {"setups": 0, "setups_skipped": 0, "memory_calls": 0, "time_calls": 0, "lightest": None}
    for mi, entry in enumerate(models):
        spec = entry.spec
        full_flops = float(training_flops(spec, TrainingSetup(seq_len=seq), 1, seq).model)
        for method in (req.methods if not pretrain else ("full",)):
            ranks = np.asarray(sorted(set(req.lora_ranks)) if method != "full" else [0], dtype=np.int64)
            rank_arg = np.maximum(ranks, 1)[None, :]
            precision = PRECISION_FOR_METHOD[method]
            for optimizer in req.optimizers:
                base = TrainingSetup(method=method, precision=precision, optimizer=optimizer, seq_len=seq,
                                     lora_rank=int(rank_arg.max()))
                work = training_flops(spec, base, 1, seq, rank_arg).model / full_flops
                work = np.broadcast_to(np.asarray(work, dtype=np.float64), (1, ranks.size))
                # model FLOPs of one micro-batch (no recompute; the same for every layout)
                flops_mb = np.asarray(training_flops(spec, base, mb[:, None], seq, rank_arg).model, dtype=np.float64)
                peak_rate = ctx.gpu.peak_flops_for(precision)
                for g in gpu_counts_for(entry, method):
                    done: list[tuple[tuple, np.ndarray]] = []  # (key, fits over mb x rank)
                    if layouts_for is not None:
                        combos = [(_CKPT_ORDER[c], c, z, tp) for c, z, tp in layouts_for(g)]
                    else:
                        combos = [(_CKPT_ORDER[c], c, z, tp) for z, tp in _layouts(req, g, method, pretrain)
                                  for c in req.checkpointing]
                    combos.sort(key=lambda t: (t[0] + t[2] + int(math.log2(t[3])), t[0], t[2], t[3]))
                    for ck_rank, ckpt, zero, tp in combos:
                        key = (ck_rank, zero, tp)
                        stats["setups"] += 1
                        lighter = [fits for k, fits in done if _dominates(k, key)]
                        if not exhaustive and any(f.all() for f in lighter):
                            stats["setups_skipped"] += 1
                            continue
                        setup = base.model_copy(update={"checkpointing": ckpt, "num_gpus": g, "zero": zero,
                                                        "tensor_parallel": tp})
                        dp = setup.data_parallel
                        ga = grad_accum_for(req.global_batch_tokens, mb, seq, dp)[:, None]
                        peak = _peak(ctx, entry, setup, mb, seq, rank_arg, ga)
                        stats["memory_calls"] += 1
                        fits = peak <= ctx.usable_bytes
                        # rows within the memory sensitivity's 10% are kept too (filtered when reduced)
                        near = peak <= ctx.usable_bytes * (1 + RELAX)
                        _track_lightest(stats, entry, setup, peak, ranks)
                        done.append((key, fits))
                        useful = near.copy()
                        if not exhaustive:
                            for f in lighter:
                                useful &= ~f
                        if not useful.any():
                            continue
                        per_mb, per_step, calls = _memo(ctx, "time", _affine_step, entry, setup, mb[:, None], seq,
                                                        rank_arg)
                        stats["time_calls"] += calls
                        step = np.broadcast_to(ga * per_mb + per_step, peak.shape)
                        tokens_step = np.broadcast_to((mb[:, None] * seq * dp * ga).astype(np.float64), peak.shape)
                        mfu = flops_mb * ga * dp / step / (peak_rate * g)
                        sel = np.nonzero(useful if not exhaustive else near)
                        k = sel[0].size
                        columns["model"].append(np.full(k, mi))
                        columns["method"].append(np.full(k, method, dtype=object))
                        columns["lora_rank"].append(ranks[sel[1]])
                        columns["precision"].append(np.full(k, precision, dtype=object))
                        columns["optimizer"].append(np.full(k, optimizer, dtype=object))
                        columns["checkpointing"].append(np.full(k, ckpt, dtype=object))
                        columns["num_gpus"].append(np.full(k, g))
                        columns["zero"].append(np.full(k, zero))
                        columns["tensor_parallel"].append(np.full(k, tp))
                        columns["micro_batch"].append(mb[sel[0]])
                        columns["grad_accum"].append(np.broadcast_to(ga, peak.shape)[sel])
                        columns["peak_bytes"].append(peak[sel])
                        columns["step_time_s"].append(step[sel])
                        columns["tokens_per_step"].append(tokens_step[sel])
                        columns["tokens_per_s"].append((tokens_step / step)[sel])
                        columns["mfu"].append(np.broadcast_to(mfu, peak.shape)[sel])
                        columns["work_ratio"].append(np.broadcast_to(work, peak.shape)[sel])
    if columns["model"]:
        table = pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})
    else:
        table = pd.DataFrame({k: [] for k in columns})
    return table, stats


_MEMO: dict = {}
_MEMO_MAX = 50_000


def _memo(ctx, kind: str, fn, entry, setup, mb, seq, rank_arg):
    """Memoize the set-up side's calls (memory, step time) across plans in one process: compare,
    the sensitivities and the notebooks ask for the same set-ups again. Keys: the architecture,
    the set-up, the GPU, the calibration profile and the arrays' contents."""
    key = (kind, entry.key, setup, ctx.gpu.name, id(ctx.profile) if ctx.profile is not None else None,
           mb.tobytes(), mb.shape, seq, rank_arg.tobytes(), rank_arg.shape)
    hit = _MEMO.get(key)
    if hit is None:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        hit = fn(ctx, entry.spec, setup, mb, seq, rank_arg)
        _MEMO[key] = hit
    return hit


def _memory_peak(ctx, spec, setup, mb, seq, rank_arg):
    """Peak allocated bytes per GPU: ``planner.cost.memory``, or calibrated by the profile."""
    from planner.cost.memory import training_memory

    if ctx.profile is None:
        return np.asarray(training_memory(spec, setup, mb, seq, rank_arg).peak_bytes, dtype=np.float64)
    from planner.cost.calibrated import calibrated_peak_bytes

    return np.asarray(calibrated_peak_bytes(ctx.profile, spec, setup, mb, seq, rank_arg), dtype=np.float64)


def _peak(ctx, entry, setup, mb, seq, rank_arg, ga):
    """Peak bytes over (micro-batch x rank), with the accumulation each micro-batch implies
    (gradients live through forward when ga > 1)."""
    shape = (mb.size, rank_arg.shape[1])
    single = (ga == 1)[:, 0]
    peak = np.empty(shape)
    for accumulate, rows in ((2, ~single), (1, single)):
        if rows.any():
            value = _memo(ctx, "memory", _memory_peak, entry, setup.model_copy(update={"grad_accum": accumulate}),
                          mb[:, None], seq, rank_arg)
            peak[rows] = np.broadcast_to(value, shape)[rows]
    return peak


def _affine_step(ctx, spec, setup, mb, seq, rank_arg):
    """(seconds per micro-batch, seconds per step) of ``setup`` from ``planner.cost.step_time.step_time``
    at ga = 1 and ga = 2: a step of ga micro-batches takes ga x the first + the second. Exact when
    step_time is affine in ga (its terms are per micro-batch or per step); the tests bound the
    error elsewhere (the exposed part of a cross-node DDP / ZeRO-1 all-reduce). Returns the two
    arrays and the number of calls."""
    from planner.cost.step_time import step_time

    one = np.asarray(step_time(spec, setup.model_copy(update={"grad_accum": 1}), ctx.gpu, mb, seq, rank_arg,
                               ctx.profile)["step_time_s"], dtype=np.float64)
    two = np.asarray(step_time(spec, setup.model_copy(update={"grad_accum": 2}), ctx.gpu, mb, seq, rank_arg,
                               ctx.profile)["step_time_s"], dtype=np.float64)
    return two - one, 2.0 * one - two, 2


def _track_lightest(stats, entry, setup, peak, ranks):
    i = np.unravel_index(int(np.argmin(peak)), peak.shape)
    value = float(peak[i])
    if stats["lightest"] is None or value < stats["lightest"][0]:
        stats["lightest"] = (value, entry.name, setup, int(ranks[i[1]]))


# ----------------------------------------------------------------------------- data side


@dataclass(frozen=True)
class DataChoices:
    selection: np.ndarray  # method name per choice
    keep_fraction: np.ndarray
    theta_deg: np.ndarray
    strategy: np.ndarray  # "hard" | "easy"
    scoring_flops: np.ndarray

    @property
    def size(self) -> int:
        return int(self.keep_fraction.size)


def data_choices(request: PlanRequest, law: scaling.ScalingLaw) -> tuple[DataChoices, list[str]]:
    """Selection method x kept fraction x strategy.

    "all" trains on the whole pool (or, without a pool, on unlimited fresh data); "random" keeps a
    random fraction (only fractions the request gives: a random subset only loses data); a catalog
    method (``planner.loss.pruning``) keeps log-spaced fractions from its smallest measured one, each with
    the hard and the easy examples, and pays its scoring FLOPs.
    """
    notes: list[str] = []
    pool = request.data_pool_tokens
    names = request.selection
    if pool is None:
        if names is not None and any(n != "all" for n in names):
            raise PlannerError("data selection needs a pool: give --data-pool TOKENS")
        names = ("all",)
    elif law.repetition is None:
        if names is not None and any(n not in ("all", "random") for n in names):
            raise PlannerError(f"law {law.name} has no repetition constants, so no data-selection model; "
                               "drop --selection or use a Chinchilla-form law that has them (besiroglu2024)")
        names = names or ("all",)
        notes.append(f"{law.name} has no repetition term: tokens are capped at the kept data (one epoch)")
    elif names is None:
        names = ("all",) + tuple(m for m in pruning.list_methods()
                                 if m != "random" and pruning.load_method(m).min_keep_fraction is not None)
    rows = []
    for name in names:
        if name == "all":
            rows.append(("all", 1.0, 90.0, "hard", 0.0))
            continue
        method = pruning.load_method(name)
        theta = method.metric_angle_deg
        score = float(pruning.scoring_flops(method, pool))
        if request.keep_fractions is not None:
            fractions = np.asarray(request.keep_fractions, dtype=np.float64)
        elif theta >= 90.0:
            fractions = np.array([1.0])
        elif method.min_keep_fraction is None:
            raise PlannerError(f"selection {name} needs the pool's non-duplicate share: give keep fractions (--keep)")
        else:
            fractions = np.geomspace(method.min_keep_fraction, 1.0, KEEP_GRID)[:-1]
        for f in fractions:
            for strategy in (request.strategies if theta < 90.0 else ("hard",)):
                rows.append((name, float(f), float(theta), strategy, score))
    if not rows:
        raise PlannerError("no data choice left: check --selection and the keep fractions")
    sel, f, theta, strat, score = (np.asarray(x) for x in zip(*rows, strict=True))
    return DataChoices(sel.astype(object), f.astype(np.float64), theta.astype(np.float64), strat.astype(object),
                       score.astype(np.float64)), notes


# ----------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Limits:
    compute_flops: float | None
    budget_usd: float | None
    gpu_hours: float | None
    deadline_s: float | None
    usable_bytes: float

    def scaled(self, name: str, factor: float) -> Limits:
        values = dict(self.__dict__)
        values[name] = values[name] * factor
        return Limits(**values)


def limits_of(ctx: Context) -> Limits:
    r = ctx.request
    return Limits(r.compute_flops, r.budget_usd, r.gpu_hours, r.deadline_s, ctx.usable_bytes)


def reduce_setups(table: pd.DataFrame, usable_bytes: float) -> pd.DataFrame:
    """The fastest fitting set-up of each (model, method, GPU count, tokens per step): the only
    ones that can be on the front (equal loss for equal tokens, time and cost proportional to
    seconds per token, and at least as many tokens affordable)."""
    fit = table[table["peak_bytes"] <= usable_bytes]
    if fit.empty:
        return fit
    idx = fit.groupby(["model", "method", "num_gpus", "tokens_per_step"], sort=False)["tokens_per_s"].idxmax()
    return fit.loc[idx.to_numpy()].reset_index(drop=True)


def token_lattice(d_top: float, count: int) -> np.ndarray:
    """Token counts on the absolute lattice 2^(k/2) from ``d_top`` / 2^(count/2) up to ``d_top``.

    The lattice is absolute (shared by every set-up) so that the fastest set-up of a group offers
    every token count a slower one does: that is what makes keeping only the fastest exact."""
    if not (math.isfinite(d_top) and d_top > 0):
        return np.empty(0)
    k_hi = math.floor(2.0 * math.log2(d_top) + 1e-9)
    return 2.0 ** (np.arange(k_hi - count + 1, k_hi + 1) / 2.0)


def score_candidates(ctx: Context, models: list[ModelEntry], rows: pd.DataFrame, data: DataChoices,
                     limits: Limits, only_max: bool = False) -> dict[str, np.ndarray]:
    """Every (set-up row x data choice x token count): tokens, loss, time, cost, FLOPs, feasibility.

    Token counts: the most the limits allow for that set-up and data (D_max), and the lattice
    points (``token_lattice``) below it down to 1/2^(token_grid/2) of the largest D_max; or the
    tokens the request fixes. Every array is flat, row-major over (row, choice, token count).
    """
    req = ctx.request
    law = ctx.law
    R, J = len(rows), data.size
    params = np.array([models[i].params_n for i in rows["model"].to_numpy()])[:, None]
    g = rows["num_gpus"].to_numpy(dtype=np.float64)[:, None]
    tps = rows["tokens_per_s"].to_numpy(dtype=np.float64)[:, None]
    mfu = rows["mfu"].to_numpy(dtype=np.float64)[:, None]
    peak_rate = np.array([ctx.gpu.peak_flops_for(p) for p in rows["precision"]])[:, None]
    fpt = budget_flops_per_token(params, rows["work_ratio"].to_numpy(dtype=np.float64)[:, None])
    eta = np.array([req.peft_efficiency[m] for m in rows["method"]])[:, None]
    score = data.scoring_flops[None, :]
    scoring_time = score / (mfu * peak_rate * g)
    pool = req.data_pool_tokens
    f = data.keep_fraction[None, :]
    caps = []
    if limits.compute_flops is not None:
        caps.append((limits.compute_flops - score) / fpt)
    seconds = []
    if limits.budget_usd is not None:
        seconds.append(limits.budget_usd / (g * ctx.price / 3600.0))
    if limits.gpu_hours is not None:
        seconds.append(limits.gpu_hours * 3600.0 / g)
    if limits.deadline_s is not None:
        seconds.append(np.full_like(g, limits.deadline_s))
    if seconds:
        caps.append((np.minimum.reduce(seconds) - scoring_time) * tps)
    if pool is not None:
        if req.max_epochs is not None:
            caps.append(req.max_epochs * f * pool + 0 * params)
        elif not req.repeat or law.repetition is None:
            caps.append(f * pool + 0 * params)
    fixed = None
    if req.tokens is not None:
        fixed = np.full((R, J), req.tokens)
    elif req.epochs is not None:
        fixed = req.epochs * f * pool + 0 * params
    if not caps and fixed is None:
        raise PlannerError(
            "nothing limits the training tokens: give --compute, --budget-usd, --gpu-hours, --deadline-hours, "
            "or a --data-pool with --max-epochs (or fix --tokens)"
        )
    d_max = np.minimum.reduce(caps) if caps else np.full((R, J), np.inf)
    d_max = np.broadcast_to(d_max, (R, J))
    if fixed is not None:
        tokens = np.broadcast_to(fixed, (R, J))[:, :, None]
    elif only_max:
        tokens = d_max[:, :, None]
    else:
        finite = d_max[np.isfinite(d_max) & (d_max > 0)]
        lattice = token_lattice(float(finite.max()) if finite.size else math.nan, req.token_grid)
        tokens = np.concatenate([np.broadcast_to(lattice, (R, J, lattice.size)), d_max[:, :, None]], axis=2)
    K = tokens.shape[2]
    tokens_per_step = rows["tokens_per_step"].to_numpy(dtype=np.float64)[:, None, None]
    feasible = (tokens >= tokens_per_step) & (tokens <= d_max[:, :, None] * (1 + 1e-9)) & np.isfinite(tokens)
    safe_tokens = np.where(np.isfinite(tokens) & (tokens > 0), tokens, 1.0)
    shape = (R, J, K)
    loss = np.empty(shape)
    for strategy in ("hard", "easy"):
        cols = data.strategy == strategy
        if not cols.any():
            continue
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            loss[:, cols, :] = predicted_loss(
                law, params[:, :, None], safe_tokens[:, cols, :], pool,
                data.keep_fraction[None, cols, None], data.theta_deg[None, cols, None], strategy, eta[:, :, None])
    time_s = safe_tokens / tps[:, :, None] + scoring_time[:, :, None]
    cost = run_cost_usd(time_s, g[:, :, None], ctx.price)
    flops = safe_tokens * fpt[:, :, None] + score[:, :, None]
    feasible &= np.isfinite(loss)
    out = {
        "row": np.broadcast_to(np.arange(R)[:, None, None], shape),
        "choice": np.broadcast_to(np.arange(J)[None, :, None], shape),
        "tokens": np.broadcast_to(safe_tokens, shape),
        "loss": loss,
        "time_s": np.broadcast_to(time_s, shape),
        "cost_usd": np.broadcast_to(cost, shape),
        "compute_flops": np.broadcast_to(flops, shape),
        "feasible": np.broadcast_to(feasible, shape),
    }
    return {k: np.ascontiguousarray(v).reshape(-1) for k, v in out.items()}


def grouped_front(scored: dict[str, np.ndarray], rows: pd.DataFrame) -> np.ndarray:
    """Indices (into ``scored``) of the Pareto front over (loss, cost, time) of the feasible candidates.

    Within one GPU count cost is proportional to time, so a 2-D (loss, cost) front per count
    (sort, running minimum) leaves few points; the 3-D front of their union is exact.
    """
    feasible = np.flatnonzero(scored["feasible"])
    if feasible.size == 0:
        return feasible
    g = rows["num_gpus"].to_numpy()[scored["row"][feasible]]
    keep = []
    for count in np.unique(g):
        idx = feasible[g == count]
        order = idx[np.lexsort((scored["time_s"][idx], scored["cost_usd"][idx], scored["loss"][idx]))]
        cost = scored["cost_usd"][order]
        prior = np.minimum.accumulate(np.concatenate([[np.inf], cost[:-1]]))
        keep.append(order[cost < prior])
    cand = np.concatenate(keep)
    objectives = np.column_stack([scored["loss"][cand], scored["cost_usd"][cand], scored["time_s"][cand]])
    return cand[pareto_mask(objectives)]


def choose(scored: dict[str, np.ndarray], objective: str, target_loss: float | None, tolerance: float) -> int | None:
    """The recommended candidate: least loss (ties: cost, time); or the cheapest / fastest reaching
    the target loss (default: the best feasible loss + ``tolerance``)."""
    idx = np.flatnonzero(scored["feasible"])
    if idx.size == 0:
        return None
    loss, cost, t = scored["loss"][idx], scored["cost_usd"][idx], scored["time_s"][idx]
    if objective == "loss":
        return int(idx[np.lexsort((t, cost, loss))[0]])
    target = target_loss if target_loss is not None else float(loss.min()) + tolerance
    ok = loss <= target
    if not ok.any():
        return None
    first, second = (cost, t) if objective == "cost" else (t, cost)
    sub = np.flatnonzero(ok)
    return int(idx[sub[np.lexsort((loss[sub], second[sub], first[sub]))[0]]])


# ----------------------------------------------------------------------------- the plan


def _gpu_counts(ctx: Context, pretrain: bool):
    req = ctx.request
    if req.gpu_counts is not None:
        counts = tuple(sorted(set(req.gpu_counts)))
        if req.num_gpus is not None and max(counts) > req.num_gpus:
            raise PlannerError(f"gpu_counts {counts} exceed the {req.num_gpus} GPUs available")
        return lambda entry, method: counts
    if req.num_gpus is not None:
        counts = (req.num_gpus,)
        return lambda entry, method: counts
    if not pretrain:
        counts = tuple(2**k for k in range(int(math.log2(FINETUNE_MAX_GPUS)) + 1))
        return lambda entry, method: counts

    def pretrain_counts(entry, method):
        # the weights, gradients and AdamW states alone (16 bytes per parameter, Rajbhandari et al.
        # 2020) fully sharded: fewer GPUs than this cannot fit
        need = 16.0 * entry.total_params / ctx.usable_bytes
        fitting = [c for c in PRETRAIN_GPU_COUNTS if c >= need]
        return tuple(fitting[:PRETRAIN_GPU_OPTIONS])

    return pretrain_counts


def _nd_caps_nominal(ctx: Context) -> dict[str, float]:
    """Budgets as caps on N x D at a nominal MFU (only to centre the size ladder)."""
    req = ctx.request
    rate = NOMINAL_MFU * ctx.gpu.peak_flops_for("bf16")
    g_max = req.num_gpus or PRETRAIN_GPU_COUNTS[-1]
    caps = {}
    if req.compute_flops is not None:
        caps["compute"] = req.compute_flops / 6.0
    if req.budget_usd is not None:
        caps["budget_usd"] = req.budget_usd / (ctx.price / 3600.0) * rate / 6.0
    if req.gpu_hours is not None:
        caps["gpu_hours"] = req.gpu_hours * 3600.0 * rate / 6.0
    if req.deadline_s is not None:
        caps["deadline"] = req.deadline_s * g_max * rate / 6.0
    return caps


def _ladder_center(ctx: Context) -> float:
    caps = _nd_caps_nominal(ctx)
    if not caps:
        raise PlannerError(
            "pre-training with no compute, dollar, GPU-hour or deadline limit: the law always prefers a larger "
            "model and more tokens; give --compute, --budget-usd, --gpu-hours or --deadline-hours (or --model to fine-tune)"
        )
    c = 6.0 * min(caps.values())
    req = ctx.request
    alloc = scaling.compute_optimal(ctx.law, c, req.data_pool_tokens,
                                    repeat=req.repeat and ctx.law.repetition is not None)
    return alloc.params_n


@dataclass
class SearchState:
    models: list[ModelEntry]
    table: pd.DataFrame
    stats: dict


def search_setups(ctx: Context, exhaustive: bool = False) -> SearchState:
    """Evaluate the set-up side for every model (fine-tuning) or a coarse-then-fine size ladder."""
    req = ctx.request
    counts = _gpu_counts(ctx, req.pretrain)
    if not req.pretrain:
        models = catalog_models(req.models, ctx.law)
        table, stats = evaluate_setups(ctx, models, counts, exhaustive)
        return SearchState(models, table, stats)
    center = _ladder_center(ctx)
    lo, hi = LADDER_COARSE_SPAN
    sizes = center * 10.0 ** np.arange(lo, hi + 1e-9, 1.0 / LADDER_COARSE_PER_DECADE)
    sizes = np.clip(sizes, *LADDER_BOUNDS)
    models = ladder_models(sizes, ctx.law)
    table, stats = evaluate_setups(ctx, models, counts, exhaustive)
    reduced = reduce_setups(table, ctx.usable_bytes)
    if not reduced.empty:
        data, _ = data_choices(req, ctx.law)
        scored = score_candidates(ctx, models, reduced, data, limits_of(ctx), only_max=True)
        best = choose(scored, "loss", None, 0.0)
        if best is not None:
            n_best = models[int(reduced["model"].iloc[scored["row"][best]])].total_params
            step = 1.0 / LADDER_COARSE_PER_DECADE
            fine = n_best * 10.0 ** np.arange(-step, step + 1e-9, 1.0 / LADDER_FINE_PER_DECADE)
            fine = np.clip(fine, *LADDER_BOUNDS)
            have = {(m.spec.num_layers, m.spec.hidden_size) for m in models}
            extra = [m for m in ladder_models(fine, ctx.law) if (m.spec.num_layers, m.spec.hidden_size) not in have]
            # the fine sizes reuse the layouts that won for the coarse sizes around the best one
            near = [i for i, m in enumerate(models) if abs(math.log10(m.total_params / n_best)) <= step * 1.01]
            won = reduced[reduced["model"].isin(near)]
            layouts = {(int(r.num_gpus), r.checkpointing, int(r.zero), int(r.tensor_parallel)) for r in won.itertuples()}
            counts_won = tuple(sorted({g for g, *_ in layouts}))
            if extra and layouts:
                t2, s2 = evaluate_setups(ctx, extra, lambda entry, method: counts_won, exhaustive,
                                         lambda g: sorted({(c, z, t) for gg, c, z, t in layouts if gg == g}))
                t2["model"] += len(models)
                table = pd.concat([table, t2], ignore_index=True)
                for k in ("setups", "setups_skipped", "memory_calls", "time_calls"):
                    stats[k] += s2[k]
                if s2["lightest"] is not None and (stats["lightest"] is None or s2["lightest"][0] < stats["lightest"][0]):
                    stats["lightest"] = s2["lightest"]
                models = models + extra
    return SearchState(models, table, stats)


def evaluate_candidates(request: PlanRequest, exhaustive: bool = True) -> pd.DataFrame:
    """Every candidate as one flat table (no reduction): set-up rows x data choices x token fractions,
    with loss, cost, time, FLOPs and feasibility. For tests and benchmarks; ``make_plan`` reduces first."""
    ctx = make_context(request)
    state = search_setups(ctx, exhaustive=exhaustive)
    data, _ = data_choices(request, ctx.law)
    table = state.table[state.table["peak_bytes"] <= ctx.usable_bytes].reset_index(drop=True)
    if table.empty:
        return pd.DataFrame()
    scored = score_candidates(ctx, state.models, table, data, limits_of(ctx))
    frame = table.iloc[scored["row"]].reset_index(drop=True)
    frame["model_name"] = [state.models[i].name for i in frame["model"]]
    frame["params"] = [state.models[i].params_n for i in frame["model"]]
    for key in ("tokens", "loss", "time_s", "cost_usd", "compute_flops", "feasible"):
        frame[key] = scored[key]
    frame["selection"] = data.selection[scored["choice"]]
    frame["keep_fraction"] = data.keep_fraction[scored["choice"]]
    frame["strategy"] = data.strategy[scored["choice"]]
    return frame


def make_plan(request: PlanRequest, exhaustive: bool = False) -> Plan:
    """The recommended run, the Pareto front, the binding constraints, the stopping threshold."""
    start = time.perf_counter()
    ctx = make_context(request)
    req = ctx.request
    assumptions = list(ctx.assumptions)
    data, notes = data_choices(req, ctx.law)  # bad data requests fail before the search
    assumptions += notes
    state = search_setups(ctx, exhaustive=exhaustive)
    limits = limits_of(ctx)
    rows = reduce_setups(state.table, ctx.usable_bytes)
    if rows.empty:
        raise PlannerError(_memory_shortfall(ctx, state))
    scored = score_candidates(ctx, state.models, rows, data, limits)
    best = choose(scored, req.objective, req.target_loss, req.loss_tolerance)
    if best is None:
        raise PlannerError(_budget_shortfall(ctx, state, rows, data, scored))
    front = grouped_front(scored, rows)
    front = front[np.argsort(scored["cost_usd"][front], kind="stable")]
    rec = _candidate(ctx, state, rows, data, scored, best)
    pareto = [_candidate(ctx, state, rows, data, scored, int(i)) for i in front]
    constraints = _constraints(ctx, state, data, limits, rec)
    stopping = _stopping(ctx, state, data, limits, rec)
    continuous = _continuous(ctx, state, data, rows, scored, best, rec) if req.pretrain else None
    assumptions += _standing_assumptions(ctx)
    n_full = int((state.table["peak_bytes"] <= ctx.usable_bytes).sum()) * data.size * (1 if req.tokens or req.epochs else req.token_grid + 1)
    stats = SearchStats(
        setups_evaluated=int(state.stats["setups"] - state.stats["setups_skipped"]),
        rows_feasible=int((state.table["peak_bytes"] <= ctx.usable_bytes).sum()),
        candidates=n_full,
        candidates_scored=int(scored["loss"].size),
        wall_s=time.perf_counter() - start,
    )
    return Plan(
        request=req,
        mode="pretrain" if req.pretrain else "finetune",
        gpu=ctx.gpu.name,
        price_usd_per_hour=ctx.price,
        law=ctx.law.name,
        recommended=rec,
        pareto=pareto,
        constraints=constraints,
        stopping=stopping,
        continuous=continuous,
        assumptions=assumptions,
        search=stats,
    )


def _standing_assumptions(ctx: Context) -> list[str]:
    req = ctx.request
    out = [f"loss: {ctx.law.name} law ({ctx.law.citation.split(',')[0]}); budget FLOPs counted as 6 N D"]
    if not req.pretrain and any(m != "full" for m in req.methods):
        eff = ", ".join(f"{m} {req.peft_efficiency[m]:g}" for m in req.methods if m != "full")
        out.append(f"PEFT token efficiency (assumed, see planner.search.plan.DEFAULT_PEFT_TOKEN_EFFICIENCY): {eff}")
    if req.gpu_counts is not None:
        out.append(f"GPU counts tried: {', '.join(map(str, req.gpu_counts))}")
    elif req.num_gpus is None:
        out.append("GPU count free: " + ("powers of 2 up to 8 (one node)" if not req.pretrain else "powers of 4 up to 4096"))
    else:
        out.append(f"GPU count: all {req.num_gpus} (--gpu-counts to try fewer)")
    out.append(f"global batch about {req.global_batch_tokens} tokens (gradient accumulation fills it)")
    return out


def _candidate(ctx, state, rows, data, scored, i: int) -> Candidate:
    row = rows.iloc[int(scored["row"][i])]
    j = int(scored["choice"][i])
    entry = state.models[int(row["model"])]
    tokens = float(scored["tokens"][i])
    pool = ctx.request.data_pool_tokens
    f = float(data.keep_fraction[j])
    unique = None if pool is None else min(tokens, f * pool)
    tps = float(row["tokens_per_step"])
    return Candidate(
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
    )


# ----------------------------------------------------------------------------- constraints


_UNITS = {"compute_flops": "FLOP", "budget_usd": "USD", "gpu_hours": "GPU-hour", "deadline_s": "s", "usable_bytes": "bytes"}
CONSTRAINT_NAMES = {"compute_flops": "compute", "budget_usd": "dollars", "gpu_hours": "gpu_hours",
                    "deadline_s": "deadline", "usable_bytes": "memory_per_gpu", "data_pool_tokens": "data_pool"}


def _best_value(ctx, state, data, limits: Limits, objective: str) -> float | None:
    rows = reduce_setups(state.table, limits.usable_bytes)
    if rows.empty:
        return None
    scored = score_candidates(ctx, state.models, rows, data, limits)
    i = choose(scored, objective, ctx.request.target_loss, ctx.request.loss_tolerance)
    if i is None:
        return None
    return float(scored[{"loss": "loss", "cost": "cost_usd", "time": "time_s"}[objective]][i])


def _constraints(ctx, state, data, limits: Limits, rec: Candidate) -> list[ConstraintReport]:
    req = ctx.request
    objective = req.objective
    now = _best_value(ctx, state, data, limits, objective)
    used = {
        "compute_flops": rec.compute_flops,
        "budget_usd": rec.cost_usd,
        "gpu_hours": rec.gpu_hours,
        "deadline_s": rec.time_s,
        "usable_bytes": rec.peak_bytes,
    }
    out = []
    for name in ("compute_flops", "budget_usd", "gpu_hours", "deadline_s", "usable_bytes"):
        limit = getattr(limits, name)
        if limit is None:
            continue
        relaxed = _best_value(ctx, state, data, limits.scaled(name, 1 + RELAX), objective)
        change = None if (relaxed is None or now is None) else relaxed - now
        ratio = used[name] / limit
        binding = ratio >= 1 - 1e-6 if name != "usable_bytes" else (change is not None and change < -1e-12)
        out.append(ConstraintReport(name=CONSTRAINT_NAMES[name], limit=limit, used=used[name], unit=_UNITS[name], binding=bool(binding),
                                    slack_fraction=1 - ratio, loss_change_if_relaxed=change))
    if req.data_pool_tokens is not None:
        unique = rec.unique_tokens or 0.0
        out.append(ConstraintReport(name="data_pool", limit=req.data_pool_tokens, used=unique, unit="tokens",
                                    binding=bool(rec.tokens >= rec.keep_fraction * req.data_pool_tokens * (1 - 1e-9)),
                                    slack_fraction=1 - unique / req.data_pool_tokens, loss_change_if_relaxed=None))
    return out


# ----------------------------------------------------------------------------- stopping


def _stopping(ctx, state, data, limits: Limits, rec: Candidate) -> Stopping:
    """The expected loss curve of the recommended run and where to stop it.

    lambda is the shadow price of the binding budget: -dL*/d(limit), the loss the best plan gains
    per unit of budget (a 1% finite difference over the same search). The run should stop where
    its own marginal gain per unit of that budget, -dL/dstep / cost_per_step, falls below lambda
    (``planner.loss.stopping``'s rule). At a compute-optimal allocation the two agree at the planned end.
    """
    steps = max(rec.steps, 1)
    t = np.unique(np.concatenate([np.geomspace(max(1.0, steps / 1000.0), steps, 200).round(), [steps]]))
    tokens = t * rec.global_batch_tokens
    pool = ctx.request.data_pool_tokens
    entry = next(m for m in state.models if m.name == rec.model)
    j = _choice_index(data, rec)
    loss = predicted_loss(ctx.law, entry.params_n, tokens, pool, data.keep_fraction[j], data.theta_deg[j],
                          str(data.strategy[j]), ctx.request.peft_efficiency[rec.method])
    per_step = {
        "compute_flops": rec.compute_flops / rec.tokens * rec.global_batch_tokens,
        "budget_usd": rec.cost_usd / rec.tokens * rec.global_batch_tokens,
        "gpu_hours": rec.gpu_hours / rec.tokens * rec.global_batch_tokens,
        "deadline_s": rec.step_time_s,
    }
    used = {"compute_flops": rec.compute_flops, "budget_usd": rec.cost_usd, "gpu_hours": rec.gpu_hours,
            "deadline_s": rec.time_s}
    binding = None
    for name in ("compute_flops", "budget_usd", "gpu_hours", "deadline_s"):
        limit = getattr(limits, name)
        if limit is not None and used[name] >= limit * (1 - 1e-6):
            binding = name
            break
    threshold = None
    stop = steps
    note = "no budget binds: the run ends at the planned tokens"
    if binding is not None:
        now = _best_value(ctx, state, data, limits, "loss")
        up = _best_value(ctx, state, data, limits.scaled(binding, 1.01), "loss")
        limit = getattr(limits, binding)
        if now is not None and up is not None and up < now:
            threshold = (now - up) / (0.01 * limit)
            slope = -np.gradient(loss, t) / per_step[binding]
            below = np.flatnonzero((slope < threshold) & (t >= 1))
            stop = int(t[below[0]]) if below.size else steps
            stop = min(stop, steps)
            note = (f"stop when the run's loss gain per {_UNITS[binding]} falls below lambda, what one more "
                    f"{_UNITS[binding]} of {CONSTRAINT_NAMES[binding]} buys the best plan")
    loss_at_stop = float(np.interp(stop, t, loss))
    return Stopping(threshold=threshold, threshold_unit=f"loss per {_UNITS[binding]}" if binding else "-",
                    cost_per_step=per_step[binding] if binding else None, planned_steps=steps, stop_step=int(stop),
                    loss_at_stop=loss_at_stop, curve_step=t.tolist(), curve_loss=np.asarray(loss).tolist(), note=note)


def _choice_index(data: DataChoices, c: Candidate) -> int:
    for j in range(data.size):
        if (data.selection[j] == c.selection and abs(data.keep_fraction[j] - c.keep_fraction) < 1e-12
                and (data.strategy[j] == c.strategy or (c.strategy == "none" and data.theta_deg[j] >= 90))):
            return j
    raise PlannerError("internal: the recommended data choice is not in the grid")


# ----------------------------------------------------------------------------- continuous check


def _continuous(ctx, state, data, rows, scored, best: int, rec: Candidate) -> ContinuousCheck | None:
    """Geometric program over (N, D) with the budgets as caps on N D at the recommended set-up's
    measured cost per model FLOP, the pool (no repetition) and the largest model that fits."""
    law = ctx.law
    req = ctx.request
    if law.form != "chinchilla":
        return None
    model_flops = scaling.FLOPS_PER_PARAM_TOKEN * rec.params * rec.tokens
    train_time = rec.time_s - (rec.scoring_flops / (rec.mfu * ctx.gpu.peak_flops_for(rec.precision) * rec.num_gpus))
    s_per_flop = train_time / model_flops
    caps = {}
    if req.compute_flops is not None:
        caps["compute_flops"] = req.compute_flops / scaling.FLOPS_PER_PARAM_TOKEN
    if req.budget_usd is not None:
        caps["budget_usd"] = req.budget_usd / (rec.num_gpus * ctx.price / 3600.0) / s_per_flop / 6.0
    if req.gpu_hours is not None:
        caps["gpu_hours"] = req.gpu_hours * 3600.0 / rec.num_gpus / s_per_flop / 6.0
    if req.deadline_s is not None:
        caps["deadline_s"] = req.deadline_s / s_per_flop / 6.0
    if not caps:
        return None
    notes = ["budgets as caps on N x D at the recommended set-up's measured seconds per model FLOP"]
    tokens_cap = req.data_pool_tokens
    if tokens_cap is not None and req.repeat and law.repetition is not None:
        notes.append("repetition allowed: the program solves the no-repetition case (D <= pool); the grid may repeat")
    fits = reduce_setups(state.table, ctx.usable_bytes)
    largest = max(state.models[int(i)].params_n for i in fits["model"].unique())
    params_cap = None
    if len(fits["model"].unique()) < len(state.models) and largest >= rec.params * (1 - 1e-9):
        params_cap = largest
    if rec.selection not in ("all", "random") or rec.keep_fraction < 1:
        notes.append("the grid prunes the data; the program does not model selection")
    sol = allocation_gp(law, caps, tokens_cap, params_cap)
    return ContinuousCheck(
        params=sol["params_n"], tokens=sol["tokens_d"], loss=sol["loss"], duals=sol["duals"], binding=sol["binding"],
        grid_params=rec.params, grid_tokens=rec.tokens, grid_loss=rec.loss,
        params_rel_diff=rec.params / sol["params_n"] - 1, tokens_rel_diff=rec.tokens / sol["tokens_d"] - 1,
        loss_rel_diff=rec.loss / sol["loss"] - 1, note="; ".join(notes),
    )


# ----------------------------------------------------------------------------- infeasible


def _memory_shortfall(ctx: Context, state: SearchState) -> str:
    from planner.search.fit import cheapest_fixes
    from planner.units import fmt_bytes

    lightest = state.stats["lightest"]
    if lightest is None:
        return "no set-up was evaluated: check the search axes (methods, GPU counts, layouts)"
    peak, name, setup, _ = lightest
    entry = next(m for m in state.models if m.name == name)
    short = peak - ctx.usable_bytes
    fixes = cheapest_fixes(entry.spec, ctx.gpu, setup.model_copy(update={"micro_batch": 1}), ctx.request.seq_len,
                           ctx.usable_bytes, max(ctx.request.seq_len, 4096))
    fix_text = "; ".join(f["fix"] for f in fixes) if fixes else "a GPU with more memory"
    return (f"nothing fits in memory: the lightest set-up ({name}, {setup.method}, checkpointing {setup.checkpointing}, "
            f"{setup.num_gpus} GPU(s) ZeRO-{setup.zero} TP {setup.tensor_parallel}, micro-batch 1) needs "
            f"{fmt_bytes(peak)} per GPU, {fmt_bytes(short)} more than the {fmt_bytes(ctx.usable_bytes)} usable on "
            f"{ctx.gpu.name}; relax: {fix_text}")


def _budget_shortfall(ctx: Context, state: SearchState, rows, data, scored) -> str:
    from planner.units import fmt_count, fmt_flops, fmt_seconds, fmt_usd

    req = ctx.request
    if req.objective != "loss" and req.target_loss is not None and scored["feasible"].any():
        best = float(scored["loss"][scored["feasible"]].min())
        return (f"the target loss {req.target_loss:g} is out of reach: the best feasible plan predicts {best:.4f} "
                f"({best - req.target_loss:.4f} above); relax a budget or raise --target-loss")
    # the cheapest possible run: one optimizer step of the fastest set-up
    tps = rows["tokens_per_step"].to_numpy(dtype=np.float64)
    i = int(np.argmin(rows["step_time_s"].to_numpy() * rows["num_gpus"].to_numpy()))
    step_s = float(rows["step_time_s"].iloc[i])
    g = int(rows["num_gpus"].iloc[i])
    flops_step = float(budget_flops_per_token(state.models[int(rows["model"].iloc[i])].params_n,
                                              rows["work_ratio"].iloc[i])) * float(tps[i])
    parts = []
    if req.compute_flops is not None and req.compute_flops < flops_step:
        parts.append(f"--compute {fmt_flops(req.compute_flops)} is short by {fmt_flops(flops_step - req.compute_flops)} "
                     f"of one optimizer step ({fmt_count(tps[i])} tokens)")
    cost_step = step_s * g * ctx.price / 3600
    if req.budget_usd is not None and req.budget_usd < cost_step:
        parts.append(f"--budget-usd {fmt_usd(req.budget_usd)} is short by {fmt_usd(cost_step - req.budget_usd)} of one step")
    if req.deadline_s is not None and req.deadline_s < step_s:
        parts.append(f"the deadline {fmt_seconds(req.deadline_s)} is shorter than one step ({fmt_seconds(step_s)})")
    if req.gpu_hours is not None and req.gpu_hours < step_s * g / 3600:
        parts.append(f"--gpu-hours {req.gpu_hours:g} is short of one step ({step_s * g / 3600:.3g} GPU-hours)")
    if req.tokens is not None or req.epochs is not None:
        parts.append("the fixed tokens/epochs exceed what the budgets allow (or are less than one optimizer step)")
    if not parts:
        parts.append("no candidate satisfies every limit (scoring the pool may use up the budget)")
    return "infeasible: " + "; ".join(parts) + "; relax that limit or lower --global-batch-tokens"


# ----------------------------------------------------------------------------- compare


def allocation_request(base: PlanRequest, alloc) -> PlanRequest:
    """The base request narrowed to one named allocation (``planner.search.plan.Allocation``)."""
    update: dict = {}
    if alloc.model is not None:
        update["models"] = (alloc.model,)
    if alloc.method is not None:
        update["methods"] = (alloc.method,)
        if alloc.method != "full" and not (alloc.model or base.models):
            raise PlannerError(f"allocation {alloc.name!r}: {alloc.method} needs a model to adapt (model=NAME)")
    if alloc.lora_rank is not None:
        update["lora_ranks"] = (alloc.lora_rank,)
    if alloc.num_gpus is not None:
        if base.num_gpus is not None and alloc.num_gpus > base.num_gpus:
            raise PlannerError(f"allocation {alloc.name!r} uses {alloc.num_gpus} GPUs; only {base.num_gpus} are available")
        update["gpu_counts"] = (alloc.num_gpus,)
    for field, target in (("checkpointing", "checkpointing"), ("zero", "zero"), ("tensor_parallel", "tensor_parallel"),
                          ("micro_batch", "micro_batches"), ("optimizer", "optimizers"), ("strategy", "strategies")):
        value = getattr(alloc, field)
        if value is not None:
            update[target] = (value,)
    selection = alloc.selection
    if alloc.keep_fraction is not None:
        if selection in (None, "all"):
            selection = "random" if alloc.keep_fraction < 1 else "all"
        update["keep_fractions"] = (alloc.keep_fraction,)
    if selection is not None:
        update["selection"] = (selection,)
    if alloc.tokens is not None:
        update["tokens"] = alloc.tokens
    if alloc.epochs is not None:
        update["epochs"] = alloc.epochs
    data = base.model_dump()
    data.update(update)
    return PlanRequest.model_validate(data)


def compare(request) -> list[dict]:
    """Each allocation planned under the shared limits: its best run for the objective, or why none.

    Returns one row per allocation: name, feasible, reason, and the recommended run's fields
    (``planner.search.plan.Candidate``) with the binding constraints."""
    rows = []
    for alloc in request.allocations:
        try:
            plan = make_plan(allocation_request(request.base, alloc))
        except PlannerError as exc:
            rows.append({"name": alloc.name, "feasible": False, "reason": str(exc)})
            continue
        row = {"name": alloc.name, "feasible": True, "reason": ""}
        row.update(plan.recommended.model_dump())
        row["binding"] = [c.name for c in plan.constraints if c.binding]
        row["stop_step"] = plan.stopping.stop_step
        rows.append(row)
    return rows
