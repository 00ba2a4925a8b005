"""The gradient bytes a step moves beyond its matmuls: what each GPU trains, the embedding's dense
gradient, and gradient accumulation's read-modify-write of ``.grad`` (``planner.cost.timing.step_time``
prices them at the HBM roofline)."""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory.states import dtype_layout
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def trainable_per_gpu(spec: ModelSpec, setup: TrainingSetup, rank):
    """Trainable elements a GPU holds before ZeRO sharding: split over the tensor-parallel group
    and over the pipeline stages."""
    if setup.method == "full":  # the routed experts are split over the expert-parallel group
        counts = spec_facts.param_counts(spec)
        return _arr(counts.total - counts.experts * (1 - 1 / setup.expert_parallel)) / (
            setup.tensor_parallel * setup.pipeline_parallel)
    return _arr(spec_facts.lora_params_per_rank(spec, setup.lora_targets) * rank) / setup.pipeline_parallel


def accumulation_bytes(spec: ModelSpec, setup: TrainingSetup, rank):
    """Bytes one micro-batch after the first moves adding its gradients into ``.grad`` (read 2,
    write 1); none without accumulation."""
    if setup.grad_accum <= 1:
        return _arr(0.0)
    grad_b = dtype_layout(setup).grad if setup.method == "full" else 4.0
    return _arr(3.0 * trainable_per_gpu(spec, setup, rank) * grad_b)


def gradient_traffic_bytes(spec: ModelSpec, setup: TrainingSetup, rank):
    """Memory-bound gradient work of one micro-batch beyond the matmuls, per GPU: the embedding
    backward writes a V x h gradient (``embedding_dense_backward`` zero-fills it and adds rows)
    and with tied embeddings autograd sums it with the head's (read 2, write 1); with gradient
    accumulation each micro-batch after the first adds its gradients into ``.grad`` (read 2,
    write 1), spread here over the micro-batches."""
    tp = setup.tensor_parallel
    traffic = 0.0
    grad_b = dtype_layout(setup).grad if setup.method == "full" else 4.0
    if setup.method == "full":
        table = spec.vocab_size * spec.hidden_size * grad_b / tp
        traffic = table * (1 + (3 if spec.tied_embeddings else 0))
    share = (setup.grad_accum - 1) / setup.grad_accum
    return _arr(traffic) + share * accumulation_bytes(spec, setup, rank)
