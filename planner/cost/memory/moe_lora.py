"""LoRA on the stacked expert weights of a mixture of experts, as peft 0.21 runs it.

In transformers 5 the experts of a layer are two 3-D parameters (``experts.gate_up_proj``: experts x
2 I x h, ``experts.down_proj``: experts x h x I), not ``nn.Linear`` modules. For the model types of
``planner.specs.architecture.PEFT_MOE_CONVERTED``, peft 0.21.2 turns ``all-linear`` into
``target_parameters`` and wraps each with ``lora.ParamWrapper`` (``src/peft/tuners/lora/layer.py``,
https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py). Its forward registers a
parametrization ``W' = baddbmm(W, B, A, alpha=scaling)`` (``_LoraFactorsProxy``): the whole stack is
materialised at W's dtype for each forward, and because ``W'`` requires a gradient the expert matmul
keeps it for backward, and backward makes its full gradient before reducing it to A and B. So each
wrapped layer keeps a second copy of its experts through the step, and backward adds one gradient
of a stack at a time. Measured on fake tensors (Mixtral-8x7B and Qwen3-30B-A3B layers, bf16): see
``tests/test_moe_lora.py``. The adapters themselves (per expert A: r x in, B: out x r; gate_up at rank
2r) are counted by ``planner.cost.params.expert_lora_params_per_rank``.
"""

from __future__ import annotations

from planner.specs.architecture import lora_expert_targets
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

MERGED_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bf16-mixed": 6, "fp16-mixed": 6}
"""Bytes per expert weight of the merged ``W'`` kept for backward: the base dtype (bf16 experts under
QLoRA too: 3-D parameters are not quantized); under autocast the fp32 ``W'`` and the bf16 cast the
expert matmul keeps (not traced: CPU autocast cannot run ``_grouped_mm`` at fp32)."""


def merged_bytes_by_layer(spec: ModelSpec, setup: TrainingSetup) -> dict[int, list[float]]:
    """Layer index -> bytes of each wrapped expert stack's ``W'`` in forward order (gate_up, down)."""
    if setup.method == "full":
        return {}
    width = MERGED_BYTES[setup.precision]
    out: dict[int, list[float]] = {}
    for index, lin, _ in lora_expert_targets(spec, setup.lora_targets):
        out.setdefault(index, []).append(float(lin.weight_params * width / setup.expert_parallel))
    return out


def merged_gradient_peak_bytes(stacks: list[float], grad_bytes_per_byte: float = 1.0) -> float:
    """Extra bytes while backward passes one wrapped layer: for each stack in reverse forward order,
    its ``W'`` gradient appears (``grad_bytes_per_byte`` x its size: the gradient has W''s dtype) while
    the ``W'`` of the stacks after it are already released. ``stacks``: sizes in forward order."""
    peak, released = 0.0, 0.0
    for size in reversed(stacks):
        peak = max(peak, size * grad_bytes_per_byte - released)
        released += size
    return peak


def factor_copy_bytes_per_rank(spec: ModelSpec, setup: TrainingSetup) -> tuple[float, float]:
    """(all wrapped layers, the largest one) bytes per unit of rank of the copies of A and B that
    ``get_delta_factors`` casts to W's dtype (``.to(param.dtype)``) and ``baddbmm`` keeps for backward:
    none when W is fp32 like the adapters (the cast returns the adapter itself)."""
    width = MERGED_BYTES[setup.precision]
    if width >= 4 or setup.method == "full":
        return 0.0, 0.0
    by_layer: dict[int, float] = {}
    for index, lin, mult in lora_expert_targets(spec, setup.lora_targets):
        by_layer[index] = by_layer.get(index, 0.0) + mult * lin.count * (lin.in_features + lin.out_features) * width
    return sum(by_layer.values()), max(by_layer.values(), default=0.0)


def expert_lora_bytes(spec: ModelSpec, setup: TrainingSetup, rank=None) -> tuple:
    """(merged weights and factor copies kept by every wrapped layer, one layer's, the gradient moment's extra
    bytes) of peft's expert LoRA for ``setup`` at LoRA ``rank`` (an array, default the set-up's), per GPU
    (experts split over the expert-parallel GPUs)."""
    by_layer = merged_bytes_by_layer(spec, setup)
    if not by_layer:
        return 0.0, 0.0, 0.0
    rank = setup.lora_rank if rank is None else rank
    grad_share = 2 / 6 if MERGED_BYTES[setup.precision] == 6 else 1.0  # autocast: the bf16 cast's gradient
    factors, factors_layer = factor_copy_bytes_per_rank(spec, setup)
    total = sum(sum(stacks) for stacks in by_layer.values()) + factors * rank
    largest = max(sum(stacks) for stacks in by_layer.values()) + factors_layer * rank
    moment = max(merged_gradient_peak_bytes(stacks, grad_share) for stacks in by_layer.values())
    return total, largest, moment
