"""Estimates corrected by a calibration profile (``planner calibrate``): peak allocated and
reserved bytes, step time, and what the allocator leaves usable on the profiled device.

The corrections and their meaning are documented with the schema in ``planner.specs.profile``.
Nothing here imports torch, so ``planner estimate --calibration`` stays fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from planner.errors import PlannerError
from planner.specs.hardware import GpuSpec
from planner.specs.profile import Corrections, MemoryCorrection, Profile
from planner.specs.setup import TrainingSetup

# ------------------------------------------------------------------------------ predictions


def _spec_for(profile_configs: dict, model: str, num_layers: int | None, cache: dict | None = None):
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    key = (model, num_layers)
    if cache is not None and key in cache:
        return cache[key]
    config = profile_configs[model]
    if num_layers is not None:
        config = reduce_layers(config, num_layers)
    spec = model_spec_from_config(config, name=model)
    if cache is not None:
        cache[key] = spec
    return spec


def _memory_parts(spec, setup: TrainingSetup, device_kind: str):
    """Per phase: (static bytes with no tokens, token-dependent bytes), from planner.cost.memory.phases."""
    from planner.cost.memory.phases import training_memory

    device = "cpu" if device_kind == "cpu" else "cuda"
    full = training_memory(spec, setup, device=device).phases
    empty = training_memory(spec, setup, micro_batch=0, device=device).phases
    return {p: (float(empty[p]), float(full[p]) - float(empty[p])) for p in full}


def predict_peak_bytes(spec, setup: TrainingSetup, corrections: Corrections, device_kind: str) -> float:
    parts = _memory_parts(spec, setup, device_kind)
    return _peak_from_parts(parts, corrections.memory_for(setup.method))


def calibrated_phases(profile: Profile, spec, setup: TrainingSetup, micro_batch=None, seq_len=None,
                      lora_rank=None) -> dict:
    """Calibrated live bytes of each phase, vectorized like ``planner.cost.memory.phases.training_memory``
    over micro-batch, sequence length and LoRA rank (the profile's device decides CPU or CUDA kernels)."""
    from planner.cost.memory.phases import training_memory

    device = "cpu" if profile.device.kind == "cpu" else "cuda"
    b = setup.micro_batch if micro_batch is None else micro_batch
    full = training_memory(spec, setup, b, seq_len, lora_rank, device=device).phases
    empty = training_memory(spec, setup, np.zeros_like(np.asarray(b, float)), seq_len, lora_rank, device=device).phases
    mc = profile.corrections.memory_for(setup.method)
    return {p: mc.static_factor * empty[p] + mc.activation_factor * (full[p] - empty[p])
            + mc.phase_offsets_bytes.get(p, 0.0) for p in full}


def calibrated_peak_bytes(profile: Profile, spec, setup: TrainingSetup, micro_batch=None, seq_len=None,
                          lora_rank=None):
    """Calibrated peak allocated bytes: the largest of ``calibrated_phases``."""
    phases = calibrated_phases(profile, spec, setup, micro_batch, seq_len, lora_rank).values()
    return np.max(np.stack(np.broadcast_arrays(*phases)), axis=0)


def _peak_from_parts(parts: dict, mc: MemoryCorrection) -> float:
    return max(mc.static_factor * s + mc.activation_factor * d + mc.phase_offsets_bytes.get(p, 0.0)
               for p, (s, d) in parts.items())


def predict_reserved_bytes(allocated: float, corrections: Corrections, device_kind: str) -> float:
    if device_kind == "cpu":
        return allocated
    return allocated * (1.0 + corrections.reserve_fraction) + corrections.reserve_offset_bytes


def predict_step_times(groups: list[tuple], gpu: GpuSpec, corrections: Corrections | None) -> np.ndarray:
    """Predicted step times of grouped points: each group is (spec, setup, micro_batches,
    seq_lens, indices) evaluated in one vectorized ``step_time`` call."""
    from planner.cost.timing.step_time import step_time

    count = sum(len(g[4]) for g in groups)
    out = np.empty(count)
    for spec, setup, b, s, idx in groups:
        out[idx] = step_time(spec, setup, gpu, micro_batch=b, seq_len=s, profile=corrections)["step_time_s"]
    return out


def group_points(items: list[tuple[Any, TrainingSetup]]) -> list[tuple]:
    """Group (spec, setup) items that differ only in micro-batch and sequence length."""
    groups: dict = {}
    for index, (spec, setup) in enumerate(items):
        key = (id(spec), setup.model_copy(update={"micro_batch": 1, "seq_len": 1}))
        entry = groups.setdefault(key, (spec, key[1], [], [], []))
        entry[2].append(setup.micro_batch)
        entry[3].append(setup.seq_len)
        entry[4].append(index)
    return [(spec, setup, np.array(b, float), np.array(s, float), np.array(i)) for spec, setup, b, s, i in groups.values()]


# ------------------------------------------------------------------------------------ apply


def apply_profile(profile: Profile, spec, setup: TrainingSetup, result: dict, gpu: GpuSpec | None) -> dict:
    """``planner estimate --calibration``: the issue-2 result plus, calibrated on the profile's
    device, ``step_time_s`` (one optimizer step: ``grad_accum`` micro-batches and the
    optimizer; one micro-batch's step at the default grad_accum=1), ``reserved_bytes`` (peak
    reserved by the allocator), ``tokens_per_s``, ``mfu``, ``achieved_flops_per_s`` and a
    ``calibrated`` block with the breakdown. ``peak_bytes``, fits and headroom are calibrated by
    ``planner.cost.estimate.estimate(profile=)``."""
    from planner.cost.timing.step_time import step_time

    kind = profile.device.kind
    if gpu is not None and not profile.matches(gpu):
        raise PlannerError(
            f"calibration profile {profile.device.name!r} was measured on another device than {gpu.name}: "
            f"calibrate on {gpu.name} or leave out --gpu to answer for {profile.device.spec.name}"
        )
    device = gpu or profile.device_spec()
    corrections = profile.corrections
    allocated = predict_peak_bytes(spec, setup, corrections, kind)
    reserved = predict_reserved_bytes(allocated, corrections, kind)
    times = step_time(spec, setup, device, profile=profile)
    scalar = {k: float(np.asarray(v)) for k, v in times.items()}
    out = dict(result)
    out["step_time_s"] = scalar["step_time_s"]
    out["reserved_bytes"] = reserved
    out["tokens_per_s"] = scalar["tokens_per_s"]
    out["mfu"] = scalar["mfu"]
    out["achieved_flops_per_s"] = scalar["achieved_flops_per_s"]
    out["calibrated"] = {
        "device": profile.device.name,
        "profile_created": profile.created.isoformat(),
        "peak_allocated_bytes": allocated,
        "reserved_bytes": reserved,
        "context_bytes": corrections.context_bytes,
        "device_bytes": reserved + corrections.context_bytes,
        "time": scalar,
        "corrections": corrections.model_dump(mode="json"),
    }
    # fits and headroom: ``estimate(profile=)`` (planner.cost.memory.device), as in every verb
    notes = list(out.get("notes", []))
    measured = {(m.setup.method, m.setup.precision) for m in profile.measurements if m.status == "ok"}
    if (setup.method, setup.precision) not in measured:
        notes.append(f"calibration: no measurement of {setup.method} at {setup.precision} in the profile; "
                     "its corrections are extrapolated from the measured set-ups")
    if kind == "cpu":
        notes.append("calibration measured on a CPU: reserved equals allocated (no caching allocator)")
    out["notes"] = notes
    return out


def usable_allocated_bytes(profile: Profile, gpu: GpuSpec) -> float:
    """What PyTorch may allocate on ``gpu`` by the profile (``planner.cost.memory.device``)."""
    from planner.cost.memory.device import usable_allocated_bytes as usable

    return usable(gpu, profile)
