"""The axes of the search: which models, which GPU counts and parallel layouts, which data, which
token counts.

A candidate is a training run: a model (a catalog entry to fine-tune, or a Llama-shaped model of
a chosen size to pre-train), a method (full, LoRA with a rank, QLoRA), an optimizer, a precision,
activation checkpointing, micro-batch and gradient accumulation, a number of GPUs with a ZeRO
stage and a tensor-parallel degree, the training tokens, and the data (which selection method,
what fraction of the pool is kept, and so how many epochs). This module lists the values of each
axis: model entries (``catalog_models``, the pre-training size ladder ``ladder_sizes`` /
``ladder_models``), GPU counts (``gpu_counts_for``) and layouts (``layouts``), data choices
(``data_choices``) and the token lattice (``token_lattice``). Their evaluation is elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.loss import evidence, pruning, scaling
from planner.search.context import Context
from planner.search.plan import PlanRequest

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
NOMINAL_MFU = 0.4
"""Only to centre the pre-training size ladder before any set-up is evaluated."""
KEEP_GRID = 8
"""Kept fractions per selection method: log-spaced from the method's smallest measured fraction to 1."""
LADDER_COARSE_PER_DECADE = 4
LADDER_COARSE_SPAN = (-1.25, 0.75)
"""Decades around the size the budgets imply at a nominal MFU (``ladder_center``)."""
LADDER_FINE_PER_DECADE = 32
LADDER_BOUNDS = (1e7, 1e13)
SYNTHETIC_VOCAB = 32000
"""Vocabulary of the synthetic models: the Llama-2 tokenizer (Touvron et al. 2023)."""
SYNTHETIC_ASPECT = 128
"""hidden / layers of the synthetic models: Llama-2-7B 4096/32, GPT-3 175B 12288/96; Kaplan et al.
2020 (sec. 3.1, Fig. 5) find loss nearly flat in the aspect ratio over a wide range."""


# ----------------------------------------------------------------------------- models


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
    from planner.cost.spec_facts import param_counts

    counts = param_counts(spec)
    n = counts.non_embedding if law.param_count == "non_embedding" else counts.total
    return ModelEntry(name=name, spec=spec, params_n=float(n), total_params=float(counts.total))


def catalog_models(names, law, request: PlanRequest | None = None) -> list[ModelEntry]:
    """The catalog models to fine-tune, checked against the request: a sequence past a model's
    context, or tensor-parallel degrees none of which divide its heads, is bad input."""
    from planner.specs.catalog import load_spec

    specs = [load_spec(name) for name in names]
    if request is not None:
        for spec in specs:
            _check_request_fits_model(spec, request)
    return [_entry(spec, law, spec.name) for spec in specs]


def _check_request_fits_model(spec, request: PlanRequest) -> None:
    from planner.specs.setup import TrainingSetup, check_setup

    context = spec.max_position_embeddings
    if context and request.seq_len > context:
        check_setup(spec, TrainingSetup(seq_len=request.seq_len))  # raises, saying what would work
    if "tensor_parallel" in request.model_fields_set and not any(divides_heads(spec, tp) for tp in request.tensor_parallel):
        check_setup(spec, TrainingSetup(seq_len=min(request.seq_len, context or request.seq_len),
                                        num_gpus=max(request.tensor_parallel), tensor_parallel=max(request.tensor_parallel)))


def divides_heads(spec, tp: int) -> bool:
    """Megatron-style tensor parallelism gives each GPU whole query and key/value heads."""
    return all(layer.num_heads % tp == 0 and layer.num_kv_heads % tp == 0 for layer in spec.layers)


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


def ladder_center(ctx: Context) -> float:
    """The compute-optimal size of the tightest budget at ``NOMINAL_MFU``."""
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


def ladder_sizes(center: float, fine: bool = False) -> np.ndarray:
    """Model sizes of the coarse ladder around ``center`` (``LADDER_COARSE_SPAN`` decades,
    ``LADDER_COARSE_PER_DECADE`` a decade), or of the fine ladder one coarse step either side."""
    if fine:
        step = 1.0 / LADDER_COARSE_PER_DECADE
        sizes = center * 10.0 ** np.arange(-step, step + 1e-9, 1.0 / LADDER_FINE_PER_DECADE)
    else:
        lo, hi = LADDER_COARSE_SPAN
        sizes = center * 10.0 ** np.arange(lo, hi + 1e-9, 1.0 / LADDER_COARSE_PER_DECADE)
    return np.clip(sizes, *LADDER_BOUNDS)


# ----------------------------------------------------------------------------- GPUs and layouts


def gpu_counts_for(ctx: Context):
    """``counts(entry, method)``: the GPU counts to try for a model: the request's, all it has,
    powers of two up to a node (fine-tuning), or the smallest powers of four on which the
    model's weights, gradients and AdamW states fit fully sharded (pre-training)."""
    req = ctx.request
    if req.gpu_counts is not None:
        counts = tuple(sorted(set(req.gpu_counts)))
        if req.num_gpus is not None and max(counts) > req.num_gpus:
            raise PlannerError(f"gpu_counts {counts} exceed the {req.num_gpus} GPUs available")
        return lambda entry, method: counts
    if req.num_gpus is not None:
        counts = (req.num_gpus,)
        return lambda entry, method: counts
    if not req.pretrain:
        counts = tuple(2**k for k in range(int(math.log2(FINETUNE_MAX_GPUS)) + 1))
        return lambda entry, method: counts

    def pretrain_counts(entry, method):
        # the weights, gradients and AdamW states alone (16 bytes per parameter, Rajbhandari et al.
        # 2020) fully sharded: fewer GPUs than this cannot fit
        need = 16.0 * entry.total_params / ctx.usable_bytes
        fitting = [c for c in PRETRAIN_GPU_COUNTS if c >= need]
        return tuple(fitting[:PRETRAIN_GPU_OPTIONS])

    return pretrain_counts


def layouts(request: PlanRequest, num_gpus: int, method: str, spec=None) -> list[tuple[int, int]]:
    """(ZeRO stage, tensor parallel) pairs for a GPU count, lightest-communication first; with a
    ``spec``, only tensor-parallel degrees that divide its heads."""
    set_fields = request.model_fields_set
    pretrain = request.pretrain
    zeros = request.zero if (not pretrain or "zero" in set_fields) else PRETRAIN_ZERO
    tps = request.tensor_parallel if (not pretrain or "tensor_parallel" in set_fields) else PRETRAIN_TENSOR_PARALLEL
    if num_gpus == 1:
        return [(0, 1)]
    if method != "full" and "zero" not in set_fields:
        # ZeRO-1/2 shard only the adapters' states and gradients (megabytes): stage 0 or 3 matter
        zeros = tuple(z for z in zeros if z in (0, 3)) or zeros
    out = []
    for tp in sorted(tps):
        if tp > min(num_gpus, MAX_TENSOR_PARALLEL) or num_gpus % tp or (spec is not None and not divides_heads(spec, tp)):
            continue
        for z in sorted(zeros):
            out.append((z, tp))
    return out


# ----------------------------------------------------------------------------- data and tokens


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


def _selection_names(request: PlanRequest, law: scaling.ScalingLaw, notes: list[str], plaus=None) -> tuple[str, ...]:
    """The selection methods to try: the request's, or every catalog method with evidence for the
    task (``planner.loss.evidence``; every method beyond the evidence)."""
    names = request.selection
    if request.data_pool_tokens is None:
        if names is not None and any(n != "all" for n in names):
            raise PlannerError("data selection needs a pool: give --data-pool TOKENS")
        return ("all",)
    if law.repetition is None:
        if names is not None and any(n not in ("all", "random") for n in names):
            raise PlannerError(f"law {law.name} has no repetition constants, so no data-selection model; "
                               "drop --selection or use a Chinchilla-form law that has them (besiroglu2024)")
        notes.append(f"{law.name} has no repetition term: tokens are capped at the kept data (one epoch)")
        return names or ("all",)
    allowed = None if plaus is None else plaus.methods
    if names is None:
        return ("all",) + tuple(m for m in pruning.list_methods()
                                if m != "random" and pruning.load_method(m).min_keep_fraction is not None
                                and (allowed is None or m in allowed))
    outside = [n for n in names if n != "all" and allowed is not None and n not in allowed]
    for name in outside:  # named by the user: used, and said to be beyond the evidence
        setting = ", ".join(evidence.method_settings(pruning.load_method(name))) or "none recorded"
        notes.append(f"selection {name} was asked for but has no evidence for {plaus.task} (its results: {setting}): "
                     "beyond the evidence")
    return names


def _method_rows(request: PlanRequest, name: str, plaus=None) -> list[tuple]:
    """(selection, kept fraction, metric angle, strategy, scoring FLOPs) of one selection method."""
    if name == "all":
        return [("all", 1.0, 90.0, "hard", 0.0)]
    method = pruning.load_method(name)
    theta = method.metric_angle_deg
    score = float(pruning.scoring_flops(method, request.data_pool_tokens))
    if request.keep_fractions is not None:
        fractions = np.asarray(request.keep_fractions, dtype=np.float64)
    elif theta >= 90.0:
        fractions = np.array([1.0])
    elif method.min_keep_fraction is None:
        raise PlannerError(f"selection {name} needs the pool's non-duplicate share: give keep fractions (--keep)")
    else:
        fractions = _keep_grid(method, plaus)
    return [(name, float(f), float(theta), strategy, score)
            for f in fractions for strategy in (request.strategies if theta < 90.0 else ("hard",))]


def _keep_grid(method, plaus) -> np.ndarray:
    """Log-spaced kept fractions from the method's smallest measured one to 1, inside the kept
    fractions of its published results unless beyond the evidence."""
    grid = np.geomspace(method.min_keep_fraction, 1.0, KEEP_GRID)[:-1]
    rng = evidence.keep_fraction_range(method)
    if plaus is None or plaus.beyond_evidence or rng is None:
        return grid
    inside = grid[(grid >= rng[0] * (1 - 1e-9)) & (grid <= rng[1] * (1 + 1e-9))]
    return inside if inside.size else np.array([rng[0]])


def data_choices(request: PlanRequest, law: scaling.ScalingLaw, plaus=None) -> tuple[DataChoices, list[str]]:
    """Selection method x kept fraction x strategy.

    "all" trains on the whole pool (or, without a pool, on unlimited fresh data); "random" keeps a
    random fraction (only fractions the request gives: a random subset only loses data); a catalog
    method (``planner.loss.pruning``) keeps log-spaced fractions from its smallest measured one, each with
    the hard and the easy examples, and pays its scoring FLOPs.
    """
    notes: list[str] = []
    rows = [row for name in _selection_names(request, law, notes, plaus) for row in _method_rows(request, name, plaus)]
    if not rows:
        raise PlannerError("no data choice left: check --selection and the keep fractions")
    sel, f, theta, strat, score = (np.asarray(x) for x in zip(*rows, strict=True))
    return DataChoices(sel.astype(object), f.astype(np.float64), theta.astype(np.float64), strat.astype(object),
                       score.astype(np.float64)), notes


def token_lattice(d_top: float, count: int) -> np.ndarray:
    """Token counts on the absolute lattice 2^(k/2) from ``d_top`` / 2^(count/2) up to ``d_top``.

    The lattice is absolute (shared by every set-up) so that the fastest set-up of a group offers
    every token count a slower one does: that is what makes keeping only the fastest exact."""
    if not (math.isfinite(d_top) and d_top > 0):
        return np.empty(0)
    k_hi = math.floor(2.0 * math.log2(d_top) + 1e-9)
    return 2.0 ** (np.arange(k_hi - count + 1, k_hi + 1) / 2.0)
