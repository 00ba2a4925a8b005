"""Builders of ``ModelSpec`` layers, one per family of HF ``model_type``.

Each builder reads the config keys the way the matching ``transformers`` modeling file does (the
file is named in each builder's docstring) and returns the decoder layers plus the model-level
fields. Integer keys are read through ``int_key`` (``planner.specs.config_values``) so that a zero, negative
or non-integer value is a one-line error naming the key, not an exception deep inside a formula.
"""

from __future__ import annotations

from planner.errors import PlannerError
from planner.specs.architecture import LayerSpec, Linear
from planner.specs.config_values import dropouts, flag, int_key, layer_indices, per_head, positive_number

# ----------------------------------------------------------------------------- config reading


def _head_dim(cfg: dict, hidden: int, heads: int) -> int:
    if cfg.get("head_dim") is not None:
        return int_key(cfg, "head_dim")
    return per_head(hidden, heads)


def _gated_mlp(prefix: str, hidden: int, inter: int, bias: bool) -> tuple[Linear, ...]:
    return (
        Linear(f"{prefix}gate_proj", hidden, inter, bias),
        Linear(f"{prefix}up_proj", hidden, inter, bias),
        Linear(f"{prefix}down_proj", inter, hidden, bias),
    )


def _qkvo(hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool):
    return (
        Linear("q_proj", hidden, heads * head_dim, qkv_bias),
        Linear("k_proj", hidden, kv_heads * head_dim, qkv_bias),
        Linear("v_proj", hidden, kv_heads * head_dim, qkv_bias),
        Linear("o_proj", heads * head_dim, hidden, o_bias),
    )


# ----------------------------------------------------------------------------- builders

# Per-family traits of the Llama-like decoders that differ only in small ways.
_LLAMA_LIKE = {
    # model_type: (qkv_bias default, norms per layer, qk_norm)
    "llama": (None, 2, "none"),
    "mistral": (False, 2, "none"),
    "mixtral": (False, 2, "none"),
    "qwen2": (True, 2, "none"),
    "qwen2_moe": ("qkv_bias", 2, "none"),
    "qwen3": (None, 2, "head"),
    "qwen3_moe": (None, 2, "head"),
    "olmo2": (None, 2, "full"),
    "olmoe": (None, 2, "full"),
    "gemma": (None, 2, "none"),
    "gemma2": (None, 4, "none"),
    "gemma3_text": (None, 4, "head"),
    "smollm3": (None, 2, "none"),
    "phi3": (False, 2, "none"),
}


# transformers' config-class defaults for keys that change the memory model when a config.json
# omits them (Gemma2Config: attn 50.0, final 30.0; Gemma3TextConfig: no attention soft-cap).
_FAMILY_DEFAULTS = {
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
}


def _llama_like(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """Llama, Mistral, Mixtral, Qwen2/2-MoE/3/3-MoE, OLMo-2, OLMoE, Gemma 1/2/3, SmolLM3, Phi-3.

    Mirrors transformers' ``modeling_<type>.py``: q/k/v/o projections (Phi-3 fuses them into
    ``qkv_proj`` and ``gate_up_proj``), gated MLP or sparse MoE block, RMSNorm weights only.
    """
    model_type = cfg["model_type"]
    common = _llama_layer_fields(cfg)
    inter = int_key(cfg, "intermediate_size", default=0, minimum=0)
    dense_mlp = _llama_dense_mlp(cfg, common["hidden_size"], inter)
    num_layers = int_key(cfg, "num_hidden_layers")
    num_experts = int_key(cfg, "num_local_experts", "num_experts", default=0, minimum=0)
    moe_layer = _moe_layer_fn(cfg, num_experts, num_layers)
    layers = [
        _moe_layer(cfg, common, inter, num_experts) if moe_layer(index)
        else LayerSpec(**common, mlp=dense_mlp, intermediate_size=inter)
        for index in range(num_layers)
    ]
    if model_type == "qwen2_moe":
        # the shared expert's sigmoid gate is an nn.Linear(hidden, 1) in each sparse layer
        layers = [_with_shared_gate(layer) for layer in layers]
    return layers, _llama_model_fields(cfg, common["hidden_size"])


def _llama_biases(cfg: dict) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) by the family's rule: a fixed value, a config key, or ``attention_bias``."""
    rule = _LLAMA_LIKE[cfg["model_type"]][0]
    if rule is None:
        bias = flag(cfg, "attention_bias", False)
        return bias, bias
    if isinstance(rule, str):
        return flag(cfg, rule, True), False
    return rule, False


def _llama_layer_fields(cfg: dict) -> dict:
    """The attention, norms and activation shared by every layer of a Llama-like model."""
    model_type = cfg["model_type"]
    _, norms_per_layer, qk_norm = _LLAMA_LIKE[model_type]
    hidden = int_key(cfg, "hidden_size")
    heads = int_key(cfg, "num_attention_heads")
    kv_heads = int_key(cfg, "num_key_value_heads", default=heads)
    head_dim = _head_dim(cfg, hidden, heads)
    if model_type == "phi3":
        attention = (
            Linear("qkv_proj", hidden, (heads + 2 * kv_heads) * head_dim),
            Linear("o_proj", heads * head_dim, hidden),
        )
    else:
        attention = _qkvo(hidden, heads, kv_heads, head_dim, *_llama_biases(cfg))
    pre_norms, post_norms = {"gemma2": (2, 2), "gemma3_text": (2, 2), "olmo2": (0, 2), "olmoe": (2, 0)}.get(
        model_type, (2, 0)
    )
    return dict(
        norm_kind="rms_fp32" if model_type.startswith("gemma") or model_type == "olmo2" else "rms",
        pre_norms=pre_norms,
        post_norms=post_norms,
        hidden_act=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
        attn_logit_softcap=positive_number(cfg, "attn_logit_softcapping",
                                           _FAMILY_DEFAULTS.get(model_type, {}).get("attn_logit_softcapping")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        attention=attention,
        norms=((hidden, False),) * norms_per_layer + _qk_norms(qk_norm, heads, kv_heads, head_dim),
        qk_norm=qk_norm,
    )


def _llama_dense_mlp(cfg: dict, hidden: int, inter: int) -> tuple[Linear, ...]:
    if cfg["model_type"] == "phi3":
        return (Linear("gate_up_proj", hidden, 2 * inter), Linear("down_proj", inter, hidden))
    return _gated_mlp("", hidden, inter, flag(cfg, "mlp_bias", False))


def _moe_layer(cfg: dict, common: dict, inter: int, num_experts: int) -> LayerSpec:
    """A sparse layer: stacked expert weights, a router, and the shared expert where there is one."""
    hidden = common["hidden_size"]
    expert_inter = int_key(cfg, "moe_intermediate_size", default=inter)
    shared_inter = int_key(cfg, "shared_expert_intermediate_size", default=0, minimum=0)
    return LayerSpec(
        **common,
        mlp=_gated_mlp("shared_expert.", hidden, shared_inter, False) if shared_inter else (),
        experts=(
            Linear("experts.gate_up_proj", hidden, 2 * expert_inter, count=num_experts, is_module=False),
            Linear("experts.down_proj", expert_inter, hidden, count=num_experts, is_module=False),
        ),
        # the router is a bare (num_experts, hidden) Parameter, not an nn.Linear
        router=Linear("gate", hidden, num_experts, is_module=False),
        intermediate_size=shared_inter,
        expert_intermediate_size=expert_inter,
        num_experts=num_experts,
        experts_per_token=int_key(cfg, "num_experts_per_tok"),
        shared_expert_gate=bool(shared_inter),
    )


def _llama_model_fields(cfg: dict, hidden: int) -> dict:
    model_type = cfg["model_type"]
    att_drop, hid_drop, emb_drop = dropouts(
        cfg, ("attention_dropout",), ("hidden_dropout", "resid_pdrop"), ("embd_pdrop", "embedding_dropout")
    )
    return dict(
        final_logit_softcap=positive_number(
            cfg, "final_logit_softcapping", _FAMILY_DEFAULTS.get(model_type, {}).get("final_logit_softcapping")
        ),
        tied_embeddings=flag(cfg, "tie_word_embeddings", model_type.startswith("gemma")),
        final_norm=(hidden, False),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
        embedding_dropout=emb_drop,
    )


def _with_shared_gate(layer: LayerSpec) -> LayerSpec:
    if not layer.num_experts:
        return layer
    from dataclasses import replace

    return replace(layer, mlp=layer.mlp + (Linear("shared_expert_gate", layer.hidden_size, 1),))


def _qk_norms(kind: str, heads: int, kv_heads: int, head_dim: int) -> tuple[tuple[int, bool], ...]:
    if kind == "head":
        return ((head_dim, False), (head_dim, False))
    if kind == "full":
        return ((heads * head_dim, False), (kv_heads * head_dim, False))
    return ()


def _moe_layer_fn(cfg: dict, num_experts: int, num_layers: int):
    """Which layers are sparse: Qwen-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``."""
    if not num_experts:
        return lambda index: False
    dense_only = layer_indices(cfg, "mlp_only_layers")
    step = int_key(cfg, "decoder_sparse_step", default=1)
    return lambda index: index not in dense_only and (index + 1) % step == 0


def _gpt2(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """GPT-2 (``modeling_gpt2.py``): Conv1D c_attn/c_proj/c_fc with biases, learned positions,
    LayerNorm with bias, tied head, GELU MLP of width ``n_inner`` (default 4 x n_embd)."""
    hidden = int_key(cfg, "n_embd", "hidden_size")
    heads = int_key(cfg, "n_head", "num_attention_heads")
    inter = int_key(cfg, "n_inner", default=4 * hidden)
    layer = LayerSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=per_head(hidden, heads),
        attention=(Linear("c_attn", hidden, 3 * hidden, True), Linear("attn.c_proj", hidden, hidden, True)),
        mlp=(Linear("c_fc", hidden, inter, True), Linear("mlp.c_proj", inter, hidden, True)),
        norms=((hidden, True), (hidden, True)),
        intermediate_size=inter,
        gated_mlp=False,
        norm_kind="layer",
        hidden_act=str(cfg.get("activation_function", "gelu_new")),
    )
    att_drop, hid_drop, emb_drop = dropouts(cfg, ("attn_pdrop",), ("resid_pdrop",), ("embd_pdrop",))
    extras = dict(
        tied_embeddings=flag(cfg, "tie_word_embeddings", True),
        position_embeddings=int_key(cfg, "n_positions", "max_position_embeddings"),
        final_norm=(hidden, True),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
        embedding_dropout=emb_drop,
    )
    return [layer] * int_key(cfg, "n_layer", "num_hidden_layers"), extras


def _gpt_neox(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """GPT-NeoX / Pythia (``modeling_gpt_neox.py``): fused query_key_value, LayerNorms with bias,
    plain GELU MLP, parallel residual when ``use_parallel_residual``, untied ``embed_out``."""
    hidden = int_key(cfg, "hidden_size")
    heads = int_key(cfg, "num_attention_heads")
    inter = int_key(cfg, "intermediate_size")
    bias = flag(cfg, "attention_bias", True)
    layer = LayerSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=per_head(hidden, heads),
        attention=(Linear("query_key_value", hidden, 3 * hidden, bias), Linear("dense", hidden, hidden, bias)),
        mlp=(Linear("dense_h_to_4h", hidden, inter, True), Linear("dense_4h_to_h", inter, hidden, True)),
        norms=((hidden, True), (hidden, True)),
        intermediate_size=inter,
        gated_mlp=False,
        parallel_residual=flag(cfg, "use_parallel_residual", True),
        norm_kind="layer",
        hidden_act=str(cfg.get("hidden_act", "gelu")),
    )
    att_drop, hid_drop, _ = dropouts(cfg, ("attention_dropout",), ("hidden_dropout",), ())
    extras = dict(
        tied_embeddings=flag(cfg, "tie_word_embeddings", False),
        final_norm=(hidden, True),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
    )
    return [layer] * int_key(cfg, "num_hidden_layers"), extras


def _phi(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """Phi-1/1.5/2 (``modeling_phi.py``): one LayerNorm per layer feeding attention and MLP in
    parallel, biased q/k/v/dense and fc1/fc2, biased untied lm_head."""
    hidden = int_key(cfg, "hidden_size")
    heads = int_key(cfg, "num_attention_heads")
    kv_heads = int_key(cfg, "num_key_value_heads", default=heads)
    head_dim = per_head(hidden, heads)
    inter = int_key(cfg, "intermediate_size")
    qk_norm = flag(cfg, "qk_layernorm", False)
    norms = ((hidden, True),) + (((head_dim, True), (head_dim, True)) if qk_norm else ())
    layer = LayerSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        attention=_qkvo(hidden, heads, kv_heads, head_dim, True, True),
        mlp=(Linear("fc1", hidden, inter, True), Linear("fc2", inter, hidden, True)),
        norms=norms,
        intermediate_size=inter,
        gated_mlp=False,
        parallel_residual=True,
        norm_kind="layer",
        qk_norm="head" if qk_norm else "none",
        pre_norms=1,
        hidden_act=str(cfg.get("hidden_act", "gelu_new")),
    )
    att_drop, hid_drop, emb_drop = dropouts(cfg, ("attention_dropout",), ("resid_pdrop",), ("embd_pdrop",))
    extras = dict(
        tied_embeddings=flag(cfg, "tie_word_embeddings", False),
        final_norm=(hidden, True),
        lm_head_bias=True,
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
        embedding_dropout=emb_drop,
    )
    return [layer] * int_key(cfg, "num_hidden_layers"), extras


def _falcon(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """Falcon (``modeling_falcon.py``): fused query_key_value sized by ``new_decoder_architecture``
    / ``multi_query``, parallel attention with one or two LayerNorms, plain GELU MLP."""
    if flag(cfg, "alibi", False):
        raise PlannerError("Falcon with ALiBi is not modelled analytically; use `planner simulate`")
    hidden = int_key(cfg, "hidden_size")
    heads = int_key(cfg, "num_attention_heads", "n_head")
    head_dim = per_head(hidden, heads)
    new_arch = flag(cfg, "new_decoder_architecture", False)
    if new_arch:
        kv_heads = int_key(cfg, "num_kv_heads", "n_head_kv")
    elif flag(cfg, "multi_query", True):
        kv_heads = 1
    else:
        kv_heads = heads
    bias = flag(cfg, "bias", False)
    inter = int_key(cfg, "ffn_hidden_size", default=4 * hidden)
    parallel = flag(cfg, "parallel_attn", True)
    num_ln = int_key(cfg, "num_ln_in_parallel_attn", default=2 if new_arch else 1)
    norms_count = 2 if (not parallel or num_ln == 2) else 1
    layer = LayerSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        attention=(
            Linear("query_key_value", hidden, (heads + 2 * kv_heads) * head_dim, bias),
            Linear("dense", hidden, hidden, bias),
        ),
        mlp=(Linear("dense_h_to_4h", hidden, inter, bias), Linear("dense_4h_to_h", inter, hidden, bias)),
        norms=((hidden, True),) * norms_count,
        intermediate_size=inter,
        gated_mlp=False,
        parallel_residual=parallel,
        norm_kind="layer",
        pre_norms=norms_count,
        hidden_act=str(cfg.get("activation", "gelu")),
    )
    att_drop, hid_drop, _ = dropouts(cfg, ("attention_dropout",), ("hidden_dropout",), ())
    extras = dict(
        tied_embeddings=flag(cfg, "tie_word_embeddings", True),
        final_norm=(hidden, True),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
    )
    return [layer] * int_key(cfg, "num_hidden_layers", "n_layer"), extras


BUILDERS = {**{t: _llama_like for t in _LLAMA_LIKE}, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "phi": _phi, "falcon": _falcon}
"""model_type -> builder of (decoder layers, model-level fields)."""
