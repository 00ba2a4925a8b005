"""ModelSpec: a decoder-only transformer described by what the formulas need.

Plain frozen dataclasses (built once per model, read by every formula): the model
(``ModelSpec``), its decoder layers (``LayerSpec``) and their linear layers (``Linear``).
They are built from an HF ``config.json`` by ``planner.specs.model.model_spec_from_config``.
``lora_targets`` says which of the linears peft adapts for a ``target_modules`` list.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Traits the activation inventory reads (planner.cost.memory.activations):
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


PEFT_MOE_CONVERTED: dict[str, tuple[str, ...]] = {
    "mixtral": ("gate", "w1", "w2", "w3"),
    **{t: ("gate", "gate_proj", "up_proj", "down_proj") for t in (
        "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "glm4_moe",
        "glm4_moe_lite", "hunyuan_v1_moe", "flex_olmo", "qwen3_next", "minimax", "afmoe", "cohere2_moe",
        "exaone_moe", "longcat_flash", "solar_open", "mellum", "sarvam_mla")},
}
"""Mixture-of-experts model types whose LoRA targets peft converts from the transformers-4 names to the
fused transformers-5 parameters, and the v4 leaf names the conversion takes over (peft 0.21.2
``src/peft/utils/transformers_weight_conversion.py``: ``_convert_peft_config_moe`` with transformers 5.24's
``_MODEL_TO_CONVERSION_PATTERN`` mapped to its ``mixtral`` / ``qwen2_moe`` patterns; ``qwen2_moe`` itself
is not mapped, so Qwen1.5/2-MoE experts and routers stay unadapted). For these, ``all-linear`` becomes
the attention (and other ``nn.Linear``) modules minus those names, plus ``target_parameters`` router
``gate.weight``, ``experts.gate_up_proj`` (rank and alpha doubled: gate and up fused) and
``experts.down_proj``, each wrapped by ``lora.ParamWrapper``."""


def is_dense_prenorm_gated(spec: ModelSpec) -> bool:
    """Every layer a dense pre-norm block with a gated MLP, sequential residual, no q/k norm, no post-norms
    and no logit soft-capping: the Llama-style layer the torchtune and torchtitan formulas price."""
    return not any(layer.num_experts or not layer.gated_mlp or layer.parallel_residual or layer.qk_norm != "none"
                   or layer.post_norms or layer.attn_logit_softcap for layer in spec.layers)


def lora_expert_targets(spec: ModelSpec, targets: tuple[str, ...]) -> list[tuple[int, Linear, int]]:
    """(layer index, stacked expert weight, rank multiple) that peft 0.21 wraps with ``lora.ParamWrapper``
    for ``target_modules``: under ``all-linear`` on a ``PEFT_MOE_CONVERTED`` model type, each layer's
    ``experts.gate_up_proj`` (per expert rank 2r) and ``experts.down_proj`` (rank r); none otherwise.
    Each expert gets its own A (r x in) and B (out x r).
    Named targets ``experts.gate_up_proj`` / ``experts.down_proj`` are peft ``target_parameters`` (rank r
    each, on any mixture of experts, Qwen2-MoE included)."""
    from planner.specs.vocabulary import ALL_LINEAR

    if tuple(targets) == (ALL_LINEAR,):
        if spec.model_type not in PEFT_MOE_CONVERTED:
            return []
        return [(i, lin, 2 if lin.name.endswith("gate_up_proj") else 1)
                for i, layer in enumerate(spec.layers) for lin in layer.experts]
    wanted = set(targets) & set(EXPERT_PARAMETERS)
    return [(i, lin, 1) for i, layer in enumerate(spec.layers) for lin in layer.experts if lin.name in wanted]


EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
"""LoRA target names that are stacked expert parameters (peft ``LoraConfig.target_parameters``), not modules."""


def lora_targets(spec: ModelSpec, targets: tuple[str, ...]) -> list[tuple[int, Linear]]:
    """(layer index, linear) pairs that peft adapts for ``target_modules``.

    ``all-linear`` adapts every ``nn.Linear`` of the decoder layers except the output head
    (peft ``tuners_utils._maybe_include_all_linear_layers``); named targets match the last
    component of the module name, as peft does for a list of strings. On the mixtures of experts
    of ``PEFT_MOE_CONVERTED`` peft also wraps the router (listed here: a LoRA of its (experts x hidden)
    weight) and the stacked experts (``lora_expert_targets``, priced apart), and drops the modules the
    conversion renames.
    """
    from planner.errors import PlannerError
    from planner.specs.vocabulary import ALL_LINEAR

    every = [(i, lin) for i, layer in enumerate(spec.layers) for lin in layer.linears if lin.is_module]
    if tuple(targets) == (ALL_LINEAR,):
        renamed = PEFT_MOE_CONVERTED.get(spec.model_type)
        if renamed is None:
            return every
        kept = [(i, lin) for i, lin in every if lin.name.split(".")[-1] not in renamed]
        routers = [(i, layer.router) for i, layer in enumerate(spec.layers) if layer.router is not None]
        return sorted(kept + routers, key=lambda pair: pair[0])
    wanted = set(targets)
    chosen = [(i, lin) for i, lin in every if lin.name.split(".")[-1] in wanted]
    names = sorted({lin.name.split(".")[-1] for _, lin in every})
    stacked = {lin.name for layer in spec.layers for lin in layer.experts} & set(EXPERT_PARAMETERS)
    missing = wanted - {lin.name.split(".")[-1] for _, lin in chosen} - stacked
    if missing:
        extra = f"; its stacked expert parameters: {', '.join(sorted(stacked))}" if stacked else ""
        raise PlannerError(
            f"LoRA target(s) {', '.join(sorted(missing))} not in {spec.name}; its linear modules: "
            f"{', '.join(names)} (or 'all-linear'){extra}"
        )
    return chosen
