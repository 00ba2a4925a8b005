"""Serving predictions against published measurements (``models_catalog/measurements/serving.csv``).

For every row: the model, GPU, tensor parallelism, dtypes, batch and lengths it states; what
``planner.cost.serving.throughput`` predicts for its metric; the ratio predicted / measured. Rows the
model cannot express are listed with the reason (no catalog config; GPTQ/AWQ kernels, whose
dequantization cost the byte count does not see, are predicted but kept out of the fit).

The achieved-rate constants (``ServingEfficiency``) are fitted here by least squares on
log(predicted / measured) over the expressible 16-bit and FP8 rows. To say how well that
generalizes, each source is left out in turn: the constants are refitted on the other sources and
the left-out source is predicted (leave-one-source-out). ``--priors`` also prints the errors of
the unfitted priors (datasheet-share guesses) for comparison.

    .venv/bin/python benchmarks/bench_serving.py [--rows] [--priors]
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import fields, replace
from importlib.resources import files

import numpy as np
from scipy.optimize import least_squares

from planner.cost.serving.capacity import paged_kv
from planner.cost.serving.throughput import (
    DEFAULT_EFFICIENCY,
    ServingEfficiency,
    generation_time_s,
    prefill_time_s,
)
from planner.specs.catalog import load_gpu, load_spec

FITTED = ("bandwidth", "prefill_flops", "decode_flops", "layer_overhead_s", "host_floor_s", "allreduce_latency_s")
BOUNDS = {"bandwidth": (0.2, 1.0), "prefill_flops": (0.05, 1.0), "decode_flops": (0.05, 1.0),
          "layer_overhead_s": (0.0, 1e-3), "host_floor_s": (0.0, 20e-3), "allreduce_latency_s": (0.0, 200e-6)}
PRIORS = ServingEfficiency(bandwidth=0.85, prefill_flops=0.75, decode_flops=0.75, layer_overhead_s=0.0,
                           host_floor_s=0.0, allreduce_latency_s=10e-6)


def load_rows() -> list[dict]:
    path = files("models_catalog").joinpath("measurements", "serving.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def expressible(row: dict) -> str:
    """'' when the planner can predict the row, else why not."""
    if not row["model"]:
        return "no catalog config"
    return ""


def predict(row: dict, eff: ServingEfficiency, cache: dict) -> float:
    key = (row["model"], row["gpu"])
    if key not in cache:
        cache[key] = (load_spec(row["model"]), load_gpu(row["gpu"]))
    spec, gpu = cache[key]
    b, i, o, tp = (float(row[k]) for k in ("batch", "input_tokens", "output_tokens", "tensor_parallel"))
    if row["metric"] == "num_gpu_blocks":
        return float(paged_kv(spec, gpu, row["weight_dtype"], row["kv_dtype"], int(tp), max_num_batched_tokens=int(i),
                              max_num_seqs=int(b)).num_blocks)
    args = dict(weight_dtype=row["weight_dtype"], kv_dtype=row["kv_dtype"], tensor_parallel=int(tp), eff=eff)
    if row["metric"] == "ttft_ms":
        return float(prefill_time_s(spec, gpu, b, i, **args)) * 1e3
    _, _, e2e = generation_time_s(spec, gpu, b, i, o, **args)
    total = b * o / float(e2e)
    return total / tp if row["metric"] == "output_tokens_per_s_per_gpu" else total


def in_fit(row: dict) -> bool:
    return not expressible(row) and row["weight_dtype"] in ("bf16", "fp16", "fp8") and row["metric"] != "num_gpu_blocks"


def _with(theta) -> ServingEfficiency:
    return replace(DEFAULT_EFFICIENCY, **dict(zip(FITTED, (float(t) for t in theta), strict=True)))


def fit(rows: list[dict], start: ServingEfficiency = PRIORS) -> ServingEfficiency:
    """Least squares on log(pred / measured), bounded (``BOUNDS``), from ``start`` (the priors:
    a left-out source never influences its own prediction, not even through the starting point)."""
    cache: dict = {}
    measured = np.log([float(r["value"]) for r in rows])

    def residuals(theta):
        eff = _with(theta)
        return np.log([predict(r, eff, cache) for r in rows]) - measured

    x0 = [getattr(start, name) for name in FITTED]
    lo, hi = zip(*(BOUNDS[name] for name in FITTED), strict=True)
    scale = [max(abs(v), 1e-6) for v in x0]
    res = least_squares(residuals, x0, bounds=(lo, hi), x_scale=scale, loss="soft_l1", f_scale=0.2)
    return _with(res.x)


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.0f}%"


def _summary(errors: dict[str, list[float]]) -> list[str]:
    lines = []
    for source, logs in errors.items():
        a = np.abs(np.asarray(logs))
        lines.append(f"  {source:24s} n={len(a):3d}  median |error| {math.expm1(np.median(a)) * 100:5.1f}%  "
                     f"90th pct {math.expm1(np.percentile(a, 90)) * 100:6.1f}%  worst {math.expm1(a.max()) * 100:6.1f}%")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="store_true", help="print every row (default: a sample per source)")
    parser.add_argument("--priors", action="store_true", help="also score the unfitted priors")
    args = parser.parse_args()
    rows = load_rows()
    cache: dict = {}
    fit_rows = [r for r in rows if in_fit(r)]
    sources = sorted({r["source_id"] for r in fit_rows})
    fitted = fit(fit_rows)
    print("constants fitted on all sources:", ", ".join(f"{f.name}={getattr(fitted, f.name):.4g}" for f in fields(fitted) if f.name in FITTED))
    print("shipped defaults (ServingEfficiency):", ", ".join(f"{n}={getattr(DEFAULT_EFFICIENCY, n):.4g}" for n in FITTED))

    loso: dict[str, float] = {}
    for held in sources:
        eff = fit([r for r in fit_rows if r["source_id"] != held])
        for r in fit_rows:
            if r["source_id"] == held:
                loso[r["id"]] = predict(r, eff, cache)

    header = f"{'id':30s} {'model':13s} {'gpu':9s} tp {'w':4s} {'batch':>5s} {'in':>6s} {'out':>5s} {'metric':8s} {'measured':>9s} {'default':>9s} {'ratio':>6s} {'LOSO':>9s} {'ratio':>6s}"
    print("\n" + header)
    errors_default: dict[str, list[float]] = {}
    errors_loso: dict[str, list[float]] = {}
    errors_quant: dict[str, list[float]] = {}
    errors_blocks: dict[str, list[float]] = {}
    shown: dict[str, int] = {}
    for r in rows:
        why = expressible(r)
        metric = {"ttft_ms": "ttft ms", "output_tokens_per_s": "tok/s", "output_tokens_per_s_per_gpu": "tok/s/gpu",
                  "num_gpu_blocks": "KV blocks"}[r["metric"]]
        head = (f"{r['id']:30s} {(r['model'] or r['model_published'])[:13]:13s} {r['gpu']:9s} {r['tensor_parallel']:>2s} "
                f"{r['weight_dtype']:4s} {r['batch']:>5s} {r['input_tokens']:>6s} {r['output_tokens']:>5s} {metric:9s}{float(r['value']):9.1f}")
        if why:
            line = f"{head}  cannot express: {why}"
        else:
            pred = predict(r, DEFAULT_EFFICIENCY, cache)
            ratio = pred / float(r["value"])
            bucket = errors_default if in_fit(r) else errors_blocks if r["metric"] == "num_gpu_blocks" else errors_quant
            bucket.setdefault(r["source_id"], []).append(math.log(ratio))
            line = f"{head} {pred:9.1f} {ratio:6.2f}"
            if r["id"] in loso:
                lr = loso[r["id"]] / float(r["value"])
                errors_loso.setdefault(r["source_id"], []).append(math.log(lr))
                line += f" {loso[r['id']]:9.1f} {lr:6.2f}"
            elif r["metric"] == "num_gpu_blocks":
                line += "   (memory model: no fitted constant)"
            else:
                line += "   (GPTQ/AWQ: not in the fit)"
        shown[r["source_id"]] = shown.get(r["source_id"], 0) + 1
        if args.rows or shown[r["source_id"]] <= 12 or not r["source_id"].startswith("qwen"):
            print(line)
    print("\nerrors with the shipped defaults, 16-bit and FP8 rows (in-sample for the fit on all sources):")
    print("\n".join(_summary(errors_default)))
    print("leave-one-source-out (constants refitted without the source, then the source predicted):")
    print("\n".join(_summary(errors_loso)))
    print("vLLM KV blocks (paged_kv; no constant fitted):")
    print("\n".join(_summary(errors_blocks)))
    print("GPTQ/AWQ rows with the shipped defaults (int8/int4 bytes; dequantization not modelled):")
    print("\n".join(_summary(errors_quant)))
    if args.priors:
        pri: dict[str, list[float]] = {}
        for r in fit_rows:
            pri.setdefault(r["source_id"], []).append(math.log(predict(r, PRIORS, cache) / float(r["value"])))
        print("unfitted priors (bandwidth 0.85, FLOPs 0.75, no fixed costs):")
        print("\n".join(_summary(pri)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
