"""Pipeline parallelism: the memory of each stage, and the peak of the worst one.

A pipeline rank holds its own layers (``memory_parallel.stage_layers``), the first also the
embedding, the last the final norm, the head (with tied embeddings its own copy of the table, as
Megatron-LM keeps one on the last stage) and the loss. Each stage is priced as a model of its own
layers: its weights, gradients, optimizer states and step temporaries by
``memory_states.model_states`` on the stage's ``ModelSpec`` (exact per-stage parameter counts,
ZeRO, tensor and expert parallelism included), its activations by the layers' inventory of
``memory_activations.layer_activations`` times the micro-batches in flight at the stage's peak
(``memory_parallel.in_flight_micro_batches``: ``pp`` on the first stage under 1F1B, more under
interleaving, all ``m`` under GPipe). The phases are those of ``memory._phases`` with the
embedding's terms on the first stage and the loss's on the last. The peak is the worst stage's.

Stages with the same layers and role share one evaluation at their largest in-flight count (a
middle stage holds no more than the earliest middle stage with the same layers).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import activations as act
from planner.cost.memory.activation_memory import (
    NOT_READ_BY_ACTIVATIONS,
    ActivationMemory,
    compute_setup,
    layer_activations,
    qlora_dequant_bytes,
)
from planner.cost.memory.parallel import head_in_flight_micro_batches, in_flight_micro_batches, stage_layers
from planner.cost.memory.states import NOT_READ_BY_STATES, model_states
from planner.cost.spec_facts import setup_key, shared
from planner.errors import PlannerError
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


class Stage(NamedTuple):
    """One pipeline rank: its model (``spec``), whether it holds the embedding / the head, and
    the micro-batches in flight at its peak (the largest of the ranks it stands for)."""

    spec: ModelSpec
    first: bool
    last: bool
    in_flight: object
    ranks: tuple[int, ...]


PIPELINE_PRICED = {"loss_impl": ("standard",), "modules_to_save": ((),)}
"""Set-up fields whose non-default values the stage assembly does not price yet (a fused
cross-entropy or a trained embedding / head changes the first and last stages)."""


def _require_stage_priced(setup: TrainingSetup) -> None:
    for field, values in PIPELINE_PRICED.items():
        if getattr(setup, field) not in values:
            raise PlannerError(
                f"{field}={getattr(setup, field)!r} with pipeline_parallel={setup.pipeline_parallel}: not priced by the "
                f"pipeline memory model yet (use {field}={values[0]!r}, or pipeline_parallel 1)"
            )


def stage_spec(spec: ModelSpec, layers: tuple[int, ...], first: bool, last: bool) -> ModelSpec:
    """The model one pipeline rank holds: its layers, the embedding table on the first rank, the
    final norm and the head on the last (one V x h table each: tied embeddings are kept twice, the
    head's copy on the last stage, Narayanan et al. 2021 / Megatron-LM), nothing of them between.
    Kept per (spec, layers, role), so the per-spec facts are computed once."""
    if first and last:
        return spec

    def build() -> ModelSpec:
        return dataclasses.replace(
            spec, name=f"{spec.name}[stage layers {layers[0]}-{layers[-1]}]",
            layers=tuple(spec.layers[i] for i in layers),
            vocab_size=spec.vocab_size if (first or last) else 0,
            tied_embeddings=True,  # one table: the embedding (first) or the head (last)
            position_embeddings=spec.position_embeddings if first else 0,
            final_norm=spec.final_norm if last else (0, False),
            lm_head_bias=False,
        )

    return spec_facts.cached(spec, ("pipeline_stage", layers, first, last), build)


def stages(spec: ModelSpec, setup: TrainingSetup) -> tuple[Stage, ...]:
    """The distinct stages of ``setup``'s pipeline (same layers and role evaluated once) with the
    micro-batches in flight at the peak of the earliest rank each stands for."""
    pp, v = setup.pipeline_parallel, setup.virtual_stages
    return tuple(Stage(model, first, last, in_flight_micro_batches(setup.pipeline_schedule, pp, ranks[0],
                                                                   setup.grad_accum, v), ranks)
                 for model, first, last, ranks in _stage_models(spec, pp, v))


def _stage_models(spec: ModelSpec, pp: int, v: int) -> tuple:
    """(stage spec, first, last, ranks) of each distinct stage, kept per spec and (pp, v)."""

    def build() -> tuple:
        # each layer's kind: the index of its first equal layer (one hash per layer)
        first_of = {layer: k for k, (layer, _) in enumerate(spec_facts.distinct_layers(spec))}
        kinds = [first_of[layer] for layer in spec.layers]
        out: dict[tuple, list] = {}
        for rank, layers in enumerate(stage_layers(spec.num_layers, pp, v)):
            first, last = rank == 0, rank == pp - 1
            key = (tuple(kinds[i] for i in layers), first, last)
            if key in out:  # in flight never grows with the rank: the earlier rank stands for it
                out[key][3] += (rank,)
                continue
            out[key] = [stage_spec(spec, layers, first, last), first, last, (rank,)]
        return tuple(tuple(entry) for entry in out.values())

    return spec_facts.cached(spec, ("pipeline_stages", pp, v), build)


def stage_activations(spec: ModelSpec, stage: Stage, setup: TrainingSetup, b, s, rank, device: str) -> ActivationMemory:
    """Activations a stage holds at its peak: its layers' inventory for ``in_flight`` micro-batches,
    the token ids on the first stage, the head and loss (``head_in_flight_micro_batches``) on the
    last, the autocast / dequantized weight copies of its own projections."""
    setup = compute_setup(setup)
    tp, p = setup.tensor_parallel, act.PRECISION[setup.precision]
    tokens = b * s / setup.context_parallel
    layers, kept, transient = layer_activations(stage.spec, setup, b, s, tp, device, rank)
    ids_per_token = act.INDEX_BYTES * (2 if spec.position_embeddings else 1)  # ids (and positions)
    trainable = setup.method == "full"
    head_per_token = act.head_activation_bytes_per_token(spec, setup.precision, setup.dropout, trainable)
    head = ((tokens * ids_per_token * stage.in_flight if stage.first else 0.0)
            + (tokens * (head_per_token - ids_per_token)
               * head_in_flight_micro_batches(setup.pipeline_schedule, setup.grad_accum) if stage.last else 0.0))
    casts, head_cast = _stage_weight_copies(spec, stage, setup)
    if setup.checkpointing != "none":
        # casts made inside a checkpointed layer are recomputed with it: only the head's stays
        transient = transient + (casts - head_cast) / stage.spec.num_layers
        casts = head_cast
    kept_all = kept * stage.in_flight
    loss_temp = tokens * act.loss_backward_temp_bytes_per_token(spec) if stage.last else 0.0 * tokens
    logits = tokens * spec.vocab_size * (p.matmul + (4 if p.matmul != 4 else 0)) if stage.last else 0.0 * tokens
    return ActivationMemory(layers * stage.in_flight, kept_all, transient, head, casts, kept_all + head + casts,
                            loss_temp, logits)


def _stage_weight_copies(spec: ModelSpec, stage: Stage, setup: TrainingSetup) -> tuple:
    """(weight copies a stage holds through backward, the head's share): autocast's bf16 casts of
    the stage's projections (and of the head on the last stage), one dequantized projection with
    QLoRA (``memory_activations._weight_copies`` for the whole model)."""
    tp = setup.tensor_parallel
    if setup.method == "qlora":
        return (qlora_dequant_bytes(spec, tp),) * 2
    if setup.precision != "bf16-mixed":
        return 0.0, 0.0
    linear = spec_facts.cached(stage.spec, ("stage_linear_weights",),
                               lambda: sum(lin.weight_params for layer in stage.spec.layers for lin in layer.linears))
    head_cast = 2.0 * spec.vocab_size * spec.hidden_size / tp if stage.last else 0.0
    return 2.0 * linear / tp + head_cast, head_cast


def pipeline_phases_and_components(spec: ModelSpec, setup: TrainingSetup, b, s, rank, device: str = "cuda",
                                   cache: dict | None = None, components: bool = True):
    """(phases, components) of the worst pipeline stage per candidate: each phase is the largest
    over the stages (so the peak is the worst stage's peak), the components are those of the
    stage whose peak is highest (None unless ``components``: a search reads the peak alone).
    ``cache``: as ``memory.training_memory``'s (each stage's states and activations are filed
    under the stage's model and the set-up fields they read)."""
    from planner.cost.memory.phases import _components, _phases

    _require_stage_priced(setup)
    tokens = b * s / setup.context_parallel
    all_phases, all_components, peaks = [], [], []
    for stage in stages(spec, setup):
        # the stage specs live in ``spec_facts``' cache with their model: their ids are stable keys
        states = shared(cache, (id(stage.spec), *setup_key("stage_states", setup, NOT_READ_BY_STATES)),
                        lambda st=stage: model_states(st.spec, setup, rank))
        acts = shared(cache, (id(stage.spec), stage.in_flight.tobytes(), device,
                              *setup_key("stage_activations", compute_setup(setup), NOT_READ_BY_ACTIVATIONS)),
                      lambda st=stage: stage_activations(spec, st, setup, b, s, rank, device))
        # the whole model's vocabulary, width and tying: the embedding's and head's terms are the
        # first and last stage's (``first``/``last``); the stage's spec marks its one table as tied
        phases = _phases(spec, setup, states, acts, tokens, device, stage.first, stage.last)
        all_phases.append(phases)
        if components:
            all_components.append(_components(states, acts, tokens, setup))
            peaks.append(np.stack(np.broadcast_arrays(*phases.values())).max(axis=0))
    phases = {name: np.max(np.stack(np.broadcast_arrays(*(ph[name] for ph in all_phases))), axis=0)
              for name in all_phases[0]}
    if not components:
        return phases, None
    worst = np.stack(np.broadcast_arrays(*peaks)).argmax(axis=0)
    chosen = {}
    for name in all_components[0]:
        stacked = np.stack(np.broadcast_arrays(*(c[name] for c in all_components), worst)[:-1])
        chosen[name] = np.take_along_axis(stacked, worst[None], axis=0)[0]
    return phases, chosen

