"""One configuration (or a vectorized sweep) -> memory by component and phase, FLOPs, params.

This composes ``params``, ``flops`` and ``memory``; the CLI and the optimizer call it. Nothing
here imports torch or transformers.
"""

from __future__ import annotations

import numpy as np

from planner.cost.flops import step_flops
from planner.cost.memory import training_memory
from planner.cost.params import count_params, lora_params, lora_targets
from planner.cost.support import require_priced
from planner.specs.hardware import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES, GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


def recompute_fraction(setup: TrainingSetup) -> float:
    """Share of the layers' forward FLOPs rerun in backward: all of it for full checkpointing;
    none of the matmuls for op-level selective checkpointing (only elementwise ops rerun)."""
    return 1.0 if setup.checkpointing == "full" else 0.0


def training_flops(spec: ModelSpec, setup: TrainingSetup, micro_batch=None, seq_len=None, lora_rank=None):
    b = setup.micro_batch if micro_batch is None else micro_batch
    s = setup.seq_len if seq_len is None else seq_len
    rank = setup.lora_rank if lora_rank is None else lora_rank
    adapted = tuple(lora_targets(spec, setup.lora_targets)) if setup.method != "full" else ()
    return step_flops(
        spec,
        b,
        s,
        trainable_base=setup.method == "full",
        lora_rank=rank,
        lora_linears=adapted,
        recompute_fraction=recompute_fraction(setup),
        recompute_skips_down_projection=not (setup.stack == "torchtune" and setup.method != "full"),
    )


def estimate(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None, device: str = "cuda") -> dict:
    """The ``planner estimate --json`` object for one configuration (SI units).

    ``device="cpu"`` reproduces CPU kernels' small differences (for the fake-tensor oracle)."""
    require_priced(setup)
    if gpu is not None:
        gpu.require_precision(setup.precision)
    memory = training_memory(spec, setup, device=device)
    flops = training_flops(spec, setup)
    counts = count_params(spec)
    trainable = counts.total if setup.method == "full" else lora_params(spec, setup.lora_targets, setup.lora_rank)
    peak = float(memory.peak_bytes)
    reserved = peak * (1 + ALLOCATOR_RESERVE_FRACTION)
    result = {
        "model": spec.name,
        "setup": setup.model_dump(mode="json"),
        "peak_bytes": peak,
        "peak_phase": str(memory.peak_phase),
        "phases": {name: float(value) for name, value in memory.phases.items()},
        "components": {name: float(value) for name, value in memory.components.items()},
        "overheads": {
            "cuda_context_bytes": CUDA_CONTEXT_BYTES,
            "allocator_reserve_bytes": reserved - peak,
            "estimated_reserved_bytes": reserved,
            "estimated_device_bytes": reserved + CUDA_CONTEXT_BYTES,
        },
        "flops_per_step": float(flops.model),
        "flops": {
            "forward": float(flops.forward),
            "backward": float(flops.backward),
            "recompute": float(flops.recompute),
            "executed": float(flops.executed),
            "by_component": {k: float(v) for k, v in flops.by_component.items()},
        },
        "params": {
            "total": counts.total,
            "trainable": float(trainable),
            "embedding": counts.embedding,
            "attention": counts.attention,
            "mlp": counts.mlp,
            "experts": counts.experts,
            "norms": counts.norms,
            "lm_head": counts.lm_head,
        },
        "tokens_per_step": setup.micro_batch * setup.seq_len * setup.data_parallel,
        "notes": _notes(spec, setup),
    }
    if gpu is not None:
        available = gpu.memory_bytes
        need = reserved + CUDA_CONTEXT_BYTES
        result["gpu"] = {
            "name": gpu.name,
            "memory_bytes": available,
            "fits": bool(need <= available),
            "headroom_bytes": float(available - need),
        }
    return result


def sweep(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len, lora_rank=None) -> dict[str, np.ndarray]:
    """Peak bytes and FLOPs over arrays of micro-batch, sequence length and LoRA rank."""
    memory = training_memory(spec, setup, micro_batch, seq_len, lora_rank)
    flops = training_flops(spec, setup, micro_batch, seq_len, lora_rank)
    return {"peak_bytes": memory.peak_bytes, "flops_per_step": np.broadcast_to(flops.model, np.shape(memory.peak_bytes))}


def _notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What this estimate leaves out or assumes, in words."""
    notes = []
    if spec.is_moe and setup.method != "full" and "all-linear" in setup.lora_targets:
        notes.append(
            "LoRA all-linear on a mixture of experts: adapters on the attention and dense projections only; "
            "peft >= 0.21 also wraps the stacked expert weights (materialising W + BA per expert), which this "
            "estimate does not include: `planner simulate` measures it"
        )
    if setup.method == "qlora":
        notes.append(
            "QLoRA: every projection in NF4 (bitsandbytes, double quantization), head and embeddings in bf16; "
            "peft's prepare_model_for_kbit_training (fp32 norms and head) is not applied"
        )
    if setup.num_gpus > 1:
        notes.append("sharding: ZeRO/FSDP state partitioning and tensor-parallel splits per Rajbhandari et al. and "
                     "Shoeybi et al.; communication buffers are not counted")
    return notes
