"""Training memory of the torchtune stack by phase: its single-device and FSDP recipes put together.

Owns the composition of one torchtune step (``torchtune_memory``) from the per-tensor byte counts
of ``planner.cost.memory.torchtune_tensors`` (each checked against torchtune's own model code on fake
tensors): weights, gradients and optimizer states at the model's one dtype (torchtune has no
autocast and no fp32 master copy), LoRA adapters at that dtype, torchao NF4 for QLoRA, the RoPE
cache buffers, every layer's saved tensors, the head and the loss with or without chunked
cross-entropy, optimizer-in-backward (gradients freed as they are made), paged 8-bit states
(outside PyTorch's allocator), activation offloading (checkpointed inputs on the host) and
packed batches (the dense block-causal mask). Phases as ``planner.cost.memory.phases``: forward (at the
loss), backward (at the loss's backward, or where a checkpointed layer is recomputed, or at its
end), optimizer. Sharding with ``zero=3`` is FSDP2's: parameters, gradients and states divided
by the data-parallel GPUs, one layer's parameters gathered at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import torchtune_tensors as tt
from planner.cost.memory.states import ADAM8BIT_MIN_SIZE, adam8bit_state_bytes, nf4_params
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

PAGED_MIN_ELEMENTS = 100_000
"""bitsandbytes pages a state buffer (``cudaMallocManaged``, outside PyTorch's allocator) from
1e5 elements (``F.get_paged`` in ``Optimizer8bit.get_state_buffer``); smaller ones are tensors."""
INDEX_BYTES = 8  # int64 tokens, labels and the shifted labels
NF4_DEQUANT_BYTES_PER_WEIGHT = 14.05
"""Transient of torchao 0.11's ``NF4Tensor.get_original_weight`` (every ``LinearNF4`` forward and
backward) per weight, bf16: the two halves' codes as int64 (4 + 4 bytes per weight), their table
lookups (1 + 1), the scaled halves (1 + 1) and the stacked result (2), plus the dequantized
scalers; all alive at the final ``torch.stack``. Measured 14.047 with MemTracker on real CPU
tensors of three shapes (constant per weight)."""
NF4_BACKWARD_HIDDEN_GRADS = 4
"""Hidden-sized (``w h`` per token) gradients alive beside a recomputed layer when a base weight
is dequantized for its backward (measured on Llama-2-7B-shaped layers at 2 and 3 layers: 4)."""


def _arr(x):
    return np.asarray(x, dtype=np.float64)


class TorchtuneStates(NamedTuple):
    """Bytes per GPU that do not grow with the tokens."""

    weights: object
    buffers: float
    gradients: object
    states: object
    scratch: object  # the optimizer step's temporaries
    host: object  # paged optimizer states (CUDA managed memory, not counted by the allocator)


def rope_cache_bytes(spec: ModelSpec, method: str) -> float:
    """The RoPE cache buffers, built to the config's context: ``max_seq_len x head_dim`` fp32 values
    (cos and sin interleaved; Qwen2 keeps a ``max_seq_len x head_dim`` table of each), once per model, except that the LoRA
    builders of Llama-2/3, Qwen2 and Mistral build one per layer's attention (torchtune 0.6.1's
    ``lora_*_self_attention``); Llama 3.1/3.2's LoRA builders share one."""
    layer = spec.layers[0]
    context = spec.max_position_embeddings or 4096
    per_module = 4.0 * context * layer.head_dim * (2 if tt.rope_kind(spec.model_type) == "half" else 1)
    scaled = (spec.config.get("rope_scaling") or {}).get("rope_type") == "llama3"
    per_layer = method != "full" and spec.model_type in ("qwen2", "mistral", "llama") and not scaled
    return per_module * (spec.num_layers if per_layer else 1)


def _optimizer_bytes(spec: ModelSpec, setup: TrainingSetup, trainable, shapes, w: int) -> tuple:
    """(device states, host states, step scratch) of the optimizer over ``trainable`` elements."""
    paged = setup.optimizer == "paged-adamw-8bit"
    if setup.optimizer == "adamw":
        states, scratch = 2.0 * w * trainable, (w * trainable if setup.optimizer_impl == "foreach" else 0 * trainable)
        host = 0 * trainable
    elif setup.optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        big = [(r, c) for r, c in shapes if r * (c or 1) >= (PAGED_MIN_ELEMENTS if paged else ADAM8BIT_MIN_SIZE)]
        small = [(r, c) for r, c in shapes if (r, c) not in set(big)] if paged else []
        eight = adam8bit_state_bytes(shapes if not paged else big, 4.0)
        absmax = 2 * 4 * sum(np.ceil(r * (c or 1) / 256) for r, c in big)
        host = _arr(eight - absmax if paged else 0.0)
        states = _arr((absmax + adam8bit_state_bytes(small, 4.0)) if paged else eight)
        scratch = 0 * trainable
        scale = trainable / max(float(np.max(trainable)), 1.0)
        states, host = states * scale, host * scale
    else:
        raise ValueError(setup.optimizer)
    if setup.optimizer_in_backward:
        scratch = 0 * trainable
    return states, host, scratch


def torchtune_states(spec: ModelSpec, setup: TrainingSetup, rank) -> TorchtuneStates:
    """Weights, buffers, gradients and optimizer states per GPU (arrays over LoRA ranks)."""
    w = tt.dtype_bytes(setup.precision)
    counts = spec_facts.param_counts(spec)
    shard = setup.data_parallel if setup.zero == 3 else 1
    if setup.method == "full":
        weights = _arr(counts.total * w)
        trainable = _arr(counts.total)
        shapes = spec_facts.full_tensor_shapes(spec)
    else:
        adapters = spec_facts.lora_params_per_rank(spec, setup.lora_targets) * _arr(rank)
        base = counts.total * w
        if setup.method == "qlora":
            # torchtune's QLoRA builders swap the nn.Linear projections for FrozenNF4Linear; 3-D expert stacks (no
            # mixture of experts passes require_priced on this stack today) would stay in the base dtype
            quantized = nf4_params(spec)
            base = quantized * tt.nf4_bytes_per_weight(setup.qlora_block_size) + (counts.total - quantized) * w
        weights = base + adapters * w
        trainable = adapters
        shapes = tuple((r, c) for r, c in _lora_shapes(spec, setup, int(np.max(rank))))
    gradients = 0 * trainable if setup.optimizer_in_backward else trainable * w
    states, host, scratch = _optimizer_bytes(spec, setup, trainable, shapes, w)
    buffers = rope_cache_bytes(spec, setup.method)
    return TorchtuneStates(weights / shard, buffers, gradients / shard, states / shard, scratch / shard, host / shard)


def _lora_shapes(spec: ModelSpec, setup: TrainingSetup, rank: int):
    for _, lin in spec_facts.lora_linears(spec, setup.lora_targets):
        yield (rank, lin.in_features)
        yield (lin.out_features, rank)


class TorchtuneActivations(NamedTuple):
    """Token-dependent bytes of one micro-batch per GPU."""

    layers: object  # what the layers keep for backward on the device
    largest_layer: object  # one layer's full saved set (what a checkpointed layer's recompute rebuilds)
    head: object  # final norm, head input, token ids and labels, the packed mask
    loss_forward: object
    loss_backward: object
    host: object  # offloaded checkpoint inputs
    dequant: object  # QLoRA: the forward's and the backward's peaks while a base weight is dequantized


def torchtune_activations(spec: ModelSpec, setup: TrainingSetup, b, s, rank) -> TorchtuneActivations:
    """What one micro-batch of ``b`` sequences of ``s`` tokens saves, by the stack's inventory."""
    tokens = b * s
    common = dict(precision=setup.precision, method=setup.method, lora_rank=rank, lora_targets=setup.lora_targets,
                  micro_batch=b, seq_len=s, rope=tt.rope_kind(spec.model_type), packed=setup.packed)
    kept, full, largest = 0.0, 0.0, 0.0
    for index, layer in enumerate(spec.layers):
        first = index == 0
        every = tt.layer_saved_bytes_per_token(layer, **common, first_layer=first, compiled=setup.compile) * tokens
        full, largest = full + every, np.maximum(largest, every)
        if setup.checkpointing == "full":
            kept = kept + tokens * tt.layer_saved_bytes_per_token(
                layer, **common, checkpointing="full", offload=setup.activation_offload, first_layer=first)
    if setup.checkpointing == "none":
        kept = full
    w_h = tokens * tt.dtype_bytes(setup.precision) * spec.hidden_size
    host = w_h * spec.num_layers if setup.activation_offload else 0 * tokens
    if setup.activation_offload and setup.method != "full":
        # the frozen embedding's output needs no gradient: the offloading hooks leave the first
        # checkpointed layer's input on the device (measured)
        kept, host = kept + w_h, host - w_h
    adapted_head = "lm_head" in setup.lora_targets or "output" in setup.lora_targets
    head = tokens * (tt.head_saved_bytes_per_token(spec, precision=setup.precision, method=setup.method,
                                                   apply_lora_to_output=adapted_head, lora_rank=rank)
                     + 3 * INDEX_BYTES)
    if setup.packed:
        head = head + tt.packed_mask_bytes(b, s) + INDEX_BYTES * tokens
    chunks = setup.loss_chunks if setup.loss_impl == "chunked" else 0
    loss = tt.loss_extra_bytes(spec, tokens, precision=setup.precision, output_chunks=chunks,
                               head_trainable=setup.method == "full" or adapted_head, compiled=setup.compile)
    dequant = _dequant_peaks(spec, setup, kept, largest, tokens)
    return TorchtuneActivations(kept, largest, head, loss["forward"], loss["backward"], host, dequant)


def _dequant_peaks(spec: ModelSpec, setup: TrainingSetup, kept, largest, tokens) -> tuple:
    """(forward, backward) activation bytes while QLoRA dequantizes the largest NF4 weight: in
    forward at the last layer's MLP (with checkpointing only the layer input and the MLP's
    activations are live beside the kept inputs), in backward while that layer is recomputed and
    its base weights are dequantized again for their input gradients."""
    if setup.method != "qlora":
        return 0 * tokens, 0 * tokens
    w = tt.dtype_bytes(setup.precision)
    layer = max(spec.layers, key=lambda lay: lay.intermediate_size)
    transient = NF4_DEQUANT_BYTES_PER_WEIGHT * spec_facts.largest_projection(spec)
    if setup.checkpointing == "full":
        forward = kept + tokens * w * (layer.hidden_size + 2 * layer.intermediate_size) + transient
        backward = kept + largest + NF4_BACKWARD_HIDDEN_GRADS * tokens * w * layer.hidden_size + transient
    else:
        forward = kept + transient
        backward = kept + NF4_BACKWARD_HIDDEN_GRADS * tokens * w * layer.hidden_size + transient
    return forward, backward


def _embedding_transient(spec: ModelSpec, setup: TrainingSetup) -> float:
    """When the backward ends with a tied, trained embedding, autograd holds the head's gradient,
    the embedding's and their sum: two table-sized gradients beyond the one kept (as in the HF
    stack, ``planner.cost.memory.phases.embedding_backward_bytes``); none with optimizer-in-backward
    (each gradient is consumed by its step) or a frozen embedding."""
    if setup.method != "full" or not spec.tied_embeddings or setup.optimizer_in_backward:
        return 0.0
    shard = setup.data_parallel if setup.zero == 3 else 1
    return 2.0 * spec.vocab_size * spec.hidden_size * tt.dtype_bytes(setup.precision) / shard


def torchtune_phases(spec: ModelSpec, setup: TrainingSetup, states: TorchtuneStates,
                     acts: TorchtuneActivations) -> dict:
    """Live bytes on one GPU at the peak of forward, backward and the optimizer step."""
    static = states.weights + states.buffers + states.states
    grads_in_forward = states.gradients if setup.grad_accum > 1 else 0.0
    saved = acts.layers + acts.head
    forward = static + grads_in_forward + np.maximum(saved + acts.loss_forward, acts.dequant[0])
    backward = static + grads_in_forward + np.maximum(saved + acts.loss_backward, acts.dequant[1])
    if setup.checkpointing == "full":
        # the last layer recomputed: its whole saved set beside the kept inputs, the loss released
        backward = np.maximum(backward, static + grads_in_forward + saved + acts.largest_layer
)
    backward = np.maximum(backward, static + states.gradients + _embedding_transient(spec, setup))
    optimizer = static + states.gradients + states.scratch
    return {"forward": forward, "backward": backward, "optimizer": optimizer + 0 * forward}


def torchtune_phases_and_components(spec: ModelSpec, setup: TrainingSetup, b, s, rank) -> tuple[dict, dict]:
    """(phases, components) of one torchtune step, arrays over ``b``, ``s`` and ``rank``."""
    states = torchtune_states(spec, setup, rank)
    acts = torchtune_activations(spec, setup, b, s, rank)
    zero = 0 * b * s
    components = {
        "weights": states.weights + zero,
        "buffers": states.buffers + zero,
        "gradients": states.gradients + zero,
        "optimizer_states": states.states + zero,
        "optimizer_temporaries": states.scratch + zero,
        "activations": acts.layers + acts.head,
        "loss_temporaries": acts.loss_backward + zero,
        "host_optimizer_states": states.host + zero,
        "host_activations": acts.host + zero,
    }
    return torchtune_phases(spec, setup, states, acts), components
