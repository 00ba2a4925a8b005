"""The achievable matmul ceiling of a GPU: the share of its datasheet peak that the best GEMM
shapes reach, measured independently of any training run.

``models_catalog/time_model/matmul_ceiling.csv`` holds Stas Bekman's "Maximum Achievable Matmul
FLOPS" (MAMF) table (ml-engineering, ``compute/accelerator/README.md``, commit 744d01e, Aug 2026;
measured with its ``benchmarks/mamf-finder.py``: a sweep of ``torch.matmul`` shapes, the mean of
100 iterations after 50 warm-up ones, the best shape kept), one row per GPU and input dtype
(bf16, fp8 e4m3); one row is derived, not his: MI300X fp8, his MI300X bf16 MAMF times AMD's
own fp8/bf16 ratio of max-achievable FLOPs (the row's source says where). The grounded time model (``planner.cost.timing.grounding``) prices a step's
matmuls at ``peak x ceiling x a whole-step factor shared by every GPU``, so a GPU generation
seen in one published training run only is still predicted from its own GEMM ceiling, not from
a constant fitted on that run.

A GPU without a row (consumer cards, L4/L40S, V100, A6000...) takes the median ceiling of the
table's distinct measurements of its vendor and dtype (``fallback_fraction``); a dtype without
a row on a GPU that has a bf16 row takes that bf16 ceiling times the vendor's median ratio of
the two dtypes.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from statistics import median

from planner.errors import PlannerError

CEILING_FILE = ("time_model", "matmul_ceiling.csv")
DTYPES = ("bf16", "fp8")
"""Input dtypes the table measures; fp16 and fp32 set-ups read the bf16 ceiling (the same
tensor-core paths on these GPUs; fp32 runs are priced at the fp32 peak anyway)."""


def _read_table(parts: tuple[str, ...], what: str):
    """(path, rows as dicts of strings) of a CSV table under models_catalog/."""
    from planner.specs.catalog import catalog_root

    file = catalog_root().joinpath(*parts)
    try:
        return file, list(csv.DictReader(file.read_text(encoding="utf-8").splitlines()))
    except OSError as exc:
        raise PlannerError(f"cannot read the {what} {file}: {exc}") from exc


@lru_cache(maxsize=1)
def ceiling_rows() -> tuple[dict, ...]:
    """The rows of the table, numbers as floats (``fraction`` = MAMF / the table's peak)."""
    file, rows = _read_table(CEILING_FILE, "matmul ceilings")
    out = []
    for row in rows:
        mamf, theory = float(row["mamf_tflops"]), float(row["theory_tflops"])
        if not 0.0 < mamf <= theory:
            raise PlannerError(f"{file}: row {row['gpu']} {row['dtype']}: MAMF {mamf} must be in (0, {theory}]")
        out.append({**row, "mamf_tflops": mamf, "theory_tflops": theory, "fraction": mamf / theory})
    return tuple(out)


POWER_CAPPED: dict[str, str] = {"h100-500w-grand-teton": "h100-sxm"}
"""Parts that carry a catalogued chip under a lower power limit -> that chip. Meta's Grand Teton
H100 (96 GB HBM2e, 500 W limit; the GPU of torchtitan's published H100 benchmarks) has no
published sustained clock or GEMM benchmark: its ceilings are its chip's, and the time model's
fitted ``power_cap.h100-500w`` (``planner.cost.timing.grounding``) slows its matmuls and
attention. Only the published runs use it (``planner.cost.timing.published``); it is not in the
catalog, whose every figure has a source."""


def chip_of(gpu) -> str:
    """The catalogued chip whose measured ceilings a GPU takes (itself, or what it caps)."""
    return POWER_CAPPED.get(gpu.name, gpu.name)


def _dtype(precision: str) -> str:
    return "fp8" if precision in ("fp8", "float8") else "bf16"


def fallback_fraction(vendor: str, dtype: str) -> float:
    """Median ceiling of the table's distinct measurements (one per MAMF value and shape) of
    ``vendor`` and ``dtype``; NVIDIA's when the vendor has none."""
    def distinct(v):
        return {(r["mamf_tflops"], r["best_shape_mnk"]): r["fraction"] for r in ceiling_rows()
                if r["vendor"].lower() == v.lower() and r["dtype"] == dtype}

    values = distinct(vendor) or distinct("nvidia")
    return float(median(values.values()))


def matmul_ceiling(gpu, precision: str = "bf16") -> tuple[float, str]:
    """(share of ``gpu``'s dense peak of ``precision`` the best GEMMs reach, where it comes
    from: ``"measured"`` or the fallback used)."""
    dtype = _dtype(precision)
    rows = {r["dtype"]: r for r in ceiling_rows() if r["gpu"] == chip_of(gpu)}
    if dtype in rows:
        peak = gpu.peak_flops_for(dtype)
        return min(rows[dtype]["mamf_tflops"] * 1e12 / peak, 1.0), "measured"
    vendor = getattr(gpu, "vendor", "nvidia") or "nvidia"
    if dtype == "fp8" and "bf16" in rows:
        bf16 = rows["bf16"]["mamf_tflops"] * 1e12 / gpu.peak_flops_for("bf16")
        ratio = fallback_fraction("nvidia", "fp8") / fallback_fraction("nvidia", "bf16")
        return min(bf16 * ratio, 1.0), "bf16 ceiling x NVIDIA's median fp8/bf16 ratio"
    return fallback_fraction(vendor, dtype), f"median of the {vendor} {dtype} rows"


ATTENTION_FILE = ("time_model", "attention_ceiling.csv")
BACKWARD_FORWARD_FLOPS = 2.5
"""A flash kernel's backward runs 2.5x its forward's FLOPs (it recomputes the scores: Dao 2023,
FlashAttention-2, Algorithm 2; the flash-attention benchmark counts forward + backward as 3.5x
the forward)."""


@lru_cache(maxsize=1)
def attention_rows() -> tuple[dict, ...]:
    """The flash-attention kernel benchmarks (``attention_ceiling.csv``), with ``fraction``: the
    share of the peak of one forward + backward (``combined_fraction``)."""
    file, rows = _read_table(ATTENTION_FILE, "attention ceilings")
    out = []
    for row in rows:
        fwd, bwd, theory = (float(row[k]) for k in ("forward_tflops", "backward_tflops", "theory_tflops"))
        if not (0.0 < fwd <= theory and 0.0 < bwd <= theory):
            raise PlannerError(f"{file}: row {row['gpu']}: forward and backward TFLOP/s must be in (0, {theory}]")
        out.append({**row, "fraction": combined_fraction(fwd / theory, bwd / theory)})
    return tuple(out)


def combined_fraction(forward_fraction, backward_fraction):
    """Share of the peak of a forward + backward whose backward runs ``BACKWARD_FORWARD_FLOPS``
    times the forward's FLOPs: the FLOP-weighted harmonic mean of the two."""
    total = 1.0 + BACKWARD_FORWARD_FLOPS
    return total / (1.0 / forward_fraction + BACKWARD_FORWARD_FLOPS / backward_fraction)


def attention_ceiling(gpu, precision: str = "bf16") -> tuple[float, str]:
    """(share of ``gpu``'s bf16 peak a flash-attention-2 forward + backward reaches at long
    sequences, where it comes from). A GPU without a benchmark takes its matmul ceiling times
    the median, over the benchmarked GPUs of its vendor (NVIDIA's when its vendor has none), of
    attention ceiling / matmul ceiling (the kernel falls further behind the GEMMs on each newer
    generation: on H100 the exponentials of the softmax, not the tensor cores, bound it, Shah et
    al. 2024 sec. 1; so the fallback is a middle guess, not a bound). Attention runs in bf16
    under float8 training too."""
    rows = [r for r in attention_rows() if r["gpu"] == chip_of(gpu)]
    if rows:
        return rows[0]["fraction"], "measured"
    vendor = (getattr(gpu, "vendor", "nvidia") or "nvidia").lower()
    ratios = _attention_ratios(vendor)
    if not ratios:
        vendor, ratios = "nvidia", _attention_ratios("nvidia")
    ratio = float(median(ratios))
    origin = f"matmul ceiling x the median attention/matmul ratio of the {vendor} rows"
    return matmul_ceiling(gpu, "bf16")[0] * ratio, origin


def _attention_ratios(vendor: str) -> list[float]:
    """Attention ceiling / bf16 matmul ceiling of each benchmarked GPU of ``vendor``."""
    ratios = []
    for row in attention_rows():
        mm = [r for r in ceiling_rows() if r["gpu"] == row["gpu"] and r["dtype"] == "bf16"]
        if mm and row["vendor"].lower() == vendor.lower():
            ratios.append(row["fraction"] / mm[0]["fraction"])
    return ratios
