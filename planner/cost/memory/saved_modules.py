"""peft ``modules_to_save`` beside LoRA: the embedding and the head trained in full.

peft wraps each named module in a ``ModulesToSaveWrapper`` that keeps the frozen original and trains
a copy of it, in the dtype of the module (the adapters' fp32 upcast does not touch it). So each
saved module adds, on top of the LoRA set-up, its weights once more, their gradient and optimizer
states at that dtype, and the optimizer step's temporaries; and it changes what the step keeps:
- a trainable embedding makes the first layer's input require a gradient, so the first norm keeps
  its input (with a frozen embedding it keeps nothing);
- a trainable head keeps its input for its weight gradient, and its weight gradient appears in the
  middle of backward, after the loss's temporaries have given way to the gradient of the logits;
  that moment is the backward's peak when the sequence is short against the vocabulary.
Checked against peft 0.21 on fake tensors (Llama-3.1-8B and Qwen2.5-0.5B layers; see the oracle panel).
"""

from __future__ import annotations

import numpy as np

from planner.cost.memory import activations as act
from planner.cost.memory.states import dtype_layout, optimizer_state_elems, optimizer_temp_bytes
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

SAVABLE = ("embed_tokens", "lm_head")
"""The modules whose training the formulas price (the names of Llama-style HF models)."""


def saved_module_params(spec: ModelSpec, setup: TrainingSetup) -> dict[str, int]:
    """Parameters of each module of ``modules_to_save`` (vocabulary x hidden for either)."""
    if setup.modules_to_save and setup.num_gpus > 1:
        from planner.errors import PlannerError

        raise PlannerError("modules_to_save is priced on one GPU (how ZeRO shards the saved copies is not): "
                           "use --num-gpus 1 or leave --modules-to-save out")
    unknown = [name for name in setup.modules_to_save if name not in SAVABLE]
    if unknown:
        from planner.errors import PlannerError

        raise PlannerError(f"modules_to_save {', '.join(unknown)} is not priced: use {' or '.join(SAVABLE)}")
    return {name: spec.vocab_size * spec.hidden_size for name in setup.modules_to_save}


def saved_modules_extra_bytes(spec: ModelSpec, setup: TrainingSetup, tokens, loss_temporaries) -> dict:
    """Bytes each phase adds for ``setup.modules_to_save`` (zero without it), per GPU, before sharding.

    ``loss_temporaries``: the loss's bytes at the start of backward (``ActivationMemory``), which
    the head's weight-gradient moment no longer holds but for the gradient of the logits."""
    params = saved_module_params(spec, setup)
    if not params or setup.method == "full":
        zero = 0 * np.asarray(tokens, dtype=np.float64)
        return {"forward": zero, "backward": zero, "optimizer": zero}
    w = dtype_layout(setup).weight
    total = float(sum(params.values()))
    shapes = tuple((spec.vocab_size, spec.hidden_size) for _ in params)
    states = optimizer_state_elems(setup, total, shapes) * w
    copy_and_states = total * w + states
    temporaries = optimizer_temp_bytes(setup, np.asarray(total), shapes, w)
    first_norm = (act.norm_saved_bytes(spec.layers[0], act.PRECISION[setup.precision].residual, trainable=False)
                  if "embed_tokens" in params else 0)
    head_input = spec.hidden_size * w if "lm_head" in params else 0
    at_loss = copy_and_states + tokens * (first_norm + head_input)
    backward = at_loss
    if "lm_head" in params:
        logits_grad = tokens * spec.vocab_size * w
        head_moment = copy_and_states + tokens * first_norm + params["lm_head"] * w - (loss_temporaries - logits_grad)
        backward = np.maximum(at_loss, head_moment)
    return {"forward": copy_and_states + tokens * first_norm, "backward": backward,
            "optimizer": copy_and_states + total * w + temporaries + 0 * np.asarray(tokens, dtype=np.float64)}
