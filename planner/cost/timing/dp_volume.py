"""Bytes of the data-parallel collectives of one training step, per GPU, as each stack's code issues them.

Counted, not taken from papers: ``benchmarks/comm_oracle_cpu.py`` runs DeepSpeed 0.19.8 (ZeRO-1/2/3, what
``stack="hf"`` with ``zero>0`` launches), PyTorch FSDP2 ``fully_shard`` (what ``torchtitan``/``torchtune``
run for ``zero=3``) and DDP on 2 CPU ranks and records every collective; ``tests/data/comm_oracle.json``
holds the counts and ``tests/test_comm_volumes.py`` checks these functions against them. Bytes are the
full buffer of each collective (the gathered output of an all-gather, the input of a reduce-scatter),
what ``communication.ring_gather_s`` / ``ring_all_reduce_s`` take. How much of it compute hides is
``communication._data_parallel_s``'s business, not this module's.

What the counts show (2 ranks, gradient accumulation 2, bf16; tables in benchmarks/README.md):

- DDP under ``no_sync`` (HF Trainer / accelerate): one all-reduce of the gradients per step, in the
  gradients' dtype (fp32 under autocast).
- DeepSpeed ZeRO-1/2: the gradients are all-reduced, not reduce-scattered, in bf16 (the model's dtype,
  LoRA adapters included): ``DeepSpeedZeroOptimizer.average_tensor`` (``stage_1_and_2.py``) buckets every
  partition for ``allreduce_and_scatter`` while ``use_multi_rank_bucket_allreduce`` is true (its
  default), twice a reduce-scatter's traffic. ZeRO-1 reduces once per step (the last micro-batch's
  backward), ZeRO-2 at every micro-batch's backward; both all-gather the updated bf16 weights after the
  step.
- DeepSpeed ZeRO-3: every micro-batch gathers every partitioned weight once in forward, in its storage
  dtype (the bf16 base; peft's adapters stay fp32), and reduce-scatters the bf16 gradients in backward.
  With HF's ``stage3_max_reuse_distance`` (1e9 elements) and a model inside it, backward gathers nothing
  more: full fine-tuning with checkpointing included (a trainable weight gathered for the recompute
  stays until its backward). LoRA with checkpointing gathers the layers' frozen weights once more (the
  recompute). With a smaller window, more is gathered (``ZERO3_RELEASED_EXTRA``: for full fine-tuning
  one embedding-sized matrix and half the layers again, with 4 layers and with 8), by the share
  ``zero3_released_share``; a 7B model at the 1e9 window pays all of it.
- FSDP2 (``reshard_after_forward=True``): every micro-batch gathers every weight (the root's too) in
  forward and again in backward (activation checkpointing adds no gather: the recompute runs after the
  backward pre-hook's unshard), in ``MixedPrecisionPolicy.param_dtype`` (bf16), and reduce-scatters the
  gradients every micro-batch in ``reduce_dtype``: fp32 under torchtitan's default policy
  (``mixed_precision_reduce = "float32"``), the parameters' dtype under torchtune (a bf16 model, no
  policy). ``set_requires_gradient_sync(False)`` would reduce once per step; neither recipe sets it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import zero_dtypes

ZERO3_REUSE_WINDOW_ELEMS = 1e9
"""``stage3_max_reuse_distance`` of HF's example ZeRO-3 config (``"auto"`` leaves it at 1e9)."""
ZERO3_RELEASED_EXTRA: dict[tuple[str, bool], tuple[float, float]] = {
    # (method, full checkpointing) -> (vocab x hidden matrices, share of the decoder layers' gathered bytes)
    # gathered once more per micro-batch when nothing is kept (stage3_max_reuse_distance 0), counted by
    # benchmarks/comm_oracle_cpu.py on 4 layers (cases ds3-*-noreuse) and held at 8 (ds3-*-noreuse-L8):
    # full fine-tuning re-gathers one embedding-sized matrix and half the layers (2 of 4, 4 of 8)
    ("full", False): (1.0, 0.5), ("full", True): (1.0, 0.5),
    ("lora", False): (0.0, 0.03), ("lora", True): (1.0, 0.14),
}
"""DeepSpeed ZeRO-3 weights gathered again when nothing is kept between uses (see module doc)."""


@dataclass(frozen=True)
class DataParallelVolume:
    """Full-buffer bytes per GPU (arrays) of one step's data-parallel collectives.

    ``forward_gather_bytes`` / ``backward_gather_bytes``: all-gathers of weights in one micro-batch's
    forward / backward; ``reduce_bytes``: one reduction of the gradients; ``reductions``: how many
    micro-batches reduce (1: only the last); ``all_reduce``: the reduction is an all-reduce (DDP, DeepSpeed
    ZeRO-1/2), else a reduce-scatter (ZeRO-3, FSDP2); ``step_gather_bytes``: the
    updated weights gathered after the optimizer step (ZeRO-1/2)."""

    forward_gather_bytes: np.ndarray
    backward_gather_bytes: np.ndarray
    reduce_bytes: np.ndarray
    reductions: int
    all_reduce: bool
    step_gather_bytes: np.ndarray


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def weight_bytes(setup) -> float:
    """Bytes of a gathered weight: 16-bit unless training in fp32 (DeepSpeed's bf16 model; FSDP2's
    ``param_dtype``)."""
    return 4.0 if setup.precision == "fp32" else 2.0


def gradient_bytes(setup) -> float:
    """Bytes of a reduced gradient element. DeepSpeed (hf, ZeRO>0): the model's 16-bit dtype, LoRA
    adapters too. FSDP2: fp32 on torchtitan (``reduce_dtype`` float32), the parameters' dtype on torchtune.
    DDP and the other stacks: fp32 master gradients under ``bf16-mixed``, 16-bit in pure ``bf16``."""
    if setup.precision == "fp32":
        return 4.0
    if zero_dtypes.launched_by_deepspeed(setup):
        return 2.0
    if setup.stack == "torchtitan" and setup.zero == 3:
        return 4.0
    return 2.0 if setup.precision == "bf16" else 4.0


def _base_elems(spec, setup) -> float:
    """Frozen elements one GPU's stage holds under LoRA (the whole base model over tp x pp)."""
    return spec_facts.param_counts(spec).total / (setup.tensor_parallel * setup.pipeline_parallel)


def _layer_base_elems(spec, setup) -> float:
    """The decoder layers' frozen weights of one GPU's stage (what a checkpointed layer's recompute reads)."""
    counts = spec_facts.param_counts(spec)
    return (counts.attention + counts.mlp + counts.experts) / (setup.tensor_parallel * setup.pipeline_parallel)


def gathered_weight_bytes(spec, setup, trainable):
    """Bytes one full gather of the sharded weights moves: the trained weights, or under LoRA the frozen
    base and the adapters. DeepSpeed ZeRO-3 gathers each in its storage dtype (peft keeps the adapters
    fp32; the base is the 16-bit model); FSDP2 casts every shard to ``param_dtype`` first. With
    torchao's ``enable_fsdp_float8_all_gather`` the decoder linears travel in float8 (1 byte; torchao
    float8 README)."""
    w = weight_bytes(setup)
    if setup.method == "full":
        if setup.float8 and setup.float8_all_gather:
            share = spec_facts.projection_params(spec) / max(spec_facts.param_counts(spec).total, 1)
            return _arr(trainable) * (w * (1.0 - share) + 1.0 * share)
        return _arr(trainable) * w
    return _base_elems(spec, setup) * w + _arr(trainable) * _adapter_bytes(setup)


def _adapter_bytes(setup) -> float:
    """Bytes of a gathered LoRA adapter element: the dtype DeepSpeed holds it in
    (``zero_dtypes.adapter_param_bytes``: peft's fp32 at ZeRO-3 unless ``adapter_dtype="base"``), else
    FSDP2's ``param_dtype``."""
    if zero_dtypes.launched_by_deepspeed(setup):
        return zero_dtypes.adapter_param_bytes(setup)
    return weight_bytes(setup)


def zero3_released_share(spec, setup, elements) -> np.ndarray:
    """Share of ``ZERO3_RELEASED_EXTRA`` a DeepSpeed ZeRO-3 model of ``elements`` partitioned weights per
    GPU pays at ``stage3_max_reuse_distance`` W (``PartitionedParameterCoordinator.__params_to_release``
    keeps a module's weights when they recur within W elements of the trace): ``clip(2 - W / E, 0, 1)``.
    Counted on the 4-layer model (E = 7.6M): W 0, 2e6 and 5e6 pay all of it, 1e7 0.68 of it (counted
    0.68 without checkpointing, 0.94 with), 2e7 and 1e9 none: the weights gathered again are those whose
    next use lies between E and 2E elements away. A 7B model at HF's W = 1e9 pays all of it."""
    e = np.maximum(_arr(elements), 1.0)
    return np.clip(2.0 - ZERO3_REUSE_WINDOW_ELEMS / e, 0.0, 1.0)


def zero3_backward_gather_bytes(spec, setup, trainable):
    """DeepSpeed ZeRO-3's gathers in one micro-batch beyond the forward's one pass (they happen in the
    backward, or are prefetched for it): under LoRA with full checkpointing the layers' frozen weights
    again for the recompute (``fetch_sub_module`` attributes frozen parameters to the recompute and
    releases them after; counted: exactly the layers' base once, at 4 and 8 layers), and the weights
    released beyond the reuse window (``ZERO3_RELEASED_EXTRA`` x ``zero3_released_share``)."""
    ckpt = setup.checkpointing == "full"
    w, split = weight_bytes(setup), setup.tensor_parallel * setup.pipeline_parallel
    elements = _arr(trainable) if setup.method == "full" else _base_elems(spec, setup) + _arr(trainable)
    layers_b = _layer_base_elems(spec, setup) * w
    recompute = layers_b if setup.method != "full" and ckpt else 0.0
    if setup.method != "full":  # the adapters travel in their own dtype
        layers_b = layers_b + _arr(trainable) * _adapter_bytes(setup)
    matrices, share = ZERO3_RELEASED_EXTRA[("full" if setup.method == "full" else "lora", ckpt)]
    extra = matrices * spec.vocab_size * spec.hidden_size * w / split + share * layers_b
    return recompute + zero3_released_share(spec, setup, elements) * extra


def data_parallel_volume(spec, setup, trainable) -> DataParallelVolume:
    """The collectives of one step of ``setup`` (``trainable`` elements per GPU before sharding)."""
    zero = _arr(0.0) * _arr(trainable)
    grads = _arr(trainable) * gradient_bytes(setup)
    if setup.zero == 0:
        return DataParallelVolume(zero, zero, grads, 1, True, zero)
    if setup.zero in (1, 2):
        step_gather = _arr(trainable) * weight_bytes(setup)
        if setup.stack == "megatron":  # distributed optimizer: reduce-scatter the (fp32) gradient buffer once per
            # step, all-gather the updated 16-bit parameters (Megatron-LM docs/.../dist_optimizer.md)
            return DataParallelVolume(zero, zero, grads, 1, False, step_gather)
        # DeepSpeed's use_multi_rank_bucket_allreduce (default True): all-reduced buckets
        return DataParallelVolume(zero, zero, grads, setup.grad_accum if setup.zero == 2 else 1, True, step_gather)
    forward = gathered_weight_bytes(spec, setup, trainable)
    if zero_dtypes.launched_by_deepspeed(setup):  # DeepSpeed ZeRO-3
        backward = zero3_backward_gather_bytes(spec, setup, trainable)
    else:  # FSDP2 full shard (torchtitan, torchtune) and Megatron's sharded data parallel
        backward = forward
    return DataParallelVolume(forward, backward + zero, grads, setup.grad_accum, False, zero)


def bytes_per_step(volume: DataParallelVolume, grad_accum: int) -> dict[str, np.ndarray]:
    """Full-buffer bytes per GPU of one step by collective: ``all_gather``, ``reduce_scatter``
    (ZeRO's reductions), ``all_reduce`` (DDP's)."""
    reduced = volume.reduce_bytes * volume.reductions
    return {
        "all_gather": grad_accum * (volume.forward_gather_bytes + volume.backward_gather_bytes) + volume.step_gather_bytes,
        "reduce_scatter": reduced * (0.0 if volume.all_reduce else 1.0),
        "all_reduce": reduced * (1.0 if volume.all_reduce else 0.0),
    }
