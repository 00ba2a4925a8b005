"""Verbs of loss, data and stopping (issue 4): `planner scaling fit|optimal`, `planner prune`, `planner stop`.

Numbers accept plain floats (1e22) and the suffixes K, M, B, T (70B parameters, 1.4T tokens).
Every handler raises PlannerError on bad input; ``planner.cli.app`` prints it on one line and
exits with 2. ``--json`` prints SI numbers (``planner.io.report.to_json``); ``--plot FILE.png``
writes a figure (``planner.io.plots``). The bootstraps of ``scaling fit`` and ``stop`` advance a
progress bar on stderr (``planner.io.progress``), drawn only on a terminal and never under ``--json``.
"""

from __future__ import annotations

import math
import re

from planner.errors import PlannerError

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}


def parse_quantity(text: str, what: str, allow_zero: bool = False) -> float:
    """'1e22', '70B', '1.4T' -> float; a negative, zero (unless allowed), NaN or unparsable value is an error."""
    m = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([KMBGTP]?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise PlannerError(f"{what}: cannot read {text!r} as a number (e.g. 1e22, 70B, 1.4T)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise PlannerError(f"{what} must be {'non-negative' if allow_zero else 'positive'}, got {text}")
    return value


def register(subparsers) -> None:
    from planner.cli.train import add_output_flags

    scaling = subparsers.add_parser("scaling", help="loss as a function of model size and data")
    verbs = scaling.add_subparsers(dest="scaling_verb", required=True, parser_class=type(scaling))

    fit = verbs.add_parser("fit", help="fit L = E + A/N^alpha + B/D^beta to your runs (CSV: params, tokens, loss)")
    fit.add_argument("runs", help="CSV with columns params, tokens (or flops), loss")
    fit.add_argument("--grid", choices=("coarse", "hoffmann"), default="coarse",
                     help="starting grid: 243 starts (coarse) or Hoffmann et al.'s 4500")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    fit.add_argument("--confidence", type=float, default=0.95)
    fit.add_argument("--exclude-highest", type=int, default=0, help="drop the K highest-loss runs (Besiroglu et al. drop 5)")
    fit.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-loss residuals")
    fit.add_argument("--seed", type=int, default=0)
    add_output_flags(fit)
    fit.set_defaults(handler=_scaling_fit)

    opt = verbs.add_parser("optimal", help="compute-optimal N*, D* for a FLOP budget, optionally with a data pool")
    opt.add_argument("--compute", required=True, help="training FLOPs, e.g. 1e22")
    opt.add_argument("--law", default="besiroglu2024", help="catalog law name or path to a law JSON (default besiroglu2024)")
    opt.add_argument("--data-pool", help="unique tokens available, e.g. 500B")
    opt.add_argument("--no-repeat", action="store_true", help="with --data-pool: never repeat data (D <= pool)")
    opt.add_argument("--method", choices=("auto", "closed_form", "gp", "grid"), default="auto")
    add_output_flags(opt)
    opt.set_defaults(handler=_scaling_optimal)

    prune = subparsers.add_parser("prune", help="best fraction of a data pool to keep, and what selection costs")
    prune.add_argument("--pool", required=True, help="unique tokens in the pool, e.g. 2T")
    prune.add_argument("--compute", required=True, help="total FLOPs for scoring plus training, e.g. 1e22")
    prune.add_argument("--method", default="perplexity_proxy", help="selection method from models_catalog/pruning_methods.json")
    prune.add_argument("--law", default="besiroglu2024")
    prune.add_argument("--strategy", choices=("auto", "hard", "easy"), default="auto")
    prune.add_argument("--theta", type=float, help="replace the method's metric angle (degrees, 0 perfect, 90 random)")
    prune.add_argument("--efficiency", help="replace it by your measurement KEEP:SPEEDUP, e.g. 0.5:1.3")
    prune.add_argument("--min-keep", help="smallest fraction to consider (overrides the method's)")
    prune.add_argument("--proxy-params", help="parameters of the scoring model (overrides the method's)")
    prune.add_argument("--proxy-train-tokens", help="tokens spent training the scoring model")
    add_output_flags(prune)
    prune.set_defaults(handler=_prune)

    stop = subparsers.add_parser("stop", help="when to stop a run: marginal loss gain per unit of cost below lambda")
    stop.add_argument("--log", required=True, help="CSV (step, loss) or Hugging Face trainer_state.json")
    stop.add_argument("--cost-per-step", required=True, help="cost of one step (FLOPs, GPU-hours or $)")
    how = stop.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", help="lambda: loss per unit of cost")
    how.add_argument("--budget-flops", help="derive lambda from a FLOP budget (the shadow price -dL*/dC of --law); cost per step in FLOPs")
    stop.add_argument("--law", default="besiroglu2024", help="law for --budget-flops")
    stop.add_argument("--max-steps", type=int, help="planned total steps (the recommendation never exceeds it)")
    stop.add_argument("--model", choices=("auto", "power", "exponential", "loglinear"), default="auto")
    stop.add_argument("--criterion", choices=("aicc", "bic", "holdout"), default="aicc")
    stop.add_argument("--metric", default="loss", help="column / log_history key to read (default loss)")
    stop.add_argument("--bootstrap", type=int, default=200)
    stop.add_argument("--confidence", type=float, default=0.9)
    stop.add_argument("--seed", type=int, default=0)
    add_output_flags(stop)
    stop.set_defaults(handler=_stop)


def _show_progress(args) -> bool:
    """A bootstrap bar on stderr (``planner.io.progress`` draws it only on a terminal): never under --json."""
    return not args.json and args.bootstrap > 0


# --------------------------------------------------------------------------------------------


def _scaling_fit(args) -> int:
    from planner.io.progress import progress_bar
    from planner.io.report import render_table, to_json
    from planner.loss import scaling

    if args.bootstrap < 0:
        raise PlannerError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    n, d, loss = scaling.read_runs_csv(args.runs)
    fitter = scaling.ScalingLawFitter(delta=args.delta, grid=args.grid, num_bootstrap=args.bootstrap,
                                      confidence=args.confidence, exclude_highest_loss=args.exclude_highest, seed=args.seed)
    with progress_bar(args.bootstrap, "scaling fit", enabled=_show_progress(args), unit="bootstrap") as bar:
        result = fitter.fit(n, d, loss, progress=bar.update).result()
    if args.plot:
        from planner.io import plots

        plots.plot_scaling_fit(result, fitter.params_n_, fitter.tokens_d_, fitter.loss_, args.plot)
    if args.json:
        print(to_json(result.model_dump()))
        return 0
    rows = []
    for k in ("E", "A", "B", "alpha", "beta"):
        lo_hi = result.intervals.get(k)
        rows.append({"constant": k, "value": f"{getattr(result, k):.5g}",
                     f"{result.confidence:.0%} interval": f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "-"})
    print(f"L(N, D) = E + A/N^alpha + B/D^beta fitted on {result.num_points} runs"
          f"{f' ({result.num_excluded} highest-loss excluded)' if result.num_excluded else ''}:"
          f" Huber (delta {result.huber_delta:g}) on log-loss, {result.grid} grid, {result.num_bootstrap} bootstraps")
    print(render_table(rows))
    print(f"goodness of fit: RMSE(log L) {result.rmse_log_loss:.4f}, MAE {result.mae_loss:.4f}, R^2 {result.r2_loss:.4f};"
          f" compute-optimal {result.tokens_per_param_optimal:.1f} tokens/param at 1e21 FLOP")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _scaling_optimal(args) -> int:
    from planner.io.report import render_table, to_json
    from planner.loss import scaling
    from planner.units import fmt_count, fmt_flops

    compute = parse_quantity(args.compute, "--compute")
    pool = parse_quantity(args.data_pool, "--data-pool") if args.data_pool is not None else None
    if args.no_repeat and pool is None:
        raise PlannerError("--no-repeat needs --data-pool")
    law = scaling.load_law(args.law)
    alloc = scaling.compute_optimal(law, compute, pool, repeat=not args.no_repeat, method=args.method)
    if args.plot:
        from planner.io import plots

        plots.plot_scaling_optimal(alloc, law, args.plot)
    if args.json:
        print(to_json(alloc.model_dump()))
        return 0
    rows = [
        {"quantity": "parameters N*", "value": f"{fmt_count(alloc.params_n)} ({alloc.param_count})"},
        {"quantity": "training tokens D*", "value": fmt_count(alloc.tokens_d)},
        {"quantity": "tokens per parameter", "value": f"{alloc.tokens_per_param:.1f}"},
        {"quantity": "epochs over the pool", "value": "-" if alloc.epochs is None else f"{alloc.epochs:.2f}"},
        {"quantity": "predicted loss", "value": f"{alloc.loss:.4f}"},
    ]
    where = "" if pool is None else f", pool {fmt_count(pool)} tokens ({'no repetition' if args.no_repeat else 'repetition allowed'})"
    print(f"compute-optimal allocation for {fmt_flops(compute)} under {law.name}{where} [{alloc.method}]")
    print(render_table(rows))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _prune(args) -> int:
    from planner.io.report import render_table, to_json
    from planner.loss import pruning
    from planner.units import fmt_count, fmt_flops, fmt_percent

    pool = parse_quantity(args.pool, "--pool")
    compute = parse_quantity(args.compute, "--compute")
    method = pruning.load_method(args.method)
    theta = args.theta
    if args.efficiency is not None:
        if theta is not None:
            raise PlannerError("give --theta or --efficiency, not both")
        parts = args.efficiency.split(":")
        if len(parts) != 2:
            raise PlannerError(f"--efficiency is KEEP:SPEEDUP, e.g. 0.5:1.3; got {args.efficiency!r}")
        theta = pruning.theta_from_efficiency(parse_quantity(parts[0], "keep fraction"), parse_quantity(parts[1], "speedup"))
    min_keep = parse_quantity(args.min_keep, "--min-keep") if args.min_keep is not None else None
    proxy = parse_quantity(args.proxy_params, "--proxy-params", allow_zero=True) if args.proxy_params is not None else None
    proxy_t = parse_quantity(args.proxy_train_tokens, "--proxy-train-tokens", allow_zero=True) if args.proxy_train_tokens is not None else None
    plan = pruning.plan_pruning(compute, pool, method, args.law, strategy=args.strategy, theta_deg=theta,
                                min_keep_fraction=min_keep, proxy_params=proxy, proxy_train_tokens=proxy_t)
    if args.plot:
        from planner.io import plots

        plots.plot_pruning(plan, args.plot)
    if args.json:
        print(to_json(plan.model_dump()))
        return 0
    rows = [
        {"": "keep fraction", "pruned": f"{plan.keep_fraction:.3g} ({plan.strategy})", "no pruning": "1"},
        {"": "kept tokens", "pruned": fmt_count(plan.kept_tokens), "no pruning": fmt_count(plan.pool_tokens)},
        {"": "parameters", "pruned": fmt_count(plan.params_n), "no pruning": fmt_count(plan.params_n_no_pruning)},
        {"": "training tokens", "pruned": fmt_count(plan.tokens_d), "no pruning": fmt_count(plan.tokens_d_no_pruning)},
        {"": "epochs", "pruned": f"{plan.epochs:.2f}", "no pruning": f"{plan.tokens_d_no_pruning / plan.pool_tokens:.2f}"},
        {"": "scoring FLOPs", "pruned": f"{fmt_flops(plan.scoring_flops)} ({fmt_percent(plan.scoring_share)})", "no pruning": "0"},
        {"": "predicted loss", "pruned": f"{plan.loss:.4f}", "no pruning": f"{plan.loss_no_pruning:.4f}"},
    ]
    print(f"data selection with {plan.method} (metric angle {plan.theta_deg:.1f} deg) for {fmt_flops(compute)},"
          f" pool {fmt_count(pool)} tokens, law {plan.law}")
    print(render_table(rows))
    print(f"loss change from pruning: {plan.loss_change:+.4f}; data abundance rho = {plan.abundance:.2f}"
          " (>1: keep hard examples pays, <1: keep easy ones)")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _stop(args) -> int:
    from planner.io.progress import progress_bar
    from planner.io.report import render_table, to_json
    from planner.loss import scaling, stopping

    cost = parse_quantity(args.cost_per_step, "--cost-per-step")
    if args.threshold is not None:
        threshold = parse_quantity(args.threshold, "--threshold")
    else:
        budget = parse_quantity(args.budget_flops, "--budget-flops")
        threshold = float(scaling.compute_shadow_price(scaling.load_law(args.law), budget))
    if args.bootstrap < 0:
        raise PlannerError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    steps, losses, excluded = stopping.read_loss_log(args.log, args.metric)
    with progress_bar(args.bootstrap, "stop", enabled=_show_progress(args), unit="bootstrap") as bar:
        rec = stopping.recommend_stop(steps, losses, cost, threshold, max_steps=args.max_steps, model=args.model,
                                      criterion=args.criterion, num_bootstrap=args.bootstrap, confidence=args.confidence,
                                      seed=args.seed, num_excluded=excluded, progress=bar.update)
    if args.plot:
        from planner.io import plots

        plots.plot_stopping(steps, losses, rec, args.plot)
    if args.json:
        print(to_json(rec.model_dump()))
        return 0
    verdict = {"continue": "continue to", "stop_now": "stop now, at", "budget_bound": "run to the budget,"}[rec.status]
    print(f"{verdict} step {rec.stop_step} ({rec.confidence:.0%} interval {rec.stop_step_interval[0]:.0f}-{rec.stop_step_interval[1]:.0f});"
          f" lambda = {rec.threshold:.4g} loss per unit of cost")
    rows = [
        {"": "now", "step": rec.current_step, "loss (fitted)": f"{rec.loss_now:.4f}"},
        {"": "stop", "step": rec.stop_step, "loss (fitted)": f"{rec.loss_at_stop:.4f} [{rec.loss_at_stop_interval[0]:.4f}, {rec.loss_at_stop_interval[1]:.4f}]"},
    ]
    if rec.max_steps is not None:
        rows.append({"": "max steps", "step": rec.max_steps, "loss (fitted)": f"{rec.loss_at_max_steps:.4f}"})
    print(render_table(rows))
    print(f"continuing to the stop buys {rec.gain_to_stop:.4f} loss for {rec.cost_to_stop:.4g} cost"
          + (f"; going on to max steps would buy {rec.gain_beyond_stop:.4f} more" if rec.gain_beyond_stop is not None else ""))
    scores = ", ".join(f"{k} {v:.1f}" for k, v in rec.model_scores.items())
    print(f"curve: {rec.model} {', '.join(f'{k}={v:.4g}' for k, v in rec.params.items())}; {rec.criterion}: {scores};"
          f" {rec.num_points} points{f', {rec.num_excluded} at step 0 excluded' if rec.num_excluded else ''}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
