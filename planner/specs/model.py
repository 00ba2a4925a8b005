"""Building a ``ModelSpec`` from an HF ``config.json`` dict, and checking that it makes sense.

Each supported ``model_type`` has a builder in ``planner.specs.families``. A config the builders
cannot represent is rejected with a message pointing at ``planner simulate``, which measures any
architecture on fake tensors; a config whose numbers cannot describe a transformer (no heads,
a hidden size the heads do not divide, ...) is rejected with the key at fault. Parameter counts
derived from a ModelSpec are tested to equal transformers' own count for every catalog entry.
"""

from __future__ import annotations

from planner.errors import PlannerError
from planner.specs.architecture import LayerSpec, Linear, ModelSpec
from planner.specs.config_values import int_key
from planner.specs.families import BUILDERS

__all__ = ["LayerSpec", "Linear", "ModelSpec", "SUPPORTED_MODEL_TYPES", "model_spec_from_config"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(BUILDERS))

def model_spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """Build a ModelSpec from an HF config.json dict (multimodal configs: their ``text_config``)."""
    if not isinstance(cfg, dict):
        raise PlannerError(f"{name}: config must be a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and cfg.get("model_type") not in BUILDERS:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", "")}
    model_type = cfg.get("model_type")
    if not model_type:
        raise PlannerError(f"{name}: config.json has no 'model_type'; it is required to read the architecture")
    builder = BUILDERS.get(model_type)
    if builder is None:
        raise PlannerError(
            f"{name}: model_type {model_type!r} is not modelled analytically "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); `planner simulate` measures any HF architecture"
        )
    layers, extras = builder(cfg)
    if not layers:
        raise PlannerError(f"{name}: the config has no layers")
    _check_heads(layers[0], name)
    return ModelSpec(
        name=name,
        model_type=model_type,
        vocab_size=int_key(cfg, "vocab_size"),
        hidden_size=layers[0].hidden_size,
        layers=tuple(layers),
        max_position_embeddings=int_key(cfg, "max_position_embeddings", "n_positions", default=0, minimum=0),
        config=cfg,
        **extras,
    )


def _check_heads(layer: LayerSpec, name: str) -> None:
    """Grouped-query attention shares each key/value head among an equal number of query heads."""
    if layer.num_heads % layer.num_kv_heads:
        raise PlannerError(
            f"{name}: num_attention_heads {layer.num_heads} is not a multiple of num_key_value_heads "
            f"{layer.num_kv_heads}"
        )
