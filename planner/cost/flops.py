"""FLOPs of one training micro-batch, per component, counted the way ``FlopCounterMode`` does.

Convention (PyTorch ``torch.utils.flop_counter``): only matrix products count, 2 FLOPs per
multiply-add; attention scores and values are counted over the full ``seq x seq`` square (a
causal mask does not reduce them); bias additions, norms, activations, softmax and the loss are
not counted. Backward: a linear costs one product for the input gradient (when the input needs
one) and one for the weight gradient (when the weight is trained); attention backward is twice
its forward. With checkpointing the recomputed forward is counted apart (``recompute``).

Every function takes scalars or numpy arrays (broadcast) for the token counts and LoRA rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.specs.model import LayerSpec, Linear, ModelSpec


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch; each field a float or an array over candidates."""

    forward: object
    backward: object
    recompute: object  # forward work repeated in backward by activation checkpointing
    by_component: dict  # component -> forward + backward FLOPs (no recompute)

    @property
    def model(self):
        """Forward + backward, as FlopCounterMode counts one step without checkpointing."""
        return self.forward + self.backward

    @property
    def executed(self):
        """What the hardware runs: forward + backward + recompute."""
        return self.forward + self.backward + self.recompute


def linear_forward_flops(lin: Linear, tokens, routed_fraction=1.0):
    """2 x in x out per token (PyTorch flop_counter ``mm_flop``); experts see top-k/E of tokens."""
    return 2.0 * lin.in_features * lin.out_features * tokens * lin.count * routed_fraction


def attention_core_forward_flops(layer: LayerSpec, micro_batch, seq_len):
    """Q K^T and softmax(..) V: 2 x 2 x b x heads x s^2 x head_dim (``sdpa_flop_count`` / bmm)."""
    return 4.0 * micro_batch * layer.num_heads * np.square(seq_len, dtype=np.float64) * layer.head_dim


def lora_forward_flops(lin: Linear, rank, tokens):
    """x A^T then (.) B^T: 2 x r x (in + out) per token (Hu et al. 2021's low-rank update)."""
    return 2.0 * rank * (lin.in_features + lin.out_features) * tokens


def _layer_linears_flops(layer: LayerSpec, tokens):
    """Forward FLOPs of each linear group of a layer: attention, mlp, experts, router."""
    routed = layer.experts_per_token / layer.num_experts if layer.num_experts else 1.0
    attention = sum(linear_forward_flops(lin, tokens) for lin in layer.attention)
    mlp = sum(linear_forward_flops(lin, tokens) for lin in layer.mlp)
    experts = sum(linear_forward_flops(lin, tokens, routed) for lin in layer.experts)
    router = linear_forward_flops(layer.router, tokens) if layer.router is not None else 0.0
    return attention, mlp, experts + router


def step_flops(
    spec: ModelSpec,
    micro_batch,
    seq_len,
    *,
    trainable_base: bool = True,
    lora_rank=0,
    lora_linears: tuple[tuple[int, Linear], ...] = (),
    recompute_fraction=0.0,
    recompute_skips_down_projection: bool = True,
    trained_modules: tuple[str, ...] = (),
    expert_lora: tuple[tuple[int, Linear, int], ...] = (),
    input_requires_grad: bool = False,
) -> StepFlops:
    """FLOPs of one micro-batch: forward, backward, recompute and per component.

    ``trainable_base``: full fine-tuning (input and weight gradients of every linear). With
    LoRA the base weights are frozen, so autograd computes input gradients only, and only where
    the input depends on an adapter: nothing below the first adapted layer, and in that layer
    nothing for the projections that read the (frozen) normed residual: q/k/v. Attention core
    backward is twice its forward (two products for each of the two forward products).
    ``recompute_fraction``: share of the layers' forward repeated in backward (1 for full
    per-layer checkpointing; the embedding and the head are not checkpointed).
    ``recompute_skips_down_projection``: PyTorch's non-reentrant checkpoint stops recomputing once
    the last tensor backward needs is rebuilt, which leaves out each dense layer's down projection
    in HF models and torchtune's full fine-tuning; torchtune's LoRALinear saves a tensor after it,
    so its LoRA layers rerun the whole forward (measured on its traced step: +3.8% FLOPs on a 1B).
    The early stop ends at the down projection only where nothing is saved after it: a LoRA on
    ``down_proj`` saves its A output after the base matmul, so that layer's down projection is
    recomputed (traced: llama-3.2-1b all-linear, full checkpointing, was 4.3% under); torchao float8
    saves its tensors when the fp8 matmul's node is made, so pass ``False`` for float8 (was 2.6% under).
    ``trained_modules``: peft ``modules_to_save`` beside LoRA: a trained head adds its weight
    gradient; a trained embedding makes every layer's input need a gradient (no frozen first layer),
    and so does ``input_requires_grad``: transformers 5's ``activation_checkpointing_enable`` calls
    ``enable_input_require_grads`` (``modeling_utils.py``), so HF checkpointing under LoRA computes the
    first layer's q/k/v input gradients too (traced: llama-3.2-1b all-linear, was 0.7% under).
    ``expert_lora``: (layer, stacked expert weight, rank multiple) that peft wraps with ``ParamWrapper``
    (``planner.specs.architecture.lora_expert_targets``), priced by ``expert_lora_flops``.
    """
    tokens = np.asarray(micro_batch, dtype=np.float64) * np.asarray(seq_len, dtype=np.float64)
    keys = ("attention", "attention_core", "mlp", "experts", "lora", "lm_head")
    forward = dict.fromkeys(keys, 0.0)
    backward = dict.fromkeys(keys, 0.0)
    frozen_input = "embed_tokens" not in trained_modules and not input_requires_grad
    first_adapted = min((index for index, _ in lora_linears), default=0) if frozen_input else -1
    per_layer: dict = {}  # identical layers (most models) are priced once per call
    for index, (layer, kind) in enumerate(zip(spec.layers, _layer_kinds(spec), strict=True)):
        if kind not in per_layer:
            per_layer[kind] = (*_layer_linears_flops(layer, tokens), attention_core_forward_flops(layer, micro_batch, seq_len))
        attention, mlp, experts, core = per_layer[kind]
        forward["attention"] += attention
        forward["attention_core"] += core
        forward["mlp"] += mlp
        forward["experts"] += experts
        if trainable_base:
            backward["attention"] += 2.0 * attention
            backward["attention_core"] += 2.0 * core
            backward["mlp"] += 2.0 * mlp
            backward["experts"] += 2.0 * experts
        elif index > first_adapted:
            backward["attention"] += attention
            backward["attention_core"] += 2.0 * core
            backward["mlp"] += mlp
            backward["experts"] += experts
        elif index == first_adapted:
            out_proj = layer.attention[-1]
            backward["attention"] += linear_forward_flops(out_proj, tokens)
            backward["attention_core"] += 2.0 * core
            backward["mlp"] += mlp
            backward["experts"] += experts
    forward["lora"], backward["lora"] = _lora_flops(spec, lora_linears, lora_rank, tokens, first_adapted)
    fold_forward, fold_backward, merged_weight_grad = expert_lora_flops(spec, expert_lora, lora_rank, tokens)
    forward["lora"] = forward["lora"] + fold_forward
    backward["lora"] = backward["lora"] + fold_backward
    backward["experts"] = backward["experts"] + merged_weight_grad
    head = 2.0 * spec.hidden_size * spec.vocab_size * tokens
    forward["lm_head"] = head
    backward["lm_head"] = head * (2.0 if trainable_base or "lm_head" in trained_modules else 1.0)
    total_forward = sum(forward.values())
    total_backward = sum(backward.values())
    skipped = _unrecomputed_tail(spec, tokens, lora_linears) if recompute_skips_down_projection else 0.0
    recompute = (total_forward - forward["lm_head"] - skipped) * recompute_fraction
    by_component = {key: forward[key] + backward[key] for key in keys}
    return StepFlops(total_forward, total_backward, recompute, by_component)


def every_second_matmul_flops(spec: ModelSpec, tokens):
    """Forward FLOPs torchtitan's per-op selective checkpointing reruns: ``SelectiveAC`` saves the outputs of
    its save-listed ops except every second matmul of a block (``distributed/activation_checkpoint.py``,
    ``_get_custom_policy``), counted in the block's forward order with q/k/v as torchtitan's one fused
    ``wqkv``: ``wqkv, wo, w1, w3, w2`` reruns ``wo`` and ``w3``; a plain MLP ``wqkv, wo, up, down`` reruns
    ``wo`` and ``down``; a mixture of experts' grouped GEMMs are not ``mm`` (its block reruns ``wo``).
    ``benchmarks/torchtitan_oracle.py --flops`` counts torchtitan 0.3.0's own block under FlopCounterMode:
    38.65 GFLOP per Llama-3-8B block at 256 tokens, these two matmuls exactly (34.6% of its forward)."""
    total = 0.0
    for layer in spec.layers:
        order = [layer.attention[-1], *([] if layer.num_experts else layer.mlp)]  # after the fused wqkv (1st)
        total = total + sum(linear_forward_flops(lin, tokens) for lin in order[0::2])
    return total


def _lora_flops(spec: ModelSpec, lora_linears, lora_rank, tokens, first_adapted: int) -> tuple:
    """(forward, backward) FLOPs of the adapters: weight gradients of B and A and the gradient
    through B always; through A (the input gradient) unless the input is the frozen normed
    residual of the first adapted layer."""
    forward = backward = 0.0
    for index, lin in lora_linears:
        lora = lora_forward_flops(lin, lora_rank, tokens)
        forward += lora
        reads_frozen_input = index == first_adapted and lin in spec.layers[index].attention[:-1]
        backward += 2.0 * lora - (rank_in(lin, lora_rank, tokens) if reads_frozen_input else 0.0)
    return forward, backward


def _layer_kinds(spec: ModelSpec) -> tuple[int, ...]:
    """Each layer's index among the distinct layers of ``spec`` (equal layers share one), once per spec."""
    from planner.cost.spec_facts import cached

    def kinds() -> tuple[int, ...]:
        first: dict = {}
        return tuple(first.setdefault(layer, len(first)) for layer in spec.layers)

    return cached(spec, ("layer_kinds",), kinds)


def _unrecomputed_tail(spec: ModelSpec, tokens, lora_linears=()):
    """Forward FLOPs of each dense layer's final (down) projection, skipped by early stop, except in
    the layers whose down projection carries a LoRA (its adapter's saved input comes after it)."""
    adapted = {index for index, lin in lora_linears if spec.layers[index].mlp and lin == spec.layers[index].mlp[-1]}
    return sum(linear_forward_flops(layer.mlp[-1], tokens) for index, layer in enumerate(spec.layers)
               if layer.mlp and not layer.num_experts and index not in adapted)


def expert_lora_flops(spec: ModelSpec, expert_lora, rank, tokens) -> tuple:
    """(forward, backward of the factors, weight gradient of the merged stacks) FLOPs of peft 0.21's
    LoRA on stacked experts (``lora.ParamWrapper``, ``src/peft/tuners/lora/layer.py``): each forward
    folds ``W' = baddbmm(W, B, A)`` (2 x experts x out x in x m r FLOPs) twice, once when
    ``register_parametrization`` checks the proxy's shape (result discarded) and once for use;
    backward makes the two factors' gradients from ``W'``'s (two bmm of the same size, once) and the
    expert matmul's weight gradient for ``W'`` (the experts' forward FLOPs over the routed tokens).
    Traced on qwen3-30b-a3b, 2 layers, rank 16: forward 1.2885e11 of ``baddbmm``."""
    forward = backward = weight_grad = 0.0
    for index, lin, mult in expert_lora:
        layer = spec.layers[index]
        fold = 2.0 * lin.count * lin.in_features * lin.out_features * mult * np.asarray(rank, dtype=np.float64)
        forward = forward + 2.0 * fold
        backward = backward + 2.0 * fold
        weight_grad = weight_grad + linear_forward_flops(lin, tokens, layer.experts_per_token / layer.num_experts)
    return forward, backward, weight_grad


def rank_in(lin: Linear, rank, tokens):
    """x A^T alone: 2 x in x r per token."""
    return 2.0 * lin.in_features * rank * tokens
