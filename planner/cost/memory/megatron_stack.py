"""Training memory of the Megatron stack by phase: one step of Megatron-LM / Megatron-Core on one GPU.

Owns the composition of one step (``megatron_phases_and_components``) from the per-tensor formulas of
``planner.cost.memory.megatron_tensors``; nothing is traced (Megatron's fused CUDA kernels cannot run
here), every term prices the documented algorithm:

- model states, Megatron's mixed precision: bf16 parameters (``Float16Module``), one persistent fp32
  gradient buffer (``DistributedDataParallel``: zeroed in place, live through every phase), fp32 master
  parameters and Adam moments, the last two sharded over the data-parallel x context-parallel GPUs by
  the distributed optimizer (``zero=1``); fp32 training keeps no master copy (Megatron-LM
  ``docs/user-guide/features/dist_optimizer.md``). Tensor parallelism splits the layers' linears and the
  vocab-padded embedding / output layer; norms are replicated. Pipeline parallelism gives rank ``r``
  the layers of ``parallel.stage_layers`` (virtual stages interleaved), the embedding to the first rank,
  the final norm and the output layer to the last (its own copy of the table when tied and ``pp > 1``).
- activations: Korthikanti et al. 2022 (Table 2 and sec. 4.3) for the model's shapes, times the
  micro-batches in flight on the rank under 1F1B (``parallel.in_flight_micro_batches``: ``pp`` on the
  first rank, ``pp (1 + (pp-1)/(pp v))`` interleaved); context parallelism divides the sequence.
- transients: the loss's logits copies on the last rank, one layer's backward gradients (and its
  recomputed set under recompute), the embedding's gradient on the first rank, ring attention's
  key/value blocks under context parallelism. The fixed CUDA context and workspaces are added by
  ``planner.cost.memory.device`` for every stack.

The peak is the worst rank's; the components are that rank's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from planner.cost.memory import megatron_tensors as mt
from planner.cost.memory.parallel import (
    in_flight_micro_batches,
    ring_attention_buffer_bytes,
    stage_layers,
    zero_shard_degree,
)
from planner.errors import PlannerError
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

NOTE = ("megatron stack: Megatron-Core + Transformer Engine priced from the documented algorithms, not traced "
        "(its fused CUDA kernels cannot run here): model states as Megatron's mixed precision and distributed "
        "optimizer hold them (docs/user-guide/features/dist_optimizer.md), activations per layer by Korthikanti "
        "et al. 2022 Table 2 derived for this model's shapes (gated MLP, key/value heads), flash attention "
        "(no as/h term), 1F1B in-flight micro-batches on each pipeline rank, vocab padded to 128 x TP")


def _arr(x):
    return np.asarray(x, dtype=np.float64)


class Rank(NamedTuple):
    """One pipeline rank: its layer indices, whether it holds the embedding / the output layer, and
    the micro-batches whose activations it holds at its peak."""

    index: int
    layers: tuple[int, ...]
    first: bool
    last: bool
    in_flight: object


class RankStates(NamedTuple):
    """Bytes on one GPU that do not grow with the tokens."""

    params: float  # parameters of the rank's model shard
    weights: float
    gradients: float
    master: float
    states: float


def check_megatron_setup(spec: ModelSpec, setup: TrainingSetup) -> None:
    """What Megatron (and this model of it) does not run: a one-line PlannerError with what does."""
    reason = mt.unpriced_reason(spec)
    if reason:
        raise PlannerError(reason)
    mt.activation_bytes(setup.precision)
    if setup.method != "full":
        raise PlannerError("the megatron memory model prices full training (Megatron pre-training): method full")
    if setup.pipeline_schedule == "gpipe":
        raise PlannerError("Megatron runs 1F1B (interleaved with virtual stages), not GPipe: use pipeline_schedule 1f1b")
    if setup.zero not in (0, 1):
        raise PlannerError("on stack megatron zero 1 is the distributed optimizer and 0 its absence; "
                           "ZeRO-2/3 are not Megatron's: use --zero 0 or 1")


def ranks(spec: ModelSpec, setup: TrainingSetup) -> tuple[Rank, ...]:
    """Every pipeline rank that may hold the peak: the earliest rank of each distinct (layers, role)
    (the in-flight count never grows with the rank)."""
    pp, v = setup.pipeline_parallel, setup.virtual_stages
    seen, out = set(), []
    for index, layers in enumerate(stage_layers(spec.num_layers, pp, v)):
        first, last = index == 0, index == pp - 1
        key = (tuple(spec.layers[i] for i in layers), first, last)
        if key in seen:
            continue
        seen.add(key)
        in_flight = in_flight_micro_batches(setup.pipeline_schedule, pp, index, setup.grad_accum, v)
        out.append(Rank(index, layers, first, last, _arr(in_flight)))
    return tuple(out)


def layer_params_per_gpu(layer, tp: int) -> float:
    """A layer's parameters on one tensor-parallel GPU: every linear's weight split over ``t``; the
    column-parallel biases (QKV, fc1) split, the row-parallel ones (the attention's and the MLP's
    output projections, the last of each list) replicated, as are the norms (Shoeybi et al. 2019)."""
    norms = sum(dim * (2 if bias else 1) for dim, bias in layer.norms)
    rows = {id(layer.attention[-1]), id(layer.mlp[-1])} if layer.attention and layer.mlp else set()
    biases = sum(lin.out_features * (1 if id(lin) in rows else 1 / tp) for lin in layer.linears if lin.bias)
    return sum(lin.weight_params for lin in layer.linears) / tp + biases + norms


def rank_params(spec: ModelSpec, setup: TrainingSetup, rank: Rank) -> float:
    """Parameters of one GPU's shard of ``rank``: its layers, the vocab-padded word embedding split over
    ``t`` (and the replicated learned positions) on the first rank, the final norm and the output layer
    on the last (tied embeddings share the table only when one rank holds both)."""
    tp = setup.tensor_parallel
    table = mt.padded_vocab_size(spec.vocab_size, tp) * spec.hidden_size / tp
    params = sum(layer_params_per_gpu(spec.layers[i], tp) for i in rank.layers)
    if rank.first:
        params += table + spec.position_embeddings * spec.hidden_size
    if rank.last:
        dim, bias = spec.final_norm
        params += dim * (2 if bias else 1)
        if not (spec.tied_embeddings and rank.first):
            params += table
    return params


def rank_states(spec: ModelSpec, setup: TrainingSetup, rank: Rank) -> RankStates:
    """Weights, the gradient buffer, the master copy and Adam's moments of one GPU of ``rank``."""
    params = rank_params(spec, setup, rank)
    per = mt.state_bytes_per_param(setup.precision, setup.zero == 1, zero_shard_degree(setup))
    return RankStates(params, *(params * b for b in per))


def _dropouts(spec: ModelSpec, setup: TrainingSetup) -> tuple[float, float]:
    if setup.dropout is not None:
        return setup.dropout, setup.dropout
    return spec.hidden_dropout, spec.attention_dropout


def rank_saved_bytes_per_token(spec: ModelSpec, setup: TrainingSetup, rank: Rank, s, checkpointing: str):
    """Bytes per local token of ONE micro-batch's activations on ``rank`` (its layers, the embedding's
    on the first rank; the head's are ``mt.head_saved_bytes_per_token``)."""
    w, tp, sp = mt.activation_bytes(setup.precision), setup.tensor_parallel, setup.sequence_parallel
    hidden, attention = _dropouts(spec, setup)
    total = sum(mt.layer_saved_bytes_per_token(spec.layers[i], w, tp, sp, checkpointing, setup.attention,
                                               hidden, attention, s) for i in rank.layers)
    if rank.first:
        total = total + mt.embedding_saved_bytes_per_token(spec, tp, sp, hidden)
    return total


def _layer_transient_per_token(spec: ModelSpec, setup: TrainingSetup, rank: Rank, s):
    """The largest of the rank's layers' backward moments per token: its gradients, plus the layer's
    whole set recomputed (full) or the core attention's recomputed set (selective)."""
    w, tp, sp = mt.activation_bytes(setup.precision), setup.tensor_parallel, setup.sequence_parallel
    hidden, attention = _dropouts(spec, setup)
    best = 0.0
    for layer in {spec.layers[i] for i in rank.layers}:  # each distinct layer once
        moment = mt.layer_backward_transient_bytes_per_token(layer, w, tp, sp)
        if setup.checkpointing == "full":
            moment = moment + mt.layer_saved_bytes_per_token(layer, w, tp, sp, "none", setup.attention, hidden,
                                                             attention, s)
        elif setup.checkpointing == "selective":
            moment = moment + mt.core_attention_bytes_per_token(layer, w, setup.attention, attention, s) / tp
        best = np.maximum(best, moment)
    return best


def rank_phases_and_components(spec: ModelSpec, setup: TrainingSetup, rank: Rank, b, s) -> tuple[dict, dict]:
    """(phases, components) of one GPU of pipeline ``rank``, arrays over ``b`` and ``s``."""
    w, tp = mt.activation_bytes(setup.precision), setup.tensor_parallel
    vocab = mt.padded_vocab_size(spec.vocab_size, tp)
    tokens = _arr(b) * _arr(s) / setup.context_parallel
    st = rank_states(spec, setup, rank)
    static = st.weights + st.gradients + st.master + st.states
    saved = rank.in_flight * tokens * rank_saved_bytes_per_token(spec, setup, rank, _arr(s), setup.checkpointing)
    head = tokens * mt.head_saved_bytes_per_token(spec, w, tp, setup.sequence_parallel, vocab) if rank.last else 0 * tokens
    loss = mt.loss_transient_bytes_per_token(w, tp, vocab)
    loss_fwd = tokens * loss["forward"] if rank.last else 0 * tokens
    loss_bwd = tokens * loss["backward"] if rank.last else 0 * tokens
    ring = ring_attention_buffer_bytes(tokens, max(layer.kv_dim for layer in spec.layers), w, tp, setup.context_parallel)
    layer_moment = tokens * _layer_transient_per_token(spec, setup, rank, _arr(s)) + ring
    forward = static + saved + head + np.maximum(loss_fwd, ring)
    backward = static + saved + head + np.maximum(loss_bwd, layer_moment)
    if rank.first:  # the embedding's gradient (autograd's, added into the fp32 buffer by a hook)
        table = w * vocab * spec.hidden_size / tp
        remaining = saved * np.maximum(rank.in_flight - 1, 0) / rank.in_flight
        backward = np.maximum(backward, static + remaining + table)
    phases = {"forward": forward, "backward": backward, "optimizer": static + 0 * tokens}
    zero = 0 * tokens
    components = {
        "weights": st.weights + zero,
        "gradients": st.gradients + zero,
        "master_weights": st.master + zero,
        "optimizer_states": st.states + zero,
        "optimizer_temporaries": zero,  # Megatron's fused multi-tensor Adam makes no parameter-sized scratch
        "activations": saved + head,
        "loss_temporaries": loss_bwd,
    }
    return phases, components


def megatron_phases_and_components(spec: ModelSpec, setup: TrainingSetup, b, s) -> tuple[dict, dict]:
    """(phases, components) of the worst pipeline rank per candidate: each phase the largest over the
    ranks, the components those of the rank whose peak is highest."""
    check_megatron_setup(spec, setup)
    results = [rank_phases_and_components(spec, setup, rank, b, s) for rank in ranks(spec, setup)]
    phases = {name: np.max(np.stack(np.broadcast_arrays(*(p[name] for p, _ in results))), axis=0)
              for name in results[0][0]}
    peaks = np.stack(np.broadcast_arrays(*(np.max(np.stack(np.broadcast_arrays(*p.values())), axis=0)
                                            for p, _ in results)))
    worst = peaks.argmax(axis=0)
    components = {}
    for name in results[0][1]:
        stacked = np.stack(np.broadcast_arrays(*(c[name] for _, c in results), worst)[:-1])
        components[name] = np.take_along_axis(stacked, worst[None], axis=0)[0]
    return phases, components
