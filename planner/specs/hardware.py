"""Hardware: one accelerator (``GpuSpec``, read from ``models_catalog/gpus.json`` with a source
for every figure) and what a training process holds on it besides its tensors.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# --- what a training process holds on a GPU besides its tensors (defaults; a calibration
# profile measures them)
CUDA_CONTEXT_BYTES = 512 * 1024**2
"""CUDA context + cuBLAS/cuDNN workspaces held outside PyTorch's allocator: ~0.5 GiB on A100/H100
with torch 2.x and lazy module loading (nvidia-smi minus torch.cuda.memory_reserved)."""
ALLOCATOR_RESERVE_FRACTION = 0.06
"""Reserved-but-unallocated share of the caching allocator at the peak (block rounding and
fragmentation); 5-10% is typical for transformer training without expandable segments."""


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
