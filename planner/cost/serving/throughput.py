"""Serving time and cost: prefill (compute-bound), decode (memory-bound), throughput, $ per token.

A roofline per phase on each GPU of a tensor-parallel group (Williams et al. 2009, "Roofline";
applied to LLM inference by Pope et al. 2022, "Efficiently Scaling Transformer Inference", sec. 2):

- prefill of ``batch`` prompts of ``input_tokens``: the projections' 2 N FLOPs per token, causal
  attention over half the square (flash kernels skip masked tiles: Dao 2023, sec. 3.1.1), the head
  on the last position only (vLLM computes logits for the sampled position), against the weights
  read once; whichever is slower at the achieved rates below;
- one decode step of ``batch`` sequences holding ``context`` tokens: every weight but the input
  embedding read once (the batch amortises it), plus each sequence's KV cache, against
  2 N FLOPs per token and the attention over the context;
- tensor parallelism: two all-reduces of the hidden state per layer (Shoeybi et al. 2019, sec. 3);
- a fixed cost per layer per step (kernel launches and tails of small kernels) and a host floor
  per decode step (the engine's Python scheduler and sampler; a step is never faster).

The achieved rates are :class:`ServingEfficiency`; its defaults are fitted to the published
measurements in ``models_catalog/measurements/serving.csv`` by ``benchmarks/bench_serving.py``
(leave-one-source-out errors there and in the class docstring). Everything is vectorized over
``batch``, ``input_tokens`` and ``output_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from planner.cost import spec_facts
from planner.cost.flops import linear_forward_flops
from planner.cost.serving.capacity import (
    PagedKv,
    _check_tp,
    decode_weight_bytes,
    kv_bytes_per_token,
    paged_kv,
    serving_weight_bytes,
)
from planner.cost.timing.step_time import price_usd_per_gpu_hour
from planner.errors import PlannerError
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.units import SECONDS_PER_HOUR

CAUSAL_ATTENTION_FRACTION = 0.5
"""Share of the ``s x s`` square that causal flash kernels compute (Dao 2023, FlashAttention-2, 3.1.1)."""


@dataclass(frozen=True)
class ServingEfficiency:
    """Achieved rates of a serving engine, as shares of the datasheet peaks, and fixed costs.

    Defaults: fitted (rounded to two digits) by ``benchmarks/bench_serving.py`` to the 71 16-bit
    and FP8 rows of ``models_catalog/measurements/serving.csv`` from four sources: the Qwen2 and
    Qwen2.5 speed benchmarks (vLLM 0.4.2 and 0.6.3, A100, batch 1, 1 to 129k-token prompts) and
    the TensorRT-LLM performance tables (v0.5 first-token latency, v0.6.1 static-batch
    throughput up to batch 1280; A100 FP16 and H100 FP8). Leave-one-source-out (refit without a
    source, predict it): median |error| 10-23% by source, 90th percentile 28-110%, worst rows
    off by 2.6x (TensorRT-LLM 0.6.1 Llama-2-70B with TP at large batch; vLLM 0.4.2 above 8k-token
    prompts). Priors before the fit, for comparison (median errors 21-98% by source): HBM
    streaming at 85-92% of the datasheet bandwidth (BabelStream, Deakin et al.), large GEMMs at
    75-85% of the dense peak (NVIDIA matmul performance guide), no fixed costs. The fitted
    decode-GEMM share (0.33) is low because the large-batch rows it rests on include engine
    overheads the roofline does not list; the per-layer cost (146 us) absorbs the small-kernel
    inefficiency of batch-1 decoding. A calibration of your own engine replaces all of them.
    """

    bandwidth: float = 0.89  # share of datasheet HBM bandwidth reached by decode kernels
    prefill_flops: float = 0.54  # share of the dense peak reached by prefill
    decode_flops: float = 0.33  # share of the dense peak reached by large-batch decode GEMMs
    layer_overhead_s: float = 146e-6  # per layer per step (and per prefill): launches, small-kernel tails
    host_floor_s: float = 0.0  # a decode step is never faster than this (not identified by the data: 0)
    allreduce_latency_s: float = 36e-6  # per all-reduce of the hidden state (small messages)
    uncertainty: float = 0.25  # typical relative error of a prediction (leave-one-source-out medians 10-23%)


DEFAULT_EFFICIENCY = ServingEfficiency()


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def compute_dtype(gpu: GpuSpec, weight_dtype: str) -> str:
    """The tensor-core precision the matmuls run in: fp8 checkpoints on GPUs with fp8 units,
    fp32 for fp32 weights, bf16 otherwise (int8/int4/nf4 weights are dequantized to 16 bit)."""
    if weight_dtype == "fp8" and "fp8" in gpu.peak_flops:
        return "fp8"
    if weight_dtype in ("fp32", "fp16"):
        return weight_dtype if weight_dtype in gpu.peak_flops else "bf16"
    return "bf16"


def _matmul_flops_per_token(spec: ModelSpec) -> float:
    """2 x (active projection weights) per token: experts at top-k / E (flops.linear_forward_flops)."""
    return spec_facts.cached(spec, ("serving_matmul_flops",), lambda: _matmul_flops(spec))


def _matmul_flops(spec: ModelSpec) -> float:
    total = 0.0
    for layer in spec.layers:
        routed = layer.experts_per_token / layer.num_experts if layer.num_experts else 1.0
        total += sum(linear_forward_flops(lin, 1.0) for lin in layer.attention + layer.mlp)
        total += sum(linear_forward_flops(lin, 1.0, routed) for lin in layer.experts)
        total += linear_forward_flops(layer.router, 1.0) if layer.router is not None else 0.0
    return float(total)


def _head_flops(spec: ModelSpec) -> float:
    return 2.0 * spec.hidden_size * spec.vocab_size


def _attention_width(spec: ModelSpec) -> float:
    """Sum over layers of heads x head_dim: attention FLOPs per (query, key) pair are 4x this."""
    return spec_facts.cached(spec, ("attention_width",), lambda: float(sum(layer.num_heads * layer.head_dim for layer in spec.layers)))


def prefill_flops(spec: ModelSpec, batch, input_tokens):
    """FLOPs of prefilling ``batch`` prompts: projections, causal attention, the head on the last position
    (attention as ``flops.attention_core_forward_flops``, 4 b heads s^2 head_dim per layer, halved)."""
    b, s = _arr(batch), _arr(input_tokens)
    attention = 4.0 * b * np.square(s) * _attention_width(spec) * CAUSAL_ATTENTION_FRACTION
    return _matmul_flops_per_token(spec) * b * s + attention + _head_flops(spec) * b


def decode_step_flops(spec: ModelSpec, batch, context):
    """FLOPs of one decode step: one token per sequence against ``context`` cached tokens."""
    b, c = _arr(batch), _arr(context)
    attention = 4.0 * b * c * _attention_width(spec)
    return (_matmul_flops_per_token(spec) + _head_flops(spec)) * b + attention


def _allreduce_s(spec: ModelSpec, gpu: GpuSpec, tokens, tp: int, eff: ServingEfficiency):
    """Two ring all-reduces of the 16-bit hidden state per layer (2 (t-1)/t of the message each)."""
    if tp == 1:
        return 0.0 * _arr(tokens)
    message = _arr(tokens) * spec.hidden_size * 2.0
    each = eff.allreduce_latency_s + 2.0 * (tp - 1) / tp * message / gpu.interconnect_bandwidth_bytes_per_s
    return 2.0 * spec.num_layers * each


def prefill_time_s(spec, gpu, batch, input_tokens, weight_dtype="bf16", kv_dtype="bf16", tensor_parallel=1,
                   eff: ServingEfficiency = DEFAULT_EFFICIENCY):
    """Time to first token of ``batch`` prompts prefilled together (no chunking)."""
    _check_tp(spec, tensor_parallel)
    peak = gpu.peak_flops_for(compute_dtype(gpu, weight_dtype))
    compute = prefill_flops(spec, batch, input_tokens) / tensor_parallel / (peak * eff.prefill_flops)
    traffic = (serving_weight_bytes(spec, weight_dtype) + _arr(batch) * _arr(input_tokens) * kv_bytes_per_token(spec, kv_dtype))
    memory = traffic / tensor_parallel / (gpu.memory_bandwidth_bytes_per_s * eff.bandwidth)
    tokens = _arr(batch) * _arr(input_tokens)
    return np.maximum(compute, memory) + spec.num_layers * eff.layer_overhead_s + _allreduce_s(spec, gpu, tokens, tensor_parallel, eff)


def decode_step_time_s(spec, gpu, batch, context, weight_dtype="bf16", kv_dtype="bf16", tensor_parallel=1,
                       eff: ServingEfficiency = DEFAULT_EFFICIENCY):
    """One decode step (one output token per sequence) of ``batch`` sequences at ``context`` cached tokens."""
    _check_tp(spec, tensor_parallel)
    b, c = _arr(batch), _arr(context)
    peak = gpu.peak_flops_for(compute_dtype(gpu, weight_dtype))
    compute = decode_step_flops(spec, b, c) / tensor_parallel / (peak * eff.decode_flops)
    traffic = decode_weight_bytes(spec, weight_dtype, b) + b * c * kv_bytes_per_token(spec, kv_dtype)
    memory = traffic / tensor_parallel / (gpu.memory_bandwidth_bytes_per_s * eff.bandwidth)
    device = np.maximum(compute, memory) + spec.num_layers * eff.layer_overhead_s + _allreduce_s(spec, gpu, b, tensor_parallel, eff)
    return np.maximum(device, eff.host_floor_s)


def decode_bound(spec, gpu, batch, context, weight_dtype="bf16", kv_dtype="bf16", tensor_parallel=1,
                 eff: ServingEfficiency = DEFAULT_EFFICIENCY):
    """'memory' or 'compute': which roof a decode step sits under (without the fixed costs)."""
    b, c = _arr(batch), _arr(context)
    peak = gpu.peak_flops_for(compute_dtype(gpu, weight_dtype))
    compute = decode_step_flops(spec, b, c) / (peak * eff.decode_flops)
    memory = (decode_weight_bytes(spec, weight_dtype, b) + b * c * kv_bytes_per_token(spec, kv_dtype)) / (
        gpu.memory_bandwidth_bytes_per_s * eff.bandwidth)
    return np.where(compute > memory, "compute", "memory")


def generation_time_s(spec, gpu, batch, input_tokens, output_tokens, weight_dtype="bf16", kv_dtype="bf16",
                      tensor_parallel=1, eff: ServingEfficiency = DEFAULT_EFFICIENCY):
    """(time to first token, mean time per later output token, end-to-end time) of a batch served
    together: one prefill, then ``output_tokens - 1`` decode steps whose context grows from
    ``input_tokens + 1``; their sum by Simpson's rule (exact for a linear step time)."""
    ttft = prefill_time_s(spec, gpu, batch, input_tokens, weight_dtype, kv_dtype, tensor_parallel, eff)
    steps = np.maximum(_arr(output_tokens) - 1.0, 0.0)
    start = _arr(input_tokens) + 1.0
    def step(context):
        return decode_step_time_s(spec, gpu, batch, context, weight_dtype, kv_dtype, tensor_parallel, eff)
    tpot = (step(start) + 4.0 * step(start + steps / 2.0) + step(start + steps)) / 6.0
    return ttft, tpot, ttft + steps * tpot


def continuous_generation_time_s(spec, gpu, batch, input_tokens, output_tokens, weight_dtype="bf16", kv_dtype="bf16",
                                 tensor_parallel=1, eff: ServingEfficiency = DEFAULT_EFFICIENCY):
    """(time to first token, time per output token, end-to-end time) in the steady state of
    continuous batching (Yu et al. 2022, Orca; vLLM's scheduler): ``batch`` sequences decode
    together; every ``output_tokens`` steps ``batch`` new prompts are prefilled in between (chunked
    prefill), so each step also carries ``batch / output_tokens`` prompts' prefill FLOPs. A new
    request's first token: its own prefill and one step (queueing not modelled)."""
    b, i, o = _arr(batch), _arr(input_tokens), _arr(output_tokens)
    peak = gpu.peak_flops_for(compute_dtype(gpu, weight_dtype))
    interleaved = prefill_flops(spec, b / o, i) / tensor_parallel / (peak * eff.prefill_flops)
    step = decode_step_time_s(spec, gpu, b, i + o / 2.0, weight_dtype, kv_dtype, tensor_parallel, eff)
    tpot = step + interleaved
    ttft = prefill_time_s(spec, gpu, 1.0, i, weight_dtype, kv_dtype, tensor_parallel, eff) + tpot
    return ttft, tpot, ttft + np.maximum(o - 1.0, 0.0) * tpot


SCHEDULING = ("continuous", "static")


@dataclass(frozen=True)
class ServingEstimate:
    """One row per batch size (arrays broadcast over batch, input and output lengths)."""

    batch: object
    ttft_s: object  # time to first token of a request
    tpot_s: object  # mean time per output token after the first, per sequence
    e2e_s: object  # a request from prompt to last token
    output_tokens_per_s: object  # all GPUs of the group
    output_tokens_per_s_per_gpu: object
    usd_per_million_output_tokens: object  # nan when the GPU has no price
    fits: object  # the batch's KV blocks fit (vLLM paging, max_num_seqs)
    bound: object  # 'memory' or 'compute' in the middle of decoding
    paged: PagedKv
    scheduling: str
    uncertainty: float  # typical relative error (ServingEfficiency.uncertainty)


def serving_estimate(spec: ModelSpec, gpu: GpuSpec, *, batch=1, input_tokens=1024, output_tokens=256,
                     weight_dtype: str = "bf16", kv_dtype: str = "bf16", tensor_parallel: int = 1,
                     scheduling: str = "continuous", eff: ServingEfficiency = DEFAULT_EFFICIENCY,
                     paged: PagedKv | None = None, usd_per_gpu_hour: float | None = None) -> ServingEstimate:
    """Latency, throughput, capacity and $ per million output tokens of serving ``spec`` on
    ``tensor_parallel`` x ``gpu`` with ``batch`` concurrent requests (arrays welcome).
    ``scheduling``: "continuous" (vLLM, SGLang, TGI: :func:`continuous_generation_time_s`) or
    "static" (a batch prefilled then decoded together: :func:`generation_time_s`)."""
    b, i, o = (_arr(x) for x in (batch, input_tokens, output_tokens))
    if np.any(b < 1) or np.any(i < 1) or np.any(o < 1):
        raise PlannerError("batch, input tokens and output tokens must be at least 1")
    if scheduling not in SCHEDULING:
        raise PlannerError(f"scheduling must be one of {', '.join(SCHEDULING)}, got {scheduling!r}")
    paged = paged or paged_kv(spec, gpu, weight_dtype, kv_dtype, tensor_parallel)
    timing = continuous_generation_time_s if scheduling == "continuous" else generation_time_s
    ttft, tpot, e2e = timing(spec, gpu, b, i, o, weight_dtype, kv_dtype, tensor_parallel, eff)
    throughput = b / tpot if scheduling == "continuous" else b * o / e2e
    per_gpu = throughput / tensor_parallel
    price = usd_per_gpu_hour if usd_per_gpu_hour is not None else price_usd_per_gpu_hour(gpu)
    usd = (price / SECONDS_PER_HOUR / per_gpu * 1e6) if price is not None else np.full_like(per_gpu, np.nan)
    fits = (b <= paged.max_concurrent_sequences(i + o)) & (paged.num_blocks > 0)
    bound = decode_bound(spec, gpu, b, i + o / 2.0, weight_dtype, kv_dtype, tensor_parallel, eff)
    return ServingEstimate(b + 0 * e2e, ttft, tpot, e2e, throughput, per_gpu, usd, fits, bound, paged, scheduling,
                           eff.uncertainty)


BATCH_GRID = np.unique(np.concatenate([np.arange(1, 17), 2 ** np.arange(5, 12), 3 * 2 ** np.arange(3, 10)])).astype(float)


def at_target_latency(spec: ModelSpec, gpu: GpuSpec, target_tpot_s: float, *, input_tokens=1024, output_tokens=256,
                      weight_dtype="bf16", kv_dtype="bf16", tensor_parallel=1, target_ttft_s: float | None = None,
                      eff: ServingEfficiency = DEFAULT_EFFICIENCY, batches=BATCH_GRID) -> dict:
    """The largest batch whose time per output token (and time to first token, if given) meets
    the target and whose KV cache fits: its throughput per GPU and $ per million output tokens."""
    if target_tpot_s <= 0:
        raise PlannerError(f"target latency must be positive, got {target_tpot_s} s")
    est = serving_estimate(spec, gpu, batch=batches, input_tokens=input_tokens, output_tokens=output_tokens,
                           weight_dtype=weight_dtype, kv_dtype=kv_dtype, tensor_parallel=tensor_parallel, eff=eff)
    ok = est.fits & (est.tpot_s <= target_tpot_s)
    if target_ttft_s is not None:
        ok &= est.ttft_s <= target_ttft_s
    if not np.any(ok):
        best = float(np.min(est.tpot_s[est.fits])) if np.any(est.fits) else float("nan")
        return {"feasible": False, "fastest_tpot_s": best, "estimate": est}
    k = int(np.flatnonzero(ok)[-1])
    return {"feasible": True, "batch": float(est.batch[k]), "tpot_s": float(est.tpot_s[k]), "ttft_s": float(est.ttft_s[k]),
            "output_tokens_per_s_per_gpu": float(est.output_tokens_per_s_per_gpu[k]),
            "usd_per_million_output_tokens": float(est.usd_per_million_output_tokens[k]), "estimate": est}


def with_efficiency(**changes) -> ServingEfficiency:
    """The default efficiencies with some replaced (a calibration or a what-if)."""
    return replace(DEFAULT_EFFICIENCY, **changes)
