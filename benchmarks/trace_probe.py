"""What the fake-tensor oracle measures, and how long it takes.

Run: python benchmarks/trace_probe.py [--layers 2] [--seq 256] [--batch 1] [--models a,b] [--setups ...]

For each (catalog model reduced to ``--layers`` decoder layers, set-up) it prints the peak of two
training steps (MemTracker), the phase of step 2 holding it, the split of the peak by category,
the peak of each phase, FLOPs of one micro-batch (FlopCounterMode, eager attention) and the wall
time of the memory trace and of the FLOP count. Bytes in MiB (2**20), FLOPs in GFLOP (1e9).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.specs.setup import TrainingSetup  # noqa: E402
from planner.truth.trace import CATEGORIES, PHASES, trace_training_step  # noqa: E402

CATALOG = ROOT / "models_catalog" / "models"
DEFAULT_MODELS = ("llama-3.1-8b", "qwen2.5-0.5b", "gpt2", "gemma-2-2b", "mixtral-8x7b", "qwen3-30b-a3b")
# name -> TrainingSetup fields (micro_batch and seq_len come from the command line)
SETUPS = {
    "bf16": {"precision": "bf16"},
    "fp32": {"precision": "fp32"},
    "mixed": {"precision": "bf16-mixed"},
    "bf16-full-ckpt": {"precision": "bf16", "checkpointing": "full"},
    "bf16-sel-ckpt": {"precision": "bf16", "checkpointing": "selective"},
    "lora-bf16": {"precision": "bf16", "method": "lora"},
    "bf16-fused": {"precision": "bf16", "optimizer_impl": "fused"},
    "qlora": {"precision": "bf16", "method": "qlora"},
    "bf16-adamw8bit": {"precision": "bf16", "optimizer": "adamw-8bit"},
    "bf16-sgd": {"precision": "bf16", "optimizer": "sgd"},
    "bf16-adafactor": {"precision": "bf16", "optimizer": "adafactor"},
    "bf16-lion": {"precision": "bf16", "optimizer": "lion"},
}
MIB = 2**20


def load(name: str) -> dict:
    path = CATALOG / name / "config.json"
    if not path.exists():
        known = sorted(p.name for p in CATALOG.iterdir() if (p / "config.json").exists())
        raise SystemExit(f"no catalog config {path}; known: {', '.join(known)}")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--setups", default="bf16,mixed,bf16-full-ckpt,lora-bf16",
                        help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-flops", action="store_true")
    args = parser.parse_args(argv)

    short = {"Parameter": "param", "Buffer": "buf", "Gradient": "grad", "Activation": "act",
             "Temp": "temp", "Optstate": "opt", "Other": "other"}
    header = (f"{'model':24s} {'setup':15s} {'peak':>9s} {'phase':9s} "
              + " ".join(f"{short[c]:>8s}" for c in CATEGORIES) + " | "
              + " ".join(f"{p[:3] + '_pk':>8s}" for p in PHASES)
              + f" | {'fwdGF':>8s} {'bwdGF':>8s} | {'mem_s':>5s} {'flop_s':>6s}")
    print(f"# {args.layers} layers, micro_batch {args.batch}, seq_len {args.seq}; MiB, GFLOP, seconds")
    print(header)
    print("-" * len(header))
    failures = 0
    for model in args.models.split(","):
        config = load(model)
        for name in args.setups.split(","):
            setup = TrainingSetup(micro_batch=args.batch, seq_len=args.seq, **SETUPS[name])
            start = time.perf_counter()
            try:
                r = trace_training_step(config, setup, num_layers=args.layers, count_flops=not args.no_flops)
            except (NotImplementedError, RuntimeError, ValueError) as err:
                failures += 1
                print(f"{model:24s} {name:15s} FAILED after {time.perf_counter() - start:.1f}s: "
                      f"{type(err).__name__}: {str(err)[:150]}")
                continue
            cats = " ".join(f"{r.peak_by_category[c] / MIB:8.1f}" for c in CATEGORIES)
            phases = " ".join(f"{r.phase_peak_bytes[p] / MIB:8.1f}" for p in PHASES)
            print(f"{model:24s} {name:15s} {r.peak_bytes / MIB:9.1f} {r.peak_phase:9s} {cats} | {phases} | "
                  f"{r.flops_forward / 1e9:8.1f} {r.flops_backward / 1e9:8.1f} | "
                  f"{r.wall_s:5.1f} {r.flops_wall_s:6.1f}")
            for note in r.notes:
                print(f"{'':41s}note: {note[:140]}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
