"""Step time of activation offloading (torchtune's ``enable_activation_offloading``).

What the technique does (torchtune ``torchtune/training/_activation_offloading.py``,
``OffloadActivations``, reached through ``training.get_act_offloading_ctx_manager``; the class is
documented with the same parameters in TRL's ``get_act_offloading_ctx_manager``):

- a ``saved_tensors_hooks`` context around the model's forward moves every tensor autograd saves
  (of at least ``min_offload_size`` = 1024 bytes; the output projection is left out by a
  ``NoOpManager``) to pinned CPU memory, and brings it back when backward needs it;
- with ``use_streams=True`` (the default from torch 2.5) the device-to-host copies run on a side
  stream while the forward goes on, and the host-to-device copies are prefetched on that stream
  ahead of the layer whose backward needs them: "the communications get overlapped with the
  computation";
- the recipes pair it with activation checkpointing, so what is saved, and offloaded, is each
  checkpointed layer's input, ``b x s x h`` in the compute dtype per layer
  (``planner.cost.memory.torchtune_stack`` prices the same tensors as host memory); without
  checkpointing every saved activation of the layers goes.

So the step pays only the copy time that the compute it overlaps cannot hide: the copies of a
micro-batch cross PCIe once each way (``PCIE_BANDWIDTH_BYTES_PER_S``), the forward's during the
forward and the backward's during the backward (its recompute included). The copies' own HBM
reads and writes (two bytes of traffic per offloaded byte, ~1 ms per GB on an A100) are left
out.
"""

from __future__ import annotations

import numpy as np

from planner.cost.memory.activation_memory import layer_activations
from planner.cost.timing.optimizer_step import PCIE_BANDWIDTH_BYTES_PER_S
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


def offloaded_bytes(spec: ModelSpec, setup: TrainingSetup, b, s):
    """Bytes one micro-batch of ``b`` sequences of ``s`` tokens offloads per GPU: with full
    checkpointing each layer's input (``b s h`` x the compute dtype; with LoRA the first layer's
    input is the frozen embedding's output, which needs no gradient and stays, as measured for
    ``memory_torchtune``), else every layer's saved activations (``layer_activations``)."""
    if not setup.activation_offload:
        return np.asarray(0.0 * b * s, dtype=np.float64)
    if setup.checkpointing != "full":
        saved = layer_activations(spec, setup, b, s, setup.tensor_parallel)[0]
        return np.asarray(saved / setup.pipeline_parallel, dtype=np.float64)
    layers = spec.num_layers - (0 if setup.method == "full" else 1)
    compute_bytes = 4.0 if setup.precision == "fp32" else 2.0
    per_layer = b * s / setup.context_parallel * spec.hidden_size * compute_bytes
    return np.asarray(layers * per_layer / setup.pipeline_parallel, dtype=np.float64)


def activation_offload_s(offload_bytes, forward_s, backward_s, pcie_bytes_per_s: float = PCIE_BANDWIDTH_BYTES_PER_S):
    """Exposed seconds of one micro-batch's offload copies: each direction moves ``offload_bytes``
    over PCIe on a side stream, hidden behind the device time of the pass it overlaps (the
    forward for device-to-host, the backward and its recompute for the prefetch back); only the
    excess shows."""
    copy = np.asarray(offload_bytes, dtype=np.float64) / pcie_bytes_per_s
    return np.maximum(copy - forward_s, 0.0) + np.maximum(copy - backward_s, 0.0)
