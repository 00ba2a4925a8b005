"""What a set-up needs on the device and whether it fits: the one memory verdict of `planner
estimate`, `fit`, `plan` and `compare`, with or without a calibration profile.

    device bytes = reserved(peak allocated) + context
    reserved     = (1 + reserve_fraction) x allocated + reserve_offset   (CUDA caching allocator)
                 = allocated                                             (a CPU: no allocator cache)

The peak allocated bytes are ``planner.cost.memory.phases``'s, or with a profile the corrected ones
(``planner.cost.calibrated.calibrated_phases``); the reserve and the context are the defaults of
``planner.specs.hardware``, or the profile's fitted reserve and measured context. A set-up fits
when its device bytes are at most the device's memory, which (the reserve being affine and
increasing) is its peak allocated bytes at most ``usable_allocated_bytes``: the form a search
over arrays compares against. The headroom is memory minus device bytes in every verb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.specs.hardware import ALLOCATOR_RESERVE_FRACTION, GpuSpec, default_context_bytes

CALIBRATED_MEMORY_FIELDS = ("peak_bytes", "peak_phase", "phases", "overheads", "gpu")
"""The keys of an estimate whose numbers a profile replaces (listed in its ``calibrated_fields``);
``components`` stay the memory model's (the corrections act per phase, not per component)."""


@dataclass(frozen=True)
class Overheads:
    """What a process holds on the device besides its live tensors."""

    context_bytes: float  # outside the allocator: CUDA context, library workspaces
    reserve_fraction: float  # allocator: reserved = (1 + f) x allocated + offset
    reserve_offset_bytes: float
    calibrated: bool
    source: str


def overheads(gpu: GpuSpec | None, profile=None, stack: str = "hf") -> Overheads:
    """The defaults for ``gpu`` (``hardware.default_context_bytes``), or the profile's fitted
    reserve and measured context; a profile of another device is refused (one line)."""
    if profile is None:
        context, source = default_context_bytes(gpu, stack)
        return Overheads(float(context), ALLOCATOR_RESERVE_FRACTION, 0.0, False, source)
    if gpu is not None and not profile.matches(gpu):
        raise PlannerError(f"calibration profile was measured on {profile.device.name}, not {gpu.name}: "
                           f"calibrate on {gpu.name} (planner calibrate) or leave out --calibration")
    c = profile.corrections
    source = f"calibration profile of {profile.device.name} ({profile.created:%Y-%m-%d})"
    if profile.device.kind == "cpu":  # no caching allocator: reserved equals allocated
        return Overheads(float(c.context_bytes), 0.0, 0.0, True, source)
    return Overheads(float(c.context_bytes), float(c.reserve_fraction), float(c.reserve_offset_bytes), True, source)


def reserved_bytes(allocated, over: Overheads):
    """Peak reserved by the caching allocator for a peak allocated (scalar or array)."""
    return np.asarray(allocated, dtype=np.float64) * (1.0 + over.reserve_fraction) + over.reserve_offset_bytes


def device_bytes(allocated, over: Overheads):
    """What the process holds on the device: reserved plus the context (scalar or array)."""
    return reserved_bytes(allocated, over) + over.context_bytes


def usable_allocated_bytes(gpu: GpuSpec, profile=None, stack: str = "hf") -> float:
    """The largest peak allocated that fits on ``gpu`` (the inverse of ``device_bytes``)."""
    over = overheads(gpu, profile, stack)
    return (gpu.memory_bytes - over.context_bytes - over.reserve_offset_bytes) / (1.0 + over.reserve_fraction)


def fits_mask(allocated, gpu: GpuSpec, over: Overheads):
    """Whether each peak allocated fits on ``gpu`` (scalar or array of bools)."""
    return device_bytes(allocated, over) <= gpu.memory_bytes


def peak_allocated_bytes(spec, setup, micro_batch=None, seq_len=None, lora_rank=None, profile=None,
                         device: str = "cuda", cache: dict | None = None):
    """Peak allocated bytes per GPU over arrays of micro-batch, sequence length and LoRA rank:
    ``planner.cost.memory.phases``, or calibrated by ``profile`` (whose device decides the kernels)."""
    if profile is None:
        from planner.cost.memory.phases import training_peak_bytes

        return training_peak_bytes(spec, setup, micro_batch, seq_len, lora_rank, device=device, cache=cache)
    from planner.cost.calibrated import calibrated_peak_bytes

    return calibrated_peak_bytes(profile, spec, setup, micro_batch, seq_len, lora_rank)


def memory_verdict(peak_bytes: float, gpu: GpuSpec | None, profile=None, stack: str = "hf") -> dict:
    """``estimate``'s ``overheads`` block and, with a device, its ``gpu`` block (fits, headroom)
    for a peak allocated; ``calibrated`` says whether a profile set the overheads."""
    over = overheads(gpu, profile, stack)
    reserved = float(reserved_bytes(peak_bytes, over))
    need = reserved + over.context_bytes
    out = {"overheads": {
        "peak_allocated_bytes": float(peak_bytes),
        "cuda_context_bytes": over.context_bytes,
        "cuda_context_source": over.source,
        "allocator_reserve_bytes": reserved - float(peak_bytes),
        "estimated_reserved_bytes": reserved,
        "estimated_device_bytes": need,
        "calibrated": over.calibrated,
    }}
    if gpu is not None:
        out["gpu"] = {"name": gpu.name, "memory_bytes": gpu.memory_bytes, "fits": bool(need <= gpu.memory_bytes),
                      "headroom_bytes": float(gpu.memory_bytes - need), "calibrated": over.calibrated}
    return out


def leaves_out_note(setup) -> str:
    """What the memory estimate does not count, in words (every estimate carries it)."""
    parts = ["fragmentation beyond the allocator reserve (it grows over long runs with varying sequence lengths; "
             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True shrinks it)",
             "memory of other processes on the GPU", "the data loader's and pinned host buffers (host side)",
             "kernels' transient workspaces outside the caching allocator"]
    if getattr(setup, "compile", False):
        parts.append("torch.compile's autotuning workspaces and CUDA-graph pools")
    if setup.num_gpus > 1:
        parts.append("NCCL communicator buffers and channels")
    return ("memory leaves out: " + "; ".join(parts) + ". It counts the tensors at the peak phase, the caching "
            "allocator's reserve and a fixed part (CUDA context and cuBLAS workspaces by architecture, "
            "models_catalog/device_overheads.json); a calibration profile measures the reserve and fixed part")
