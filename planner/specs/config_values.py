"""Numbers read out of an HF ``config.json``: integers and probabilities checked on the way in,
so that a config with zero heads or ``num_hidden_layers: "twenty"`` is a one-line error naming
the key instead of an exception deep inside a formula.
"""

from __future__ import annotations

from planner.errors import PlannerError

MAX_DIMENSION = 2**24
"""Largest layer count, width, head count or vocabulary accepted from a config: far beyond any
real model (Llama-3.1-405B: width 16384, vocabulary 128256) and small enough that products of
dimensions stay exact in float64 and int64 arithmetic."""


def int_key(cfg: dict, *keys: str, default: int | None = None, minimum: int = 1) -> int:
    """The first present key among aliases, as an integer in [minimum, MAX_DIMENSION]; a one-line
    error naming the key when it is not (a string, a fraction, zero heads, a negative width)."""
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value in (
                float("inf"), float("-inf")) or value != int(value):
            raise PlannerError(f"config.json: {key} must be an integer, got {value!r}")
        if not minimum <= value <= MAX_DIMENSION:
            raise PlannerError(f"config.json: {key} must be between {minimum} and {MAX_DIMENSION}, got {int(value)}")
        return int(value)
    if default is not None:
        return default
    raise PlannerError(f"config.json of model_type {cfg.get('model_type')!r} lacks {' / '.join(keys)}")


def per_head(hidden: int, heads: int) -> int:
    """Width of one head when the config gives none: the hidden size must split evenly."""
    if hidden % heads:
        raise PlannerError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return hidden // heads


def dropouts(cfg: dict, attention: tuple[str, ...], hidden: tuple[str, ...], embedding: tuple[str, ...]):
    """(attention, hidden, embedding) dropout probabilities: the first key present of each alias list."""

    def first(keys):
        key = next((k for k in keys if cfg.get(k) is not None), None)
        if key is None:
            return 0.0
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise PlannerError(f"config.json: {key} must be a probability in [0, 1), got {value!r}")
        return float(value)

    return first(attention), first(hidden), first(embedding)


def flag(cfg: dict, key: str, default: bool) -> bool:
    """A true/false switch of the config: a JSON boolean (null: the default). A string such as
    "false" is an error, not a truthy value."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PlannerError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def positive_number(cfg: dict, key: str, default: float | None) -> float | None:
    """An optional positive, finite number (a soft-capping constant); null or absent: the default."""
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise PlannerError(f"config.json: {key} must be a positive number or null, got {value!r}")
    return float(value)


def layer_indices(cfg: dict, key: str) -> set[int]:
    """A list of layer indices (Qwen-MoE's ``mlp_only_layers``); absent or null: none."""
    value = cfg.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PlannerError(f"config.json: {key} must be a list of layer indices, got {value!r}")
    return set(value)
