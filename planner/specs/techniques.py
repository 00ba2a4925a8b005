"""The stack and techniques a set-up turns on, in words ("torchtune + chunked CE + activation offload").

One wording for every verb: `fit` rows say which stack and techniques make a model fit, `estimate`
names them in its header, plans and exports carry them. Reads a ``TrainingSetup`` or its JSON dict.
"""

from __future__ import annotations

_FLAGS = (
    ("optimizer_in_backward", "optimizer in backward"),
    ("activation_offload", "activation offload"),
    ("packed", "packed"),
    ("compile", "compiled"),
    ("float8", "float8"),
    ("float8_all_gather", "fp8 all-gather"),
    ("dora", "DoRA"),
    ("kbit_preparation", "k-bit preparation"),
    ("sequence_parallel", "sequence parallel"),
)
_DEGREES = (("pipeline_parallel", "PP"), ("context_parallel", "CP"), ("expert_parallel", "EP"))
_LOSSES = {"chunked": "chunked CE", "fused-linear": "fused linear CE", "compiled": "compiled CE"}


def technique_words(setup) -> list[str]:
    """The techniques beyond the stack's defaults, one short phrase each, in a fixed order."""
    get = setup.get if isinstance(setup, dict) else (lambda key, default=None: getattr(setup, key, default))
    words = []
    loss = get("loss_impl", "standard")
    if loss in _LOSSES:
        words.append(_LOSSES[loss])
    words += [word for key, word in _FLAGS if get(key, False)]
    for key, word in _DEGREES:
        degree = get(key, 1) or 1
        if degree > 1 and key == "pipeline_parallel":
            chunks = get("virtual_stages", 1) or 1
            words.append(f"PP {degree} ({get('pipeline_schedule', '1f1b')}" + (f", {chunks} chunks)" if chunks > 1 else ")"))
        elif degree > 1:
            words.append(f"{word} {degree}")
    return words


def stack_label(setup) -> str:
    """``stack + technique + ...``: "hf" alone for the plain Hugging Face stack."""
    get = setup.get if isinstance(setup, dict) else (lambda key, default=None: getattr(setup, key, default))
    return " + ".join([get("stack", "hf") or "hf", *technique_words(setup)])
