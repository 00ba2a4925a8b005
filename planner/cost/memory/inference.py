"""Serving memory per GPU of the simple model: weights, the KV cache, the prefill transient.

Two phases, prefill (a chunk of the prompt through one layer at a time) and decode (one token per
sequence); the peak is the larger. ``planner.cost.serving.capacity`` builds vLLM's paged-cache view on these
functions. Vectorized over the batch and the context length like the training formulas.
"""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory.states import nf4_bytes
from planner.specs.model import ModelSpec


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def weight_bytes_inference(spec: ModelSpec, weight_dtype: str) -> float:
    """Serving weights: bf16/fp16/fp32 as stored; int8 (LLM.int8, one fp32 scale per output
    row) and nf4 (QLoRA layout with double quantization) for the projections, the rest in bf16."""
    counts = spec_facts.param_counts(spec)
    projections = spec_facts.projection_params(spec)
    rest = counts.total - projections
    if weight_dtype in ("bf16", "fp16"):
        return 2.0 * counts.total
    if weight_dtype == "fp32":
        return 4.0 * counts.total
    rows = sum(lin.out_features * lin.count for layer in spec.layers for lin in layer.linears)
    if weight_dtype == "int8":
        return projections + 4.0 * rows + 2.0 * rest
    return float(nf4_bytes(projections, 64, True)) + 2.0 * rest


def kv_cache_bytes(spec: ModelSpec, batch, context_len, kv_dtype_bytes: float):
    """K and V of every layer for every cached token: 2 x layers x kv_heads x head_dim, so
    grouped-query and multi-query attention shrink it by heads / kv_heads."""
    per_token = sum(2 * layer.kv_dim for layer in spec.layers) * kv_dtype_bytes
    return _arr(batch) * _arr(context_len) * per_token


def prefill_activation_bytes(spec: ModelSpec, batch, chunk_tokens, dtype_bytes: float = 2.0):
    """Transient of one layer's forward over a prefill chunk (nothing is saved in inference):
    the residual, the norm output, q/k/v and attention output, the MLP's widest intermediates;
    plus the fp32 logits of the last position of each sequence (``logits_to_keep=1``)."""
    tokens = _arr(batch) * _arr(chunk_tokens)
    widest = 0.0
    for layer in spec.layers:
        inter = layer.intermediate_size or layer.expert_intermediate_size * layer.experts_per_token
        mlp = (3 if layer.gated_mlp else 2) * inter
        attn = 2 * layer.q_dim + 2 * layer.kv_dim
        widest = max(widest, 2 * layer.hidden_size + max(mlp, attn))
    return tokens * widest * dtype_bytes + _arr(batch) * spec.vocab_size * 4.0


def inference_memory(spec: ModelSpec, setup, batch=None, context_len=None):
    """Serving memory per GPU (a ``planner.cost.memory.phases.MemoryEstimate``): weights, KV cache for
    ``batch x context_len``, prefill transient (arrays for ``batch`` / ``context_len`` override
    the set-up's numbers)."""
    from planner.cost.memory.phases import MemoryEstimate  # memory re-exports this module's functions
    from planner.units import DTYPE_BYTES

    batch = _arr(setup.batch if batch is None else batch)
    context = _arr(setup.context_len if context_len is None else context_len)
    tp = setup.tensor_parallel
    weights = weight_bytes_inference(spec, setup.weight_dtype) / tp
    kv = kv_cache_bytes(spec, batch, context, DTYPE_BYTES[setup.kv_dtype]) / tp
    chunk = np.minimum(setup.prefill_chunk or context, context)
    prefill = prefill_activation_bytes(spec, batch, chunk) / tp
    components = {"weights": _arr(weights) + 0 * kv, "kv_cache": kv, "prefill_activations": prefill}
    phases = {"prefill": weights + kv + prefill, "decode": weights + kv + prefill_activation_bytes(spec, batch, 1) / tp}
    peak = np.maximum(phases["prefill"], phases["decode"])
    return MemoryEstimate(components, phases, peak, np.where(phases["prefill"] >= phases["decode"], "prefill", "decode"))
