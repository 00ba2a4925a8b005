"""torchao float8 training (``torchao.float8``, 0.11.0): what fp8 linears add to or remove from a step's memory.

Owns the per-layer byte counts of ``convert_to_float8_training`` / torchtitan's ``Float8LinearConverter``
(``torchtitan/components/quantization/float8.py``, 0.3.0), as pure formulas on scalars or numpy arrays.
May import ``planner.specs`` only. Source read: torchao 0.11.0 ``float8/float8_linear.py``
(``Float8Linear.forward``, ``matmul_with_hp_or_float8_args``), ``float8/config.py``
(``Float8LinearConfig.from_recipe_name``), ``float8/fsdp_utils.py`` (``WeightWithDynamicFloat8CastTensor``,
``precompute_float8_dynamic_scale_for_fsdp``); https://github.com/pytorch/ao/tree/v0.11.0/torchao/float8.

What the code does, per converted ``nn.Linear`` (``y = x W^T``, ``x``: T x in, ``W``: out x in):

- ``matmul_with_hp_or_float8_args.forward`` saves ``(input_hp, weight_hp_t)`` for backward: the
  high-precision input (what a bf16 linear saves too) and the weight *as passed in*.
- ``tensorwise`` (``Float8LinearConfig()``, no axiswise scaling): ``Float8Linear.forward`` casts the
  weight to fp8 *before* the autograd function (``_cast_weight_to_float8_t``), so the saved weight is a
  new fp8 tensor (1 byte per weight element) that lives from the forward to the backward, unless
  ``force_recompute_fp8_weight_in_bwd`` (checkpointed cast) or an activation-checkpointing policy
  recomputes it. Scales are one fp32 scalar per tensor.
- ``rowwise`` / ``rowwise_with_gw_hp`` (axiswise scaling; torchtitan 0.3.0's only recipes): the weight
  enters the autograd function in high precision, every fp8 copy is made inside the matmul and freed
  after it; the saved set is a bf16 linear's.
- Each matmul's fp8 operands are transients: the input (T x in bytes), the weight (in x out bytes),
  fp32 scales per row (rowwise) or per tensor; the backward casts grad_output (T x out) twice and the
  input again (``*_for_grad_*`` cast configs). Eager casting goes through fp32 (``to_fp8_no_autograd``:
  ``tensor.to(float32) * scale``), so an eager cast briefly holds 4 + 1 bytes per element plus the
  ``abs`` for the amax; under ``torch.compile`` Inductor fuses amax, scale and cast.
- ``torch.compile`` (min-cut partitioner): with fp8 linears the partitioner saves fewer bytes than for
  bf16 linears (fp8 copies are cheaper to save, and products are recomputed: see
  ``compiled_block_saved_bytes_per_token``). Under torchtitan's op-SAC, compiled or not, the saved set
  is the bf16 one (traced: 57,472 bytes per token compiled for bf16 and tensorwise, 65,664 eager): the
  SAC mode sees ``aten.mm`` on ``Float8Tensor`` arguments (modes run before the subclass), so its
  every-second-matmul policy is unchanged, and the fp8 casts are recomputed.
- FSDP2: without ``enable_fsdp_float8_all_gather`` the all-gather is bf16 as before; with it
  (``TrainingSetup.float8_all_gather``) the gathered linear weights are fp8
  (``WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather``; ``gathered_block_bytes``).

Stacks: torchtitan (``planner.cost.memory.torchtitan_stack``: rowwise, the saved sets above) and the
Hugging Face eager step at precision bf16 (``hf_saved_weight_bytes``: tensorwise, the fp8 weight
copies; ``planner.truth.float8_model`` traces it).

Measured on fake CPU tensors with torchtitan 0.3.0's Llama 3 8B block (``benchmarks/torchtitan_oracle.py
--float8``, pinned in ``tests/test_float8_memory.py``).
"""

from __future__ import annotations

import numpy as np

from planner.errors import PlannerError
from planner.specs.architecture import LayerSpec

FP8_BYTES = 1  # float8_e4m3fn / e5m2
SCALE_BYTES = 4  # fp32 scales (one per tensor, or one per row / column)
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
"""``torchao.float8.Float8LinearRecipeName`` values (torchao 0.11.0)."""
TORCHTITAN_RECIPE = "rowwise"
"""torchtitan 0.3.0 ``Float8LinearConverter.Config.recipe_name`` default (it accepts rowwise and
rowwise_with_gw_hp only)."""


def check_recipe(recipe: str) -> None:
    """PlannerError naming the torchao recipes when ``recipe`` is none of them."""
    if recipe not in RECIPES:
        raise PlannerError(f"float8 recipe {recipe!r} is not a torchao recipe: use one of {', '.join(RECIPES)}")


def linear_shapes(layer: LayerSpec, fused_qkv: bool = True) -> list[tuple[int, int]]:
    """(in, out) of every ``nn.Linear`` of a dense decoder block that torchao converts (dims divisible
    by 16: ``torchtitan.components.quantization.utils.module_filter_fn``); q, k, v fused into one
    linear (torchtitan 0.3.0's ``qkv_linear.wqkv``) or three (Hugging Face): the same weight bytes,
    one scale per linear."""
    h, q, kv, width = layer.hidden_size, layer.q_dim, layer.kv_dim, layer.intermediate_size
    shapes = [(h, q + 2 * kv), (q, h)] if fused_qkv else [(h, q), (h, kv), (h, kv), (q, h)]
    shapes += [(h, width), (h, width), (width, h)] if layer.gated_mlp else [(h, width), (width, h)]
    return [(i, o) for i, o in shapes if i % 16 == 0 and o % 16 == 0]


def converted_params(layer: LayerSpec) -> int:
    """Weight elements of the block's converted linears."""
    return sum(i * o for i, o in linear_shapes(layer))


def saved_weight_bytes(layer: LayerSpec, recipe: str, *, checkpointing: str = "none", compiled: bool = False,
                       force_recompute_weight: bool = False, fused_qkv: bool = True) -> int:
    """Bytes per block kept from the forward to the backward that do not grow with the tokens.

    tensorwise, eager, no activation checkpointing: the fp8 weight cast saved by
    ``matmul_with_hp_or_float8_args`` (1 byte per converted weight element) plus one fp32 scale per
    linear (measured: 218,103,828 bytes on Llama-3-8B's block = 218,103,808 + 5 x 4). Activation
    checkpointing recomputes the cast (measured: 0 for full, 20 bytes of scales for op-SAC, which
    saves ``aten.max``), so does ``force_recompute_fp8_weight_in_bwd``; under ``torch.compile`` the
    partitioner recomputes it from the weight, a graph input (not saved: measured, see
    ``compiled_block_saved_bytes_per_token``). rowwise recipes: 0 (the weight enters in bf16)."""
    check_recipe(recipe)
    if recipe != "tensorwise" or compiled or force_recompute_weight or checkpointing == "full":
        return 0
    scales = SCALE_BYTES * len(linear_shapes(layer, fused_qkv))
    if checkpointing == "selective":
        return scales
    return FP8_BYTES * converted_params(layer) + scales


def compiled_block_saved_bytes_per_token(layer: LayerSpec, w: int) -> int:
    """Bytes per token a compiled Llama 3 block with fp8 linears saves (no activation checkpointing).

    The min-cut partitioner (``torch._functorch.partitioners.min_cut_rematerialization_partition``, what
    Inductor uses) keeps: the block input and the attention residual (the two norms' inputs, ``2 w h``)
    with their fp32 rstd (``2 x 4``), one fp8 copy of a norm output (``h``), the attention set (q, k, v,
    output, lse: ``2 w q + 2 w kv + 4 n_h``) and the MLP's ``w1`` and ``w3`` outputs (``2 w I``); the
    normed inputs in bf16, the SiLU output and the SwiGLU product are recomputed. Measured with
    ``aot_eager_decomp_partition`` on torchtitan 0.3.0's Llama 3 8B block: 98,440 bytes (tensorwise and
    rowwise alike, + 32 bytes of per-row scales for rowwise) against 139,400 for bf16 linears."""
    h, q, kv, width = layer.hidden_size, layer.q_dim, layer.kv_dim, layer.intermediate_size
    norms = 2 * (w * h + 4) + FP8_BYTES * h
    attention = 2 * w * q + 2 * w * kv + 4 * layer.num_heads
    return norms + attention + 2 * w * width


def cast_transient_bytes(tokens, in_features: int, out_features: int, *, compiled: bool, w: int = 2):
    """Bytes alive at once while one converted linear runs its largest matmul in the backward.

    The grad-input matmul needs grad_output in fp8 (``T x out``) and the weight in fp8 (``in x out``)
    with their scales; the grad-weight matmul then casts grad_output and the input again along the other
    axis (``T x out + T x in``). Compiled (Inductor fuses amax, scale and cast): the fp8 operands of
    the two backward matmuls, ``2 T out + T in + in out`` bytes plus fp32 scales. Eager adds the fp32
    upcast inside ``to_fp8_no_autograd`` and the ``abs`` for the amax of the largest operand
    (``(4 + w) x`` its elements). Documented from the code, not measured (``aot_eager`` does not fuse)."""
    fp8 = FP8_BYTES * (2 * tokens * out_features + tokens * in_features + in_features * out_features)
    scales = SCALE_BYTES * (2 * tokens + 2 * out_features + in_features)
    if compiled:
        return fp8 + scales
    largest = np.maximum(np.maximum(tokens * out_features, tokens * in_features), in_features * out_features)
    return fp8 + scales + (4 + w) * largest


def largest_cast_transient_bytes(layer: LayerSpec, tokens, *, compiled: bool, w: int = 2):
    """``cast_transient_bytes`` of the block's linear with the most elements to cast (the MLP's)."""
    shapes = linear_shapes(layer)
    if not shapes:
        return 0 * tokens
    i, o = max(shapes, key=lambda s: 2 * s[1] + s[0])  # per token: the grad_output casts dominate
    return cast_transient_bytes(tokens, i, o, compiled=compiled, w=w)


HF_PRECISIONS = ("bf16", "bf16-mixed")
"""Precisions the Hugging Face float8 step is priced (and traced) at. bf16-mixed: ``Float8Linear`` casts
its input to the autocast dtype itself and bypasses ``F.linear``, so autocast's bf16 weight copy (2 bytes
per weight, saved for backward) gives way to the fp8 one (1 byte): traced with
``planner.truth.float8_model``'s CPU twin of that cast."""


def hf_linears(layer: LayerSpec) -> list:
    """The block's ``nn.Linear`` modules torchao converts (``planner.truth.float8_model._keep``: dims
    divisible by 16; stacked expert weights are not ``nn.Linear``)."""
    return [lin for lin in (*layer.attention, *layer.mlp)
            if lin.is_module and lin.count == 1 and lin.in_features % 16 == 0 and lin.out_features % 16 == 0]


def hf_unpriced_reason(spec, setup) -> str | None:
    """Why the Hugging Face stack's float8 (``planner.truth.float8_model``: torchao's default tensorwise
    recipe, every decoder linear, the head kept in bf16) is not priced for ``setup`` (None: it is)."""
    if setup.method != "full":
        return f"float8 with method {setup.method}: priced for full training (torchao converts base linears only)"
    if setup.precision not in HF_PRECISIONS:
        return f"float8 at precision {setup.precision}: priced at {' or '.join(HF_PRECISIONS)}"
    if setup.precision == "bf16-mixed" and setup.checkpointing != "none":
        return "float8 under bf16 autocast with checkpointing: not traced; use checkpointing none or precision bf16"
    if setup.zero == 3 or setup.tensor_parallel > 1 or setup.pipeline_parallel > 1 or setup.context_parallel > 1:
        return "float8 priced on replicated weights (zero <= 2, no tensor, pipeline or context parallelism)"
    if any(layer.num_experts for layer in spec.layers):
        return "float8 on mixture-of-experts models is not priced (expert weights are not nn.Linear)"
    return None


def hf_saved_weight_bytes(spec, setup) -> float:
    """Bytes float8 adds to (or, negative, removes from) what the Hugging Face step keeps from forward to
    backward, tensorwise, eager.

    bf16 (no autocast): each converted weight's fp8 copy and its fp32 scale (``saved_weight_bytes``).
    Measured: +121,634,872 bytes on two Llama-3.2-1B blocks (60.8 M converted weights each).
    bf16-mixed: the fp8 copy (1 byte) replaces autocast's bf16 copy (2 bytes): ``-W + 4 n`` for ``W``
    converted weight elements in ``n`` linears. Measured: -121,634,760 on the same two blocks. (The
    forward also loses autocast's cached bf16 bias copies, 2 bytes per bias element, freed at the end of
    the forward: not subtracted, 4,608 bytes on two Qwen2.5-0.5B blocks.)"""
    total = 0.0
    for layer in spec.layers:
        linears = hf_linears(layer)
        weights = sum(lin.weight_params for lin in linears)
        scales = SCALE_BYTES * len(linears)
        if setup.precision == "bf16-mixed":
            total += -weights + scales
        elif setup.checkpointing == "full":
            total += 0
        elif setup.checkpointing == "selective":
            total += scales
        else:
            total += FP8_BYTES * weights + scales
    return total


def gathered_block_bytes(layer: LayerSpec, layer_params, w: int, shard: int, fp8_all_gather: bool):
    """Bytes of one block's parameters as FSDP2 all-gathers them (``fully_shard(block)``).

    bf16 all-gather (torchao's default, torchtitan 0.3.0's only mode): ``w P_l``. With
    ``enable_fsdp_float8_all_gather`` (torchao 0.11 ``WeightWithDynamicFloat8CastTensor``: tensorwise
    recipe; older torchtitan ``float8.enable_fsdp_float8_all_gather``) ``fsdp_pre_all_gather`` casts each
    converted weight's local shard to fp8 (``P_lin / shard`` bytes) and the gathered weight is that fp8
    tensor (1 byte per element); the norms stay at ``w``. The gathered fp8 weight is what the linear's
    autograd function saves, and FSDP2 frees its storage at reshard, so nothing more is kept."""
    if not fp8_all_gather:
        return w * layer_params
    converted = converted_params(layer)
    return w * (layer_params - converted) + FP8_BYTES * converted + FP8_BYTES * converted / shard
