"""Weights, gradients, optimizer states and the optimizer step's temporaries, per GPU.

The part of training memory that does not depend on the tokens: bytes per element by precision
and sharding (``dtype_layout``), the quantized storage of QLoRA (``nf4_bytes``), the states of
each optimizer (``optimizer_state_elems``, ``adam8bit_state_bytes``) and the transient the step
allocates (``optimizer_temp_bytes``), put together by ``model_states`` for one set-up. ZeRO
shards states (stage >= 1), gradients (>= 2) and weights (3) over the data-parallel GPUs (times
the context-parallel ones); tensor parallelism splits the full model's tensors, expert parallelism
the routed experts' (``planner.cost.memory.parallel``); a pipeline stage is priced as the model of
its own layers (``planner.cost.memory.pipeline``). A training stack that stores tensors differently
(Megatron's distributed optimizer, torchao's low-precision states) changes this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from planner.cost import params, spec_facts
from planner.cost.memory import dora, galore, zero_dtypes
from planner.cost.memory.parallel import routed_expert_params, sharded_fraction, zero_shard_degree
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

NF4_BITS = 4.0
"""QLoRA (Dettmers et al. 2023, sec. 3): 4-bit NormalFloat data, one fp32 absmax per block of 64;
with double quantization the absmax are 8-bit with one fp32 constant per 256 of them:
8/64 + 32/(64*256) bits per parameter instead of 32/64."""
ADAM8BIT_BLOCK = 256
"""bitsandbytes 8-bit optimizers: block-wise quantization, one fp32 absmax per 256 values per state
(Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"); tensors with fewer than
4096 elements keep 32-bit states (``min_8bit_size=4096``)."""
ADAM8BIT_MIN_SIZE = 4096


def _arr(x):
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of weights / gradients / optimizer states and whether a separate fp32
    master copy exists (DeepSpeed ZeRO with bf16 mixed precision: bf16 working weights)."""

    weight: float
    grad: float
    state: float
    master: float


def dtype_layout(setup: TrainingSetup) -> Bytes:
    """PyTorch autocast keeps fp32 weights (4+4+states in fp32); pure bf16 keeps everything in
    bf16 (torch optimizers store states in the parameter dtype); ZeRO (stage >= 1) with mixed
    precision follows DeepSpeed: bf16 weights and gradients, fp32 master and states (ZeRO's
    2 + 2 + 12 bytes per parameter for Adam, Rajbhandari et al. 2020)."""
    if setup.precision == "fp32":
        return Bytes(4, 4, 4, 0)
    if setup.precision == "bf16":
        return Bytes(2, 2, 2, 0)
    if setup.zero > 0:
        return Bytes(2, 2, 4, 4)
    return Bytes(4, 4, 4, 0)


def adapter_bytes(setup: TrainingSetup) -> float:
    """Bytes per LoRA adapter element (weight, gradient and optimizer state alike): fp32 as peft
    keeps them by default (``autocast_adapter_dtype=True``); with ``adapter_dtype="base"`` the dtype
    of the layer they adapt, which is 16-bit only under pure bf16/fp16 (a 4-bit QLoRA base is not a
    floating dtype, so its adapters stay fp32; torchtune's own stack is priced apart). What peft
    creates: under DeepSpeed ZeRO (stack hf) the states take the dtype DeepSpeed gives the adapters
    (``zero_dtypes.adapter_param_bytes``: ``model_states``' grad_bytes), and ``zero_buffers`` the
    difference of their weights. Activations read this function with ``activation_memory.compute_setup``
    (whose cache key leaves out the ZeRO stage)."""
    base_16bit = setup.method == "lora" and setup.precision in ("bf16", "fp16")
    return 2.0 if setup.adapter_dtype == "base" and base_16bit else 4.0


def optimizer_state_elems(setup: TrainingSetup, trainable: float, tensors) -> float:
    """State elements per trainable parameter set (``tensors``: (rows, cols) of each trainable
    tensor, cols=0 for vectors): AdamW 2 (exp_avg, exp_avg_sq), SGD with momentum 1, Lion 1
    (Chen et al. 2023), Adafactor row + column second moments for matrices and a full vector
    for 1-D tensors (Shazeer & Stern 2018, no first moment as torch's default beta1=None)."""
    if setup.optimizer == "adamw":
        return 2.0 * trainable
    if setup.optimizer in ("sgd", "lion"):
        return 1.0 * trainable
    if setup.optimizer == "adafactor":
        return float(sum((r + c) if c else r for r, c in tensors))
    raise ValueError(setup.optimizer)


def adam8bit_state_bytes(tensors, state_bytes_32: float) -> float:
    """Two 8-bit states plus an fp32 absmax per 256 values; small tensors stay 32-bit."""
    total = 0.0
    for rows, cols in tensors:
        n = rows * (cols or 1)
        if n < ADAM8BIT_MIN_SIZE:
            total += 2 * state_bytes_32 * n
        else:
            total += 2 * (n + 4 * np.ceil(n / ADAM8BIT_BLOCK))
    return total


def nf4_bytes(num_params, block_size: int, double_quant: bool):
    """QLoRA weight storage: 4-bit data plus block constants (see NF4_BITS)."""
    if double_quant:
        constant_bits = 8.0 / block_size + 32.0 / (block_size * 256)
    else:
        constant_bits = 32.0 / block_size
    return _arr(num_params) * (NF4_BITS + constant_bits) / 8.0


def trainable_tensors(spec: ModelSpec, setup: TrainingSetup, rank: int) -> list[tuple[int, int]]:
    """Shapes of the trainable tensors (for Adafactor, 8-bit states and for-loop temporaries)."""
    if setup.method != "full":
        shapes = []
        for _, lin in spec_facts.lora_linears(spec, setup.lora_targets):
            shapes += [(rank, lin.in_features), (lin.out_features, rank)]
        shapes += params.expert_lora_shapes(spec, setup.lora_targets, rank)
        return shapes + dora.magnitude_shapes(spec, setup)
    return list(spec_facts.full_tensor_shapes(spec))


def _tensors(spec: ModelSpec, setup: TrainingSetup, rank: int) -> tuple[tuple[int, int], ...]:
    """``trainable_tensors``, kept per spec (the search asks for the same ones per set-up)."""
    if setup.method == "full":
        return spec_facts.full_tensor_shapes(spec)
    return spec_facts.cached(spec, ("lora_tensors", tuple(setup.lora_targets), rank, setup.dora),
                             lambda: tuple(trainable_tensors(spec, setup, rank)))


def optimizer_temp_bytes(setup: TrainingSetup, trainable, shapes, state_bytes: float):
    """Transient memory of the optimizer step.

    foreach AdamW: one temporary the size of all states of one kind (``_foreach_sqrt``); fused:
    none; for-loop: two of the largest tensor (``exp_avg_sq.sqrt()`` and its division by the
    bias correction coexist). SGD (momentum, in place) and the 8-bit AdamW (a fused kernel)
    make none. Lion (lion-pytorch: ``exp_avg.clone()`` then ``.add(grad)``) two of the largest
    tensor; Adafactor (torch: ``row_var @ col_var``) one of the largest tensor.
    """
    if setup.optimizer in ("sgd", "adamw-8bit"):
        return _arr(0.0)
    if setup.optimizer == "adamw" and setup.optimizer_impl == "foreach":
        return trainable * state_bytes
    if setup.optimizer == "adamw" and setup.optimizer_impl == "fused":
        return _arr(0.0)
    largest = max((r * (c or 1) for r, c in shapes), default=0) * state_bytes
    if setup.optimizer in ("adamw", "lion"):
        return _arr(2 * largest)
    return _arr(largest)


class ModelStates(NamedTuple):
    """Bytes per GPU of what a step holds besides activations (arrays over the LoRA ranks)."""

    weights: object  # the base weights (sharded, quantized for QLoRA)
    adapters: object  # LoRA adapter parameters (elements; stored in fp32)
    gradients: object
    states: object  # optimizer states
    master: object  # fp32 master copy (ZeRO with bf16 mixed precision)
    temporaries: object  # the optimizer step's transient
    grad_bytes: float  # bytes per gradient element (LoRA under DeepSpeed: per adapter element, as it holds them)


def fp32_unquantized(setup: TrainingSetup) -> bool:
    """Whether QLoRA's parameters outside NF4 (embeddings, norms, the head, biases) are fp32: after peft's
    ``prepare_model_for_kbit_training``, which casts every fp16/bf16 parameter that is not a ``Params4bit``
    to fp32 (peft 0.21.2 ``src/peft/utils/other.py``,
    https://github.com/huggingface/peft/blob/v0.21.2/src/peft/utils/other.py), and under mixed precision,
    whose weights are fp32 by definition (autocast over fp32 weights: the prepared model with the HF
    Trainer's ``bf16=True``; the oracle builds the same model). Pure bf16 QLoRA keeps them as loaded."""
    return setup.method == "qlora" and (setup.kbit_preparation or setup.precision in ("bf16-mixed", "fp16-mixed"))


def unquantized_weight_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of QLoRA's parameters that stay out of NF4: 4 when ``fp32_unquantized``, else 2."""
    return 4 if fp32_unquantized(setup) else 2


def nf4_params(spec: ModelSpec) -> int:
    """Weights QLoRA stores in NF4: those of the ``nn.Linear`` modules of the decoder layers. transformers
    5's bitsandbytes integration replaces ``nn.Linear`` only (``integrations/bitsandbytes.py``), so the
    stacked expert parameters and the routers of a mixture of experts stay in the load dtype."""
    return spec_facts.cached(spec, ("nf4_params",), lambda: sum(
        lin.weight_params for layer in spec.layers for lin in layer.linears if lin.is_module))


def _base_weight_bytes(spec: ModelSpec, setup: TrainingSetup, total: int):
    """Frozen base weights of LoRA / QLoRA, whole model (peft keeps adapters apart, in fp32); under
    DeepSpeed ZeRO in the engine's dtype (``zero_dtypes.frozen_weight_bytes``)."""
    deepspeed = zero_dtypes.launched_by_deepspeed(setup)
    if setup.method == "qlora":
        quantized = nf4_params(spec)
        rest_bytes = zero_dtypes.frozen_weight_bytes(setup) if deepspeed else unquantized_weight_bytes(setup)
        rest = (total - quantized) * rest_bytes
        return nf4_bytes(quantized, setup.qlora_block_size, setup.qlora_double_quant) + rest
    if deepspeed:
        return total * zero_dtypes.frozen_weight_bytes(setup)
    base_dtype_bytes = 4 if setup.precision in ("fp32",) else (4 if setup.precision == "bf16-mixed" else 2)
    return total * base_dtype_bytes


def _state_bytes(spec: ModelSpec, setup: TrainingSetup, trainable, shapes, state_bytes: float):
    """Optimizer states of every trainable element, before sharding (scaled with the rank)."""
    largest = max(float(np.max(trainable)), 1.0)
    if setup.optimizer == "galore-adamw":  # planner.cost.memory.galore: projected states and projections
        return _arr(galore.state_bytes(spec, setup, state_bytes))
    if setup.optimizer == "adamw-8bit":
        full = spec_facts.cached(spec, ("adam8bit", shapes, state_bytes), lambda: adam8bit_state_bytes(shapes, state_bytes))
        return _arr(full) * (trainable / largest)
    elems_full = optimizer_state_elems(setup, float(np.max(trainable)), shapes)
    return elems_full * state_bytes * trainable / largest


NOT_READ_BY_STATES = frozenset({"micro_batch", "seq_len", "checkpointing", "attention", "dropout", "lora_dropout"})
"""Set-up fields ``model_states`` does not read (the LoRA ranks come as an array; ``grad_accum`` decides
whether DeepSpeed's ZeRO-1 partitions gradients: ``zero_dtypes.stage1_gradients_partitioned``)."""


def model_states(spec: ModelSpec, setup: TrainingSetup, rank) -> ModelStates:
    """Weights, adapters, gradients, optimizer states, master copy and step temporaries of
    ``setup`` per GPU, over an array of LoRA ranks (the optimizer's states and temporaries
    leave the GPU with ``offload_optimizer``)."""
    reason = zero_dtypes.unpriced_reason(setup)
    if reason:
        from planner.errors import PlannerError

        raise PlannerError(reason)
    counts = spec_facts.param_counts(spec)
    layout = dtype_layout(setup)
    dp, tp = zero_shard_degree(setup), setup.tensor_parallel
    full = setup.method == "full"
    # share of the model on this GPU per sharded kind: ZeRO over data x context ranks, routed
    # experts over the expert-parallel ranks (``memory_parallel.sharded_fraction``)
    experts = routed_expert_params(spec)
    # DeepSpeed's ZeRO-1 without accumulation partitions gradients as ZeRO-2 does (zero_dtypes)
    stage = 2 if zero_dtypes.stage1_gradients_partitioned(setup) else setup.zero
    share = {z: sharded_fraction(counts.total - experts, experts, setup.expert_parallel, dp if stage >= z else 1)
             for z in (1, 2, 3)}
    # LoRA adapters (peft's expert adapters too: not split over expert-parallel GPUs, untraced) shard over ZeRO
    lora_share = {z: 1.0 / (dp if stage >= z else 1) for z in (1, 2)}
    per_rank = spec_facts.lora_params_per_rank(spec, setup.lora_targets) + spec_facts.cached(
        spec, ("expert_lora_per_rank", tuple(setup.lora_targets)),
        lambda: params.expert_lora_params_per_rank(spec, setup.lora_targets))
    adapters = per_rank * rank if not full else _arr(0.0)
    adapters = adapters + dora.magnitude_elems(spec, setup)  # DoRA's magnitude vectors
    if full:
        weights = counts.total * layout.weight / tp * share[3]
        trainable = _arr(counts.total)
        grad_bytes, state_bytes = layout.grad, layout.state
        master = counts.total * layout.master
    else:
        weights = _base_weight_bytes(spec, setup, counts.total) / tp * share[3]
        trainable = adapters
        grad_bytes = state_bytes = adapter_bytes(setup)
        master = 0.0
        if zero_dtypes.launched_by_deepspeed(setup):  # DeepSpeed's adapter dtype, fp32 partition and states, sharded
            grad_bytes, state_bytes = zero_dtypes.adapter_param_bytes(setup), zero_dtypes.FP32_BYTES
            master = adapters * zero_dtypes.master_copy_bytes(setup, grad_bytes) * lora_share[1]
    # full training splits every tensor kind over the tensor-parallel group (the step's
    # temporaries too: each rank steps its own shards); LoRA's adapters are replicated
    split, kind_share = (tp, share) if full else (1, lora_share)
    gradients = trainable * grad_bytes * kind_share[2] / split
    shapes = _tensors(spec, setup, int(np.max(rank)) if not full else 0)
    states = _state_bytes(spec, setup, trainable, shapes, state_bytes) * kind_share[1] / split
    master = _arr(master) * share[1] / tp if full else _arr(master)
    temporaries = optimizer_temp_bytes(setup, trainable, shapes, state_bytes) * kind_share[1] / split
    if setup.optimizer == "galore-adamw":  # planner.cost.memory.galore: a projection-update step's transient
        temporaries = _arr(galore.temporary_bytes(spec, setup, state_bytes))
    if setup.offload_optimizer:
        states, master, temporaries = states * 0, master * 0, temporaries * 0
    return ModelStates(weights, adapters, gradients, states, master, temporaries, grad_bytes)
