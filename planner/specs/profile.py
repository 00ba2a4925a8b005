"""Calibration profiles as data: the versioned JSON schema that ``planner calibrate`` writes and
``--calibration`` reads, with loading and saving. Fitting lives in ``planner.truth.calibrate``;
applying a profile to estimates in ``planner.cost.calibrated``.

What is corrected (``Corrections``), and from which measurements:

- memory: ``calibrated_peak = max over phases p (static_factor x S_p + activation_factor x D_p
  + offset_p)``, where for each phase p of ``planner.cost.memory.phases`` S_p is its bytes with no tokens
  (weights, gradients, states, optimizer temporaries) and D_p the rest (activations, logits,
  loss temporaries). Fitted on measured peak allocated bytes, per method (full, LoRA, QLoRA:
  their analytic residuals differ in kind, so a method that was not measured gets none).
- allocator: ``reserved = (1 + reserve_fraction) x allocated + reserve_offset`` (block rounding
  and fragmentation of the caching allocator as an affine function of size), fitted on measured
  (allocated, reserved) pairs; ``context_bytes`` (memory held outside the allocator: CUDA
  context, cuBLAS workspaces) as measured before the first step. A CPU has no caching
  allocator: reserved equals allocated and the context is 0.
- time (``planner.cost.timing.step_time``): ``efficiency_scale`` (achieved share of the roofline's matmul
  efficiency), ``efficiency_size_exponent`` (how that share grows with the geometric-mean
  matmul side, relative to 1024), ``memory_time_factor`` and ``optimizer_time_factor``
  (residual factors of the memory-bound and optimizer terms), ``host_overhead_s_per_op``.

Splits: every third point of a calibration grid (index 2, 5, 8, ...) is held out of the fit;
the accuracy table reports errors before (defaults) and after (fitted) for every point.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from planner.errors import PlannerError, read_user_text
from planner.specs.hardware import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES, GpuSpec
from planner.specs.setup import TrainingSetup

SCHEMA_VERSION = 1
HOLDOUT_EVERY = 3
"""Points with ``index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1`` are held out of the fit."""

Source = Literal["run", "snapshot", "chrome-trace", "trainer-state", "csv"]


_NUMBERS = (float, int, float | None, int | None)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value, info):
        """pydantic reads true as 1: in a number field of a profile it is a mistake, not a 1."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in _NUMBERS:
            raise ValueError("expected a number, got a boolean")
        return value


class DeviceInfo(_Model):
    """Where the measurements were taken. ``spec`` is the roofline the time model uses: the
    catalog's GPU when the device is in the catalog ("catalog"); for a CPU, its nominal peak
    from clock and ISA and a measured copy bandwidth ("nominal"); else figures measured by
    micro-benchmarks (a large matmul per dtype, a large copy) on the device ("measured")."""

    kind: Literal["cpu", "cuda"]
    name: str
    memory_bytes: int
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    transformers_version: str | None = None
    python_version: str | None = None
    platform: str | None = None
    num_threads: int | None = None
    spec: GpuSpec
    spec_source: Literal["catalog", "measured", "nominal"] = "measured"


class Measurement(_Model):
    """One measured configuration. Bytes are per device; ``step_time_s`` is one optimizer step
    (``setup.grad_accum`` micro-batches and the optimizer), the median of the timed steps."""

    label: str
    model: str = Field(description="key of Profile.configs")
    num_layers: int | None = Field(None, description="decoder layers run (None: the config's)")
    setup: TrainingSetup
    source: Source = "run"
    split: Literal["fit", "holdout"] = "fit"
    status: Literal["ok", "oom", "skipped"] = "ok"
    peak_allocated_bytes: float | None = Field(None, ge=0)
    peak_reserved_bytes: float | None = Field(None, ge=0)
    context_bytes: float | None = Field(None, ge=0)
    step_time_s: float | None = Field(None, ge=0)
    step_time_spread_s: float | None = Field(None, ge=0, description="max - min of the timed steps")
    steps_timed: int = Field(0, ge=0)
    achieved_flops_per_s: float | None = Field(None, ge=0)
    note: str = ""


PHASES = ("forward", "backward", "optimizer")


class MemoryCorrection(_Model):
    """``peak = max over phases p (static_factor x S_p + activation_factor x D_p + offset_p)``."""

    static_factor: float = Field(1.0, gt=0)
    activation_factor: float = Field(1.0, gt=0)
    phase_offsets_bytes: dict[str, float] = Field(default_factory=dict)


class Corrections(_Model):
    """Fitted corrections; the defaults are the uncalibrated model (see the module docstring)."""

    memory: dict[str, MemoryCorrection] = Field(
        default_factory=dict, description="by method (full, lora, qlora); '*' would apply to any other method"
    )
    reserve_fraction: float = Field(ALLOCATOR_RESERVE_FRACTION, ge=0)
    reserve_offset_bytes: float = 0.0
    context_bytes: float = Field(CUDA_CONTEXT_BYTES, ge=0)
    efficiency_scale: float = Field(1.0, gt=0, description="a share of the roofline: positive")
    efficiency_size_exponent: float = 0.0
    memory_time_factor: float = Field(1.0, gt=0)
    optimizer_time_factor: float = Field(1.0, gt=0)
    host_overhead_s_per_op: float | None = Field(None, ge=0, description="None: the time model's default")
    communication_factor: float = Field(1.0, gt=0, description="not fitted from single-device runs")
    fitted: list[str] = Field(default_factory=list, description="which fields were fitted")

    def memory_for(self, method: str) -> MemoryCorrection:
        """The method's own memory correction, else the pooled one ('*'), else none."""
        return self.memory.get(method) or self.memory.get("*") or MemoryCorrection()


class AccuracyRow(_Model):
    label: str
    split: Literal["fit", "holdout"]
    measured_step_time_s: float | None = None
    before_step_time_s: float | None = None
    after_step_time_s: float | None = None
    measured_peak_bytes: float | None = None
    before_peak_bytes: float | None = None
    after_peak_bytes: float | None = None
    measured_reserved_bytes: float | None = None
    before_reserved_bytes: float | None = None
    after_reserved_bytes: float | None = None


class Profile(_Model):
    """A calibration profile (``planner calibrate --out``), versioned JSON."""

    schema_version: Literal[1] = SCHEMA_VERSION
    created: _dt.datetime
    planner_version: str | None = None
    device: DeviceInfo
    configs: dict[str, dict[str, Any]] = Field(description="model name -> HF config.json of the runs")
    measurements: list[Measurement]
    corrections: Corrections
    accuracy: list[AccuracyRow] = Field(default_factory=list)
    summary: dict[str, float | None] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def device_spec(self) -> GpuSpec:
        return self.device.spec

    def matches(self, gpu: GpuSpec) -> bool:
        """Whether ``gpu`` is the device this profile was measured on (name or alias)."""
        own = {self.device.spec.name.lower(), self.device.name.lower(), *(a.lower() for a in self.device.spec.aliases)}
        theirs = {gpu.name.lower(), *(a.lower() for a in gpu.aliases)}
        return bool(own & theirs)


# ------------------------------------------------------------------------------ load / save


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; any problem is one PlannerError line naming the file."""
    path = Path(path)
    if not path.exists():
        raise PlannerError(f"calibration profile {path} does not exist (make one with `planner calibrate`)")
    try:
        data = json.loads(read_user_text(path, "calibration profile"))
    except json.JSONDecodeError as exc:
        raise PlannerError(f"calibration profile {path} is not JSON: {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(data, dict):
        raise PlannerError(f"calibration profile {path} is not a JSON object")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise PlannerError(
            f"calibration profile {path} has schema_version {version}; this planner reads {SCHEMA_VERSION}: upgrade planner"
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "profile"
        raise PlannerError(f"calibration profile {path} is invalid at {where}: {first['msg']}") from None


def save_profile(profile: Profile, path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        raise PlannerError(f"cannot write the profile to {path}: it is a directory; give a file name such as "
                           f"{path / 'profile.json'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=2) + "\n", encoding="utf-8")


def default_corrections(device_kind: str) -> Corrections:
    """The uncalibrated model on this kind of device (a CPU has no allocator cache, no context)."""
    if device_kind == "cpu":
        return Corrections(reserve_fraction=0.0, context_bytes=0.0)
    return Corrections()
