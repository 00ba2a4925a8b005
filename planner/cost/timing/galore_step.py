"""Time of a GaLore optimizer step (``optimizer="galore-adamw"``, ``planner.cost.memory.galore``).

Per step, galore_torch 1.0's ``GaLoreAdamW`` runs a per-parameter loop: plain AdamW on the
tensors it does not project, and for each projected weight G (m x n) two rank-r matmuls (project,
project back), Adam on the r x max(m, n) projected gradient and three full-size elementwise passes
(the ``* scale``, the update, the decoupled weight decay). Every ``UPDATE_PROJ_GAP`` steps each
projected gradient also goes through ``torch.linalg.svd`` in fp32, priced here amortized over the
gap (``svd_s``) from its FLOP count and an achieved rate (``SVD_PEAK_FRACTION``). On a GPU the
step takes the longer of its device and host times, as ``planner.cost.timing.optimizer_step`` does.
"""

from __future__ import annotations

import numpy as np

from planner.cost.memory.galore import UPDATE_PROJ_GAP, effective_rank, optimizer_order
from planner.cost.memory.states import dtype_layout
from planner.cost.timing.efficiency import MEMORY_BANDWIDTH_EFFICIENCY, default_efficiency
from planner.cost.timing.host import is_cpu, optimizer_host_ops
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

SVD_PEAK_FRACTION = 0.05
"""Share of the fp32 (non-tensor-core) peak a large dense SVD reaches on a GPU. Anchor: MAGMA's
``gesdd`` on a Titan X took 4.33 s for a 4160 x 4160 fp32 matrix (pytorch/pytorch PR #1373,
2017): 26 n^3 = 1.9e12 FLOPs (``svd_flops``) at 0.43 TFLOP/s, 4-7% of the 6.6-11 TFLOP/s fp32
peak of the Maxwell or Pascal Titan X. cuSOLVER's bidiagonalization is bandwidth-bound, so the
share does not grow with the tensor-core peak. A guess that a calibration corrects; GaLore+
(Liao et al. 2024, arXiv:2412.19820, abstract) reports the SVD taking over 80% of GaLore's
fine-tuning time and GaLore 2 (Su et al. 2025, arXiv:2504.20437, abstract) names the SVD's overhead
as the method's remaining cost: it is not negligible at small batches. Whole-step evidence, not
an SVD rate: SubTrack-Grad (Rajabi et al. 2025, arXiv:2502.01586, abstract) measured GaLore at
+157% wall time over full-rank training for a 3B model (its update gap and GPU are not in the
abstract). No published torch.linalg.svd (cuSOLVER gesvdj/gesvd) rate on A100/H100 was found for
LLM-sized fp32 matrices (pytorch/pytorch PR #172824 times 2048 x 2048 on an L40 only): read this
constant as uncertain by a factor of ~3 either way (MAGMA's gesvd vs gesdd differ 3.4x at 4160 in
pytorch/pytorch PR #1373; cuSOLVER's gesvd, gesvdj and gesvda drivers by 2-30x in issue #41306); at UPDATE_PROJ_GAP 200 an 8B model's amortized SVD is
then between a small and a dominant share of the step. A calibration profile measures it."""
SAME_WIDTHS_AS = {"fp16": "bf16", "fp16-mixed": "bf16-mixed"}
"""fp16 modes store what their bf16 twins store (``planner.cost.memory.phases.SAME_BYTES_AS``)."""
HOST_OPS_PER_PROJECTED_TENSOR = 3.0
"""Host ops a projected weight adds to the for-loop AdamW's (``project``'s matmul,
``project_back``'s matmul and ``* scale``)."""


def svd_flops(rows: int, cols: int) -> float:
    """FLOPs of a thin SVD (U1, S, V) of an m x n matrix, m >= n after transposing: R-SVD,
    6 m n^2 + 20 n^3 (Golub & Van Loan, "Matrix Computations", 4th ed., fig. 8.6.1)."""
    m, n = max(rows, cols), min(rows, cols)
    return 6.0 * m * n * n + 20.0 * n ** 3


def plain_adamw_bytes_per_element(w: float, g: float, s: float) -> float:
    """transformers-style AdamW loop (``galore_torch/adamw.py`` without projection), per element:
    exp_avg ``mul_`` 2s + ``add_`` 2s+g, exp_avg_sq ``mul_`` 2s + ``addcmul_`` 2s+g, ``sqrt`` 2s,
    ``add_`` eps 2s, ``exp_avg / denom`` 3s, ``p.add_`` 2w+s, weight decay ``p.add_(p)`` 2w:
    4w + 2g + 16s."""
    return 4 * w + 2 * g + 16 * s


def projected_step_bytes(rows: int, cols: int, rank: int, w: float, g: float) -> float:
    """Bytes one projected weight's update moves besides its matmuls' operands: Adam on the
    projected gradient (its states at the gradient's width g) and the full-size passes
    (``* scale`` 2g, ``p.add_`` 2w+g, weight decay 2w)."""
    low = effective_rank(rows, cols, rank) * max(rows, cols)
    full = rows * cols
    return low * plain_adamw_bytes_per_element(0.0, g, g) + full * (3 * g + 4 * w)


def projection_matmul_s(rows: int, cols: int, rank: int, gpu: GpuSpec, precision: str, bandwidth: float) -> float:
    """The two rank-r products of one weight (project, project back), each the longer of its
    FLOPs at the matmul efficiency and its bytes (the full-size operand) at the bandwidth."""
    r = effective_rank(rows, cols, rank)
    width = 2.0 if precision in ("bf16", "fp16") else 4.0
    flops = 2.0 * rows * cols * r
    rate = gpu.peak_flops_for(precision) * float(default_efficiency(rows, cols, r))
    return 2 * max(flops / rate, width * (rows * cols + r * max(rows, cols)) / bandwidth)


def svd_s(rows: int, cols: int, gpu: GpuSpec) -> float:
    """Seconds of one fp32 thin SVD at ``SVD_PEAK_FRACTION`` of the fp32 peak."""
    return svd_flops(rows, cols) / (gpu.peak_flops_for("fp32") * SVD_PEAK_FRACTION)


def galore_device_s(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, amortize: bool = True) -> float:
    """Device seconds of one step: plain AdamW, projections and the SVDs over ``UPDATE_PROJ_GAP``
    steps (``amortize=False``: a projection-update step's whole SVD time)."""
    twin = SAME_WIDTHS_AS.get(setup.precision, setup.precision)
    layout = dtype_layout(setup.model_copy(update={"precision": twin}))
    w, g = layout.weight, layout.grad
    bandwidth = gpu.memory_bandwidth_bytes_per_s * MEMORY_BANDWIDTH_EFFICIENCY
    elementwise = matmuls = svds = 0.0
    for t in optimizer_order(spec):
        if not t.projected:
            elementwise += t.rows * max(t.cols, 1) * plain_adamw_bytes_per_element(w, g, g)
            continue
        elementwise += projected_step_bytes(t.rows, t.cols, setup.galore_rank, w, g)
        matmuls += projection_matmul_s(t.rows, t.cols, setup.galore_rank, gpu, setup.precision, bandwidth)
        svds += svd_s(t.rows, t.cols, gpu)
    return elementwise / bandwidth + matmuls + svds / (UPDATE_PROJ_GAP if amortize else 1)


def galore_optimizer_step_s(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec, corr, backward_s=0.0):
    """Seconds of one GaLoreAdamW step on one GPU (the SVD amortized), corrected like any
    optimizer step (``corr.optimizer_time_factor``), with its host ops: the for-loop optimizer's
    (``planner.cost.timing.host``) plus ``HOST_OPS_PER_PROJECTED_TENSOR`` per projected weight,
    added on a CPU, exposed on a GPU only above the device time."""
    from planner.cost.timing.optimizer_step import exposed_host_s

    device = galore_device_s(spec, setup, gpu) * corr.optimizer_time_factor
    projected = sum(1 for t in optimizer_order(spec) if t.projected)
    ops = optimizer_host_ops(spec, setup, 0) + HOST_OPS_PER_PROJECTED_TENSOR * projected
    host = corr.host_overhead_s_per_op * ops
    if is_cpu(gpu):
        return np.asarray(device + host)
    return np.asarray(device + exposed_host_s(device, host, setup, backward_s))
