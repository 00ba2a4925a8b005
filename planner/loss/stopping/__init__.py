"""When to stop a run: at the first step where the marginal loss gain per unit of cost falls below lambda.

Continuing from step t costs ``cost_per_step`` (FLOPs, GPU-hours or $: any unit, as long as lambda
is in loss per that unit) and buys -dL/dt of loss per step; lambda, the price of one unit of cost
in loss, is given by the user or is the shadow price of a budget: :func:`planner.loss.scaling.compute_shadow_price`
(what one more FLOP buys when spent on a compute-optimal run) or :func:`run_budget_threshold` (what
the last step of a step budget buys). Four modules: ``curves`` (the power, exponential and
log-linear families, fitted and chosen by AICc, BIC or a held-out tail), ``rule`` (the
recommendation and its moving-block bootstrap interval), ``logs`` (a CSV or a Hugging Face
trainer_state.json) and ``backtesting`` (the rule replayed on complete curves, regret against the
oracle that knows the whole curve). This package re-exports their public names.

This package owns the stopping rule and its backtests; it may import ``planner.loss.scaling``,
``planner.errors`` and numpy (scipy inside the fits).
"""

from planner.loss.stopping.backtesting import BacktestRow, backtest, law_curve, oracle_stop
from planner.loss.stopping.curves import (
    MIN_POINTS,
    MODELS,
    CurveFit,
    ModelName,
    curve_slope,
    curve_value,
    fit_curve,
    gain_crossing_step,
    select_curve,
)
from planner.loss.stopping.logs import read_loss_log
from planner.loss.stopping.rule import StopRecommendation, recommend_stop, run_budget_threshold

__all__ = [
    "MIN_POINTS",
    "MODELS",
    "BacktestRow",
    "CurveFit",
    "ModelName",
    "StopRecommendation",
    "backtest",
    "curve_slope",
    "curve_value",
    "fit_curve",
    "gain_crossing_step",
    "law_curve",
    "oracle_stop",
    "read_loss_log",
    "recommend_stop",
    "run_budget_threshold",
    "select_curve",
]
