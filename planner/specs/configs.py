"""HF ``config.json`` dicts: how many decoder layers a config has, and a copy with fewer.

Pure Python: the oracle (``planner.truth.trace``) and calibration build reduced-depth models
from these copies (memory is linear in layers beyond the embeddings, so a few layers are a fair
test and trace in seconds).
"""

from __future__ import annotations

import copy

# config keys that give the number of decoder layers, by model family
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# list-valued config keys that hold layer *indices* (not one entry per layer): filtered to < n
_LAYER_INDEX_KEYS = (
    "mlp_only_layers",
    "moe_layers",
    "full_attn_idxs",
    "attn_layer_indices",
    "local_layer_ids",
    "cross_attention_layers",
    "rope_scaling_layers",
    "kv_source_layers",
)
# nested configs that carry their own layer count (multimodal wrappers)
_NESTED_KEYS = ("text_config", "language_config", "llm_config")


# --------------------------------------------------------------------------- config handling


def num_layers_of(config: dict) -> int:
    """Decoder layers of an HF config dict (``num_hidden_layers``, ``n_layer``, ...)."""
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    for key in _NESTED_KEYS:
        if isinstance(config.get(key), dict):
            return num_layers_of(config[key])
    raise ValueError(f"config has no layer count; looked for {', '.join(_LAYER_KEYS)}")


def reduce_layers(config: dict, num_layers: int) -> dict:
    """A deep copy of ``config`` with ``num_layers`` decoder layers.

    Sets the layer-count key (``num_hidden_layers``, ``n_layer``, ``num_layers``, ``n_layers``),
    truncates every per-layer list (a list whose key contains ``layer`` and whose length is the
    original layer count: ``layer_types``, ``mlp_layer_types``, ``no_rope_layers``,
    ``layers_block_type``, ``*_per_layer``, ...) to its first ``num_layers`` entries, and keeps
    only the indices below ``num_layers`` in lists of layer indices (``mlp_only_layers``,
    ``moe_layers``, ...). Integer knobs such as ``first_k_dense_replace``, ``decoder_sparse_step``
    or ``max_window_layers`` are left as they are. Nested ``text_config`` dicts are reduced too.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out = copy.deepcopy(config)
    _reduce_in_place(out, num_layers)
    return out


def _reduce_in_place(cfg: dict, n: int) -> None:
    orig = None
    for key in _LAYER_KEYS:
        if isinstance(cfg.get(key), int):
            orig = cfg[key]
            if n > orig:
                raise ValueError(f"num_layers={n} is more than the config's {key}={orig}")
            cfg[key] = n
    if orig is not None:
        for key, value in list(cfg.items()):
            if not isinstance(value, list):
                continue
            if key in _LAYER_INDEX_KEYS:
                cfg[key] = [i for i in value if not isinstance(i, int) or i < n]
            elif "layer" in key.lower() and len(value) == orig:
                cfg[key] = value[:n]
    for key in _NESTED_KEYS:
        if isinstance(cfg.get(key), dict):
            _reduce_in_place(cfg[key], n)
