"""Short real training runs on this machine's device (CUDA when present, else CPU) for calibration.

Owns running a grid of points (``run_grid``: one ``Measurement`` per ``GridPoint`` of
``planner.truth.calibration_grid``) and ``calibrate_device`` (device facts of
``planner.truth.device_facts``, the default grid, the runs and the fit of
``planner.truth.calibrate`` in one call), and ``model_name``. The model is the real
``transformers`` model built from its HF config with random weights
(``planner.truth.training_model.build_model``), trained on synthetic tokens; one step is the step
of ``planner.truth.trace`` (``grad_accum`` x (forward, loss, backward), ``optimizer.step()``,
``zero_grad(set_to_none=True)``; autocast for ``bf16-mixed``). torch is imported inside
functions only.
What is measured for each point of the grid:

- **step time**: after a warm-up step (it creates the optimizer state), the median of the timed
  steps, each bracketed by ``torch.cuda.synchronize()`` on CUDA. On CPU the timed steps of all
  points are run in interleaved rounds (point 1, 2, ..., n, then again), so that a slow spell of
  a shared machine falls on every point instead of on a few, and the fastest round is kept.
  By default the CPU runs on one thread and steps are timed by the process's CPU time
  (``time.process_time``), which other processes on a shared machine do not inflate (wall
  time on a 2-core machine shared with other jobs varied 2-10x between identical steps);
  with more threads, wall time. Python's garbage collector is paused during timed steps.
- **peak allocated bytes**: CUDA: ``torch.cuda.max_memory_allocated()`` over one steady-state
  step (``reset_peak_memory_stats`` after the warm-up). CPU: PyTorch's own
  ``torch.distributed._tools.mem_tracker.MemTracker`` around one steady-state step on the real
  (non-fake) tensors, with the model and optimizer registered by ``track_external``: every
  tensor storage counted once while alive, the same accounting as the fake-tensor oracle.
- **peak reserved bytes**: CUDA: ``torch.cuda.max_memory_reserved()`` over the same step, after
  ``empty_cache()`` before the point's warm-up, so that a point's reserve is its own. CPU: no
  caching allocator; reserved is recorded equal to allocated.
- **context**: CUDA: device memory in use (``mem_get_info``) less PyTorch's reserved bytes,
  before the first model is built. CPU: 0.

Points grow within each family (method, checkpointing, layers); the first out-of-memory error
stops that family's growth and is recorded as a data point (``status="oom"``). Before running,
points whose analytic estimate exceeds ``MEMORY_GUARD_FRACTION`` of the device are skipped and
recorded as ``status="skipped"``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planner.io.progress import progress_bar
from planner.specs.profile import Measurement, Profile, default_corrections
from planner.specs.setup import TrainingSetup
from planner.truth.calibrate import assign_splits
from planner.truth.calibration_grid import GridPoint, default_grid
from planner.truth.device_facts import available_bytes, cuda_context_bytes, device_info, synchronize
from planner.truth.real_step import FamilyModel, cpu_peak_bytes, is_out_of_memory, timed_step

MEMORY_GUARD_FRACTION = 0.8
"""Skip points whose estimated device bytes exceed this share of the device (CUDA memory; on
CPU, the memory available now)."""


def run_grid(config: dict, model_name: str, points: list[GridPoint], device: str, *, timed_steps: int = 3,
             budget_s: float | None = None, progress=None, show_progress: bool = False) -> list[Measurement]:
    """Measure every point (see the module docstring); returns one Measurement per point, in
    the order of ``points``. ``budget_s`` stops starting new points (and timing rounds beyond
    the second) once that many seconds have passed. ``progress`` receives a line of text per
    point and timing round; ``show_progress`` draws bars on stderr (when it is a terminal) over
    the points and over the CPU's timed steps."""
    import torch

    run = _GridRun(config=config, model_name=model_name, points=points, device=device, timed_steps=timed_steps,
                   budget_s=budget_s, say=progress or (lambda text: None), t_start=time.perf_counter(),
                   context_bytes=cuda_context_bytes() if device == "cuda" else None,
                   available_bytes=available_bytes(device))
    results: dict[int, dict[str, Any]] = {}
    families: dict[tuple, list[int]] = {}
    for index, point in enumerate(points):
        families.setdefault(point.family, []).append(index)
    live: dict[tuple, FamilyModel] = {}
    cpu_timing: list[int] = []
    with progress_bar(len(points), "calibrate", enabled=show_progress, unit="point") as bar:
        for family_key, indices in families.items():
            fam = _measure_family(run, indices, results, cpu_timing, bar)
            if fam is not None:
                if device == "cpu":
                    live[family_key] = fam
                else:
                    fam.close()
                    del fam
                    torch.cuda.empty_cache()
    if cpu_timing:
        _time_cpu_rounds(run, cpu_timing, live, results, show_progress)
    live.clear()
    out = [_measurement(run, point, results[index]) for index, point in enumerate(points)]
    run.say(f"measured {sum(m.status == 'ok' for m in out)} of {len(out)} points in "
            f"{time.perf_counter() - run.t_start:.0f} s")
    return out


@dataclass
class _GridRun:
    """What every point of one ``run_grid`` call shares."""

    config: dict
    model_name: str
    points: list[GridPoint]
    device: str
    timed_steps: int
    budget_s: float | None
    say: Callable[[str], None]
    t_start: float
    context_bytes: float | None
    available_bytes: float

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t_start > self.budget_s


@dataclass
class _FamilyRun:
    """One family's model and optimizer (built at its first measured point) and, once a point was
    too large, the (status, note) of every point after it."""

    family: FamilyModel | None = None
    stopped: tuple[str, str] | None = None


def _measure_family(run: _GridRun, indices: list[int], results: dict[int, dict[str, Any]], cpu_timing: list[int],
                    bar) -> FamilyModel | None:
    """The points of one family, smallest (micro-batch x sequence) first, on one shared model:
    growth stops at the first point estimated too large or out of memory. CPU points measured
    join ``cpu_timing``. Returns the family's model and optimizer (None when none was built)."""
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    points = run.points
    spec = model_spec_from_config(reduce_layers(run.config, points[indices[0]].num_layers), run.model_name)
    state = _FamilyRun()
    for index in sorted(indices, key=lambda i: points[i].setup.micro_batch * points[i].setup.seq_len):
        bar.set_postfix_str(points[index].label)
        results[index] = _point_result(run, spec, state, index)
        if results[index]["status"] == "ok" and run.device == "cpu":
            cpu_timing.append(index)
        bar.update()
    return state.family


def _point_result(run: _GridRun, spec, state: _FamilyRun, index: int) -> dict[str, Any]:
    """Point ``index`` measured, or why not (family stopped, time budget spent, estimated too
    large, out of memory: the last two stop the family)."""
    point = run.points[index]
    if state.stopped:
        return {"status": state.stopped[0], "note": state.stopped[1]}
    if run.over_budget():
        return {"status": "skipped", "note": f"time budget of {run.budget_s:.0f} s spent"}
    need = _estimated_bytes(spec, point.setup, run.device)
    if need > MEMORY_GUARD_FRACTION * run.available_bytes:
        state.stopped = ("skipped", "a smaller point of this family was already too large")
        return {"status": "skipped", "note": f"estimated {need / 2**30:.1f} GiB > "
                f"{MEMORY_GUARD_FRACTION:.0%} of {run.available_bytes / 2**30:.1f} GiB available"}
    run.say(f"[{index + 1}/{len(run.points)}] {point.label}")
    try:
        if state.family is None:
            state.family = FamilyModel(run.config, point, run.device)
        return _measure_point(run, state.family, point)
    except Exception as exc:  # noqa: BLE001 - an OOM is a data point; anything else is re-raised
        if not is_out_of_memory(exc):
            raise
        state.stopped = ("skipped", "stopped growing at the first out-of-memory point of this family")
        return _out_of_memory(run, state.family, exc)


def _measure_point(run: _GridRun, fam: FamilyModel, point: GridPoint) -> dict[str, Any]:
    """A warm-up step, then on CUDA the timed steps and the allocator's peaks; on CPU the
    tracker's peak over one step (its steps are timed later, in rounds over all points)."""
    import torch

    ids, labels = fam.inputs(point.setup)
    if run.device == "cuda":
        torch.cuda.empty_cache()
    fam.step(point.setup, ids, labels)  # warm-up: creates the optimizer state
    synchronize(run.device)
    if run.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        times = [timed_step(fam, point.setup, (ids, labels), run.device) for _ in range(run.timed_steps)]
        return {"status": "ok", "times": times,
                "peak_allocated_bytes": float(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": float(torch.cuda.max_memory_reserved()),
                "context_bytes": run.context_bytes}
    peak = cpu_peak_bytes(fam, point.setup, ids, labels)
    return {"status": "ok", "times": [], "peak_allocated_bytes": peak, "peak_reserved_bytes": peak, "context_bytes": 0.0}


def _out_of_memory(run: _GridRun, fam: FamilyModel | None, exc: BaseException) -> dict[str, Any]:
    """The data point of an out-of-memory error; gradients and the allocator's cache released."""
    import torch

    run.say(f"    out of memory: {str(exc).splitlines()[0][:100]}")
    if fam is not None:
        fam.optimizer.zero_grad(set_to_none=True)
    if run.device == "cuda":
        torch.cuda.empty_cache()
    return {"status": "oom", "note": str(exc).splitlines()[0][:200]}


def _time_cpu_rounds(run: _GridRun, cpu_timing: list[int], live: dict[tuple, FamilyModel],
                     results: dict[int, dict[str, Any]], show_progress: bool) -> None:
    """The CPU's timed steps: round after round, one step of every point per round."""
    points = run.points
    inputs = {i: live[points[i].family].inputs(points[i].setup) for i in cpu_timing}
    with progress_bar(run.timed_steps * len(cpu_timing), "timing", enabled=show_progress, unit="step") as bar:
        for round_index in range(run.timed_steps):
            if round_index >= 2 and run.over_budget():
                run.say("time budget spent: stopping the timing rounds")
                break
            run.say(f"timing round {round_index + 1}/{run.timed_steps} over {len(cpu_timing)} points")
            for i in cpu_timing:
                fam = live[points[i].family]
                results[i]["times"].append(timed_step(fam, points[i].setup, inputs[i], run.device))
                bar.update()


def _measurement(run: _GridRun, point: GridPoint, r: dict[str, Any]) -> Measurement:
    """The ``Measurement`` of a point from its result: step time, achieved FLOP/s, peaks, status."""
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    times = r.get("times") or []
    # CUDA: the median of the timed steps. CPU: the fastest of the interleaved rounds (a shared
    # machine's slow spells only lengthen steps; the minimum is the reproducible figure)
    step = (float(min(times)) if run.device == "cpu" else float(statistics.median(times))) if times else None
    achieved = None
    if step:
        from planner.cost.estimate import training_flops

        spec = model_spec_from_config(reduce_layers(run.config, point.num_layers), run.model_name)
        achieved = float(training_flops(spec, point.setup).executed) * point.setup.grad_accum / step
    return Measurement(
        label=point.label, model=run.model_name, num_layers=point.num_layers, setup=point.setup, source="run",
        status=r["status"], peak_allocated_bytes=r.get("peak_allocated_bytes"),
        peak_reserved_bytes=r.get("peak_reserved_bytes"), context_bytes=r.get("context_bytes"),
        step_time_s=step, step_time_spread_s=(max(times) - min(times)) if times else None,
        steps_timed=len(times), achieved_flops_per_s=achieved, note=r.get("note", ""),
    )


def _estimated_bytes(spec, setup: TrainingSetup, device: str) -> float:
    """The analytic device bytes of a point (peak, allocator reserve, CUDA context), for the memory guard."""
    from planner.cost.memory.phases import training_memory
    from planner.specs.hardware import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES

    peak = float(training_memory(spec, setup, device=device).peak_bytes)
    return peak * (1 + ALLOCATOR_RESERVE_FRACTION) + (CUDA_CONTEXT_BYTES if device == "cuda" else 0)


# ------------------------------------------------------------------------------- one call


def model_name(model: str, source: dict) -> str:
    """The catalog name, else the directory of a config.json path (``.../tiny/config.json`` -> tiny)."""
    from pathlib import Path

    if source.get("name"):
        return str(source["name"])
    path = Path(model)
    return path.parent.name if path.name == "config.json" and path.parent.name else path.stem


def calibrate_device(model: str, device: str = "cpu", *, num_layers: int | None = None, precision: str | None = None,
                     quick: bool = False, timed_steps: int | None = None, budget_s: float | None = None,
                     points: list[GridPoint] | None = None, threads: int | None = None, progress=None,
                     show_progress: bool = False) -> Profile:
    """Run the grid on ``device`` for ``model`` (catalog name or config path), fit, and return the
    profile (not yet saved). CPU defaults: 2 decoder layers (and 6 for the depth family), one
    thread timed by CPU time (see ``planner.truth.device_facts.step_clock``); ``threads`` > 1 times by wall clock."""
    with _torch_threads(threads or 1) if device == "cpu" else contextlib.nullcontext():
        return _calibrate(model, device, num_layers, precision, quick, timed_steps, budget_s, points, progress,
                          show_progress)


@contextlib.contextmanager
def _torch_threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block, restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _calibrate(model, device, num_layers, precision, quick, timed_steps, budget_s, points, progress,
               show_progress) -> Profile:
    """``calibrate_device`` once torch's threads are set."""
    import torch

    from planner.errors import PlannerError
    from planner.specs.catalog import load_model_config
    from planner.specs.configs import num_layers_of
    from planner.truth.calibrate import fit_profile

    say = progress or (lambda text: None)
    if device == "cuda" and not torch.cuda.is_available():
        raise PlannerError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    config, source = load_model_config(model)
    name = model_name(model, source)
    total_layers = num_layers_of(config)
    if num_layers is None:
        num_layers = min(2, total_layers) if device == "cpu" else min(4, total_layers)
    if num_layers * 3 > total_layers:
        num_layers = max(1, total_layers // 3)
    info = device_info(device, progress=say)
    grid = points or default_grid(device, num_layers, precision, quick)
    # quick grids are small models with steps of milliseconds: more rounds are cheap and the
    # minimum of more rounds is steadier
    steps = timed_steps or (5 if device == "cuda" else 7 if quick else 3)
    measurements = run_grid(config, name, grid, device, timed_steps=steps, budget_s=budget_s, progress=say,
                            show_progress=show_progress)
    measurements = assign_splits(measurements)
    from planner import __version__ as planner_version

    profile = Profile(
        created=_dt.datetime.now(_dt.timezone.utc), planner_version=planner_version, device=info,
        configs={name: config}, measurements=measurements, corrections=default_corrections(device),
        notes=[f"{name} run with {num_layers} (and {num_layers * 3}) of its {total_layers} decoder layers, random "
               f"weights, synthetic tokens; python {sys.version.split()[0]}"],
    )
    return fit_profile(profile, progress=say)
