"""ModelSpec: a decoder-only transformer described by what the formulas need, built from an HF
``config.json`` dict.

Each supported ``model_type`` has a small builder that reads the config keys the way the
matching ``transformers`` modeling file does (the file is named in each builder's docstring).
A config the builders cannot represent is rejected with a message pointing at ``planner
simulate``, which measures any architecture on fake tensors. Parameter counts derived from a
ModelSpec are tested to equal transformers' own count for every catalog entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.errors import PlannerError


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` (or stacked expert weight) of a decoder layer.

    ``count`` > 1 for expert weights stored as one 3-D parameter (transformers >= 5 fuses the
    experts of a mixture-of-experts layer); those are not ``nn.Linear`` and peft's
    ``all-linear`` does not adapt them (``is_module`` is False).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    is_module: bool = True

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features * self.count if self.bias else 0)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer. Activation formulas read the dims; parameter counts read the lists."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention: tuple[Linear, ...]
    mlp: tuple[Linear, ...]  # dense MLP, or the shared expert of an MoE layer
    experts: tuple[Linear, ...] = ()  # stacked expert weights (count = num_experts)
    router: Linear | None = None
    norms: tuple[tuple[int, bool], ...] = ()  # (dim, has_bias) of every norm in the layer
    intermediate_size: int = 0  # dense MLP width (0 when the layer has no dense MLP)
    expert_intermediate_size: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    shared_expert_gate: bool = False
    gated_mlp: bool = True
    qk_norm: str = "none"  # "none" | "head" (per head_dim) | "full" (over all heads)
    parallel_residual: bool = False
    norm_kind: str = "rms"  # "rms" (Llama: weight applied after the cast back) | "rms_fp32" (weight applied in fp32: Gemma, OLMo-2) | "layer"
    # Traits the activation inventory reads (planner.cost.activations):
    pre_norms: int = 2  # norms whose output feeds projections (saved by the projections)
    post_norms: int = 0  # norms applied to a block's output before the residual add (Gemma-2/3, OLMo-2)
    hidden_act: str = "silu"
    attn_logit_softcap: float | None = None  # Gemma-2 tanh soft-capping of attention scores
    router_fp32_logits: bool = True

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linears(self) -> tuple[Linear, ...]:
        router = (self.router,) if self.router is not None else ()
        return self.attention + self.mlp + self.experts + router

    @property
    def params(self) -> int:
        norm_params = sum(dim * (2 if bias else 1) for dim, bias in self.norms)
        return sum(lin.params for lin in self.linears) + norm_params


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    tied_embeddings: bool
    position_embeddings: int = 0  # learned absolute positions (GPT-2); 0 with rotary
    final_norm: tuple[int, bool] = (0, False)
    lm_head_bias: bool = False
    final_logit_softcap: float | None = None  # Gemma-2: tanh soft-capping of the logits
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # residual / MLP output dropout
    embedding_dropout: float = 0.0
    max_position_embeddings: int = 0
    config: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_moe(self) -> bool:
        return any(layer.num_experts for layer in self.layers)


# ----------------------------------------------------------------------------- config reading


def _require(cfg: dict, *keys: str):
    """The first present key among aliases; a clear error when none is present."""
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    raise PlannerError(f"config.json of model_type {cfg.get('model_type')!r} lacks {' / '.join(keys)}")


def _dropouts(cfg: dict, attention: tuple[str, ...], hidden: tuple[str, ...], embedding: tuple[str, ...]):
    def first(keys):
        return float(next((cfg[k] for k in keys if cfg.get(k) is not None), 0.0))

    return first(attention), first(hidden), first(embedding)


def _head_dim(cfg: dict, hidden: int, heads: int) -> int:
    head_dim = cfg.get("head_dim")
    return int(head_dim) if head_dim else hidden // heads


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
    qkv_bias_rule, norms_per_layer, qk_norm = _LLAMA_LIKE[model_type]
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = _head_dim(cfg, hidden, heads)
    inter = int(cfg.get("intermediate_size") or 0)
    if qkv_bias_rule is None:
        qkv_bias = bool(cfg.get("attention_bias", False))
        o_bias = qkv_bias
    elif isinstance(qkv_bias_rule, str):
        qkv_bias, o_bias = bool(cfg.get(qkv_bias_rule, True)), False
    else:
        qkv_bias, o_bias = qkv_bias_rule, False
    mlp_bias = bool(cfg.get("mlp_bias", False))
    num_layers = int(_require(cfg, "num_hidden_layers"))

    if model_type == "phi3":
        attention = (
            Linear("qkv_proj", hidden, (heads + 2 * kv_heads) * head_dim),
            Linear("o_proj", heads * head_dim, hidden),
        )
        dense_mlp = (Linear("gate_up_proj", hidden, 2 * inter), Linear("down_proj", inter, hidden))
    else:
        attention = _qkvo(hidden, heads, kv_heads, head_dim, qkv_bias, o_bias)
        dense_mlp = _gated_mlp("", hidden, inter, mlp_bias)

    num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    moe_layer = _moe_layer_fn(cfg, num_experts, num_layers)
    pre_norms, post_norms = {"gemma2": (2, 2), "gemma3_text": (2, 2), "olmo2": (0, 2), "olmoe": (2, 0)}.get(
        model_type, (2, 0)
    )
    common = dict(
        norm_kind="rms_fp32" if model_type.startswith("gemma") or model_type == "olmo2" else "rms",
        pre_norms=pre_norms,
        post_norms=post_norms,
        hidden_act=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
        attn_logit_softcap=cfg.get("attn_logit_softcapping", _FAMILY_DEFAULTS.get(model_type, {}).get("attn_logit_softcapping")),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        attention=attention,
        norms=((hidden, False),) * norms_per_layer + _qk_norms(qk_norm, heads, kv_heads, head_dim),
        qk_norm=qk_norm,
    )
    layers = []
    for index in range(num_layers):
        if moe_layer(index):
            expert_inter = int(cfg.get("moe_intermediate_size") or inter)
            shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
            layers.append(
                LayerSpec(
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
                    experts_per_token=int(_require(cfg, "num_experts_per_tok")),
                    shared_expert_gate=bool(shared_inter),
                )
            )
        else:
            layers.append(LayerSpec(**common, mlp=dense_mlp, intermediate_size=inter))
    if model_type == "qwen2_moe":
        # the shared expert's sigmoid gate is an nn.Linear(hidden, 1) in each sparse layer
        layers = [_with_shared_gate(layer) for layer in layers]
    att_drop, hid_drop, emb_drop = _dropouts(
        cfg, ("attention_dropout",), ("hidden_dropout", "resid_pdrop"), ("embd_pdrop", "embedding_dropout")
    )
    extras = dict(
        final_logit_softcap=cfg.get(
            "final_logit_softcapping", _FAMILY_DEFAULTS.get(model_type, {}).get("final_logit_softcapping")
        ),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", model_type.startswith("gemma"))),
        final_norm=(hidden, False),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
        embedding_dropout=emb_drop,
    )
    return layers, extras


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
    dense_only = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step") or 1)
    return lambda index: index not in dense_only and (index + 1) % step == 0


def _gpt2(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """GPT-2 (``modeling_gpt2.py``): Conv1D c_attn/c_proj/c_fc with biases, learned positions,
    LayerNorm with bias, tied head, GELU MLP of width ``n_inner`` (default 4 x n_embd)."""
    hidden = int(_require(cfg, "n_embd", "hidden_size"))
    heads = int(_require(cfg, "n_head", "num_attention_heads"))
    inter = int(cfg.get("n_inner") or 4 * hidden)
    layer = LayerSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        attention=(Linear("c_attn", hidden, 3 * hidden, True), Linear("attn.c_proj", hidden, hidden, True)),
        mlp=(Linear("c_fc", hidden, inter, True), Linear("mlp.c_proj", inter, hidden, True)),
        norms=((hidden, True), (hidden, True)),
        intermediate_size=inter,
        gated_mlp=False,
        norm_kind="layer",
        hidden_act=str(cfg.get("activation_function", "gelu_new")),
    )
    att_drop, hid_drop, emb_drop = _dropouts(cfg, ("attn_pdrop",), ("resid_pdrop",), ("embd_pdrop",))
    extras = dict(
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        position_embeddings=int(_require(cfg, "n_positions", "max_position_embeddings")),
        final_norm=(hidden, True),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
        embedding_dropout=emb_drop,
    )
    return [layer] * int(_require(cfg, "n_layer", "num_hidden_layers")), extras


def _gpt_neox(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """GPT-NeoX / Pythia (``modeling_gpt_neox.py``): fused query_key_value, LayerNorms with bias,
    plain GELU MLP, parallel residual when ``use_parallel_residual``, untied ``embed_out``."""
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    inter = int(_require(cfg, "intermediate_size"))
    bias = bool(cfg.get("attention_bias", True))
    layer = LayerSpec(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        attention=(Linear("query_key_value", hidden, 3 * hidden, bias), Linear("dense", hidden, hidden, bias)),
        mlp=(Linear("dense_h_to_4h", hidden, inter, True), Linear("dense_4h_to_h", inter, hidden, True)),
        norms=((hidden, True), (hidden, True)),
        intermediate_size=inter,
        gated_mlp=False,
        parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        norm_kind="layer",
        hidden_act=str(cfg.get("hidden_act", "gelu")),
    )
    att_drop, hid_drop, _ = _dropouts(cfg, ("attention_dropout",), ("hidden_dropout",), ())
    extras = dict(
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        final_norm=(hidden, True),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
    )
    return [layer] * int(_require(cfg, "num_hidden_layers")), extras


def _phi(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """Phi-1/1.5/2 (``modeling_phi.py``): one LayerNorm per layer feeding attention and MLP in
    parallel, biased q/k/v/dense and fc1/fc2, biased untied lm_head."""
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = hidden // heads
    inter = int(_require(cfg, "intermediate_size"))
    qk_norm = bool(cfg.get("qk_layernorm", False))
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
    att_drop, hid_drop, emb_drop = _dropouts(cfg, ("attention_dropout",), ("resid_pdrop",), ("embd_pdrop",))
    extras = dict(
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        final_norm=(hidden, True),
        lm_head_bias=True,
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
        embedding_dropout=emb_drop,
    )
    return [layer] * int(_require(cfg, "num_hidden_layers")), extras


def _falcon(cfg: dict) -> tuple[list[LayerSpec], dict]:
    """Falcon (``modeling_falcon.py``): fused query_key_value sized by ``new_decoder_architecture``
    / ``multi_query``, parallel attention with one or two LayerNorms, plain GELU MLP."""
    if cfg.get("alibi"):
        raise PlannerError("Falcon with ALiBi is not modelled analytically; use `planner simulate`")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads", "n_head"))
    head_dim = hidden // heads
    new_arch = bool(cfg.get("new_decoder_architecture", False))
    if new_arch:
        kv_heads = int(_require(cfg, "num_kv_heads", "n_head_kv"))
    elif cfg.get("multi_query", True):
        kv_heads = 1
    else:
        kv_heads = heads
    bias = bool(cfg.get("bias", False))
    inter = int(cfg.get("ffn_hidden_size") or 4 * hidden)
    parallel = bool(cfg.get("parallel_attn", True))
    num_ln = cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
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
    att_drop, hid_drop, _ = _dropouts(cfg, ("attention_dropout",), ("hidden_dropout",), ())
    extras = dict(
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        final_norm=(hidden, True),
        attention_dropout=att_drop,
        hidden_dropout=hid_drop,
    )
    return [layer] * int(_require(cfg, "num_hidden_layers", "n_layer")), extras


_BUILDERS = {**{t: _llama_like for t in _LLAMA_LIKE}, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "phi": _phi, "falcon": _falcon}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def model_spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """Build a ModelSpec from an HF config.json dict (multimodal configs: their ``text_config``)."""
    if not isinstance(cfg, dict):
        raise PlannerError(f"{name}: config must be a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and cfg.get("model_type") not in _BUILDERS:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", "")}
    model_type = cfg.get("model_type")
    if not model_type:
        raise PlannerError(f"{name}: config.json has no 'model_type'; it is required to read the architecture")
    builder = _BUILDERS.get(model_type)
    if builder is None:
        raise PlannerError(
            f"{name}: model_type {model_type!r} is not modelled analytically "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); `planner simulate` measures any HF architecture"
        )
    layers, extras = builder(cfg)
    if not layers:
        raise PlannerError(f"{name}: the config has no layers")
    for key in ("vocab_size",):
        _require(cfg, key)
    return ModelSpec(
        name=name,
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=layers[0].hidden_size,
        layers=tuple(layers),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0),
        config=cfg,
        **extras,
    )
