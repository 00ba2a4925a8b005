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


def lora_targets(spec: ModelSpec, targets: tuple[str, ...]) -> list[tuple[int, Linear]]:
    """(layer index, linear) pairs that peft adapts for ``target_modules``.

    ``all-linear`` adapts every ``nn.Linear`` of the decoder layers except the output head
    (peft ``tuners_utils._maybe_include_all_linear_layers``); named targets match the last
    component of the module name, as peft does for a list of strings.
    """
    from planner.errors import PlannerError
    from planner.specs.vocabulary import ALL_LINEAR

    every = [(i, lin) for i, layer in enumerate(spec.layers) for lin in layer.linears if lin.is_module]
    if tuple(targets) == (ALL_LINEAR,):
        return every
    wanted = set(targets)
    chosen = [(i, lin) for i, lin in every if lin.name.split(".")[-1] in wanted]
    names = sorted({lin.name.split(".")[-1] for _, lin in every})
    missing = wanted - {lin.name.split(".")[-1] for _, lin in chosen}
    if missing:
        raise PlannerError(
            f"LoRA target(s) {', '.join(sorted(missing))} not in {spec.name}; its linear modules: "
            f"{', '.join(names)} (or 'all-linear')"
        )
    return chosen
