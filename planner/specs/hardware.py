"""Hardware: one accelerator (``GpuSpec``, read from ``models_catalog/gpus.json`` with a source
for every figure) and what a training process holds on it besides its tensors.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

# --- what a training process holds on a GPU besides its tensors (defaults; a calibration
# profile measures them)
CUDA_CONTEXT_BYTES = 512 * 1024**2
"""The CUDA context held outside PyTorch's allocator (driver, lazily loaded kernels), the
``driver_context_bytes`` of ``models_catalog/device_overheads.json`` (sources there); the fixed part
a verdict adds is ``default_context_bytes`` (this plus the cuBLAS workspaces per architecture)."""
ALLOCATOR_RESERVE_FRACTION = 0.06
"""Reserved-but-unallocated share of the caching allocator at the peak (block rounding and
fragmentation); 5-10% is typical for transformer training without expandable segments."""


def default_context_bytes(gpu: GpuSpec | None, stack: str = "hf") -> tuple[float, str]:
    """Bytes a ``stack`` training process holds on ``gpu`` outside the memory model's tensors, and
    where the figure comes from: the CUDA context plus the cuBLAS workspaces of its two handles,
    whose size depends on the architecture (``models_catalog/device_overheads.json``, every
    figure with its source). ``gpu=None``: the default architecture. A calibration profile
    replaces the whole figure by its measurement."""
    table = _overheads_table()
    arch = next((a for a, names in table["architectures"].items() if gpu is not None and gpu.name in names), None)
    if arch is None and gpu is not None and gpu.vendor.lower() == "amd":
        arch = "rocm"
    workspace = table["cublas_workspace_bytes"].get(arch or "default", table["cublas_workspace_bytes"]["default"])
    handles = table["cublas_handles_per_process"]
    total = table["driver_context_bytes"] + handles * workspace + table["stacks"].get(stack, 0)
    source = (f"CUDA context {table['driver_context_bytes'] / 2**20:.0f} MiB + {handles} cuBLAS workspaces of "
              f"{workspace / 2**20:.3g} MiB ({arch or 'default'}); models_catalog/device_overheads.json")
    return float(total), source


@lru_cache(maxsize=1)
def _overheads_table() -> dict:
    import json

    from planner.specs.catalog import catalog_root

    return json.loads(catalog_root().joinpath("device_overheads.json").read_text(encoding="utf-8"))


class GpuSpec(BaseModel):
    """One accelerator, every figure with its source (see models_catalog/gpus.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    aliases: tuple[str, ...] = ()
    vendor: str
    memory_bytes: int = Field(gt=0)
    memory_bandwidth_bytes_per_s: float = Field(gt=0)
    # dense (no structured sparsity) peak tensor throughput per dtype, FLOP/s
    peak_flops: dict[str, float]
    interconnect: str
    interconnect_bandwidth_bytes_per_s: float = Field(gt=0, description="per GPU, one direction")
    price_usd_per_hour: float | None = Field(None, description="indicative on-demand price, see source")
    sources: dict[str, str] = Field(description="figure name -> where it comes from")

    def peak_flops_for(self, dtype: str) -> float:
        """Dense peak for a precision mode. fp32 means true fp32: PyTorch leaves TF32 matmuls off
        by default (``torch.backends.cuda.matmul.allow_tf32 = False`` since 1.12)."""
        key = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(dtype, dtype)
        if key not in self.peak_flops:
            from planner.errors import PlannerError

            raise PlannerError(
                f"GPU {self.name} has no peak FLOP/s for {dtype!r}; known: {', '.join(self.peak_flops)}"
            )
        return self.peak_flops[key]

    def computes_in(self, precision: str) -> bool:
        """Whether the GPU has tensor units for the precision mode (T4 and V100 have no bf16)."""
        return {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(precision, precision) in self.peak_flops

    def require_precision(self, precision: str) -> None:
        """A one-line refusal of a precision the GPU cannot compute in (bf16 on a T4 or V100)."""
        if not self.computes_in(precision):
            from planner.errors import PlannerError

            usable = [p for p in ("bf16-mixed", "fp16-mixed", "fp32") if self.computes_in(p)]
            raise PlannerError(f"{self.name} has no {precision.removesuffix('-mixed')} units: "
                               f"use --precision {' or '.join(usable)}")
