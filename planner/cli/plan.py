"""Verbs of the decision (issue 5): `planner plan` and `planner compare`.

`planner plan` takes a budget (--compute, --budget-usd, --gpu-hours, --deadline-hours), the
hardware (--gpu, --num-gpus), an optional data pool and model, and answers the recommended run,
the Pareto front over loss, cost and time, the binding constraints and the stopping threshold.
Plans are files: --request reads a JSON/YAML PlanRequest (flags override it), --save writes the
Plan, --from-plan reads one back, --export writes what an engine launches with.
`planner compare` plans named allocations side by side under the same limits.

Numbers accept plain floats (1e22) and the suffixes K, M, B, T (20B tokens).
"""

from __future__ import annotations

import argparse

from planner.errors import PlannerError

_LIST_FIELDS = {
    "methods": str, "lora_ranks": int, "optimizers": str, "checkpointing": str, "zero": int,
    "tensor_parallel": int, "micro_batches": int, "gpu_counts": int, "selection": str, "keep_fractions": float,
    "strategies": str,
}


def _quantity(what: str):
    def parse(text: str) -> float:
        from planner.cli.loss import parse_quantity

        try:
            return parse_quantity(text, what)
        except PlannerError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_request_arguments(p: argparse.ArgumentParser) -> None:
    from planner.cli.train import positive_int

    p.add_argument("--request", metavar="FILE", help="a PlanRequest as JSON or YAML (flags override it)")
    p.add_argument("--model", help="fine-tune this catalog model (comma-separated: choose among them); none: pre-train and choose the size")
    p.add_argument("--gpu", help="catalog GPU (default h100-sxm, reported)")
    p.add_argument("--num-gpus", type=positive_int, help="GPUs available (default: free)")
    p.add_argument("--price-usd-per-hour", type=_quantity("price"), help="per GPU-hour (default: the catalog's)")
    p.add_argument("--compute", type=_quantity("--compute"), help="training FLOP budget, 6 N D convention (e.g. 1e21)")
    p.add_argument("--budget-usd", type=_quantity("--budget-usd"), help="dollar budget")
    p.add_argument("--gpu-hours", type=_quantity("--gpu-hours"), help="GPU-hour budget")
    p.add_argument("--deadline-hours", type=_quantity("--deadline-hours"), help="wall-clock limit of the run")
    p.add_argument("--data-pool", type=_quantity("--data-pool"), help="unique tokens available (e.g. 20B)")
    p.add_argument("--max-epochs", type=_quantity("--max-epochs"), help="cap on passes over the kept data")
    p.add_argument("--no-repeat", action="store_true", default=None, help="never repeat data (D <= kept pool)")
    p.add_argument("--objective", choices=("loss", "cost", "time"))
    p.add_argument("--target-loss", type=float, help="objective cost/time: cheapest/fastest plan reaching this loss")
    p.add_argument("--law", help="scaling law: catalog name or JSON path (default besiroglu2024)")
    p.add_argument("--calibration", metavar="PROFILE.json", help="calibration profile (planner calibrate)")
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--global-batch-tokens", type=_quantity("--global-batch-tokens"))
    p.add_argument("--methods", help="full,lora,qlora")
    p.add_argument("--lora-ranks", help="e.g. 16,64")
    p.add_argument("--peft-efficiency", help="token efficiency of LoRA/QLoRA: one number or lora=0.5,qlora=0.4")
    p.add_argument("--optimizers", help="adamw,adamw-8bit,adafactor,sgd,lion")
    p.add_argument("--checkpointing", help="none,selective,full")
    p.add_argument("--zero", help="ZeRO stages to try, e.g. 0,3")
    p.add_argument("--tensor-parallel", help="tensor-parallel degrees to try, e.g. 1,8")
    p.add_argument("--micro-batches", help="e.g. 1,2,4,8")
    p.add_argument("--gpu-counts", help="GPU counts to try (default: all --num-gpus)")
    p.add_argument("--selection", help="data selection: all and/or methods of models_catalog/pruning_methods.json")
    p.add_argument("--keep", dest="keep_fractions", help="fractions of the pool to keep, e.g. 0.5")
    p.add_argument("--tokens", type=_quantity("--tokens"), help="fix the training tokens")
    p.add_argument("--epochs", type=_quantity("--epochs"), help="fix the passes over the kept data")
    p.add_argument("--json", action="store_true", help="print one JSON object (SI units)")
    p.add_argument("--plot", metavar="FILE.png", help="write a figure")


def register(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="the recommended run, Pareto front, binding constraints and stopping threshold")
    _add_request_arguments(plan)
    plan.add_argument("--from-plan", metavar="PLAN", help="read a saved plan (JSON/YAML) instead of planning")
    plan.add_argument("--save", metavar="PLAN", help="write the plan as JSON or YAML")
    plan.add_argument("--export", choices=("hf-trainer", "accelerate", "deepspeed"), help="write a launch configuration")
    plan.add_argument("--out", metavar="PATH", help="where --export writes")
    plan.add_argument("--exhaustive", action="store_true", help="evaluate every set-up (no dominance pruning)")
    plan.add_argument("--continuous-check", action="store_true",
                      help="pre-training: also solve the geometric program over model size and tokens (cvxpy) and "
                           "compare it with the grid's choice")
    plan.set_defaults(handler=run_plan)

    cmp = subparsers.add_parser("compare", help="named allocations side by side: loss, cost, time, memory")
    cmp.add_argument("file", nargs="?", help="a compare file (JSON/YAML: base + allocations)")
    cmp.add_argument("--alloc", action="append", default=[], metavar="NAME:key=value,...",
                     help="an allocation, e.g. '8B LoRA:model=llama-3.1-8b,method=lora' (repeatable)")
    _add_request_arguments(cmp)
    cmp.set_defaults(handler=run_compare)


# ----------------------------------------------------------------------------- building requests


def _split(text: str, kind, flag: str) -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise PlannerError(f"{flag}: empty list")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise PlannerError(f"{flag}: cannot read {text!r} as a list of {kind.__name__}") from None


def request_overrides(args) -> dict:
    """The request fields the command line sets (flags left out are absent)."""
    out: dict = {}
    if args.model:
        out["models"] = _split(args.model, str, "--model")
    simple = {"gpu": "gpu", "num_gpus": "num_gpus", "price_usd_per_hour": "price_usd_per_hour",
              "compute": "compute_flops", "budget_usd": "budget_usd", "gpu_hours": "gpu_hours",
              "data_pool": "data_pool_tokens", "max_epochs": "max_epochs", "objective": "objective",
              "target_loss": "target_loss", "law": "law", "calibration": "calibration", "seq_len": "seq_len",
              "tokens": "tokens", "epochs": "epochs"}
    for flag, field in simple.items():
        value = getattr(args, flag)
        if value is not None:
            out[field] = value
    if args.deadline_hours is not None:
        out["deadline_s"] = args.deadline_hours * 3600.0
    if args.global_batch_tokens is not None:
        out["global_batch_tokens"] = int(args.global_batch_tokens)
    if args.no_repeat:
        out["repeat"] = False
    for field, kind in _LIST_FIELDS.items():
        value = getattr(args, field, None)
        if value is not None:
            out[field] = _split(value, kind, "--" + field.replace("_", "-").replace("keep-fractions", "keep"))
    if args.peft_efficiency:
        out["peft_efficiency"] = _peft_efficiency(args.peft_efficiency)
    return out


def _peft_efficiency(text: str) -> dict:
    from planner.search.plan import DEFAULT_PEFT_TOKEN_EFFICIENCY

    eff = dict(DEFAULT_PEFT_TOKEN_EFFICIENCY)
    try:
        if "=" not in text:
            value = float(text)
            eff.update(lora=value, qlora=value)
        else:
            for part in text.split(","):
                key, value = part.split("=")
                if key.strip() not in ("lora", "qlora"):
                    raise ValueError
                eff[key.strip()] = float(value)
    except ValueError:
        raise PlannerError(f"--peft-efficiency: expected a number or lora=X,qlora=Y, got {text!r}") from None
    return eff


def build_request(args):
    from planner.search.plan import PlanRequest

    data = {}
    if args.request:
        from planner.io.planfiles import load_request

        data = load_request(args.request).model_dump(exclude_unset=True)
    data.update(request_overrides(args))
    return PlanRequest.model_validate(data)


# ----------------------------------------------------------------------------- plan


def run_plan(args) -> int:
    from planner.io.report import to_json

    if args.export and not args.out:
        raise PlannerError("--export needs --out PATH (where to write the configuration)")
    if args.out and not args.export:
        raise PlannerError("--out is the path of --export; give --export hf-trainer|accelerate|deepspeed")
    if args.from_plan:
        from planner.io.planfiles import load_plan

        result = load_plan(args.from_plan)
    else:
        from planner.search.planning import make_plan

        result = make_plan(build_request(args), exhaustive=args.exhaustive, continuous_check=args.continuous_check)
    written = []
    if args.save:
        from planner.io.planfiles import write_data

        written.append(write_data(result, args.save))
    if args.export:
        from planner.io.exports import export

        written += export(result, args.export, args.out)
    if args.plot:
        from planner.io import plots

        written.append(plots.plot_plan(result, args.plot))
    if args.json:
        print(to_json(result.model_dump(mode="json")))
    else:
        print(plan_text(result))
        for path in written:
            print(f"wrote {path}")
    return 0


def plan_text(p) -> str:
    """`planner plan` for people."""
    from planner.io.report import render_table
    from planner.units import fmt_bytes, fmt_count, fmt_flops, fmt_percent, fmt_seconds, fmt_usd

    r = p.recommended
    req = p.request
    head = (f"plan: {'pre-train (size chosen)' if p.mode == 'pretrain' else 'fine-tune ' + ', '.join(req.models)} on "
            f"{'up to ' + str(req.num_gpus) if req.num_gpus else 'any number of'} x {p.gpu} "
            f"(${p.price_usd_per_hour:g}/GPU-hour), law {p.law}, objective {req.objective}")
    data = "all the data" if r.selection == "all" else f"{r.selection}: keep {fmt_percent(r.keep_fraction)} ({r.strategy})"
    if r.unique_tokens is not None:
        data += f", {r.epochs:.2f} epochs over {fmt_count(r.unique_tokens)} unique tokens"
    method = r.method if r.method == "full" else f"{r.method} (rank {r.lora_rank})"
    lines = [
        head,
        "",
        f"recommended: {r.model} ({fmt_count(r.params)} params), {method}, {fmt_count(r.tokens)} tokens, {data}",
        f"  set-up: {r.precision} {r.optimizer}, checkpointing {r.checkpointing}, {r.num_gpus} GPU(s) ZeRO-{r.zero} "
        f"TP {r.tensor_parallel}, micro-batch {r.micro_batch} x {r.grad_accum} accumulation x {r.seq_len} tokens "
        f"= {fmt_count(r.global_batch_tokens)} tokens/step, {r.steps:,} steps",
        f"  predicted loss {r.loss:.4f}; {fmt_seconds(r.time_s)} wall, {r.gpu_hours:,.0f} GPU-hours, {fmt_usd(r.cost_usd)}, "
        f"{fmt_flops(r.compute_flops)}; MFU {fmt_percent(r.mfu)}; peak {fmt_bytes(r.peak_bytes)} of {fmt_bytes(r.usable_bytes)} per GPU",
        "",
        "constraints:",
    ]
    for c in p.constraints:
        limit = _fmt_unit(c.limit, c.unit)
        used = _fmt_unit(c.used, c.unit)
        change = "" if c.loss_change_if_relaxed is None else f"; 10% looser: {req.objective} {c.loss_change_if_relaxed:+.4g}"
        lines.append(f"  {c.name:<17} {used:>14} of {limit:<14} {'BINDING' if c.binding else 'slack ' + fmt_percent(c.slack_fraction)}{change}")
    s = p.stopping
    lines += ["", "stopping:"]
    if s.threshold is None:
        lines.append(f"  {s.note}; planned {s.planned_steps:,} steps, loss {s.loss_at_stop:.4f}")
    else:
        lines.append(f"  lambda = {s.threshold:.4g} {s.threshold_unit}; stop at step {s.stop_step:,} of {s.planned_steps:,} "
                     f"(loss {s.loss_at_stop:.4f}): {s.note}")
    if p.continuous is not None:
        c = p.continuous
        lines += ["", f"continuous check (geometric program): N {fmt_count(c.params)}, D {fmt_count(c.tokens)}, loss {c.loss:.4f}; "
                      f"grid differs by N {c.params_rel_diff:+.1%}, D {c.tokens_rel_diff:+.1%}, loss {c.loss_rel_diff:+.2e}"]
    elif p.mode == "pretrain":
        lines += ["", "continuous check (geometric program): not run (--continuous-check)"]
    rows = [{"loss": f"{q.loss:.4f}", "cost": fmt_usd(q.cost_usd), "time": fmt_seconds(q.time_s), "model": q.model,
             "method": q.method, "gpus": q.num_gpus, "tokens": fmt_count(q.tokens),
             "data": q.selection if q.selection == "all" else f"{q.selection} {q.keep_fraction:.2g}",
             "": "<-" if q == r else ""} for q in p.pareto]
    step = -(-len(rows) // 20)
    shown = rows[::step]
    if step > 1 and shown[-1] is not rows[-1]:
        shown.append(rows[-1])
    every = f", every {step}th shown" if step > 1 else ""
    lines += ["", f"Pareto front over loss, cost and time: {len(rows)} plans (by cost{every})", render_table(shown)]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in p.assumptions]
    lines.append(f"\nsearched {p.search.setups_evaluated} set-ups ({p.search.rows_feasible} set-up x micro-batch rows fit), "
                 f"{p.search.candidates:,} candidates in {p.search.wall_s:.2f} s")
    return "\n".join(lines)


def _fmt_unit(value: float, unit: str) -> str:
    from planner.units import fmt_bytes, fmt_count, fmt_flops, fmt_seconds, fmt_usd

    return {"FLOP": fmt_flops, "USD": fmt_usd, "bytes": fmt_bytes, "s": fmt_seconds, "tokens": fmt_count}.get(
        unit, lambda v: f"{v:,.0f} {unit}")(value)


# ----------------------------------------------------------------------------- compare


_ALLOC_QUANTITIES = ("tokens", "epochs")


def parse_allocation(text: str) -> dict:
    """'NAME:key=value,key=value' -> Allocation fields."""
    from planner.cli.loss import parse_quantity

    if ":" not in text:
        raise PlannerError(f"--alloc {text!r}: expected NAME:key=value,... (e.g. '8B LoRA:model=llama-3.1-8b,method=lora')")
    name, _, rest = text.partition(":")
    out: dict = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise PlannerError(f"--alloc {name!r}: {part!r} is not key=value")
        key = key.strip().replace("-", "_")
        out[key] = parse_quantity(value, key) if key in _ALLOC_QUANTITIES else value.strip()
    return out


def build_compare(args):
    from pydantic import ValidationError

    from planner.io.planfiles import load_compare
    from planner.search.plan import CompareRequest, PlanRequest

    base = load_compare(args.file).base.model_dump(exclude_unset=True) if args.file else {}
    allocations = [a.model_dump(exclude_unset=True) for a in load_compare(args.file).allocations] if args.file else []
    if args.request:
        from planner.io.planfiles import load_request

        base.update(load_request(args.request).model_dump(exclude_unset=True))
    base.update(request_overrides(args))
    allocations += [parse_allocation(a) for a in args.alloc]
    if not allocations:
        raise PlannerError("nothing to compare: give a compare file or --alloc NAME:key=value,... (at least one)")
    try:
        return CompareRequest(base=PlanRequest.model_validate(base), allocations=allocations)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlannerError(f"{where}: {first['msg']}") from None


def run_compare(args) -> int:
    from planner.io.report import to_json
    from planner.search.compare import compare

    request = build_compare(args)
    rows = compare(request)
    if args.plot:
        from planner.io import plots

        plots.plot_allocations(rows, args.plot)
    if args.json:
        print(to_json({"request": request.model_dump(mode="json"), "rows": rows}))
    else:
        print(compare_text(rows))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def compare_text(rows: list[dict]) -> str:
    from planner.io.report import render_table
    from planner.units import fmt_bytes, fmt_count, fmt_seconds, fmt_usd

    table = []
    notes = []
    for r in rows:
        if not r["feasible"]:
            table.append({"allocation": r["name"], "loss": "infeasible"})
            notes.append(f"{r['name']}: {r['reason']}")
            continue
        data = "all" if r["selection"] == "all" else f"{r['selection']} {r['keep_fraction']:.2g}"
        table.append({
            "allocation": r["name"], "loss": f"{r['loss']:.4f}", "cost": fmt_usd(r["cost_usd"]), "time": fmt_seconds(r["time_s"]),
            "peak/GPU": fmt_bytes(r["peak_bytes"]), "model": r["model"], "method": r["method"], "gpus": r["num_gpus"],
            "tokens": fmt_count(r["tokens"]), "epochs": "-" if r["epochs"] is None else f"{r['epochs']:.2f}", "data": data,
            "binding": ",".join(r["binding"]) or "-",
        })
    out = render_table(table)
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out
