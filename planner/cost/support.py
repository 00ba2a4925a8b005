"""Which set-ups the cost model prices, and a clear refusal for the rest.

A set-up may name a stack, a technique or a parallel layout that the formulas do not price yet;
answering it with the Hugging Face eager numbers would be a silent wrong answer. Every entry
point of the cost model (``estimate``, ``what_fits``, the plan search) calls ``require_priced``
first; as each stack and technique gains its formulas it joins ``PRICED_VALUES`` here.
"""

from __future__ import annotations

from planner.errors import PlannerError

_LAYOUT_COUNTS = range(1, 2**18 + 1)  # every pipeline / context / expert degree a set-up accepts (MAX_NUM_GPUS)
_BASELINE_LAYOUT = {"pipeline_parallel": (1,), "virtual_stages": (1,), "sequence_parallel": (False,),
                    "context_parallel": (1,), "expert_parallel": (1,)}

MEMORY_PRICED: dict[str, tuple] = {
    "precision": ("fp32", "bf16", "bf16-mixed", "fp16", "fp16-mixed"),
    "optimizer": ("adamw", "adamw-8bit", "adafactor", "sgd", "lion",
                  "galore-adamw"),  # planner.cost.memory.galore (full training, no sharding; time: timing.galore_step)
    "stack": ("hf",),
    "loss_impl": ("standard", "fused-linear"),
    "optimizer_in_backward": (False,),
    "activation_offload": (False,),
    "packed": (False,),
    "compile": (False,),
    "float8": (False,),
    "float8_all_gather": (False,),
    "dora": (False, True),
    "kbit_preparation": (False, True),  # QLoRA only (planner.cost.memory.phases.kbit_precision)
    "adapter_dtype": ("auto", "fp32", "base"),
    "modules_to_save": ((), ("embed_tokens",), ("lm_head",), ("embed_tokens", "lm_head"), ("lm_head", "embed_tokens")),
    # planner.cost.memory.parallel / memory_pipeline: stages, SP, ring-attention CP, EP
    "pipeline_parallel": _LAYOUT_COUNTS,
    "virtual_stages": _LAYOUT_COUNTS,
    "sequence_parallel": (False, True),
    "context_parallel": _LAYOUT_COUNTS,
    "expert_parallel": _LAYOUT_COUNTS,
}
"""Field -> the values the memory model prices today for the Hugging Face stack (any other value
is refused by name)."""

MEMORY_PRICED_BY_STACK: dict[str, dict[str, tuple]] = {
    "hf": {**MEMORY_PRICED, "float8": (False, True)},  # planner.cost.memory.float8: bf16 full training
    "torchtune": {
        **MEMORY_PRICED,
        **_BASELINE_LAYOUT,  # torchtune runs FSDP (and TP); its memory model prices no other layout
        "stack": ("torchtune",),
        # torchtune trains in one dtype (no autocast); its recipes' optimizers
        "precision": ("bf16", "fp32"),
        "optimizer": ("adamw", "adamw-8bit", "paged-adamw-8bit"),
        "optimizer_impl": ("foreach", "fused"),
        "attention": ("sdpa",),
        "checkpointing": ("none", "full"),
        "loss_impl": ("standard", "chunked"),
        "optimizer_in_backward": (False, True),
        "activation_offload": (False, True),
        "packed": (False, True),
        "compile": (False, True),
        "adapter_dtype": ("auto", "base"),
        "kbit_preparation": (False,),  # peft's k-bit preparation is the HF stack's
        "zero": (0, 3),
    },
    "torchtitan": {
        **MEMORY_PRICED,
        **_BASELINE_LAYOUT,  # FSDP2 over the data-parallel GPUs; TP, PP, CP, EP not priced
        "stack": ("torchtitan",),
        # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), or fp32; full pre-training
        "precision": ("bf16-mixed", "fp32"),
        "method": ("full",),
        "optimizer": ("adamw",),
        "optimizer_impl": ("fused", "foreach"),  # 0.3.0's default is "fused"; foreach adds one fp32 temporary
        "attention": ("sdpa",),
        "checkpointing": ("none", "full", "selective"),
        # the eager or the compiled cross-entropy (torchtitan_tensors.loss_extra_bytes_per_token)
        "loss_impl": ("standard", "compiled"),
        "compile": (False, True),
        "zero": (0, 3),
        "tensor_parallel": (1,),
        "kbit_preparation": (False,),
        "float8": (False, True),  # planner.cost.memory.float8: torchao float8, torchtitan's rowwise converter
        "float8_all_gather": (False, True),  # FSDP2 gathers the converted weights in fp8 (older torchtitan)
    },
    "megatron": {
        # planner.cost.memory.megatron_stack: Megatron-Core + Transformer Engine, priced from the documented
        # algorithms (Korthikanti et al. 2022; docs/user-guide/features/dist_optimizer.md), not traced
        **MEMORY_PRICED,
        "stack": ("megatron",),
        "precision": ("bf16-mixed", "fp32"),  # --bf16 (bf16 params, fp32 main grads and master) or fp32
        "method": ("full",),
        "optimizer": ("adamw",),
        "optimizer_impl": ("foreach", "fused"),  # both priced as Megatron's own fused multi-tensor Adam
        "attention": ("sdpa", "eager"),  # flash / cuDNN fused attention, or the unfused core (the 5as/h term)
        "checkpointing": ("none", "selective", "full"),  # --recompute-granularity (selective: core_attn)
        "loss_impl": ("standard",),  # the vocab-parallel cross-entropy on fp32 logits
        "zero": (0, 1),  # 1: --use-distributed-optimizer (master + Adam sharded over dp x cp)
        "offload_optimizer": (False,),
        "pipeline_schedule": ("1f1b", "interleaved"),
        "expert_parallel": (1,),
        "dora": (False,),
        "kbit_preparation": (False,),
        "adapter_dtype": ("auto",),
    },
}
"""Stack -> field -> priced values (``planner.cost.memory.torchtune_stack`` for torchtune,
``planner.cost.memory.torchtitan_stack`` for torchtitan, ``planner.cost.memory.megatron_stack`` for megatron)."""

_ANY_COUNT = range(1, 2**18 + 1)  # every count a set-up accepts (MAX_NUM_GPUS)
TIME_PRICED: dict[str, tuple] = {
    **MEMORY_PRICED,
    # planner.cost.timing.grounding: per-stack framework, fused/eager memory-bound work, compile, the
    # pipeline (stage split, head on the last stage, bubble, p2p), ring-attention context parallel
    "precision": ("fp32", "bf16", "bf16-mixed", "fp16", "fp16-mixed"),  # fp16: bf16's bytes at the fp16 peak
    "stack": ("hf", "torchtune", "torchtitan", "megatron"),
    "loss_impl": ("standard", "chunked", "compiled"),  # chunked/compiled CE: the same logits FLOPs and bytes priced
    "dora": (False, True),  # planner.cost.timing.dora: peft's weight norm and output passes, memory-bound
    "kbit_preparation": (False, True),  # timing.qlora.kbit_twin: bf16 -> fp32 widths, bf16 GEMMs, fp32 head
    "float8": (False, True),  # planner.cost.timing.float8: fp8 GEMMs at the fp8 ceiling, scaled casts
    "float8_all_gather": (False, True),  # timing.communication: the float8 linears' shards gathered in 1 byte
    "compile": (False, True),
    "packed": (False, True),
    "pipeline_parallel": _ANY_COUNT,
    "virtual_stages": _ANY_COUNT,
    "sequence_parallel": (False, True),
    "context_parallel": _ANY_COUNT,
    "expert_parallel": _ANY_COUNT,  # planner.cost.timing.communication.expert_parallel_s: token all-to-alls
    # planner.cost.timing.optimizer_step / host / time_offload: the same optimizer work moved into backward
    # (per-parameter host ops hidden behind it); bitsandbytes' per-tensor synchronize; paged states
    # stay on the device without memory pressure; offload copies over PCIe beyond the compute they overlap
    "optimizer": (*MEMORY_PRICED["optimizer"], "paged-adamw-8bit"),
    "optimizer_in_backward": (False, True),
    "activation_offload": (False, True),
}
"""Field -> the values the step-time model prices today (``planner.cost.timing.grounding``)."""

PRICED_VALUES = {"memory": MEMORY_PRICED, "time": TIME_PRICED}


def _table(setup, model: str) -> dict[str, tuple]:
    if model == "memory":
        return MEMORY_PRICED_BY_STACK.get(setup.stack, {"stack": tuple(MEMORY_PRICED_BY_STACK)})
    return PRICED_VALUES[model]


def unpriced(setup, model: str = "memory") -> list[str]:
    """``field=value`` of every choice of ``setup`` that ``model`` ("memory" or "time") does not price."""
    return [f"{field}={getattr(setup, field)!r}" for field, values in _table(setup, model).items()
            if getattr(setup, field) not in values]


def require_priced(setup, model: str = "memory") -> None:
    """One line naming what is not priced and what is, instead of a silent answer for another set-up."""
    missing = unpriced(setup, model)
    if missing:
        field = missing[0].split("=")[0]
        options = ", ".join(repr(v) for v in _table(setup, model)[field])
        raise PlannerError(
            f"{', '.join(missing)}: not priced by the {model} model for stack {setup.stack!r} yet "
            f"(priced {field}: {options})"
        )
