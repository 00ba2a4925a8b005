"""Activation memory: the tensors autograd saves for backward, per decoder layer and per token.

Source: the saved-tensor inventory of each transformers (5.x) modeling file, read op by op
(which tensors each op keeps for its backward, which are views of one storage) and checked
against PyTorch's own accounting (``MemTracker`` on fake tensors, ``tests/test_oracle.py``).
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
count the same per-layer tensors for Megatron's GPT; HF models differ in the details that
dominate in practice: RMSNorm's fp32 upcast, separate q/k/v projections, gated MLPs, and
under autocast one bf16 copy of a norm's output per projection that reads it.

A layer's activation bytes are ``tokens * per_token + micro_batch * seq_len^2 * per_token_key``
(the second term only for eager attention, which stores the score matrix).

Conventions (GPU, what the formulas predict): dropout masks are 1 byte (CUDA's bool mask);
LayerNorm statistics are fp32. Flash / memory-efficient attention keep q, k, v, the output
and one fp32 log-sum-exp per head and token; they store no dropout mask (the RNG state is
replayed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.specs.model import LayerSpec, ModelSpec

LSE_BYTES = 4  # flash attention's log-sum-exp is fp32 per (head, token)
STAT_BYTES = 4  # RMSNorm rsqrt / LayerNorm mean and rstd, fp32
INDEX_BYTES = 8  # int64 token ids, labels and MoE routing indices
DROPOUT_MASK_BYTES = 1  # CUDA native_dropout stores a bool mask

# Activations whose backward needs only their input (one saved tensor of the MLP width);
# the Python "new GELU" (GPT-2, Phi) saves four intermediates (x^3, tanh, ...) as well.
_PYTHON_GELU = {"gelu_new", "gelu_fast", "gelu_pytorch_tanh_python"}


@dataclass(frozen=True)
class Precision:
    """Byte widths of one precision mode.

    ``matmul``: output of a projection; ``residual``: the residual stream; ``autocast``: the
    projections cast their inputs (one copy per projection) and weights (cached per step).
    """

    matmul: int
    residual: int
    autocast: bool


PRECISION = {
    "fp32": Precision(matmul=4, residual=4, autocast=False),
    "bf16": Precision(matmul=2, residual=2, autocast=False),
    "bf16-mixed": Precision(matmul=2, residual=4, autocast=True),
}


def norm_saved_bytes(layer: LayerSpec, input_bytes: int, trainable: bool = True) -> int:
    """Bytes per token a norm saves for its own backward (its output is counted by its readers).

    - HF RMSNorm (Llama family): ``x.to(fp32)`` (kept by ``pow``), rsqrt, and ``x_norm.to(dtype)``
      kept by the weight multiply: 4h + 4 + input_bytes*h.
    - RMSNorm applying its weight in fp32 (Gemma's ``x_norm * (1 + w)``, OLMo-2): 4h + 4 + 4h.
    - LayerNorm: the input plus mean and rstd: input_bytes*h + 2*4.
    With a frozen norm weight (LoRA, QLoRA) the multiply by the weight keeps nothing for it:
    only the fp32 input and rsqrt remain (4h + 4).
    """
    hidden = layer.hidden_size
    if layer.norm_kind == "rms":
        return 4 * hidden + STAT_BYTES + (input_bytes * hidden if trainable else 0)
    if layer.norm_kind == "rms_fp32":
        return 4 * hidden + STAT_BYTES + (4 * hidden if trainable else 0)
    return input_bytes * hidden + 2 * STAT_BYTES


def _readers(layer: LayerSpec) -> tuple[int, int]:
    """How many projections read the attention input and the MLP input."""
    attn = len(layer.attention) - 1
    mlp = 0 if not layer.mlp else (1 if not layer.gated_mlp or len(layer.mlp) == 2 else 2)
    if layer.num_experts:
        mlp = 1 + (2 if layer.intermediate_size else 0) + (1 if layer.shared_expert_gate else 0)
    return attn, mlp


def _norm_output_bytes(layer: LayerSpec, prec: Precision, readers: int, trainable: bool = True) -> int:
    """A norm output kept by the projections that read it: one tensor shared by all readers,
    or under autocast one bf16 cast per reader (casts of activations are not cached). A frozen
    projection keeps no input (its input gradient needs only the weight): LoRA's adapters keep
    their own fp32 copy instead (``lora_bytes``)."""
    if not trainable:
        return 0
    if prec.autocast:
        return readers * 2 * layer.hidden_size
    return prec.residual * layer.hidden_size


def norms_bytes(layer: LayerSpec, prec: Precision, trainable: bool = True) -> int:
    """Pre-norms (saved inputs and outputs) and post-norms (saved inputs) of one layer.
    ``trainable``: full fine-tuning (norm and projection weights need gradients)."""
    attn_readers, mlp_readers = _readers(layer)
    t = trainable
    outputs = _norm_output_bytes(layer, prec, attn_readers, t) + _norm_output_bytes(layer, prec, mlp_readers, t)
    if layer.pre_norms == 2:
        own = 2 * norm_saved_bytes(layer, prec.residual, t)
        if layer.parallel_residual and layer.norm_kind == "layer":
            own = norm_saved_bytes(layer, prec.residual, t) + 2 * STAT_BYTES  # both read the same x
    elif layer.pre_norms == 1:  # one norm feeds attention and MLP (parallel residual)
        outputs = _norm_output_bytes(layer, prec, attn_readers + mlp_readers, t)
        own = norm_saved_bytes(layer, prec.residual, t)
    else:  # OLMo-2: projections read the residual stream itself
        own = 0
    # post-norms read a projection output (matmul dtype); their output joins the residual
    post = layer.post_norms * norm_saved_bytes(layer, prec.matmul, t)
    return own + outputs + post


def attention_bytes(
    layer: LayerSpec, prec: Precision, attention: str, fused_qkv: bool | str, trainable: bool = True
) -> tuple[int, int]:
    """(per token, per token per key) bytes of the attention block, projections' inputs excluded.

    SDPA (flash / memory-efficient): q, k, v, output, fp32 log-sum-exp per head. Separate q/k/v
    projections (Llama family) feed the output straight to o_proj; fused qkv models (GPT-2,
    NeoX, Phi) make a contiguous copy for the output projection, and GPT-2's k and v are views
    that keep the whole fused qkv output alive.
    Eager: q, k and v expanded to all heads (``repeat_kv``), the fp32 softmax, its cast to the
    compute dtype (none in fp32), and the contiguous output for o_proj.
    """
    p = prec.matmul
    q, kv, heads = layer.q_dim, layer.kv_dim, layer.num_heads
    qk_norm = 0
    if layer.qk_norm != "none":
        kept_norm = 4 if layer.norm_kind == "rms_fp32" else p
        qk_norm = (4 + kept_norm) * (q + kv) + STAT_BYTES * (
            (heads + layer.num_kv_heads) if layer.qk_norm == "head" else 2
        )
    if attention == "eager":
        per_key = heads * (4 + (p if p != 4 else 0))
        if layer.attn_logit_softcap:
            per_key += heads * p  # tanh soft-capping keeps one more score-sized tensor
        return (4 if trainable else 3) * p * q + qk_norm, per_key
    out_copy = p * q if trainable else 0  # the output projection's own input, if it keeps one
    if fused_qkv == "gpt2":
        return p * (q + 3 * q + q) + out_copy + LSE_BYTES * heads, 0
    core = p * (2 * q + 2 * kv) + LSE_BYTES * heads
    if fused_qkv:
        core += out_copy  # contiguous copy of the output for the output projection
    return core + qk_norm, 0


def mlp_bytes(layer: LayerSpec, prec: Precision, trainable: bool = True) -> int:
    """MLP (or MoE block) bytes per token, inputs of the first projections excluded.

    Gated: gate output (kept by the activation), activation output, up output, their product
    (kept by down_proj): 4 x I. Plain: activation input and output: 2 x I; the Python GELU
    keeps three more intermediates: 5 x I.
    MoE (transformers' experts with top-k routing): router probabilities (fp32, E), routing
    indices and weights, and per routed copy of a token: the gathered input, the gate/up
    output, activation output and product, and the expert output: k x (2h + 4 I_e) x p.
    """
    p = prec.matmul
    inter = layer.intermediate_size
    down_input = p * inter if trainable else 0  # kept only by a trainable down projection
    if not layer.num_experts:
        if layer.gated_mlp:
            return 3 * p * inter + down_input
        return (4 if layer.hidden_act in _PYTHON_GELU else 1) * p * inter + down_input
    k, experts = layer.experts_per_token, layer.num_experts
    routed = k * (2 * p * layer.hidden_size + 4 * p * layer.expert_intermediate_size)
    routing = 4 * experts + STAT_BYTES + k * (4 + 4 + 3 * INDEX_BYTES)
    shared = 4 * p * inter if inter else 0
    shared_gate = 2 * p if layer.shared_expert_gate else 0
    return routed + routing + shared + shared_gate


def frozen_moe_unsaved_bytes(layer: LayerSpec, prec: Precision, experts_adapted: bool) -> int:
    """Bytes per token ``mlp_bytes`` counts for a mixture-of-experts layer that a frozen layer does not save:
    the input of the down projections (the gated product), which only their weight gradient needs: the
    shared expert's always when frozen, the routed experts' unless peft wraps them (``lora.ParamWrapper``'s
    merged weight requires a gradient, so the expert matmul keeps its input). Measured on fake tensors:
    Mixtral-8x7B attention-only LoRA was 57 KB per token and layer over, exactly k x I_e x 2 bytes."""
    if not layer.num_experts:
        return 0
    routed = 0 if experts_adapted else layer.experts_per_token * layer.expert_intermediate_size
    return prec.matmul * (routed + layer.intermediate_size)


def dropout_bytes(
    spec: ModelSpec, layer: LayerSpec, attention: str, dropout: float | None, mask_bytes: int = DROPOUT_MASK_BYTES
) -> tuple[int, int]:
    """Masks of active dropouts (1 byte per element on CUDA; CPU's kernel keeps the mask in the
    compute dtype): residual dropouts after attention and MLP; in eager attention the mask of
    the dropped probabilities (their output replaces the softmax cast as the saved input of
    the value product, so only the mask is added)."""
    hidden_p = spec.hidden_dropout if dropout is None else dropout
    attn_p = spec.attention_dropout if dropout is None else dropout
    per_token = 2 * mask_bytes * layer.hidden_size if hidden_p > 0 else 0
    per_key = 0
    if attn_p > 0 and attention == "eager":
        per_key = layer.num_heads * mask_bytes
    return per_token, per_key


def layer_activation_bytes(
    spec: ModelSpec,
    layer: LayerSpec,
    precision: str,
    attention: str,
    dropout: float | None = None,
    trainable: bool = True,
    mask_bytes: int = DROPOUT_MASK_BYTES,
) -> tuple[int, int]:
    """(bytes per token, bytes per token per key) saved by one decoder layer for backward.

    ``trainable``: the base weights are trained (full fine-tuning); with LoRA/QLoRA they are
    frozen and the adapters' own saved tensors are added by ``lora_bytes``.
    Bf16 weight copies made by autocast are not included: see ``autocast_weight_bytes``.
    """
    prec = PRECISION[precision]
    fused = "gpt2" if spec.model_type == "gpt2" else spec.model_type in ("gpt_neox", "phi", "falcon")
    per_token, per_key = attention_bytes(layer, prec, attention, fused, trainable)
    per_token += norms_bytes(layer, prec, trainable) + mlp_bytes(layer, prec, trainable)
    drop_token, drop_key = dropout_bytes(spec, layer, attention, dropout, mask_bytes)
    return per_token + drop_token, per_key + drop_key


def kbit_autocast_layer_bytes(spec: ModelSpec, layer: LayerSpec, attention: str, dropout: float | None = None,
                              mask_bytes: int = DROPOUT_MASK_BYTES) -> tuple[int, int]:
    """(bytes per token, per token and key) one frozen 4-bit layer saves after peft's
    ``prepare_model_for_kbit_training`` under bf16 autocast (HF Trainer ``bf16=True``).

    The residual stream and the norms are fp32 (fp32 embedding and norm weights, peft 0.21.2
    ``src/peft/utils/other.py``): each norm keeps its fp32 input and rsqrt. bitsandbytes'
    ``Linear4bit`` casts its input to bf16 itself and returns its input's dtype (bitsandbytes 0.50
    ``nn/modules.py``; its ``MatMul4Bit`` saves no activation), so the q/k/v and MLP projections
    give fp32 outputs: the MLP keeps its gate, activation and up outputs in fp32, while autocast's
    SDPA keeps bf16 copies of q, k, v and its output. The adapters' own copies are
    ``lora_autocast_bytes_per_token``."""
    fused = "gpt2" if spec.model_type == "gpt2" else spec.model_type in ("gpt_neox", "phi", "falcon")
    per_token, per_key = attention_bytes(layer, PRECISION["bf16-mixed"], attention, fused, False)
    per_token += norms_bytes(layer, PRECISION["fp32"], False) + mlp_bytes(layer, PRECISION["fp32"], False)
    drop_token, drop_key = dropout_bytes(spec, layer, attention, dropout, mask_bytes)
    return per_token + drop_token, per_key + drop_key


def lora_autocast_bytes_per_token(in_features: int, rank, lora_dropout: float) -> object:
    """One fp32 adapter on an fp32 input under bf16 autocast (QLoRA after k-bit preparation): peft
    does not cast (the dtypes agree), autocast's ``linear`` casts A's input to bf16 and B's rank-r
    input is A's bf16 output, each kept for the weight gradients: 2 x in + 2 x r bytes per token,
    with the dropout mask when lora_dropout > 0."""
    mask = DROPOUT_MASK_BYTES * in_features if lora_dropout > 0 else 0
    return 2 * in_features + 2 * rank + mask


def head_activation_bytes_per_token(
    spec: ModelSpec, precision: str, dropout: float | None = None, trainable: bool = True
) -> int:
    """Outside the layers: token ids (embedding) and labels, the final norm, the head's input
    (kept only when the head is trained), the log-softmax output the loss keeps (fp32,
    vocabulary wide), the embedding dropout mask."""
    prec = PRECISION[precision]
    first = spec.layers[0]
    final = norm_saved_bytes(first, prec.residual, trainable) + _norm_output_bytes(first, prec, 1, trainable)
    embedding_p = spec.embedding_dropout if dropout is None else dropout
    embed_drop = DROPOUT_MASK_BYTES * spec.hidden_size if embedding_p > 0 else 0
    positions = INDEX_BYTES if spec.position_embeddings else 0
    softcap = PRECISION[precision].matmul * spec.vocab_size if spec.final_logit_softcap else 0
    return 2 * INDEX_BYTES + positions + final + 4 * spec.vocab_size + embed_drop + softcap


def loss_backward_temp_bytes_per_token(spec: ModelSpec) -> int:
    """Transient at the start of backward: the gradient of the log-softmax output and of the
    fp32 logits exist together (``nll_loss_backward`` then ``_log_softmax_backward_data``)."""
    return 8 * spec.vocab_size


def autocast_weight_bytes(spec: ModelSpec) -> int:
    """Bf16 copies of every projection weight made by autocast in forward and kept for backward
    (``torch.autocast`` caches casts of leaf weights; the matmuls save them). Norm weights and
    the embedding are not cast; the output head is."""
    linear = sum(lin.weight_params for layer in spec.layers for lin in layer.linears)
    return 2 * (linear + spec.vocab_size * spec.hidden_size)


def lora_bytes_per_token(in_features: int, rank, lora_dropout: float) -> object:
    """One adapted projection (peft ``lora.Linear``): the input cast to the fp32 adapter dtype,
    kept by A; the rank-r fp32 intermediate kept by B; the dropout mask when lora_dropout > 0
    (peft applies dropout to the input of A)."""
    mask = DROPOUT_MASK_BYTES * in_features if lora_dropout > 0 else 0
    return 4 * in_features + 4 * rank + mask


def lora_base_dtype_bytes_per_token(layer: LayerSpec, adapted: set[str], rank, lora_dropout: float, w: int,
                                    mask_bytes: float, attention: str) -> object:
    """One layer's LoRA tensors per token when the adapters share the base dtype ``w`` (peft
    ``autocast_adapter_dtype=False`` on a bf16 model): no cast, so A keeps the projection's own input,
    one tensor per distinct input however many adapters read it (q, k and v share the normed input,
    gate and up the MLP's); the output projection's input is SDPA's output, already kept (not so
    with eager attention); B keeps the rank-r product at ``w``. With lora_dropout > 0 each adapter
    keeps its own dropped-out input and mask instead. Measured against peft 0.21 on fake tensors
    (Llama-3.2-1B layers, all-linear, rank 16: exact without dropout)."""
    adapters = [lin for lin in layer.linears if lin.name in adapted and lin.count == 1]
    kept = w * rank * len(adapters)
    if lora_dropout > 0:
        return kept + sum((w + mask_bytes) * lin.in_features for lin in adapters)
    groups = [layer.attention[:-1], layer.attention[-1:], layer.mlp[:-1], layer.mlp[-1:]]
    for index, group in enumerate(groups):
        if not any(lin.name in adapted for lin in group):
            continue
        if index == 1 and attention == "sdpa":
            continue  # the output projection reads SDPA's output, which SDPA keeps anyway
        kept = kept + w * group[0].in_features
    return kept


def fused_linear_ce_chunk_tokens(tokens, vocab_size: int, hidden_size: int):
    """Tokens per chunk of Liger's fused linear cross-entropy: the next power of two of
    ceil(tokens / ceil(V / h)), so a chunk's logits are about as large as the hidden states
    (``fused_linear_cross_entropy_forward``, Liger Kernel, Hsu et al. 2024)."""
    per_chunk = np.ceil(np.asarray(tokens, dtype=np.float64) / np.ceil(vocab_size / hidden_size))
    return 2.0 ** np.ceil(np.log2(np.maximum(per_chunk, 1.0)))


def fused_linear_ce_bytes(spec: ModelSpec, precision: str, tokens, trainable: bool) -> dict:
    """The head and loss as Liger's fused linear cross-entropy runs them, priced from its algorithm
    (not traced: a Triton kernel): logits exist one chunk at a time at the compute dtype, the
    cross-entropy overwrites them with their gradient in place, and the gradients of the head's
    input (and of its weight, when it trains) are computed in forward and kept for backward, which
    only rescales them. Replaces the standard head's fp32 log-softmax, its input and the loss's
    backward temporaries. Returns per-token bytes ``saved_per_token`` that replace the standard
    head's, the forward transient ``forward_bytes`` and ``loss_temporaries`` (none)."""
    prec = PRECISION[precision]
    v, h = spec.vocab_size, spec.hidden_size
    standard = 4 * v + _norm_output_bytes(spec.layers[0], prec, 1, trainable)
    kept = prec.matmul * h + 4  # the head input's gradient and the per-token loss (fp32)
    chunk = fused_linear_ce_chunk_tokens(tokens, v, h)
    zero = 0 * np.asarray(tokens, dtype=np.float64)
    return {"saved_per_token": kept - standard, "forward_bytes": chunk * v * prec.matmul + chunk * h * prec.matmul,
            "loss_temporaries": zero}
