"""One configuration (or a vectorized sweep) -> memory by component and phase, FLOPs, params.

This composes ``params``, ``flops`` and ``memory``; the CLI and the optimizer call it. Nothing
here imports torch or transformers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from planner.cost.flops import every_second_matmul_flops, step_flops
from planner.cost.memory.activation_memory import compute_setup
from planner.cost.memory.device import memory_verdict
from planner.cost.memory.phases import training_memory
from planner.cost.params import count_params, lora_params, lora_targets
from planner.cost.support import require_priced
from planner.specs.architecture import lora_expert_targets
from planner.specs.hardware import GpuSpec
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


def recompute_fraction(setup: TrainingSetup) -> float:
    """Share of the layers' forward FLOPs rerun in backward: all of it for full checkpointing;
    none for op-level selective checkpointing but for torchtitan's every second matmul
    (``reruns_every_second_matmul``)."""
    return 1.0 if setup.checkpointing == "full" else 0.0


def checkpoint_early_stops(setup: TrainingSetup) -> bool:
    """Whether activation checkpointing stops recomputing once backward has what it needs (torch's
    non-reentrant default since it exists, which leaves each dense layer's down projection out:
    ``flops.step_flops``). torchtitan passes ``early_stop=False`` to its wrappers since its PR #1580
    (2025-08-29; 0.3.0's ``distributed/activation_checkpoint.py``, and its block traced under
    FlopCounterMode reruns the whole forward: ``tests/test_torchtitan_memory.py``); a set-up may say."""
    return setup.checkpoint_early_stop if setup.checkpoint_early_stop is not None else setup.stack != "torchtitan"


def reruns_every_second_matmul(setup: TrainingSetup) -> bool:
    """torchtitan's ``SelectiveAC`` reruns every second matmul of a block (``flops.every_second_matmul_flops``);
    its float8 linears run ``aten._scaled_mm``, which it neither counts as a matmul nor reruns (torch's
    ``compute_intensive_ops``, in 0.3.0's save set); the Hugging Face stack's op-level selective
    checkpointing keeps every matmul output (the memory model's ``selective_kept_per_token``) and reruns
    elementwise ops only."""
    return setup.checkpointing == "selective" and setup.stack == "torchtitan" and not setup.float8


def training_flops(spec: ModelSpec, setup: TrainingSetup, micro_batch=None, seq_len=None, lora_rank=None):
    b = setup.micro_batch if micro_batch is None else micro_batch
    s = setup.seq_len if seq_len is None else seq_len
    rank = setup.lora_rank if lora_rank is None else lora_rank
    adapted = tuple(lora_targets(spec, setup.lora_targets)) if setup.method != "full" else ()
    experts = tuple(lora_expert_targets(spec, setup.lora_targets)) if setup.method != "full" else ()
    skips_down = (checkpoint_early_stops(setup) and not (setup.stack == "torchtune" and setup.method != "full")
                  and not setup.float8)
    flops = step_flops(
        spec,
        b,
        s,
        trainable_base=setup.method == "full",
        lora_rank=rank,
        lora_linears=adapted,
        recompute_fraction=recompute_fraction(setup),
        recompute_skips_down_projection=skips_down,
        trained_modules=tuple(setup.modules_to_save) if setup.method != "full" else (),
        expert_lora=experts,
        input_requires_grad=setup.stack == "hf" and setup.checkpointing != "none",
    )
    if reruns_every_second_matmul(setup):
        tokens = np.asarray(b, dtype=np.float64) * np.asarray(s, dtype=np.float64)
        flops = dataclasses.replace(flops, recompute=flops.recompute + every_second_matmul_flops(spec, tokens))
    return flops


def estimate(spec: ModelSpec, setup: TrainingSetup, gpu: GpuSpec | None = None, device: str = "cuda",
             cluster: str | None = None, profile=None) -> dict:
    """The ``planner estimate --json`` object for one configuration (SI units).

    ``device="cpu"`` reproduces CPU kernels' small differences (for the fake-tensor oracle).
    With a ``gpu``: the step time, tokens per second, MFU and dollars per million tokens with
    their 80% intervals (``planner.cost.timing.intervals``) on the ``cluster`` (a catalog name; None:
    the default cluster). ``profile``: a calibration profile (``planner.specs.profile``) corrects
    the peak, the phases, the overheads, fits and headroom (on ``gpu``, else the profile's device)
    and the step time; ``calibrated_fields`` names them (``planner.cost.memory.device``)."""
    require_priced(setup)
    if gpu is not None:
        gpu.require_precision(setup.precision)
    memory = training_memory(spec, setup, device=device)
    flops = training_flops(spec, setup)
    counts = count_params(spec)
    trainable = counts.total if setup.method == "full" else lora_params(spec, setup.lora_targets, setup.lora_rank)
    phases = _phases(spec, setup, memory, profile)
    peak_phase = str(memory.peak_phase) if profile is None else max(phases, key=phases.get)
    peak = float(memory.peak_bytes) if profile is None else phases[peak_phase]
    result = {
        "model": spec.name,
        "setup": setup.model_dump(mode="json"),
        "peak_bytes": peak,
        "peak_phase": str(peak_phase),
        "phases": phases,
        "components": {name: float(value) for name, value in memory.components.items()},
        "flops_per_micro_batch": float(flops.model),  # the whole model's, one micro-batch (step_time: the step's)
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
        "tokens_per_micro_batch": setup.tokens_per_micro_batch,  # one replica's, as flops_per_micro_batch
        "tokens_per_step": setup.tokens_per_micro_batch * setup.grad_accum * setup.data_parallel,  # every replica's
        "notes": _notes(spec, setup),
    }
    # one verdict for every verb: planner.cost.memory.device (the profile's device when no GPU is named)
    device = gpu or (profile.device_spec() if profile is not None else None)
    result.update(memory_verdict(peak, device, profile, setup.stack))
    if device is not None:  # time on the GPU, or on the profile's device (once, with its verdict's notes)
        from planner.cost.timing.intervals import near_capacity, time_fields, time_notes

        timing = time_fields(spec, setup, device, cluster, profile)
        result.update(timing)
        verdict = result.get("gpu", {})
        headroom = verdict["headroom_bytes"] / verdict["memory_bytes"] if verdict.get("fits") else None
        if "time" in timing:
            timing["time"].update(headroom_share=headroom, near_capacity=near_capacity(headroom))
        result["notes"] = result["notes"] + time_notes(timing, headroom, fits=verdict.get("fits", True))
    if profile is not None:
        result["calibrated_fields"] = calibrated_fields(result)
    return result


def _phases(spec: ModelSpec, setup: TrainingSetup, memory, profile) -> dict[str, float]:
    """Live bytes per phase: the memory model's, or corrected by the calibration profile."""
    if profile is None:
        return {name: float(value) for name, value in memory.phases.items()}
    from planner.cost.calibrated import calibrated_phases

    return {name: float(value) for name, value in calibrated_phases(profile, spec, setup).items()}


def calibrated_fields(result: dict) -> list[str]:
    """The keys of an estimate a calibration profile set (the memory verdict and the time fields)."""
    from planner.cost.memory.device import CALIBRATED_MEMORY_FIELDS

    timed = result.get("time", {}).get("calibrated")
    keys = [k for k in CALIBRATED_MEMORY_FIELDS if k in result]
    return keys + (time_keys(result) if timed else [])


def time_keys(result: dict) -> list[str]:
    """The keys of an estimate that ``planner.cost.timing.intervals.time_fields`` wrote."""
    return [k for k in result if k.startswith(("step_time_s", "tokens_per_s", "mfu", "usd_per_million_tokens"))
            or k in ("achieved_flops_per_s", "price_usd_per_gpu_hour", "time")]


def sweep(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len, lora_rank=None) -> dict[str, np.ndarray]:
    """Peak bytes and FLOPs over arrays of micro-batch, sequence length and LoRA rank."""
    memory = training_memory(spec, setup, micro_batch, seq_len, lora_rank)
    flops = training_flops(spec, setup, micro_batch, seq_len, lora_rank)
    return {"peak_bytes": memory.peak_bytes,
            "flops_per_micro_batch": np.broadcast_to(flops.model, np.shape(memory.peak_bytes))}


def _notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What this estimate leaves out or assumes, in words."""
    from planner.cost.memory.device import leaves_out_note

    notes = [leaves_out_note(setup)]
    if setup.stack == "megatron":
        from planner.cost.memory.megatron_stack import NOTE as megatron_note

        notes.append(megatron_note)
    if spec.is_moe and setup.method != "full" and lora_expert_targets(spec, setup.lora_targets):
        notes.append(
            "LoRA on stacked experts as peft 0.21 wraps them (lora.ParamWrapper): the merged W + BA of each "
            "wrapped stack is kept for backward and its full gradient made once per layer; priced, with the "
            "baddbmm fold's FLOPs"
        )
    if setup.method == "qlora":
        prepared = setup.kbit_preparation or setup.precision == "bf16-mixed"
        notes.append(
            "QLoRA: every nn.Linear projection in NF4 (bitsandbytes, double quantization; stacked expert weights "
            "stay in the base dtype); " + (
                "embeddings, norms and head in fp32 (peft's prepare_model_for_kbit_training; bf16-mixed keeps "
                "them so anyway)" if prepared else "head, embeddings and norms in bf16 (peft's prepare_model_for_kbit_training, "
                "which upcasts them to fp32, is priced with --kbit-preparation)")
        )
    if compute_setup(setup) is not setup:
        notes.append("DeepSpeed bf16: weights, activations and adapters in bf16 without autocast, fp32 master "
                     "weights and states in its optimizer")
    if setup.offload_optimizer and setup.zero == 0 and setup.stack == "hf":
        notes.append("offload_optimizer with ZeRO-0: optimizer states on the host and a CPU step, the stand-in for "
                     "paged optimizers; DeepSpeed's ZeRO-Offload itself runs under ZeRO-1/2/3 (--zero 2 on one GPU)")
    if setup.num_gpus > 1:
        from planner.cost.memory import zero_buffers

        buffers = ("DeepSpeed ZeRO's buckets and buffers as the exported config sets them (zero_buffers)"
                   if zero_buffers.applies(setup) else "communication buffers are not counted")
        notes.append("sharding: ZeRO/FSDP state partitioning and tensor-parallel splits per Rajbhandari et al. and "
                     "Shoeybi et al.; " + buffers)
    return notes
