"""Verbs of the compute axis past training: `planner serve` (latency, throughput, capacity and
$ per million tokens of serving a model) and `planner sample` (a bigger model or more samples
under a per-query budget).

Numbers accept the suffixes K, M, B, T (``--budget-flops-per-query 5T``). ``--json`` prints SI
numbers; ``--plot FILE.png`` writes a figure (``planner.io.serving_plots``).
"""

from __future__ import annotations

import math

from planner.errors import PlannerError

WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8", "int4", "nf4")
KV_DTYPES = ("bf16", "fp16", "fp32", "fp8", "int8")


def register(subparsers) -> None:
    from planner.cli.train import add_output_flags, positive_int

    serve = subparsers.add_parser("serve", help="serving latency, throughput, KV capacity and $ per million tokens")
    serve.add_argument("model", help="catalog name, HF repo id of a catalog entry, or a config.json path")
    serve.add_argument("--gpu", required=True, help="catalog GPU name (see `planner catalog gpus`)")
    serve.add_argument("--tensor-parallel", "--num-gpus", dest="tensor_parallel", type=positive_int, default=1,
                       help="GPUs of one tensor-parallel replica")
    serve.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="bf16")
    serve.add_argument("--kv-dtype", choices=KV_DTYPES, default="bf16")
    serve.add_argument("--input-tokens", type=positive_int, default=1024, help="prompt tokens per request")
    serve.add_argument("--output-tokens", type=positive_int, default=256, help="generated tokens per request")
    serve.add_argument("--target-latency-ms", type=float, default=50.0, help="time per output token to meet")
    serve.add_argument("--target-ttft-ms", type=float, help="time to first token to meet as well")
    serve.add_argument("--scheduling", choices=("continuous", "static"), default="continuous")
    serve.add_argument("--block-size", type=positive_int, default=16, help="vLLM KV block size in tokens")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--usd-per-gpu-hour", type=float, help="replace the catalog's indicative price")
    add_output_flags(serve)
    serve.set_defaults(handler=run_serve)

    sample = subparsers.add_parser("sample", help="a bigger model or more samples: coverage under a per-query budget")
    sample.add_argument("--models", required=True,
                        help="comma-separated curve names of models_catalog/test_time/brown2024.json, or model names in --pass-at-k")
    budget = sample.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-flops-per-query", help="FLOPs per query, e.g. 5e14 or 500T")
    budget.add_argument("--budget-usd-per-query", type=float, help="$ per query (needs --usd-per-million-tokens)")
    sample.add_argument("--tokens-per-sample", type=positive_int, default=512, help="prompt + generated tokens of one sample")
    sample.add_argument("--pass-at-k", metavar="CSV", help="your measurements: model, params, k, coverage (or per-problem num_samples, num_correct)")
    sample.add_argument("--usd-per-million-tokens", help="comma-separated serving price of each model (e.g. from `planner serve`)")
    add_output_flags(sample)
    sample.set_defaults(handler=run_sample)


def run_serve(args) -> int:
    import numpy as np

    from planner.cost.serving.capacity import longest_context, paged_kv
    from planner.cost.serving.throughput import BATCH_GRID, at_target_latency, serving_estimate
    from planner.io.report import to_json
    from planner.specs.catalog import load_gpu, load_spec
    from planner.units import fmt_bytes, fmt_count, fmt_seconds, fmt_usd

    spec, gpu = load_spec(args.model), load_gpu(args.gpu)
    if args.target_latency_ms <= 0 or (args.target_ttft_ms is not None and args.target_ttft_ms <= 0):
        raise PlannerError("target latencies must be positive milliseconds")
    tp = args.tensor_parallel
    paged = paged_kv(spec, gpu, args.weight_dtype, args.kv_dtype, tp, block_size=args.block_size,
                     gpu_memory_utilization=args.gpu_memory_utilization)
    if paged.num_blocks == 0:
        room = gpu.memory_bytes * args.gpu_memory_utilization - paged.non_torch_bytes - paged.profile_activation_bytes
        need = 2 ** math.ceil(math.log2(max(paged.weights_bytes * tp / max(room, 1.0) * 1.25, 1.0)))
        raise PlannerError(
            f"{spec.name} in {args.weight_dtype} does not fit on {tp} x {gpu.name}: weights {fmt_bytes(paged.weights_bytes)} per GPU "
            f"leave {fmt_bytes(paged.kv_budget_bytes)} for the KV cache; try --tensor-parallel {max(need, 2 * tp)} or --weight-dtype int4")
    common = dict(input_tokens=args.input_tokens, output_tokens=args.output_tokens, weight_dtype=args.weight_dtype,
                  kv_dtype=args.kv_dtype, tensor_parallel=tp)
    est = serving_estimate(spec, gpu, batch=BATCH_GRID, scheduling=args.scheduling, paged=paged,
                           usd_per_gpu_hour=args.usd_per_gpu_hour, **common)
    target = at_target_latency(spec, gpu, args.target_latency_ms / 1e3, target_ttft_s=(args.target_ttft_ms or 0) / 1e3 or None, **common)
    if args.usd_per_gpu_hour is not None and target["feasible"]:
        k = int(np.flatnonzero(est.batch == target["batch"])[0])
        target["usd_per_million_output_tokens"] = float(est.usd_per_million_output_tokens[k])
    target.pop("estimate")
    rows = [{"batch": int(b), "ttft": fmt_seconds(t0), "tpot": fmt_seconds(t1), "tok/s/GPU": fmt_count(r),
             "$/M out": "-" if math.isnan(u) else fmt_usd(u), "bound": bd, "fits": bool(f)}
            for b, t0, t1, r, u, bd, f in zip(est.batch, est.ttft_s, est.tpot_s, est.output_tokens_per_s_per_gpu,
                                               est.usd_per_million_output_tokens, est.bound, est.fits, strict=True)]
    payload = {
        "model": spec.name, "gpu": gpu.name, "tensor_parallel": tp, "weight_dtype": args.weight_dtype, "kv_dtype": args.kv_dtype,
        "input_tokens": args.input_tokens, "output_tokens": args.output_tokens, "scheduling": args.scheduling,
        "kv_cache": {"weights_bytes_per_gpu": paged.weights_bytes, "kv_budget_bytes_per_gpu": paged.kv_budget_bytes,
                     "block_size_tokens": paged.block_size, "block_bytes_per_gpu": paged.block_bytes, "num_blocks": paged.num_blocks,
                     "max_cached_tokens": paged.max_cached_tokens, "max_num_seqs": paged.max_num_seqs,
                     "largest_batch": float(paged.max_concurrent_sequences(args.input_tokens + args.output_tokens)),
                     "longest_context_tokens": longest_context(paged, spec)},
        "at_target": {"target_tpot_s": args.target_latency_ms / 1e3, **target},
        "by_batch": [{"batch": float(b), "ttft_s": float(t0), "tpot_s": float(t1), "output_tokens_per_s_per_gpu": float(r),
                      "usd_per_million_output_tokens": None if math.isnan(u) else float(u), "bound": str(bd), "fits": bool(f)}
                     for b, t0, t1, r, u, bd, f in zip(est.batch, est.ttft_s, est.tpot_s, est.output_tokens_per_s_per_gpu,
                                                        est.usd_per_million_output_tokens, est.bound, est.fits, strict=True)],
        "uncertainty": est.uncertainty,
        "notes": ["roofline with achieved rates fitted to published vLLM and TensorRT-LLM measurements "
                  f"(benchmarks/bench_serving.py): typical error +-{est.uncertainty:.0%}, worst cases 2.6x",
                  "KV blocks as vLLM allocates them: (memory x utilization - weights - profile peak - CUDA context) // block bytes"],
    }
    if args.plot:
        from planner.io.serving_plots import plot_serving

        plot_serving(est, args.plot, args.target_latency_ms / 1e3, title=f"{spec.name} on {tp} x {gpu.name}")
    if args.json:
        print(to_json(payload))
        return 0
    _print_serve(args, spec, gpu, payload, rows, target, est.uncertainty)
    return 0


def _laws_for(names: list[str], csv_path: str | None):
    from planner.loss.test_time import fit_coverage, load_coverage_laws, read_pass_at_k_csv

    measured, laws = {}, []
    user = read_pass_at_k_csv(csv_path) if csv_path else {}
    catalog = load_coverage_laws()
    for name in names:
        if name in user:
            k, c, params = user[name]
            if params is None:
                raise PlannerError(f"{csv_path}: model {name!r} needs a params column (its size prices the samples)")
            inside = (c > 0) & (c < 1)
            law = fit_coverage(k[inside], c[inside], name=name, params_n=params)
            measured[name] = (k, c)
        elif name in catalog:
            law = catalog[name]
        else:
            known = ", ".join(sorted(set(user) | set(catalog)))
            raise PlannerError(f"no coverage curve for {name!r}; known: {known}")
        laws.append(law)
    return laws, measured


def run_sample(args) -> int:
    import numpy as np

    from planner.cli.loss import parse_quantity
    from planner.io.report import render_table, to_json
    from planner.loss.test_time import choose_model_and_samples, flops_per_sample
    from planner.units import fmt_count, fmt_flops, fmt_usd

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    laws, measured = _laws_for(names, args.pass_at_k)
    flops = flops_per_sample([law.params_n for law in laws], args.tokens_per_sample)
    if args.budget_flops_per_query:
        budget, cost, unit = parse_quantity(args.budget_flops_per_query, "--budget-flops-per-query"), flops, "FLOPs"
    else:
        if not args.usd_per_million_tokens:
            raise PlannerError("--budget-usd-per-query needs --usd-per-million-tokens (one price per model, e.g. from `planner serve`)")
        prices = [parse_quantity(p, "--usd-per-million-tokens") for p in args.usd_per_million_tokens.split(",")]
        if len(prices) != len(laws):
            raise PlannerError(f"--usd-per-million-tokens: one price per model ({len(laws)}), got {len(prices)}")
        budget, cost, unit = args.budget_usd_per_query, np.asarray(prices) * args.tokens_per_sample / 1e6, "$"
    choice = choose_model_and_samples(laws, cost, budget)
    grid = choose_model_and_samples(laws, cost, np.logspace(np.log10(budget) - 3, np.log10(budget) + 2, 41)) if args.plot else None
    best = choice.best_model()[0]
    payload = {"budget_per_query": budget, "budget_unit": unit, "tokens_per_sample": args.tokens_per_sample, "best_model": best,
               "models": [{"name": law.name, "params": law.params_n, "a": law.a, "b": law.b, "cost_per_sample": float(c),
                           "flops_per_sample": float(f), "samples": float(choice.samples[i, 0]),
                           "coverage": None if np.isnan(choice.coverage[i, 0]) else float(choice.coverage[i, 0]),
                           "extrapolated": bool(choice.extrapolated[i, 0]), "fitted_k": [law.k_min, law.k_max],
                           "heldout_rmse_log_coverage": law.heldout_rmse_log, "source": law.source}
                          for i, (law, c, f) in enumerate(zip(laws, np.atleast_1d(cost), flops, strict=True))],
               "notes": ["coverage = pass@k with a perfect verifier; majority voting or reward models plateau below it (Brown et al. 2024, sec. 5)",
                         "sample cost: 2 N FLOPs per token (attention FLOPs left out)"]}
    if args.plot:
        from planner.io.serving_plots import plot_coverage

        plot_coverage(laws, args.plot, measured=measured, choice=grid)
    if args.json:
        print(to_json(payload))
        return 0
    fmt_budget = fmt_flops if unit == "FLOPs" else fmt_usd
    rows = [{"model": m["name"], "params": fmt_count(m["params"]), "per sample": fmt_budget(m["cost_per_sample"]),
             "samples": int(m["samples"]), "coverage": "-" if m["coverage"] is None else f"{m['coverage']:.1%}",
             "extrapolated": m["extrapolated"]} for m in payload["models"]]
    print(f"budget {fmt_budget(budget)} per query, {args.tokens_per_sample} tokens per sample")
    print(render_table(rows))
    print(f"best: {best}" if best else "no model affords one sample at this budget")
    return 0


def _print_serve(args, spec, gpu, payload: dict, rows: list[dict], target: dict, uncertainty: float) -> None:
    """`planner serve` for people: the KV cache, the table by batch, the answer at the target latency."""
    from planner.io.report import render_table
    from planner.units import fmt_bytes, fmt_count, fmt_seconds, fmt_usd

    tp = payload["tensor_parallel"]
    kv = payload["kv_cache"]
    print(f"{spec.name} on {tp} x {gpu.name}, weights {args.weight_dtype}, KV {args.kv_dtype}, "
          f"{args.input_tokens} in / {args.output_tokens} out, {args.scheduling} batching")
    print(f"KV cache: {fmt_bytes(kv['kv_budget_bytes_per_gpu'])} per GPU after {fmt_bytes(kv['weights_bytes_per_gpu'])} of weights = "
          f"{kv['num_blocks']} blocks of {kv['block_size_tokens']} tokens ({fmt_count(kv['max_cached_tokens'])} tokens); "
          f"largest batch {int(kv['largest_batch'])}, longest context {fmt_count(kv['longest_context_tokens'])}")
    print(render_table([r for r in rows if r["batch"] <= max(8, kv["largest_batch"] * 2)]))
    if target["feasible"]:
        usd = target["usd_per_million_output_tokens"]
        print(f"at {args.target_latency_ms:g} ms per token: batch {int(target['batch'])}, "
              f"{fmt_count(target['output_tokens_per_s_per_gpu'])} tokens/s per GPU, "
              f"{'price unknown' if math.isnan(usd) else fmt_usd(usd) + ' per million output tokens'} (+-{uncertainty:.0%})")
    else:
        print(f"no batch meets {args.target_latency_ms:g} ms per token; the fastest is {fmt_seconds(target['fastest_tpot_s'])}")
