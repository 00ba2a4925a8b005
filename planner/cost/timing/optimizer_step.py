"""Time of the optimizer step: the bytes it reads and writes at the memory bandwidth, or, with
``offload_optimizer``, the copies over PCIe and the step at host memory bandwidth.

Bytes per trainable element by optimizer and implementation follow the passes PyTorch runs
(``optimizer_bytes_per_element``); weights, gradients and states take the widths of
``planner.cost.memory.states.dtype_layout``. The step's host ops (``planner.cost.timing.host``) add on a
CPU; on a GPU the step takes the longer of its device and host times.
"""

from __future__ import annotations

import numpy as np

from planner.cost.memory.states import dtype_layout
from planner.cost.timing.efficiency import MEMORY_BANDWIDTH_EFFICIENCY
from planner.cost.timing.host import BNB_OPTIMIZERS, is_cpu, optimizer_host_ops, trainable_tensor_count
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

PCIE_BANDWIDTH_BYTES_PER_S = 25e9
"""Host <-> GPU copies with optimizer offload: PCIe 4.0 x16 is 32 GB/s per direction nominal
(PCI-SIG), ~25 GB/s achieved for pinned copies."""
HOST_MEMORY_BANDWIDTH_BYTES_PER_S = 100e9
"""The offloaded optimizer step on the host (ZeRO-Offload's CPU Adam, Ren et al. 2021) is
memory-bound: 8-channel DDR4-3200 gives 205 GB/s peak per socket; half of it achieved."""


def optimizer_bytes_per_element(setup: TrainingSetup) -> float:
    """Bytes one optimizer step moves per trainable element (reads + writes), pass by pass as
    PyTorch runs it, from the dtype layout of ``planner.cost.memory.states`` (weight w, gradient
    g, state s, fp32 master copy):

    - AdamW foreach / for-loop (``torch/optim/adam.py`` ``_multi_tensor_adam``, decoupled weight
      decay): ``mul_`` of w (2w), ``lerp_`` of m with g (2s + g), ``mul_`` and ``addcmul_`` of v
      (4s + g), ``sqrt`` of v into a temporary, ``div_`` and ``add_`` of eps on it (6s),
      ``addcdiv_`` of w (2w + 2s): 4w + 2g + 12s;
    - fused AdamW (one kernel): read w, g, m, v, write w, m, v: 2w + g + 4s;
    - 8-bit AdamW (bitsandbytes, one kernel, uint8 moments): 2w + g + 4;
    - SGD with momentum (foreach): ``mul_`` and ``add_`` of the buffer, ``add_`` to w: 2w + g + 5s;
    - Lion (lion-pytorch): weight decay 2w, ``clone().mul_().add().sign_()`` 7s + g, ``add_`` to w
      2w + s, momentum update 4s + g: 4w + 2g + 12s;
    - Adafactor (torch): squared-gradient row/column means 2g, the update tensor 2w, ``add_``
      to w 3w: 5w + 2g.

    A master copy (ZeRO with bf16-mixed) adds its read and write and the bf16 copy's write.
    """
    if setup.method != "full":
        w = g = s = 4.0
        master = 0.0
    else:
        layout = dtype_layout(setup)
        w, g, s, master = layout.weight, layout.grad, layout.state, layout.master
    if setup.optimizer == "paged-adamw-8bit":  # the same kernel; its paged buffers stay on the device
        return optimizer_bytes_per_element(setup.model_copy(update={"optimizer": "adamw-8bit"}))
    if setup.optimizer == "adamw":
        per = 2 * w + g + 4 * s if setup.optimizer_impl == "fused" else 4 * w + 2 * g + 12 * s
    else:
        per = {
            "adamw-8bit": 2 * w + g + 4.0,
            "sgd": 2 * w + g + 5 * s,
            "lion": 4 * w + 2 * g + 12 * s,
            "adafactor": 5 * w + 2 * g,
        }[setup.optimizer]
    return per + (2 * master + w if master else 0.0)


def grad_plus_weight_bytes(setup: TrainingSetup) -> float:
    """Bytes per element of a gradient and a weight: what offload copies each way per step."""
    if setup.method != "full":
        return 8.0
    layout = dtype_layout(setup)
    return layout.grad + layout.weight


def exposed_host_s(device_s, host_s, setup: TrainingSetup, backward_s=0.0):
    """Seconds the optimizer step's host work adds to its ``device_s`` on a GPU. The host runs
    ahead of the device, so only host time above the device time it overlaps shows: the step's
    own (``device_s``), and with optimizer in backward the backward's too (``backward_s``: the
    hooks run while the backward's kernels are queued). bitsandbytes synchronizes after every
    tensor (``BNB_OPTIMIZERS``): outside backward its host time adds in full; in backward it
    hides like the others (``optimizer_step_s`` adds one launch per tensor for each drain)."""
    if setup.optimizer in BNB_OPTIMIZERS and not setup.optimizer_in_backward:
        return host_s
    return np.maximum(host_s - device_s - (backward_s if setup.optimizer_in_backward else 0.0), 0.0)


def optimizer_step_s(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, trainable, rank, corr, backward_s=0.0):
    """Seconds of one optimizer step on one GPU for ``trainable`` elements per GPU (ZeRO >= 1
    shards the step over the data-parallel GPUs); ``backward_s``: the device seconds of the
    backward an optimizer in backward runs inside. Optimizer in backward does the same device
    work (the same bytes per element, torchtune's hooks call the same ``step``), only moved."""
    if setup.optimizer == "galore-adamw":  # projections, low-rank Adam and the amortized SVD
        from planner.cost.timing.galore_step import galore_optimizer_step_s

        return galore_optimizer_step_s(spec, setup, gpu, corr, backward_s)
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY
    shard = setup.data_parallel if setup.zero >= 1 else 1
    opt_bytes = trainable / shard * optimizer_bytes_per_element(setup)
    if setup.offload_optimizer:
        # gradients to the host, updated weights back, each at its own width
        grad_weight = trainable / shard * grad_plus_weight_bytes(setup)
        optimizer = grad_weight / PCIE_BANDWIDTH_BYTES_PER_S + opt_bytes / HOST_MEMORY_BANDWIDTH_BYTES_PER_S
    else:
        optimizer = opt_bytes / bandwidth
    optimizer = optimizer * corr.optimizer_time_factor
    # the step's host ops: added on a CPU, exposed on a GPU only above the device time they overlap
    host_opt = corr.host_overhead_s_per_op * optimizer_host_ops(spec, setup, rank)
    if is_cpu(gpu):
        return optimizer + host_opt
    exposed = exposed_host_s(optimizer, host_opt, setup, backward_s)
    if setup.optimizer in BNB_OPTIMIZERS and setup.optimizer_in_backward:
        exposed = exposed + corr.host_overhead_s_per_op * trainable_tensor_count(spec, setup)  # one drain each
    return optimizer + exposed

