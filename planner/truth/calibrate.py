"""Fitting a calibration profile from measurements: memory corrections per method, the
allocator's reserve, and the time corrections; the before/after accuracy of every point.

The corrections and their meaning are documented with the schema in ``planner.specs.profile``.
Time corrections are fitted on the log of measured step times with a weak pull toward the
defaults (ridge), so that few points cannot produce wild values. Pure numpy and scipy.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from planner.cost.calibrated import (
    _memory_parts,
    _peak_from_parts,
    _spec_for,
    group_points,
    predict_peak_bytes,
    predict_reserved_bytes,
    predict_step_times,
)
from planner.cost.timing.step_time import HOST_OVERHEAD_S_PER_OP
from planner.specs.hardware import ALLOCATOR_RESERVE_FRACTION, GpuSpec
from planner.specs.profile import (
    HOLDOUT_EVERY,
    PHASES,
    AccuracyRow,
    Corrections,
    Measurement,
    MemoryCorrection,
    Profile,
    default_corrections,
)
from planner.specs.setup import TrainingSetup

# ------------------------------------------------------------------------------------ fitting


def _log_error(pred, meas) -> float:
    return math.log(max(pred, 1e-12) / max(meas, 1e-12))


def _least_squares_on(free: list[int], residuals, x0, bounds, **kwargs):
    """``scipy.optimize.least_squares`` over the entries ``free`` of theta, the others held at
    ``x0``: a fit never has more unknowns than the data has points. Returns the full theta and cost."""
    from scipy.optimize import least_squares

    x0 = np.asarray(x0, dtype=float)
    free = sorted(free)

    def full(x):
        theta = x0.copy()
        theta[free] = x
        return theta

    lower, upper = (np.asarray(b, dtype=float)[free] for b in bounds)
    extra = {k: np.asarray(v, dtype=float)[free] if k == "x_scale" else v for k, v in kwargs.items()}
    fit = least_squares(lambda x: residuals(full(x)), x0=np.clip(x0[free], lower, upper), bounds=(lower, upper), **extra)
    return full(fit.x), fit.cost


def _memory_from_theta(theta, scale: float) -> MemoryCorrection:
    return MemoryCorrection(static_factor=float(theta[0]), activation_factor=float(theta[1]),
                            phase_offsets_bytes={p: float(theta[2 + i] * scale) for i, p in enumerate(PHASES)})


def fit_memory(points: list[tuple[dict, float]]) -> MemoryCorrection:
    """A static factor, an activation factor and an offset per phase from (phase parts, measured
    peak) pairs: least squares on relative errors with a ridge pull toward no correction, firm
    on the static factor (weights, gradients and states are counted exactly; what the analytic
    model misses there is a transient, which an offset of its phase represents) and weak on the
    offsets. The peak is a maximum over phases, so the fit starts from every phase explaining
    the median residual and keeps the best. Fewer than five points fit the two factors only
    (activations first): one measurement cannot pin five numbers."""
    scale = statistics.median(m for _, m in points)
    ridge = np.array([0.3, 0.1, 0.02, 0.02, 0.02])
    prior = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    identity = MemoryCorrection()
    shift = statistics.median((m - _peak_from_parts(parts, identity)) / scale for parts, m in points)

    def residuals(theta):
        mc = _memory_from_theta(theta, scale)
        res = [(_peak_from_parts(parts, mc) - m) / m for parts, m in points]
        return np.concatenate([res, ridge * (theta - prior)])

    bounds = ([0.5, 0.3, -0.5, -0.5, -0.5], [2.0, 3.0, 0.5, 0.5, 0.5])
    free = [0, 1, 2, 3, 4] if len(points) >= 5 else [1, 0][:len(points)]
    starts = [prior] + [prior + np.eye(5)[2 + i] * float(np.clip(shift, -0.49, 0.49)) for i in range(len(PHASES))]
    starts = starts if len(free) == 5 else [prior]
    theta, _ = min((_least_squares_on(free, residuals, x0, bounds) for x0 in starts), key=lambda fit: fit[1])
    return _memory_from_theta(theta, scale)


def fit_reserve(pairs: list[tuple[float, float]]) -> dict:
    """``reserved = (1 + f) allocated + c`` from measured (allocated, reserved) pairs, f >= 0
    (one pair: f alone, c = 0)."""
    if not pairs:
        return {}
    scale = statistics.median(r for _, r in pairs)

    def residuals(theta):
        return np.array([((1 + theta[0]) * a + theta[1] * scale - r) / r for a, r in pairs]
                        + [0.05 * theta[0], 0.05 * theta[1]])

    free = [0, 1] if len(pairs) >= 2 else [0]
    theta, _ = _least_squares_on(free, residuals, [ALLOCATOR_RESERVE_FRACTION, 0.0], ([0.0, -0.5], [2.0, 2.0]))
    fitted = {"reserve_fraction": float(theta[0]), "reserve_offset_bytes": float(theta[1] * scale)}
    return {k: fitted[k] for k in ("reserve_fraction", "reserve_offset_bytes")[:len(free)]}


_TIME_FIELDS = ("efficiency_scale", "efficiency_size_exponent", "memory_time_factor", "optimizer_time_factor",
                "host_overhead_s_per_op")
_TIME_NAMES = ("efficiency", "size exponent", "memory-bound time", "optimizer", "host overhead")


def _corrections_from_theta(theta, base: Corrections) -> Corrections:
    return base.model_copy(update={
        "efficiency_scale": float(math.exp(theta[0])),
        "efficiency_size_exponent": float(theta[1]),
        "memory_time_factor": float(math.exp(theta[2])),
        "optimizer_time_factor": float(math.exp(theta[3])),
        "host_overhead_s_per_op": float(theta[4] * HOST_OVERHEAD_S_PER_OP),
    })


def fit_time(items: list[tuple[Any, TrainingSetup]], measured: list[float], gpu: GpuSpec, base: Corrections) -> dict:
    """Time corrections from measured step times (see the module docstring): least squares on
    log(predicted / measured) plus a ridge toward the defaults (weak on the overall efficiency,
    stronger on the size exponent, which few points identify poorly). Fewer than five points fit
    as many corrections as there are points: the subset that explains them best; the others stay
    at their defaults."""
    if not items:
        return {}
    groups = group_points(items)
    meas = np.asarray(measured, float)
    prior = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    ridge = np.array([0.02, 0.3, 0.05, 0.05, 0.02])
    if len(items) < 3:
        ridge = ridge * 5  # one or two points: move mostly the overall efficiency

    def residuals(theta):
        pred = predict_step_times(groups, gpu, _corrections_from_theta(theta, base))
        return np.concatenate([np.log(pred / meas), ridge * (theta - prior)])

    lower = [math.log(0.02), -1.0, math.log(0.05), math.log(0.05), 0.0]
    upper = [math.log(20.0), 1.0, math.log(20.0), math.log(20.0), 200.0]
    from itertools import combinations

    starts = ([0.0, 0.0, 0.0, 0.0, 1.0], [math.log(0.3), 0.0, math.log(2.0), math.log(2.0), 5.0])
    subsets = list(combinations(range(5), min(len(items), 5)))
    fits = [(free, *_least_squares_on(list(free), residuals, x0, (lower, upper), x_scale=[1, 0.3, 1, 1, 5],
                                      max_nfev=200))
            for free in subsets for x0 in (starts if len(subsets) == 1 else (prior,))]
    free, theta, _ = min(fits, key=lambda fit: fit[2])
    corrected = _corrections_from_theta(theta, base)
    return {_TIME_FIELDS[i]: getattr(corrected, _TIME_FIELDS[i]) for i in free}


def fit_profile(profile: Profile, progress=None) -> Profile:
    """Fit every correction the measurements support on the ``fit`` points; fill the accuracy
    table (before/after for every point) and the held-out summary. Returns a new Profile."""
    say = progress or (lambda text: None)
    kind = profile.device.kind
    gpu = profile.device.spec
    base = default_corrections(kind)
    cache: dict = {}
    ok = [m for m in profile.measurements if m.status == "ok"]
    specs = {id(m): _spec_for(profile.configs, m.model, m.num_layers, cache) for m in ok}
    fitted: list[str] = []
    update: dict = {}

    mem_points = [(m.setup.method, _memory_parts(specs[id(m)], m.setup, kind), m.peak_allocated_bytes)
                  for m in ok if m.split == "fit" and m.peak_allocated_bytes]
    if mem_points:
        memory = {}
        for method in sorted({method for method, _, _ in mem_points}):
            memory[method] = fit_memory([(parts, peak) for mth, parts, peak in mem_points if mth == method])
        update["memory"] = memory
        fitted += [f"memory[{key}]" for key in memory]
    pairs = [(m.peak_allocated_bytes, m.peak_reserved_bytes) for m in ok
             if m.split == "fit" and m.peak_allocated_bytes and m.peak_reserved_bytes and kind == "cuda"]
    if pairs:
        reserve = fit_reserve(pairs)
        update.update(reserve)
        fitted += list(reserve)
    contexts = [m.context_bytes for m in profile.measurements if m.context_bytes is not None]
    if contexts and kind == "cuda":
        update["context_bytes"] = float(statistics.median(contexts))
        fitted.append("context_bytes")
    timed = [m for m in ok if m.split == "fit" and m.step_time_s]
    if timed:
        say(f"fitting time corrections on {len(timed)} points")
        time_fit = fit_time([(specs[id(m)], m.setup) for m in timed], [m.step_time_s for m in timed], gpu, base)
        update.update(time_fit)
        fitted += list(time_fit)
    corrections = base.model_copy(update={**update, "fitted": fitted})

    rows = _accuracy_rows(ok, specs, gpu, base, corrections, kind)
    new = profile.model_copy(update={"corrections": corrections, "accuracy": rows, "summary": summarize(rows)})
    return new


def _accuracy_rows(points, specs, gpu, base, corrections, kind) -> list[AccuracyRow]:
    items = [(specs[id(m)], m.setup) for m in points]
    groups = group_points(items)
    before_t = predict_step_times(groups, gpu, base) if items else []
    after_t = predict_step_times(groups, gpu, corrections) if items else []
    rows = []
    for i, m in enumerate(points):
        spec = specs[id(m)]
        before_peak = predict_peak_bytes(spec, m.setup, base, kind)
        after_peak = predict_peak_bytes(spec, m.setup, corrections, kind)
        rows.append(AccuracyRow(
            label=m.label,
            split=m.split,
            measured_step_time_s=m.step_time_s,
            before_step_time_s=float(before_t[i]) if m.step_time_s else None,
            after_step_time_s=float(after_t[i]) if m.step_time_s else None,
            measured_peak_bytes=m.peak_allocated_bytes,
            before_peak_bytes=before_peak if m.peak_allocated_bytes else None,
            after_peak_bytes=after_peak if m.peak_allocated_bytes else None,
            measured_reserved_bytes=m.peak_reserved_bytes,
            before_reserved_bytes=predict_reserved_bytes(before_peak, base, kind) if m.peak_reserved_bytes else None,
            after_reserved_bytes=predict_reserved_bytes(after_peak, corrections, kind)
            if m.peak_reserved_bytes else None,
        ))
    return rows


def _median_error(rows: list[AccuracyRow], split: str, quantity: str, which: str) -> float | None:
    errors = []
    for r in rows:
        measured = getattr(r, f"measured_{quantity}")
        predicted = getattr(r, f"{which}_{quantity}")
        if r.split == split and measured and predicted is not None:
            errors.append(abs(predicted / measured - 1))
    return float(statistics.median(errors)) if errors else None


def summarize(rows: list[AccuracyRow]) -> dict[str, float | None]:
    """Median relative errors (fractions) per split, quantity, before/after."""
    out: dict[str, float | None] = {}
    for split in ("holdout", "fit"):
        for quantity, short in (("step_time_s", "step_time"), ("peak_bytes", "peak"), ("reserved_bytes", "reserved")):
            for which in ("before", "after"):
                out[f"{split}_{short}_median_error_{which}"] = _median_error(rows, split, quantity, which)
    return out


def assign_splits(measurements: list[Measurement], every: int = HOLDOUT_EVERY) -> list[Measurement]:
    """Hold out every ``every``-th successful point (index ``every-1``, ``2 every-1``, ...) when
    there are at least ``every`` of them; the rest are fitted."""
    ok_index = 0
    out = []
    okay = sum(1 for m in measurements if m.status == "ok")
    for m in measurements:
        split = "fit"
        if m.status == "ok":
            if okay >= every and ok_index % every == every - 1:
                split = "holdout"
            ok_index += 1
        out.append(m.model_copy(update={"split": split}))
    return out


# -------------------------------------------------------------------------------- reporting


def accuracy_table(profile: Profile) -> str:
    """Predicted vs measured, before and after calibration, for every point."""
    from planner.io.report import render_table
    from planner.units import fmt_bytes, fmt_seconds

    def pct(pred, meas):
        return "-" if pred is None or not meas else f"{(pred / meas - 1) * 100:+.1f}%"

    rows = []
    for r in profile.accuracy:
        rows.append({
            "point": r.label, "split": r.split,
            "step measured": fmt_seconds(r.measured_step_time_s) if r.measured_step_time_s else "-",
            "before": fmt_seconds(r.before_step_time_s) if r.before_step_time_s else "-",
            "after": fmt_seconds(r.after_step_time_s) if r.after_step_time_s else "-",
            "err before": pct(r.before_step_time_s, r.measured_step_time_s),
            "err after": pct(r.after_step_time_s, r.measured_step_time_s),
            "peak measured": fmt_bytes(r.measured_peak_bytes) if r.measured_peak_bytes else "-",
            "peak err before": pct(r.before_peak_bytes, r.measured_peak_bytes),
            "peak err after": pct(r.after_peak_bytes, r.measured_peak_bytes),
            **({"reserved err before": pct(r.before_reserved_bytes, r.measured_reserved_bytes),
                "reserved err after": pct(r.after_reserved_bytes, r.measured_reserved_bytes)}
               if profile.device.kind == "cuda" else {}),
        })
    lines = [render_table(rows)] if rows else ["(no measured points)"]
    s = profile.summary
    for split in ("holdout", "fit"):
        parts = []
        for short, name in (("step_time", "step time"), ("peak", "peak bytes"), ("reserved", "reserved")):
            b, a = s.get(f"{split}_{short}_median_error_before"), s.get(f"{split}_{short}_median_error_after")
            if b is not None and a is not None:
                parts.append(f"{name} {b * 100:.1f}% -> {a * 100:.1f}%")
        if parts:
            lines.append(f"median |error| on {split} points, before -> after: " + ", ".join(parts))
    c = profile.corrections
    lines.append(_time_corrections_line(c)
                 + (f"; reserve +{c.reserve_fraction * 100:.1f}% + {fmt_bytes(c.reserve_offset_bytes)}, context "
                    f"{fmt_bytes(c.context_bytes)}" if profile.device.kind == "cuda" else ""))
    for key, mc in c.memory.items():
        offsets = ", ".join(f"{p} {fmt_bytes(v)}" for p, v in mc.phase_offsets_bytes.items() if abs(v) >= 2**20)
        lines.append(f"memory corrections [{key}]: static x{mc.static_factor:.3f}, activations "
                     f"x{mc.activation_factor:.3f}" + (f", offsets {offsets}" if offsets else ""))
    return "\n".join(lines)


def _time_corrections_line(c: Corrections) -> str:
    """The time corrections, and which of them the measurements did not pin (held at defaults)."""
    texts = {
        "efficiency_scale": f"efficiency x{c.efficiency_scale:.3g}",
        "efficiency_size_exponent": f"size exponent {c.efficiency_size_exponent:+.3f}",
        "memory_time_factor": f"memory-bound time x{c.memory_time_factor:.3g}",
        "optimizer_time_factor": f"optimizer x{c.optimizer_time_factor:.3g}",
        "host_overhead_s_per_op": "host overhead " + (
            f"{c.host_overhead_s_per_op * 1e6:.3g} us/op" if c.host_overhead_s_per_op is not None else "default"),
    }
    held = [i for i, name in enumerate(_TIME_FIELDS) if name not in c.fitted]
    if not held:
        return "time corrections: " + ", ".join(texts.values())
    fitted = ", ".join(texts[name] for name in _TIME_FIELDS if name in c.fitted) or "none"
    return (f"time corrections fitted: {fitted}; held at their defaults (fewer timed points than corrections): "
            + ", ".join(_TIME_NAMES[i] for i in held))
