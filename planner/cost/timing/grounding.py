"""The grounded step time: the roofline terms of ``planner.cost.timing.step_time`` corrected by a few
constants fitted on published measured throughput, with an interval from cross-validated errors.

The roofline (``step_time`` with ``grounded=False``) prices one step from first principles: the
matmuls at ``DEFAULT_MAX_EFFICIENCY`` of the dense peak, the memory-bound work at the HBM
roofline, the exposed collectives on the cluster's links. Real runs are slower than that, and by
how much depends on the GPU generation and the training stack (issue 11: H100 reaches a smaller
share of its peak than A100; HF Trainer adds framework time; stacks overlap communication
differently). ``ground`` applies, per set-up:

- **matmul efficiency** = the GPU's measured matmul ceiling (``planner.cost.timing.ceiling``:
  Bekman's MAMF table, independent of any training run; a documented fallback for GPUs without
  a row) x ``efficiency.step``, one whole-step share fitted across all sources and GPUs; the
  matmul seconds scale by ``DEFAULT_MAX_EFFICIENCY / efficiency``. A GPU seen in one source only
  (MI300X, B200) is thus priced from its own GEMM benchmark, not from a constant fitted on it.
  (Until this change each generation had its own fitted share; held out, MI300X was 108% off.)
- **the attention core**: flash kernels at the GPU's measured flash-attention ceiling
  (``ceiling.attention_ceiling``: FlashAttention-2 forward + backward, Dao 2023 on A100, the
  FlashAttention-3 paper's FA2 bars on H100, which reach half the share A100 does) x
  ``efficiency.attention``, fitted across sources; eager attention at the matmul ceiling; times
  ``attention_core`` (derived, see ``DERIVED``).
- **a power-capped part** (``power_cap.h100-500w``): Meta's 500 W Grand Teton H100, on which
  torchtitan measured its H100 benchmarks, runs its chip's kernels (``ceiling.POWER_CAPPED``) at a
  sustained clock nobody publishes; one factor on its matmul and attention time, fitted on the
  sources that ran it (held out, each is priced with the factor the others give). Every run on
  that part is a torchtitan run, so the factor also absorbs whatever else those sources share.
- **host time** (``host_overlap_p``): the host's ops of a step (``host.host_ops_per_micro_batch``)
  meet the grounded device time in a smooth maximum (``exposed_host_s``), not the roofline's
  exposure against its own faster device time.
- **memory-bound work** per kind of stack (``memory.eager``: one kernel per op, HF/torchtune/
  torchtitan without compile; ``memory.fused``: Megatron's fused kernels, or ``--compile``).
- **framework time** per stack (``framework.<stack>``): a factor on the device time (Python,
  launch gaps, hooks, synchronisations that the roofline does not see).
- **selective recompute** (``selective_recompute``): op-level selective checkpointing's rerun beyond
  what the roofline counts (the elementwise forward, and torchtitan's every second matmul, which are
  FLOPs: ``flops.every_second_matmul_flops``), as a share of the forward matmul time; the published
  runs inform it little, so it stays near its prior.
- **DeepSpeed ZeRO-3 under HF Trainer** (``zero3_s_per_module_visit.hf``): host seconds per module
  fetch of full fine-tuning (``zero3_hooks``: every module of every layer in forward, backward and
  recompute, as counted on the real engine; a LoRA run's fetch costs a measured 0.67 of one), the Python that makes HF + ZeRO-3 runs several times slower than
  their FLOPs at short sequences (issue 11). It is host time: it joins the host's ops in the smooth
  maximum with the device time, so it hides behind long sequences' compute (Qwen-1 7B on 2 GPUs
  takes 4.0 s at 256 and 512 tokens, 4.5 s at 1024); the gathers and reductions the hooks launch sit
  on the device side of that maximum. Prior: measured on CPU by ``benchmarks/zero3_hook_cpu.py``.
- **QLoRA dequantization** (``qlora_dequant_factor``): the NF4 -> bf16 passes of
  ``qlora.dequantization_s`` (forward, backward, recompute) times the traffic an
  implementation moves over the fused kernel's.
- **communication exposure** (``communication.hf``: DeepSpeed/accelerate under HF Trainer;
  ``communication.native``: FSDP/Megatron with prefetch and bucketed overlap): a factor on the
  exposed collectives the roofline computes.
- **pipeline parallelism**: each stage runs ``1/pp`` of the layers and the last one also the
  output head (the slowest stage sets the pace); the bubble adds
  ``(pp - 1) / (m x v)`` of the device time for ``m`` micro-batches and ``v`` virtual stages
  (1F1B and interleaved 1F1B: Narayanan et al. 2021, "Efficient Large-Scale Language Model
  Training on GPU Clusters Using Megatron-LM", sec. 2.2; GPipe has the same ``(pp - 1)/m``,
  Huang et al. 2019).
- **context parallelism**: each GPU runs ``1/cp`` of every sequence (ring attention with the
  load-balanced causal split, Liu et al. 2023 "Ring Attention"; the key/value passes overlap
  the attention compute and are not charged).

The constants and the interval quantiles are data: ``models_catalog/time_model/constants.json``,
written by ``planner.cost.timing.fit`` (leave-one-source-out cross-validation, see
``benchmarks/bench_time_published.py``). ``PRIOR`` holds the values before any fit (the centre
of the fit's ridge penalty).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from planner.cost.timing.ceiling import POWER_CAPPED, attention_ceiling, matmul_ceiling
from planner.cost.timing.efficiency import DEFAULT_MAX_EFFICIENCY
from planner.cost.timing.host import HOST_OVERHEAD_S_PER_OP, host_ops_per_micro_batch, is_cpu
from planner.cost.timing.zero3_hooks import zero3_fetch_cost_units
from planner.errors import PlannerError

CONSTANTS_FILE = ("time_model", "constants.json")
REGIMES = ("single-gpu", "single-node", "multi-node")
"""Set-ups whose errors differ in kind: one GPU (fine-tuning), several GPUs of one node, several nodes."""

PRIOR: dict[str, float] = {
    # share of the measured GEMM ceiling a whole step's matmuls reach: Megatron-LM's 163-167 TFLOP/s per
    # A100 (Narayanan 2021, table 1, attention and elementwise work included) over the A100's 271 MAMF
    "efficiency.step": 0.80,
    "efficiency.attention": 1.0,  # flash kernels inside a step at their benchmark ceiling (attention_ceiling.csv)
    "memory.eager": 1.0,
    "memory.fused": 0.7,
    "framework.hf": 1.2,
    "framework.torchtune": 1.1,
    "framework.torchtitan": 1.05,
    "framework.megatron": 1.0,
    "communication.hf": 1.5,
    "communication.native": 1.0,
    "attention_core": 3.5 / 3.0,  # derived, not fitted: see DERIVED
    "selective_recompute": 0.1,  # per-op SAC's rerun of small ops (views, casts, RoPE) beyond the counted work
    # measured: DeepSpeed 0.19.8's extra host cost of ZeRO-3 per module fetch, full fine-tuning of a 32-layer Llama on
    # this project's 2-core CPU machine (benchmarks/zero3_hook_cpu.py: 0.38 ms at 8 layers, 0.43 at 32); a GPU host
    # also waits on CUDA events, and a faster host core takes less
    "zero3_s_per_module_visit.hf": 4.3e-4,
    "qlora_dequant_factor": 1.0,  # bitsandbytes' fused kernel: one read of NF4, one bf16 write per pass
    # device time of the 500 W Grand Teton H100 over the 700 W SXM's: with power ~ clock x voltage^2
    # and voltage ~ clock, 5/7 of the power sustains ~(5/7)^(1/3) = 0.89 of the clock
    "power_cap.h100-500w": 1.12,
    # how sharply a step goes from device-bound to host-bound: 4 puts a step whose host and device
    # times are equal 19% above either (a hard max would put it at either)
    "host_overlap_p": 4.0,
}
"""Constant -> value before any fit (guesses with the reason; the fit moves them)."""
DERIVED: tuple[str, ...] = ("attention_core",)
"""Constants held at their ``PRIOR``, not fitted. ``attention_core``: a flash kernel's backward
recomputes the scores and probabilities (Dao 2023, FlashAttention-2, Algorithm 2) and runs
2.5x its forward's FLOPs, where ``planner.cost.flops`` counts 2x as FlopCounterMode does (the
flash-attention repository's benchmark counts forward + backward as 3.5x the forward): 3.5/3 of
the counted work at the kernel's rate. (Fitting it once followed one source's bias: held out,
llm-foundry got 1.05 and a median error of 11.3% against 10.8% with 3.5/3; the kernel's rate is
now ``efficiency.attention`` x a measured ceiling, fitted across sources.)"""


def regime(num_gpus: int, gpus_per_node: int) -> str:
    """The regime of a set-up for its interval (``REGIMES``)."""
    if num_gpus <= 1:
        return "single-gpu"
    return "single-node" if num_gpus <= gpus_per_node else "multi-node"


def pipeline_bubble_fraction(pipeline_parallel, micro_batches, virtual_stages=1):
    """Idle share of a pipeline step over its busy time: ``(p - 1) / (m x v)`` for ``p`` stages,
    ``m`` micro-batches and ``v`` model chunks per stage (Narayanan et al. 2021 sec. 2.2.1-2.2.2)."""
    p = np.asarray(pipeline_parallel, dtype=np.float64)
    return (p - 1.0) / (np.asarray(micro_batches, dtype=np.float64) * np.asarray(virtual_stages, dtype=np.float64))


def head_share(spec) -> float:
    """Share of a layer stack's matmul work in the output head (``V x h`` of the head over the
    layers' parameters plus it): the last pipeline stage runs it besides its layers."""
    from planner.cost.spec_facts import param_counts

    counts = param_counts(spec)
    head = spec.vocab_size * spec.hidden_size
    layers = counts.attention + counts.mlp + counts.experts
    return head / max(layers + head, 1)


def host_s(spec, setup) -> float:
    """Host seconds of a step's micro-batches on one pipeline stage (``host.host_ops_per_micro_batch``
    at ``host.HOST_OVERHEAD_S_PER_OP``; a stage dispatches its share of the layers' ops)."""
    ops = host_ops_per_micro_batch(spec, setup) * setup.grad_accum / setup.pipeline_parallel
    return HOST_OVERHEAD_S_PER_OP * ops


def features(spec, setup, gpu) -> dict:
    """What ``ground`` reads of a set-up and its GPU, as plain values (one row of a fit's table)."""
    return {
        "head_share": head_share(spec) if setup.pipeline_parallel > 1 else 0.0,
        "zero3_fetch_units": zero3_fetch_cost_units(spec, setup),
        "ceiling": matmul_ceiling(gpu, setup.precision)[0],
        "attention_ceiling": attention_ceiling(gpu)[0],
        "flash": setup.attention == "sdpa",
        "power_capped": gpu.name in POWER_CAPPED,
        "cpu": is_cpu(gpu),
        "host_s": host_s(spec, setup),
        "stack": setup.stack,
        "fused": bool(setup.stack == "megatron" or setup.compile),
        "selective": setup.checkpointing == "selective",
        "pipeline_parallel": float(setup.pipeline_parallel),
        "split": float(setup.pipeline_parallel * setup.context_parallel),
        "bubble": float(pipeline_bubble_fraction(setup.pipeline_parallel, setup.grad_accum, setup.virtual_stages)),
    }


def _lookup(values: dict, prefix: str, keys) -> np.ndarray:
    if isinstance(keys, str):
        return np.float64(values[f"{prefix}.{keys}"])
    return np.array([values[f"{prefix}.{k}"] for k in keys])


def ground(parts: dict, feats: dict, values: dict) -> dict:
    """The grounded parts of one step from the roofline ``parts`` (``compute_s``, ``memory_s``,
    ``attention_s``, ``recompute_s``, ``optimizer_s``, ``communication_s``, ``dequantization_s``,
    ``offload_s``; the roofline's ``overhead_s`` is replaced by ``exposed_host_s`` of the
    grounded device time) of a set-up whose
    ``features`` are ``feats`` (scalars, or arrays over many set-ups for a fit), with the
    constants ``values``. Returns the same keys plus ``pipeline_bubble_s``; their sum is the step."""
    # a power-capped part (ceiling.POWER_CAPPED) runs its chip's matmul and attention kernels at a lower
    # sustained clock (its own memory bandwidth is in the roofline's memory-bound time already)
    capped = np.where(feats["power_capped"], values["power_cap.h100-500w"], 1.0)
    scale = capped * DEFAULT_MAX_EFFICIENCY / (np.asarray(feats["ceiling"]) * values["efficiency.step"])
    compute = parts["compute_s"] * scale
    # flash kernels at their own ceiling; eager attention is two batched GEMMs, priced as the matmuls
    flash_rate = np.asarray(feats["attention_ceiling"]) * values["efficiency.attention"]
    flash_scale = capped * DEFAULT_MAX_EFFICIENCY / flash_rate
    attention = parts["attention_s"] * np.where(feats["flash"], flash_scale * values["attention_core"], scale)
    # op-level selective checkpointing (HF, torchtitan) reruns small ops beyond the counted work; Megatron's selective
    # mode reruns only the attention core's softmax and dropout (Korthikanti et al. 2022 sec. 4.2)
    op_level = np.asarray(feats["selective"]) & (np.asarray(feats["stack"]) != "megatron")
    recompute = parts["recompute_s"] * scale + np.where(op_level, values["selective_recompute"] / 3.0, 0.0) * compute
    memory = parts["memory_s"] * np.where(feats["fused"], values["memory.fused"], values["memory.eager"])
    # each stage runs 1/pp of the layers; the last one also the head (Megatron's layout: the
    # slowest stage sets the pace of the pipeline)
    share = feats["head_share"]
    stage = (1.0 - share) / feats["pipeline_parallel"] + share
    framework = _lookup(values, "framework", feats["stack"]) * stage * feats["pipeline_parallel"] / feats["split"]
    stack = np.asarray(feats["stack"])
    exposure = np.where(stack == "hf", values["communication.hf"], values["communication.native"])
    out = {
        "compute_s": compute * framework,
        "attention_s": attention * framework,
        "memory_s": memory * framework,
        "recompute_s": recompute * framework,
        "optimizer_s": parts["optimizer_s"],
        "communication_s": parts["communication_s"] * exposure,
        "dequantization_s": parts["dequantization_s"] * values["qlora_dequant_factor"] * framework,
        "offload_s": parts["offload_s"],  # PCIe copies beyond the roofline compute they overlap, as priced
    }
    device = out["compute_s"] + out["attention_s"] + out["memory_s"] + out["recompute_s"]
    # DeepSpeed ZeRO-3's fetch hooks are Python on the host: they run ahead of the device like any host op
    host = np.asarray(feats["host_s"], dtype=np.float64) + values["zero3_s_per_module_visit.hf"] * np.asarray(
        feats["zero3_fetch_units"], dtype=np.float64)
    # the device is busy with its kernels; under HF + ZeRO-3 also with the gathers and reductions the hooks
    # launch every micro-batch, which the host's time overlaps too (elsewhere the step's collectives stay serial:
    # a DDP reduction ends the step, and the search's step stays affine in the accumulation)
    gathers = np.where(np.asarray(feats["zero3_fetch_units"]) > 0, out["communication_s"], 0.0)
    busy = device + out["dequantization_s"] + gathers
    out["overhead_s"] = exposed_host_s(busy, host, feats["cpu"], values["host_overlap_p"])
    out["pipeline_bubble_s"] = device * feats["bubble"]
    return out


def exposed_host_s(device_s, host_s, cpu, p: float):
    """Host time of a step not hidden behind its grounded device time: the smooth maximum
    ``(host^p + device^p)^(1/p)`` less the device time, ``p = host_overlap_p``. The host runs ahead
    of the device, so a host-bound step takes about its host time, not host plus device time; the
    smooth maximum charges more where the two are close (fitted on Qwen-1's single-GPU runs; what
    stalls the queue there, synchronisations such as the loss's ``.item()`` or gradient clipping,
    is a hypothesis). ``host_s``: the host's seconds (its ops and ZeRO-3's fetch hooks); ``cpu``: the
    device is the CPU, where the host adds."""
    host, device = np.asarray(host_s, dtype=np.float64), np.asarray(device_s, dtype=np.float64)
    high, low = np.maximum(host, device), np.minimum(host, device)
    smooth = high * (1.0 + (low / np.maximum(high, 1e-300)) ** p) ** (1.0 / p)
    return np.where(cpu, host, smooth - device)


@lru_cache(maxsize=1)
def load_constants() -> dict:
    """The committed fit: ``{"values": {...}, "interval_log_ratio": {regime: [low, high]}, ...}``."""
    from planner.specs.catalog import catalog_root

    file = catalog_root().joinpath(*CONSTANTS_FILE)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlannerError(f"cannot read the time model's constants {file}: {exc} "
                           "(python benchmarks/bench_time_published.py --write refits them)") from exc
    missing = sorted(set(PRIOR) - set(data.get("values", {})))
    if missing:
        raise PlannerError(f"time model constants {file} lack {', '.join(missing)}: refit them")
    return data
