"""DoRA (peft ``LoraConfig(use_dora=True)``, peft 0.21): what it adds to LoRA's memory.

peft's ``DoraLinearVariant.forward`` (peft/tuners/lora/variants.py, lines 230-257) hands the base
layer's output and the adapter-dtype input to ``DoraLinearLayer.forward`` (peft/tuners/lora/dora.py,
lines 132-166), once per adapted linear:

- lines 137-138: ``lora_weight = lora_B(lora_A(eye(in))).T``, a dense in x out copy of B @ A (the
  ``eye`` itself is in x in), in the adapter's dtype;
- lines 141-145 (``get_weight_norm``, lines 86-91): the frozen weight cast to that dtype, plus
  ``scaling * lora_weight``: W + s B A materialised (out x in), then its row norms (out);
- line 153: ``magnitude / weight_norm`` saves the (detached) norm; line 165: ``(scale - 1) *
  base_result`` saves the base output (compute dtype) and ``scale * lora_result`` saves the LoRA
  output (adapter dtype, or the autocast dtype under autocast), each tokens x out.

The transients of lines 137-145 are freed when the linear returns; the two token-sized tensors of
line 165 and three out-sized vectors stay saved for backward. The magnitude (``lora_magnitude_vector``,
line 130: one per output feature, in the adapter's dtype) is trained beside A and B.
"""

from __future__ import annotations

from planner.cost import spec_facts
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


def magnitude_elems(spec: ModelSpec, setup: TrainingSetup) -> int:
    """Trainable magnitude elements: out_features per adapted linear (dora.py line 130)."""
    if not setup.dora:
        return 0
    return sum(lin.out_features for _, lin in spec_facts.lora_linears(spec, setup.lora_targets))


def magnitude_shapes(spec: ModelSpec, setup: TrainingSetup) -> list[tuple[int, int]]:
    """The magnitude vectors as trainable tensor shapes ((out, 0): vectors)."""
    if not setup.dora:
        return []
    return [(lin.out_features, 0) for _, lin in spec_facts.lora_linears(spec, setup.lora_targets)]


def saved_bytes_by_layer(spec: ModelSpec, setup: TrainingSetup, tokens, compute_bytes: float,
                         adapter_bytes: float) -> dict:
    """Per layer index: bytes DoRA saves for backward beyond LoRA (dora.py lines 153 and 165):
    the base output (compute dtype) and the LoRA output (adapter dtype; the compute dtype under
    autocast, which runs lora_B in it) per token and output feature, plus the weight norm,
    ``mag_norm_scale`` and ``mag_norm_scale - 1`` (out each, adapter dtype)."""
    if not setup.dora:
        return {}
    lora_out = compute_bytes if setup.precision == "bf16-mixed" else adapter_bytes
    out: dict = {}
    for index, lin in spec_facts.lora_linears(spec, setup.lora_targets):
        per_linear = tokens * lin.out_features * (compute_bytes + lora_out) + 3 * lin.out_features * adapter_bytes
        out[index] = out.get(index, 0) + per_linear
    return out


def forward_transient_bytes(spec: ModelSpec, setup: TrainingSetup, adapter_bytes: float) -> float:
    """The largest weight-norm transient of one adapted linear (dora.py lines 97-98 and 88-90):
    ``eye`` (in x in) and ``lora_weight`` (out x in) alive together with the cast frozen weight,
    ``scaling * lora_weight`` and their sum (out x in each), all in the adapter's dtype."""
    if not setup.dora:
        return 0.0
    return max((lin.in_features * (lin.in_features + 4 * lin.out_features) * adapter_bytes
                for _, lin in spec_facts.lora_linears(spec, setup.lora_targets)), default=0.0)
