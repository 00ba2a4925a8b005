"""The data side and the meeting of the two halves: loss, time, cost and FLOPs of every candidate.

A candidate is a set-up row (``planner.search.setups``) x a data choice x a token count. Loss does
not depend on the set-up beyond the model and the method (``predicted_loss``: Chinchilla / Kaplan,
Muennighoff et al.'s repetition, the pruning model of ``planner.loss.pruning``); time is tokens
over the set-up's throughput plus the selection method's scoring; cost is time x GPUs x price;
budget FLOPs are 6 N D scaled by the method's work plus the scoring. ``score_candidates``
evaluates them all in one broadcast, with the token counts each limit allows.
"""

from __future__ import annotations

import math

import numpy as np

from planner.cost.timing.bounds import quantile_factor
from planner.errors import PlannerError
from planner.loss import pruning, scaling
from planner.search.candidates import DataChoices, ModelEntry, token_lattice
from planner.search.context import Context, Limits
from planner.search.table import SetupTable


def budget_flops_per_token(params_n, work_ratio):
    """Budget FLOPs per training token: 6 N (Kaplan et al. 2020 sec. 2.1, the convention of the
    laws' C = 6 N D) times the method's work relative to full training (LoRA skips the frozen
    weights' gradients: about 2/3, as ``planner.cost.flops`` counts it)."""
    return scaling.FLOPS_PER_PARAM_TOKEN * np.asarray(params_n, dtype=np.float64) * np.asarray(work_ratio, dtype=np.float64)


def run_cost_usd(time_s, num_gpus, price_usd_per_hour: float):
    """Dollars: wall time x GPUs x price per GPU-hour."""
    return np.asarray(time_s, dtype=np.float64) * np.asarray(num_gpus, dtype=np.float64) * price_usd_per_hour / 3600.0


def predicted_loss(
    law: scaling.ScalingLaw,
    params_n,
    tokens_d,
    pool_tokens=None,
    keep_fraction=1.0,
    theta_deg=90.0,
    strategy: str = "hard",
    efficiency=1.0,
):
    """Loss of N parameters trained on D tokens with token efficiency eta (see
    ``planner.search.plan.DEFAULT_PEFT_TOKEN_EFFICIENCY``): the law at (N, eta D); with a pool of U unique
    tokens, ``planner.loss.pruning.pruned_loss`` at (N, eta D, eta U, f, theta), which is Muennighoff et
    al.'s data-constrained law when f = 1 or the metric is random (theta = 90). A law without
    repetition constants (Kaplan) is evaluated without the pool; callers keep D <= f U for it.
    """
    eta = np.asarray(efficiency, dtype=np.float64)
    d = eta * np.asarray(tokens_d, dtype=np.float64)
    if pool_tokens is None or law.repetition is None:
        return scaling.predict_loss(law, params_n, d)
    u = eta * np.asarray(pool_tokens, dtype=np.float64)
    return pruning.pruned_loss(law, params_n, d, u, keep_fraction, theta_deg, strategy)


def candidate_loss(ctx: Context, params_n, method: str, tokens_d, keep_fraction, theta_deg, strategy: str):
    """Loss of one model and method over token counts: the request's law(s), as the scoring computes it."""
    req = ctx.request
    if req.uses_finetune_law:
        from planner.search.finetuning import data_tokens, finetune_losses

        d_eff = data_tokens(ctx, params_n, tokens_d, keep_fraction, theta_deg, strategy, req.efficiency(method))
        flat = np.atleast_1d(np.asarray(d_eff, dtype=np.float64))[None, None, :]
        return finetune_losses(ctx, np.array([[params_n]]), np.array([method]), flat)[0, 0].reshape(np.shape(d_eff))
    return predicted_loss(ctx.law, params_n, tokens_d, req.data_pool_tokens, keep_fraction, theta_deg, strategy,
                          req.efficiency(method))


class _Rows:
    """Per set-up row (column vectors, rows x 1): what the scoring reads."""

    def __init__(self, ctx: Context, models: list[ModelEntry], rows: SetupTable, data: DataChoices) -> None:
        f64 = np.float64
        self.params = np.array([models[i].params_n for i in rows["model"]])[:, None]
        self.g = rows["num_gpus"].astype(f64)[:, None]
        self.tps = rows["tokens_per_s"].astype(f64)[:, None]
        # the time budgets are held at the request's quantile of the run time (the quantile of the interval
        # each candidate shows): its time over the median
        low, high, _ = ctx.time_log_bounds(rows["num_gpus"], rows["method"], rows["precision"], rows["micro_batch"])
        self.held_factor = quantile_factor(low, high, ctx.request.confidence)[:, None]
        mfu = rows["mfu"].astype(f64)[:, None]
        peak_rate = np.array([ctx.gpu.peak_flops_for(p) for p in rows["precision"]])[:, None]
        self.fpt = budget_flops_per_token(self.params, rows["work_ratio"].astype(f64)[:, None])
        self.eta = np.array([ctx.request.efficiency(m) for m in rows["method"]])[:, None]
        self.method = rows["method"]
        self.score = data.scoring_flops[None, :]
        self.scoring_time = self.score / (mfu * peak_rate * self.g)
        self.tokens_per_step = rows["tokens_per_step"].astype(f64)[:, None, None]


def _token_caps(ctx: Context, r: _Rows, data: DataChoices, limits: Limits) -> list:
    """Per (row, data choice): the most tokens each limit allows."""
    req = ctx.request
    pool = req.data_pool_tokens
    f = data.keep_fraction[None, :]
    caps = []
    if limits.compute_flops is not None:
        caps.append((limits.compute_flops - r.score) / r.fpt)
    seconds = []
    if limits.budget_usd is not None:
        seconds.append(limits.budget_usd / (r.g * ctx.price / 3600.0))
    if limits.gpu_hours is not None:
        seconds.append(limits.gpu_hours * 3600.0 / r.g)
    if limits.deadline_s is not None:
        seconds.append(np.full_like(r.g, limits.deadline_s))
    if seconds:
        caps.append((np.minimum.reduce(seconds) / r.held_factor - r.scoring_time) * r.tps)
    plaus = ctx.plausibility
    max_epochs = req.max_epochs if plaus is None else plaus.max_epochs
    if pool is not None:
        if not req.repeat or ctx.law.repetition is None:
            caps.append(f * pool + 0 * r.params)
        elif max_epochs is not None:
            caps.append(max_epochs * f * pool + 0 * r.params)
    if plaus is not None and plaus.tokens_per_param is not None:
        caps.append(plaus.tokens_per_param[1] * r.params + 0 * f)
    return caps


def _token_counts(ctx: Context, r: _Rows, data: DataChoices, limits: Limits, only_max: bool):
    """(tokens per (row, choice, count), the most tokens the limits allow per (row, choice))."""
    req = ctx.request
    R, J = r.params.shape[0], data.size
    caps = _token_caps(ctx, r, data, limits)
    fixed = None
    if req.tokens is not None:
        fixed = np.full((R, J), req.tokens)
    elif req.epochs is not None:
        fixed = req.epochs * data.keep_fraction[None, :] * req.data_pool_tokens + 0 * r.params
    if not caps and fixed is None:
        raise PlannerError(
            "nothing limits the training tokens: give --compute, --budget-usd, --gpu-hours, --deadline-hours, "
            "or a --data-pool with --max-epochs (or fix --tokens)"
        )
    d_max = np.minimum.reduce(caps) if caps else np.full((R, J), np.inf)
    d_max = np.broadcast_to(d_max, (R, J))
    if fixed is not None:
        return np.broadcast_to(fixed, (R, J))[:, :, None], d_max
    if only_max:
        return d_max[:, :, None], d_max
    finite = d_max[np.isfinite(d_max) & (d_max > 0)]
    lattice = token_lattice(float(finite.max()) if finite.size else math.nan, req.token_grid)
    return np.concatenate([np.broadcast_to(lattice, (R, J, lattice.size)), d_max[:, :, None]], axis=2), d_max


def _losses(ctx: Context, r: _Rows, data: DataChoices, safe_tokens) -> np.ndarray:
    """The law's loss of every candidate, one call per selection strategy; fine-tuning under a
    fine-tuning law: that law at the effective tokens (``planner.search.finetuning``)."""
    loss = np.empty(safe_tokens.shape)
    finetune = ctx.request.uses_finetune_law
    for strategy in ("hard", "easy"):
        cols = data.strategy == strategy
        if not cols.any():
            continue
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            if finetune:
                from planner.search.finetuning import data_tokens, finetune_losses

                d_eff = data_tokens(ctx, r.params[:, :, None], safe_tokens[:, cols, :], data.keep_fraction[None, cols, None],
                                    data.theta_deg[None, cols, None], strategy, r.eta[:, :, None])
                loss[:, cols, :] = finetune_losses(ctx, r.params, r.method, d_eff)
                continue
            loss[:, cols, :] = predicted_loss(
                ctx.law, r.params[:, :, None], safe_tokens[:, cols, :], ctx.request.data_pool_tokens,
                data.keep_fraction[None, cols, None], data.theta_deg[None, cols, None], strategy, r.eta[:, :, None])
    return loss


def score_candidates(ctx: Context, models: list[ModelEntry], rows: SetupTable, data: DataChoices,
                     limits: Limits, only_max: bool = False) -> dict[str, np.ndarray]:
    """Every (set-up row x data choice x token count): tokens, loss, time, cost, FLOPs, feasibility.

    Token counts: the most the limits allow for that set-up and data (D_max), and the lattice
    points (``token_lattice``) below it down to 1/2^(token_grid/2) of the largest D_max; or the
    tokens the request fixes. Every array is flat, row-major over (row, choice, token count).
    """
    r = _Rows(ctx, models, rows, data)
    tokens, d_max = _token_counts(ctx, r, data, limits, only_max)
    R, J, K = tokens.shape
    shape = (R, J, K)
    feasible = (tokens >= r.tokens_per_step) & (tokens <= d_max[:, :, None] * (1 + 1e-9)) & np.isfinite(tokens)
    safe_tokens = np.where(np.isfinite(tokens) & (tokens > 0), tokens, 1.0)
    loss = _losses(ctx, r, data, safe_tokens)
    time_s = safe_tokens / r.tps[:, :, None] + r.scoring_time[:, :, None]
    cost = run_cost_usd(time_s, r.g[:, :, None], ctx.price)
    flops = safe_tokens * r.fpt[:, :, None] + r.score[:, :, None]
    feasible &= np.isfinite(loss)
    plaus = ctx.plausibility
    if plaus is not None and plaus.tokens_per_param is not None:  # fewer tokens per parameter than the law's runs
        feasible &= safe_tokens >= plaus.tokens_per_param[0] * r.params[:, :, None] * (1 - 1e-9)
    out = {
        "row": np.broadcast_to(np.arange(R)[:, None, None], shape),
        "choice": np.broadcast_to(np.arange(J)[None, :, None], shape),
        "tokens": np.broadcast_to(safe_tokens, shape),
        "loss": loss,
        "time_s": np.broadcast_to(time_s, shape),
        "cost_usd": np.broadcast_to(cost, shape),
        "compute_flops": np.broadcast_to(flops, shape),
        "feasible": np.broadcast_to(feasible, shape),
    }
    return {k: np.ascontiguousarray(v).reshape(-1) for k, v in out.items()}
