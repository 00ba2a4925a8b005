"""Step time of one training step: a roofline of the matmuls, memory-bound work, the optimizer
step and communication, optionally corrected by a calibration profile (``planner calibrate``).

Everything is numpy (no torch) and vectorized over ``micro_batch``, ``seq_len`` and
``lora_rank`` like :func:`planner.cost.memory.training_memory`. Times are per GPU; the GPUs of a
data-parallel group run in lock step.

What one step is (the same step ``planner.truth.trace`` and ``planner.truth.profile`` run): ``grad_accum``
micro-batches of forward + backward (+ the recompute of activation checkpointing), then one
optimizer step, plus the communication that is not hidden behind compute.

The model, term by term (every constant below names its source or says it is a guess that
calibration corrects):

- **compute_s** -- the matmuls, FLOPs counted as ``planner.cost.flops`` counts them (PyTorch's
  ``FlopCounterMode`` convention). Each matmul ``(m x k) @ (k x n)`` runs at
  ``max(flops / (peak x efficiency(m, n, k)), bytes / bandwidth)``: the dense peak of the
  precision (``GpuSpec.peak_flops_for``) times :func:`default_efficiency`, or the memory
  roofline when the matmul is too thin to be compute bound (LoRA's rank-r products). The
  efficiency is symmetric in (m, n, k), so a linear's two backward matmuls (input and weight
  gradients, permutations of the forward shape) run at its forward efficiency.
  Causal SDPA runs only the unmasked half of the score square (FlashAttention-2 skips fully
  masked tiles, Dao 2023 sec. 3.1); eager attention runs all of it.
- **memory_s** -- norms, activations, rotary, residual adds, casts, softmax and the loss:
  memory-bound. Traffic = ``ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE`` x the bytes a full
  fine-tuning forward saves (``planner.cost.memory``'s inventory, a proxy for what those ops write),
  at ``MEMORY_BANDWIDTH_EFFICIENCY`` x the memory bandwidth.
- **recompute_s** -- activation checkpointing: full reruns each layer's forward matmuls
  (``flops.recompute``) and its elementwise forward; selective reruns only the elementwise part.
- **optimizer_s** -- the optimizer step reads and writes weights, gradients and states once
  (bytes per element by optimizer in :func:`optimizer_bytes_per_element`) at the memory
  bandwidth; with ``offload_optimizer`` the gradients go to the host and the weights come back
  over PCIe and the step runs at host memory bandwidth. Its host ops add on a CPU; on a GPU
  the step takes the longer of its device and host times.
- **communication_s** -- exposed communication, over ``GpuSpec.interconnect_bandwidth_bytes_per_s``
  inside a node and ``INTER_NODE_BANDWIDTH_BYTES_PER_S`` across nodes (ring algorithms, see
  :func:`ring_all_reduce_s`). Data parallel (ZeRO-0): one gradient all-reduce per step, hidden
  behind the last micro-batch's backward except its last bucket (PyTorch DDP, Li et al. 2020,
  ``bucket_cap_mb=25``). ZeRO-1/2: reduce-scatter of gradients (hidden like DDP's; ZeRO-2 does
  it every micro-batch as DeepSpeed does) and all-gather of the updated weights after the step
  (exposed); the volume equals DDP's (Rajbhandari et al. 2020, sec. 7.2). ZeRO-3 / FSDP: every
  micro-batch all-gathers the weights in forward and again in backward and reduce-scatters the
  gradients, 1.5x DDP's volume (same paper, sec. 7.2.2), prefetched behind compute except one
  layer's share. Tensor parallel (Megatron, Shoeybi et al. 2019 sec. 3; Narayanan et al. 2021
  sec. 3.3): per layer and micro-batch two all-reduces of the ``b x s x h`` activations in
  forward and two in backward (two more in the recompute), on the critical path (exposed).
- **overhead_s** -- host-side cost per micro-batch (Python, op dispatch, kernel launches):
  ``HOST_OVERHEAD_S_PER_OP`` times the eager ops a micro-batch dispatches
  (:func:`host_ops_per_micro_batch`: per layer, its projections, norms, attention and MLP
  glue, peft's extra ops per adapted linear; backward; checkpointing's rerun and hooks). On a
  GPU the host runs ahead of the device, so only the part above the device time is exposed;
  on a CPU device it adds. (The optimizer step's own host ops, :func:`optimizer_host_ops`,
  are part of ``optimizer_s``, so that ``overhead_s`` stays per micro-batch.)

``step_time_s`` is the sum of those terms (compute, memory, recompute and overhead already
summed over the ``grad_accum`` micro-batches).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from planner.cost.flops import attention_core_forward_flops, linear_forward_flops, lora_forward_flops
from planner.specs.hardware import GpuSpec
from planner.specs.model import LayerSpec, ModelSpec
from planner.specs.setup import TrainingSetup
from planner.units import MiB

# ---------------------------------------------------------------------------------- constants
DEFAULT_MAX_EFFICIENCY = 0.80
"""Share of the dense peak that large dense GEMMs reach: cuBLAS bf16 GEMMs of 4096-8192 sides
run at 75-85% of the datasheet peak on A100/H100 (NVIDIA, "Matrix Multiplication Background
User's Guide", docs.nvidia.com/deeplearning/performance/dl-performance-matrix-multiplication;
Megatron-LM reports 163-167 TFLOP/s per A100, 52-54% of peak, for whole GPT steps, Narayanan
et al. 2021 table 1, which includes everything else this module adds)."""
EFFICIENCY_HALF_SIZE = 64.0
"""Matrix side at which a dimension alone halves the efficiency: tensor-core tiles are 64-256
wide (NVIDIA guide above: tile and wave quantization make dimensions below the tile waste most
of it). ``efficiency = max x prod(d / (d + half))`` over (m, n, k)."""
EFFICIENCY_REFERENCE_SIZE = 1024.0
"""Geometric-mean matmul side at which a calibrated size exponent changes nothing."""
CAUSAL_FLASH_FRACTION = 0.5
"""Share of the ``s x s`` attention square that flash-style causal kernels compute (they skip
the fully masked tiles: Dao 2023, FlashAttention-2, sec. 3.1.1)."""
ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE = 3.0
"""Memory-bound traffic per byte a forward saves for backward: written once in forward, then
read and its gradient written once in backward. A guess that calibration corrects."""
MEMORY_BANDWIDTH_EFFICIENCY = 0.85
"""Share of the datasheet memory bandwidth that streaming kernels reach (BabelStream-style copy
and triad kernels reach 85-92% on A100/H100 HBM: Deakin et al., BabelStream results)."""
HOST_OVERHEAD_S_PER_OP = 10e-6
"""Host time per eager op: ~10 us of Python, dispatcher and launch overhead (H. He, "Making Deep
Learning Go Brrrr From First Principles", 2022: eager PyTorch runs on the order of 100k ops
per second). A guess that calibration corrects; exposed on a GPU only when it exceeds the
device time."""
BACKWARD_OPS_PER_FORWARD_OP = 1.5
"""Autograd nodes run about 1.5 kernels per forward op (two matmuls per linear, one or two
elementwise kernels per elementwise op). A guess that calibration absorbs."""
CHECKPOINT_HOST_FACTOR = {"none": 0.0, "full": 4.0, "selective": 4.0}
"""Extra host ops per forward op with activation checkpointing: the forward reruns (1x) and
non-reentrant checkpointing runs Python pack/unpack hooks per saved tensor and saves and
restores RNG state per layer (measured here: a 2-layer width-128 model's step on one CPU
thread grew by ~4 host ops per forward op of its layers with full checkpointing)."""
DDP_BUCKET_BYTES = 25 * MiB
"""PyTorch DDP's default gradient bucket (``bucket_cap_mb=25``): the last bucket's all-reduce
starts after the backward ends and cannot be hidden (Li et al. 2020, "PyTorch Distributed")."""
GPUS_PER_NODE = 8
"""GPUs that share the intra-node interconnect (an HGX/DGX baseboard holds 8)."""
INTER_NODE_BANDWIDTH_BYTES_PER_S = 50e9
"""Per GPU, one direction, across nodes: one 400 Gb/s InfiniBand NDR adapter per GPU (NVIDIA DGX
H100 user guide: 8x ConnectX-7 400 Gb/s); a node with 200 Gb/s HDR per GPU has half."""
PCIE_BANDWIDTH_BYTES_PER_S = 25e9
"""Host <-> GPU copies with optimizer offload: PCIe 4.0 x16 is 32 GB/s per direction nominal
(PCI-SIG), ~25 GB/s achieved for pinned copies."""
HOST_MEMORY_BANDWIDTH_BYTES_PER_S = 100e9
"""The offloaded optimizer step on the host (ZeRO-Offload's CPU Adam, Ren et al. 2021) is
memory-bound: 8-channel DDR4-3200 gives 205 GB/s peak per socket; half of it achieved."""

DEFAULT_PRICE_USD_PER_GPU_HOUR: dict[str, float] = {
    # indicative on-demand prices for catalog GPUs whose gpus.json entry gives none; the
    # catalog's ``price_usd_per_hour`` wins when present (see price_usd_per_gpu_hour).
    "h200": 3.79,  # assumption: typical 2025 cloud on-demand per H200 SXM GPU-hour; check before use
    "b200": 5.99,  # assumption: typical 2025 cloud on-demand per B200 GPU-hour; check before use
    "rtx-3090": 0.22,  # assumption: community-cloud rates for consumer cards; check before use
    "rtx-4090": 0.34,
    "rtx-5090": 0.69,
    "mi300x": 2.50,  # assumption: typical 2025 on-demand per MI300X GPU-hour; check before use
}


def price_usd_per_gpu_hour(gpu: GpuSpec) -> float | None:
    """The catalog's price of ``gpu`` (``GpuSpec.price_usd_per_hour``, with its source), else
    ``DEFAULT_PRICE_USD_PER_GPU_HOUR``, else None."""
    if gpu.price_usd_per_hour is not None:
        return float(gpu.price_usd_per_hour)
    return DEFAULT_PRICE_USD_PER_GPU_HOUR.get(gpu.name)


def _arr(x):
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------- efficiency


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


class _Corrections:
    """The calibrated factors ``step_time`` reads (duck-typed: a ``planner.specs.profile.Profile``,
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
    corr = corr or _Corrections(None)
    products = _arr(flops) / np.maximum(2.0 * _arr(m) * _arr(n) * _arr(k), 1.0)
    compute = _arr(flops) / (peak_flops * corr.efficiency(m, n, k))
    traffic = products * dtype_bytes * (_arr(m) * _arr(k) + _arr(k) * _arr(n) + _arr(m) * _arr(n)) / bandwidth
    return np.maximum(compute, traffic)


# ----------------------------------------------------------------------------- per component


def _is_cpu(gpu: GpuSpec) -> bool:
    return gpu.vendor.lower() == "cpu"


def _layer_shapes(layer: LayerSpec, tokens, tp: int):
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


def _seconds_per_flop(spec: ModelSpec, setup: TrainingSetup, b, s, rank, gpu: GpuSpec, corr: _Corrections):
    """Per component: (forward FLOPs per GPU, forward seconds) of one micro-batch. The ratio is
    the seconds per FLOP that backward and recompute share (symmetric efficiency)."""
    from planner.cost.params import lora_targets

    tokens = b * s
    tp = setup.tensor_parallel
    dtype = 4.0 if setup.precision == "fp32" else 2.0
    peak = gpu.peak_flops_for(setup.precision)
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY
    flops: dict[str, object] = {}
    secs: dict[str, object] = {}

    def add(component, f, t):
        flops[component] = flops.get(component, 0.0) + f
        secs[component] = secs.get(component, 0.0) + t

    for layer, count in Counter(spec.layers).items():
        for component, f, m, n, k in _layer_shapes(layer, tokens, tp):
            add(component, count * f, count * matmul_time_s(f, m, n, k, dtype, peak, bandwidth, corr))
        core = attention_core_forward_flops(layer, b, s) / tp
        executed = CAUSAL_FLASH_FRACTION if setup.attention == "sdpa" else 1.0
        t = matmul_time_s(core * executed, s, s, layer.head_dim, dtype, peak, bandwidth, corr)
        add("attention_core", count * core, count * t)
    if setup.method != "full":
        # peft keeps adapters in fp32 (autocast_adapter_dtype=True): on a bf16 base they run in
        # fp32 at the fp32 peak; under autocast (bf16-mixed) in bf16
        lora_dtype = 2.0 if setup.precision == "bf16-mixed" else 4.0
        lora_peak = peak if setup.precision == "bf16-mixed" else gpu.peak_flops_for("fp32")
        for _, lin in lora_targets(spec, setup.lora_targets):
            fa = 2.0 * rank * lin.in_features * tokens
            fb = 2.0 * rank * lin.out_features * tokens
            t = matmul_time_s(fa, tokens, rank, lin.in_features, lora_dtype, lora_peak, bandwidth, corr)
            t = t + matmul_time_s(fb, tokens, lin.out_features, rank, lora_dtype, lora_peak, bandwidth, corr)
            add("lora", lora_forward_flops(lin, rank, tokens), t)
    head = 2.0 * spec.hidden_size * spec.vocab_size * tokens / tp
    add("lm_head", head, matmul_time_s(head, tokens, spec.vocab_size / tp, spec.hidden_size, dtype, peak, bandwidth,
                                       corr))
    return flops, secs


# ---------------------------------------------------------------------------------- optimizer


def optimizer_bytes_per_element(setup: TrainingSetup) -> float:
    """Bytes one optimizer step moves per trainable element (reads + writes), pass by pass as
    PyTorch runs it, from the dtype layout of ``planner.cost.memory`` (weight w, gradient g, state s,
    fp32 master copy):

    - AdamW foreach / for-loop (``torch/optim/adam.py`` ``_multi_tensor_adam``, decoupled weight
      decay): ``mul_`` of w (2w), ``lerp_`` of m with g (2s + g), ``mul_`` and ``addcmul_`` of v
      (4s + g), ``sqrt`` of v into a temporary, ``div_`` and ``add_`` of eps on it (6s),
      ``addcdiv_`` of w (2w + 2s): 4w + 2g + 12s;
    - fused AdamW (one kernel): read w, g, m, v, write w, m, v: 2w + g + 4s;
    - 8-bit AdamW (bitsandbytes, one kernel, uint8 moments): 2w + g + 4;
    - SGD with momentum (foreach): ``mul_`` and ``add_`` of the buffer, ``add_`` to w: 2w + g + 5s;
    - Lion (lion-pytorch): weight decay 2w, ``clone().mul_().add().sign_()`` 7s + g, ``add_`` to w
      2w + s, momentum update 4s + g: 4w + 2g + 12s;
    - Adafactor (torch): squared-gradient row/column means 2g, the update tensor 2w, ``add_``
      to w 3w: 5w + 2g.

    A master copy (ZeRO with bf16-mixed) adds its read and write and the bf16 copy's write.
    """
    from planner.cost.memory import _dtype_layout

    if setup.method != "full":
        w = g = s = 4.0
        master = 0.0
    else:
        layout = _dtype_layout(setup)
        w, g, s, master = layout.weight, layout.grad, layout.state, layout.master
    if setup.optimizer == "adamw":
        per = 2 * w + g + 4 * s if setup.optimizer_impl == "fused" else 4 * w + 2 * g + 12 * s
    else:
        per = {
            "adamw-8bit": 2 * w + g + 4.0,
            "sgd": 2 * w + g + 5 * s,
            "lion": 4 * w + 2 * g + 12 * s,
            "adafactor": 5 * w + 2 * g,
        }[setup.optimizer]
    return per + (2 * master + w if master else 0.0)


def _grad_plus_weight_bytes(setup: TrainingSetup) -> float:
    from planner.cost.memory import _dtype_layout

    if setup.method != "full":
        return 8.0
    layout = _dtype_layout(setup)
    return layout.grad + layout.weight


def _trainable_per_gpu(spec: ModelSpec, setup: TrainingSetup, rank):
    from planner.cost.params import count_params, lora_params

    if setup.method == "full":
        trainable = _arr(count_params(spec).total) / setup.tensor_parallel
    else:
        trainable = _arr(lora_params(spec, setup.lora_targets, rank))
    return trainable


# ---------------------------------------------------------------------------- communication


def ring_all_reduce_s(num_bytes, group: int, bandwidth: float):
    """Ring all-reduce: each GPU sends and receives 2 (N-1)/N of the buffer (Patarasuk & Yuan
    2009; NCCL's "bus bandwidth" convention, nccl-tests doc/PERFORMANCE.md)."""
    if group <= 1:
        return _arr(num_bytes) * 0.0
    return 2.0 * (group - 1) / group * _arr(num_bytes) / bandwidth


def ring_gather_s(num_bytes, group: int, bandwidth: float):
    """Ring reduce-scatter or all-gather: (N-1)/N of the full buffer per GPU (same sources)."""
    if group <= 1:
        return _arr(num_bytes) * 0.0
    return (group - 1) / group * _arr(num_bytes) / bandwidth


def _bandwidths(setup: TrainingSetup, gpu: GpuSpec) -> tuple[float, float]:
    """(tensor-parallel, data-parallel) bandwidth per GPU: the intra-node link while the group
    fits in a node, the inter-node network beyond."""
    intra = gpu.interconnect_bandwidth_bytes_per_s
    inter = min(intra, INTER_NODE_BANDWIDTH_BYTES_PER_S)
    tp_bw = intra if setup.tensor_parallel <= GPUS_PER_NODE else inter
    dp_bw = intra if setup.num_gpus <= GPUS_PER_NODE else inter
    return tp_bw, dp_bw


def _communication(spec, setup, gpu, tokens, trainable, fwd_s, bwd_s, corr):
    """Exposed communication seconds of one step (see the module docstring)."""
    from planner.cost.memory import _dtype_layout
    from planner.cost.params import count_params

    tp, dp, ga = setup.tensor_parallel, setup.data_parallel, setup.grad_accum
    tp_bw, dp_bw = _bandwidths(setup, gpu)
    layout = _dtype_layout(setup) if setup.method == "full" else None
    grad_b = layout.grad if layout else 4.0
    weight_b = layout.weight if layout else 4.0
    total = _arr(0.0) * tokens
    layers = max(spec.num_layers, 1)
    if dp > 1:
        grads = trainable * grad_b  # per GPU (already divided by tp)
        if setup.zero == 0 or setup.zero == 1:
            comm = (ring_all_reduce_s(grads, dp, dp_bw) if setup.zero == 0 else ring_gather_s(grads, dp, dp_bw))
            last = comm * np.minimum(1.0, DDP_BUCKET_BYTES / np.maximum(grads, 1.0))
            total = total + np.maximum(comm - bwd_s, last)
            if setup.zero == 1:
                total = total + ring_gather_s(trainable * weight_b, dp, dp_bw)
        elif setup.zero == 2:
            rs = ring_gather_s(grads, dp, dp_bw)
            total = total + ga * np.maximum(rs - bwd_s, rs / layers)
            total = total + ring_gather_s(trainable * weight_b, dp, dp_bw)
        else:
            if setup.method == "full":
                weights = trainable * weight_b
            else:
                base_b = 4.0 if setup.precision in ("fp32", "bf16-mixed") else 2.0
                weights = _arr(count_params(spec).total) * base_b / tp + trainable * 4.0
            gather = ring_gather_s(weights, dp, dp_bw)
            rs = ring_gather_s(grads, dp, dp_bw)
            exposed_f = np.maximum(gather - fwd_s, gather / layers)
            exposed_b = np.maximum(gather + rs - bwd_s, (gather + rs) / layers)
            total = total + ga * (exposed_f + exposed_b)
    if tp > 1:
        act_b = 4.0 if setup.precision == "fp32" else 2.0
        per_allreduce = ring_all_reduce_s(tokens * spec.hidden_size * act_b, tp, tp_bw)
        count = 4 + (2 if setup.checkpointing == "full" else 0)
        total = total + ga * count * spec.num_layers * per_allreduce
    return total * corr.communication_factor


# ------------------------------------------------------------------------------------- step


def host_ops_per_micro_batch(spec: ModelSpec, setup: TrainingSetup) -> float:
    """Eager ops one micro-batch dispatches, approximately: per layer 2 per projection (matmul,
    bias or reshape), 6 per norm (cast, pow, mean, rsqrt, mul, weight), 15 of attention glue
    (view/transpose, rotary, SDPA), 5 of MLP glue and residuals, 10 more for routing in a
    mixture of experts, 6 per LoRA-adapted linear (dropout, A, B, scale, add, cast); 10 for
    the embedding, final norm, head and loss; backward ``BACKWARD_OPS_PER_FORWARD_OP`` per
    forward op; checkpointing ``CHECKPOINT_HOST_FACTOR`` more."""
    from planner.cost.params import lora_targets

    adapted: dict[int, int] = {}
    if setup.method != "full":
        for index, _ in lora_targets(spec, setup.lora_targets):
            adapted[index] = adapted.get(index, 0) + 1
    layers = 0.0
    for index, layer in enumerate(spec.layers):
        layers += (2 * len(layer.linears) + 6 * len(layer.norms) + 20 + (10 if layer.num_experts else 0)
                   + 6 * adapted.get(index, 0))
    forward = layers + 10
    return forward * (1 + BACKWARD_OPS_PER_FORWARD_OP) + layers * CHECKPOINT_HOST_FACTOR[setup.checkpointing]


OPTIMIZER_HOST_OPS = {"foreach": 40.0, "fused": 10.0, "for-loop": 0.0}
"""Host ops of one optimizer step besides the per-tensor ones: foreach AdamW dispatches ~15
``torch._foreach_*`` calls plus step-count and bias-correction bookkeeping; fused one kernel;
for-loop pays ``OPTIMIZER_HOST_OPS_PER_TENSOR`` per tensor instead."""
OPTIMIZER_HOST_OPS_PER_TENSOR = {"foreach": 1.0, "fused": 1.0, "for-loop": 15.0}
"""Per trainable tensor: grouping by device and dtype (foreach, fused), or the whole update
(for-loop: ~15 ops per tensor)."""


def optimizer_host_ops(spec: ModelSpec, setup: TrainingSetup, rank) -> float:
    """Host ops of one optimizer step (see ``OPTIMIZER_HOST_OPS``), plus ``zero_grad``."""
    from planner.cost.memory import trainable_tensors

    tensors = len(trainable_tensors(spec, setup, int(np.max(rank)) if setup.method != "full" else 0))
    impl = setup.optimizer_impl if setup.optimizer in ("adamw", "sgd") else "for-loop"
    if setup.optimizer in ("adamw-8bit", "adafactor") and setup.optimizer_impl == "foreach":
        impl = "foreach"
    return OPTIMIZER_HOST_OPS[impl] + (OPTIMIZER_HOST_OPS_PER_TENSOR[impl] + 1.0) * tensors


def _gradient_traffic(spec: ModelSpec, setup: TrainingSetup, rank):
    """Memory-bound gradient work of one micro-batch beyond the matmuls, per GPU: the embedding
    backward writes a V x h gradient (``embedding_dense_backward`` zero-fills it and adds rows)
    and with tied embeddings autograd sums it with the head's (read 2, write 1); with gradient
    accumulation each micro-batch after the first adds its gradients into ``.grad`` (read 2,
    write 1), spread here over the micro-batches."""
    from planner.cost.memory import _dtype_layout

    tp = setup.tensor_parallel
    traffic = 0.0
    grad_b = _dtype_layout(setup).grad if setup.method == "full" else 4.0
    if setup.method == "full":
        table = spec.vocab_size * spec.hidden_size * grad_b / tp
        traffic = table * (1 + (3 if spec.tied_embeddings else 0))
    if setup.grad_accum > 1:
        share = (setup.grad_accum - 1) / setup.grad_accum
        traffic = traffic + share * 3.0 * _trainable_per_gpu(spec, setup, rank) * grad_b
    return _arr(traffic)


def _activation_traffic(spec: ModelSpec, setup: TrainingSetup, b, s):
    """(layers', head's) bytes a full fine-tuning forward without checkpointing saves, per GPU."""
    from planner.cost import activations as act
    from planner.cost.memory import training_memory

    probe = setup.model_copy(update={"method": "full", "checkpointing": "none", "grad_accum": 1})
    total = training_memory(spec, probe, b, s).components["activations"]
    head = b * s * act.head_activation_bytes_per_token(spec, setup.precision, setup.dropout, True)
    return total - head, head


def step_time(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None, micro_batch=None, seq_len=None,
              lora_rank=None, profile=None) -> dict[str, np.ndarray]:
    """Seconds of one optimizer step of ``setup`` on ``gpu`` (arrays override its numbers).

    Returns arrays (broadcast over the candidates) keyed: ``compute_s``, ``memory_s``,
    ``recompute_s``, ``overhead_s`` (summed over the ``grad_accum`` micro-batches),
    ``optimizer_s``, ``communication_s``, ``step_time_s`` (their sum), ``tokens_per_s`` (per
    step, all GPUs), ``mfu`` (model FLOPs, no recompute, over time x dense peak x GPUs: PaLM's
    definition, Chowdhery et al. 2022 app. B), ``achieved_flops_per_s`` (executed FLOPs per GPU,
    recompute included, per second) and ``flops_per_step`` (model FLOPs of the step, all GPUs).

    ``profile``: a ``planner.specs.profile.Profile`` (or its ``corrections``) measured on this GPU;
    its efficiency, memory-time, optimizer-time and host-overhead corrections are applied. With
    ``gpu=None`` the profile's device is used. A profile of another device raises PlannerError.
    """
    from planner.cost.estimate import training_flops
    from planner.errors import PlannerError

    if profile is not None and hasattr(profile, "device_spec"):
        device = profile.device_spec()
        if gpu is None:
            gpu = device
        elif not profile.matches(gpu):
            raise PlannerError(
                f"calibration profile was measured on {device.name}, not {gpu.name}: calibrate on {gpu.name} "
                "(planner calibrate --device cuda) or leave out --calibration"
            )
    if gpu is None:
        raise PlannerError("step time needs a GPU (--gpu NAME) or a calibration profile")
    corr = _Corrections(profile)
    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    rank = _arr(setup.lora_rank if lora_rank is None else lora_rank)
    tokens = b * s
    ga, tp, dp = setup.grad_accum, setup.tensor_parallel, setup.data_parallel
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY

    flops = training_flops(spec, setup, b, s, rank)
    fwd_flops, fwd_secs = _seconds_per_flop(spec, setup, b, s, rank, gpu, corr)
    compute_fwd = 0.0
    compute_all = 0.0
    layer_flops = 0.0
    layer_secs = 0.0
    for component, total_flops in flops.by_component.items():
        if component not in fwd_flops:
            continue
        per_flop = fwd_secs[component] / np.maximum(fwd_flops[component], 1.0)
        compute_fwd = compute_fwd + fwd_secs[component]
        compute_all = compute_all + _arr(total_flops) / (tp if component != "lora" else 1) * per_flop
        if component in ("attention", "attention_core", "mlp", "experts"):
            layer_flops = layer_flops + fwd_flops[component]
            layer_secs = layer_secs + fwd_secs[component]
    layer_per_flop = layer_secs / np.maximum(layer_flops, 1.0)

    layer_traffic, head_traffic = _activation_traffic(spec, setup, b, s)
    elementwise_layers = ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE * layer_traffic / bandwidth * corr.memory_time_factor
    elementwise_head = ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE * head_traffic / bandwidth * corr.memory_time_factor
    memory = elementwise_layers + elementwise_head + _gradient_traffic(spec, setup, rank) / bandwidth * (
        corr.memory_time_factor)
    forward_share = 1.0 / ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE
    recompute = _arr(0.0) * tokens
    if setup.checkpointing == "full":
        recompute = _arr(flops.recompute) / tp * layer_per_flop + forward_share * elementwise_layers
    elif setup.checkpointing == "selective":
        recompute = forward_share * elementwise_layers

    device_mb = compute_all + memory + recompute
    host_mb = corr.host_overhead_s_per_op * host_ops_per_micro_batch(spec, setup) + 0.0 * tokens
    overhead_mb = host_mb if _is_cpu(gpu) else np.maximum(host_mb - device_mb, 0.0)

    trainable = _trainable_per_gpu(spec, setup, rank) + 0.0 * tokens
    shard = dp if setup.zero >= 1 else 1
    opt_bytes = trainable / shard * optimizer_bytes_per_element(setup)
    if setup.offload_optimizer:
        # gradients to the host, updated weights back, each at its own width
        grad_weight = trainable / shard * _grad_plus_weight_bytes(setup)
        optimizer = grad_weight / PCIE_BANDWIDTH_BYTES_PER_S + opt_bytes / HOST_MEMORY_BANDWIDTH_BYTES_PER_S
    else:
        optimizer = opt_bytes / bandwidth
    optimizer = optimizer * corr.optimizer_time_factor
    # the step's host ops: added on a CPU, exposed on a GPU only above the step's device time
    host_opt = corr.host_overhead_s_per_op * optimizer_host_ops(spec, setup, rank)
    optimizer = optimizer + host_opt if _is_cpu(gpu) else np.maximum(optimizer, host_opt)

    fwd_s = compute_fwd + forward_share * memory
    bwd_s = device_mb - fwd_s
    communication = _communication(spec, setup, gpu, tokens, trainable, fwd_s, bwd_s, corr)

    compute_s = ga * compute_all
    result = {
        "compute_s": compute_s + 0.0 * tokens,
        "memory_s": ga * memory + 0.0 * tokens,
        "recompute_s": ga * recompute + 0.0 * tokens,
        "overhead_s": ga * overhead_mb + 0.0 * tokens,
        "optimizer_s": optimizer + 0.0 * tokens,
        "communication_s": communication + 0.0 * tokens,
    }
    step = sum(result.values())
    model_flops = _arr(flops.model) * ga * dp
    result["step_time_s"] = step
    result["tokens_per_s"] = tokens * ga * dp / step
    result["flops_per_step"] = model_flops + 0.0 * tokens
    result["mfu"] = model_flops / (step * gpu.peak_flops_for(setup.precision) * setup.num_gpus)
    result["achieved_flops_per_s"] = _arr(flops.executed) * ga / tp / step
    return result
