"""Accuracy of the analytic model against PyTorch's own accounting (fake-tensor oracle).

Run: python benchmarks/bench_accuracy.py [--markdown]
Prints, for each case of ``planner.truth.oracle_panel.PANEL``: the oracle's peak (MemTracker over two
training steps), ours, the error, the phase of the peak, and FLOPs (FlopCounterMode, eager
attention) against ours; then median and max |error|.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from planner.cost.estimate import estimate
from planner.specs.catalog import load_model_config
from planner.specs.configs import reduce_layers
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup
from planner.truth.oracle_panel import PANEL
from planner.truth.trace import trace_flops, trace_training_step


def measure(case):
    config, _ = load_model_config(case.model)
    config = reduce_layers(config, case.num_layers)
    setup = TrainingSetup(**case.setup)
    spec = model_spec_from_config(config, case.model)
    ours = estimate(spec, setup, device="cpu")
    start = time.perf_counter()
    oracle = trace_training_step(config, setup, count_flops=False)
    fwd, bwd, _ = trace_flops(config, setup)
    seconds = time.perf_counter() - start
    return {
        "case": case.label,
        "oracle_peak": oracle.peak_bytes,
        "ours_peak": ours["peak_bytes"],
        "peak_err": ours["peak_bytes"] / oracle.peak_bytes - 1,
        "oracle_phase": max(oracle.phase_peak_bytes, key=oracle.phase_peak_bytes.get),
        "ours_phase": ours["peak_phase"],
        "oracle_flops": fwd + bwd,
        "ours_flops": ours["flops"]["executed"],
        "flops_err": ours["flops"]["executed"] / (fwd + bwd) - 1,
        "trace_s": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", help="substring of the case labels to run")
    args = parser.parse_args(argv)
    rows = []
    for case in PANEL:
        if args.only and args.only not in case.label:
            continue
        row = measure(case)
        rows.append(row)
        print(
            f"{row['case']:72s} oracle {row['oracle_peak'] / 2**20:9.1f} MiB  ours {row['ours_peak'] / 2**20:9.1f} MiB "
            f"err {row['peak_err'] * 100:+6.2f}%  [{row['oracle_phase']}/{row['ours_phase']}]  "
            f"FLOPs err {row['flops_err'] * 100:+6.2f}%  ({row['trace_s']:.1f} s)",
            flush=True,
        )
    peak_errs = [abs(r["peak_err"]) for r in rows]
    flop_errs = [abs(r["flops_err"]) for r in rows]
    print(
        f"\n{len(rows)} cases: peak |err| median {statistics.median(peak_errs) * 100:.2f}% max {max(peak_errs) * 100:.2f}%; "
        f"FLOPs |err| median {statistics.median(flop_errs) * 100:.2f}% max {max(flop_errs) * 100:.2f}%"
    )
    if args.markdown:
        print("\n| case | oracle peak MiB | ours MiB | peak err | phase (oracle/ours) | FLOPs err |")
        print("|---|---:|---:|---:|---|---:|")
        for r in rows:
            print(
                f"| {r['case']} | {r['oracle_peak'] / 2**20:.1f} | {r['ours_peak'] / 2**20:.1f} | "
                f"{r['peak_err'] * 100:+.2f}% | {r['oracle_phase']}/{r['ours_phase']} | {r['flops_err'] * 100:+.2f}% |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
