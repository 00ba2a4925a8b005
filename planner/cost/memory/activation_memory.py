"""Activations of one training micro-batch per GPU: what forward saves, what checkpointing keeps.

The part of training memory that grows with the tokens. Per layer, ``planner.cost.memory.activations``
gives the bytes saved for backward (its inventory, per token and per token and key); here they are
summed over the layers under activation checkpointing (none, op-level selective, full), split by
tensor parallelism, with LoRA's adapter tensors and the head, the autocast weight copies and the
loss's temporaries. Nothing here depends on the GPU count, the accumulation or the optimizer, so a
search computes it once for all of them (``activation_memory``); the ZeRO stage matters on stack hf
only, where it means DeepSpeed, which runs bf16 without autocast (``compute_setup``, applied first).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import activations as act
from planner.cost.memory import dora, moe_lora
from planner.cost.memory.states import adapter_bytes, dtype_layout, fp32_unquantized
from planner.specs.architecture import lora_expert_targets
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

NOT_READ_BY_ACTIVATIONS = frozenset({"optimizer", "optimizer_impl", "zero", "num_gpus", "grad_accum",
                                     "offload_optimizer"})
"""Set-up fields ``activation_memory`` does not read: a search shares one across them. ZeRO on stack hf
changes the precision (``compute_setup``): key the cache on ``compute_setup(setup)``."""


def _arr(x):
    return np.asarray(x, dtype=np.float64)


class ActivationMemory(NamedTuple):
    """Token-dependent bytes of one micro-batch per GPU (arrays over micro-batch, length, rank)."""

    layers: object  # every layer's saved activations without checkpointing
    kept: object  # what checkpointing keeps of the layers (``layers`` without checkpointing)
    recompute_transient: object  # one layer's activations recomputed in backward (+ its casts)
    head: object  # outside the layers: ids, final norm, the loss's log-softmax
    casts: object  # autocast / QLoRA dequantized weight copies held through backward
    saved: object  # kept + head + casts: what forward leaves for backward
    loss_temporaries: object
    forward_logits: object
    expert_grad: object = 0.0  # peft expert LoRA: a merged stack's gradient in backward (``moe_lora``)


def _per_layer_bytes(spec: ModelSpec, setup: TrainingSetup, trainable: bool, mask_bytes: int) -> tuple:
    """Per layer (norm bytes per token, other bytes per token, bytes per token and key, bytes per
    token selective checkpointing keeps): integers, kept per spec and precision."""

    def compute() -> tuple:
        residual = act.PRECISION[setup.precision].residual
        out = []
        kbit_autocast = fp32_unquantized(setup) and act.PRECISION[setup.precision].autocast
        wrapped = {index for index, _, _ in lora_expert_targets(spec, setup.lora_targets)}
        for index, layer in enumerate(spec.layers):
            if kbit_autocast:  # fp32 norms and residual stream, bf16 attention copies
                per_token, per_key = act.kbit_autocast_layer_bytes(spec, layer, setup.attention, setup.dropout,
                                                                   mask_bytes)
                norms = act.norms_bytes(layer, act.PRECISION["fp32"], trainable)
            else:
                per_token, per_key = act.layer_activation_bytes(
                    spec, layer, setup.precision, setup.attention, setup.dropout, trainable, mask_bytes
                )
                norms = act.norms_bytes(layer, act.PRECISION[setup.precision], trainable)
                if not trainable:
                    per_token -= act.frozen_moe_unsaved_bytes(layer, act.PRECISION[setup.precision],
                                                              index in wrapped)
            if not trainable and index == 0 and layer.pre_norms:
                # the first norm reads the frozen embedding: nothing needs its gradient
                first = act.norm_saved_bytes(layer, residual, False)
                per_token, norms = per_token - first, norms - first
            # residual dropouts sit with the norms outside the tensor-parallel region (Korthikanti
            # et al. 2022 sec. 4.1): replicated under tensor parallelism unless sequence-parallel
            replicated = norms + act.dropout_bytes(spec, layer, setup.attention, setup.dropout, mask_bytes)[0]
            out.append((replicated, per_token - replicated, per_key, selective_kept_per_token(layer, setup)))
        return tuple(out)

    key = ("layer_bytes", setup.precision, setup.attention, setup.dropout, trainable, mask_bytes,
           fp32_unquantized(setup), tuple(setup.lora_targets))
    return spec_facts.cached(spec, key, compute)


def layer_activations(spec: ModelSpec, setup: TrainingSetup, b, s, tp: int, device: str = "cuda", rank=None):
    """(all layers' activations without checkpointing, what checkpointing keeps, the transient
    of recomputing one layer in backward). Context parallelism leaves ``1/cp`` of the tokens on a
    GPU; sequence parallelism splits the replicated part (norms, residual dropouts, the layer input
    kept by checkpointing) over the tensor-parallel group too (Korthikanti et al. 2022 sec. 4.2.2)."""
    tokens = b * s / setup.context_parallel
    sp = tp if setup.sequence_parallel else 1
    total = 0.0
    largest = 0.0
    kept = 0.0
    trainable = setup.method == "full"
    mask_bytes = act.DROPOUT_MASK_BYTES if device == "cuda" else act.PRECISION[setup.precision].matmul
    rank = _arr(setup.lora_rank if rank is None else rank)
    lora_per_token = lora_per_token_by_layer(spec, setup, rank, mask_bytes) if not trainable else {}
    dora_saved = dora.saved_bytes_by_layer(spec, setup, tokens, act.PRECISION[setup.precision].matmul,
                                           adapter_bytes(setup))
    for index, (norms, inner, per_key, selective) in enumerate(_per_layer_bytes(spec, setup, trainable, mask_bytes)):
        bytes_layer = tokens * (norms / sp + inner / tp) + tokens * s * per_key / tp
        if index in lora_per_token:
            bytes_layer = bytes_layer + tokens * lora_per_token[index]
        bytes_layer = bytes_layer + dora_saved.get(index, 0.0)
        total = total + bytes_layer
        largest = np.maximum(largest, bytes_layer)
        if setup.checkpointing == "selective":
            kept = kept + tokens * (selective[0] / sp + selective[1] / tp)
    if setup.checkpointing == "none":
        return total, total, 0.0
    if setup.checkpointing == "full":
        kept = tokens * act.PRECISION[setup.precision].residual * spec.hidden_size * spec.num_layers / sp
    return total, kept, largest


def selective_kept_per_token(layer, setup: TrainingSetup) -> tuple[float, float]:
    """Op-level selective checkpointing (torchtitan's policy: keep matmul and attention outputs,
    recompute everything else): the layer input, q/k/v, attention output and log-sum-exp, the
    output projection, the MLP's up-projections and its output. Returns (bytes per token outside
    the tensor-parallel region: the layer input and the two row-parallel outputs, bytes per token
    split by tensor parallelism)."""
    p = act.PRECISION[setup.precision].matmul
    r = act.PRECISION[setup.precision].residual
    h = layer.hidden_size
    inter = layer.intermediate_size if not layer.num_experts else layer.experts_per_token * layer.expert_intermediate_size
    up = (2 if layer.gated_mlp else 1) * inter
    return r * h + 2 * p * h, p * (2 * layer.q_dim + 2 * layer.kv_dim + up) + act.LSE_BYTES * layer.num_heads


def lora_per_token_by_layer(spec: ModelSpec, setup: TrainingSetup, rank, mask_bytes: float = 1.0) -> dict:
    """LoRA adds per adapted linear and token: peft casts the input to fp32 for the fp32
    adapter (kept by A's matmul), the rank-r intermediate (fp32, kept by B's matmul), and a
    dropout mask when lora_dropout > 0; adapters at the base's 16-bit dtype keep less
    (``activations.lora_base_dtype_bytes_per_token``). Kept per spec, targets, dropout and ranks."""
    w = int(adapter_bytes(setup))
    # peft casts an adapter's input only when its dtype differs: fp32 activations (precision fp32,
    # QLoRA after k-bit preparation without autocast) reach fp32 adapters as they are
    shared = w == 2 or setup.precision == "fp32"
    autocast_copies = fp32_unquantized(setup) and act.PRECISION[setup.precision].autocast

    def per_layer() -> dict:
        out: dict = {}
        adapted: dict = {}
        for index, lin in spec_facts.lora_linears(spec, setup.lora_targets):
            adapted.setdefault(index, set()).add(lin.name)
            if autocast_copies:
                out[index] = out.get(index, 0) + act.lora_autocast_bytes_per_token(lin.in_features, rank,
                                                                                setup.lora_dropout)
            elif not shared:
                out[index] = out.get(index, 0) + act.lora_bytes_per_token(lin.in_features, rank, setup.lora_dropout)
        if shared and not autocast_copies:
            out = {index: act.lora_base_dtype_bytes_per_token(spec.layers[index], names, rank, setup.lora_dropout,
                                                              w, mask_bytes, setup.attention)
                   for index, names in adapted.items()}
        return out

    rank = _arr(rank)
    key = ("lora_activations", tuple(setup.lora_targets), setup.lora_dropout, rank.tobytes(), rank.shape, w,
           mask_bytes, setup.attention, shared, autocast_copies)
    return spec_facts.cached(spec, key, per_layer)


def qlora_dequant_bytes(spec: ModelSpec, tp: int) -> float:
    """bitsandbytes dequantizes one NF4 weight at a time to the compute dtype and frees it:
    the transient is the largest projection in bf16."""
    largest = spec_facts.cached(spec, ("largest_nf4", ), lambda: max(
        (lin.weight_params for layer in spec.layers for lin in layer.linears if lin.is_module), default=0))
    return 2.0 * largest / tp


def _weight_copies(spec: ModelSpec, setup: TrainingSetup, tp: int) -> tuple:
    """(weight copies held through backward, the head's share): autocast's bf16 casts under
    bf16-mixed, one dequantized projection with QLoRA."""
    casts = spec_facts.cached(spec, ("autocast",), lambda: act.autocast_weight_bytes(spec)) / tp if (
        setup.precision == "bf16-mixed") else 0.0
    head_cast = 2.0 * spec.vocab_size * spec.hidden_size / tp if setup.precision == "bf16-mixed" else 0.0
    if setup.method == "qlora":
        casts = head_cast = qlora_dequant_bytes(spec, tp)
        if fp32_unquantized(setup) and setup.precision == "bf16-mixed":
            # an fp32 head (k-bit preparation, mixed precision): autocast keeps its bf16 cast for backward
            head = 2.0 * spec.vocab_size * spec.hidden_size / tp
            casts, head_cast = casts + head, head_cast + head
    return casts, head_cast


def compute_setup(setup: TrainingSetup) -> TrainingSetup:
    """The set-up whose activations a step really has. HF Trainer + DeepSpeed (stack hf, ZeRO >= 1) with
    ``bf16-mixed``: accelerate 1.15 enables no autocast under DeepSpeed (``Accelerator.__init__``:
    ``native_amp`` stays False for ``DistributedType.DEEPSPEED``), and DeepSpeed 0.19.8's engine casts every
    parameter to bf16 (``engine.py`` ``_cast_module_mixed_precision``; fp32 master copies live in its
    optimizer), LoRA adapters included: activations are those of pure bf16 with adapters in the base
    dtype, and no autocast weight copies (was ~15 GiB over at 8B without checkpointing). Pipeline stages are
    not DeepSpeed-launched (``zero_buffers.applies``): they keep autocast. LoRA adapters take the dtype
    DeepSpeed holds them in (``zero_dtypes.adapter_param_bytes``): the engine's at ZeRO-1/2, peft's fp32 at
    ZeRO-3 (the HF Trainer's zero.Init model is not cast), where each adapted linear then saves its input
    cast to fp32. QLoRA's adapters under ZeRO-1/2 (cast to bf16 by the engine) stay priced fp32 here:
    ``adapter_dtype`` cannot say it for a 4-bit base (``tests/test_zero_lora.py`` marks that gap)."""
    from planner.cost.memory import zero_dtypes

    if not zero_dtypes.launched_by_deepspeed(setup):
        return setup
    update = {"precision": "bf16"} if setup.precision == "bf16-mixed" else {}
    if setup.method == "lora" and setup.precision in ("bf16-mixed", "bf16"):
        update["adapter_dtype"] = "base" if zero_dtypes.adapter_param_bytes(setup) == 2.0 else "fp32"
    return setup.model_copy(update=update) if update else setup


def activation_memory(spec: ModelSpec, setup: TrainingSetup, b, s, rank, device: str = "cuda") -> ActivationMemory:
    """Activations of one micro-batch of ``b`` sequences of ``s`` tokens (arrays broadcast with
    ``rank``). Depends on the method, precision, attention, dropout, checkpointing, LoRA targets
    and tensor parallelism of ``setup`` (and ZeRO on stack hf: ``compute_setup``), not on its GPU count,
    accumulation or optimizer."""
    setup = compute_setup(setup)
    tokens = b * s / setup.context_parallel  # each context-parallel GPU holds 1/cp of a sequence
    tp = setup.tensor_parallel
    if setup.kbit_preparation and spec.is_moe:
        from planner.errors import PlannerError

        raise PlannerError("kbit_preparation on a mixture of experts is not priced (its fp32 stacked experts are not "
                           "traced): leave --kbit-preparation out for this model")
    layer_act, ckpt_saved, ckpt_transient = layer_activations(spec, setup, b, s, tp, device, rank)
    head_act = tokens * act.head_activation_bytes_per_token(spec, setup.precision, setup.dropout, setup.method == "full")
    casts, head_cast = _weight_copies(spec, setup, tp)
    if setup.checkpointing != "none":
        # casts made inside a checkpointed layer are recomputed with it: only the head's stays
        layer_casts = (casts - head_cast) / spec.num_layers
        casts, ckpt_transient = head_cast, ckpt_transient + layer_casts
    merged, merged_layer, expert_grad = moe_lora.expert_lora_bytes(spec, setup, _arr(rank))
    if setup.checkpointing != "none":  # the merged stacks are rebuilt with their layer's recompute
        ckpt_transient, merged, expert_grad = ckpt_transient + merged_layer + expert_grad, 0.0, 0.0
    casts = casts + merged
    saved = ckpt_saved + head_act + casts
    loss_temp = tokens * act.loss_backward_temp_bytes_per_token(spec)
    # forward's loss: the head's logits (compute dtype) and their fp32 copy, beside the saved
    # log-softmax output (already in ``saved``); in fp32 ``logits.float()`` is the same tensor
    p = act.PRECISION[setup.precision].matmul
    logits_fwd = tokens * spec.vocab_size * (p + (4 if p != 4 else 0))
    if setup.loss_impl == "fused-linear":
        fused = act.fused_linear_ce_bytes(spec, setup.precision, tokens, setup.method == "full")
        # a trained head's weight gradient is made in forward and waits for backward beside the rest
        head_grad = spec.vocab_size * spec.hidden_size * dtype_layout(setup).grad / tp if setup.method == "full" else 0.0
        head_act = head_act + tokens * fused["saved_per_token"] + head_grad
        saved = ckpt_saved + head_act + casts
        logits_fwd, loss_temp = fused["forward_bytes"], fused["loss_temporaries"]
    return ActivationMemory(layer_act, ckpt_saved, ckpt_transient, head_act, casts, saved, loss_temp, logits_fwd,
                            expert_grad)
