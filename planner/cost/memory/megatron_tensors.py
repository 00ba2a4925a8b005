"""The Megatron stack (Megatron-LM / Megatron-Core with Transformer Engine): what its training step holds.

Megatron's kernels (Transformer Engine's fused norm + GEMM, flash / cuDNN attention, the fused
SwiGLU, the vocab-parallel cross-entropy) need CUDA and cannot run here, so nothing is traced: every
count below prices the documented algorithm, the way Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", sec. 4, Table 2) count GPT's 34 sbh + 5 a s^2 b bytes per
layer, generalised to the model's actual shapes (gated MLP width, key/value heads, dropouts, norms).
Pure Python on scalars or numpy arrays; may import ``planner.specs`` only.

Notation: ``w`` bytes per activation element (bf16 2, fp32 4), ``h`` hidden, ``q`` = heads x head_dim,
``kv`` = kv heads x head_dim, ``a`` heads, ``I`` MLP width, ``V`` padded vocabulary, ``t`` tensor-parallel
GPUs. "Per token" means per token of the local sequence (``b s / cp`` tokens on one GPU).
"""

from __future__ import annotations

from planner.specs.architecture import LayerSpec, ModelSpec

NORM_STAT_BYTES = {"rms": 4, "layer": 8}  # TE's fp32 rsigma (RMSNorm), mu and rsigma (LayerNorm) per token
LSE_BYTES = 4  # the flash / cuDNN attention kernel's fp32 softmax statistics per head and token
MASK_BYTES = 1  # Megatron's dropout masks are bool tensors (the paper's 1 byte per element)
INDEX_BYTES = 8  # int64 token (and position) ids the embedding saves
VOCAB_DIVISIBLE_BY = 128  # Megatron-LM --make-vocab-size-divisible-by default

STATE_BYTES_PER_PARAM = {
    # (model parameter, main gradient, fp32 master copy, Adam m + v): Megatron-LM
    # docs/user-guide/features/dist_optimizer.md (commit d98e8a6; docs/distrib_optimizer.md in 2022):
    # "bf16 parameters, fp32 gradients: 18, distributed 6 + 12/d"; "fp32 parameters, fp32 gradients:
    # 16, distributed 8 + 8/d" (fp32 params are their own main params: no copy)
    "bf16-mixed": (2, 4, 4, 8),
    "fp32": (4, 4, 0, 8),
}


def unpriced_reason(spec: ModelSpec) -> str | None:
    """Why the Megatron formulas cannot price ``spec`` (None when they can): the dense pre-norm GPT
    layer of Megatron-Core's ``GPTModel`` (LayerNorm or RMSNorm, gated or plain MLP)."""
    for layer in spec.layers:
        if layer.num_experts:
            return "the megatron memory model prices dense layers, not mixtures of experts: use --stack hf"
        if layer.parallel_residual or layer.qk_norm != "none" or layer.post_norms or layer.attn_logit_softcap:
            return ("the megatron memory model prices Megatron-Core's pre-norm GPT layer (no parallel residual, "
                    "q/k norm, post-norms or soft-capping): use --stack hf")
        if layer.norm_kind not in NORM_STAT_BYTES:
            return f"the megatron memory model prices LayerNorm and RMSNorm, not {layer.norm_kind!r}: use --stack hf"
    if spec.final_logit_softcap:
        return "the megatron memory model does not price logit soft-capping: use --stack hf"
    return None


def activation_bytes(precision: str) -> int:
    """Bytes of an activation element: ``--bf16`` (precision bf16-mixed) runs the model in bf16
    (``Float16Module``), precision fp32 in fp32."""
    if precision not in STATE_BYTES_PER_PARAM:
        raise ValueError(f"Megatron trains in bf16 mixed precision (bf16-mixed) or fp32, not {precision!r}")
    return 2 if precision == "bf16-mixed" else 4


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """The vocabulary Megatron builds its embedding and output layer with: the tokenizer's size
    rounded up to a multiple of ``divisible_by x t`` (Megatron-LM ``--make-vocab-size-divisible-by``,
    default 128, times the tensor-parallel size: ``megatron/training/vocab_utils.py``, commit d98e8a6)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def state_bytes_per_param(precision: str, distributed_optimizer: bool, shard: int) -> tuple[float, float, float, float]:
    """(parameter, main gradient, master, Adam moments) bytes per parameter of one GPU's model shard.

    Megatron's ``DistributedDataParallel`` keeps every gradient in one persistent fp32 buffer
    (``accumulate_allreduce_grads_in_fp32`` is forced on with ``--bf16``), never freed between steps;
    the distributed optimizer (``--use-distributed-optimizer``) shards the fp32 master copy and the Adam
    moments over the ``shard`` data-parallel (x context-parallel) GPUs, the gradient buffer stays whole
    (it is reduce-scattered in place), as in the docs' 6 + 12/d."""
    param, grad, master, moments = STATE_BYTES_PER_PARAM[precision]
    divide = shard if distributed_optimizer else 1
    return float(param), float(grad), master / divide, moments / divide


# ----------------------------------------------------------------------------- one transformer layer


def _dropout_masks(layer_dropout: float) -> int:
    """Mask bytes per element of one dropout (none when the probability is 0: Megatron skips it)."""
    return MASK_BYTES if layer_dropout > 0 else 0


def mlp_width_elements(layer: LayerSpec) -> tuple[int, int]:
    """(fc1 output, activation output) elements per token: a gated MLP's fc1 holds the gate and the
    up projection (2I, ``bias_swiglu_impl`` saves it whole), the activation output I is fc2's input."""
    width = layer.intermediate_size
    return (2 * width if layer.gated_mlp else width), width


def layer_sequence_bytes_per_token(layer: LayerSpec, w: int, hidden_dropout: float) -> float:
    """Bytes per token of what one layer keeps in the sequence-shaped (``[s, b, h]``) region that
    tensor parallelism replicates and sequence parallelism splits over ``t`` (the paper's 10sbh):
    the two norms' inputs (the residual stream) and statistics, the norms' outputs (QKV's and fc1's
    inputs: TE's ``LayerNormLinear`` keeps its local shard and re-gathers it in backward under SP) and
    the masks of the two residual dropouts."""
    h = layer.hidden_size
    stats = NORM_STAT_BYTES[layer.norm_kind]
    return 2 * (w * h + stats) + 2 * w * h + 2 * h * _dropout_masks(hidden_dropout)


def layer_split_bytes_per_token(layer: LayerSpec, w: int, checkpointing: str, attention: str,
                                attention_dropout: float, seq_len) -> float:
    """Bytes per token of what one layer keeps in the head- and MLP-split region (the paper's 24sbh/t
    + 5as^2b/t), before dividing by ``t``: q, k and v as the attention kernel keeps them (GQA: k and v
    at the key/value width), the attention output (the output projection's input), fc1's output and
    the activation's output (``mlp_width_elements``), and the core attention's own set:
    - ``attention="sdpa"`` (flash / cuDNN fused attention, Megatron-Core + Transformer Engine's
      default): the fp32 softmax statistics per head; no score-sized tensor (the paper's 5as/h
      term is absent in every mode);
    - ``attention="eager"`` (Megatron's unfused ``DotProductAttention``): the softmax output, with
      attention dropout its mask and output: ``a s (w + (1 + w))`` per token (5as for bf16, the paper's).
    ``checkpointing="selective"`` (``--recompute-granularity selective``, default module ``core_attn``)
    keeps q, k, v as the checkpoint's inputs and recomputes the core's own set (drops it)."""
    fc1, act = mlp_width_elements(layer)
    kept = w * (layer.q_dim + 2 * layer.kv_dim) + w * layer.q_dim + w * (fc1 + act)
    if checkpointing == "selective":
        return kept
    return kept + core_attention_bytes_per_token(layer, w, attention, attention_dropout, seq_len)


def core_attention_bytes_per_token(layer: LayerSpec, w: int, attention: str, attention_dropout: float, seq_len):
    """What the core attention keeps beyond q, k, v and its output (see ``layer_split_bytes_per_token``)."""
    if attention == "sdpa":
        return LSE_BYTES * layer.num_heads
    dropout = (MASK_BYTES + w) if attention_dropout > 0 else 0
    return layer.num_heads * seq_len * (w + dropout)


def layer_saved_bytes_per_token(layer: LayerSpec, w: int, tp: int, sp: bool, checkpointing: str,
                                attention: str = "sdpa", hidden_dropout: float = 0.0,
                                attention_dropout: float = 0.0, seq_len=0):
    """Bytes per local token one layer keeps for backward on one GPU (Korthikanti et al. 2022
    Table 2 generalised): none / selective ``sequence/(t if SP else 1) + split/t``; full recompute
    (``--recompute-granularity full``, one layer per checkpoint) keeps the layer input, ``w h``,
    split over ``t`` under SP (the paper's 2sbh/t, sec. 5)."""
    seq_share = tp if sp else 1
    if checkpointing == "full":
        return w * layer.hidden_size / seq_share
    return (layer_sequence_bytes_per_token(layer, w, hidden_dropout) / seq_share
            + layer_split_bytes_per_token(layer, w, checkpointing, attention, attention_dropout, seq_len) / tp)


def layer_backward_transient_bytes_per_token(layer: LayerSpec, w: int, tp: int, sp: bool) -> float:
    """Gradients live while one layer's backward runs, beyond what it saved: fc1's output gradient
    (its widest), the residual-stream gradient it receives and the one it returns, and under SP the
    re-gathered input of the GEMM being differentiated (full sequence on every GPU). An estimate of
    the algorithm's largest moment, not traced."""
    fc1, _ = mlp_width_elements(layer)
    seq_share = tp if sp else 1
    regathered = w * layer.hidden_size if sp else 0.0
    return w * fc1 / tp + 2 * w * layer.hidden_size / seq_share + regathered


# ----------------------------------------------------------------------------- embedding, head and loss


def embedding_saved_bytes_per_token(spec: ModelSpec, tp: int, sp: bool, hidden_dropout: float) -> float:
    """Korthikanti et al. 2022 sec. 4.3, input side: the int64 token ids the embedding lookup keeps
    (``VocabParallelEmbedding`` keeps its masked copy on every tensor-parallel GPU, whole sequence),
    the position ids with learned positions, and the embedding dropout's mask (after the scatter to
    the sequence-parallel region under SP)."""
    ids = INDEX_BYTES * (2 if spec.position_embeddings else 1)
    return ids + spec.hidden_size * _dropout_masks(hidden_dropout) / (tp if sp else 1)


def head_saved_bytes_per_token(spec: ModelSpec, w: int, tp: int, sp: bool, vocab: int) -> float:
    """Sec. 4.3, output side: the final norm's input and statistics, the output layer's input (its
    local shard under SP) and the fp32 logits the vocab-parallel cross-entropy keeps for backward
    (``_VocabParallelCrossEntropy`` casts the logits to fp32 and turns them into the softmax in place:
    ``4 V / t``)."""
    norm_dim = spec.final_norm[0] or spec.hidden_size
    kind = spec.layers[-1].norm_kind
    seq_share = tp if sp else 1
    return (w * norm_dim + NORM_STAT_BYTES[kind] + w * spec.hidden_size) / seq_share + 4 * vocab / tp


def loss_transient_bytes_per_token(w: int, tp: int, vocab: int) -> dict:
    """Beyond the saved fp32 logits: in forward the output layer's own logits (bf16) while the fp32
    copy exists; in backward the logits' gradient cast back to the model dtype (``.float()``'s
    backward) beside the fp32 one (the loss's backward turns the saved softmax into the gradient in
    place). fp32 training makes neither: ``.float()`` returns its input."""
    copy = w * vocab / tp if w != 4 else 0.0
    return {"forward": copy, "backward": copy}
