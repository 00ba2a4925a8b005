"""Training memory of the torchtitan stack by phase: one step of torchtitan 0.3.0's ``Trainer`` on one GPU.

Owns the composition of one step (``torchtitan_phases_and_components``) from the per-tensor formulas
of ``planner.cost.memory.torchtitan_tensors``. torchtitan always applies FSDP2 (``parallelize_llama`` calls
``apply_fsdp_to_decoder`` even at shard degree 1, for its ``MixedPrecisionPolicy``), so every GPU
holds fp32 parameter shards, fp32 gradient shards and fp32 AdamW moments (``fused`` AdamW, the
default ``implementation``: no step temporaries), each divided by the shard degree (``zero=3``:
the data-parallel GPUs; ``zero=0``: replicated), plus the blocks' unsharded compute-dtype
parameters as FSDP2 gathers them. ``Trainer.train_step`` zeroes gradients with
``set_to_none=config.training.disable_cuda_graphs`` (False by default in 0.3.0: the forward and
backward are captured in a CUDA graph), so the gradient shards stay allocated through the forward.
Phases as ``planner.cost.memory.phases``: forward (at the loss, or inside the last block), backward (at
the loss's backward, the head's, a recomputed block's or the embedding's), optimizer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import torchtitan_tensors as tt
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

GRADIENTS_KEPT_ACROSS_STEPS = True
"""torchtitan 0.3.0 ``trainer.py``: ``self.optimizers.zero_grad(set_to_none=
self.config.training.disable_cuda_graphs)`` with ``disable_cuda_graphs: bool = False``
(``config/configs.py``): gradients are zeroed in place, never freed."""


def _arr(x):
    return np.asarray(x, dtype=np.float64)


class TitanStates(NamedTuple):
    """Bytes per GPU that do not grow with the tokens, and the sizes FSDP gathers."""

    weights: float  # fp32 parameter shards
    gradients: float  # fp32 gradient shards
    states: float  # AdamW's two fp32 moments
    buffers: object  # every block's RoPE cache
    layer_params: float  # the largest block's parameters (what FSDP2 gathers at a time)
    table_params: float  # one V x h table (the embedding's or the head's FSDP unit)
    shard: int


def titan_states(spec: ModelSpec, setup: TrainingSetup, s) -> TitanStates:
    """Sharded states (``stacks_torchtitan.SHARD_BYTES`` each) and FSDP2's unit sizes."""
    shard = setup.data_parallel if setup.zero == 3 else 1
    total = spec_facts.param_counts(spec).total
    per_param = tt.SHARD_BYTES / shard
    buffers = sum(tt.rope_cache_bytes(layer, s) for layer in spec.layers)
    largest = max(layer.params for layer in spec.layers)
    return TitanStates(total * per_param, total * per_param, 2 * total * per_param, buffers, largest,
                       spec.vocab_size * spec.hidden_size, shard)


def _saved(spec: ModelSpec, setup: TrainingSetup, device: str) -> tuple[float, float, float]:
    """(every block's kept bytes per token, the largest block's full set per token, the head's)."""
    kw = dict(precision=setup.precision, device=device, compiled=setup.compile)
    kept = sum(tt.layer_saved_bytes_per_token(layer, checkpointing=setup.checkpointing, **kw) for layer in spec.layers)
    full = max(tt.layer_saved_bytes_per_token(layer, checkpointing="none", **kw) for layer in spec.layers)
    return kept, full, tt.head_saved_bytes_per_token(spec, setup.precision, device)


def torchtitan_phases(spec: ModelSpec, setup: TrainingSetup, st: TitanStates, tokens, device: str = "cuda") -> dict:
    """Live bytes on one GPU at the peak of forward, backward and the optimizer step."""
    w = tt.compute_bytes(setup.precision)
    kept, full, head = _saved(spec, setup, device)
    loss = tt.loss_extra_bytes_per_token(spec, setup.precision)
    fsdp = tt.fsdp_layer_transient_bytes(st.layer_params, st.shard, w)
    grads = st.gradients if (GRADIENTS_KEPT_ACROSS_STEPS or setup.grad_accum > 1) else 0.0
    static = st.weights + st.states + st.buffers + grads
    saved = tokens * (kept + head)
    head_unit = w * st.table_params  # [norm, lm_head] stay gathered from the forward into the backward
    hidden_grads = 2 * w * spec.hidden_size * tokens  # the gradient reaching a block and the one it makes
    forward = static + np.maximum(saved + tokens * loss["forward"] + head_unit,
                                  tokens * kept + fsdp["forward"] + head_unit)
    backward = static + saved + tokens * loss["backward"] + head_unit + w * st.layer_params
    head_backward = (static + saved + tokens * w * spec.vocab_size + 2 * head_unit
                     + tt.REDUCE_BYTES * st.table_params * (1 + 1 / st.shard) + w * st.layer_params)
    block = static + tokens * kept + fsdp["backward"] + hidden_grads
    if setup.checkpointing != "none":
        block = block + tokens * full  # the last block recomputed beside the kept inputs
    embedding = (st.weights + st.states + st.buffers + st.gradients + 2 * w * st.table_params
                 + tt.REDUCE_BYTES * st.table_params * (1 + 1 / st.shard) + w * spec.hidden_size * tokens)
    backward = np.maximum.reduce([_arr(backward), _arr(head_backward), _arr(block), _arr(embedding + 0 * tokens)])
    optimizer = st.weights + st.gradients + st.states + st.buffers + _step_temporaries(setup, st)
    return {"forward": forward, "backward": backward, "optimizer": optimizer + 0 * tokens}


def _step_temporaries(setup: TrainingSetup, st: TitanStates) -> float:
    """AdamW's step scratch: none for the fused step (torchtitan's default ``implementation``); the
    foreach step makes one parameter-sized fp32 temporary (``torch._foreach_sqrt(exp_avg_sqs)``)."""
    return st.weights if setup.optimizer_impl == "foreach" else 0.0


def check_torchtitan_setup(setup: TrainingSetup) -> None:
    """What torchtitan's trainer (and this model of it) does not run: ValueError with the reason."""
    tt.compute_bytes(setup.precision)
    if setup.method != "full":
        raise ValueError("torchtitan pre-trains every parameter: method full")
    if setup.tensor_parallel != 1:
        raise ValueError("torchtitan's tensor parallelism is not priced: tensor_parallel 1")


def torchtitan_phases_and_components(spec: ModelSpec, setup: TrainingSetup, b, s, rank, device: str = "cuda"
                                     ) -> tuple[dict, dict]:
    """(phases, components) of one torchtitan step, arrays over ``b`` and ``s`` (``rank``: no LoRA)."""
    check_torchtitan_setup(setup)
    tokens = _arr(b) * _arr(s) + 0 * _arr(rank)
    st = titan_states(spec, setup, _arr(s))
    kept, _, head = _saved(spec, setup, device)
    w = tt.compute_bytes(setup.precision)
    zero = 0 * tokens
    components = {
        "weights": st.weights + zero,
        "gradients": st.gradients + zero,
        "optimizer_states": st.states + zero,
        "optimizer_temporaries": _step_temporaries(setup, st) + zero,
        "buffers": st.buffers + zero,
        "fsdp_gathered_parameters": 2 * w * st.layer_params + w * st.table_params + zero,
        "activations": tokens * (kept + head),
        "loss_temporaries": tokens * tt.loss_extra_bytes_per_token(spec, setup.precision)["backward"],
    }
    return torchtitan_phases(spec, setup, st, tokens, device), components
