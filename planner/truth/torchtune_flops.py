"""FLOPs of one torchtune micro-batch, counted by ``FlopCounterMode`` and booked per component.

Owns ``count_torchtune_flops``: one forward (the recipe's loss included) and one backward of
torchtune's model of a set-up (``planner.truth.torchtune_model``) on fake tensors, through the HF
oracle's attributing counter (``planner.truth.flop_attribution.count_step_flops``). SDPA runs its
math backend here (``sdpa_kernel(SDPBackend.MATH)``): FlopCounterMode counts nothing for CPU's
flash-style kernel, and the math path's matmuls cover the full s x s square, as the HF oracle's
eager count does. QLoRA is counted as it runs (torchao's ``LinearNF4`` dequantizes and calls
``F.linear``, which is counted). Components: the direct children of each layer (``layers.0.attn``,
``layers.0.mlp``, ``layers.0.sa_norm``, ...), ``tok_embeddings``, ``norm``, ``output`` (the tied
head's ``TiedLinear.linear`` included); ``other``: the loss. torch is imported inside functions only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.truth.flop_attribution import count_step_flops
from planner.truth.torchtune_model import torchtune_fake_model

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

_WRAPPED = "._checkpoint_wrapped_module"


def count_torchtune_flops(config: dict, setup: TrainingSetup, num_layers: int | None,
                          recipe) -> tuple[int, int, dict[str, int]]:
    """(forward FLOPs, backward FLOPs, forward+backward FLOPs per component) of one micro-batch of
    ``setup`` under ``recipe`` (a ``TorchtuneRecipe``; chunking and packing change what runs,
    offloading and the optimizer do not change FLOPs)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from planner.truth.torchtune_step import IGNORE_INDEX, make_batch, make_loss_fn

    fake_mode = FakeTensorMode()
    model = torchtune_fake_model(fake_mode, config, setup, num_layers, [])
    loss_fn = make_loss_fn(model, recipe)
    with fake_mode:
        batch = make_batch(model, setup, recipe, fake_mode)
        ignore = torch.full((setup.micro_batch, 1), IGNORE_INDEX, dtype=torch.int64)

    def forward():
        inputs = dict(batch)
        labels = torch.hstack((inputs.pop("labels")[..., 1:], ignore))
        logits = model(inputs.pop("tokens"), **inputs)
        if not isinstance(logits, list):
            labels, logits = labels.reshape(-1), logits.reshape(-1, logits.size(-1))
        return loss_fn(logits, labels)

    with sdpa_kernel(SDPBackend.MATH):
        by_component, total = count_step_flops(fake_mode, _components(model), forward, lambda loss: loss.backward())
    fwd = sum(v for (phase, _), v in by_component.items() if phase == "forward")
    by_module: dict[str, int] = {}
    for (_, comp), v in by_component.items():
        if v:
            by_module[comp] = by_module.get(comp, 0) + v
    by_module.setdefault("other", 0)
    return fwd, total - fwd, by_module


def _components(model) -> dict:
    """name -> module of the components (see the module docstring); checkpoint wrappers unnamed."""
    from torchtune.modules import TiedLinear

    out = {}
    for i, layer in enumerate(model.layers):
        inner = getattr(layer, _WRAPPED.lstrip("."), layer)
        for name, child in inner.named_children():
            out[f"layers.{i}.{name}"] = child
    for name, child in model.named_children():
        if name != "layers":
            out[name] = child
    if isinstance(model.output, TiedLinear):
        out["output"] = model.output.linear
    return out
