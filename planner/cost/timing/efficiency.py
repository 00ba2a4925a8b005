"""The roofline of the matmuls: how long each product of a micro-batch's forward takes on a GPU.

A ``(m x k) @ (k x n)`` product runs at ``max(flops / (peak x efficiency(m, n, k)), bytes /
bandwidth)``: the dense peak of the precision (``GpuSpec.peak_flops_for``) times
:func:`default_efficiency`, or the memory roofline when the product is too thin to be compute
bound (LoRA's rank-r products). The efficiency is symmetric in (m, n, k), so a linear's two
backward products (input and weight gradients, permutations of the forward shape) run at its
forward efficiency: ``forward_seconds`` gives per component the forward FLOPs and seconds whose
ratio backward and recompute share. A calibration profile scales the efficiency
(``Corrections``). Kernels of another training stack (fused or not, another attention) change
this module; the numbers of the GPU come from its spec.
"""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
from planner.cost.flops import attention_core_forward_flops, linear_forward_flops, lora_forward_flops
from planner.cost.timing.float8 import FLOAT8_COMPONENTS, float8_peak_flops
from planner.cost.timing.host import HOST_OVERHEAD_S_PER_OP
from planner.specs.hardware import GpuSpec
from planner.specs.model import LayerSpec, ModelSpec
from planner.specs.setup import TrainingSetup

DEFAULT_MAX_EFFICIENCY = 0.80
"""Share of the dense peak that large dense GEMMs reach: cuBLAS bf16 GEMMs of 4096-8192 sides
run at 75-85% of the datasheet peak on A100/H100 (NVIDIA, "Matrix Multiplication Background
User's Guide", docs.nvidia.com/deeplearning/performance/dl-performance-matrix-multiplication;
Megatron-LM reports 163-167 TFLOP/s per A100, 52-54% of peak, for whole GPT steps, Narayanan
et al. 2021 table 1, which includes everything else the step time adds)."""
EFFICIENCY_HALF_SIZE = 64.0
"""Matrix side at which a dimension alone halves the efficiency: tensor-core tiles are 64-256
wide (NVIDIA guide above: tile and wave quantization make dimensions below the tile waste most
of it). ``efficiency = max x prod(d / (d + half))`` over (m, n, k)."""
EFFICIENCY_REFERENCE_SIZE = 1024.0
"""Geometric-mean matmul side at which a calibrated size exponent changes nothing."""
CAUSAL_FLASH_FRACTION = 0.5
"""Share of the ``s x s`` attention square that flash-style causal kernels compute (they skip
the fully masked tiles: Dao 2023, FlashAttention-2, sec. 3.1.1)."""
FLASH_REFERENCE_HEAD_DIM = 128.0
"""Head dimension at which a flash kernel's tile term is evaluated, whatever the model's: the
kernel keeps whole heads in its tiles, and its ceiling (``ceiling.attention_ceiling``) was
measured at head dim 128. The GEMM tile term would make head dim 64 25% slower than 128; the
FlashAttention-3 paper's FlashAttention-2 bars on H100 (Shah et al. 2024, fig. 5) show ~10%,
and llm-foundry's head-dim-64 models (MPT-125m/350m) at 16-32k tokens ran 27-33% faster than
priced with the GEMM term (issue 11, benchmarks/README.md)."""
MEMORY_BANDWIDTH_EFFICIENCY = 0.85
"""Share of the datasheet memory bandwidth that streaming kernels reach (BabelStream-style copy
and triad kernels reach 85-92% on A100/H100 HBM: Deakin et al., BabelStream results)."""


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def default_efficiency(m, n, k):
    """Share of the dense peak a ``(m x k) @ (k x n)`` matmul reaches (scalars or arrays).

    ``DEFAULT_MAX_EFFICIENCY x prod(d / (d + EFFICIENCY_HALF_SIZE) for d in (m, n, k))``: about
    0.76 for 4096-sided GEMMs, 0.67 at 1024, 0.52 for a flash-attention product with head_dim
    128 at 2048 tokens, ~0.15 for a rank-16 LoRA product (memory bound on a GPU anyway).
    Symmetric in (m, n, k), so forward and both backward products of a linear share it.
    """
    half = EFFICIENCY_HALF_SIZE
    m, n, k = _arr(m), _arr(n), _arr(k)
    return DEFAULT_MAX_EFFICIENCY * (m / (m + half)) * (n / (n + half)) * (k / (k + half))


class Corrections:
    """The calibrated factors the step time reads (duck-typed: a ``planner.specs.profile.Profile``,
    its ``.corrections``, or None for the defaults)."""

    def __init__(self, profile) -> None:
        c = getattr(profile, "corrections", profile)
        self.efficiency_scale = float(getattr(c, "efficiency_scale", 1.0))
        self.efficiency_size_exponent = float(getattr(c, "efficiency_size_exponent", 0.0))
        self.memory_time_factor = float(getattr(c, "memory_time_factor", 1.0))
        self.optimizer_time_factor = float(getattr(c, "optimizer_time_factor", 1.0))
        self.communication_factor = float(getattr(c, "communication_factor", 1.0))
        overhead = getattr(c, "host_overhead_s_per_op", None)
        self.host_overhead_s_per_op = HOST_OVERHEAD_S_PER_OP if overhead is None else float(overhead)

    def efficiency(self, m, n, k):
        eff = default_efficiency(m, n, k) * self.efficiency_scale
        if self.efficiency_size_exponent:
            size = np.cbrt(_arr(m) * _arr(n) * _arr(k))
            eff = eff * (size / EFFICIENCY_REFERENCE_SIZE) ** self.efficiency_size_exponent
        return np.clip(eff, 1e-4, 1.0)


def matmul_time_s(flops, m, n, k, dtype_bytes: float, peak_flops: float, bandwidth: float, corr=None):
    """Roofline of one matmul shape: compute at ``peak x efficiency`` or the bytes of its three
    operands at ``bandwidth``, whichever is slower. ``flops`` may be a multiple of one product
    (batched or repeated products of the same shape)."""
    corr = corr or Corrections(None)
    products = _arr(flops) / np.maximum(2.0 * _arr(m) * _arr(n) * _arr(k), 1.0)
    compute = _arr(flops) / (peak_flops * corr.efficiency(m, n, k))
    traffic = products * dtype_bytes * (_arr(m) * _arr(k) + _arr(k) * _arr(n) + _arr(m) * _arr(n)) / bandwidth
    return np.maximum(compute, traffic)


def layer_shapes(layer: LayerSpec, tokens, tp: int):
    """(component, forward flops per GPU, m, n, k) of every matmul of a layer (no attention core,
    no LoRA). Column-parallel projections split their outputs over ``tp``; the last projection
    of the attention and of the MLP is row-parallel and splits its inputs (Megatron)."""
    out = []
    for group, linears in (("attention", layer.attention), ("mlp", layer.mlp)):
        for index, lin in enumerate(linears):
            row_parallel = index == len(linears) - 1 and len(linears) > 1
            n = lin.out_features if row_parallel else lin.out_features / tp
            k = lin.in_features / tp if row_parallel else lin.in_features
            out.append((group, linear_forward_flops(lin, tokens) / tp, tokens, n, k))
    if layer.num_experts:
        routed = layer.experts_per_token / layer.num_experts
        for lin in layer.experts:
            out.append(("experts", linear_forward_flops(lin, tokens, routed) / tp, tokens * routed, lin.out_features / tp,
                        lin.in_features))
        if layer.router is not None:
            out.append(("experts", linear_forward_flops(layer.router, tokens), tokens, layer.router.out_features,
                        layer.router.in_features))
    return out


class _Sums:
    """Forward FLOPs and seconds accumulated per component."""

    def __init__(self) -> None:
        self.flops: dict[str, object] = {}
        self.secs: dict[str, object] = {}

    def add(self, component: str, f, t) -> None:
        self.flops[component] = self.flops.get(component, 0.0) + f
        self.secs[component] = self.secs.get(component, 0.0) + t


def _lora_seconds(spec: ModelSpec, setup: TrainingSetup, rank, tokens, gpu: GpuSpec, bandwidth: float, corr,
                  sums: _Sums) -> None:
    """The adapters' products x A^T and (.) B^T: the roofline once per distinct (in, out) shape,
    summed adapter by adapter in peft's order (the same floating-point sum as one roofline per
    adapter). peft keeps adapters in fp32 (autocast_adapter_dtype=True): on a bf16 base they run
    in fp32 at the fp32 peak; under autocast (bf16-mixed) in bf16; torchtune (and
    ``adapter_dtype="base"``) keeps them in the base model's dtype."""
    peak = gpu.peak_flops_for(setup.precision)
    in_base_dtype = setup.adapter_dtype == "base" or (setup.stack == "torchtune" and setup.adapter_dtype == "auto")
    sixteen_bit = setup.precision == "bf16-mixed" or (in_base_dtype and setup.precision == "bf16")
    lora_dtype = 2.0 if sixteen_bit else 4.0
    lora_peak = peak if sixteen_bit else gpu.peak_flops_for("fp32")
    per_shape: dict[tuple[int, int], tuple] = {}
    for _, lin in spec_facts.lora_linears(spec, setup.lora_targets):
        shape = (lin.in_features, lin.out_features)
        if shape not in per_shape:
            fa = 2.0 * rank * lin.in_features * tokens
            fb = 2.0 * rank * lin.out_features * tokens
            t = matmul_time_s(fa, tokens, rank, lin.in_features, lora_dtype, lora_peak, bandwidth, corr)
            t = t + matmul_time_s(fb, tokens, lin.out_features, rank, lora_dtype, lora_peak, bandwidth, corr)
            per_shape[shape] = (lora_forward_flops(lin, rank, tokens), t)
        sums.add("lora", *per_shape[shape])


def forward_seconds(spec: ModelSpec, setup: TrainingSetup, b, s, rank, gpu: GpuSpec, corr: Corrections):
    """Per component: (forward FLOPs per GPU, forward seconds) of one micro-batch. The ratio is
    the seconds per FLOP that backward and recompute share (symmetric efficiency)."""
    tokens = b * s
    tp = setup.tensor_parallel
    dtype = 4.0 if setup.precision == "fp32" else 2.0
    peak = gpu.peak_flops_for(setup.precision)
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY
    sums = _Sums()
    fp8_peak = float8_peak_flops(gpu) if setup.float8 else None
    for layer, count in spec_facts.distinct_layers(spec):
        for component, f, m, n, k in layer_shapes(layer, tokens, tp):
            if fp8_peak is not None and component in FLOAT8_COMPONENTS:  # torchao float8 linears
                t = matmul_time_s(f, m, n, k, 1.0, fp8_peak, bandwidth, corr)
            else:
                t = matmul_time_s(f, m, n, k, dtype, peak, bandwidth, corr)
            sums.add(component, count * f, count * t)
        core = attention_core_forward_flops(layer, b, s) / tp
        if setup.attention == "sdpa":  # a flash kernel: compute bound, its rate measured at head dim 128
            t = core * CAUSAL_FLASH_FRACTION / (peak * corr.efficiency(s, s, FLASH_REFERENCE_HEAD_DIM))
        else:
            t = matmul_time_s(core, s, s, layer.head_dim, dtype, peak, bandwidth, corr)
        sums.add("attention_core", count * core, count * t)
    if setup.method != "full":
        _lora_seconds(spec, setup, rank, tokens, gpu, bandwidth, corr, sums)
    head = 2.0 * spec.hidden_size * spec.vocab_size * tokens / tp
    sums.add("lm_head", head, matmul_time_s(head, tokens, spec.vocab_size / tp, spec.hidden_size, dtype, peak,
                                            bandwidth, corr))
    return sums.flops, sums.secs
