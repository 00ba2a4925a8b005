"""Speed of the analytic path: configurations per second in one vectorized sweep, and the wall
time of `planner estimate` as a whole process.

Run: python benchmarks/bench_speed.py
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import time

import numpy as np

from planner.cost.estimate import sweep
from planner.specs.catalog import load_model_config
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup


def sweep_rate(model: str = "llama-3.1-8b") -> tuple[int, float]:
    """Every combination of method x precision x checkpointing x optimizer, each over a grid of
    32 micro-batches x 64 sequence lengths (peak bytes and FLOPs of every configuration)."""
    spec = model_spec_from_config(load_model_config(model)[0], model)
    batches = np.arange(1, 33)[:, None]
    seqs = (np.arange(1, 65) * 256)[None, :]
    combos = list(
        itertools.product(("full", "lora", "qlora"), ("bf16", "bf16-mixed", "fp32"), ("none", "selective", "full"),
                          ("adamw", "adamw-8bit"))
    )
    start = time.perf_counter()
    count = 0
    for method, precision, ckpt, optimizer in combos:
        setup = TrainingSetup(method=method, precision=precision, checkpointing=ckpt, optimizer=optimizer)
        out = sweep(spec, setup, batches, seqs)
        count += out["peak_bytes"].size
    return count, time.perf_counter() - start


def process_time(repeats: int = 5) -> float:
    argv = [sys.executable, "-m", "planner.cli", "estimate", "--model", "llama-3.1-8b", "--json"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    sweep_rate()  # warm caches
    count, seconds = sweep_rate()
    print(f"sweep: {count:,} configurations in {seconds:.3f} s = {count / seconds:,.0f} configurations/s")
    print(f"`planner estimate --json` as a process: {process_time():.3f} s (median of 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
