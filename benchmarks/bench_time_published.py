"""The default step-time model against published measured throughput, leave one source out.

Every run of ``models_catalog/measurements/throughput.csv`` the planner can state is priced by the
grounded time model (``planner.cost.timing.grounding``) with constants fitted on every OTHER source
(``planner.cost.timing.fit.loso``); the tables give the held-out error of tokens per second by
source and by regime, and whether each run falls in the 80% interval built from the other
sources' held-out errors. ``--write`` refits the committed constants
(``models_catalog/time_model/constants.json``); without it the committed file is compared with
what the code reproduces.

Run: python benchmarks/bench_time_published.py [--write] [--runs] [--unexpressible]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from planner.cost.timing import fit as time_fit
from planner.cost.timing.published import published_runs
from planner.specs.catalog import catalog_root


def _row(name: str, s: dict) -> str:
    return (f"| {name} | {s['runs']} | {s['median_abs_error']:.1%} | {s['max_abs_error']:.1%} | "
            f"{s['median_error']:+.1%} | {s['interval_coverage']:.0%} |")


def print_tables(summary: dict) -> None:
    head = "| {} | runs | median abs err | max abs err | median err (+: optimistic) | in 80% interval |"
    rule = "|---|---:|---:|---:|---:|---:|"
    print(head.format("source"), rule, sep="\n")
    for source, s in sorted(summary["by_source"].items(), key=lambda kv: -kv[1]["runs"]):
        print(_row(source, s))
    print("\n" + head.format("regime"), rule, sep="\n")
    for regime, s in summary["by_regime"].items():
        print(_row(regime, s))
    o = summary["overall"]
    print(_row(f"**all ({o['sources']} sources)**", o))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="refit and write models_catalog/time_model/constants.json")
    parser.add_argument("--runs", action="store_true", help="print every held-out run")
    parser.add_argument("--unexpressible", action="store_true", help="list every run left out and why")
    args = parser.parse_args(argv)
    runs, left_out = published_runs()
    tab = time_fit.table(runs)
    fitted = time_fit.committed(tab)
    pipeline = sum(r.setup.pipeline_parallel > 1 for r in runs)
    print(f"{len(runs)} runs from {len(set(r.source_id for r in runs))} sources priced ({pipeline} pipeline-parallel); "
          f"{len(left_out)} runs unexpressible\n")
    print_tables(fitted["loso"])
    print("\nconstants fitted on every source:")
    print("  " + ", ".join(f"{k} {v:.3g}" for k, v in fitted["values"].items()))
    print("80% interval of log(measured / predicted step time) by regime:")
    print("  " + ", ".join(f"{k} [{lo:+.3f}, {hi:+.3f}]" for k, (lo, hi) in fitted["interval_log_ratio"].items()))
    reasons = Counter(reason.split(":")[0] if "implausible" in reason else reason for _, _, reason in left_out)
    print("\nunexpressible runs by reason:")
    for reason, count in reasons.most_common():
        print(f"  {count:4d}  {reason}")
    if args.unexpressible:
        for key, source, reason in left_out:
            print(f"  {key} ({source}): {reason}")
    if args.runs:
        result = time_fit.loso(tab)
        for i in np.argsort(-np.abs(result["log_errors"])):
            print(f"  {tab['id'][i]:36s} {tab['regime'][i]:12s} {time_fit.throughput_errors(result['log_errors'][i]):+.1%}")
    file = catalog_root().joinpath("time_model", "constants.json")
    if args.write:
        with open(str(file), "w", encoding="utf-8") as out:
            json.dump(fitted, out, indent=1)
            out.write("\n")
        print(f"\nwrote {file}")
        return 0
    committed = json.loads(file.read_text(encoding="utf-8"))
    same = np.allclose([committed["values"][k] for k in fitted["values"]], list(fitted["values"].values()), rtol=1e-6)
    print(f"\ncommitted constants {'reproduced' if same else 'DIFFER from the refit: run with --write'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
