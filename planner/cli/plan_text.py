"""The text of `planner plan` and `planner compare` for people: the recommended run, its
constraints (budgets, memory, the data pool and the plausibility limits with their sources), the
evidence it stands on and what going beyond would gain, training plus lifetime inference, the
stopping rule, the Pareto front and the assumptions."""

from __future__ import annotations


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
        f"  set-up: {r.precision} {r.optimizer}{_stack_text(r)}, checkpointing {r.checkpointing}, {r.num_gpus} GPU(s) ZeRO-{r.zero} "
        f"TP {r.tensor_parallel}{_pipeline_text(r)}, micro-batch {r.micro_batch} x {r.grad_accum} accumulation x {r.seq_len} tokens "
        f"= {fmt_count(r.global_batch_tokens)} tokens/step, {r.steps:,} steps",
        f"  predicted loss {r.loss:.4f} ({_trust(r)}); {fmt_seconds(r.time_s)} wall{_range(r, 'time_s', fmt_seconds)}, "
        f"{r.gpu_hours:,.0f} GPU-hours, {fmt_usd(r.cost_usd)}{_range(r, 'cost_usd', fmt_usd)}, "
        f"{fmt_flops(r.compute_flops)}; MFU {fmt_percent(r.mfu)}; peak {fmt_bytes(r.peak_bytes)} of {fmt_bytes(r.usable_bytes)} per GPU",
        *_interval_lines(r),
        "",
        "constraints:",
    ]
    for c in p.constraints:
        limit = _fmt_unit(c.limit, c.unit)
        used = _fmt_unit(c.used, c.unit)
        change = "" if c.loss_change_if_relaxed is None else f"; 10% looser: {req.objective} {c.loss_change_if_relaxed:+.4g}"
        state = "BINDING" if c.binding else "slack " + fmt_percent(c.slack_fraction)
        if c.slack_fraction < -1e-6:  # a lifetime plan (--inference-tokens) may train past a budget: say so
            state = f"OVER by {fmt_percent(-c.slack_fraction)}" + (" (lifetime plan: budgets bound the loss)"
                                                                   if p.inference is not None else "")
        held = "" if c.quantile is None else f" (at the {c.quantile:.0%} quantile)"
        lines.append(f"  {c.name:<20} {used:>14} of {limit:<14} {state}{held}{change}")
        if c.binding and c.source:
            lines.append(f"  {'':<20} ({c.source})")
    lines += _evidence_lines(p) + _inference_lines(p)
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
             "method": q.method, **({"stack": q.stack} if req.stacks != ("hf",) else {}), "gpus": q.num_gpus, "tokens": fmt_count(q.tokens),
             "data": q.selection if q.selection == "all" else f"{q.selection} {q.keep_fraction:.2g}",
             "": "<-" if q == r else ""} for q in p.pareto]
    step = -(-len(rows) // 20)
    shown = rows[::step]
    if step > 1 and shown[-1] is not rows[-1]:
        shown.append(rows[-1])
    every = f", one in {step} shown" if step > 1 else ""
    lines += ["", f"Pareto front over loss, cost and time: {len(rows)} plans (by cost{every})", render_table(shown)]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in p.assumptions]
    lines.append(f"\nsearched {p.search.setups_evaluated} set-ups ({p.search.rows_feasible} set-up x micro-batch rows fit), "
                 f"{p.search.candidates:,} candidates in {p.search.wall_s:.2f} s")
    return "\n".join(lines)


def _range(r, field: str, fmt, sep: str = " - ") -> str:
    """" [low - high]" of a candidate's (or a compare row's) 80% interval ("" without one)."""
    get = r.get if isinstance(r, dict) else (lambda key: getattr(r, key, None))
    low, high = get(f"{field}_low"), get(f"{field}_high")
    return "" if low is None or high is None else f" [{fmt(low)}{sep}{fmt(high)}]"


def _interval_lines(r) -> list[str]:
    """What the brackets are, and the run's time and cost at the request's confidence."""
    from planner.units import fmt_seconds, fmt_usd

    if r.time_s_low is None:
        return []
    out = [f"  [80% interval: {r.interval_basis}]"]
    if r.confidence is not None:
        out.append(f"  at the {r.confidence:.0%} quantile (--confidence, what the budgets are held at): "
                   f"{fmt_seconds(r.time_s * r.held_factor)} wall, {fmt_usd(r.cost_usd * r.held_factor)}")
    return out


def _fmt_unit(value: float, unit: str) -> str:
    from planner.units import fmt_bytes, fmt_count, fmt_flops, fmt_seconds, fmt_usd

    return {"FLOP": fmt_flops, "USD": fmt_usd, "bytes": fmt_bytes, "s": fmt_seconds, "tokens": fmt_count}.get(
        unit, lambda v: f"{v:,.3g} {unit}")(value)


def _trust(r) -> str:
    """Which law produced the loss and where the point sits in its evidence."""
    if not r.loss_law:
        return "law of the plan"
    where = r.loss_trust + (f" {r.loss_extrapolation:.3g}x beyond its fitted ranges" if r.loss_trust == "extrapolated" else
                            " inside its fitted ranges" if r.loss_trust == "fitted" else "")
    return f"{r.loss_law}, {where}"


def _evidence_lines(p) -> list[str]:
    e = p.evidence
    if e is None:
        return []
    head = "beyond the evidence (asked): every selection method, no plausibility limits" if e.beyond_evidence else (
        "inside the evidence of its models (--beyond-evidence lifts the limits)")
    lines = ["", f"evidence: {head}"] + [f"  - {n}" for n in e.notes]
    if e.beyond_loss is not None:
        verdict = f"would gain {-e.beyond_gain:.4f} in loss" if e.beyond_gain < 0 else "would gain nothing"
        lines.append(f"  going beyond {verdict} (loss {e.beyond_loss:.4f}): {e.beyond_plan}; no published result supports it")
    return lines


def _inference_lines(p) -> list[str]:
    from planner.units import fmt_count

    i = p.inference
    if i is None:
        return []
    t = i.training_only
    out = ["", f"training + lifetime inference ({fmt_count(i.inference_tokens)} tokens served), same loss {i.target_loss:.4f}:",
           f"  training only: {t.model} on {fmt_count(t.tokens)} tokens, total {_fmt_unit(i.training_only_total, i.unit)}",
           f"  recommended:   {p.recommended.model} on {fmt_count(p.recommended.tokens)} tokens, total "
           f"{_fmt_unit(i.recommended_total, i.unit)} ({i.savings_fraction:+.1%} saved)"]
    if i.analytic_params is not None:
        out.append(f"  continuous optimum (Sardana et al. 2024): N {fmt_count(i.analytic_params)}, D {fmt_count(i.analytic_tokens)}")
    return out


def compare_text(rows: list[dict]) -> str:
    from planner.io.report import render_table
    from planner.units import fmt_bytes, fmt_count, fmt_seconds, fmt_usd

    table = []
    notes = []
    stacks = any(r.get("stack", "hf") != "hf" for r in rows if r["feasible"])
    for r in rows:
        if not r["feasible"]:
            table.append({"allocation": r["name"], "loss": "infeasible"})
            notes.append(f"{r['name']}: {r['reason']}")
            continue
        data = "all" if r["selection"] == "all" else f"{r['selection']} {r['keep_fraction']:.2g}"
        table.append({
            "allocation": r["name"], "loss": f"{r['loss']:.4f}",
            "cost [80%]": fmt_usd(r["cost_usd"]) + _range(r, "cost_usd", fmt_usd, "-"),
            "time [80%]": fmt_seconds(r["time_s"]) + _range(r, "time_s", fmt_seconds, "-"),
            "peak/GPU": fmt_bytes(r["peak_bytes"]), "model": r["model"], "method": r["method"],
            **({"stack": " + ".join([r["stack"], *r["techniques"]])} if stacks else {}), "gpus": r["num_gpus"],
            "tokens": fmt_count(r["tokens"]), "epochs": "-" if r["epochs"] is None else f"{r['epochs']:.2f}", "data": data,
            "binding": ",".join(r["binding"]) or "-", "loss law (trust)": _law_cell(r),
        })
    columns = list(dict.fromkeys(k for row in table for k in row))  # infeasible rows: "-", not NaN (GPUs stay whole)
    out = render_table([{k: row.get(k, "-") for k in columns} for row in table])
    held = [r for r in rows if r["feasible"] and r.get("confidence") is not None]
    if held:  # what the binding column was judged on
        out += (f"\n\nbudgets held at the {held[0]['confidence']:.0%} quantile of each run's time (--confidence): "
                + "; ".join(f"{r['name']}: {fmt_seconds(r['time_s'] * r['held_factor'])}, "
                            f"{fmt_usd(r['cost_usd'] * r['held_factor'])}" for r in held))
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out


def _stack_text(r) -> str:
    """" on torchtune + chunked CE" for a run on another stack than Hugging Face's, "" otherwise."""
    stack = getattr(r, "stack", "hf")
    # the layout's words (sequence parallel, PP) are the set-up line's (``_pipeline_text``)
    words = [w for w in getattr(r, "techniques", []) if w != "sequence parallel" and not w.startswith("PP ")]
    return "" if stack == "hf" else " on " + " + ".join([stack, *words])


def _pipeline_text(r) -> str:
    """", sequence parallel, PP 4 (1F1B)" for a pipeline-parallel candidate, "" otherwise."""
    sp = ", sequence parallel" if getattr(r, "sequence_parallel", False) else ""
    pp = getattr(r, "pipeline_parallel", 1)
    return sp + (f", PP {pp} (1F1B)" if pp > 1 else "")


def _law_cell(r: dict) -> str:
    """'zhang2024-...-lora-model (extrapolated 990x)': which law produced the loss, and how far to trust it."""
    trust = r.get("loss_trust", "")
    if trust == "extrapolated":
        trust += f" {r.get('loss_extrapolation', 1.0):.3g}x"
    return f"{r.get('loss_law', '')} ({trust})"
