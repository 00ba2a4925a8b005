"""Fitting the time model's constants on published throughput, scored leave-one-source-out.

``table(runs)`` prices every published run once with the bare roofline (``step_time`` with
``grounded=False``); ``predict(table, values)`` applies ``planner.cost.timing.grounding.ground`` to all
of them at once (numpy), so a fit evaluates thousands of constant vectors in seconds.

The fit (``fit``) minimises, over the log of the constants, the squared log error of the step
time, each source weighted by its runs up to ``RUNS_PER_SOURCE_CAP`` (one source has 209 runs, others 2), with a soft-L1 loss (a
few runs of a source far off do not drag the rest) and a ridge toward ``PRIOR`` (a constant no
run informs stays at its prior). ``loso`` refits once per source without it and predicts its
runs: those held-out errors are the score, and the 80% interval of each regime is +- the 80th
percentile of the absolute held-out log errors of the other sources (``regime_interval``).
"""

from __future__ import annotations

import numpy as np

from planner.cost.timing.grounding import DERIVED, PRIOR, REGIMES, features, ground

FIT_NAMES: tuple[str, ...] = tuple(name for name in PRIOR if name not in DERIVED)
"""The fitted constants (``time_model.DERIVED`` ones stay at their derived values)."""
RIDGE_LOG_SIGMA = 1.0
"""Prior width of each constant, in log space (a factor e either way at one sigma)."""
RUNS_PER_SOURCE_CAP = 20
"""A source weighs as many runs as it has, up to this many (209 runs of one benchmark table
count as 20: the fit is not the fit of one source)."""
LOSS_SCALE = 0.15
"""Soft-L1 scale of the log error: errors beyond ~15% count linearly, not quadratically."""
INTERVAL = 0.8
"""The share of held-out runs the interval is built to hold."""
MIN_SOURCES_PER_REGIME = 3
"""A regime's own interval needs runs of this many sources (else all regimes are pooled)."""


def table(runs) -> dict:
    """Roofline parts, features and the measured step time of each run (arrays over runs)."""
    from planner.cost.timing.step_time import step_time

    parts: dict[str, list] = {}
    feats: dict[str, list] = {}
    measured, tokens_per_gpu = [], []
    for run in runs:
        raw = step_time(run.spec, run.setup, run.gpu, cluster=run.cluster, grounded=False)
        for key in ("compute_s", "attention_s", "memory_s", "recompute_s", "overhead_s", "optimizer_s",
                    "communication_s", "dequantization_s", "offload_s"):
            parts.setdefault(key, []).append(float(raw[key]))
        for key, value in features(run.spec, run.setup, run.gpu).items():
            feats.setdefault(key, []).append(value)
        s = run.setup
        tokens = s.micro_batch * s.seq_len * s.grad_accum * s.data_parallel / s.num_gpus
        tokens_per_gpu.append(tokens)
        measured.append(tokens / run.tokens_per_s_per_gpu)
    return {
        "parts": {k: np.array(v) for k, v in parts.items()},
        "features": {k: np.array(v) for k, v in feats.items()},
        "measured_step_s": np.array(measured),
        "tokens_per_gpu": np.array(tokens_per_gpu),
        "source": np.array([r.source_id for r in runs]),
        "regime": np.array([r.regime for r in runs]),
        "id": np.array([r.id for r in runs]),
    }


def predict(tab: dict, values: dict, mask=None) -> np.ndarray:
    """Grounded step seconds of the runs of ``tab`` (those of ``mask``) under ``values``."""
    parts, feats = tab["parts"], tab["features"]
    if mask is not None:
        parts = {k: v[mask] for k, v in parts.items()}
        feats = {k: v[mask] for k, v in feats.items()}
    return sum(ground(parts, feats, values).values())


def log_errors(tab: dict, values: dict, mask=None) -> np.ndarray:
    """log(measured / predicted) step time: > 0 when the model is optimistic."""
    measured = tab["measured_step_s"] if mask is None else tab["measured_step_s"][mask]
    return np.log(measured / predict(tab, values, mask))


def fit(tab: dict, mask=None) -> dict:
    """Constants minimising the source-weighted soft-L1 log error of the runs of ``mask``."""
    from scipy.optimize import least_squares

    mask = np.ones(len(tab["id"]), bool) if mask is None else mask
    sources = tab["source"][mask]
    weight = np.sqrt(source_weights(sources))
    prior = np.log([PRIOR[n] for n in FIT_NAMES])
    held = {name: PRIOR[name] for name in DERIVED}

    def residuals(theta):
        values = {**held, **dict(zip(FIT_NAMES, np.exp(theta), strict=True))}
        errors = weight * log_errors(tab, values, mask)
        return np.concatenate([errors, (theta - prior) / RIDGE_LOG_SIGMA])

    result = least_squares(residuals, prior, loss="soft_l1", f_scale=LOSS_SCALE, method="trf")
    return {**held, **dict(zip(FIT_NAMES, (float(v) for v in np.exp(result.x)), strict=True))}


def loso(tab: dict) -> dict:
    """Leave-one-source-out: per source, the constants fitted without it and its held-out log
    errors; then, per source, the 80% interval from the other sources' held-out errors of each
    regime and whether each of its runs falls inside."""
    held = np.zeros(len(tab["id"]))
    fits = {}
    for source in np.unique(tab["source"]):
        out = tab["source"] == source
        fits[str(source)] = fit(tab, ~out)
        held[out] = log_errors(tab, fits[str(source)], out)
    inside = np.zeros(len(held), bool)
    for source in np.unique(tab["source"]):
        out = tab["source"] == source
        for reg in REGIMES:
            here = out & (tab["regime"] == reg)
            if here.any():
                low, high = regime_interval(held, tab["regime"], reg, ~out, tab["source"])
                inside[here] = (held[here] >= low) & (held[here] <= high)
    return {"log_errors": held, "inside": inside, "fits": fits}


def regime_interval(log_err: np.ndarray, regimes: np.ndarray, reg: str, mask=None,
                    sources: np.ndarray | None = None) -> tuple[float, float]:
    """The 80% interval of regime ``reg`` in log space: +- the 80th percentile of the absolute
    held-out log errors, each source weighted as min(its runs in the pool, ``RUNS_PER_SOURCE_CAP``) runs when
    ``sources`` are given, the fit's cap (all regimes pooled when it has fewer than 5 runs, or, given ``sources``,
    runs of fewer than ``MIN_SOURCES_PER_REGIME`` sources: the spread of one or two sources says
    little about a new one; with the single-GPU runs of two torchtune READMEs alone, 44% of the
    Qwen README's single-GPU runs fell inside). Symmetric, because
    what dominates the errors is a shift between sources whose sign a new set-up does not tell:
    the 10th-90th percentiles of the pooled errors inherit the largest source's sign and covered
    58% of another source's runs, this 83% (``benchmarks/README.md``, issue 11)."""
    mask = np.ones(len(log_err), bool) if mask is None else mask
    here = mask & (regimes == reg)
    enough = here.sum() >= 5 and (sources is None or len(np.unique(sources[here])) >= MIN_SOURCES_PER_REGIME)
    pool = here if enough else mask
    if sources is None:
        half = float(np.quantile(np.abs(log_err[pool]), INTERVAL))
    else:  # each source as min(its runs in the pool, RUNS_PER_SOURCE_CAP) runs
        half = float(np.quantile(np.abs(log_err[pool]), INTERVAL, weights=source_weights(sources[pool]),
                                 method="inverted_cdf"))
    return -half, half


def source_weights(sources: np.ndarray) -> np.ndarray:
    """Each run's weight when a source counts as ``min(runs, RUNS_PER_SOURCE_CAP)`` runs, as in the fit:
    the interval is for a set-up of a source we have not seen, so one benchmark table's 216 runs must not
    set it alone (with each run counted once, sources other than that table had a median coverage of 69%)."""
    _, inverse, counts = np.unique(sources, return_inverse=True, return_counts=True)
    return np.minimum(counts, RUNS_PER_SOURCE_CAP)[inverse] / counts[inverse]


def throughput_errors(log_err: np.ndarray) -> np.ndarray:
    """Relative error of predicted tokens per second: predicted / measured - 1."""
    return np.exp(log_err) - 1.0


def summary(tab: dict, result: dict) -> dict:
    """The leave-one-source-out scores: overall, by source and by regime (throughput errors)."""
    err = throughput_errors(result["log_errors"])

    def scores(mask) -> dict:
        e = err[mask]
        return {"runs": int(mask.sum()), "median_abs_error": float(np.median(np.abs(e))),
                "max_abs_error": float(np.max(np.abs(e))), "median_error": float(np.median(e)),
                "interval_coverage": float(np.mean(result["inside"][mask]))}

    everything = np.ones(len(err), bool)
    return {
        "overall": {**scores(everything), "sources": int(len(np.unique(tab["source"])))},
        "by_source": {str(s): scores(tab["source"] == s) for s in np.unique(tab["source"])},
        "by_regime": {r: scores(tab["regime"] == r) for r in REGIMES if (tab["regime"] == r).any()},
    }


def committed(tab: dict) -> dict:
    """What ``models_catalog/time_model/constants.json`` holds: the constants fitted on every
    run, the 80% interval of each regime (``regime_interval`` of all held-out log errors) and
    the leave-one-source-out scores that back them."""
    result = loso(tab)
    return {
        "values": fit(tab),
        "interval_log_ratio": {r: list(regime_interval(result["log_errors"], tab["regime"], r, None, tab["source"]))
                               for r in REGIMES},
        "loso": summary(tab, result),
        "fitted": {
            "how": "scipy.optimize.least_squares (soft_l1, f_scale LOSS_SCALE) of log(measured / predicted step "
                   "time) over the log of the constants, each source weighted as min(runs, RUNS_PER_SOURCE_CAP) "
                   "runs, ridge toward time_model.PRIOR (RIDGE_LOG_SIGMA); interval_log_ratio = +- the 80th percentile of "
                   "the absolute held-out log errors of each regime (leave one source out), each source weighted "
                   "as min(its runs in the regime, RUNS_PER_SOURCE_CAP) runs",
            "data": "models_catalog/measurements/throughput.csv (see THROUGHPUT_SOURCES.md), runs mapped by "
                    "planner.cost.timing.published",
            "ridge_log_sigma": RIDGE_LOG_SIGMA, "runs_per_source_cap": RUNS_PER_SOURCE_CAP, "loss_scale": LOSS_SCALE,
            "command": "python benchmarks/bench_time_published.py --write",
        },
    }
