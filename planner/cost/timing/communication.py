"""Exposed communication of one training step: data-parallel gradients and weights, tensor-parallel
activations, over ring collectives.

Bandwidths per GPU come from a ``planner.specs.cluster.ClusterSpec`` (``--cluster NAME``; without
one ``default_cluster(gpu)``: 8 GPUs per node on the GPU's own link, 400 Gb/s per GPU between
nodes), at NCCL's achieved share of the line rate (``bandwidths``: the one place they enter). Data parallel (ZeRO-0): one gradient
all-reduce per step, hidden behind the last micro-batch's backward except its last bucket
(PyTorch DDP, Li et al. 2020, ``bucket_cap_mb=25``). ZeRO-1/2: reduce-scatter of gradients
(hidden like DDP's; ZeRO-2 does it every micro-batch as DeepSpeed does) and all-gather of the
updated weights after the step (exposed); the volume equals DDP's (Rajbhandari et al. 2020,
sec. 7.2). ZeRO-3 / FSDP: every micro-batch all-gathers the weights in forward and again in
backward and reduce-scatters the gradients, 1.5x DDP's volume (same paper, sec. 7.2.2),
prefetched behind compute except one layer's share. Tensor parallel (Megatron, Shoeybi et al.
2019 sec. 3; Narayanan et al. 2021 sec. 3.3): per layer and micro-batch two all-reduces of the
``b x s x h`` activations in forward and two in backward (two more in the recompute), on the
critical path (exposed). Expert parallel (``expert_parallel_s``): the token all-to-alls of the
MoE layers, exposed.
"""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory.states import dtype_layout
from planner.specs.cluster import ClusterSpec, default_cluster
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup
from planner.units import MiB

DDP_BUCKET_BYTES = 25 * MiB
"""PyTorch DDP's default gradient bucket (``bucket_cap_mb=25``): the last bucket's all-reduce
starts after the backward ends and cannot be hidden (Li et al. 2020, "PyTorch Distributed")."""
GPUS_PER_NODE = 8
"""GPUs that share the intra-node interconnect (an HGX/DGX baseboard holds 8)."""
INTER_NODE_BANDWIDTH_BYTES_PER_S = 50e9
"""Per GPU, one direction, across nodes: one 400 Gb/s InfiniBand NDR adapter per GPU (NVIDIA DGX
H100 user guide: 8x ConnectX-7 400 Gb/s); a node with 200 Gb/s HDR per GPU has half."""


def _arr(x):
    return np.asarray(x, dtype=np.float64)


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


def bandwidths(setup: TrainingSetup, gpu: GpuSpec, cluster: ClusterSpec | None = None) -> tuple[float, float]:
    """(tensor-parallel, data-parallel) achieved bandwidth per GPU: the intra-node link while the
    group fits in a node, the inter-node network beyond. Data-parallel ranks are tp x pp x cp apart
    (Megatron's rank order: tensor parallel innermost, Narayanan et al. 2021 sec. 3.3)."""
    cluster = cluster or default_cluster(gpu)
    stride = setup.tensor_parallel * setup.pipeline_parallel * setup.context_parallel
    tp_bw = cluster.group_bytes_per_s(gpu, setup.tensor_parallel)
    dp_bw = cluster.group_bytes_per_s(gpu, setup.data_parallel, stride)
    return tp_bw, dp_bw


def _gathered_weight_bytes(spec: ModelSpec, setup: TrainingSetup, trainable, weight_b: float):
    """Weights ZeRO-3 all-gathers per GPU: the trained ones, or the frozen base (in its storage
    dtype) and the fp32 adapters. With torchao's ``enable_fsdp_float8_all_gather`` the decoder
    linears' shards are cast to float8 before the all-gather (1 byte each; torchao float8 README)."""
    if setup.method == "full":
        if setup.float8 and setup.float8_all_gather:  # torchao: the float8 linears' shards gathered in fp8
            share = spec_facts.projection_params(spec) / max(spec_facts.param_counts(spec).total, 1)
            return trainable * (weight_b * (1.0 - share) + 1.0 * share)
        return trainable * weight_b
    base_b = 4.0 if setup.precision in ("fp32", "bf16-mixed") else 2.0
    return _arr(spec_facts.param_counts(spec).total) * base_b / setup.tensor_parallel + trainable * 4.0


def _data_parallel_s(spec: ModelSpec, setup: TrainingSetup, trainable, fwd_s, bwd_s, bandwidth: float):
    """Exposed seconds of the data-parallel collectives of one step (ZeRO stage by stage)."""
    dp, ga = setup.data_parallel, setup.grad_accum
    layout = dtype_layout(setup) if setup.method == "full" else None
    grad_b = layout.grad if layout else 4.0
    # the weights travel in the compute dtype: FSDP MixedPrecision(param_dtype) casts the shard
    # before its all-gather, DeepSpeed ZeRO and Megatron's distributed optimizer gather 16-bit params
    weight_b = 4.0 if setup.precision == "fp32" else 2.0
    layers = max(spec.num_layers, 1)
    grads = trainable * grad_b  # per GPU (already divided by tp)
    if setup.zero == 0 or setup.zero == 1:
        comm = (ring_all_reduce_s(grads, dp, bandwidth) if setup.zero == 0 else ring_gather_s(grads, dp, bandwidth))
        last = comm * np.minimum(1.0, DDP_BUCKET_BYTES / np.maximum(grads, 1.0))
        exposed = np.maximum(comm - bwd_s, last)
        if setup.zero == 1:
            exposed = exposed + ring_gather_s(trainable * weight_b, dp, bandwidth)
        return exposed
    if setup.zero == 2:
        rs = ring_gather_s(grads, dp, bandwidth)
        return ga * np.maximum(rs - bwd_s, rs / layers) + ring_gather_s(trainable * weight_b, dp, bandwidth)
    gather = ring_gather_s(_gathered_weight_bytes(spec, setup, trainable, weight_b), dp, bandwidth)
    rs = ring_gather_s(grads, dp, bandwidth)
    exposed_f = np.maximum(gather - fwd_s, gather / layers)
    exposed_b = np.maximum(gather + rs - bwd_s, (gather + rs) / layers)
    return ga * (exposed_f + exposed_b)


def _tensor_parallel_s(spec: ModelSpec, setup: TrainingSetup, tokens, bandwidth: float):
    """The all-reduces of the layers' activations (of this GPU's pipeline stage and share of the
    sequence), every micro-batch, on the critical path."""
    act_b = 4.0 if setup.precision == "fp32" else 2.0
    per_allreduce = ring_all_reduce_s(tokens * spec.hidden_size * act_b / setup.context_parallel,
                                      setup.tensor_parallel, bandwidth)
    count = 4 + (2 if setup.checkpointing == "full" else 0)
    return setup.grad_accum * count * spec.num_layers / setup.pipeline_parallel * per_allreduce


def pipeline_p2p_s(spec: ModelSpec, setup: TrainingSetup, tokens, bandwidth: float):
    """Activations sent to the next stage in forward and gradients back in backward, once per
    micro-batch and model chunk, each GPU of the tensor-parallel group sending ``1/tp`` of the
    ``b x s x h`` tensor (Megatron's scatter/gather, Narayanan et al. 2021 sec. 4.1); blocking
    in 1F1B (exposed)."""
    if setup.pipeline_parallel <= 1:
        return _arr(tokens) * 0.0
    act_b = 4.0 if setup.precision == "fp32" else 2.0
    message = tokens * spec.hidden_size * act_b / (setup.tensor_parallel * setup.context_parallel)
    return setup.grad_accum * 2.0 * setup.virtual_stages * _arr(message) / bandwidth


def expert_parallel_s(spec: ModelSpec, setup: TrainingSetup, tokens, bandwidth: float):
    """The all-to-alls of expert parallelism, every micro-batch, on the critical path: each MoE
    layer dispatches every token's hidden state to its ``top-k`` experts and combines the outputs
    back, in forward and again (their gradients) in backward, plus the recompute's forward under
    full checkpointing (GShard, Lepikhin et al. 2020 sec. 2.2; Megatron-Core's ``MoEAlltoAllTokenDispatcher``);
    each GPU keeps ``1/ep`` of its tokens' expert visits local and sends the rest, in the compute
    dtype, over ``bandwidth`` (not overlapped, as without Megatron's optional A2A/compute overlap)."""
    ep = setup.expert_parallel
    if ep <= 1:
        return _arr(tokens) * 0.0
    act_b = 4.0 if setup.precision == "fp32" else 2.0
    moe_layers = sum(1 for layer in spec.layers if layer.num_experts) / setup.pipeline_parallel
    top_k = max((layer.experts_per_token for layer in spec.layers if layer.num_experts), default=0)
    visits = _arr(tokens) * top_k * spec.hidden_size * act_b / (setup.tensor_parallel * setup.context_parallel)
    count = 4 + (2 if setup.checkpointing == "full" else 0)
    return setup.grad_accum * count * moe_layers * (ep - 1) / ep * visits / bandwidth


def communication_s(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, tokens, trainable, fwd_s, bwd_s, corr,
                    cluster: ClusterSpec | None = None):
    """Exposed communication seconds of one step: ``trainable`` elements per GPU, ``fwd_s`` and
    ``bwd_s`` the compute one micro-batch's forward and backward can hide it behind."""
    tp_bw, dp_bw = bandwidths(setup, gpu, cluster)
    total = _arr(0.0) * tokens
    if setup.pipeline_parallel > 1:
        cluster = cluster or default_cluster(gpu)
        stride = setup.tensor_parallel * setup.context_parallel  # neighbouring stages are tp x cp ranks apart
        total = total + pipeline_p2p_s(spec, setup, tokens, cluster.group_bytes_per_s(gpu, 2, stride))
    if setup.data_parallel > 1:
        total = total + _data_parallel_s(spec, setup, trainable, fwd_s, bwd_s, dp_bw)
    if setup.tensor_parallel > 1:
        total = total + _tensor_parallel_s(spec, setup, tokens, tp_bw)
    if setup.expert_parallel > 1:  # EP ranks are data-parallel ranks, tp x pp x cp apart
        cluster = cluster or default_cluster(gpu)
        stride = setup.tensor_parallel * setup.pipeline_parallel * setup.context_parallel
        total = total + expert_parallel_s(spec, setup, tokens, cluster.group_bytes_per_s(gpu, setup.expert_parallel,
                                                                                         stride))
    return total * corr.communication_factor
