"""Figures of the compute axis past training: serving latency and throughput against batch size,
coverage against samples, the training/inference split of an inference-aware allocation, and
fine-tuning loss curves. One flat function per figure, each writing a PNG (matplotlib's Agg
backend, imported inside the functions as in :mod:`planner.io.plots`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from planner.io.plots import _figure, _log_x_axes, _save


def plot_serving(estimate, path, target_tpot_s: float | None = None, title: str = "") -> Path:
    """Time per output token and throughput per GPU against the number of concurrent requests
    (a :class:`planner.cost.serving.throughput.ServingEstimate` over a batch grid); batches whose KV
    cache does not fit are drawn hollow, the target latency as a line."""
    b = np.asarray(estimate.batch, dtype=float).ravel()
    tpot = np.asarray(estimate.tpot_s, dtype=float).ravel() * 1e3
    tput = np.asarray(estimate.output_tokens_per_s_per_gpu, dtype=float).ravel()
    fits = np.broadcast_to(np.asarray(estimate.fits), b.shape)
    fig, (ax1, ax2) = _figure(2)
    for ax, y, label in ((ax1, tpot, "time per output token (ms)"), (ax2, tput, "output tokens/s per GPU")):
        ax.plot(b, y, "-", color="C0", lw=1)
        ax.scatter(b[fits], y[fits], color="C0", s=18, label="KV cache fits")
        if np.any(~fits):
            ax.scatter(b[~fits], y[~fits], facecolors="none", edgecolors="C3", s=18, label="does not fit")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (batch)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if target_tpot_s is not None:
        ax1.axhline(target_tpot_s * 1e3, color="k", ls="--", lw=1, label="target")
    ax1.legend(loc="upper left")
    ax1.set_title(title or f"{estimate.scheduling} batching; +-{estimate.uncertainty:.0%} typical error")
    ax2.set_title("throughput (memory-bound until the weights are amortised)")
    return _save(fig, path)


def plot_coverage(laws, path, measured: dict | None = None, choice=None, k_max: float = 1e4) -> Path:
    """Coverage against samples for each law (solid inside its fitted k, dashed beyond), the
    measured points when given ({name: (k, coverage)}), and the best model per budget of a
    :class:`planner.loss.test_time.SamplingChoice` on a second panel."""
    fig, axes = _figure(2 if choice is not None else 1)
    ax = axes[0]
    k = np.logspace(0, np.log10(k_max), 200)
    for i, law in enumerate(laws):
        inside = ~law.extrapolated(k)
        ax.plot(k[inside], law.coverage(k[inside]), color=f"C{i}", label=law.name)
        ax.plot(k[~inside], law.coverage(k[~inside]), color=f"C{i}", ls="--")
        if measured and law.name in measured:
            mk, mc = measured[law.name]
            ax.scatter(mk, mc, color=f"C{i}", s=12)
    _log_x_axes(ax, "samples per problem k", "coverage (pass@k)", "coverage c(k) = exp(a k^b) (Brown et al. 2024)", legend_loc="upper left")
    if choice is not None:
        ax2 = axes[1]
        for i, name in enumerate(choice.models):
            ax2.plot(choice.budget, choice.coverage[i], color=f"C{i}", label=name)
        _log_x_axes(ax2, "budget per query", "coverage at the affordable samples", "bigger model or more samples", legend_loc="upper left")
    return _save(fig, path)


def plot_inference_split(allocation, path) -> Path:
    """An inference-aware allocation over inference demands (a 1-D
    :class:`planner.loss.inference_aware.InferenceAwareAllocation`): model size against Chinchilla's,
    and the training / inference split of its lifetime cost."""
    t = np.asarray(allocation.inference_tokens, dtype=float).ravel()
    n = np.asarray(allocation.params_n, dtype=float).ravel()
    train = np.asarray(allocation.training_flops, dtype=float).ravel()
    infer = np.asarray(allocation.inference_flops, dtype=float).ravel()
    fig, (ax1, ax2) = _figure(2)
    ax1.plot(t, n, label="inference-aware N*")
    ax1.plot(t, np.broadcast_to(allocation.chinchilla_params_n, t.shape), ls="--", label="Chinchilla N (same loss)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("lifetime inference tokens")
    ax1.set_ylabel("parameters")
    ax1.set_title(f"Sardana et al. 2024 ({allocation.law})")
    ax1.legend()
    ax2.stackplot(t, train, infer, labels=["training 6ND", "inference 2NT"], alpha=0.8)
    _log_x_axes(ax2, "lifetime inference tokens", "FLOPs", "lifetime compute split", legend_loc="upper left", grid=False)
    return _save(fig, path)


def plot_finetune_losses(curves: dict, path, title: str = "fine-tuning loss (Zhang et al. 2024)") -> Path:
    """Loss against fine-tuning examples, one line per label: {label: (examples, loss, trust)};
    points outside the law's held-out range dashed."""
    fig, (ax,) = _figure(1)
    for i, (label, (d, loss, trust)) in enumerate(curves.items()):
        d, loss, trust = (np.asarray(v).ravel() for v in (d, loss, np.broadcast_to(trust, np.shape(loss))))
        ok = trust != "extrapolated"
        ax.plot(d[ok], loss[ok], color=f"C{i}", label=label)
        ax.plot(d[~ok], loss[~ok], color=f"C{i}", ls="--")
    _log_x_axes(ax, "fine-tuning examples", "test loss (log-perplexity)", title + "; dashed: extrapolated")
    return _save(fig, path)


def lifetime_split_axes(ax, plan) -> None:
    """Training vs lifetime inference of the training-only and the recommended plan (stacked bars,
    in the plan's unit: FLOPs or dollars; Sardana et al. 2024's Figure 1 as bars)."""
    i = plan.inference
    plans = (("training only", i.training_only), ("inference-aware", plan.recommended))
    usd = i.unit == "USD"
    train = [p.cost_usd if usd else p.compute_flops for _, p in plans]
    infer = [p.inference_cost_usd if usd else p.inference_flops for _, p in plans]
    names = [f"{name}\n{p.model}" for name, p in plans]
    ax.bar(names, train, color="C0", label="training")
    ax.bar(names, infer, bottom=train, color="C1", label="inference")
    ax.set_ylabel("US dollars" if usd else "FLOPs")
    ax.set_title(f"same loss {i.target_loss:.3f}: {i.savings_fraction:+.1%} saved", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7)
