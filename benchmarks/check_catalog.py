"""Check every catalog model against transformers: it loads, builds on the meta device, and its
parameter count matches the published one.

    python benchmarks/check_catalog.py [--tolerance 0.025]

Prints name, model_type, transformers' parameter count (``sum(p.numel() for p in model.parameters())``,
which counts tied weights once), the published count from source.json, and their ratio. Exits 1 when a
model fails to build or its ratio is outside 1 +- tolerance, so the table cannot silently go stale.
Needs torch and transformers (the ``oracle`` extra); no weights are downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def transformers_param_count(config: dict) -> tuple[int, str]:
    """(parameter count, class name) of the transformers causal LM built from ``config`` on meta."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters()), type(model).__name__


def main(argv: list[str] | None = None) -> int:
    from planner.specs.catalog import list_models, load_model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.025, help="allowed |ratio - 1| (default 0.025)")
    args = parser.parse_args(argv)

    import transformers

    header = f"{'name':26s} {'model_type':13s} {'transformers_params':>20s} {'published_params':>18s} {'ratio':>7s}"
    print(f"transformers {transformers.__version__}; tolerance +-{args.tolerance:.1%}")
    print(header)
    print("-" * len(header))
    failures = []
    start = time.perf_counter()
    for name in list_models():
        config, source = load_model_config(name)
        published = source.get("published_params")
        try:
            count, _ = transformers_param_count(config)
        except Exception as exc:  # report every model, then fail
            failures.append(f"{name}: does not build: {type(exc).__name__}: {exc}")
            print(f"{name:26s} {config.get('model_type', '?'):13s} {'BUILD FAILED':>20s}")
            continue
        ratio = count / published if published else float("nan")
        flag = "" if abs(ratio - 1) <= args.tolerance else "  <-- outside tolerance"
        if flag:
            failures.append(f"{name}: ratio {ratio:.4f}")
        print(f"{name:26s} {config['model_type']:13s} {count:>20,d} {published:>18,.0f} {ratio:>7.4f}{flag}")
    print(f"{len(list_models())} models in {time.perf_counter() - start:.1f} s")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
