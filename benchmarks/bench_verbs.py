"""Wall time of each verb as a user runs it: a fresh `planner` process, median of N runs.

    python benchmarks/bench_verbs.py [--runs 5]

Targets (issue 9): every `plan` example of the README under 1 s, `estimate` (table and JSON) under
0.2 s, `fit` under 0.3 s. The process starts Python, imports what the verb needs and answers; the
machine's load matters (quote the machine beside the numbers).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLANNER = str(Path(sys.executable).with_name("planner")) if Path(sys.executable).with_name("planner").exists() \
    else shutil.which("planner")
COMMANDS = [
    ("--help", ["--help"], None),
    ("estimate --model llama-3.1-8b --method lora --seq-len 4096 --checkpointing full --gpu h100-sxm", ["estimate", "--model", "llama-3.1-8b", "--method", "lora", "--seq-len", "4096",
                         "--checkpointing", "full", "--gpu", "h100-sxm"], 0.2),
    ("estimate --model llama-3.1-8b --precision bf16-mixed --num-gpus 8 --zero 3 --json", ["estimate", "--model", "llama-3.1-8b", "--precision", "bf16-mixed", "--num-gpus", "8",
                        "--zero", "3", "--json"], 0.2),
    ("fit qwen2.5-7b --gpu rtx-4090 --seq-len 4096", ["fit", "qwen2.5-7b", "--gpu", "rtx-4090", "--seq-len", "4096"], 0.3),
    ("plan --compute 1e21 --json", ["plan", "--compute", "1e21", "--json"], 1.0),
    ("plan 8B/3B, 8 x H100, $5000, 20B pool", ["plan", "--model", "llama-3.1-8b,llama-3.2-3b-instruct", "--gpu",
                                               "h100-sxm", "--num-gpus", "8", "--budget-usd", "5000",
                                               "--data-pool", "20B"], 1.0),
    ("compare LoRA vs QLoRA (README)", ["compare", "--gpu", "h100-sxm", "--num-gpus", "8", "--budget-usd", "5000",
                                        "--data-pool", "20B", "--alloc", "8B LoRA:model=llama-3.1-8b,method=lora",
                                        "--alloc", "8B QLoRA:model=llama-3.1-8b,method=qlora"], 1.0),
]


def wall_s(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([PLANNER, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"planner {' '.join(args)} failed: {done.stderr.strip()[-300:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    print("| command | median wall (s) | min (s) | target (s) |\n|---|---|---|---|")
    for label, args, target in COMMANDS:
        times = [wall_s(args) for _ in range(runs)]
        print(f"| `planner {label}` | {statistics.median(times):.2f} | {min(times):.2f} | "
              f"{'-' if target is None else target} |", flush=True)


if __name__ == "__main__":
    main()
