"""The torchtune stack (torchtune 0.6.1, torchao 0.11): what its training step holds, as pure formulas.

Owns the byte counts of torchtune's single-device recipes that differ from the HF inventory of
``planner.cost.memory.activations``: the tensors each decoder layer saves for backward
(``layer_saved_bytes_per_token``), what the final norm and head save (``head_saved_bytes_per_token``),
the loss's transient tensors with and without chunked cross-entropy (``loss_extra_bytes``),
the per-parameter bytes of weights, gradients and optimizer state, with optimizer-in-backward and
paged 8-bit AdamW (``state_bytes_per_param``), NF4 weights (``nf4_bytes_per_weight``), and the
mapping of LoRA targets to torchtune's builder switches (``lora_switches``). Every number was read
op by op from torchtune's modules and matches the fake-tensor oracle
(``planner.truth.torchtune_step``, ``tests/test_torchtune_oracle.py``); the derivation is in
``benchmarks/torchtune_inventory.md``. Pure Python on scalars or numpy arrays; may import
``planner.specs`` only.

Notation: ``w`` bytes per element of the model dtype (bf16: 2, fp32: 4; torchtune trains in one
dtype, no autocast), ``h`` hidden size, ``q`` = heads x head_dim, ``n_h`` heads, ``hd`` head_dim,
``I`` MLP width, ``r`` LoRA rank, ``V`` vocabulary, ``T`` tokens per micro-batch, ``b`` micro-batch.
"""

from __future__ import annotations

from typing import Any

from planner.specs.architecture import LayerSpec, ModelSpec, is_dense_prenorm_gated

#: HF ``lora_targets`` names and torchtune's (attention modules are named, the MLP is one switch)
_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj",
         "output_proj": "output_proj"}
_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w2": "w2", "w3": "w3"}
_HEAD = {"lm_head", "output"}
_ATTN_ORDER = ("q_proj", "k_proj", "v_proj", "output_proj")
RSQRT_BYTES = 4  # RMSNorm's fp32 rsqrt per token
LSE_BYTES = 4  # flash attention's fp32 log-sum-exp per head and token


def lora_switches(targets: tuple[str, ...]) -> dict[str, Any]:
    """torchtune's ``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output`` for
    HF-style ``lora_targets``. ``all-linear`` is peft's meaning (every linear of the layers, not
    the head); torchtune adapts the MLP as a whole, so naming part of it raises ValueError."""
    targets = tuple(targets)
    if targets == ("all-linear",):
        return {"lora_attn_modules": list(_ATTN_ORDER), "apply_lora_to_mlp": True, "apply_lora_to_output": False}
    unknown = [t for t in targets if t not in _ATTN and t not in _MLP and t not in _HEAD]
    if unknown:
        raise ValueError(f"lora_targets {unknown} have no torchtune equivalent; accepted: "
                         f"{sorted({*_ATTN, *_MLP, *_HEAD})} or all-linear")
    mlp = {_MLP[t] for t in targets if t in _MLP}
    if mlp and len(mlp) < 3:
        raise ValueError(f"torchtune's apply_lora_to_mlp adapts w1, w2 and w3 together; {sorted(mlp)} is part of it")
    attn = [m for m in _ATTN_ORDER if m in {_ATTN[t] for t in targets if t in _ATTN}]
    return {"lora_attn_modules": attn, "apply_lora_to_mlp": bool(mlp),
            "apply_lora_to_output": any(t in _HEAD for t in targets)}


def dtype_bytes(precision: str) -> int:
    """Bytes per element of torchtune's training dtype (``bf16`` or ``fp32``; no mixed precision)."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"torchtune trains in bf16 or fp32, not {precision!r}")
    return 2 if precision == "bf16" else 4


PRICED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""The HF model types whose torchtune builders these formulas were checked against (0.6.1)."""


def unpriced_reason(spec: ModelSpec) -> str | None:
    """Why the torchtune formulas cannot price ``spec`` (None when they can)."""
    if spec.model_type not in PRICED_MODEL_TYPES:
        return (f"the torchtune stack is priced for {', '.join(PRICED_MODEL_TYPES)} models, "
                f"not {spec.model_type!r}: use --stack hf")
    if not is_dense_prenorm_gated(spec):
        return "the torchtune formulas cover dense pre-norm layers with a gated MLP: use --stack hf"
    return None


def rope_kind(model_type: str) -> str:
    """``half`` (Qwen2's rotate-half RoPE: cos and sin cast to the dtype per call and saved) or
    ``interleaved`` (torchtune's ``RotaryPositionalEmbeddings`` / ``Llama3ScaledRoPE``: saves only
    a view of the fp32 cache buffer, or a gathered copy when ``input_pos`` is given)."""
    return "half" if model_type == "qwen2" else "interleaved"


def layer_saved_bytes_per_token(layer: LayerSpec, *, precision: str = "bf16", method: str = "full",
                                lora_rank=16, lora_targets: tuple[str, ...] = ("all-linear",), micro_batch=1,
                                seq_len=2048, rope: str = "interleaved", packed: bool = False,
                                checkpointing: str = "none", offload: bool = False, compiled: bool = False,
                                first_layer: bool = False):
    """Bytes per token one decoder layer keeps for backward on the device (torchtune's
    ``TransformerSelfAttentionLayer`` with ``MultiHeadAttention`` over SDPA and a gated
    ``FeedForward``). See ``benchmarks/torchtune_inventory.md`` for each term.

    ``checkpointing="full"``: the checkpoint keeps the layer input alone (``w h``); with
    ``offload`` that input lives on the host instead (0 on the device).
    ``compiled``: the saved set of ``torch.compile``'s min-cut partitioner (measured with
    ``aot_eager_decomp_partition``); QLoRA then also keeps the dequantized weights
    (``compiled_qlora_weight_bytes``). ``first_layer`` with LoRA/QLoRA: the frozen embedding's
    output needs no gradient, so the first attention norm saves nothing.
    """
    w = dtype_bytes(precision)
    h, q, n_h, hd, width = layer.hidden_size, layer.q_dim, layer.num_heads, layer.head_dim, layer.intermediate_size
    if (layer.num_experts or not layer.gated_mlp or layer.parallel_residual or layer.qk_norm != "none"
            or layer.post_norms or layer.attn_logit_softcap):
        raise NotImplementedError("the torchtune formulas cover dense pre-norm layers with a gated MLP and SDPA "
                                  "(Llama, Mistral, Qwen2); Gemma-2's eager attention is traced, not priced")
    if checkpointing == "full":
        return 0 * h if offload else w * h
    lora = method in ("lora", "qlora")
    sw = lora_switches(lora_targets) if lora else {"lora_attn_modules": [], "apply_lora_to_mlp": False}
    attn_lora = set(sw["lora_attn_modules"])
    mlp_lora = sw["apply_lora_to_mlp"]
    adapters = len(attn_lora) + (3 if mlp_lora else 0)
    lora_b_inputs = w * lora_rank * adapters
    if compiled:
        return 4 * w * h + 2 * RSQRT_BYTES + 4 * w * q + LSE_BYTES * n_h + 3 * w * width + lora_b_inputs
    trainable_norm = not lora
    norm = 4 * h + RSQRT_BYTES + (4 * h if trainable_norm else 0)  # fp32 input, rsqrt, fp32 x*rsqrt
    sa_norm = 0 * h if (lora and first_layer) else norm
    attn_in = w * h if (not lora or attn_lora & {"q_proj", "k_proj", "v_proj"}) else 0 * h
    sdpa = 4 * w * q + LSE_BYTES * n_h  # q, k and v expanded to n_h heads, the output, lse
    mlp_in = w * h if (not lora or mlp_lora) else 0 * h
    gate = 3 * w * width  # w1 out (SiLU input), w3 out, SiLU out (the product's inputs)
    down_in = w * width if (not lora or mlp_lora) else 0 * width
    extra = rope_saved_bytes_per_token(hd, w, rope, micro_batch, packed) + (w * seq_len if packed else 0)
    return sa_norm + norm + attn_in + sdpa + mlp_in + gate + down_in + lora_b_inputs + extra


def rope_saved_bytes_per_token(head_dim, w: int, rope: str, micro_batch=1, packed: bool = False):
    """RoPE's saved bytes per token and layer (q and k: two calls per layer).

    ``interleaved``: a view of the fp32 cache buffer (0 new bytes) without ``input_pos``; packed,
    ``cache[input_pos]`` gathers ``hd / 2 x 2`` fp32 values per token and call: ``8 hd``.
    ``half``: ``cos`` and ``sin`` cast to the dtype, ``hd`` each, per position and call:
    ``4 w hd / b`` per token (shared by the batch), ``4 w hd`` packed (gathered per row).
    """
    if rope == "interleaved":
        return 8 * head_dim if packed else 0 * head_dim
    return 4 * w * head_dim / (1 if packed else micro_batch)


def packed_mask_bytes(micro_batch, seq_len) -> Any:
    """The dense block-causal mask of a packed batch (``padded_collate_packed`` without flex
    attention): ``b x s x s`` bool, held for the whole step (SDPA's per-layer float copy of it is
    counted by ``layer_saved_bytes_per_token(packed=True)``)."""
    return micro_batch * seq_len * seq_len


def head_saved_bytes_per_token(spec: ModelSpec, *, precision: str = "bf16", method: str = "full",
                               apply_lora_to_output: bool = False, lora_rank=16):
    """Final RMSNorm and output head, bytes per token kept for backward (the loss is
    ``loss_extra_bytes``'s). The norm keeps its fp32 input and rsqrt, and its fp32 normalized input
    when its weight trains; the head keeps its bf16 input when its weight trains or is LoRA-adapted
    (then also the rank-``r`` ``lora_a`` output)."""
    w = dtype_bytes(precision)
    h = spec.hidden_size
    lora = method in ("lora", "qlora")
    norm = 4 * h + RSQRT_BYTES + (0 if lora else 4 * h)
    head_in = w * h if (not lora or apply_lora_to_output) else 0 * h
    return norm + head_in + (w * lora_rank if lora and apply_lora_to_output else 0)


def loss_extra_bytes(spec: ModelSpec, tokens, *, precision: str = "bf16", output_chunks: int = 0,
                     head_trainable: bool = True, compiled: bool = False) -> dict[str, Any]:
    """Bytes the logits and the loss add at the forward's and the backward's peak.

    Unchunked (the model's ``.float()`` logits, ``CrossEntropyLoss``): forward, fp32 logits and the
    saved fp32 log-softmax (``8 V T``); backward, the log-softmax plus the fp32 gradients of its
    output and input (``12 V T``). Chunked (``n`` chunks, ``CEWithChunkedOutputLoss``): forward,
    every bf16 chunk (the model returns the list), every chunk's saved fp32 log-softmax, and one
    chunk's fp32 upcast (``(w + 4 + 4 / n) V T``); backward, the larger of two moments: the first
    chunk's loss backward (every chunk's log-softmax still saved, that chunk's two fp32 gradients:
    ``(4 + 8 / n) V T``) and, when the head weight trains, its gradient summed over the chunk
    matmuls in autograd's input buffer (3 ``V x h`` tensors at the dtype) while the gradients of
    all the chunks wait at the model dtype (autograd runs every chunk's loss backward before the
    head matmuls: ``w V T``).

    ``compiled`` with chunks (the recipes' ``compile_loss`` compiles each chunk's cross-entropy): the
    compiled chunk saves only its bf16 input (already alive in the list) and two fp32 values per
    token, not the fp32 log-softmax (counted with ``saved_tensors_hooks`` under
    ``aot_eager_decomp_partition``: 2 bytes per logit saved against eager's 8); each chunk's
    gradient is made at the model dtype. Unchunked, the model's own ``.float()`` logits stay, as eager.
    """
    w = dtype_bytes(precision)
    vt = spec.vocab_size * tokens
    if not output_chunks:
        return {"forward": 8 * vt, "backward": 12 * vt}
    head_grads = 3 * w * spec.vocab_size * spec.hidden_size if head_trainable else 0
    if compiled:
        first_chunk = w * vt / output_chunks
        larger = first_chunk + (head_grads - first_chunk) * (head_grads > first_chunk)  # vectorized max
        return {"forward": w * vt, "backward": w * vt + larger}
    first_chunk = 4 * vt + 8 * vt / output_chunks
    accumulation = w * vt + head_grads
    return {"forward": (w + 4) * vt + 4 * vt / output_chunks,
            "backward": first_chunk + (accumulation - first_chunk) * (accumulation > first_chunk)}


def state_bytes_per_param(*, precision: str = "bf16", optimizer: str = "adamw", optimizer_impl: str = "foreach",
                          optimizer_in_bwd: bool = False, paged: bool = False) -> dict[str, float]:
    """Bytes per trainable parameter at the optimizer's peak, by kind (``weight``, ``grad``,
    ``state``, ``scratch``), and ``host`` for paged states (CUDA managed memory, outside PyTorch's
    allocator). torch's AdamW keeps its two moments at the parameter dtype; its foreach step
    allocates one parameter-sized temporary (``scratch``). bitsandbytes' 8-bit AdamW: two uint8
    moments plus an fp32 absmax per 256 values (tensors of >= 4096 elements), no scratch.
    ``optimizer_in_bwd``: each gradient is freed by its parameter's step inside the backward, so
    none is alive when the backward ends, and the step scratch is one parameter's (``scratch``
    then reads 0 here: the largest tensor's, count it apart).
    """
    w = dtype_bytes(precision)
    if optimizer == "adamw":
        state, scratch = 2 * w, (w if optimizer_impl == "foreach" else 0)
    elif optimizer == "adamw-8bit":
        state, scratch = 2 + 2 * 4 / 256, 0
    else:
        raise ValueError(f"optimizer {optimizer!r}: adamw or adamw-8bit")
    host = 0.0
    if paged:
        if optimizer != "adamw-8bit":
            raise ValueError("paged is bitsandbytes' PagedAdamW8bit: optimizer adamw-8bit")
        host, state = 2.0, 2 * 4 / 256
    grad = 0 if optimizer_in_bwd else w
    if optimizer_in_bwd:
        scratch = 0
    return {"weight": float(w), "grad": float(grad), "state": float(state), "scratch": float(scratch), "host": host}


def nf4_bytes_per_weight(block_size: int = 64, scaler_block_size: int = 256, scale_bytes: int = 2) -> float:
    """torchao ``NF4Tensor`` bytes per weight: 4-bit codes, an int8 scaler per block, one
    quantization factor (at the original dtype) per ``scaler_block_size`` scalers (the per-tensor
    mean and 16-entry table are negligible)."""
    return 0.5 + 1 / block_size + scale_bytes / (block_size * scaler_block_size)


def compiled_qlora_weight_bytes(layer: LayerSpec, precision: str = "bf16") -> int:
    """Per layer, what ``torch.compile`` (min-cut partitioner) keeps for QLoRA's backward beyond the
    eager inventory: every NF4 linear's dequantized weight at the dtype (measured; the
    eager ``LinearNF4`` keeps only the NF4 weight)."""
    return dtype_bytes(precision) * sum(lin.weight_params for lin in layer.attention + layer.mlp)
