"""Host-side time: the eager ops a micro-batch and an optimizer step dispatch.

Each op costs ``HOST_OVERHEAD_S_PER_OP`` of Python, dispatcher and launch overhead. On a GPU the
host runs ahead of the device, so only the part above the device time is exposed (the step time
decides): the bare roofline exposes ``max(host - device, 0)``, the grounded default the smooth
maximum of host and grounded device time (``planner.cost.timing.grounding.exposed_host_s``); on a
CPU device it adds. The counts follow what eager PyTorch with peft runs; a training
stack that fuses or compiles its step (torch.compile, Megatron's fused kernels) dispatches fewer
ops and changes this module.
"""

from __future__ import annotations

from planner.cost import spec_facts
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

HOST_OVERHEAD_S_PER_OP = 10e-6
"""Host time per eager op: ~10 us of Python, dispatcher and launch overhead (H. He, "Making Deep
Learning Go Brrrr From First Principles", 2022: eager PyTorch runs on the order of 100k ops
per second). A guess that calibration corrects; on a GPU it shows where it nears or exceeds the
device time (``grounding.exposed_host_s``)."""
BACKWARD_OPS_PER_FORWARD_OP = 1.5
"""Autograd nodes run about 1.5 kernels per forward op (two matmuls per linear, one or two
elementwise kernels per elementwise op). A guess that calibration absorbs."""
CHECKPOINT_HOST_FACTOR = {"none": 0.0, "full": 4.0, "selective": 4.0}
"""Extra host ops per forward op with activation checkpointing: the forward reruns (1x) and
non-reentrant checkpointing runs Python pack/unpack hooks per saved tensor and saves and
restores RNG state per layer (measured here: a 2-layer width-128 model's step on one CPU
thread grew by ~4 host ops per forward op of its layers with full checkpointing)."""
OPTIMIZER_HOST_OPS = {"foreach": 40.0, "fused": 10.0, "for-loop": 0.0}
"""Host ops of one optimizer step besides the per-tensor ones: foreach AdamW dispatches ~15
``torch._foreach_*`` calls plus step-count and bias-correction bookkeeping; fused one kernel;
for-loop pays ``OPTIMIZER_HOST_OPS_PER_TENSOR`` per tensor instead."""
OPTIMIZER_HOST_OPS_PER_TENSOR = {"foreach": 1.0, "fused": 1.0, "for-loop": 15.0}
"""Per trainable tensor: grouping by device and dtype (foreach, fused), or the whole update
(for-loop: ~15 ops per tensor)."""


def is_cpu(gpu: GpuSpec) -> bool:
    """A CPU "device": the host and the compute share the cores, so host time adds to device time."""
    return gpu.vendor.lower() == "cpu"


def host_ops_per_micro_batch(spec: ModelSpec, setup: TrainingSetup) -> float:
    """Eager ops one micro-batch dispatches, approximately: per layer 2 per projection (matmul,
    bias or reshape), 6 per norm (cast, pow, mean, rsqrt, mul, weight), 15 of attention glue
    (view/transpose, rotary, SDPA), 5 of MLP glue and residuals, 10 more for routing in a
    mixture of experts, 6 per LoRA-adapted linear (dropout, A, B, scale, add, cast); 10 for
    the embedding, final norm, head and loss; backward ``BACKWARD_OPS_PER_FORWARD_OP`` per
    forward op; checkpointing ``CHECKPOINT_HOST_FACTOR`` more."""
    adapted: dict[int, int] = {}
    if setup.method != "full":
        for index, _ in spec_facts.lora_linears(spec, setup.lora_targets):
            adapted[index] = adapted.get(index, 0) + 1
    layers = 0.0
    for index, layer in enumerate(spec.layers):
        layers += (2 * len(layer.linears) + 6 * len(layer.norms) + 20 + (10 if layer.num_experts else 0)
                   + 6 * adapted.get(index, 0))
    forward = layers + 10
    return forward * (1 + BACKWARD_OPS_PER_FORWARD_OP) + layers * CHECKPOINT_HOST_FACTOR[setup.checkpointing]


BNB_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit")
"""bitsandbytes' optimizers: ``Optimizer8bit.step`` updates one tensor at a time and calls
``torch.cuda.synchronize()`` after each (bitsandbytes/optim/optimizer.py, ``Optimizer8bit.step``),
so their host ops cannot run ahead of the device."""
PAGED_PREFETCH_OPS_PER_TENSOR = 2.0
"""Paged states: ``prefetch_state`` calls ``F.prefetch_tensor`` (``cudaMemPrefetchAsync``) for
both states of a tensor before its update, every step (the same file); counted on every tensor
although those under 1e5 elements are not paged."""


def optimizer_host_ops(spec: ModelSpec, setup: TrainingSetup, rank) -> float:
    """Host ops of one optimizer step (see ``OPTIMIZER_HOST_OPS``), plus ``zero_grad`` (the
    tensor count does not depend on the LoRA ``rank``). Optimizer in backward (torchtune's
    ``OptimizerInBackward`` / ``register_optim_in_bwd_hooks``: one optimizer instance per
    parameter, stepped in its post-accumulate-grad hook, the gradient then freed) pays the
    per-step ops once per tensor and no ``zero_grad``."""
    tensors = trainable_tensor_count(spec, setup)
    impl = setup.optimizer_impl if setup.optimizer in ("adamw", "sgd") else "for-loop"
    if setup.optimizer in ("adamw-8bit", "adafactor") and setup.optimizer_impl == "foreach":
        impl = "foreach"
    per_tensor = OPTIMIZER_HOST_OPS_PER_TENSOR[impl] + (
        PAGED_PREFETCH_OPS_PER_TENSOR if setup.optimizer == "paged-adamw-8bit" else 0.0)
    if setup.optimizer_in_backward:
        return (OPTIMIZER_HOST_OPS[impl] + per_tensor) * tensors
    return OPTIMIZER_HOST_OPS[impl] + (per_tensor + 1.0) * tensors


def trainable_tensor_count(spec: ModelSpec, setup: TrainingSetup) -> int:
    """How many tensors the optimizer steps: two per adapted linear, or every parameter tensor
    (``planner.cost.memory.states.trainable_tensors``)."""
    if setup.method != "full":
        return 2 * len(spec_facts.lora_linears(spec, setup.lora_targets))
    return len(spec_facts.full_tensor_shapes(spec))

