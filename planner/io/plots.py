"""Matplotlib figures from planner results: one flat function per figure, each writing a PNG.

matplotlib's object API (``matplotlib.figure.Figure``) renders with the Agg backend and never
opens a window, so these work on headless machines; matplotlib is imported inside each function
so that the CLI's analytic path does not pay for it unless ``--plot`` is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from planner.errors import PlannerError


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (axes if ncols > 1 else [axes])


def _log_x_axes(ax, xlabel: str, ylabel: str, title: str, legend_loc: str = "best", grid: bool = True) -> None:
    """A log-x panel's labels, title, legend and light grid, worded the same in every figure."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PlannerError(f"plots are written as PNG; give a file name ending in .png, not {path.name!r}")
    if not path.parent.exists():
        raise PlannerError(f"cannot write {path}: folder {path.parent} does not exist")
    fig.savefig(path, dpi=120)
    return path


def plot_scaling_fit(result, params_n, tokens_d, loss, path) -> Path:
    """Observed vs fitted loss, and iso-loss contours over (compute, N) with the compute-optimal frontier.

    ``result`` is a :class:`planner.loss.scaling.ScalingFitResult`; the arrays are the runs it was fitted on.
    """
    from planner.loss import scaling

    law = scaling.ScalingLaw(name="fitted", form="chinchilla", param_count="total",
                             E=result.E, A=result.A, B=result.B, alpha=result.alpha, beta=result.beta)
    n = np.asarray(params_n, dtype=float)
    d = np.asarray(tokens_d, dtype=float)
    obs = np.asarray(loss, dtype=float)
    pred = law.loss(n, d)
    fig, (ax1, ax2) = _figure(2)
    ax1.scatter(obs, pred, s=14, alpha=0.8)
    lo, hi = float(min(obs.min(), pred.min())), float(max(obs.max(), pred.max()))
    ax1.plot([lo, hi], [lo, hi], "k--", lw=1, label="fitted = observed")
    ax1.set_xlabel("observed loss")
    ax1.set_ylabel("fitted loss")
    ax1.set_title(f"fit: E={result.E:.3f} A={result.A:.4g} B={result.B:.4g}\nalpha={result.alpha:.3f} beta={result.beta:.3f}, R^2={result.r2_loss:.3f}")
    ax1.legend(loc="upper left")

    c_obs = scaling.FLOPS_PER_PARAM_TOKEN * n * d
    c_grid = np.logspace(np.log10(c_obs.min()) - 1, np.log10(c_obs.max()) + 2, 200)
    n_grid = np.logspace(np.log10(n.min()) - 1, np.log10(n.max()) + 1.5, 200)
    cc, nn = np.meshgrid(c_grid, n_grid)
    ll = law.loss(nn, cc / (scaling.FLOPS_PER_PARAM_TOKEN * nn))
    levels = np.quantile(ll, np.linspace(0.02, 0.9, 12))
    cs = ax2.contour(cc, nn, ll, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    ax2.clabel(cs, fmt="%.2f", fontsize=7)
    n_opt, _ = scaling.optimal_closed_form(law, c_grid)
    ax2.plot(c_grid, n_opt, "r-", lw=2, label="compute-optimal N*(C)")
    ax2.scatter(c_obs, n, c=obs, s=12, cmap="magma", edgecolors="k", linewidths=0.3, label="runs")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(c_grid.min(), c_grid.max())
    ax2.set_ylim(n_grid.min(), n_grid.max())
    ax2.set_xlabel("training compute C = 6 N D (FLOP)")
    ax2.set_ylabel("parameters N")
    ax2.set_title("iso-loss contours")
    ax2.legend(loc="upper left")
    return _save(fig, path)


def plot_scaling_optimal(allocation, law, path) -> Path:
    """The iso-FLOP profile: loss against N at the allocation's compute, with the optimum marked."""
    from planner.loss import scaling

    c = allocation.compute_flops
    n = np.logspace(np.log10(allocation.params_n) - 2, np.log10(allocation.params_n) + 2, 400)
    d = c / (scaling.FLOPS_PER_PARAM_TOKEN * n)
    fig, (ax,) = _figure(1)
    if allocation.data_pool_tokens is None or law.repetition is None:
        ax.plot(n, law.loss(n, d), label=f"{law.name}: unlimited data")
    else:
        ax.plot(n, law.loss(n, d), ":", label=f"{law.name}: unlimited data")
        ax.plot(n, law.loss(n, d, allocation.data_pool_tokens), label=f"pool of {allocation.data_pool_tokens:.3g} tokens, repeated")
        if allocation.constraint == "data_pool_no_repeat":
            mask = d <= allocation.data_pool_tokens
            ax.plot(n[mask], law.loss(n[mask], d[mask]), lw=3, alpha=0.5, label="no repetition (D <= pool)")
    ax.plot([allocation.params_n], [allocation.loss], "r*", ms=14, label=f"optimum N={allocation.params_n:.3g}, D={allocation.tokens_d:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters N ({law.param_count})")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"iso-FLOP profile at C = {c:.3g} FLOP")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pruning(plan, path) -> Path:
    """Loss against the fraction of the pool kept (hard and easy selection) and the no-pruning baseline."""
    f = np.asarray(plan.curve_keep_fraction)
    fig, (ax,) = _figure(1)
    ax.plot(f, plan.curve_loss_hard, label="keep hard examples")
    ax.plot(f, plan.curve_loss_easy, label="keep easy examples")
    ax.axhline(plan.loss_no_pruning, color="k", ls="--", lw=1, label="no pruning (all compute to training)")
    ax.plot([plan.keep_fraction], [plan.loss], "r*", ms=14, label=f"best: keep {plan.keep_fraction:.3g}, {plan.epochs:.2g} epochs")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the pool kept")
    ax.set_ylabel("predicted loss (best model size for each fraction)")
    ax.set_title(f"{plan.method} (theta={plan.theta_deg:.0f} deg), pool {plan.pool_tokens:.3g} tokens, C={plan.compute_flops:.3g}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_stopping(steps, losses, recommendation, path) -> Path:
    """The logged loss, the fitted curve extended past the stop, and the stopping step with its interval."""
    from planner.loss import stopping

    t = np.asarray(steps, dtype=float)
    y = np.asarray(losses, dtype=float)
    r = recommendation
    end = max(float(r.stop_step_interval[1]), float(r.stop_step), float(t[-1])) * 1.3
    if r.max_steps is not None:
        end = max(end, float(r.max_steps))
    tt = np.linspace(t[0], end, 400)
    fit = stopping.curve_value(r.model, r.params, tt)
    fig, (ax,) = _figure(1)
    ax.plot(t, y, ".", ms=3, alpha=0.6, label="logged loss")
    ax.plot(tt, fit, "-", label=f"fitted {r.model}")
    ax.axvspan(r.stop_step_interval[0], r.stop_step_interval[1], color="r", alpha=0.15, label=f"{r.confidence:.0%} interval")
    ax.axvline(r.stop_step, color="r", lw=1.5, label=f"stop at step {r.stop_step} (loss {r.loss_at_stop:.3f})")
    if r.max_steps is not None:
        ax.axvline(r.max_steps, color="k", ls=":", lw=1, label="max steps")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"stop when -dL/dt / cost < {r.threshold:.3g}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_backtest(rows, path) -> Path:
    """Recommended against oracle stopping step for each backtest row."""
    fig, (ax,) = _figure(1)
    rec = np.array([r.recommended_step for r in rows], dtype=float)
    ora = np.array([r.oracle_step for r in rows], dtype=float)
    ax.scatter(ora, rec, s=18)
    lim = [min(ora.min(), rec.min()) * 0.9, max(ora.max(), rec.max()) * 1.1]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("oracle stopping step")
    ax.set_ylabel("recommended stopping step")
    ax.set_title("stopping backtest")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Plans (issue 5): memory breakdown, Pareto front, loss curve with the stop, allocations compared.


def show_png(path):
    """Display a written PNG in a notebook (IPython's Image), so notebooks need import only planner."""
    from IPython.display import Image

    return Image(filename=str(path))


_MEMORY_PARTS = ("weights", "lora_adapters", "master_weights", "optimizer_states", "gradients",
                 "optimizer_temporaries", "autocast_weight_copies", "saved_activations_with_checkpointing",
                 "loss_temporaries")


def plot_memory_breakdown(results, path, usable_bytes: float | None = None) -> Path:
    """Stacked bars of memory by component (left) and the live total in each phase (right).

    ``results``: a dict label -> ``planner.cost.estimate.estimate`` output (one bar per set-up);
    ``usable_bytes`` draws the GPU's usable line.
    """
    from planner.units import GiB

    if not results:
        raise PlannerError("no estimates to plot")
    labels = list(results)
    fig, (ax1, ax2) = _figure(2, width=6.5)
    bottom = np.zeros(len(labels))
    for part in _MEMORY_PARTS:
        values = np.array([float(results[k]["components"].get(part, 0.0)) for k in labels]) / GiB
        if values.any():
            ax1.bar(labels, values, bottom=bottom, label=part.replace("_", " "))
            bottom += values
    ax1.set_ylabel("GiB per GPU")
    ax1.set_title("memory by component (activations as kept for backward)")
    ax1.legend(fontsize=7)
    phases = list(next(iter(results.values()))["phases"])
    width = 0.8 / max(len(phases), 1)
    x = np.arange(len(labels))
    for i, phase in enumerate(phases):
        ax2.bar(x + (i - (len(phases) - 1) / 2) * width, [results[k]["phases"][phase] / GiB for k in labels], width,
                label=phase)
    if usable_bytes is not None:
        for ax in (ax1, ax2):
            ax.axhline(usable_bytes / GiB, color="r", ls="--", lw=1, label="usable on the GPU")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("GiB per GPU")
    ax2.set_title("live memory at each phase's peak (the peak is the highest)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return _save(fig, path)


def _pareto_axes(ax, plan) -> None:
    pts = plan.pareto
    cost = np.array([p.cost_usd for p in pts])
    loss = np.array([p.loss for p in pts])
    hours = np.array([p.time_s for p in pts]) / 3600.0
    sc = ax.scatter(cost, loss, c=np.log10(hours), cmap="viridis", s=18, label="Pareto front")
    ax.figure.colorbar(sc, ax=ax, label="log10 wall time (hours)")
    r = plan.recommended
    ax.plot([r.cost_usd], [r.loss], "r*", ms=16, label=f"recommended: {r.model}, {r.method}, {r.num_gpus} GPU(s)")
    for c in plan.constraints:
        if c.name == "dollars":
            ax.axvline(c.limit, color="k", ls=":", lw=1, label="dollar budget")
    ax.set_xscale("log")
    ax.set_xlabel("cost (USD)")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"Pareto front over loss, cost and time ({len(pts)} plans)")
    ax.legend(fontsize=7)


def _loss_curve_axes(ax, plan) -> None:
    s = plan.stopping
    t = np.asarray(s.curve_step)
    ax.plot(t, s.curve_loss, label="expected loss of the recommended run")
    ax.axvline(s.stop_step, color="r", lw=1.5, label=f"stop at step {s.stop_step:,} (loss {s.loss_at_stop:.3f})")
    if s.stop_step != s.planned_steps:
        ax.axvline(s.planned_steps, color="k", ls=":", lw=1, label=f"planned end ({s.planned_steps:,})")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("predicted loss")
    title = "loss curve" if s.threshold is None else f"stop when gain < lambda = {s.threshold:.3g} {s.threshold_unit}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_pareto(plan, path) -> Path:
    """The Pareto front of a plan (loss against cost, colour: wall time) with the recommended point."""
    fig, (ax,) = _figure(1)
    _pareto_axes(ax, plan)
    return _save(fig, path)


def plot_loss_curve(plan, path) -> Path:
    """The expected loss curve of the recommended run with the stopping step."""
    fig, (ax,) = _figure(1)
    _loss_curve_axes(ax, plan)
    return _save(fig, path)


def plot_plan(plan, path) -> Path:
    """`planner plan --plot`: the Pareto front and the recommended run's loss curve with its stop;
    with --inference-tokens, the training vs inference split of the two plans (``serving_plots``)."""
    fig, axes = _figure(3 if plan.inference is not None else 2, width=6.5)
    _pareto_axes(axes[0], plan)
    _loss_curve_axes(axes[1], plan)
    if plan.inference is not None:
        from planner.io.serving_plots import lifetime_split_axes

        lifetime_split_axes(axes[2], plan)
    return _save(fig, path)


def plot_allocations(rows, path) -> Path:
    """`planner compare --plot`: predicted loss, cost, time and peak memory per allocation."""
    from planner.units import GiB

    ok = [r for r in rows if r.get("feasible")]
    if not ok:
        raise PlannerError("no feasible allocation to plot")
    names = [r["name"] for r in ok]
    curves = all(r.get("curve_tokens") for r in ok)
    fig, axes = _figure(5 if curves else 4, width=3.6, height=4.0)
    if curves:  # the expected loss curves of the allocations (their laws: loss_law), on tokens
        for i, r in enumerate(ok):
            axes[4].plot(r["curve_tokens"], r["curve_loss"], color=f"C{i}", label=r["name"])
        axes[4].set_xscale("log")
        axes[4].set_xlabel("training tokens")
        axes[4].set_title("expected loss curve", fontsize=9)
        axes[4].legend(fontsize=7)
        axes = axes[:4]
    panels = (("loss", "predicted loss", 1.0), ("cost_usd", "cost (USD)", 1.0), ("time_s", "wall time (hours)", 3600.0),
              ("peak_bytes", "peak memory per GPU (GiB)", GiB))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        values = np.array([r[key] for r in ok]) / scale
        ax.bar(names, values, color=[f"C{i}" for i in range(len(ok))])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        if key == "loss":
            lo, hi = values.min(), values.max()
            pad = max(hi - lo, 1e-3) * 0.5
            ax.set_ylim(lo - pad, hi + pad)
        if key == "peak_bytes":
            ax.axhline(ok[0]["usable_bytes"] / GiB, color="r", ls="--", lw=1)
    return _save(fig, path)


def plot_calibration(profile, path) -> Path:
    """Measured against predicted step time and peak memory of a calibration profile's points,
    before (defaults) and after (fitted corrections); held-out points hollow."""
    rows = [r for r in profile.accuracy if r.measured_step_time_s or r.measured_peak_bytes]
    if not rows:
        raise PlannerError("the profile has no accuracy rows (fit it with planner calibrate)")
    fig, (ax1, ax2) = _figure(2)
    for ax, measured, before, after, unit, scale in (
        (ax1, "measured_step_time_s", "before_step_time_s", "after_step_time_s", "step time (s)", 1.0),
        (ax2, "measured_peak_bytes", "before_peak_bytes", "after_peak_bytes", "peak allocated (MiB)", 2.0**20),
    ):
        pts = [r for r in rows if getattr(r, measured)]
        if not pts:
            continue
        m = np.array([getattr(r, measured) for r in pts]) / scale
        for key, label, color in ((before, "uncalibrated", "C1"), (after, "calibrated", "C0")):
            p = np.array([getattr(r, key) or np.nan for r in pts]) / scale
            held = np.array([r.split == "holdout" for r in pts])
            ax.scatter(m[~held], p[~held], color=color, label=f"{label} (fit points)")
            ax.scatter(m[held], p[held], facecolors="none", edgecolors=color, label=f"{label} (held out)")
        lo, hi = float(np.nanmin(m)) * 0.5, float(np.nanmax(m)) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"predicted {unit}")
        ax.legend(fontsize=7)
    ax1.set_title(f"calibration on {profile.device.name}", fontsize=9)
    return _save(fig, path)
