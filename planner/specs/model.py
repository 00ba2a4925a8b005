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

__all__ = ["LayerSpec", "Linear", "ModelSpec", "SUPPORTED_MODEL_TYPES", "context_length", "model_spec_from_config",
           "text_config"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(BUILDERS))

def model_spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """Build a ModelSpec from an HF config.json dict (multimodal configs: their ``text_config``)."""
    if not isinstance(cfg, dict):
        raise PlannerError(f"{name}: config must be a JSON object, got {type(cfg).__name__}")
    cfg = text_config(cfg, name)
    model_type = cfg.get("model_type")
    if not model_type:
        raise PlannerError(f"{name}: config.json has no 'model_type'; it is required to read the architecture")
    if not isinstance(model_type, str):
        raise PlannerError(f"{name}: config.json's model_type must be a string such as \"llama\", got {model_type!r}")
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


def text_config(cfg: dict, name: str = "model") -> dict:
    """The config of the language model: a multimodal config's ``text_config`` (with its model_type)."""
    if "text_config" not in cfg or (isinstance(cfg.get("model_type"), str) and cfg["model_type"] in BUILDERS):
        return cfg
    inner = cfg["text_config"]
    if not isinstance(inner, dict):
        raise PlannerError(f"{name}: config.json's text_config must be an object (the language model's config), "
                           f"got {type(inner).__name__}")
    return {**inner, "model_type": inner.get("model_type", "")}


def context_length(cfg: dict, name: str = "model") -> int:
    """The context the config declares (``max_position_embeddings`` or GPT-2's ``n_positions``); 0 when none."""
    return int_key(text_config(cfg, name), "max_position_embeddings", "n_positions", default=0, minimum=0)


def _check_heads(layer: LayerSpec, name: str) -> None:
    """Grouped-query attention shares each key/value head among an equal number of query heads."""
    if layer.num_heads % layer.num_kv_heads:
        raise PlannerError(
            f"{name}: num_attention_heads {layer.num_heads} is not a multiple of num_key_value_heads "
            f"{layer.num_kv_heads}"
        )
