"""Exposed communication of one training step: data-parallel gradients and weights, tensor-parallel
activations, over ring collectives.

Bandwidths per GPU come from a ``planner.specs.cluster.ClusterSpec`` (``--cluster NAME``; without
one ``default_cluster(gpu)``: 8 GPUs per node on the GPU's own link, 400 Gb/s per GPU between
nodes), at NCCL's achieved share of the line rate (``bandwidths``: the one place they enter). Data
parallel: the volumes are what each stack's code issues (``planner.cost.timing.dp_volume``, counted
by ``benchmarks/comm_oracle_cpu.py``: DDP one all-reduce per step, DeepSpeed ZeRO-1 one bf16 all-reduce
per step and ZeRO-2 one per micro-batch plus a gather of the weights after the step, ZeRO-3 and FSDP2
gathers per micro-batch and a reduce-scatter per micro-batch); ``_data_parallel_s`` hides them: DDP's
and ZeRO-1's reduction behind the last backward except its last bucket (PyTorch DDP, Li et al. 2020,
``bucket_cap_mb=25``), ZeRO-2's behind each backward, ZeRO-3/FSDP's gathers prefetched behind compute
except one layer's share. Tensor parallel (Megatron, Shoeybi et al.
2019 sec. 3; Narayanan et al. 2021 sec. 3.3): per layer and micro-batch two all-reduces of the
``b x s x h`` activations in forward and two in backward (two more in the recompute), on the
critical path (exposed). Expert parallel (``expert_parallel_s``): the token all-to-alls of the
MoE layers, exposed.
"""

from __future__ import annotations

import numpy as np

from planner.cost.timing.dp_volume import data_parallel_volume
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


def _data_parallel_s(spec: ModelSpec, setup: TrainingSetup, trainable, fwd_s, bwd_s, bandwidth: float,
                     last_bwd_s=None):
    """Exposed seconds of the data-parallel collectives of one step: the volumes the stacks' code issues
    (``dp_volume.data_parallel_volume``, counted by ``benchmarks/comm_oracle_cpu.py``), hidden as follows.
    DDP / ZeRO-1: the step's one reduction overlaps the last backward except its last 25 MB bucket;
    ZeRO-2: each micro-batch's reduction overlaps its backward but for one layer's share; ZeRO-1/2's
    gather of the updated weights after the step is exposed; ZeRO-3 / FSDP: each micro-batch's forward
    gathers are prefetched behind its forward, its backward gathers and reduce-scatters behind its
    backward, one layer's share exposed (the hiding is unchanged by issue 11: only the volumes moved).
    ``last_bwd_s``: the backward of the step's last micro-batch, which the DDP / ZeRO-1 reduction
    overlaps (it adds its gradients into the accumulated ones; ``bwd_s`` when not given)."""
    volume = data_parallel_volume(spec, setup, trainable)
    layers, dp = max(spec.num_layers, 1), setup.data_parallel
    reduce = ring_all_reduce_s if volume.all_reduce else ring_gather_s
    if setup.zero in (0, 1):
        comm = reduce(volume.reduce_bytes, dp, bandwidth)
        last = comm * np.minimum(1.0, DDP_BUCKET_BYTES / np.maximum(volume.reduce_bytes, 1.0))
        exposed = np.maximum(comm - (bwd_s if last_bwd_s is None else last_bwd_s), last)
        return exposed + ring_gather_s(volume.step_gather_bytes, dp, bandwidth)
    rs = reduce(volume.reduce_bytes, dp, bandwidth)
    if setup.zero == 2:
        return (volume.reductions * np.maximum(rs - bwd_s, rs / layers)
                + ring_gather_s(volume.step_gather_bytes, dp, bandwidth))
    gather_f = ring_gather_s(volume.forward_gather_bytes, dp, bandwidth)
    gather_b = ring_gather_s(volume.backward_gather_bytes, dp, bandwidth)
    exposed_f = np.maximum(gather_f - fwd_s, gather_f / layers)
    exposed_b = np.maximum(gather_b + rs - bwd_s, (gather_b + rs) / layers)
    return setup.grad_accum * (exposed_f + exposed_b)


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
                    cluster: ClusterSpec | None = None, last_bwd_s=None):
    """Exposed communication seconds of one step: ``trainable`` elements per GPU, ``fwd_s`` and
    ``bwd_s`` the compute one micro-batch's forward and backward can hide it behind (``last_bwd_s``:
    the last micro-batch's backward, see ``_data_parallel_s``)."""
    tp_bw, dp_bw = bandwidths(setup, gpu, cluster)
    total = _arr(0.0) * tokens
    if setup.pipeline_parallel > 1:
        cluster = cluster or default_cluster(gpu)
        stride = setup.tensor_parallel * setup.context_parallel  # neighbouring stages are tp x cp ranks apart
        total = total + pipeline_p2p_s(spec, setup, tokens, cluster.group_bytes_per_s(gpu, 2, stride))
    if setup.data_parallel > 1:
        total = total + _data_parallel_s(spec, setup, trainable, fwd_s, bwd_s, dp_bw, last_bwd_s)
    if setup.tensor_parallel > 1:
        total = total + _tensor_parallel_s(spec, setup, tokens, tp_bw)
    if setup.expert_parallel > 1:  # EP ranks are data-parallel ranks, tp x pp x cp apart
        cluster = cluster or default_cluster(gpu)
        stride = setup.tensor_parallel * setup.pipeline_parallel * setup.context_parallel
        total = total + expert_parallel_s(spec, setup, tokens, cluster.group_bytes_per_s(gpu, setup.expert_parallel,
                                                                                         stride))
    return total * corr.communication_factor
