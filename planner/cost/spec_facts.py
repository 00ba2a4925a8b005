"""What the formulas read from a model's layer lists again and again, computed once per spec.

Parameter counts, the linears LoRA adapts, the shapes of the trainable tensors and the
projections' sizes are sums over every layer. A search asks for them
for each of hundreds of set-ups of the same model, so they are kept per ``ModelSpec`` object:
specs are frozen, so a fact never goes stale. The cache is keyed by the object's identity and
holds the object, so an identity is never reused while its facts are kept; it is emptied when it
holds ``MAX_SPECS`` models. Every value equals the uncached function's (``planner.cost.params``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from planner.cost.params import ParamCounts, count_params, lora_targets
from planner.specs.model import LayerSpec, Linear, ModelSpec

MAX_SPECS = 256
"""Models whose facts are kept at once (a plan holds a few dozen: the pre-training size ladder)."""

_FACTS: dict[int, tuple[ModelSpec, dict]] = {}


def cached(spec: ModelSpec, key: tuple, compute: Callable[[], object]):
    """``compute()`` once per (spec object, key); later calls return the same object (do not mutate it)."""
    entry = _FACTS.get(id(spec))
    if entry is None or entry[0] is not spec:
        if len(_FACTS) >= MAX_SPECS:
            _FACTS.clear()
        entry = (spec, {})
        _FACTS[id(spec)] = entry
    facts = entry[1]
    if key not in facts:
        facts[key] = compute()
    return facts[key]


def shared(cache: dict | None, key: tuple, compute: Callable[[], object]):
    """``compute()`` once per ``key`` in a caller's ``cache`` dict (None: no cache). The step time
    and memory formulas file what several set-ups share under keys of what it depends on."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def setup_key(kind: str, setup, ignored: frozenset[str]) -> tuple:
    """A ``shared`` key: ``kind`` and every field of ``setup`` except the ``ignored`` ones (those
    the part does not read). A field added to the set-up later is in every key until a part is
    shown not to read it, so nothing is shared across values that may matter."""
    return (kind, *((name, getattr(setup, name)) for name in type(setup).model_fields if name not in ignored))


def param_counts(spec: ModelSpec) -> ParamCounts:
    """``planner.cost.params.count_params``, once per spec."""
    return cached(spec, ("counts",), lambda: count_params(spec))


def distinct_layers(spec: ModelSpec) -> tuple[tuple[LayerSpec, int], ...]:
    """(layer, how many times it occurs) in order of first occurrence (``collections.Counter``)."""
    return cached(spec, ("distinct_layers",), lambda: tuple(Counter(spec.layers).items()))


def lora_linears(spec: ModelSpec, targets: tuple[str, ...]) -> tuple[tuple[int, Linear], ...]:
    """``planner.cost.params.lora_targets`` (layer index, linear), once per spec and target list."""
    return cached(spec, ("lora", tuple(targets)), lambda: tuple(lora_targets(spec, targets)))


def lora_params_per_rank(spec: ModelSpec, targets: tuple[str, ...]) -> int:
    """Adapter parameters per unit of rank: sum of in + out over the adapted linears
    (``planner.cost.params.lora_params`` is this times the rank)."""
    return cached(spec, ("lora_per_rank", tuple(targets)),
                  lambda: sum(lin.in_features + lin.out_features for _, lin in lora_linears(spec, targets)))


def full_tensor_shapes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of every parameter tensor of full training (cols 0 for vectors): embeddings,
    the untied head, each linear's weight (one per stacked expert) and bias, each norm's weight and bias."""

    def shapes() -> tuple[tuple[int, int], ...]:
        out = [(spec.vocab_size, spec.hidden_size)]
        if not spec.tied_embeddings:
            out.append((spec.vocab_size, spec.hidden_size))
        for layer in spec.layers:
            for lin in layer.linears:
                out += [(lin.out_features, lin.in_features)] * lin.count
                if lin.bias:
                    out.append((lin.out_features * lin.count, 0))
            out += [(dim, 0) for dim, bias in layer.norms for _ in range(2 if bias else 1)]
        return tuple(out)

    return cached(spec, ("full_shapes",), shapes)


def projection_params(spec: ModelSpec) -> int:
    """Weights of every linear of the decoder layers (what QLoRA stores in NF4)."""
    return cached(spec, ("projections",),
                  lambda: sum(lin.weight_params for layer in spec.layers for lin in layer.linears))


def largest_projection(spec: ModelSpec) -> int:
    """Weights of the largest linear of the decoder layers."""
    return cached(spec, ("largest_projection",),
                  lambda: max(lin.weight_params for layer in spec.layers for lin in layer.linears))
