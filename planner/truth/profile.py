"""Short real training runs on this machine's device (CUDA when present, else CPU) for calibration.

The model is the real ``transformers`` model built from its HF config with random weights
(``planner.truth.trace.build_model``), trained on synthetic tokens; one step is the step of
``planner.truth.trace`` (``grad_accum`` x (forward, loss, backward), ``optimizer.step()``,
``zero_grad(set_to_none=True)``; autocast for ``bf16-mixed``).

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

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from planner.specs.hardware import GpuSpec
from planner.specs.profile import DeviceInfo, Measurement, Profile, default_corrections
from planner.specs.setup import TrainingSetup
from planner.truth.calibrate import assign_splits

MEMORY_GUARD_FRACTION = 0.8
"""Skip points whose estimated device bytes exceed this share of the device (CUDA memory; on
CPU, the memory available now)."""


@dataclass(frozen=True)
class GridPoint:
    """One calibration point: a set-up of ``num_layers`` decoder layers."""

    setup: TrainingSetup
    num_layers: int

    @property
    def family(self) -> tuple:
        s = self.setup
        return (s.method, s.checkpointing, s.precision, s.optimizer, s.optimizer_impl, self.num_layers)

    @property
    def label(self) -> str:
        s = self.setup
        ck = "" if s.checkpointing == "none" else f" ckpt-{s.checkpointing}"
        return f"{s.method} {s.precision}{ck} L{self.num_layers} b{s.micro_batch}s{s.seq_len}"


def default_grid(device: str, num_layers: int, precision: str | None = None, quick: bool = False) -> list[GridPoint]:
    """The default grid. CPU (fp32: a CPU without bf16 instructions emulates bf16 matmuls):
    full fine-tuning over micro-batch x sequence at ``num_layers`` and at 3x the layers (so
    that per-layer and per-token costs separate from the output head's), LoRA, and full
    checkpointing; 32 to 192 tokens per step keep it within a few minutes on one core.
    CUDA (bf16-mixed): the same families with sequences of 512 to 4096 tokens, growing until
    the first out-of-memory error."""
    if device == "cpu":
        precision = precision or "fp32"
        full = [(1, 32), (1, 64), (2, 64), (1, 128), (2, 96)]
        deep = [(1, 32), (1, 64)]
        lora = [(1, 32), (2, 32), (1, 96)]
        ckpt = [(1, 32), (1, 64)]
        if quick:
            full, deep = [(1, 16), (1, 32), (2, 32), (2, 64)], [(1, 32), (2, 32)]
            lora, ckpt = [(1, 32), (2, 16), (2, 32)], [(1, 32)]
    else:
        precision = precision or "bf16-mixed"
        full = [(1, 512), (2, 512), (1, 1024), (2, 1024), (1, 2048), (4, 1024), (2, 2048), (1, 4096), (4, 2048)]
        deep = [(1, 1024), (2, 1024)]
        lora = [(1, 1024), (2, 1024), (1, 2048), (4, 2048)]
        ckpt = [(1, 1024), (2, 2048), (4, 2048)]
        if quick:
            full, deep, lora, ckpt = full[:3], deep[:1], lora[:2], ckpt[:1]
    deep_layers = num_layers * 3
    points = []
    for method, ck, layers, shapes in (("full", "none", num_layers, full), ("full", "none", deep_layers, deep),
                                       ("lora", "none", num_layers, lora), ("full", "full", num_layers, ckpt)):
        for b, s in shapes:
            setup = TrainingSetup(method=method, precision=precision, checkpointing=ck, micro_batch=b, seq_len=s,
                                  dropout=0.0)
            points.append(GridPoint(setup, layers))
    return points


# ------------------------------------------------------------------------------ device facts


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def step_clock(device: str):
    """The clock of the timed steps: wall time (``perf_counter``) on CUDA and on a multi-threaded
    CPU run; on a single-threaded CPU run the process's CPU time (``process_time``, user +
    system), which other processes of a shared machine do not inflate."""
    import torch

    if device == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def _time_best(fn, device: str, repeats: int = 3) -> float:
    clock = step_clock(device)
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        best = min(best, clock() - t0)
    return best


def measure_peaks(device: str) -> dict:
    """Micro-benchmarks of the device: dense matmul FLOP/s per dtype (best of 3 on a square
    matmul of side 1024 on CPU (512 for bf16), 8192 on CUDA) and streaming bandwidth (a copy of 256 MiB on CPU,
    1 GiB on CUDA: 2 x bytes per copy)."""
    import torch

    flops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # a CPU without bf16 instructions emulates bf16 matmuls ~100x slower: a smaller one
        side = 8192 if device == "cuda" else (1024 if dtype == torch.float32 else 512)
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        seconds = _time_best(lambda a=a, b=b: a @ b, device)
        flops[name] = 2.0 * side**3 / seconds
    nbytes = 256 * 1024**2 if device == "cpu" else 1024**3
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    seconds = _time_best(lambda: y.copy_(x), device)
    return {"peak_flops": flops, "bandwidth_bytes_per_s": 2.0 * nbytes / seconds}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_info(device: str, progress=None) -> DeviceInfo:
    """Versions, memory and the roofline spec of ``device`` (catalog GPU, else measured)."""
    import torch
    import transformers

    say = progress or (lambda text: None)
    common = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "num_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        from planner.errors import PlannerError
        from planner.specs.catalog import load_gpu

        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        driver = None
        try:
            import subprocess

            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - the driver version is informative only
            driver = None
        try:
            spec = load_gpu(name)
            source = "catalog"
        except PlannerError:
            say(f"{name} is not in the GPU catalog: measuring its peaks")
            peaks = measure_peaks("cuda")
            spec = GpuSpec(name=name, vendor="nvidia", memory_bytes=props.total_memory,
                           memory_bandwidth_bytes_per_s=peaks["bandwidth_bytes_per_s"], peak_flops=peaks["peak_flops"],
                           interconnect="unknown", interconnect_bandwidth_bytes_per_s=25e9,
                           sources={"all": f"measured by planner calibrate on {_dt.date.today()}; interconnect assumed PCIe"})
            source = "measured"
        return DeviceInfo(kind="cuda", name=name, memory_bytes=props.total_memory, driver_version=driver,
                          cuda_version=torch.version.cuda, spec=spec, spec_source=source, **common)
    say("measuring the CPU's memory bandwidth (and bf16 matmuls where it has no bf16 units)")
    peaks = measure_peaks("cpu")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    threads = torch.get_num_threads()
    name = f"cpu: {_cpu_name()} x{threads} thread{'s' if threads > 1 else ''}"
    nominal, how = nominal_cpu_flops(threads, peaks["peak_flops"]["bf16"])
    spec = GpuSpec(
        name=name, vendor="cpu", memory_bytes=memory, memory_bandwidth_bytes_per_s=peaks["bandwidth_bytes_per_s"],
        peak_flops=nominal, interconnect="none", interconnect_bandwidth_bytes_per_s=1e9,
        sources={"peak_flops": how,
                 "memory_bandwidth_bytes_per_s": "measured: copy of 256 MiB, 2 x bytes / seconds",
                 "memory_bytes": "os.sysconf physical pages", "interconnect_bandwidth_bytes_per_s": "unused (1 device)",
                 "measured_matmul_flops": ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks["peak_flops"].items())},
    )
    return DeviceInfo(kind="cpu", name=name, memory_bytes=memory, spec=spec, spec_source="nominal", **common)


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_hz() -> float | None:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":", 1)[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def nominal_cpu_flops(threads: int, measured_bf16: float) -> tuple[dict[str, float], str]:
    """A CPU's datasheet-like dense peak, the analogue of a GPU catalog entry (so that the
    uncalibrated model on a CPU is as uninformed as on a GPU): threads x clock x fp32 FLOP per
    cycle of its widest FMA units (AVX-512: 2 x 16 lanes x 2 = 64; AVX2 + FMA: 32; AVX: 16;
    else 8). bf16: 2x fp32 with AVX512-BF16, 16x with AMX; a CPU with neither emulates bf16
    matmuls, and the measured rate stands in for a nominal one."""
    flags = _cpu_flags()
    hz = _cpu_hz() or 2.5e9
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16 if "avx" in flags else 8
    fp32 = threads * hz * per_cycle
    if "amx_bf16" in flags:
        bf16, bf16_how = 16 * fp32, "16x fp32 (AMX)"
    elif "avx512_bf16" in flags:
        bf16, bf16_how = 2 * fp32, "2x fp32 (AVX512-BF16)"
    else:
        bf16, bf16_how = measured_bf16, "measured (no bf16 units: emulated)"
    how = (f"nominal: {threads} thread(s) x {hz / 1e9:.2f} GHz (/proc/cpuinfo) x {per_cycle} fp32 FLOP/cycle; "
           f"bf16 {bf16_how}")
    return {"fp32": fp32, "bf16": bf16}, how


def cuda_context_bytes() -> float:
    """Device memory in use less PyTorch's reserved bytes, after CUDA is initialised."""
    import torch

    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return float(total - free - torch.cuda.memory_reserved())


# ------------------------------------------------------------------------------------ runs


def _make_optimizer(params, setup: TrainingSetup):
    """The optimizers of ``planner.truth.trace`` (same hyper-parameters; they do not change cost)."""
    from planner.truth.trace import _make_optimizer as traced_optimizer

    return traced_optimizer(params, setup, notes=[])


class _Family:
    """A model and its optimizer, shared by the points of one family (only inputs change)."""

    def __init__(self, config: dict, point: GridPoint, device: str, seed: int = 0):
        import torch

        from planner.truth.trace import build_model

        torch.manual_seed(seed)
        self.device = device
        self.model = build_model(config, point.setup, point.num_layers, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(self.params, point.setup)
        self.vocab = self.model.get_input_embeddings().num_embeddings

    def inputs(self, setup: TrainingSetup):
        import torch

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.vocab, (setup.micro_batch, setup.seq_len), generator=g).to(self.device)
        return ids, ids.clone()

    def step(self, setup: TrainingSetup, ids, labels) -> None:
        import contextlib

        import torch

        autocast = (torch.autocast(self.device, dtype=torch.bfloat16) if setup.precision == "bf16-mixed"
                    else contextlib.nullcontext())
        for _ in range(setup.grad_accum):
            with autocast:
                loss = self.model(input_ids=ids, labels=labels).loss
            if setup.grad_accum > 1:
                loss = loss / setup.grad_accum
            loss.backward()
            del loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.optimizer, self.params


def _tracker_class():
    """The oracle's MemTracker (gradient hooks only on parameters that require grad: LoRA's
    frozen base weights cannot take one), used here on real tensors."""
    from planner.truth.trace import _phase_tracker_class

    return _phase_tracker_class()


def _cpu_peak_bytes(family: _Family, setup: TrainingSetup, ids, labels) -> float:
    """MemTracker's peak over one steady-state step on real CPU tensors."""
    import warnings

    tracker = _tracker_class()()
    tracker.track_external(family.model, family.optimizer, ids, labels)
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        family.step(setup, ids, labels)
    peak = tracker.get_tracker_snapshot("peak")
    return float(sum(snap["Total"] for snap in peak.values()))


def _timed_step(family: _Family, setup: TrainingSetup, inputs, device: str) -> float:
    """Seconds of one step, synchronised, with Python's cyclic garbage collector collected
    before and paused during the step (as ``timeit`` does): a collection of the model's and
    autograd's object graph would otherwise land in a random step."""
    import gc

    clock = step_clock(device)
    gc.collect()
    gc.disable()
    try:
        _sync(device)
        t0 = clock()
        family.step(setup, *inputs)
        _sync(device)
        return clock() - t0
    finally:
        gc.enable()


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _estimated_bytes(spec, setup: TrainingSetup, device: str) -> float:
    from planner.cost.memory import training_memory
    from planner.specs.hardware import ALLOCATOR_RESERVE_FRACTION, CUDA_CONTEXT_BYTES

    peak = float(training_memory(spec, setup, device=device).peak_bytes)
    return peak * (1 + ALLOCATOR_RESERVE_FRACTION) + (CUDA_CONTEXT_BYTES if device == "cuda" else 0)


def _available_bytes(device: str) -> float:
    import torch

    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / 2


def run_grid(config: dict, model_name: str, points: list[GridPoint], device: str, *, timed_steps: int = 3,
             budget_s: float | None = None, progress=None) -> list[Measurement]:
    """Measure every point (see the module docstring); returns one Measurement per point, in
    the order of ``points``. ``budget_s`` stops starting new points (and timing rounds beyond
    the second) once that many seconds have passed."""
    import torch

    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    say = progress or (lambda text: None)
    t_start = time.perf_counter()
    context = cuda_context_bytes() if device == "cuda" else None
    available = _available_bytes(device)

    def over_budget() -> bool:
        return budget_s is not None and time.perf_counter() - t_start > budget_s

    results: dict[int, dict[str, Any]] = {}
    families: dict[tuple, list[int]] = {}
    for index, point in enumerate(points):
        families.setdefault(point.family, []).append(index)
    live: dict[tuple, _Family] = {}
    cpu_timing: list[int] = []
    for family_key, indices in families.items():
        first = points[indices[0]]
        spec = model_spec_from_config(reduce_layers(config, first.num_layers), model_name)
        stopped = None
        fam = None
        for index in sorted(indices, key=lambda i: points[i].setup.micro_batch * points[i].setup.seq_len):
            point = points[index]
            if stopped:
                results[index] = {"status": stopped[0], "note": stopped[1]}
                continue
            if over_budget():
                results[index] = {"status": "skipped", "note": f"time budget of {budget_s:.0f} s spent"}
                continue
            need = _estimated_bytes(spec, point.setup, device)
            if need > MEMORY_GUARD_FRACTION * available:
                results[index] = {"status": "skipped", "note": f"estimated {need / 2**30:.1f} GiB > "
                                  f"{MEMORY_GUARD_FRACTION:.0%} of {available / 2**30:.1f} GiB available"}
                stopped = ("skipped", "a smaller point of this family was already too large")
                continue
            say(f"[{index + 1}/{len(points)}] {point.label}")
            try:
                if fam is None:
                    fam = _Family(config, point, device)
                ids, labels = fam.inputs(point.setup)
                if device == "cuda":
                    torch.cuda.empty_cache()
                fam.step(point.setup, ids, labels)  # warm-up: creates the optimizer state
                _sync(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    times = [_timed_step(fam, point.setup, (ids, labels), device) for _ in range(timed_steps)]
                    results[index] = {"status": "ok", "times": times,
                                      "peak_allocated_bytes": float(torch.cuda.max_memory_allocated()),
                                      "peak_reserved_bytes": float(torch.cuda.max_memory_reserved()),
                                      "context_bytes": context}
                else:
                    peak = _cpu_peak_bytes(fam, point.setup, ids, labels)
                    results[index] = {"status": "ok", "times": [], "peak_allocated_bytes": peak,
                                      "peak_reserved_bytes": peak, "context_bytes": 0.0}
                    cpu_timing.append(index)
            except Exception as exc:  # noqa: BLE001 - an OOM is a data point; anything else is re-raised
                if not _is_oom(exc):
                    raise
                say(f"    out of memory: {str(exc).splitlines()[0][:100]}")
                results[index] = {"status": "oom", "note": str(exc).splitlines()[0][:200]}
                stopped = ("skipped", "stopped growing at the first out-of-memory point of this family")
                if fam is not None:
                    fam.optimizer.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        if fam is not None:
            if device == "cpu":
                live[family_key] = fam
            else:
                fam.close()
                del fam
                torch.cuda.empty_cache()

    if cpu_timing:
        inputs = {i: live[points[i].family].inputs(points[i].setup) for i in cpu_timing}
        for round_index in range(timed_steps):
            if round_index >= 2 and over_budget():
                say("time budget spent: stopping the timing rounds")
                break
            say(f"timing round {round_index + 1}/{timed_steps} over {len(cpu_timing)} points")
            for i in cpu_timing:
                fam = live[points[i].family]
                results[i]["times"].append(_timed_step(fam, points[i].setup, inputs[i], device))
    live.clear()

    out = []
    for index, point in enumerate(points):
        r = results[index]
        times = r.get("times") or []
        # CUDA: the median of the timed steps. CPU: the fastest of the interleaved rounds (a shared
        # machine's slow spells only lengthen steps; the minimum is the reproducible figure)
        step = (float(min(times)) if device == "cpu" else float(statistics.median(times))) if times else None
        achieved = None
        if step:
            from planner.cost.estimate import training_flops

            spec = model_spec_from_config(reduce_layers(config, point.num_layers), model_name)
            achieved = float(training_flops(spec, point.setup).executed) * point.setup.grad_accum / step
        out.append(Measurement(
            label=point.label, model=model_name, num_layers=point.num_layers, setup=point.setup, source="run",
            status=r["status"], peak_allocated_bytes=r.get("peak_allocated_bytes"),
            peak_reserved_bytes=r.get("peak_reserved_bytes"), context_bytes=r.get("context_bytes"),
            step_time_s=step, step_time_spread_s=(max(times) - min(times)) if times else None,
            steps_timed=len(times), achieved_flops_per_s=achieved, note=r.get("note", ""),
        ))
    say(f"measured {sum(m.status == 'ok' for m in out)} of {len(out)} points in {time.perf_counter() - t_start:.0f} s")
    return out


def model_name(model: str, source: dict) -> str:
    """The catalog name, else the directory of a config.json path (``.../tiny/config.json`` -> tiny)."""
    from pathlib import Path

    if source.get("name"):
        return str(source["name"])
    path = Path(model)
    return path.parent.name if path.name == "config.json" and path.parent.name else path.stem


def calibrate_device(model: str, device: str = "cpu", *, num_layers: int | None = None, precision: str | None = None,
                     quick: bool = False, timed_steps: int | None = None, budget_s: float | None = None,
                     points: list[GridPoint] | None = None, threads: int | None = None, progress=None) -> Profile:
    """Run the grid on ``device`` for ``model`` (catalog name or config path), fit, and return the
    profile (not yet saved). CPU defaults: 2 decoder layers (and 6 for the depth family), one
    thread timed by CPU time (see ``step_clock``); ``threads`` > 1 times by wall clock."""
    import torch

    if device == "cpu":
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or 1)
        try:
            return _calibrate(model, device, num_layers, precision, quick, timed_steps, budget_s, points, progress)
        finally:
            torch.set_num_threads(previous)
    return _calibrate(model, device, num_layers, precision, quick, timed_steps, budget_s, points, progress)


def _calibrate(model, device, num_layers, precision, quick, timed_steps, budget_s, points, progress) -> Profile:
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
    measurements = run_grid(config, name, grid, device, timed_steps=steps, budget_s=budget_s, progress=say)
    measurements = assign_splits(measurements)
    from planner import __version__ as planner_version

    profile = Profile(
        created=_dt.datetime.now(_dt.timezone.utc), planner_version=planner_version, device=info,
        configs={name: config}, measurements=measurements, corrections=default_corrections(device),
        notes=[f"{name} run with {num_layers} (and {num_layers * 3}) of its {total_layers} decoder layers, random "
               f"weights, synthetic tokens; python {sys.version.split()[0]}"],
    )
    return fit_profile(profile, progress=say)
