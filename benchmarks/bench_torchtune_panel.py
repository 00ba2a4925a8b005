"""The torchtune stack's memory model against torchtune 0.6.1's own model code on fake tensors.

    python benchmarks/bench_torchtune_panel.py [--flops]

For each case of ``planner.truth.oracle_panel.TORCHTUNE_PANEL`` (the recipes' set-ups and their
techniques, a few decoder layers of real configs): the peak that MemTracker measures over one
step of torchtune's model (``planner.truth.torchtune_step``) and the peak of
``planner.cost.memory.phases.training_memory`` with ``stack="torchtune"``; with ``--flops``, the FLOPs that
FlopCounterMode counts against ``planner.cost.estimate.training_flops``. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", action="store_true", help="also count FLOPs (slower)")
    args = parser.parse_args()

    from planner.cost.estimate import training_flops
    from planner.cost.memory.phases import training_memory
    from planner.specs.catalog import load_model_config
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config
    from planner.specs.setup import TrainingSetup
    from planner.truth.oracle_panel import TORCHTUNE_PANEL
    from planner.truth.torchtune_step import trace_torchtune_step

    print("| case | oracle peak MiB | planner peak MiB | error |" + (" FLOPs error |" if args.flops else ""))
    print("|---|---|---|---|" + ("---|" if args.flops else ""))
    errors = []
    for case in TORCHTUNE_PANEL:
        config = reduce_layers(load_model_config(case.model)[0], case.num_layers)
        setup = TrainingSetup(**case.setup)
        spec = model_spec_from_config(config, case.model)
        oracle = trace_torchtune_step(config, setup, count_flops=args.flops)
        ours = float(training_memory(spec, setup).peak_bytes)
        errors.append(ours / oracle.peak_bytes - 1)
        row = f"| {case.label} | {oracle.peak_bytes / 2**20:.1f} | {ours / 2**20:.1f} | {errors[-1]:+.2%} |"
        if args.flops:
            counted = oracle.flops_forward + oracle.flops_backward
            row += f" {float(training_flops(spec, setup).executed) / counted - 1:+.2%} |"
        print(row, flush=True)
    absolute = [abs(e) for e in errors]
    print(f"\n{len(errors)} cases: median |error| {statistics.median(absolute):.2%}, max {max(absolute):.2%}")


if __name__ == "__main__":
    main()
