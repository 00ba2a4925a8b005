"""Accuracy and speed of the loss, data and stopping models (issue 4). Prints markdown tables.

    python benchmarks/bench_loss.py            # everything but the slow full-grid refit (~1-2 min)
    python benchmarks/bench_loss.py --full     # also every one of Hoffmann's 4500 starts run to convergence

Sections: fit recovery on synthetic runs from a known law; the Chinchilla refit of Besiroglu et al.
(reads ../shared/data/chinchilla_svg_extracted_data.csv beside the repository, skipped if absent);
agreement and speed of the three compute-optimal solvers; the stopping-rule backtest; data
selection plans. Results are recorded in benchmarks/loss.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from planner.loss import fitting, pruning, scaling, stopping

ROOT = Path(__file__).resolve().parents[1]
CHINCHILLA_CSV = ROOT.parent / "shared" / "data" / "chinchilla_svg_extracted_data.csv"
TRUE = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
NAMES = ("E", "A", "B", "alpha", "beta")


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def fit_recovery(seeds: int = 5) -> str:
    rows = []
    for sigma in (0.0, 0.002, 0.005, 0.01):
        err = {k: [] for k in NAMES}
        covered, total, secs = 0, 0, []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            n = np.repeat(np.geomspace(3e7, 1e10, 10), 8)
            d = np.tile(np.geomspace(5e8, 5e11, 8), 10)
            loss = scaling.chinchilla_loss(n, d, **TRUE) * np.exp(rng.normal(0.0, sigma, n.size))
            t0 = time.perf_counter()
            res = scaling.fit_scaling_law(n, d, loss, num_bootstrap=100, seed=seed)
            secs.append(time.perf_counter() - t0)
            for k in NAMES:
                v = getattr(res, k)
                err[k].append(abs(v - TRUE[k]) / (TRUE[k] if k in ("A", "B") else 1.0))
                lo, hi = res.intervals[k]
                covered += lo <= TRUE[k] <= hi
                total += 1
        rows.append({
            "noise (log-loss sd)": sigma,
            "abs err E": f"{np.mean(err['E']):.4f}",
            "abs err alpha": f"{np.mean(err['alpha']):.4f}",
            "abs err beta": f"{np.mean(err['beta']):.4f}",
            "rel err A": f"{np.mean(err['A']):.1%}",
            "rel err B": f"{np.mean(err['B']):.1%}",
            "95% interval coverage": f"{covered}/{total}" if sigma > 0 else "- (zero width)",
            "fit + 100 bootstraps (s)": f"{np.mean(secs):.1f}",
        })
    return table(rows)


def chinchilla_refit(full: bool) -> str:
    if not CHINCHILLA_CSV.exists():
        return f"(skipped: {CHINCHILLA_CSV} is absent)"
    import pandas as pd

    frame = pd.read_csv(CHINCHILLA_CSV)
    n = frame["Model Size"].to_numpy()
    d = frame["Training FLOP"].to_numpy() / (6.0 * n)
    loss = frame["loss"].to_numpy()
    rows = []
    pub = scaling.load_law("besiroglu2024")
    rows.append({"fit": "Besiroglu et al. 2024, published (Eq. 4)", "E": pub.E, "A": pub.A, "B": pub.B, "alpha": pub.alpha,
                 "beta": pub.beta, "Huber objective": "-", "time (s)": "-"})
    rows.append({"fit": "their notebook, plain Huber, 4500-start grid", "E": 1.8172, "A": 477.84, "B": 2143.86, "alpha": 0.34731,
                 "beta": 0.36718, "Huber objective": "0.00101827403", "time (s)": "-"})
    variants = [("planner, coarse grid (243 starts, screened)", "coarse")]
    variants.append(("planner, Hoffmann grid (4500 starts, screened)", "hoffmann"))
    for label, grid in variants:
        t0 = time.perf_counter()
        f = scaling.ScalingLawFitter(grid=grid, exclude_highest_loss=5, num_bootstrap=0).fit(n, d, loss)
        dt = time.perf_counter() - t0
        p = f.params_
        rows.append({"fit": label, **{k: f"{p[k]:.5g}" for k in NAMES}, "Huber objective": f"{f.objective_:.11f}", "time (s)": f"{dt:.1f}"})
    if full:
        keep = loss < np.sort(loss)[-5]
        t0 = time.perf_counter()
        with fitting.single_threaded_blas():
            theta, obj = fitting.multistart_lse_fit(np.log(n[keep]), np.log(d[keep]), np.log(loss[keep]), 1e-3,
                                                    fitting.grid_starts(fitting.HOFFMANN_GRID))
        dt = time.perf_counter() - t0
        p = dict(zip(("A", "B", "E"), np.exp(theta[:3]), strict=True)) | {"alpha": theta[3], "beta": theta[4]}
        rows.append({"fit": "planner, Hoffmann grid, every start to convergence", **{k: f"{p[k]:.5g}" for k in NAMES},
                     "Huber objective": f"{obj:.11f}", "time (s)": f"{dt:.1f}"})
    hof = scaling.load_law("hoffmann2022")
    rows.append({"fit": "Hoffmann et al. 2022, Eq. (10), for contrast", "E": hof.E, "A": hof.A, "B": hof.B, "alpha": hof.alpha,
                 "beta": hof.beta, "Huber objective": "-", "time (s)": "-"})
    out = table(rows)
    t0 = time.perf_counter()
    res = scaling.fit_scaling_law(n, d, loss, exclude_highest_loss=5, num_bootstrap=400, seed=42)
    dt = time.perf_counter() - t0
    theirs = {"E": (1.769, 1.871), "A": (285.214, 743.626), "B": (1042.357, 5810.344), "alpha": (0.317, 0.373), "beta": (0.331, 0.415)}
    rows = [{"constant": k, "planner 95% interval (400 bootstraps)": f"[{res.intervals[k][0]:.4g}, {res.intervals[k][1]:.4g}]",
             "Besiroglu et al. 95% interval (4000 bootstraps)": f"[{theirs[k][0]:.4g}, {theirs[k][1]:.4g}]"} for k in NAMES]
    return out + f"\n\nBootstrap intervals ({dt:.1f} s):\n\n" + table(rows)


def solvers() -> str:
    rows = []
    for name in ("hoffmann2022", "besiroglu2024", "muennighoff2023"):
        law = scaling.load_law(name)
        dn_gp, dn_grid, dl = 0.0, 0.0, 0.0
        times = {"closed": [], "gp": [], "grid": []}
        for c in np.logspace(18, 26, 9):
            t0 = time.perf_counter()
            cf = scaling.compute_optimal(law, c, method="closed_form")
            times["closed"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gp = scaling.optimal_gp(law, c)
            times["gp"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n_g, _, l_g = scaling.optimal_grid(law, c)
            times["grid"].append(time.perf_counter() - t0)
            dn_gp = max(dn_gp, abs(gp["params_n"] / cf.params_n - 1))
            dn_grid = max(dn_grid, abs(n_g / cf.params_n - 1))
            dl = max(dl, abs(gp["loss"] - cf.loss), abs(l_g - cf.loss))
        rows.append({"law": name, "max rel diff N (GP)": f"{dn_gp:.1e}", "max rel diff N (grid)": f"{dn_grid:.1e}",
                     "max abs diff loss": f"{dl:.1e}",
                     "ms per call closed/GP/grid": "/".join(f"{1e3 * np.median(v):.2g}" for v in times.values())})
    return table(rows)


def stopping_backtest() -> str:
    rng = np.random.default_rng(2024)
    law = scaling.load_law("besiroglu2024")
    t = np.arange(250.0, 50001.0, 250.0)
    curves = {}
    for n in (1.25e8, 4e8, 1.3e9):
        curves[f"besiroglu2024 law, N={n:.3g}, 0.5M tok/step"] = (
            lambda s, n=n: stopping.law_curve(law.E, law.A, law.B, law.alpha, law.beta, n, 5e5, s))
    curves["power E=2.2 A=8 alpha=0.45"] = lambda s: 2.2 + 8.0 * s ** -0.45
    curves["exponential E=2.0 A=1.5 tau=12k"] = lambda s: 2.0 + 1.5 * np.exp(-s / 12000)
    # Mis-specified for every candidate model: two power terms, the slower one dominating late.
    curves["two-term power 2 + 2 t^-0.3 + 40 t^-0.9 (mis-specified)"] = lambda s: 2.0 + 2.0 * s ** -0.3 + 40.0 * s ** -0.9
    rows = []
    for name, curve in curves.items():
        ref = curve(t)
        # lambda = -dL/dt at step 20,000 (central difference): the true stop is at 40% of the curve.
        slope = float(curve(19999.0) - curve(20001.0)) / 2.0
        observed = ref + rng.normal(0.0, 0.003, t.size)
        for r in stopping.backtest({name: (t, observed, ref)}, 1.0, slope, prefix_fractions=(0.1, 0.2, 0.3), num_bootstrap=100):
            rows.append({"curve": name, "prefix": f"{r.prefix_fraction:.0%} (step {r.prefix_step})", "chosen model": r.model,
                         "recommended stop": r.recommended_step, "oracle stop": r.oracle_step,
                         "regret (loss)": f"{r.regret:.2e}", "relative regret": f"{r.relative_regret:.1e}",
                         "oracle in 90% interval (+-1 log step)": "yes" if r.stop_in_interval else "no"})
    return table(rows)


def pruning_plans() -> str:
    law = scaling.load_law("besiroglu2024")
    rows = []
    for pool in (1e10, 1e11, 1e12, 1e13):
        for method in ("random", "perplexity_proxy", "semdedup", "el2n_proxy"):
            p = pruning.plan_pruning(1e22, pool, method, law)
            rows.append({"pool (tokens)": f"{pool:.0e}", "method": method, "theta (deg)": f"{p.theta_deg:.1f}",
                         "keep": f"{p.keep_fraction:.3g} ({p.strategy})", "epochs": f"{p.epochs:.2f}",
                         "N": f"{p.params_n:.3g}", "loss": f"{p.loss:.4f}", "no pruning": f"{p.loss_no_pruning:.4f}",
                         "scoring share": f"{p.scoring_share:.1%}", "rho": f"{p.abundance:.2f}"})
    return table(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also run all 4500 starts to convergence (minutes)")
    args = ap.parse_args()
    for title, fn in (
        ("Fit recovery: 80 runs (10 sizes x 8 token counts) from the besiroglu2024 law, 5 seeds", fit_recovery),
        ("Chinchilla refit (240 runs, five highest-loss excluded) against the published constants", lambda: chinchilla_refit(args.full)),
        ("Compute-optimal allocation: closed form vs cvxpy GP vs numpy grid, C = 1e18 ... 1e26", solvers),
        ("Stopping backtest: 200 logged points, 0.3% noise, lambda puts the true stop at step 20000", stopping_backtest),
        ("Data selection at C = 1e22 FLOP (besiroglu2024 law)", pruning_plans),
    ):
        t0 = time.perf_counter()
        body = fn()
        print(f"## {title}\n\n{body}\n\n({time.perf_counter() - t0:.1f} s)\n", flush=True)


if __name__ == "__main__":
    main()
