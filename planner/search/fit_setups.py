"""The set-ups `planner fit` compares, per stack: what each stack's recipes can turn on.

The Hugging Face stack (``default_setups`` of ``planner.search.fit``: full fine-tuning over
precisions and optimizers, LoRA and QLoRA, three checkpointing modes) and the torchtune stack as
its 0.6.1 recipes ship and as users vary them: chunked cross-entropy always (every recipe's
``loss: CEWithChunkedOutputLoss``), full fine-tuning with paged 8-bit AdamW stepped in backward
(``full_finetune_single_device``'s Llama 3.1 8B config) or fused AdamW (the distributed recipe),
LoRA and QLoRA with AdamW, each with and without activation checkpointing and with activation
offloading. torchtune trains in one dtype (bf16, or fp32 on a GPU without bf16) and shards with
FSDP2 only (ZeRO-3). On a GPU without bf16 units (T4, V100) the HF set-ups use fp16 in its place.
torchtitan (0.3.0, pre-training: full training only) under FSDP2 mixed precision with its
checkpointing modes, eager and compiled (the compiled ones with the compiled loss). Megatron-LM
(full training, bf16 mixed precision, its distributed optimizer over data parallelism, three recompute
modes). A user who names a stack gets only that stack's set-ups.
Techniques asked for by flag (``with_techniques``: k-bit preparation, float8, float8 all-gather, a
loss implementation) keep only the set-ups that can use them, with them turned on.
"""

from __future__ import annotations

from planner.cost.memory.megatron_tensors import unpriced_reason as megatron_unpriced_reason
from planner.cost.memory.torchtitan_tensors import unpriced_reason as titan_unpriced_reason
from planner.cost.memory.torchtune_tensors import unpriced_reason
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup
from planner.specs.vocabulary import STACKS

FIT_STACKS = ("hf", "torchtune", "torchtitan", "megatron")
"""Stacks whose memory `fit` prices today (the others are refused by name)."""
_FP16_TWIN = {"bf16": "fp16", "bf16-mixed": "fp16-mixed"}


def fit_setups(spec: ModelSpec, gpu: GpuSpec, stack: str | None, num_gpus: int, zero: int, include_all: bool,
               precision: str | None = None) -> list[TrainingSetup]:
    """Every set-up `fit` tries on ``gpu``: the named stack's, or every priced stack's when None;
    ``precision`` keeps that mode and its mixed twin ("fp16": fp16 and fp16-mixed)."""
    from planner.errors import PlannerError
    from planner.search.fit import default_setups

    if stack is not None and stack not in FIT_STACKS:
        known = ", ".join(s for s in STACKS if s in FIT_STACKS)
        raise PlannerError(f"fit prices the memory of stacks {known}; {stack!r} is not priced yet")
    setups = []
    if stack in (None, "hf"):
        from planner.cost.memory import galore

        every = include_all or precision == "fp32"  # fp32 set-ups are among the extras
        setups += [_on_gpu(s, gpu) for s in default_setups(num_gpus, zero, every) if _runs_on(s, gpu)
                   and (s.optimizer != "galore-adamw" or galore.unpriced_reason(spec, s) is None)]
    for name, reason_of, make, zeros in (("torchtune", unpriced_reason, torchtune_setups, (3,)),
                                         ("torchtitan", titan_unpriced_reason, torchtitan_setups, (3,)),
                                         ("megatron", megatron_unpriced_reason, megatron_setups, (0, 1))):
        reason = reason_of(spec)
        if stack == name and reason:
            raise PlannerError(reason)
        if stack in (None, name) and not reason and (num_gpus == 1 or zero in zeros):
            setups += make(gpu, num_gpus, zero)
    if precision is not None:
        gpu.require_precision(precision)
        family = precision.removesuffix("-mixed")
        setups = [s for s in setups if s.precision.removesuffix("-mixed") == family]
    return setups


FIT_TECHNIQUES = ("kbit_preparation", "float8", "float8_all_gather", "loss_impl")
"""Set-up fields `fit` takes by flag (``with_techniques``)."""


def with_techniques(setups: list[TrainingSetup], techniques: dict) -> list[TrainingSetup]:
    """Each set-up with ``techniques`` (field -> value; None or False: not asked) turned on, kept only
    where the set-up accepts them and the memory model prices them; a one-line refusal when none can."""
    from pydantic import ValidationError

    from planner.cost.support import unpriced
    from planner.errors import PlannerError

    asked = {k: v for k, v in techniques.items() if v not in (None, False)}
    if not asked:
        return setups
    kept = []
    for setup in setups:
        try:
            changed = TrainingSetup(**{**setup.model_dump(), **asked})
        except (ValidationError, ValueError, PlannerError):
            continue
        if not unpriced(changed) and _uses(changed):
            kept.append(changed)
    if not kept:
        names = ", ".join(f"{k}={v!r}" for k, v in asked.items())
        raise PlannerError(f"{names}: no set-up of this fit can use it (k-bit preparation: QLoRA on stack hf; "
                           "float8: full bf16 training on hf or torchtitan, float8 all-gather with torchtitan FSDP; "
                           "--loss compiled: torchtitan); leave the flag out or name --stack")
    return kept


def _uses(setup: TrainingSetup) -> bool:
    """What the tables of priced values cannot say: the compiled loss comes with torch.compile, and
    peft's k-bit preparation prepares a 4-bit (QLoRA) base model (``planner.cost.memory.phases``)."""
    return (setup.compile or setup.loss_impl != "compiled") and (setup.method == "qlora" or not setup.kbit_preparation)


def _runs_on(setup: TrainingSetup, gpu: GpuSpec) -> bool:
    """Full fine-tuning in pure 16-bit on a GPU without bf16 would be pure fp16 (fp16 weights and
    AdamW states), which GradScaler cannot unscale and nobody runs: it trains fp16-mixed there."""
    return gpu.computes_in(setup.precision) or not (setup.method == "full" and setup.precision == "bf16")


def _on_gpu(setup: TrainingSetup, gpu: GpuSpec) -> TrainingSetup:
    """fp16 in place of bf16 on a GPU without bf16 units (the bytes are the same)."""
    if gpu.computes_in(setup.precision) or setup.precision not in _FP16_TWIN:
        return setup
    return setup.model_copy(update={"precision": _FP16_TWIN[setup.precision]})


def torchtune_setups(gpu: GpuSpec, num_gpus: int = 1, zero: int = 3) -> list[TrainingSetup]:
    """torchtune 0.6.1's recipes and their common variants (see the module docstring)."""
    dtype = "bf16" if gpu.computes_in("bf16") else "fp32"
    common = {"stack": "torchtune", "precision": dtype, "loss_impl": "chunked", "num_gpus": num_gpus,
              "zero": 3 if num_gpus > 1 else 0}
    full = [
        {"optimizer": "paged-adamw-8bit", "optimizer_in_backward": True, "checkpointing": "full"},
        {"optimizer": "paged-adamw-8bit", "optimizer_in_backward": True, "checkpointing": "full",
         "activation_offload": True},
        {"optimizer": "adamw", "optimizer_impl": "fused", "checkpointing": "full"},
        {"optimizer": "adamw", "optimizer_impl": "fused", "checkpointing": "none"},
    ]
    adapters = [
        {"checkpointing": "none"},
        {"checkpointing": "full"},
        {"checkpointing": "full", "activation_offload": True},
    ]
    methods = ("lora", "qlora") if dtype == "bf16" else ("lora",)  # torchao NF4 computes in bf16
    setups = [TrainingSetup(method="full", **common, **choice) for choice in full]
    setups += [TrainingSetup(method=m, **common, **choice) for m in methods for choice in adapters]
    return setups


def torchtitan_setups(gpu: GpuSpec, num_gpus: int = 1, zero: int = 3) -> list[TrainingSetup]:
    """torchtitan's pre-training set-ups: full training under FSDP2 mixed precision (fp32 sharded
    parameters, bf16 compute) with fused AdamW, without, with per-op selective and with full
    activation checkpointing, eager and compiled (its configs' knobs)."""
    if not gpu.computes_in("bf16"):
        return []  # torchtitan trains in bf16 mixed precision
    common = {"stack": "torchtitan", "method": "full", "precision": "bf16-mixed", "optimizer_impl": "fused",
              "num_gpus": num_gpus, "zero": 3 if num_gpus > 1 else 0}
    from planner.search.stacks import titan_loss_impl

    return [TrainingSetup(checkpointing=ckpt, compile=compiled, loss_impl=titan_loss_impl(compiled), **common)
            for ckpt in ("none", "selective", "full") for compiled in (False, True)]


def megatron_setups(gpu: GpuSpec, num_gpus: int = 1, zero: int = 1) -> list[TrainingSetup]:
    """Megatron-LM's set-ups on data parallelism alone (fit asks what fits one GPU; tensor and pipeline
    layouts are the plan's): full training in bf16 mixed precision with its fused Adam, the distributed
    optimizer on several GPUs unless ``zero`` is 0, without, with selective (``core_attn``) and with
    full recompute (``planner.cost.memory.megatron_stack``)."""
    if not gpu.computes_in("bf16"):
        return []  # Megatron-Core's fp16 path is not priced
    common = {"stack": "megatron", "method": "full", "precision": "bf16-mixed", "optimizer_impl": "fused",
              "num_gpus": num_gpus, "zero": min(zero, 1) if num_gpus > 1 else 0}
    return [TrainingSetup(checkpointing=ckpt, **common) for ckpt in ("none", "selective", "full")]
