"""Units: the constants, and the one place where quantities are formatted for people.

Every quantity inside the library is SI (bytes, FLOPs, seconds); ``--json`` output is SI numbers.
The ``fmt_*`` functions below are the only formatting of units (tables in ``planner.io.report``
and messages anywhere use them).
"""

import math

KiB = 1024
MiB = 1024**2
GiB = 1024**3
GB = 10**9  # vendors quote memory in GB for some cards and GiB for others; sources say which

# Bytes per element of each storage dtype (IEEE 754 / PyTorch dtype sizes).
DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "tf32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "int64": 8,
    "nf4": 0.5,  # 4-bit NormalFloat (Dettmers et al. 2023), two values per byte
}

SECONDS_PER_HOUR = 3600.0


def fmt_bytes(value_bytes: float) -> str:
    if value_bytes is None or (isinstance(value_bytes, float) and math.isnan(value_bytes)):
        return "-"
    sign = "-" if value_bytes < 0 else ""
    value = abs(value_bytes)
    if value >= GiB:
        return f"{sign}{value / GiB:.2f} GiB"
    return f"{sign}{value / MiB:.1f} MiB"


def fmt_flops(value_flops: float) -> str:
    if abs(value_flops) >= 1e21:
        return f"{value_flops:.3g} FLOP"
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(value_flops) >= scale:
            return f"{value_flops / scale:.3g} {unit}"
    return f"{value_flops:.3g} FLOP"


def fmt_count(value: float) -> str:
    """Parameters or tokens: 7.62B, 135M, 1.4T."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def fmt_seconds(value_s: float) -> str:
    if value_s >= 86400:
        return f"{value_s / 86400:.2f} d"
    if value_s >= 3600:
        return f"{value_s / 3600:.2f} h"
    if value_s >= 60:
        return f"{value_s / 60:.1f} min"
    if value_s >= 1:
        return f"{value_s:.2f} s"
    return f"{value_s * 1e3:.1f} ms"


def fmt_usd(value_usd: float) -> str:
    """Dollars: whole above $100, cents below, and two significant digits below a cent (never "$0.00" for a cost)."""
    if abs(value_usd) >= 100:
        return f"${value_usd:,.0f}"
    return f"${value_usd:,.2f}" if value_usd == 0 or abs(value_usd) >= 0.01 else f"${value_usd:.2g}"


def fmt_percent(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"
