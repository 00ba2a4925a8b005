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
float8 (torchao, torchtitan's rowwise converter) and the compiled loss (``loss_impl="compiled"``) change
the saved sets and transients as ``planner.cost.memory.float8`` and ``torchtitan_tensors`` price them.
Phases as ``planner.cost.memory.phases``: forward (at the loss, or inside the last block), backward (at
the loss's backward, the head's, a recomputed block's or the embedding's), optimizer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import float8 as f8
from planner.cost.memory import torchtitan_tensors as tt
from planner.errors import PlannerError
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


def _layer_saved(layer, setup: TrainingSetup, device: str, checkpointing: str) -> int:
    """One block's saved bytes per token; float8 (torchtitan's rowwise recipe) changes the compiled
    set without AC (``float8.compiled_block_saved_bytes_per_token``) and nothing else (traced: eager,
    full and op-SAC save a bf16 linear's set)."""
    if setup.float8 and setup.compile and checkpointing == "none":
        return f8.compiled_block_saved_bytes_per_token(layer, tt.compute_bytes(setup.precision))
    return tt.layer_saved_bytes_per_token(layer, precision=setup.precision, device=device, compiled=setup.compile,
                                          checkpointing=checkpointing)


def _saved(spec: ModelSpec, setup: TrainingSetup, device: str) -> tuple[float, float, float]:
    """(every block's kept bytes per token, the largest block's full set per token, the head's)."""
    kept = sum(_layer_saved(layer, setup, device, setup.checkpointing) for layer in spec.layers)
    full = max(_layer_saved(layer, setup, device, "none") for layer in spec.layers)
    return kept, full, tt.head_saved_bytes_per_token(spec, setup.precision, device)


def _float8_fixed(spec: ModelSpec, setup: TrainingSetup) -> float:
    """Token-independent bytes float8 keeps from forward to backward (``float8.saved_weight_bytes`` for
    torchtitan's recipe: 0 for rowwise, the only family torchtitan 0.3.0 converts to)."""
    if not setup.float8:
        return 0.0
    return float(sum(f8.saved_weight_bytes(layer, f8.TORCHTITAN_RECIPE, checkpointing=setup.checkpointing,
                                           compiled=setup.compile) for layer in spec.layers))


def _float8_transient(spec: ModelSpec, setup: TrainingSetup, tokens):
    """The fp8 operands of the largest converted matmul in a block's backward (0 without float8)."""
    if not setup.float8:
        return 0 * tokens
    w = tt.compute_bytes(setup.precision)
    return np.maximum.reduce([_arr(f8.largest_cast_transient_bytes(layer, tokens, compiled=setup.compile, w=w))
                              for layer in spec.layers])


def torchtitan_phases(spec: ModelSpec, setup: TrainingSetup, st: TitanStates, tokens, device: str = "cuda") -> dict:
    """Live bytes on one GPU at the peak of forward, backward and the optimizer step."""
    w = tt.compute_bytes(setup.precision)
    kept, full, head = _saved(spec, setup, device)
    loss = tt.loss_extra_bytes_per_token(spec, setup.precision, compiled=_loss_compiled(setup))
    gathered = _gathered(spec, setup, st)
    fsdp = tt.fsdp_layer_transient_bytes(st.layer_params, st.shard, w, gathered)
    grads = st.gradients if (GRADIENTS_KEPT_ACROSS_STEPS or setup.grad_accum > 1) else 0.0
    static = st.weights + st.states + st.buffers + grads
    saved = tokens * (kept + head) + _float8_fixed(spec, setup)
    head_unit = w * st.table_params  # [norm, lm_head] stay gathered from the forward into the backward
    hidden_grads = 2 * w * spec.hidden_size * tokens  # the gradient reaching a block and the one it makes
    forward = static + np.maximum(saved + tokens * loss["forward"] + head_unit,
                                  tokens * kept + _float8_fixed(spec, setup) + fsdp["forward"] + head_unit)
    backward = static + saved + tokens * loss["backward"] + head_unit + gathered
    head_backward = (static + saved + tokens * w * spec.vocab_size + 2 * head_unit
                     + tt.REDUCE_BYTES * st.table_params * (1 + 1 / st.shard) + gathered)
    block = static + tokens * kept + _float8_fixed(spec, setup) + fsdp["backward"] + hidden_grads
    block = block + _float8_transient(spec, setup, tokens)
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


def _gathered(spec: ModelSpec, setup: TrainingSetup, st: TitanStates) -> float:
    """One (the largest) block's parameters as FSDP2 gathers them: bf16, or its linears in fp8."""
    w = tt.compute_bytes(setup.precision)
    layer = max(spec.layers, key=lambda layer: layer.params)
    return f8.gathered_block_bytes(layer, st.layer_params, w, st.shard, setup.float8_all_gather)


def _loss_compiled(setup: TrainingSetup) -> bool:
    """``loss_impl="compiled"``: torchtitan compiles the cross-entropy (``compile.components`` holds
    "loss", its default since PR #1033); "standard": the eager loss (older torchtitan, or components
    ["model"])."""
    return setup.loss_impl == "compiled"


def check_torchtitan_setup(setup: TrainingSetup) -> None:
    """What torchtitan's trainer (and this model of it) does not run: ValueError with the reason."""
    tt.compute_bytes(setup.precision)
    if setup.method != "full":
        raise ValueError("torchtitan pre-trains every parameter: method full")
    if setup.tensor_parallel != 1:
        raise ValueError("torchtitan's tensor parallelism is not priced: tensor_parallel 1")
    if setup.float8_all_gather and not setup.float8:
        raise PlannerError("float8_all_gather gathers float8 linears' weights: set float8 too")
    if setup.loss_impl == "compiled" and not setup.compile:
        raise PlannerError("torchtitan compiles the loss only under compile.enable: set compile with loss_impl compiled")


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
        "fsdp_gathered_parameters": 2 * _gathered(spec, setup, st) + w * st.table_params + zero,
        "activations": tokens * (kept + head) + _float8_fixed(spec, setup),
        "loss_temporaries": tokens * tt.loss_extra_bytes_per_token(spec, setup.precision,
                                                                   compiled=_loss_compiled(setup))["backward"],
    }
    return torchtitan_phases(spec, setup, st, tokens, device), components
