"""Training memory by component and by phase; the peak is the maximum over the phases.

Every function is vectorized over ``micro_batch``, ``seq_len`` and ``lora_rank`` (numpy arrays
broadcast together); the categorical choices of a ``TrainingSetup`` (method, precision,
optimizer, checkpointing, attention, sharding) are fixed per call.

Phases of one steady-state step (``zero_grad(set_to_none=True)``, so no gradients exist in
forward unless gradients are accumulated over micro-batches):
- forward: weights, optimizer states, every saved activation, the loss's logits;
- backward: at its start all activations plus the loss's fp32 gradient temporaries; at its end
  every gradient (activations released) plus the embedding gradient's transient;
- optimizer: weights, gradients, states and the step's temporaries (foreach AdamW makes one
  full-size temporary: ``torch._foreach_sqrt(exp_avg_sqs)``; the fused step makes none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import activations as act
from planner.cost.params import count_params, lora_params
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

# --- framework overheads: named defaults, reported apart from allocated bytes (calibration fits them)
# --- quantization layouts
NF4_BITS = 4.0
"""QLoRA (Dettmers et al. 2023, sec. 3): 4-bit NormalFloat data, one fp32 absmax per block of 64;
with double quantization the absmax are 8-bit with one fp32 constant per 256 of them:
8/64 + 32/(64*256) bits per parameter instead of 32/64."""
ADAM8BIT_BLOCK = 256
"""bitsandbytes 8-bit optimizers: block-wise quantization, one fp32 absmax per 256 values per state
(Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"); tensors with fewer than
4096 elements keep 32-bit states (``min_8bit_size=4096``)."""
ADAM8BIT_MIN_SIZE = 4096


def _arr(x):
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of weights / gradients / optimizer states and whether a separate fp32
    master copy exists (DeepSpeed ZeRO with bf16 mixed precision: bf16 working weights)."""

    weight: float
    grad: float
    state: float
    master: float


def _dtype_layout(setup: TrainingSetup) -> Bytes:
    """PyTorch autocast keeps fp32 weights (4+4+states in fp32); pure bf16 keeps everything in
    bf16 (torch optimizers store states in the parameter dtype); ZeRO (stage >= 1) with mixed
    precision follows DeepSpeed: bf16 weights and gradients, fp32 master and states (ZeRO's
    2 + 2 + 12 bytes per parameter for Adam, Rajbhandari et al. 2020)."""
    if setup.precision == "fp32":
        return Bytes(4, 4, 4, 0)
    if setup.precision == "bf16":
        return Bytes(2, 2, 2, 0)
    if setup.zero > 0:
        return Bytes(2, 2, 4, 4)
    return Bytes(4, 4, 4, 0)


def optimizer_state_elems(setup: TrainingSetup, trainable: float, tensors: list[tuple[int, int]]) -> float:
    """State elements per trainable parameter set (``tensors``: (rows, cols) of each trainable
    tensor, cols=0 for vectors): AdamW 2 (exp_avg, exp_avg_sq), SGD with momentum 1, Lion 1
    (Chen et al. 2023), Adafactor row + column second moments for matrices and a full vector
    for 1-D tensors (Shazeer & Stern 2018, no first moment as torch's default beta1=None)."""
    if setup.optimizer == "adamw":
        return 2.0 * trainable
    if setup.optimizer in ("sgd", "lion"):
        return 1.0 * trainable
    if setup.optimizer == "adafactor":
        return float(sum((r + c) if c else r for r, c in tensors))
    raise ValueError(setup.optimizer)


def adam8bit_state_bytes(tensors: list[tuple[int, int]], state_bytes_32: float) -> float:
    """Two 8-bit states plus an fp32 absmax per 256 values; small tensors stay 32-bit."""
    total = 0.0
    for rows, cols in tensors:
        n = rows * (cols or 1)
        if n < ADAM8BIT_MIN_SIZE:
            total += 2 * state_bytes_32 * n
        else:
            total += 2 * (n + 4 * np.ceil(n / ADAM8BIT_BLOCK))
    return total


def nf4_bytes(num_params, block_size: int, double_quant: bool):
    """QLoRA weight storage: 4-bit data plus block constants (see NF4_BITS)."""
    if double_quant:
        constant_bits = 8.0 / block_size + 32.0 / (block_size * 256)
    else:
        constant_bits = 32.0 / block_size
    return _arr(num_params) * (NF4_BITS + constant_bits) / 8.0


def trainable_tensors(spec: ModelSpec, setup: TrainingSetup, rank: int) -> list[tuple[int, int]]:
    """Shapes of the trainable tensors (for Adafactor, 8-bit states and for-loop temporaries)."""
    if setup.method != "full":
        from planner.cost.params import lora_targets

        shapes = []
        for _, lin in lora_targets(spec, setup.lora_targets):
            shapes += [(rank, lin.in_features), (lin.out_features, rank)]
        return shapes
    shapes = [(spec.vocab_size, spec.hidden_size)]
    if not spec.tied_embeddings:
        shapes.append((spec.vocab_size, spec.hidden_size))
    for layer in spec.layers:
        for lin in layer.linears:
            shapes += [(lin.out_features, lin.in_features)] * lin.count
            if lin.bias:
                shapes.append((lin.out_features * lin.count, 0))
        shapes += [(dim, 0) for dim, bias in layer.norms for _ in range(2 if bias else 1)]
    return shapes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU. ``components`` are sizes; ``phases`` are the live totals at each phase's
    peak; ``peak_bytes`` = max over phases. All values broadcast over the candidate arrays."""

    components: dict
    phases: dict
    peak_bytes: object
    peak_phase: object


def training_memory(
    spec: ModelSpec, setup: TrainingSetup, micro_batch=None, seq_len=None, lora_rank=None, device: str = "cuda"
):
    """Memory of one training step on one GPU for ``setup`` (arrays override its numbers).

    ``device``: "cuda" (what users run) or "cpu" (the fake-tensor oracle runs CPU kernels,
    whose embedding backward accumulates in a V x h fp32 buffer; see ``embedding_backward_bytes``).
    """
    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    rank = _arr(setup.lora_rank if lora_rank is None else lora_rank)
    tokens = b * s
    counts = count_params(spec)
    layout = _dtype_layout(setup)
    dp = setup.data_parallel
    tp = setup.tensor_parallel
    shard_states = dp if setup.zero >= 1 else 1
    shard_grads = dp if setup.zero >= 2 else 1
    shard_weights = dp if setup.zero >= 3 else 1

    # ---- weights, gradients, optimizer
    adapters = lora_params(spec, setup.lora_targets, rank) if setup.method != "full" else _arr(0.0)
    if setup.method == "full":
        weights = counts.total * layout.weight / tp / shard_weights
        trainable = _arr(counts.total)
        grad_bytes, state_bytes = layout.grad, layout.state
        master = counts.total * layout.master
    else:
        base_dtype_bytes = 4 if setup.precision in ("fp32",) else (4 if setup.precision == "bf16-mixed" else 2)
        if setup.method == "qlora":
            quantized = sum(lin.weight_params for layer in spec.layers for lin in layer.linears)
            base = nf4_bytes(quantized, setup.qlora_block_size, setup.qlora_double_quant) + (
                counts.total - quantized
            ) * 2
        else:
            base = counts.total * base_dtype_bytes
        # peft keeps adapters in fp32 (autocast_adapter_dtype=True); counted apart below
        weights = base / tp / shard_weights
        trainable = adapters
        grad_bytes, state_bytes = 4.0, 4.0
        master = 0.0
    gradients = trainable * grad_bytes / shard_grads
    shapes = trainable_tensors(spec, setup, int(np.max(rank)) if setup.method != "full" else 0)
    if setup.optimizer == "adamw-8bit":
        states = _arr(adam8bit_state_bytes(shapes, state_bytes)) * (trainable / max(float(np.max(trainable)), 1.0))
    else:
        elems_full = optimizer_state_elems(setup, float(np.max(trainable)), shapes)
        states = elems_full * state_bytes * trainable / max(float(np.max(trainable)), 1.0)
    states = states / shard_states / (tp if setup.method == "full" else 1)
    master = _arr(master) / shard_states / tp
    opt_temp = _optimizer_temp_bytes(setup, trainable, shapes, state_bytes) / shard_states
    if setup.offload_optimizer:
        states, master, opt_temp = states * 0, master * 0, opt_temp * 0
    gradients = gradients / (tp if setup.method == "full" else 1)

    # ---- activations
    layer_act, ckpt_saved, ckpt_transient = _layer_activations(spec, setup, b, s, tp, device, rank)
    trainable_base = setup.method == "full"
    head_act = tokens * act.head_activation_bytes_per_token(spec, setup.precision, setup.dropout, trainable_base)
    casts = act.autocast_weight_bytes(spec) / tp if setup.precision == "bf16-mixed" else 0.0
    head_cast = 2.0 * spec.vocab_size * spec.hidden_size / tp if setup.precision == "bf16-mixed" else 0.0
    if setup.method == "qlora":
        casts = head_cast = _qlora_dequant_bytes(spec, tp)
    if setup.checkpointing != "none":
        # casts made inside a checkpointed layer are recomputed with it: only the head's stays
        layer_casts = (casts - head_cast) / spec.num_layers
        casts, ckpt_transient = head_cast, ckpt_transient + layer_casts
    saved = ckpt_saved + head_act + casts
    loss_temp = tokens * act.loss_backward_temp_bytes_per_token(spec)
    # forward's loss: the head's logits (compute dtype) and their fp32 copy, beside the saved
    # log-softmax output (already in ``saved``); in fp32 ``logits.float()`` is the same tensor
    p = act.PRECISION[setup.precision].matmul
    logits_fwd = tokens * spec.vocab_size * (p + (4 if p != 4 else 0))

    grads_in_forward = gradients if setup.grad_accum > 1 else 0.0
    base_weights = weights
    weights = base_weights + adapters * 4
    static = weights + states + master + grads_in_forward
    forward = static + saved + logits_fwd
    backward_start = static + saved + loss_temp
    if setup.checkpointing != "none":
        # recomputing the last layer: its full activations beside what checkpointing kept, the
        # loss's log-softmax released, the head's gradient and the hidden-state gradient live
        head_grad = spec.vocab_size * spec.hidden_size * grad_bytes / tp if setup.method == "full" else 0.0
        hidden_grad = tokens * spec.hidden_size * act.PRECISION[setup.precision].residual
        recompute = static + saved - tokens * 4 * spec.vocab_size + ckpt_transient + head_grad + 2 * hidden_grad
        backward_start = np.maximum(backward_start, recompute)
    if setup.method == "full":
        embedding = spec.vocab_size * spec.hidden_size * grad_bytes / shard_grads / tp
        # the embedding's own gradient is still a temporary when backward ends
        backward_end = weights + states + master + gradients - embedding + embedding_backward_bytes(
            spec, grad_bytes, device
        ) / shard_grads / tp
    else:
        backward_end = weights + states + master + gradients
    backward = np.maximum(backward_start, backward_end)
    optimizer = weights + gradients + states + master + opt_temp
    phases = {"forward": forward, "backward": backward, "optimizer": optimizer + 0 * tokens}
    stacked = np.stack(np.broadcast_arrays(*phases.values()))
    peak = stacked.max(axis=0)
    names = np.array(list(phases))
    components = {
        "weights": base_weights + 0 * tokens,
        "lora_adapters": adapters * 4 + 0 * tokens,
        "gradients": gradients + 0 * tokens,
        "master_weights": master + 0 * tokens,
        "optimizer_states": states + 0 * tokens,
        "optimizer_temporaries": opt_temp + 0 * tokens,
        "activations": layer_act + head_act,
        "saved_activations_with_checkpointing": ckpt_saved + head_act,
        "autocast_weight_copies": casts + 0 * tokens,
        "loss_temporaries": loss_temp,
    }
    return MemoryEstimate(components, phases, peak, names[stacked.argmax(axis=0)])


def embedding_backward_bytes(spec: ModelSpec, grad_bytes: float, device: str) -> float:
    """Live gradient bytes of the embedding table when backward computes it (its last step).

    Tied embeddings: the autograd engine holds the head's contribution, computes the
    embedding's, and adds them into a new tensor: three V x h gradients at once (measured with
    MemTracker; autograd logic, so on CUDA too). Untied: the embedding's gradient alone, which
    CPU's ``embedding_dense_backward`` accumulates in an fp32 buffer (4 bytes per element).
    """
    table = spec.vocab_size * spec.hidden_size
    if spec.tied_embeddings:
        return 3.0 * table * grad_bytes
    return table * (grad_bytes if device == "cuda" else max(4.0, grad_bytes))


def _optimizer_temp_bytes(setup: TrainingSetup, trainable, shapes, state_bytes: float):
    """Transient memory of the optimizer step.

    foreach AdamW: one temporary the size of all states of one kind (``_foreach_sqrt``); fused:
    none; for-loop: two of the largest tensor (``exp_avg_sq.sqrt()`` and its division by the
    bias correction coexist). SGD (momentum, in place) and the 8-bit AdamW (a fused kernel)
    make none. Lion (lion-pytorch: ``exp_avg.clone()`` then ``.add(grad)``) two of the largest
    tensor; Adafactor (torch: ``row_var @ col_var``) one of the largest tensor.
    """
    largest = max((r * (c or 1) for r, c in shapes), default=0) * state_bytes
    if setup.optimizer in ("sgd", "adamw-8bit"):
        return _arr(0.0)
    if setup.optimizer == "adamw":
        if setup.optimizer_impl == "foreach":
            return trainable * state_bytes
        if setup.optimizer_impl == "fused":
            return _arr(0.0)
        return _arr(2 * largest)
    if setup.optimizer == "lion":
        return _arr(2 * largest)
    return _arr(largest)


def _layer_activations(
    spec: ModelSpec, setup: TrainingSetup, b, s, tp: int, device: str = "cuda", rank=None
):
    """(all layers' activations without checkpointing, what checkpointing keeps, the transient
    of recomputing one layer in backward)."""
    tokens = b * s
    total = 0.0
    largest = 0.0
    kept = 0.0
    residual = act.PRECISION[setup.precision].residual
    trainable = setup.method == "full"
    mask_bytes = act.DROPOUT_MASK_BYTES if device == "cuda" else act.PRECISION[setup.precision].matmul
    rank = _arr(setup.lora_rank if rank is None else rank)
    lora_per_token = _lora_per_token_by_layer(spec, setup, rank) if not trainable else {}
    for index, layer in enumerate(spec.layers):
        per_token, per_key = act.layer_activation_bytes(
            spec, layer, setup.precision, setup.attention, setup.dropout, trainable, mask_bytes
        )
        norms = act.norms_bytes(layer, act.PRECISION[setup.precision], trainable)
        if not trainable and index == 0 and layer.pre_norms:
            # the first norm reads the frozen embedding: nothing needs its gradient
            first = act.norm_saved_bytes(layer, residual, False)
            per_token, norms = per_token - first, norms - first
        inner = per_token - norms
        bytes_layer = tokens * (norms + inner / tp) + tokens * s * per_key / tp
        if index in lora_per_token:
            bytes_layer = bytes_layer + tokens * lora_per_token[index]
        total = total + bytes_layer
        largest = np.maximum(largest, bytes_layer)
        if setup.checkpointing == "selective":
            kept = kept + tokens * _selective_kept_per_token(layer, setup)
    if setup.checkpointing == "none":
        return total, total, 0.0
    if setup.checkpointing == "full":
        kept = tokens * residual * spec.hidden_size * spec.num_layers
    return total, kept, largest


def _selective_kept_per_token(layer, setup: TrainingSetup) -> float:
    """Op-level selective checkpointing (torchtitan's policy: keep matmul and attention outputs,
    recompute everything else): the layer input, q/k/v, attention output and log-sum-exp, the
    output projection, the MLP's up-projections and its output."""
    p = act.PRECISION[setup.precision].matmul
    r = act.PRECISION[setup.precision].residual
    h = layer.hidden_size
    inter = layer.intermediate_size if not layer.num_experts else layer.experts_per_token * layer.expert_intermediate_size
    up = (2 if layer.gated_mlp else 1) * inter
    return r * h + p * (2 * layer.q_dim + 2 * layer.kv_dim + h + up + h) + act.LSE_BYTES * layer.num_heads


def _lora_per_token_by_layer(spec: ModelSpec, setup: TrainingSetup, rank) -> dict:
    """LoRA adds per adapted linear and token: peft casts the input to fp32 for the fp32
    adapter (kept by A's matmul), the rank-r intermediate (fp32, kept by B's matmul), and a
    dropout mask when lora_dropout > 0."""
    from planner.cost.params import lora_targets

    per_layer: dict = {}
    for index, lin in lora_targets(spec, setup.lora_targets):
        per_token = act.lora_bytes_per_token(lin.in_features, rank, setup.lora_dropout)
        per_layer[index] = per_layer.get(index, 0) + per_token
    return per_layer


def _qlora_dequant_bytes(spec: ModelSpec, tp: int) -> float:
    """bitsandbytes dequantizes one NF4 weight at a time to the compute dtype and frees it:
    the transient is the largest projection in bf16."""
    largest = max(lin.weight_params for layer in spec.layers for lin in layer.linears)
    return 2.0 * largest / tp


# ----------------------------------------------------------------------------- inference


def weight_bytes_inference(spec: ModelSpec, weight_dtype: str) -> float:
    """Serving weights: bf16/fp16/fp32 as stored; int8 (LLM.int8, one fp32 scale per output
    row) and nf4 (QLoRA layout with double quantization) for the projections, the rest in bf16."""
    counts = count_params(spec)
    projections = sum(lin.weight_params for layer in spec.layers for lin in layer.linears)
    rest = counts.total - projections
    if weight_dtype in ("bf16", "fp16"):
        return 2.0 * counts.total
    if weight_dtype == "fp32":
        return 4.0 * counts.total
    rows = sum(lin.out_features * lin.count for layer in spec.layers for lin in layer.linears)
    if weight_dtype == "int8":
        return projections + 4.0 * rows + 2.0 * rest
    return float(nf4_bytes(projections, 64, True)) + 2.0 * rest


def kv_cache_bytes(spec: ModelSpec, batch, context_len, kv_dtype_bytes: float):
    """K and V of every layer for every cached token: 2 x layers x kv_heads x head_dim, so
    grouped-query and multi-query attention shrink it by heads / kv_heads."""
    per_token = sum(2 * layer.kv_dim for layer in spec.layers) * kv_dtype_bytes
    return _arr(batch) * _arr(context_len) * per_token


def prefill_activation_bytes(spec: ModelSpec, batch, chunk_tokens, dtype_bytes: float = 2.0):
    """Transient of one layer's forward over a prefill chunk (nothing is saved in inference):
    the residual, the norm output, q/k/v and attention output, the MLP's widest intermediates;
    plus the fp32 logits of the last position of each sequence (``logits_to_keep=1``)."""
    tokens = _arr(batch) * _arr(chunk_tokens)
    widest = 0.0
    for layer in spec.layers:
        inter = layer.intermediate_size or layer.expert_intermediate_size * layer.experts_per_token
        mlp = (3 if layer.gated_mlp else 2) * inter
        attn = 2 * layer.q_dim + 2 * layer.kv_dim
        widest = max(widest, 2 * layer.hidden_size + max(mlp, attn))
    return tokens * widest * dtype_bytes + _arr(batch) * spec.vocab_size * 4.0


def inference_memory(spec: ModelSpec, setup, batch=None, context_len=None) -> MemoryEstimate:
    """Serving memory per GPU: weights, KV cache for ``batch x context_len``, prefill transient
    (arrays for ``batch`` / ``context_len`` override the set-up's numbers)."""
    from planner.units import DTYPE_BYTES

    batch = _arr(setup.batch if batch is None else batch)
    context = _arr(setup.context_len if context_len is None else context_len)
    tp = setup.tensor_parallel
    weights = weight_bytes_inference(spec, setup.weight_dtype) / tp
    kv = kv_cache_bytes(spec, batch, context, DTYPE_BYTES[setup.kv_dtype]) / tp
    chunk = np.minimum(setup.prefill_chunk or context, context)
    prefill = prefill_activation_bytes(spec, batch, chunk) / tp
    components = {"weights": _arr(weights) + 0 * kv, "kv_cache": kv, "prefill_activations": prefill}
    phases = {"prefill": weights + kv + prefill, "decode": weights + kv + prefill_activation_bytes(spec, batch, 1) / tp}
    peak = np.maximum(phases["prefill"], phases["decode"])
    return MemoryEstimate(components, phases, peak, np.where(phases["prefill"] >= phases["decode"], "prefill", "decode"))
