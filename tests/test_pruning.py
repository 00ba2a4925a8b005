"""Data selection: the Sorscher-style effective-data model, the methods catalog, and the planner."""

from __future__ import annotations

import math

import numpy as np
import pytest

from planner.errors import PlannerError
from planner.loss import pruning, scaling

LAW = scaling.load_law("besiroglu2024")


def test_coverage_limits_and_monotonicity():
    f = np.array([0.01, 0.1, 0.5, 0.9, 1.0])
    assert pruning.boundary_coverage(f, 90.0) == pytest.approx(f)  # random probe: coverage = kept share
    assert pruning.boundary_coverage(f, 0.0) == pytest.approx(np.ones_like(f))  # perfect metric
    c = pruning.boundary_coverage(f, 30.0)
    assert np.all(np.diff(c) > 0) and np.all(c >= f) and c[-1] == 1.0
    assert pruning.boundary_coverage(0.2, 10.0) > pruning.boundary_coverage(0.2, 45.0)


def test_gain_saturates_at_one_over_sin_theta():
    # Statement (iii) of Sorscher et al.: an imperfect metric's gain is bounded; here by 1/sin(theta).
    for theta in (10.0, 38.0, 70.0):
        m = pruning.hard_selection_gain(np.geomspace(1e-6, 1, 50), theta)
        assert np.all(m <= 1 / math.sin(math.radians(theta)) + 1e-9)
        assert m[0] == pytest.approx(1 / math.sin(math.radians(theta)), rel=1e-4)
    assert pruning.hard_selection_gain(0.01, 0.0) == pytest.approx(100.0)
    assert pruning.hard_selection_gain(0.3, 90.0) == pytest.approx(1.0)


@pytest.mark.parametrize("f0,s0", [(0.5, 1.45), (0.1, 3.0), (0.8, 1.1)])
def test_theta_from_efficiency_inverts_the_gain(f0, s0):
    theta = pruning.theta_from_efficiency(f0, s0)
    assert 0 < theta < 90
    assert float(pruning.hard_selection_gain(f0, theta)) == pytest.approx(s0, rel=1e-9)
    assert pruning.theta_from_efficiency(0.5, 2.0) == 0.0
    assert pruning.theta_from_efficiency(0.5, 1.0) == 90.0


def test_no_pruning_or_random_metric_is_the_data_constrained_law():
    n, d, u = 2e9, 8e10, 3e10
    base = float(scaling.data_constrained_loss(LAW, n, d, u))
    assert float(pruning.pruned_loss(LAW, n, d, u, 1.0, 20.0, "hard")) == pytest.approx(base, rel=1e-14)
    # Random metric keeping half: the same as a pool half the size.
    half = float(scaling.data_constrained_loss(LAW, n, d, u / 2))
    assert float(pruning.pruned_loss(LAW, n, d, u, 0.5, 90.0, "hard")) == pytest.approx(half, rel=1e-12)


def test_easy_when_scarce_hard_when_abundant():
    # Statement (iv): which end of the ranking to keep flips with the data abundance rho = U / D_opt(N).
    n = 1e9
    d_opt = float(scaling.optimal_tokens_for_params(LAW, n))
    for u, better in ((0.1 * d_opt, "easy"), (10 * d_opt, "hard")):
        d = min(u, d_opt) * 0.5  # one pass over part of the kept data: no repetition in play
        hard = float(pruning.pruned_loss(LAW, n, d, u, 0.6, 30.0, "hard"))
        easy = float(pruning.pruned_loss(LAW, n, d, u, 0.6, 30.0, "easy"))
        assert (easy < hard) if better == "easy" else (hard < easy), u
    d = 0.3 * d_opt
    assert float(pruning.pruned_loss(LAW, n, d, d_opt, 0.6, 30.0, "hard")) == pytest.approx(
        float(pruning.pruned_loss(LAW, n, d, d_opt, 0.6, 30.0, "easy")), rel=1e-12)  # rho = 1: crossover


def test_perfect_metric_beats_the_power_law_in_kept_tokens():
    # Statement (ii): at a fixed number of kept tokens K, a perfect metric pruning a larger pool
    # keeps lowering the loss (the kept data is worth the whole pool), while a random metric does not.
    n, k = 1e9, 2e10
    d = k  # one pass over the kept tokens
    perfect, random_ = [], []
    for u in (k, 4 * k, 16 * k, 64 * k):
        perfect.append(float(pruning.pruned_loss(LAW, n, d, u, k / u, 0.0, "hard")))
        random_.append(float(pruning.pruned_loss(LAW, n, d, u, k / u, 90.0, "hard")))
    assert np.all(np.diff(perfect) < 0)
    assert np.allclose(random_, random_[0], rtol=1e-12)


def test_scoring_flops_formula():
    m = pruning.load_method("perplexity_proxy")
    assert float(pruning.scoring_flops(m, 1e12)) == pytest.approx(2 * 125e6 * 1e12)
    assert float(pruning.scoring_flops(m, 1e12, proxy_params=1e9, proxy_train_tokens=1e10)) == pytest.approx(2e21 + 6e19)
    assert float(pruning.scoring_flops(pruning.load_method("random"), 1e12)) == 0.0


def test_catalog_methods_have_citations_and_reproduce_their_calibration():
    for name in pruning.list_methods():
        m = pruning.load_method(name)
        assert m.citation, name
        if m.calibration is not None:
            gain = float(pruning.hard_selection_gain(m.calibration.keep_fraction, m.metric_angle_deg))
            assert gain == pytest.approx(min(m.calibration.token_efficiency, 1 / m.calibration.keep_fraction), rel=1e-9)
    assert pruning.load_method("random").metric_angle_deg == 90.0
    with pytest.raises(PlannerError, match="known"):
        pruning.load_method("perplexity")


def test_random_selection_never_prunes():
    plan = pruning.plan_pruning(1e22, 2e12, "random", LAW)
    assert plan.keep_fraction == 1.0 and plan.strategy == "none"
    assert plan.loss == pytest.approx(plan.loss_no_pruning, rel=1e-12)
    assert plan.scoring_flops == 0.0


def test_plan_matches_brute_force():
    c, u = 1e22, 2e12
    method = pruning.load_method("perplexity_proxy")
    plan = pruning.plan_pruning(c, u, method, LAW, strategy="hard")
    train = c - float(pruning.scoring_flops(method, u))
    f = np.geomspace(method.min_keep_fraction, 1.0, 400)[:, None]
    n = np.geomspace(1e8, 1e12, 3000)[None, :]
    brute = pruning.pruned_loss(LAW, n, train / (6 * n), u, f, method.metric_angle_deg, "hard")
    assert plan.loss <= float(brute.min()) + 1e-9
    assert plan.loss == pytest.approx(float(brute.min()), abs=1e-4)
    assert plan.loss < plan.loss_no_pruning  # abundant pool, calibrated metric: pruning pays
    assert plan.training_flops + plan.scoring_flops == pytest.approx(c)
    assert plan.epochs == pytest.approx(plan.tokens_d / plan.kept_tokens)


def test_scarce_pool_does_not_prune_hard():
    plan = pruning.plan_pruning(1e22, 1e10, "perplexity_proxy", LAW)
    assert plan.abundance < 1 and plan.strategy in ("easy", "none")


def test_bad_inputs():
    with pytest.raises(PlannerError, match="more than the"):
        pruning.plan_pruning(1e20, 1e13, "influence_lora", LAW)
    with pytest.raises(PlannerError, match="min-keep"):
        pruning.plan_pruning(1e22, 1e12, "dedup_minhash", LAW)
    with pytest.raises(PlannerError, match="positive"):
        pruning.plan_pruning(-1e22, 1e12, "random", LAW)
    with pytest.raises(PlannerError):
        pruning.plan_pruning(1e22, 1e12, "random", scaling.load_law("kaplan2020"))


def test_dedup_with_given_duplicate_share_removes_exactly_the_duplicates():
    plan = pruning.plan_pruning(1e22, 2e12, "dedup_minhash", LAW, min_keep_fraction=0.9)
    assert plan.keep_fraction == pytest.approx(0.9) and plan.strategy == "hard"
    assert plan.loss < plan.loss_no_pruning


def test_erfinv_without_scipy_matches_scipy():
    """The loss layer's own erf inverse agrees with scipy.special to float64 rounding."""
    from scipy.special import erf as scipy_erf
    from scipy.special import erfinv as scipy_erfinv

    from planner.loss.special import erf, erfinv

    y = np.concatenate([np.linspace(-0.999999, 0.999999, 4001), [0.0, 1e-300, 1 - 1e-12, -(1 - 1e-12)]])
    expected = scipy_erfinv(y)
    assert np.max(np.abs(erfinv(y) - expected) / np.maximum(1.0, np.abs(expected))) < 1e-12
    assert np.max(np.abs(erf(y) - scipy_erf(y))) < 1e-15
    assert erfinv(1.0) == np.inf and erfinv(-1.0) == -np.inf and np.isnan(erfinv(1.5))
