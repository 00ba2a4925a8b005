"""What fits on a GPU: for each method and memory technique, the largest micro-batch and the
longest sequence, the headroom; where nothing fits, the shortfall and the cheapest fixes.

All searches are vectorized: a set-up is evaluated over an array of micro-batches or sequence
lengths in one call of the memory model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.memory import device as device_memory
from planner.cost.memory.device import peak_allocated_bytes
from planner.cost.memory.phases import inference_memory
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import InferenceSetup, TrainingSetup
from planner.specs.techniques import technique_words

FIT_CALIBRATED_FIELDS = ("usable_bytes", "short_by_bytes", "fixes", "rows.peak_bytes", "rows.fits", "rows.headroom_bytes",
                         "rows.max_micro_batch", "rows.max_seq_len", "rows.step_time_s", "rows.tokens_per_s", "rows.mfu",
                         "rows.usd_per_million_tokens")
"""What a calibration profile sets in ``planner fit --json`` (``calibrated_fields``)."""
MICRO_BATCHES = np.array(sorted(set(range(1, 257)) | {2**k for k in range(9, 17)}))
SEQ_STEP = 128


def usable_allocated_bytes(gpu: GpuSpec, profile=None) -> float:
    """What PyTorch may allocate: device memory less the CUDA context, less the allocator's
    reserve (``planner.cost.memory.device``, the verdict every verb shares); with a calibration
    profile of this GPU, its measured context and fitted reserve instead."""
    return device_memory.usable_allocated_bytes(gpu, profile)


def default_setups(num_gpus: int = 1, zero: int = 0, include_all: bool = False) -> list[TrainingSetup]:
    """The set-ups `planner fit` compares: full fine-tuning in mixed and pure bf16 with AdamW,
    8-bit AdamW or Adafactor; GaLore-AdamW in bf16 without sharding (galore_torch's default rank 128);
    LoRA and QLoRA with AdamW; each without, with selective and with full checkpointing.
    ``include_all`` adds SGD, Lion and fp32."""
    optimizers = ["adamw", "adamw-8bit", "adafactor"] + (["sgd", "lion"] if include_all else [])
    precisions = ["bf16-mixed", "bf16"] + (["fp32"] if include_all else [])
    setups = []
    for ckpt in ("none", "selective", "full"):
        for precision in precisions:
            for optimizer in optimizers:
                setups.append(
                    TrainingSetup(method="full", precision=precision, optimizer=optimizer, checkpointing=ckpt,
                                  num_gpus=num_gpus, zero=zero)
                )
        if zero == 0:  # GaLore is priced without sharding (planner.cost.memory.galore), in pure bf16 as its paper trains
            setups.append(TrainingSetup(method="full", precision="bf16", optimizer="galore-adamw", checkpointing=ckpt,
                                        num_gpus=num_gpus, zero=zero))
        for method in ("lora", "qlora"):
            setups.append(TrainingSetup(method=method, precision="bf16", checkpointing=ckpt, num_gpus=num_gpus, zero=zero))
    return setups


@dataclass(frozen=True)
class FitRow:
    setup: TrainingSetup
    peak_bytes: float  # peak allocated at micro-batch 1 and the requested sequence length
    fits: bool
    max_micro_batch: int  # 0 when micro-batch 1 does not fit
    max_seq_len: int  # at micro-batch 1; 0 when even SEQ_STEP does not fit
    headroom_bytes: float  # memory minus device bytes at micro-batch 1 (negative: short by), as in estimate
    calibrated: bool = False  # whether a calibration profile set the numbers above
    max_micro_batch_peak_bytes: float = 0.0  # peak allocated at max_micro_batch (0 when none fits)

    def as_dict(self) -> dict:
        s = self.setup
        return {
            "method": s.method,
            "precision": s.precision,
            "optimizer": s.optimizer,
            "checkpointing": s.checkpointing,
            "stack": s.stack,
            "techniques": technique_words(s),
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
            "max_micro_batch": self.max_micro_batch,
            "max_seq_len": self.max_seq_len,
            "headroom_bytes": self.headroom_bytes,
            "calibrated": self.calibrated,
            "max_micro_batch_peak_bytes": self.max_micro_batch_peak_bytes,
        }


def _largest_fitting(values: np.ndarray, peaks: np.ndarray, budget: float) -> int:
    ok = np.nonzero(peaks <= budget)[0]
    return int(values[ok[-1]]) if ok.size else 0


def fit_row(spec: ModelSpec, setup: TrainingSetup, seq_len: int, gpu: GpuSpec, max_seq_len: int,
            profile=None) -> FitRow:
    """One set-up's verdict on ``gpu`` by ``planner.cost.memory.device`` (calibrated by ``profile``)."""
    budget = device_memory.usable_allocated_bytes(gpu, profile, setup.stack)
    peak1 = float(peak_allocated_bytes(spec, setup, 1, seq_len, profile=profile))
    batch_peaks = peak_allocated_bytes(spec, setup, MICRO_BATCHES, seq_len, profile=profile)
    seqs = np.arange(SEQ_STEP, max_seq_len + 1, SEQ_STEP)
    seq_peaks = peak_allocated_bytes(spec, setup, 1, seqs, profile=profile)
    need = float(device_memory.device_bytes(peak1, device_memory.overheads(gpu, profile, setup.stack)))
    max_micro_batch = _largest_fitting(MICRO_BATCHES, np.asarray(batch_peaks), budget)
    at_max = np.asarray(batch_peaks)[np.asarray(MICRO_BATCHES) == max_micro_batch]
    return FitRow(
        setup=setup,
        peak_bytes=peak1,
        fits=peak1 <= budget,
        max_micro_batch=max_micro_batch,
        max_seq_len=_largest_fitting(seqs, np.asarray(seq_peaks), budget),
        headroom_bytes=gpu.memory_bytes - need,
        calibrated=profile is not None,
        max_micro_batch_peak_bytes=float(at_max[0]) if at_max.size else 0.0,
    )


def _rows_that_price(spec, setups, seq_len, gpu, limit, profile) -> list:
    """``fit_row`` of each set-up the memory model prices with the asked techniques on (a refusal that
    only the estimate knows, e.g. k-bit preparation with selective checkpointing, drops the set-up);
    the last refusal when none prices."""
    from planner.errors import PlannerError

    rows, refusal = [], None
    for setup in setups:
        try:
            rows.append(fit_row(spec, setup, seq_len, gpu, limit, profile))
        except PlannerError as err:
            refusal = err
    if not rows and refusal is not None:
        raise refusal
    return rows


def what_fits(
    spec: ModelSpec,
    gpu: GpuSpec,
    seq_len: int,
    num_gpus: int = 1,
    zero: int | None = None,
    include_all: bool = False,
    max_seq_len: int | None = None,
    profile=None,
    stack: str | None = None,
    precision: str | None = None,
    techniques: dict | None = None,
) -> dict:
    """Every default set-up on ``gpu``: rows, and when none fits, the shortfall and fixes.
    ``profile``: a calibration profile of ``gpu`` (``planner.truth.calibrate``) corrects every row's
    peak, fits, headroom, largest micro-batch and longest sequence, and the budget.
    ``stack``: only that stack's set-ups; None tries every priced stack (``fit_setups``).
    ``techniques``: fields asked for by flag (``fit_setups.with_techniques``): only set-ups using them."""
    from planner.search.fit_setups import fit_setups, with_techniques

    zero = (3 if num_gpus > 1 else 0) if zero is None else zero
    budget = usable_allocated_bytes(gpu, profile)
    limit = max_seq_len or max(spec.max_position_embeddings or 0, seq_len, 4096)
    setups = fit_setups(spec, gpu, stack, num_gpus, zero, include_all, precision)
    if any(v not in (None, False) for v in (techniques or {}).values()):
        rows = _rows_that_price(spec, with_techniques(setups, techniques), seq_len, gpu, limit, profile)
    else:
        rows = [fit_row(spec, setup, seq_len, gpu, limit, profile) for setup in setups]
    rows.sort(key=lambda r: (not r.fits, -r.max_micro_batch, r.peak_bytes))
    result = {"usable_bytes": budget, "rows": rows, "fixes": [], "calibrated": profile is not None}
    if not any(row.fits for row in rows):
        lightest = min(rows, key=lambda r: r.peak_bytes)
        result["short_by_bytes"] = lightest.peak_bytes - budget
        result["fixes"] = cheapest_fixes(spec, gpu, lightest.setup, seq_len, budget, limit, profile)
    return result


def cheapest_fixes(
    spec: ModelSpec, gpu: GpuSpec, lightest: TrainingSetup, seq_len: int, budget: float, limit: int, profile=None
) -> list[dict]:
    """Fixes for a job where no set-up fits, cheapest first: a smaller micro-batch, a shorter
    sequence, sharding over more GPUs of this kind (ZeRO-3), a larger GPU of the catalog.

    Each fix is one change to ``lightest`` *as it was evaluated*, at its own micro-batch
    (``lightest.micro_batch``: the one an allocation pinned, or the search's lightest) and at
    ``seq_len``, and is offered only if that one change makes it fit: pricing the fixes at
    micro-batch 1 while the set-up pinned 64 offered sequences longer than the run's and GPUs
    smaller than this one (issue 11, item 6). ``limit`` caps the sequence search. A calibration
    ``profile`` of ``gpu`` corrects the peaks (another GPU gets the defaults' overheads)."""
    micro_batch = lightest.micro_batch
    fixes = [
        _smaller_micro_batch_fix(spec, lightest, micro_batch, seq_len, budget, profile),
        _shorter_sequence_fix(spec, lightest, micro_batch, min(seq_len - 1, limit), budget, profile),
        _more_gpus_fix(spec, gpu, lightest, micro_batch, seq_len, budget, profile),
        _larger_gpu_fix(spec, gpu, lightest, micro_batch, seq_len, profile),
    ]
    return [fix for fix in fixes if fix is not None]


def _smaller_micro_batch_fix(spec: ModelSpec, setup: TrainingSetup, micro_batch: int, seq_len: int, budget: float,
                             profile=None) -> dict | None:
    """The largest micro-batch below ``micro_batch`` (every integer up to ``MICRO_BATCHES``' top)
    that fits at ``seq_len``: when a pinned micro-batch is itself what does not fit, it is the
    cheapest fix. It keeps the global batch by gradient accumulation, so it is priced accumulating
    (gradients live through forward), as the plan search prices it (``planner.search.setups._peak``);
    a set-up stepping its optimizer in backward cannot accumulate and is priced as it is. None at
    micro-batch 1, or when even micro-batch 1 does not fit."""
    smaller = np.arange(1, min(micro_batch, int(MICRO_BATCHES[-1]) + 1))
    if not smaller.size:
        return None
    if not setup.optimizer_in_backward:
        setup = setup.model_copy(update={"grad_accum": max(2, setup.grad_accum, setup.pipeline_parallel)})
    peaks = np.asarray(peak_allocated_bytes(spec, setup, smaller, seq_len, profile=profile))
    best = _largest_fitting(smaller, peaks, budget)
    if not best:
        return None
    return {"fix": f"micro-batch <= {best}", "change": "micro_batch", "value": best}


def _shorter_sequence_fix(spec: ModelSpec, setup: TrainingSetup, micro_batch: int, longest: int, budget: float,
                          profile=None) -> dict | None:
    """The longest sequence, a multiple of ``SEQ_STEP`` up to ``longest`` (below the run's own),
    that fits at ``micro_batch``; None when none does: a sequence no shorter than the run's is no fix."""
    seqs = np.arange(SEQ_STEP, longest + 1, SEQ_STEP)
    if not seqs.size:
        return None
    peaks = np.asarray(peak_allocated_bytes(spec, setup, micro_batch, seqs, profile=profile))
    best = _largest_fitting(seqs, peaks, budget)
    if not best:
        return None
    return {"fix": f"shorter sequences: up to {best} tokens", "change": "seq_len", "value": best}


def _more_gpus_fix(spec: ModelSpec, gpu: GpuSpec, setup: TrainingSetup, micro_batch: int, seq_len: int, budget: float,
                   profile=None) -> dict | None:
    """The fewest GPUs of this kind, no fewer than the set-up's own, over which its sharded form
    (``_sharded``) fits at ``micro_batch``; None when 128 do not suffice (activations do not shard)."""
    for n in (2, 4, 8, 16, 32, 64, 128):
        if n < setup.num_gpus or n % (setup.tensor_parallel * setup.pipeline_parallel):
            continue  # fewer GPUs than the run has is no fix; the model-parallel group must divide the GPUs
        sharded, how = _sharded(spec, setup, n)
        if float(peak_allocated_bytes(spec, sharded, micro_batch, seq_len, profile=profile)) <= budget:
            return {"fix": f"{n} x {gpu.name} with {how}", "change": "num_gpus", "value": n}
    return None


def _larger_gpu_fix(spec: ModelSpec, gpu: GpuSpec, setup: TrainingSetup, micro_batch: int, seq_len: int,
                    profile=None) -> dict | None:
    """The smallest GPU of the catalog with more memory than ``gpu`` that computes in the set-up's
    precision (``GpuSpec.computes_in``: no bf16 on a T4 or V100) and on which the set-up fits at
    ``micro_batch`` (its stack's default overheads); None when there is none."""
    from planner.specs.catalog import list_gpus

    need = float(peak_allocated_bytes(spec, setup, micro_batch, seq_len, profile=profile))
    larger = sorted(
        (g for g in list_gpus()
         if g.memory_bytes > gpu.memory_bytes and g.computes_in(setup.precision)
         and device_memory.usable_allocated_bytes(g, None, setup.stack) >= need),
        key=lambda g: g.memory_bytes,
    )
    if not larger:
        return None
    return {"fix": f"a larger GPU: {larger[0].name}", "change": "gpu", "value": larger[0].name}


def _sharded(spec: ModelSpec, setup: TrainingSetup, num_gpus: int) -> tuple[TrainingSetup, str]:
    """``setup`` spread over ``num_gpus``, and in words: ZeRO-3 / FSDP, or on Megatron (which does not
    shard weights over data parallelism) its distributed optimizer with the widest tensor parallelism
    up to a node of 8 that divides the heads, sequence parallel with it."""
    if setup.stack != "megatron":
        return setup.model_copy(update={"num_gpus": num_gpus, "zero": 3}), "ZeRO-3 / FSDP"
    from planner.search.candidates import MAX_TENSOR_PARALLEL, divides_heads

    tp = max(t for t in (1, 2, 4, 8) if t <= min(num_gpus, MAX_TENSOR_PARALLEL) and num_gpus % t == 0
             and divides_heads(spec, t))
    update = {"num_gpus": num_gpus, "zero": 1, "tensor_parallel": tp, "sequence_parallel": tp > 1}
    return setup.model_copy(update=update), f"Megatron's distributed optimizer, TP {tp}" + (" + SP" if tp > 1 else "")


def inference_fits(spec: ModelSpec, gpu: GpuSpec, context_len: int, setup: InferenceSetup | None = None) -> dict:
    """Longest context at batch 1 and largest batch at ``context_len`` that can be served."""
    setup = (setup or InferenceSetup()).model_copy(update={"context_len": context_len})
    budget = usable_allocated_bytes(gpu) * setup.num_gpus
    contexts = np.arange(SEQ_STEP, max(spec.max_position_embeddings, context_len, SEQ_STEP) + 1, SEQ_STEP)
    context_peaks = inference_memory(spec, setup, batch=1, context_len=contexts).peak_bytes
    batch_peaks = inference_memory(spec, setup, batch=MICRO_BATCHES).peak_bytes
    estimate = inference_memory(spec, setup)
    peak = float(estimate.peak_bytes)
    return {
        "usable_bytes": budget,
        "weights_bytes": float(estimate.components["weights"]),
        "kv_cache_bytes": float(estimate.components["kv_cache"]),
        "peak_bytes": peak,
        "fits": peak <= budget,
        "max_context_len": _largest_fitting(contexts, np.asarray(context_peaks), budget),
        "max_batch": _largest_fitting(MICRO_BATCHES, np.asarray(batch_peaks), budget),
    }
