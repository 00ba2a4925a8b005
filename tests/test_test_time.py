"""Test-time compute (Brown et al. 2024): the published curves, the exponentiated power law
extrapolated past what it was fitted on, pass@k, the model-or-samples choice, `planner sample`."""

from __future__ import annotations

import csv
import json
import math
from importlib.resources import files

import numpy as np
import pytest

from planner.cli import main
from planner.errors import PlannerError
from planner.loss.test_time import (
    choose_model_and_samples,
    coverage,
    fit_coverage,
    flops_per_sample,
    load_coverage_laws,
    pass_at_k,
    samples_for_coverage,
)


def _curves() -> dict:
    path = files("models_catalog").joinpath("test_time", "brown2024_coverage.csv")
    out: dict = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            entry = out.setdefault(f"{r['model'].lower().replace(' ', '-')}-{r['benchmark']}", {"n": int(r["num_problems"]), "k": [], "c": []})
            entry["k"].append(float(r["k"]))
            entry["c"].append(float(r["coverage"]))
    return {name: (np.array(v["k"]), np.array(v["c"]), v["n"]) for name, v in out.items()}


def test_data_are_the_published_curve():
    """Brown et al. sec. 2: with Gemma-2B on CodeContests 'coverage increases from 0.02% with one
    sample to 7.1% with 10,000'; to the printed digits."""
    k, c, n = _curves()["gemma-2b-codecontests"]
    assert n == 140
    assert 0.00015 <= c[k == 1][0] < 0.00025
    assert 0.0705 <= c[k == 10000][0] < 0.0715


@pytest.mark.parametrize("name", sorted(_curves()))
def test_power_law_fitted_to_100_samples_predicts_10000(name):
    """Fit exp(a k^b) to k <= 100 of each published curve and predict k = 10,000, two orders of
    magnitude past the fit. Tolerance: two binomial standard errors of the measured coverage,
    sqrt(c (1 - c) / problems), the precision 128-140 problems allow (4-9 points)."""
    k, c, n = _curves()[name]
    sel = k <= 100
    law = fit_coverage(k[sel], c[sel])
    measured = c[k == 10000][0]
    assert abs(float(law.coverage(10000)) - measured) <= 2 * math.sqrt(measured * (1 - measured) / n)
    assert law.extrapolated(10000) and not law.extrapolated(50)


def test_catalog_constants_reproduce_their_curves():
    laws = load_coverage_laws()
    for name, (k, c, _) in _curves().items():
        law = laws[name]
        rmse = math.sqrt(np.mean((np.log(law.coverage(k)) - np.log(c)) ** 2))
        assert rmse == pytest.approx(law.rmse_log, abs=2e-3)
        assert law.params_n > 0 and law.a < 0 and law.b < 0
    assert laws["pythia-12b-math"].params_n == 11_846_072_320


def test_fit_recovers_a_known_law():
    k = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512], dtype=float)
    law = fit_coverage(k, coverage(k, -3.0, -0.3))
    assert law.a == pytest.approx(-3.0, rel=1e-6) and law.b == pytest.approx(-0.3, rel=1e-6)
    assert law.rmse_log < 1e-9 and law.heldout_rmse_log < 1e-6
    assert samples_for_coverage(float(law.coverage(100)), law.a, law.b) == pytest.approx(100)
    with pytest.raises(PlannerError, match="below 1"):
        fit_coverage([1, 2, 3], [0.1, 0.5, 1.0])
    with pytest.raises(PlannerError, match="3 or more"):
        fit_coverage([1, 2], [0.1, 0.2])


def test_pass_at_k_is_the_combinatorial_estimator():
    """Chen et al. 2021: 1 - C(n-c, k) / C(n, k), checked against math.comb."""
    for n, c, k in ((10, 3, 1), (10, 3, 4), (100, 1, 50), (20, 0, 5), (5, 4, 2)):
        assert float(pass_at_k(n, c, k)) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_bigger_model_or_more_samples():
    laws = load_coverage_laws()
    small, big = laws["llama-3-8b-instruct-codecontests"], laws["llama-3-70b-instruct-codecontests"]
    cost = flops_per_sample([small.params_n, big.params_n], 1000)
    assert cost[1] / cost[0] == pytest.approx(big.params_n / small.params_n)
    budgets = np.array([cost[0] / 2, cost[0] * 2, cost[1] * 3, cost[1] * 1e4])
    choice = choose_model_and_samples([small, big], cost, budgets)
    assert choice.best_model()[0] is None  # nothing affordable
    assert choice.best_model()[1] == small.name  # only the small model affords a sample
    assert np.all(choice.samples[:, 3] == np.floor(budgets[3] / cost))
    # where both are affordable, the pick is the higher coverage at the affordable samples
    both = choice.coverage[:, 2:]
    assert np.all(choice.best[2:] == np.argmax(both, axis=0))
    assert choice.extrapolated[0, 3]  # the 8B's curve stops at 10,000 samples


def test_sample_cli(capsys, tmp_path):
    png = tmp_path / "cov.png"
    code = main(["sample", "--models", "pythia-410m-math,pythia-12b-math", "--budget-flops-per-query", "50T",
                 "--json", "--plot", str(png)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and png.stat().st_size > 0 and out["best_model"] in ("pythia-410m-math", "pythia-12b-math")
    assert out["models"][0]["samples"] == math.floor(50e12 / (2 * 405_334_016 * 512))
    runs = tmp_path / "passk.csv"
    k = [1, 2, 4, 8, 16, 32]
    runs.write_text("model,params,k,coverage\n" + "".join(f"mine,1e9,{x},{float(coverage(x, -2.0, -0.25)):.6f}\n" for x in k))
    code = main(["sample", "--models", "mine,pythia-1b-math", "--budget-usd-per-query", "0.01",
                 "--usd-per-million-tokens", "0.2,0.2", "--pass-at-k", str(runs)])
    assert code == 0 and "best:" in capsys.readouterr().out
    code = main(["sample", "--models", "nope", "--budget-flops-per-query", "1e12"])
    err = capsys.readouterr().err
    assert code == 2 and "no coverage curve" in err and err.count("\n") == 1
    code = main(["sample", "--models", "pythia-1b-math", "--budget-usd-per-query", "1"])
    assert code == 2 and "--usd-per-million-tokens" in capsys.readouterr().err
