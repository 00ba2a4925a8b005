"""Stopping rule: closed forms, curve fits and model choice, the recommendation, logs, the backtest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import brentq

from planner.errors import PlannerError
from planner.loss import scaling, stopping

T = np.arange(100.0, 20001.0, 100.0)


def power_curve(t, E=2.0, A=5.0, alpha=0.5):
    return E + A * t ** (-alpha)


@pytest.mark.parametrize(
    "model,params",
    [("power", {"E": 2.0, "A": 5.0, "alpha": 0.5}), ("exponential", {"E": 2.0, "A": 1.0, "k": 3e-4}), ("loglinear", {"a": 3.0, "b": 0.1})],
)
def test_crossing_step_closed_form_equals_root_finding(model, params):
    g = 1e-6
    t_star = stopping.gain_crossing_step(model, params, g)
    root = brentq(lambda t: -float(stopping.curve_slope(model, params, t)) - g, 1.0, 1e9, xtol=1e-10)
    assert t_star == pytest.approx(root, rel=1e-8)


def test_power_fit_recovers_a_noiseless_curve():
    fit, _ = stopping.fit_curve(T[:80], power_curve(T[:80]), "power")
    assert fit.params["E"] == pytest.approx(2.0, abs=1e-6)
    assert fit.params["A"] == pytest.approx(5.0, rel=1e-5)
    assert fit.params["alpha"] == pytest.approx(0.5, rel=1e-6)


def test_model_selection_picks_the_generating_family():
    rng = np.random.default_rng(3)
    y_pow = power_curve(T) + rng.normal(0, 0.003, T.size)
    y_exp = 2.0 + 1.0 * np.exp(-T / 3000) + rng.normal(0, 0.003, T.size)
    for crit in ("aicc", "bic", "holdout"):
        assert stopping.select_curve(T[:80], y_pow[:80], criterion=crit)[0].model == "power", crit
        assert stopping.select_curve(T[:80], y_exp[:80], criterion=crit)[0].model == "exponential", crit


def test_recommendation_on_a_noiseless_power_law_is_the_analytic_step():
    lam, cost = 1e-6, 1.0
    rec = stopping.recommend_stop(T[:60], power_curve(T[:60]), cost, lam, num_bootstrap=0)
    analytic = (0.5 * 5.0 / (lam * cost)) ** (1 / 1.5)  # -dL/dt = alpha A t^-(alpha+1) = lambda c
    assert rec.model == "power" and rec.status == "continue"
    assert rec.stop_step == pytest.approx(analytic, rel=1e-3)
    assert rec.loss_at_stop == pytest.approx(power_curve(rec.stop_step), rel=1e-6)
    assert rec.cost_to_stop == pytest.approx(rec.stop_step - T[59])


def test_interval_covers_the_true_stop_on_a_noisy_curve():
    rng = np.random.default_rng(7)
    y = power_curve(T) + rng.normal(0, 0.003, T.size)
    rec = stopping.recommend_stop(T[:60], y[:60], 1.0, 1e-6, num_bootstrap=60, confidence=0.95)
    analytic = (2.5 / 1e-6) ** (1 / 1.5)
    lo, hi = rec.stop_step_interval
    assert lo <= analytic <= hi
    assert hi - lo < 0.2 * analytic


def test_recommendation_calls_progress_once_per_bootstrap_replicate():
    rng = np.random.default_rng(3)
    y = power_curve(T[:50]) + rng.normal(0, 0.003, 50)
    calls: list[int] = []
    rec = stopping.recommend_stop(T[:50], y, 1.0, 1e-6, num_bootstrap=9, progress=calls.append)
    assert calls == [1] * 9
    assert rec == stopping.recommend_stop(T[:50], y, 1.0, 1e-6, num_bootstrap=9)  # the callback changes no number


def test_status_stop_now_and_budget_bound():
    y = power_curve(T[:40])
    now = stopping.recommend_stop(T[:40], y, 1.0, 1e-2, num_bootstrap=0)
    assert now.status == "stop_now" and now.stop_step == int(T[39]) and now.gain_to_stop == 0.0
    bound = stopping.recommend_stop(T[:40], y, 1.0, 1e-12, max_steps=50000, num_bootstrap=0)
    assert bound.status == "budget_bound" and bound.stop_step == 50000


def test_run_budget_threshold_stops_at_the_budget():
    fit, _ = stopping.fit_curve(T[:50], power_curve(T[:50]), "power")
    lam = stopping.run_budget_threshold(fit, 30000, 2.0)
    rec = stopping.recommend_stop(T[:50], power_curve(T[:50]), 2.0, lam, model="power", num_bootstrap=0)
    assert rec.stop_step == pytest.approx(30000, rel=1e-4)


def test_threshold_from_a_compute_budget_is_the_shadow_price():
    law = scaling.load_law("besiroglu2024")
    lam = float(scaling.compute_shadow_price(law, 1e21))
    assert 0 < lam < 1e-18  # loss per FLOP


def test_oracle_on_a_known_curve():
    t = np.arange(1.0, 100001.0)
    step, _ = stopping.oracle_stop(t, power_curve(t), 1.0, 1e-6, 1.0)
    assert step == pytest.approx((2.5e6) ** (2 / 3), abs=1.0)


def test_backtest_regret_on_curves_from_known_laws():
    """Curves from the Besiroglu et al. law along training (N = 400M, 1M tokens per step) and from a
    power law, with 0.3% noise: from 30% of the curve on, the rule loses under 5% of the gain."""
    law = scaling.load_law("besiroglu2024")
    rng = np.random.default_rng(11)
    t = np.arange(200.0, 40001.0, 200.0)
    ref_law = stopping.law_curve(law.E, law.A, law.B, law.alpha, law.beta, 4e8, 1e6, t)
    ref_pow = power_curve(t, 2.2, 8.0, 0.45)
    curves = {
        "besiroglu_400M": (t, ref_law + rng.normal(0, 0.003, t.size), ref_law),
        "power": (t, ref_pow + rng.normal(0, 0.003, t.size), ref_pow),
    }
    # lambda so that the true stop falls mid-curve for the law curve.
    slope = float(np.interp(15000.0, t[1:], -np.diff(ref_law) / np.diff(t)))
    rows = stopping.backtest(curves, 1.0, slope, prefix_fractions=(0.3, 0.5), num_bootstrap=20)
    assert len(rows) == 4
    for row in rows:
        assert row.relative_regret < 0.05, row
        assert row.regret >= -1e-12
        assert row.oracle_step >= row.prefix_step


# ------------------------------------------------------------------ logs


def test_read_csv_and_trainer_state(tmp_path):
    csv = tmp_path / "log.csv"
    csv.write_text("step,loss\n0,10.5\n10,4.0\n20,3.5\n")
    steps, losses, excluded = stopping.read_loss_log(csv)
    assert list(steps) == [10.0, 20.0] and excluded == 1
    state = {"log_history": [{"step": 5, "loss": 3.2, "epoch": 0.1}, {"step": 5, "eval_loss": 3.3}, {"step": 10, "loss": 3.0},
                             {"train_runtime": 12.0, "step": 10}]}
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(state))
    steps, losses, excluded = stopping.read_loss_log(path)
    assert list(steps) == [5.0, 10.0] and list(losses) == [3.2, 3.0]
    steps, losses, _ = stopping.read_loss_log(path, metric="eval_loss")
    assert list(losses) == [3.3]


@pytest.mark.parametrize(
    "text,match",
    [("", "empty"), ("step,loss\n", "no rows"), ("step,value\n1,2\n", "loss"), ("step,loss\n1,2\n2,nan\n", "NaN"),
     ("step,loss\n1,2\n2,abc\n", "non-numeric"), ("step,loss\n-1,2\n2,1\n", "negative")],
)
def test_bad_logs(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PlannerError, match=match):
        stopping.read_loss_log(path)


def test_bad_series():
    with pytest.raises(PlannerError, match="at least 8"):
        stopping.recommend_stop(T[:5], power_curve(T[:5]), 1.0, 1e-6)
    t = T[:20].copy()
    t[5] = t[4]
    with pytest.raises(PlannerError, match="increasing"):
        stopping.recommend_stop(t, power_curve(t), 1.0, 1e-6)
    with pytest.raises(PlannerError, match="threshold"):
        stopping.recommend_stop(T[:20], power_curve(T[:20]), 1.0, -1.0)
    with pytest.raises(PlannerError, match="cost"):
        stopping.recommend_stop(T[:20], power_curve(T[:20]), 0.0, 1e-6)
    with pytest.raises(PlannerError, match="max steps"):
        stopping.recommend_stop(T[:20], power_curve(T[:20]), 1.0, 1e-6, max_steps=10)


def test_trainer_state_without_history(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 3}))
    with pytest.raises(PlannerError, match="log_history"):
        stopping.read_loss_log(path)
    assert math.isfinite(stopping.gain_crossing_step("power", {"E": 1, "A": 1, "alpha": 1}, 1.0))
