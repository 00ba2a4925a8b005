"""The planner's search: candidates evaluated per second, `planner plan` wall time, and plan quality
on problems with a known answer. Prints markdown tables (results recorded in benchmarks/plan.md).

Run: python benchmarks/bench_plan.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from planner.loss import pruning, scaling
from planner.search import candidates, context, pareto, planning, scoring, setups
from planner.search.plan import PlanRequest


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- candidates per second


def candidates_per_second() -> list[dict]:
    """Every candidate of a fine-tuning search scored in one vectorized pass.

    Set-up side: two catalog models x {full, LoRA r16/r64, QLoRA r16/r64} x checkpointing x ZeRO x
    TP on 1-8 H100s, over 7 micro-batches (``evaluate_setups``, exhaustive: no pruning). Data side:
    every selection method of the catalog x kept fraction x strategy, x 25 token counts. Each
    candidate gets its loss, wall time, cost, budget FLOPs and feasibility (``score_candidates``)."""
    request = PlanRequest(models=("llama-3.1-8b", "llama-3.2-3b-instruct"), gpu="h100-sxm", num_gpus=8,
                          gpu_counts=(1, 2, 4, 8), lora_ranks=(16, 64), budget_usd=5000.0, data_pool_tokens=20e9,
                          token_grid=24)
    ctx = context.make_context(request)
    setups._MEMO.clear()
    t0 = time.perf_counter()
    state = planning.search_setups(ctx, exhaustive=True)
    t_setups = time.perf_counter() - t0
    data, _ = candidates.data_choices(request, ctx.law)
    rows = state.table.take(state.table["peak_bytes"] <= ctx.usable_bytes)
    limits = context.limits_of(ctx)
    scoring.score_candidates(ctx, state.models, rows.take(slice(0, 10)), data, limits)  # warm numpy
    t1 = time.perf_counter()
    scored = scoring.score_candidates(ctx, state.models, rows, data, limits)
    t_score = time.perf_counter() - t1
    n = scored["loss"].size
    t2 = time.perf_counter()
    front = pareto.grouped_front(scored, rows)
    t_front = time.perf_counter() - t2
    n_setups = state.stats["setups"]
    return [
        {"stage": "set-up side (memory + step time), exhaustive", "items": f"{n_setups} set-ups x 7 micro-batches x ranks",
         "seconds": f"{t_setups:.2f}", "rate": f"{n_setups / t_setups:,.0f} set-ups/s"},
        {"stage": "scoring (loss, time, cost, FLOPs, feasibility)", "items": f"{n:,} candidates",
         "seconds": f"{t_score:.3f}", "rate": f"{n / t_score:,.0f} candidates/s"},
        {"stage": "Pareto front of the feasible ones", "items": f"{int(scored['feasible'].sum()):,} -> {front.size}",
         "seconds": f"{t_front:.3f}", "rate": f"{scored['feasible'].sum() / t_front:,.0f} candidates/s"},
        {"stage": "end to end (set-ups + scoring + front)", "items": f"{n:,} candidates",
         "seconds": f"{t_setups + t_score + t_front:.2f}", "rate": f"{n / (t_setups + t_score + t_front):,.0f} candidates/s"},
    ]


# ----------------------------------------------------------------------------- plan wall time

PLANS = {
    "contract: --compute 1e21": ["--compute", "1e21"],
    "8B on 8 x H100, $5000, 20B pool": ["--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--num-gpus", "8",
                                         "--budget-usd", "5000", "--data-pool", "20B"],
    "8B or 3B on 8 x H100, $5000, 20B pool": ["--model", "llama-3.1-8b,llama-3.2-3b-instruct", "--gpu", "h100-sxm",
                                               "--num-gpus", "8", "--budget-usd", "5000", "--data-pool", "20B"],
    "8B on 1 x L4, $300 (memory-bound)": ["--model", "llama-3.1-8b", "--gpu", "l4", "--num-gpus", "1",
                                          "--budget-usd", "300"],
    "pre-train, 64 x H100 for a week": ["--gpu", "h100-sxm", "--num-gpus", "64", "--deadline-hours", "168"],
}


def plan_wall_times(repeats: int = 5) -> list[dict]:
    """Each plan as a whole process, the median of ``repeats`` runs (pre-training plans without
    --continuous-check, as `planner plan` runs by default)."""
    out = []
    for label, argv in PLANS.items():
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "planner.cli", "plan", *argv, "--json"], capture_output=True,
                                  text=True, timeout=600)
            walls.append(time.perf_counter() - t0)
            if proc.returncode:
                raise SystemExit(f"{label}: {proc.stderr}")
        plan = json.loads(proc.stdout)
        r = plan["recommended"]
        out.append({"request": label, "process wall (s)": f"{statistics.median(walls):.2f}",
                    "search (s)": f"{plan['search']['wall_s']:.2f}",
                    "set-ups": plan["search"]["setups_evaluated"], "candidates": f"{plan['search']['candidates']:,}",
                    "front": len(plan["pareto"]),
                    "recommended": f"{r['model']} {r['method']} {r['num_gpus']} GPU, {r['tokens']:.3g} tok, loss {r['loss']:.4f}"})
    return out


# ----------------------------------------------------------------------------- quality


def quality(quick: bool) -> list[dict]:
    rows = []
    budgets = (1e19, 1e21) if quick else (1e19, 1e21, 1e23)
    for law_name in ("besiroglu2024", "hoffmann2022"):
        law = scaling.load_law(law_name)
        for c in budgets:
            plan = planning.make_plan(PlanRequest(compute_flops=c, law=law_name, gpu="h100-sxm"))
            n, d = (float(v) for v in scaling.optimal_closed_form(law, c))
            loss = float(scaling.optimal_loss(law, c))
            r = plan.recommended
            rows.append({"problem": f"no limits, C={c:.0e}, {law_name}", "known answer": f"N*={n:.3g}, D*={d:.3g}, L*={loss:.4f}",
                         "plan": f"N={r.params:.3g}, D={r.tokens:.3g}, L={r.loss:.4f}",
                         "error": f"N {r.params / n - 1:+.1%}, D {r.tokens / d - 1:+.1%}, L {r.loss / loss - 1:+.1e}; "
                                  f"GP N {plan.continuous.params / n - 1:+.1e}"})
    law = scaling.load_law("besiroglu2024")
    c = 1e20
    _, d_star = scaling.optimal_closed_form(law, c)
    pool = float(d_star) / 8
    ref = scaling.compute_optimal(law, c, pool, repeat=True)
    r = planning.make_plan(PlanRequest(compute_flops=c, data_pool_tokens=pool, selection=("all",), gpu="h100-sxm",
                                       num_gpus=8)).recommended
    rows.append({"problem": f"pool = D*/8, C={c:.0e} (repeat)", "known answer": f"N={ref.params_n:.3g}, {ref.epochs:.2f} epochs, L={ref.loss:.4f}",
                 "plan": f"N={r.params:.3g}, {r.epochs:.2f} epochs, L={r.loss:.4f}",
                 "error": f"N {r.params / ref.params_n - 1:+.1%}, L {r.loss / ref.loss - 1:+.1e}"})
    c = 1e21
    _, d_star = scaling.optimal_closed_form(law, c)
    pool = float(d_star) / 2
    ref = pruning.plan_pruning(c, pool, "perplexity_proxy", law)
    r = planning.make_plan(PlanRequest(compute_flops=c, data_pool_tokens=pool, selection=("all", "perplexity_proxy"),
                                       gpu="h100-sxm", num_gpus=8)).recommended
    rows.append({"problem": f"pool = D*/2, C={c:.0e}, perplexity pruning", "known answer": f"keep {ref.keep_fraction:.2f}, L={ref.loss:.4f}",
                 "plan": f"{r.selection} keep {r.keep_fraction:.2f}, L={r.loss:.4f}",
                 "error": f"L {r.loss / ref.loss - 1:+.1e}"})
    rows.append(_memory_switch())
    return rows


def _memory_switch() -> dict:
    """Chosen method vs the memory model's verdict on a grid of (model, GPU) pairs, one GPU each."""
    import sys as _sys
    from pathlib import Path

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_optimize import _fits_any

    pairs = [(m, g) for m in ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-3b-instruct", "llama-3.1-8b", "qwen2.5-32b")
             for g in ("l4", "a100-40gb", "a100-80gb", "h200")]
    agree = 0
    for model, gpu in pairs:
        request = PlanRequest(models=(model,), gpu=gpu, num_gpus=1, price_usd_per_hour=2.0, budget_usd=300.0)
        try:
            rec = planning.make_plan(request).recommended.method
        except Exception:  # noqa: BLE001 - nothing fits: counts as agreeing if nothing fits by the oracle
            rec = None
        full = _fits_any(model, gpu, "full", request)
        lora = _fits_any(model, gpu, "lora", request)
        qlora = _fits_any(model, gpu, "qlora", request)
        expect = "full" if full else ("lora" if lora else ("qlora" if qlora else None))
        agree += rec == expect or (expect == "lora" and rec == "qlora")
    return {"problem": f"memory limit: method switch, {len(pairs)} (model, GPU) pairs", "known answer": "planner.cost.memory.phases's verdict",
            "plan": f"{agree}/{len(pairs)} agree", "error": f"{len(pairs) - agree} disagree"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print("## Candidates per second\n")
    print(_table(candidates_per_second()))
    print("\n## `planner plan` wall time (fresh process, cold caches, median of 5)\n")
    print(_table(plan_wall_times()))
    print("\n## Plan quality on known answers\n")
    print(_table(quality(args.quick)))


if __name__ == "__main__":
    main()
