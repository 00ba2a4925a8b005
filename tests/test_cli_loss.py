"""`planner scaling fit|optimal`, `planner prune`, `planner stop`: contracts, plots, one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.cli import main
from planner.loss import scaling

ROOT = Path(__file__).resolve().parents[1]
TRUE = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def runs_csv(tmp_path):
    n = np.repeat(np.geomspace(3e7, 1e10, 6), 6)
    d = np.tile(np.geomspace(5e8, 5e11, 6), 6)
    loss = scaling.chinchilla_loss(n, d, **TRUE)
    path = tmp_path / "runs.csv"
    path.write_text("params,tokens,loss\n" + "".join(f"{float(a)!r},{float(b)!r},{float(c)!r}\n" for a, b, c in zip(n, d, loss, strict=True)))
    return path


@pytest.fixture
def log_csv(tmp_path):
    t = np.arange(50, 5001, 50)
    y = 2.2 + 4.0 * t ** -0.4 + np.random.default_rng(0).normal(0, 0.002, t.size)
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n" + "".join(f"{int(a)},{float(b)!r}\n" for a, b in zip(t, y, strict=True)))
    return path


def assert_png(path: Path):
    assert path.exists() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_one_line_error(code, out, err):
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("planner: error:"), err


# ------------------------------------------------------------------ contracts


def test_scaling_fit_json_contract(capsys, runs_csv):
    code, out, _ = run(capsys, "scaling", "fit", str(runs_csv), "--json", "--bootstrap", "10")
    assert code == 0
    result = json.loads(out)
    for k, v in TRUE.items():
        assert result[k] == pytest.approx(v, rel=1e-3), k
    assert set(result["intervals"]) == set(TRUE)


def test_scaling_fit_text_and_plot(capsys, runs_csv, tmp_path):
    png = tmp_path / "fit.png"
    code, out, _ = run(capsys, "scaling", "fit", str(runs_csv), "--bootstrap", "5", "--plot", str(png))
    assert code == 0 and "alpha" in out and "R^2" in out
    assert_png(png)


def test_scaling_optimal_json_matches_closed_form(capsys, tmp_path):
    code, out, _ = run(capsys, "scaling", "optimal", "--compute", "5.76e23", "--law", "hoffmann2022_tex", "--json")
    assert code == 0
    alloc = json.loads(out)
    n, d = scaling.optimal_closed_form(scaling.load_law("hoffmann2022_tex"), 5.76e23)
    assert alloc["params_n"] == pytest.approx(float(n)) and alloc["tokens_d"] == pytest.approx(float(d))
    png = tmp_path / "opt.png"
    code, out, _ = run(capsys, "scaling", "optimal", "--compute", "1e22", "--data-pool", "100B", "--plot", str(png))
    assert code == 0 and "epochs" in out
    assert_png(png)


def test_scaling_optimal_pool_without_repetition(capsys):
    code, out, _ = run(capsys, "scaling", "optimal", "--compute", "1e22", "--data-pool", "50B", "--no-repeat", "--json")
    alloc = json.loads(out)
    assert code == 0 and alloc["tokens_d"] <= 50e9 * (1 + 1e-6) and alloc["epochs"] == pytest.approx(1.0, rel=1e-6)


def test_prune_json_and_plot(capsys, tmp_path):
    png = tmp_path / "prune.png"
    code, out, _ = run(capsys, "prune", "--pool", "2T", "--compute", "1e22", "--method", "perplexity_proxy", "--json", "--plot", str(png))
    assert code == 0
    plan = json.loads(out)
    assert 0 < plan["keep_fraction"] <= 1 and plan["scoring_flops"] == pytest.approx(2 * 125e6 * 2e12)
    assert plan["loss"] <= plan["loss_no_pruning"]
    assert_png(png)
    code, out, _ = run(capsys, "prune", "--pool", "2T", "--compute", "1e22", "--efficiency", "0.5:1.2")
    assert code == 0 and "predicted loss" in out


def test_stop_json_contract_and_plot(capsys, log_csv, tmp_path):
    png = tmp_path / "stop.png"
    code, out, _ = run(capsys, "stop", "--log", str(log_csv), "--cost-per-step", "1", "--threshold", "1e-5",
                       "--json", "--bootstrap", "20", "--plot", str(png))
    assert code == 0
    rec = json.loads(out)
    assert isinstance(rec["stop_step"], int) and rec["stop_step"] >= 5000
    # The fitted power law's analytic crossing: -dL/dt = alpha A t^-(alpha+1) = lambda.
    p = rec["params"]
    assert rec["model"] == "power"
    assert rec["stop_step"] == pytest.approx((p["alpha"] * p["A"] / 1e-5) ** (1 / (p["alpha"] + 1)), abs=1)
    assert_png(png)


def test_stop_from_trainer_state_and_budget(capsys, tmp_path):
    t = np.arange(10, 2001, 10)
    history = [{"step": int(s), "loss": float(3.0 + 10 * s ** -0.5), "learning_rate": 1e-4} for s in t]
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 2000, "log_history": history}))
    code, out, _ = run(capsys, "stop", "--log", str(path), "--cost-per-step", "1e15", "--budget-flops", "1e21",
                       "--bootstrap", "0", "--json")
    assert code == 0
    rec = json.loads(out)
    assert rec["threshold"] == pytest.approx(float(scaling.compute_shadow_price(scaling.load_law("besiroglu2024"), 1e21)))
    code, out, _ = run(capsys, "stop", "--log", str(path), "--cost-per-step", "1", "--threshold", "1e-6", "--max-steps", "3000", "--bootstrap", "0")
    assert code == 0 and "step" in out


# ------------------------------------------------------------------ progress: a bar on a terminal, silent under --json


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("verb", ["fit", "stop"])
def test_bootstrap_bar_on_a_terminal_and_clean_json(capsys, monkeypatch, runs_csv, log_csv, verb):
    from planner.io import progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # in the test body: pytest resets its capture between phases
    bars, real = [], progress.progress_bar

    def recorded(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr("planner.io.progress.progress_bar", recorded)
    argv = (["scaling", "fit", str(runs_csv)] if verb == "fit" else
            ["stop", "--log", str(log_csv), "--cost-per-step", "1", "--threshold", "1e-5"]) + ["--bootstrap", "12"]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0 and json.loads(out)  # stdout is one JSON document
    assert terminal.getvalue() == "" and bars == [progress.NULL_BAR]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and not out.lstrip().startswith("{")
    (bar,) = bars[1:]
    assert (bar.n, bar.total) == (12, 12)  # one step per bootstrap replicate
    assert "bootstrap" in terminal.getvalue()


# ------------------------------------------------------------------ bad input: one line, exit 2


@pytest.mark.parametrize(
    "content,verb",
    [
        ("", "fit"),  # empty file
        ("params,tokens,loss\n1e9,1e10,nan\n2e9,2e10,2.3\n", "fit"),  # NaN
        ("params,loss\n1e9,2.5\n", "fit"),  # missing column
        ("params,tokens,loss\n1e9,1e10,2.5\n2e9,2e10,2.4\n3e9,3e10,2.3\n", "fit"),  # too few points
        ("", "stop"),
        ("step,loss\n1,2.0\n2,nan\n", "stop"),
        ("step,value\n1,2.0\n", "stop"),
        ("step,loss\n1,3.0\n2,2.9\n3,2.8\n", "stop"),
    ],
)
def test_bad_files_give_one_line_and_exit_2(capsys, tmp_path, content, verb):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    argv = ["scaling", "fit", str(path)] if verb == "fit" else ["stop", "--log", str(path), "--cost-per-step", "1", "--threshold", "1e-5"]
    assert_one_line_error(*run(capsys, *argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["scaling", "optimal", "--compute=-1e22"],
        ["scaling", "optimal", "--compute", "lots"],
        ["scaling", "optimal", "--compute", "1e22", "--law", "nope"],
        ["scaling", "optimal", "--compute", "1e22", "--no-repeat"],
        ["prune", "--pool", "1T", "--compute=-5e21"],
        ["prune", "--pool", "10T", "--compute", "1e20", "--method", "influence_lora"],
        ["prune", "--pool", "1T", "--compute", "1e22", "--method", "dedup_minhash"],
        ["stop", "--log", "/nonexistent/log.csv", "--cost-per-step", "1", "--threshold", "1e-5"],
        ["stop", "--log", "x.csv", "--cost-per-step=-1", "--threshold", "1e-5"],
        ["scaling", "optimal", "--compute", "1e22", "--plot", "out.pdf"],
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, argv):
    assert_one_line_error(*run(capsys, *argv))


def test_subprocess_exit_codes(tmp_path, log_csv):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    bad = subprocess.run([sys.executable, "-m", "planner.cli", "stop", "--log", str(empty), "--cost-per-step", "1", "--threshold", "1e-5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("planner: error:")
    good = subprocess.run([sys.executable, "-m", "planner.cli", "stop", "--log", str(log_csv), "--cost-per-step", "1",
                           "--threshold", "1e-5", "--json", "--bootstrap", "10"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "stop_step" in json.loads(good.stdout)
