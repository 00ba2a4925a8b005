"""Step time of one training step: a roofline of the matmuls, memory-bound work, the optimizer
step and communication, optionally corrected by a calibration profile (``planner calibrate``).

Everything is numpy (no torch) and vectorized over ``micro_batch``, ``seq_len`` and
``lora_rank`` like :func:`planner.cost.memory.phases.training_memory`. Times are per GPU; the GPUs of a
data-parallel group run in lock step.

What one step is (the same step ``planner.truth.trace`` and ``planner.truth.profile`` run): ``grad_accum``
micro-batches of forward + backward (+ the recompute of activation checkpointing), then one
optimizer step, plus the communication that is not hidden behind compute.

The model, term by term (every constant names its source or says it is a guess that
calibration corrects), each in its own module:

- **compute_s** -- the matmuls, FLOPs counted as ``planner.cost.flops`` counts them (PyTorch's
  ``FlopCounterMode`` convention), each product at its roofline (``planner.cost.timing.efficiency``);
  **attention_s** the attention core's products apart (the kernel differs from a GEMM).
  Causal SDPA runs only the unmasked half of the score square (FlashAttention-2 skips fully
  masked tiles, Dao 2023 sec. 3.1); eager attention runs all of it.
- **memory_s** -- norms, activations, rotary, residual adds, casts, softmax and the loss:
  memory-bound. Traffic = ``ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE`` x the bytes a full
  fine-tuning forward saves (``planner.cost.memory.activation_memory``'s inventory, a proxy for what
  those ops write), at ``MEMORY_BANDWIDTH_EFFICIENCY`` x the memory bandwidth; plus the
  embedding gradient and the accumulation of gradients.
- **recompute_s** -- activation checkpointing: full reruns each layer's forward matmuls
  (``flops.recompute``) and its elementwise forward; selective reruns the elementwise part, and under
  torchtitan every second matmul (``flops.every_second_matmul_flops``).
- **optimizer_s** -- the optimizer step (``planner.cost.timing.optimizer_step``): its bytes at the
  memory bandwidth, or over PCIe and at host bandwidth with ``offload_optimizer``.
- **communication_s** -- exposed data- and tensor-parallel collectives and pipeline sends
  (``planner.cost.timing.communication``) on the cluster's links (``planner.specs.cluster``).
- **dequantization_s** -- QLoRA's NF4 -> bf16 passes (``dequantization_s``), memory-bound.
- **offload_s** -- activation offloading's PCIe copies beyond the compute they overlap
  (``planner.cost.timing.offload``).
- **overhead_s** -- host-side cost per micro-batch (``planner.cost.timing.host``): in the bare
  roofline exposed on a GPU only above its device time, added on a CPU; grounded, the smooth
  maximum of host and grounded device time (``grounding.exposed_host_s``). (The optimizer step's
  own host ops are part of ``optimizer_s``, so that ``overhead_s`` stays per micro-batch.)

``step_time_s`` is the sum of those terms (compute, memory, recompute and overhead already
summed over the ``grad_accum`` micro-batches). Without a calibration profile the terms are then
grounded on published throughput (``planner.cost.timing.grounding``: per-GPU-generation matmul
efficiency, per-stack framework and overlap, the pipeline split and bubble, context parallel).

The step is built in two halves: ``micro_batch_work`` (compute, elementwise traffic, recompute
and host ops of one micro-batch: what does not depend on the set-up's ZeRO stage, GPU count,
accumulation or optimizer) and the step around it (gradient traffic, optimizer, communication,
the sums). A caller that evaluates many set-ups of one model on one GPU over the same arrays
passes one ``cache`` dict to every call: the first half and its parts (FLOPs, forward seconds,
activation traffic) are then computed once per key of the set-up fields they read.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost.estimate import recompute_fraction, reruns_every_second_matmul, training_flops
from planner.cost.flops import StepFlops
from planner.cost.memory import activations as act
from planner.cost.memory.activation_memory import layer_activations
from planner.cost.spec_facts import setup_key, shared
from planner.cost.timing.communication import (
    DDP_BUCKET_BYTES,
    GPUS_PER_NODE,
    INTER_NODE_BANDWIDTH_BYTES_PER_S,
    communication_s,
    ring_all_reduce_s,
    ring_gather_s,
)
from planner.cost.timing.dora import dora_micro_batch_s
from planner.cost.timing.efficiency import (
    CAUSAL_FLASH_FRACTION,
    DEFAULT_MAX_EFFICIENCY,
    EFFICIENCY_HALF_SIZE,
    EFFICIENCY_REFERENCE_SIZE,
    MEMORY_BANDWIDTH_EFFICIENCY,
    Corrections,
    default_efficiency,
    forward_seconds,
    matmul_time_s,
)
from planner.cost.timing.float8 import cast_seconds
from planner.cost.timing.gradient_traffic import accumulation_bytes, gradient_traffic_bytes, trainable_per_gpu
from planner.cost.timing.host import (
    BACKWARD_OPS_PER_FORWARD_OP,
    CHECKPOINT_HOST_FACTOR,
    HOST_OVERHEAD_S_PER_OP,
    OPTIMIZER_HOST_OPS,
    OPTIMIZER_HOST_OPS_PER_TENSOR,
    host_ops_per_micro_batch,
    is_cpu,
    optimizer_host_ops,
)
from planner.cost.timing.offload import activation_offload_s, offloaded_bytes
from planner.cost.timing.optimizer_step import (
    HOST_MEMORY_BANDWIDTH_BYTES_PER_S,
    PCIE_BANDWIDTH_BYTES_PER_S,
    optimizer_bytes_per_element,
    optimizer_step_s,
)
from planner.cost.timing.qlora import dequantization_s, fp32_head_extra_s, kbit_twin
from planner.errors import PlannerError
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

__all__ = ["BACKWARD_OPS_PER_FORWARD_OP", "CAUSAL_FLASH_FRACTION", "CHECKPOINT_HOST_FACTOR",
           "DDP_BUCKET_BYTES", "DEFAULT_MAX_EFFICIENCY", "DEFAULT_PRICE_USD_PER_GPU_HOUR",
           "EFFICIENCY_HALF_SIZE", "EFFICIENCY_REFERENCE_SIZE", "ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE",
           "GPUS_PER_NODE", "HOST_MEMORY_BANDWIDTH_BYTES_PER_S", "HOST_OVERHEAD_S_PER_OP",
           "INTER_NODE_BANDWIDTH_BYTES_PER_S", "MEMORY_BANDWIDTH_EFFICIENCY", "NOT_READ_BY_WORK",
           "OPTIMIZER_HOST_OPS", "OPTIMIZER_HOST_OPS_PER_TENSOR", "PCIE_BANDWIDTH_BYTES_PER_S", "Corrections",
           "MicroBatchWork", "default_efficiency", "host_ops_per_micro_batch", "matmul_time_s",
           "micro_batch_flops", "micro_batch_work", "optimizer_bytes_per_element", "optimizer_host_ops",
           "price_usd_per_gpu_hour", "ring_all_reduce_s", "ring_gather_s", "step_time"]

ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE = 3.0
"""Memory-bound traffic per byte a forward saves for backward: written once in forward, then
read and its gradient written once in backward. A guess that calibration corrects."""

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


# ------------------------------------------------------------------------- one micro-batch


NOT_READ_BY_WORK = frozenset({"optimizer", "optimizer_impl", "zero", "num_gpus", "grad_accum", "offload_optimizer"})
"""Set-up fields ``micro_batch_work`` does not read: a search shares one across them. The parts
of the work are shared more widely (their own lists below); every other field, a new one
included, is part of each key."""
_NOT_READ_BY_FLOPS = NOT_READ_BY_WORK | {"precision", "attention", "tensor_parallel", "dropout", "lora_dropout",
                                         "checkpointing", "qlora_block_size", "qlora_double_quant",
                                         "pipeline_parallel", "pipeline_schedule", "virtual_stages",
                                         "sequence_parallel"}
"""(checkpointing enters the FLOPs key as the share of the forward it reruns; the pipeline layout and
sequence parallelism split the same micro-batch FLOPs across GPUs, which the time model prices)"""
_NOT_READ_BY_FORWARD = NOT_READ_BY_WORK | {"checkpointing", "dropout", "lora_dropout"}
_NOT_READ_BY_TRAFFIC = NOT_READ_BY_WORK | {"method", "checkpointing", "lora_targets", "lora_rank", "lora_dropout",
                                           "qlora_block_size", "qlora_double_quant"}


class MicroBatchWork(NamedTuple):
    """Seconds of one micro-batch on one GPU that do not depend on the ZeRO stage, the GPU count,
    the accumulation or the optimizer (arrays over micro-batch, length and rank)."""

    flops: StepFlops
    compute_forward_s: object  # the forward's matmuls
    compute_s: object  # forward + backward matmuls
    attention_s: object  # ... of which the attention core (scores and their product with values)
    elementwise_layers_s: object  # memory-bound work of the layers
    elementwise_head_s: object  # ... of the embedding, final norm, head and loss
    recompute_s: object
    host_ops: float  # eager ops the micro-batch dispatches
    offload_bytes: object  # activation offloading: bytes copied to the host (and back)


def _compute_seconds(flops: StepFlops, fwd_flops: dict, fwd_secs: dict, tp: int):
    """(forward matmul seconds, all matmul seconds, seconds per FLOP of the layers' matmuls, the
    attention core's share of all): each component's backward runs at its forward's seconds per FLOP."""
    compute_fwd = 0.0
    compute_all = 0.0
    attention_all = 0.0
    layer_flops = 0.0
    layer_secs = 0.0
    for component, total_flops in flops.by_component.items():
        if component not in fwd_flops:
            continue
        per_flop = fwd_secs[component] / np.maximum(fwd_flops[component], 1.0)
        compute_fwd = compute_fwd + fwd_secs[component]
        seconds = _arr(total_flops) / (tp if component != "lora" else 1) * per_flop
        compute_all = compute_all + seconds
        if component == "attention_core":
            attention_all = attention_all + seconds
        if component in ("attention", "attention_core", "mlp", "experts"):
            layer_flops = layer_flops + fwd_flops[component]
            layer_secs = layer_secs + fwd_secs[component]
    return compute_fwd, compute_all, layer_secs / np.maximum(layer_flops, 1.0), attention_all


def _activation_traffic(spec: ModelSpec, setup: TrainingSetup, b, s):
    """(layers', head's) bytes a full fine-tuning forward without checkpointing saves, per GPU."""
    probe = setup.model_copy(update={"method": "full", "checkpointing": "none"})
    layers = layer_activations(spec, probe, b, s, setup.tensor_parallel)[0]
    head = b * s * act.head_activation_bytes_per_token(spec, setup.precision, setup.dropout, True)
    total = layers + head
    return total - head, head


def micro_batch_flops(spec: ModelSpec, setup: TrainingSetup, b, s, rank, cache: dict | None = None) -> StepFlops:
    """``planner.cost.estimate.training_flops`` of one micro-batch, filed in ``cache`` (see
    ``step_time``) under what it reads: the method, the share of the forward checkpointing
    reruns, the LoRA targets."""
    # any checkpointing makes HF's LoRA inputs require grad (estimate.training_flops, input_requires_grad)
    key = (*setup_key("flops", setup, _NOT_READ_BY_FLOPS), recompute_fraction(setup), setup.checkpointing != "none",
           reruns_every_second_matmul(setup))
    return shared(cache, key, lambda: training_flops(spec, setup, b, s, rank))


def micro_batch_work(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, b, s, rank, corr: Corrections,
                     cache: dict | None = None) -> MicroBatchWork:
    """Matmuls, elementwise traffic, recompute and host ops of one micro-batch of ``b`` sequences
    of ``s`` tokens (arrays) at LoRA ``rank``, on ``gpu`` with the calibration ``corr``; its parts
    are filed in ``cache`` (see ``step_time``) under the set-up fields each reads."""
    tokens = b * s
    tp = setup.tensor_parallel
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY
    flops = micro_batch_flops(spec, setup, b, s, rank, cache)
    fwd_flops, fwd_secs = shared(cache, setup_key("forward", setup, _NOT_READ_BY_FORWARD),
                                 lambda: forward_seconds(spec, setup, b, s, rank, gpu, corr))
    compute_fwd, compute_all, layer_per_flop, attention_all = _compute_seconds(flops, fwd_flops, fwd_secs, tp)
    layer_traffic, head_traffic = shared(cache, setup_key("traffic", setup, _NOT_READ_BY_TRAFFIC),
                                         lambda: _activation_traffic(spec, setup, b, s))
    elementwise_layers = ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE * layer_traffic / bandwidth * corr.memory_time_factor
    # the scaled casts of the float8 linears (planner.cost.timing.float8)
    elementwise_layers = elementwise_layers + cast_seconds(spec, setup, tokens, bandwidth) * corr.memory_time_factor
    elementwise_head = ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE * head_traffic / bandwidth * corr.memory_time_factor
    forward_share = 1.0 / ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE
    recompute = _arr(0.0) * tokens
    if setup.checkpointing != "none":  # the matmuls it reruns (none for HF's op-level selective) and the elementwise forward
        recompute = _arr(flops.recompute) / tp * layer_per_flop + forward_share * elementwise_layers
    # DoRA's weight norm and output passes, its own recompute included (planner.cost.timing.dora)
    elementwise_layers = elementwise_layers + dora_micro_batch_s(spec, setup, gpu, tokens, rank, bandwidth, corr,
                                                                 layer_per_flop)
    return MicroBatchWork(flops, compute_fwd, compute_all, attention_all, elementwise_layers, elementwise_head,
                          recompute, host_ops_per_micro_batch(spec, setup), offloaded_bytes(spec, setup, b, s))


# ------------------------------------------------------------------------------- the step


FP16_TWINS = {"fp16": "bf16", "fp16-mixed": "bf16-mixed"}
"""fp16 moves the bytes of bf16 (``planner.cost.memory.phases.SAME_BYTES_AS``) at the fp16 tensor peak;
the GradScaler's unscale is one in-place pass over the gradients, left out."""


def _fp16_twin(setup: TrainingSetup, gpu: GpuSpec):
    """(bf16 twin of ``setup``, ``gpu`` with its fp16 peak as the bf16 one, no shared cache: the
    twin must not share parts with a real bf16 set-up of a GPU whose two peaks differ)."""
    peaks = {**gpu.peak_flops, "bf16": gpu.peak_flops_for("fp16")}
    return (setup.model_copy(update={"precision": FP16_TWINS[setup.precision]}),
            gpu.model_copy(update={"peak_flops": peaks}), None)


def _device(profile, gpu: GpuSpec | None) -> GpuSpec:
    """The GPU a step runs on: ``gpu``, else the profile's device (which must be ``gpu``'s)."""
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
    return gpu


def step_time(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None, micro_batch=None, seq_len=None,
              lora_rank=None, profile=None, cache: dict | None = None, cluster=None,
              grounded: bool | None = None) -> dict[str, np.ndarray]:
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
    ``cache``: a dict the caller keeps for calls of one model on one GPU with one profile over the
    same arrays; the parts that other set-ups share (``micro_batch_work``: everything that does
    not depend on the ZeRO stage, the GPU count, the accumulation or the optimizer) are computed
    once into it.
    ``cluster``: a ``planner.specs.cluster.ClusterSpec`` (None: ``default_cluster(gpu)``).
    ``grounded``: apply the constants fitted on published throughput (``planner.cost.timing.grounding``;
    adds ``pipeline_bubble_s``). Default: when no profile is given (a profile's corrections
    replace them); ``False`` gives the bare roofline a fit starts from.
    """
    gpu = _device(profile, gpu)
    if setup.precision in FP16_TWINS:  # priced as bf16 on a GPU whose bf16 peak is its fp16 peak
        setup, gpu, cache = _fp16_twin(setup, gpu)
    asked_gpu = gpu
    if setup.kbit_preparation and setup.stack == "hf":  # fp32 widths, bf16 GEMMs, an fp32 head (qlora.kbit_twin)
        (setup, gpu), cache = kbit_twin(setup, gpu), None
    corr = Corrections(profile)
    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    rank = _arr(setup.lora_rank if lora_rank is None else lora_rank)
    work = shared(cache, setup_key("work", setup, NOT_READ_BY_WORK),
                  lambda: micro_batch_work(spec, setup, gpu, b, s, rank, corr, cache))
    parts = _step(spec, setup, gpu, work, b * s, rank, corr, cluster)
    if gpu is not asked_gpu:
        parts["compute_s"] = parts["compute_s"] + setup.grad_accum * fp32_head_extra_s(spec, setup, asked_gpu, b * s)
    if profile is None if grounded is None else grounded:
        from planner.cost.timing import grounding as time_model

        parts = time_model.ground(parts, time_model.features(spec, setup, gpu), time_model.load_constants()["values"])
    return _totals(parts, setup, gpu, work, b * s)


def _step(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, work: MicroBatchWork, tokens, rank, corr, cluster):
    """The roofline parts of a step around ``grad_accum`` micro-batches of ``work``: gradient
    traffic, host overhead, optimizer, communication."""
    ga = setup.grad_accum
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY
    memory = work.elementwise_layers_s + work.elementwise_head_s + gradient_traffic_bytes(spec, setup, rank) / bandwidth * (
        corr.memory_time_factor)
    device_mb = work.compute_s + memory + work.recompute_s
    host_mb = corr.host_overhead_s_per_op * work.host_ops + 0.0 * tokens
    overhead_mb = host_mb if is_cpu(gpu) else np.maximum(host_mb - device_mb, 0.0)
    trainable = trainable_per_gpu(spec, setup, rank) + 0.0 * tokens
    split = setup.pipeline_parallel * setup.context_parallel  # the share of a micro-batch's work one GPU runs
    fwd_s = (work.compute_forward_s + 1.0 / ELEMENTWISE_TRAFFIC_PER_SAVED_BYTE * memory) / split
    bwd_s = device_mb / split - fwd_s
    # the step's last micro-batch adds all its gradients into the accumulated ones (the average above
    # spreads the ga - 1 additions over ga micro-batches): the backward a DDP / ZeRO-1 reduction overlaps
    last_extra = accumulation_bytes(spec, setup, rank) / ga / bandwidth * corr.memory_time_factor
    last_bwd_s = bwd_s + last_extra / split
    optimizer = optimizer_step_s(spec, setup, gpu, trainable, rank, corr, bwd_s)
    communication = communication_s(spec, setup, gpu, tokens, trainable, fwd_s, bwd_s, corr, cluster,
                                    last_bwd_s)
    return {
        "compute_s": ga * (work.compute_s - work.attention_s) + 0.0 * tokens,
        "attention_s": ga * work.attention_s + 0.0 * tokens,
        "memory_s": ga * memory + 0.0 * tokens,
        "recompute_s": ga * work.recompute_s + 0.0 * tokens,
        "overhead_s": ga * overhead_mb + 0.0 * tokens,
        "optimizer_s": optimizer + 0.0 * tokens,
        "communication_s": communication + 0.0 * tokens,
        "dequantization_s": ga * dequantization_s(spec, setup, bandwidth) * corr.memory_time_factor + 0.0 * tokens,
        "offload_s": ga * activation_offload_s(work.offload_bytes, fwd_s, bwd_s) + 0.0 * tokens,
    }


def _totals(result: dict, setup: TrainingSetup, gpu: GpuSpec, work: MicroBatchWork, tokens) -> dict:
    """``step_time_s`` (the sum of the parts), tokens per second of the job, model FLOPs, MFU."""
    ga, tp, dp = setup.grad_accum, setup.tensor_parallel, setup.data_parallel
    step = sum(result.values())
    model_flops = _arr(work.flops.model) * ga * dp
    result["step_time_s"] = step
    result["tokens_per_s"] = tokens * ga * dp / step
    result["flops_per_step"] = model_flops + 0.0 * tokens
    result["mfu"] = model_flops / (step * gpu.peak_flops_for(setup.precision) * setup.num_gpus)
    split = setup.pipeline_parallel * setup.context_parallel
    result["achieved_flops_per_s"] = _arr(work.flops.executed) * ga / (tp * split) / step
    return result
