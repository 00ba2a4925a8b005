"""Parameter counts by group, equal to transformers' own count (tested for every catalog entry).

Counting convention: tied input and output embeddings count once, as ``sum(p.numel() for p in
model.parameters())`` does. Buffers (rotary frequencies) are not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs.architecture import lora_expert_targets, lora_targets
from planner.specs.model import Linear, ModelSpec

__all__ = ["ParamCounts", "count_params", "expert_lora_params_per_rank", "expert_lora_shapes", "lora_params",
           "lora_targets"]


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token (+ learned position) embeddings
    attention: int  # q/k/v/o projections and their biases, all layers
    mlp: int  # dense MLPs and shared experts, all layers
    experts: int  # routed experts and routers, all layers
    norms: int  # every norm weight and bias, including the final norm
    lm_head: int  # 0 when tied to the input embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.experts + self.norms + self.lm_head

    @property
    def non_embedding(self) -> int:
        """Kaplan et al. 2020's N: everything but the embeddings and the output head."""
        return self.attention + self.mlp + self.experts + self.norms

    def active(self, spec: ModelSpec) -> int:
        """Parameters a token passes through: routed experts scaled by top-k / num_experts."""
        routed = 0
        for layer in spec.layers:
            if layer.num_experts:
                expert_weights = sum(lin.params for lin in layer.experts)
                routed += expert_weights - expert_weights * layer.experts_per_token // layer.num_experts
        return self.total - routed


def _sum(linears: tuple[Linear, ...]) -> int:
    return sum(lin.params for lin in linears)


def count_params(spec: ModelSpec) -> ParamCounts:
    """Exact parameter count by group, from the layer lists of the ModelSpec."""
    vocab, hidden = spec.vocab_size, spec.hidden_size
    norm_dim, norm_bias = spec.final_norm
    return ParamCounts(
        embedding=vocab * hidden + spec.position_embeddings * hidden,
        attention=sum(_sum(layer.attention) for layer in spec.layers),
        mlp=sum(_sum(layer.mlp) for layer in spec.layers),
        experts=sum(_sum(layer.experts) + (layer.router.params if layer.router else 0) for layer in spec.layers),
        norms=sum(dim * (2 if bias else 1) for layer in spec.layers for dim, bias in layer.norms)
        + norm_dim * (2 if norm_bias else 1),
        lm_head=0 if spec.tied_embeddings else vocab * hidden + (vocab if spec.lm_head_bias else 0),
    )


def expert_lora_params_per_rank(spec: ModelSpec, targets: tuple[str, ...]) -> int:
    """Adapter parameters per unit of rank on the stacked experts peft wraps (``lora_expert_targets``):
    per expert A (m r x in) and B (out x m r), m = 2 for the fused gate_up (peft 0.21.2 doubles its rank)."""
    return sum(mult * lin.count * (lin.in_features + lin.out_features)
               for _, lin, mult in lora_expert_targets(spec, targets))


def expert_lora_shapes(spec: ModelSpec, targets: tuple[str, ...], rank: int) -> list[tuple[int, int]]:
    """Shapes of those expert adapters as peft stores them: A (experts x m r, in), B (out, experts x m r)."""
    shapes = []
    for _, lin, mult in lora_expert_targets(spec, targets):
        shapes += [(lin.count * mult * rank, lin.in_features), (lin.out_features, lin.count * mult * rank)]
    return shapes


def lora_params(spec: ModelSpec, targets: tuple[str, ...], rank):
    """Adapter parameters: A (rank x in) and B (out x rank) per adapted linear (Hu et al. 2021), and
    those peft puts on stacked expert weights (``expert_lora_params_per_rank``)."""
    per_rank = sum(lin.in_features + lin.out_features for _, lin in lora_targets(spec, targets))
    return (per_rank + expert_lora_params_per_rank(spec, targets)) * rank
