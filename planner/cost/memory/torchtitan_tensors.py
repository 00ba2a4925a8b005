"""The torchtitan stack (torchtitan 0.3.0 on torch 2.13): what its training step holds, as pure formulas.

Owns the byte counts of torchtitan's Llama 3 decoder (``torchtitan/models/llama3``, built from
``models/common``) that differ from the HF inventory of ``planner.cost.memory.activations``: what each
``Llama3TransformerBlock`` saves for backward under each activation-checkpointing policy of
``distributed/activation_checkpoint.py`` (``layer_saved_bytes_per_token``), what the final norm and
``lm_head`` save (``head_saved_bytes_per_token``), the loss's transients
(``components/loss.py: cross_entropy_loss``, ``loss_extra_bytes_per_token``), and FSDP2's
per-layer buffers under torchtitan's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
(``distributed/fsdp.py: apply_fsdp_to_decoder``; ``fsdp_layer_transient_bytes``). The layer
inventory was measured op by op on fake CPU tensors (``benchmarks/torchtitan_oracle.py``, pinned in
``tests/test_torchtitan_memory.py``). Pure Python on scalars or numpy arrays; may import
``planner.specs`` only.

Notation: ``w`` bytes per element of the compute dtype (FSDP's ``param_dtype``: bf16 2, fp32 4),
``h`` hidden size, ``q`` = heads x head_dim, ``kv`` = kv heads x head_dim, ``n_h`` heads, ``I`` MLP
width, ``V`` vocabulary, ``P_l`` parameters of one block.
"""

from __future__ import annotations

from planner.specs.architecture import LayerSpec, ModelSpec, is_dense_prenorm_gated

RSTD_BYTES = 4  # RMSNorm's fp32 reciprocal RMS per token
LSE_BYTES = 4  # the attention kernel's fp32 log-sum-exp per head and token
REDUCE_BYTES = 4  # MixedPrecisionPolicy(reduce_dtype=float32): the reduce-scatter runs in fp32
SHARD_BYTES = 4  # the sharded parameters, their gradients and AdamW's two moments stay fp32

PRICED_MODEL_TYPES = ("llama",)
"""HF model types torchtitan 0.3.0 has a builder for whose dense layers these formulas price
(``torchtitan.models.llama3``: Llama 2/3 shapes); qwen3, deepseek_v3, gpt_oss, ... are not priced."""


def unpriced_reason(spec: ModelSpec) -> str | None:
    """Why the torchtitan formulas cannot price ``spec`` (None when they can)."""
    if spec.model_type not in PRICED_MODEL_TYPES:
        return (f"the torchtitan stack is priced for its Llama 3 builder ({', '.join(PRICED_MODEL_TYPES)} "
                f"models), not {spec.model_type!r}: use --stack hf")
    if not is_dense_prenorm_gated(spec):
        return "the torchtitan formulas cover Llama 3's dense pre-norm blocks with a SwiGLU MLP: use --stack hf"
    if spec.tied_embeddings:
        return "torchtitan's Llama 3 builder does not tie the embedding and the head: use --stack hf"
    return None


def compute_bytes(precision: str) -> int:
    """Bytes of the compute dtype: ``bf16-mixed`` is FSDP2's ``param_dtype=bfloat16`` (torchtitan's
    default ``training.mixed_precision_param``, ``config/configs.py``); ``fp32`` is ``float32``."""
    if precision not in ("bf16-mixed", "fp32"):
        raise ValueError(f"torchtitan trains with FSDP mixed precision (bf16-mixed) or fp32, not {precision!r}")
    return 2 if precision == "bf16-mixed" else 4


def norm_saved_bytes_per_token(hidden: int, w: int, device: str = "cuda") -> int:
    """One ``nn.RMSNorm`` (``models/common/nn_modules.py: RMSNorm``, torch's own) for backward.

    cuda: ``torch.rms_norm`` runs ATen's fused ``_fused_rms_norm``, whose backward reads the input
    and the fp32 rstd (``torch/_decomp/decompositions.py: _fused_rms_norm_backward``): ``w h + 4``.
    cpu (the traced oracle): the composite upcasts, saving the fp32 input, the rstd and the fp32
    normalized input: ``8 h + 4`` (measured)."""
    return w * hidden + RSTD_BYTES if device == "cuda" else 8 * hidden + RSTD_BYTES


def attention_saved_bytes_per_token(layer: LayerSpec, w: int) -> int:
    """``GQAttention.forward`` (``models/common/attention.py``) after the fused ``wqkv``:
    ``ComplexRoPE.apply_rotary_emb`` (``rope.py``) multiplies by the complex64 cache buffer and saves
    nothing new; the attention kernel keeps q (``w q``), k and v unexpanded (``enable_gqa``: ``2 w kv``),
    its output (``w q``, also ``wo``'s input) and an fp32 log-sum-exp per head (measured with SDPA's
    flash kernel; FlexAttention, 0.3.0's default backend, saves the same set)."""
    return 2 * w * layer.q_dim + 2 * w * layer.kv_dim + LSE_BYTES * layer.num_heads


def layer_saved_bytes_per_token(layer: LayerSpec, *, precision: str = "bf16-mixed", checkpointing: str = "none",
                                device: str = "cuda", compiled: bool = False) -> int:
    """Bytes per token one ``Llama3TransformerBlock`` keeps for backward (``llama3/model.py``).

    none: two norms, ``wqkv``'s input, the attention set, ``w1``/``w3``'s input, and the SwiGLU's
    ``w1`` out, SiLU out, ``w3`` out and product (``feed_forward.py: FeedForward.forward``): ``8 w I``.
    full (``FullAC``: ``checkpoint_wrapper`` per block): the block input, ``w h``.
    selective (``SelectiveAC``, op-level): the block input plus the outputs of the save-listed ops,
    every second matmul recomputed (``_get_custom_policy``: the 1st, 3rd and 5th of wqkv, wo, w1, w3,
    w2 are saved): ``wqkv`` out ``w (q + 2 kv)``, the attention output and lse, ``w1`` out, ``w2`` out.
    compiled (``distributed/compile.py: apply_compile``, each block; no AC): the min-cut partitioner
    keeps each norm's input and rstd (as the fused CUDA norm does) and recomputes SiLU's output from
    ``w1``'s: the cuda eager set less ``w I`` (measured with ``aot_eager_decomp_partition``: 139,400
    bytes on Llama-3-8B's block, 165,032 on a Llama-2-13B-shaped one). With full or selective AC the
    policy's saved set is priced as eager (not measured compiled).
    """
    w = compute_bytes(precision)
    h, q, kv, width = layer.hidden_size, layer.q_dim, layer.kv_dim, layer.intermediate_size
    if checkpointing == "full":
        return w * h
    if checkpointing == "selective":
        return w * h + w * (q + 2 * kv) + w * q + LSE_BYTES * layer.num_heads + w * width + w * h
    if checkpointing != "none":
        raise ValueError(f"checkpointing {checkpointing!r}: none, full or selective")
    norms = 2 * norm_saved_bytes_per_token(h, w, "cuda" if compiled else device)
    mlp = (3 if compiled else 4) * w * width
    return norms + 2 * w * h + attention_saved_bytes_per_token(layer, w) + mlp


def head_saved_bytes_per_token(spec: ModelSpec, precision: str = "bf16-mixed", device: str = "cuda") -> int:
    """The final ``norm`` and ``lm_head``'s input (``Decoder.forward``, ``models/common/decoder.py``)."""
    w = compute_bytes(precision)
    return norm_saved_bytes_per_token(spec.hidden_size, w, device) + w * spec.hidden_size


COMPILED_LOSS_STATS_BYTES = 16
"""Per token, what the compiled cross-entropy saves beside the logits (fp32 reductions; measured)."""


def loss_extra_bytes_per_token(spec: ModelSpec, precision: str = "bf16-mixed", compiled: bool = False
                               ) -> dict[str, int]:
    """``cross_entropy_loss`` (``components/loss.py``: ``pred.flatten(0, 1).float()``, sum reduction).

    eager: forward, at the log-softmax: the logits (``w V``), their fp32 copy and the saved fp32
    log-softmax (``8 V``); backward, at the log-softmax's backward (``pred`` deleted in
    ``Trainer._forward_backward_body``): the saved log-softmax plus two fp32 gradients, ``12 V``.

    compiled (``compiled=True``: torchtitan's ``BaseLoss._maybe_compile`` wraps the loss in
    ``torch.compile`` when ``compile.enable`` and ``"loss" in compile.components``, the default since
    torchtitan PR #1033, 2025-04-02, https://github.com/pytorch/torchtitan/pull/1033): the partitioner
    saves the logits themselves plus 16 bytes per token (measured with ``aot_eager_decomp_partition``:
    ``2 V + 16`` per token against ``4 V + 8`` eager), and Inductor fuses the upcast, the log-softmax and
    its backward: forward ``w V``; backward the saved logits and their low-precision gradient, ``2 w V``
    (the fused kernel's fp32 intermediates never reach memory: documented, not traced)."""
    w = compute_bytes(precision)
    vocab = spec.vocab_size
    if compiled:
        return {"forward": w * vocab + COMPILED_LOSS_STATS_BYTES,
                "backward": 2 * w * vocab + COMPILED_LOSS_STATS_BYTES}
    return {"forward": w * vocab + 8 * vocab, "backward": 12 * vocab}


def rope_cache_bytes(layer: LayerSpec, seq_len) -> object:
    """Each block's ``ComplexRoPE`` registers its own complex64 cache, resized to the training
    ``seq_len`` (``Decoder.Config.update_from_config``): ``seq_len x head_dim / 2 x 8`` bytes; buffers
    are neither sharded nor cast by FSDP."""
    return 4 * seq_len * layer.head_dim


def fsdp_layer_transient_bytes(layer_params, shard: int, w: int, gathered_bytes=None) -> dict[str, object]:
    """FSDP2's per-block buffers (``fully_shard`` per block, ``reshard_after_forward=True``).

    forward: the block's unsharded compute-dtype parameters and the next block's, all-gathered ahead
    by FSDP2's implicit prefetch: ``2 w P_l`` (``gathered_bytes`` replaces ``w P_l`` when float8 gathers
    the linears in fp8: ``planner.cost.memory.float8.gathered_block_bytes``). backward: the same two
    gathered blocks, the block's unsharded gradients at the compute dtype (``w P_l``), the
    reduce-scatter input in fp32 (``reduce_dtype``: ``4 P_l``) and its output shard (``4 P_l / shard``)."""
    gathered = w * layer_params if gathered_bytes is None else gathered_bytes
    forward = 2 * gathered
    backward = forward + w * layer_params + REDUCE_BYTES * layer_params + REDUCE_BYTES * layer_params / shard
    return {"forward": forward, "backward": backward}
