"""Serving memory: weights by storage format, the KV cache, and paged KV blocks as vLLM allocates them.

Everything is per GPU of a tensor-parallel group of ``tensor_parallel`` GPUs (weights and KV
heads split evenly, as Megatron-style TP does). Functions take scalars or numpy arrays for the
batch and the context length; the categorical choices (model, GPU, dtypes) are fixed per call.
Time and cost (prefill, decode, $ per token) are in :mod:`planner.cost.serving.throughput`.

vLLM's KV-cache sizing, read from its worker (``Worker.determine_num_available_blocks`` in
vllm/worker/worker.py; the v1 worker computes the same budget): after loading the weights it runs
one forward pass over ``max_num_batched_tokens`` dummy tokens, takes the peak GPU memory of the
process, and gives the KV cache
``num_gpu_blocks = (total_gpu_memory * gpu_memory_utilization - peak_memory) // cache_block_size``
with ``cache_block_size = block_size * num_layers * 2 * num_kv_heads_per_gpu * head_dim * dtype_bytes``
(``CacheEngine.get_cache_block_size``). A sequence holds ``ceil(tokens / block_size)`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory.inference import kv_cache_bytes, prefill_activation_bytes, weight_bytes_inference
from planner.errors import PlannerError
from planner.specs.hardware import CUDA_CONTEXT_BYTES, GpuSpec
from planner.specs.model import ModelSpec
from planner.units import GiB

VLLM_BLOCK_SIZE_TOKENS = 16
"""vLLM's default ``--block-size`` on CUDA (engine arguments: choices 8, 16, 32; default 16)."""
VLLM_GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default ``--gpu-memory-utilization``: the share of device memory the engine may use."""

WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8", "int4", "nf4")
KV_DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0, "int8": 1.0}
INT4_GROUP_SIZE = 128
"""GPTQ/AWQ checkpoints (AutoGPTQ, AutoAWQ defaults): 4-bit weights with one fp16 scale and one
4-bit zero point per group of 128 input channels: 4 + 16/128 + 4/128 = 4.16 bits per weight."""


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def _projection_params(spec: ModelSpec) -> int:
    return spec_facts.projection_params(spec)


def serving_weight_bytes(spec: ModelSpec, weight_dtype: str) -> float:
    """Bytes of all weights (every GPU of a TP group together) in a serving format.

    bf16/fp16/fp32/int8/nf4 as ``planner.cost.memory.inference.weight_bytes_inference`` lays them out; fp8
    (TensorRT-LLM / vLLM FP8 checkpoints: the projections in 1 byte with per-tensor scales, the
    embeddings, norms and head in 16 bit) and int4 (GPTQ/AWQ, see ``INT4_GROUP_SIZE``) here.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise PlannerError(f"unknown weight dtype {weight_dtype!r}; known: {', '.join(WEIGHT_DTYPES)}")
    return spec_facts.cached(spec, ("serving_weights", weight_dtype), lambda: _weight_bytes(spec, weight_dtype))


def _weight_bytes(spec: ModelSpec, weight_dtype: str) -> float:
    if weight_dtype in ("fp8", "int4"):
        projections = _projection_params(spec)
        rest = spec_facts.param_counts(spec).total - projections
        bits = 8.0 if weight_dtype == "fp8" else 4.0 + (16.0 + 4.0) / INT4_GROUP_SIZE
        return projections * bits / 8.0 + 2.0 * rest
    return float(weight_bytes_inference(spec, weight_dtype))


def kv_dtype_bytes(kv_dtype: str) -> float:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise PlannerError(f"unknown KV-cache dtype {kv_dtype!r}; known: {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[kv_dtype]


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str) -> float:
    """K and V of every layer for one cached token, all GPUs together (``inference_memory.kv_cache_bytes``)."""
    size = kv_dtype_bytes(kv_dtype)
    return spec_facts.cached(spec, ("kv_per_token", size), lambda: float(kv_cache_bytes(spec, 1, 1, size)))


def _check_tp(spec: ModelSpec, tensor_parallel: int) -> None:
    if tensor_parallel < 1:
        raise PlannerError(f"tensor parallel size must be at least 1, got {tensor_parallel}")
    heads = spec.layers[0].num_heads
    if heads % tensor_parallel:
        raise PlannerError(
            f"{spec.name}: {heads} attention heads cannot be split over tensor parallel {tensor_parallel}; "
            f"use a divisor of {heads}"
        )


def kv_heads_per_gpu(spec: ModelSpec, tensor_parallel: int) -> float:
    """vLLM replicates KV heads when TP exceeds them (``ModelConfig.get_num_kv_heads``:
    ``max(1, kv_heads // tp)``): per-GPU KV shrinks with TP only down to one head."""
    kv = spec.layers[0].num_kv_heads
    return max(1.0, kv / tensor_parallel)


def kv_bytes_per_token_per_gpu(spec: ModelSpec, kv_dtype: str, tensor_parallel: int = 1) -> float:
    kv = spec.layers[0].num_kv_heads
    return kv_bytes_per_token(spec, kv_dtype) * kv_heads_per_gpu(spec, tensor_parallel) / kv


def vllm_scheduler_defaults(gpu: GpuSpec, usage: str = "server") -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) that vLLM picks when none are given.

    ``EngineArgs.get_batch_defaults`` (vllm/engine/arg_utils.py, v1 engine): GPUs with at least
    70 GiB that are not A100s get 8192 tokens (``vllm serve``) or 16384 (offline ``LLM``) and
    1024 sequences; other GPUs 2048 or 8192 tokens and 256 sequences.
    """
    if usage not in ("server", "offline"):
        raise PlannerError(f"usage must be 'server' or 'offline', got {usage!r}")
    big = gpu.memory_bytes >= 70 * GiB and "a100" not in gpu.name.lower()
    if big:
        return (8192 if usage == "server" else 16384), 1024
    return (2048 if usage == "server" else 8192), 256


@dataclass(frozen=True)
class PagedKv:
    """The KV cache one GPU of the group gets, in vLLM's blocks."""

    weights_bytes: float  # per GPU
    profile_activation_bytes: float  # peak of vLLM's profiling forward pass, per GPU
    non_torch_bytes: float  # CUDA context, counted in vLLM's peak
    kv_budget_bytes: float  # total * utilization - peak, per GPU (negative: the weights do not fit)
    block_bytes: float  # per GPU
    block_size: int
    num_blocks: int
    max_num_seqs: int

    @property
    def max_cached_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_per_sequence(self, tokens):
        """``ceil(tokens / block_size)``: the last block of a sequence is partly empty."""
        return np.ceil(_arr(tokens) / self.block_size)

    def max_concurrent_sequences(self, tokens):
        """Sequences of ``tokens`` tokens (prompt + output) that fit at once, capped by ``max_num_seqs``."""
        per = np.maximum(self.blocks_per_sequence(tokens), 1.0)
        return np.minimum(np.floor(self.num_blocks / per), self.max_num_seqs)


def paged_kv(
    spec: ModelSpec,
    gpu: GpuSpec,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    tensor_parallel: int = 1,
    *,
    block_size: int = VLLM_BLOCK_SIZE_TOKENS,
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
) -> PagedKv:
    """vLLM's number of KV blocks per GPU (module docstring), with our estimate of its peak:
    weights / TP, the activations of one forward over ``max_num_batched_tokens`` tokens in
    ``max_num_seqs`` sequences (``inference_memory.prefill_activation_bytes``, fp32 logits of each
    sequence's last token), and the CUDA context (``CUDA_CONTEXT_BYTES``)."""
    _check_tp(spec, tensor_parallel)
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise PlannerError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if block_size < 1:
        raise PlannerError(f"block size must be a positive number of tokens, got {block_size}")
    default_tokens, default_seqs = vllm_scheduler_defaults(gpu)
    tokens = int(max_num_batched_tokens or default_tokens)
    seqs = int(max_num_seqs or default_seqs)
    weights = serving_weight_bytes(spec, weight_dtype) / tensor_parallel
    activations = float(prefill_activation_bytes(spec, seqs, max(tokens / seqs, 1.0))) / tensor_parallel
    budget = gpu.memory_bytes * gpu_memory_utilization - (weights + activations + CUDA_CONTEXT_BYTES)
    block = block_size * kv_bytes_per_token_per_gpu(spec, kv_dtype, tensor_parallel)
    blocks = int(max(budget, 0.0) // block)
    return PagedKv(weights, activations, float(CUDA_CONTEXT_BYTES), float(budget), float(block), block_size, blocks, seqs)


def largest_batch(paged: PagedKv, context_tokens):
    """Largest number of sequences of ``context_tokens`` (prompt + output) served at once."""
    return paged.max_concurrent_sequences(context_tokens)


def longest_context(paged: PagedKv, spec: ModelSpec):
    """Longest single sequence: every block to one sequence, capped by the model's positions."""
    limit = spec.max_position_embeddings or paged.max_cached_tokens
    return min(paged.max_cached_tokens, limit)


def expert_read_fraction(spec: ModelSpec, batch):
    """Expected share of a MoE layer's experts that ``batch`` tokens touch in one decode step:
    1 - (1 - k/E)^batch with uniform routing (an assumption; real routers are skewed)."""
    share = spec_facts.cached(spec, ("expert_share",), lambda: next(
        (lay.experts_per_token / lay.num_experts for lay in spec.layers if lay.num_experts), 1.0))
    return 1.0 - (1.0 - share) ** _arr(batch)


def _decode_weight_parts(spec: ModelSpec, weight_dtype: str) -> tuple[float, float]:
    """(bytes every decode step reads, bytes of the routed experts)."""
    return spec_facts.cached(spec, ("decode_weights", weight_dtype), lambda: _decode_parts(spec, weight_dtype))


def _decode_parts(spec: ModelSpec, weight_dtype: str) -> tuple[float, float]:
    total = serving_weight_bytes(spec, weight_dtype)
    counts = spec_facts.param_counts(spec)
    rest_per_param = 4.0 if weight_dtype == "fp32" else 2.0
    projections = _projection_params(spec)
    per_projection = (total - (counts.total - projections) * rest_per_param) / projections
    embedding = 0.0 if spec.tied_embeddings else counts.embedding * rest_per_param
    routed = sum(lin.weight_params for layer in spec.layers for lin in layer.experts) * per_projection
    return total - embedding - routed, routed


def decode_weight_bytes(spec: ModelSpec, weight_dtype: str, batch=1):
    """Weight bytes one decode step reads, all GPUs together: everything but the input
    embedding table (a lookup of ``batch`` rows; read as the head when tied), routed experts
    scaled by :func:`expert_read_fraction`. Embeddings stay 16-bit in quantized formats."""
    fixed, routed = _decode_weight_parts(spec, weight_dtype)
    return fixed + routed * expert_read_fraction(spec, batch)
