"""What calibration records about the device it runs on, and how it times and syncs it.

Owns ``device_info`` (versions, memory and the roofline spec of the device: the catalog GPU, a
measured one for a GPU the catalog lacks, a nominal datasheet-like peak for a CPU),
``measure_peaks`` (matmul FLOP/s per dtype and copy bandwidth), ``nominal_cpu_flops``, the CUDA
context and the memory available now, and the clock and synchronisation of timed steps
(``step_clock``, ``synchronize``). torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time

from planner.specs.hardware import GpuSpec
from planner.specs.profile import DeviceInfo


def synchronize(device: str) -> None:
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
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        synchronize(device)
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
        return _cuda_device_info(common, say)
    return _cpu_device_info(common, say)


def _cuda_device_info(common: dict, say) -> DeviceInfo:
    """GPU 0: its catalog spec, or its measured peaks when the catalog does not know its name."""
    import torch

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


def _cpu_device_info(common: dict, say) -> DeviceInfo:
    """This CPU at the threads torch uses: measured bandwidth, nominal peak FLOP/s."""
    import torch

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


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


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


def cuda_context_bytes() -> float:
    """Device memory in use less PyTorch's reserved bytes, after CUDA is initialised."""
    import torch

    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return float(total - free - torch.cuda.memory_reserved())


def available_bytes(device: str) -> float:
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
