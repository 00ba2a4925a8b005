"""The plausibility limits in a plan's answer: which bind, what loosening each would buy, and what
going beyond the evidence altogether would gain (``planner.loss.evidence`` sets the limits).

The sensitivities re-run the scoring (not the set-up side) with one limit 10% looser, as the
budgets' do (``planner.search.constraints``); the evidence report re-runs it with every limit
lifted and every selection method allowed, on the same set-ups.
"""

from __future__ import annotations

from dataclasses import replace

from planner.search.context import RELAX, Context, beyond
from planner.search.plan import Candidate, ConstraintReport, Evidence


def _best_loss(ctx: Context, state, data, limits) -> float | None:
    from planner.search.constraints import best_value

    return best_value(ctx, state, data, limits, ctx.request.objective)


def _with(ctx: Context, **changes) -> Context:
    return replace(ctx, plausibility=replace(ctx.plausibility, **changes))


def plausibility_reports(ctx: Context, state, data, limits, rec: Candidate, now: float | None) -> list[ConstraintReport]:
    """A row per plausibility limit of the plan: epochs (with a pool), tokens per parameter (pre-training)."""
    plaus = ctx.plausibility
    out = []
    if plaus is None:
        return out
    req = ctx.request
    if req.data_pool_tokens is not None and plaus.max_epochs is not None and req.repeat and rec.epochs is not None:
        relaxed = _best_loss(_with(ctx, max_epochs=plaus.max_epochs * (1 + RELAX)), state, data, limits)
        out.append(_row("epochs", plaus.max_epochs, rec.epochs, "epochs", now, relaxed, plaus.max_epochs_source))
    if plaus.tokens_per_param is not None:
        lo, hi = plaus.tokens_per_param
        ratio = rec.tokens / rec.params
        up = _best_loss(_with(ctx, tokens_per_param=(lo, hi * (1 + RELAX))), state, data, limits)
        down = _best_loss(_with(ctx, tokens_per_param=(lo / (1 + RELAX), hi)), state, data, limits)
        out.append(_row("tokens_per_param_max", hi, ratio, "tokens/param", now, up, plaus.tokens_per_param_source))
        row = _row("tokens_per_param_min", lo, ratio, "tokens/param", now, down, plaus.tokens_per_param_source)
        out.append(row.model_copy(update={"binding": bool(ratio <= lo * (1 + 1e-6)), "slack_fraction": 1 - lo / ratio}))
    return out


def _row(name, limit, used, unit, now, relaxed, source) -> ConstraintReport:
    change = None if (relaxed is None or now is None) else relaxed - now
    return ConstraintReport(name=name, limit=float(limit), used=float(used), unit=unit, binding=bool(used >= limit * (1 - 1e-6)),
                            slack_fraction=1 - used / limit, loss_change_if_relaxed=change, kind="plausibility",
                            source=source)


def evidence_report(ctx: Context, state, limits, rec: Candidate) -> Evidence:
    """The plan's standing against the evidence, and the best loss with every limit lifted."""
    from planner.search import candidates as cand
    from planner.search.pareto import choose
    from planner.search.scoring import score_candidates
    from planner.search.setups import reduce_setups
    from planner.units import fmt_count, fmt_percent

    plaus = ctx.plausibility
    notes = [f"task {plaus.task}: selection methods with evidence: {', '.join(plaus.methods) if plaus.methods is not None else 'every method'}"]
    notes += [f"{name}: {source}" for name, source in (("epochs", plaus.max_epochs_source),
                                                        ("tokens per parameter", plaus.tokens_per_param_source))]
    notes += _selection_notes(rec)
    if rec.loss_trust == "extrapolated":
        notes.append(f"the loss is extrapolated: {rec.loss_extrapolation:.3g}x beyond the ranges {rec.loss_law} was fitted on")
    out = dict(task=plaus.task, beyond_evidence=plaus.beyond_evidence, methods=list(plaus.methods or []),
               max_epochs=plaus.max_epochs, tokens_per_param=plaus.tokens_per_param, notes=notes)
    if plaus.beyond_evidence or ctx.request.objective != "loss":
        return Evidence(**out)
    wide = beyond(ctx)
    try:
        data, _ = cand.data_choices(ctx.request, ctx.law, wide.plausibility)
    except Exception:  # noqa: BLE001 - a request whose data choices need the evidence's limits: nothing to compare
        return Evidence(**out)
    rows = reduce_setups(state.table, limits.usable_bytes)
    scored = score_candidates(wide, state.models, rows, data, limits)
    i = choose(scored, "loss", None, 0.0)
    if i is None:
        return Evidence(**out)
    j = int(scored["choice"][i])
    n = state.models[int(rows["model"][scored["row"][i]])].params_n
    tokens = float(scored["tokens"][i])
    what = "all the data" if data.selection[j] == "all" else f"{data.selection[j]} keeping {fmt_percent(data.keep_fraction[j])}"
    pool = ctx.request.data_pool_tokens
    epochs = "" if pool is None else f", {tokens / (data.keep_fraction[j] * pool):.3g} epochs"
    plan = f"{fmt_count(n)} params on {fmt_count(tokens)} tokens ({tokens / n:.3g} per parameter), {what}{epochs}"
    loss = float(scored["loss"][i])
    return Evidence(**out, beyond_loss=loss, beyond_gain=loss - rec.loss, beyond_plan=plan)


def _selection_notes(rec: Candidate) -> list[str]:
    """The chosen selection method's results against the plan: model sizes outside theirs are
    reported (its gain at another scale is an extrapolation), not excluded."""
    from planner.loss import pruning
    from planner.units import fmt_count

    if rec.selection in ("all", "random"):
        return []
    ev = pruning.load_method(rec.selection).evidence or {}
    sizes = ev.get("model_params")
    out = [f"{rec.selection}: {ev.get('where', 'no evidence recorded')}"]
    if sizes and not sizes[0] <= rec.params <= sizes[1]:
        out.append(f"{rec.selection}'s results are on {fmt_count(sizes[0])}-{fmt_count(sizes[1])} parameter models: its gain "
                   f"at {fmt_count(rec.params)} is an extrapolation in size")
    return out


def memory_exclusion(ctx: Context, state, data, rec: Candidate) -> str:
    """Fine-tuning: the methods no set-up of which fits in memory and that would reach a lower loss
    than the recommendation on its tokens (""if none): memory then decides the method."""
    from planner.search.constraints import choice_index
    from planner.search.scoring import candidate_loss
    from planner.units import fmt_bytes

    req = ctx.request
    if req.pretrain:
        return ""
    fits = state.table["peak_bytes"] <= ctx.usable_bytes
    entry = next(m for m in state.models if m.name == rec.model)
    j = choice_index(data, rec)
    out = []
    for method, peak in sorted(state.stats.get("lightest_by_method", {}).items()):
        if method == rec.method or bool((fits & (state.table["method"] == method)).any()):
            continue
        loss = float(candidate_loss(ctx, entry.params_n, method, rec.tokens, data.keep_fraction[j], data.theta_deg[j],
                                    str(data.strategy[j])))
        if loss < rec.loss:
            out.append(f"memory excluded {method} (its lightest set-up needs {fmt_bytes(peak)} per GPU), which would reach "
                       f"loss {loss:.4f} on the same tokens")
    return "; ".join(out)
