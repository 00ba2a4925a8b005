"""Progress bars (``planner.io.progress``): drawn on stderr only when it is a terminal and not
under ``--json``; when drawn they advance to their total; otherwise nothing extra reaches stderr."""

from __future__ import annotations

import io
import json
import sys

import pytest

from planner.io.progress import NULL_BAR, print_line, progress_bar


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what was written."""

    def isatty(self) -> bool:
        return True


def _stderr(monkeypatch, stream):
    """Replace stderr inside the test body (pytest restores its own capture between the phases
    of a test, so a fixture cannot do it)."""
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _recording(monkeypatch, module: str) -> list:
    """Every bar that ``module`` asks ``progress_bar`` for, in order."""
    bars = []

    def recorded(*args, **kwargs):
        bar = progress_bar(*args, **kwargs)
        bars.append(bar)
        return bar

    monkeypatch.setattr(f"{module}.progress_bar", recorded)
    return bars


def test_bar_advances_on_a_terminal(monkeypatch):
    terminal = _stderr(monkeypatch, _Terminal())
    with progress_bar(5, "work", enabled=True, unit="step") as bar:
        assert bar is not NULL_BAR
        for _ in range(3):
            bar.update()
        bar.refresh()
        assert bar.n == 3
    assert "work" in terminal.getvalue() and "3/5" in terminal.getvalue()


def test_no_bar_when_disabled_or_not_a_terminal(monkeypatch):
    terminal = _stderr(monkeypatch, _Terminal())
    with progress_bar(5, "work", enabled=False) as bar:
        bar.update()
        bar.set_postfix_str("x")
    assert bar is NULL_BAR and terminal.getvalue() == ""
    pipe = _stderr(monkeypatch, io.StringIO())
    with progress_bar(5, "work", enabled=True) as bar:
        bar.update(2)
    assert bar is NULL_BAR and pipe.getvalue() == ""


def test_print_line_is_a_plain_line_and_clears_a_drawn_bar(monkeypatch):
    pipe = _stderr(monkeypatch, io.StringIO())
    print_line("hello")
    assert pipe.getvalue() == "hello\n"
    terminal = _stderr(monkeypatch, _Terminal())
    with progress_bar(2, "work", enabled=True) as bar:
        bar.update()
        print_line("between")
    assert "between\n" in terminal.getvalue()


# -- the verbs -----------------------------------------------------------------------------------------

TINY = dict(
    model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


@pytest.fixture
def tiny_path(tmp_path) -> str:
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.mark.oracle
def test_simulate_json_writes_nothing_to_stderr_and_text_shows_the_bar(tiny_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    terminal = _stderr(monkeypatch, _Terminal())
    from planner.cli import main

    bars = _recording(monkeypatch, "planner.truth.trace")
    assert main(["simulate", "--model", tiny_path, "--seq-len", "32", "--precision", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["oracle"]["peak_bytes"] > 0
    assert terminal.getvalue() == "" and bars == [NULL_BAR]

    assert main(["simulate", "--model", tiny_path, "--seq-len", "32", "--precision", "fp32", "--grad-accum", "2"]) == 0
    (bar,) = bars[1:]
    assert bar.total == 2 * (2 * 2 + 1) + 2  # two steps of 2 x (forward, backward) + optimizer; FLOPs: fwd, bwd
    assert bar.n == bar.total
    assert "trace" in terminal.getvalue()
    assert "peak" in capsys.readouterr().out


@pytest.mark.oracle
def test_calibration_grid_bars_advance_and_stay_silent_when_off(monkeypatch):
    pytest.importorskip("transformers")
    terminal = _stderr(monkeypatch, _Terminal())
    import torch

    from planner.specs.setup import TrainingSetup
    from planner.truth.calibration_grid import GridPoint
    from planner.truth.profile import run_grid

    points = [GridPoint(TrainingSetup(precision="fp32", micro_batch=1, seq_len=s, dropout=0.0), 1) for s in (16, 32)]
    bars = _recording(monkeypatch, "planner.truth.profile")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_grid(TINY, "tiny", points, "cpu", timed_steps=2, show_progress=False)
        assert terminal.getvalue() == "" and bars == [NULL_BAR, NULL_BAR]
        lines: list[str] = []
        measured = run_grid(TINY, "tiny", points, "cpu", timed_steps=2, progress=lines.append, show_progress=True)
    finally:
        torch.set_num_threads(threads)
    assert [m.status for m in measured] == ["ok", "ok"]
    over_points, over_steps = bars[2:]
    assert (over_points.n, over_points.total) == (2, 2)
    assert (over_steps.n, over_steps.total) == (4, 4)  # 2 rounds x 2 points
    assert "calibrate" in terminal.getvalue()
    assert lines[0] == "[1/2] full fp32 L1 b1s16"  # the text lines are the same with or without bars


@pytest.mark.oracle
def test_calibrate_json_writes_only_its_text_lines(tiny_path, monkeypatch, tmp_path, capsys):
    """Under --json the stderr of `planner calibrate` is the progress lines it always wrote: no bar."""
    pytest.importorskip("transformers")
    terminal = _stderr(monkeypatch, _Terminal())
    from planner.cli import main
    from planner.specs.setup import TrainingSetup
    from planner.truth.calibration_grid import GridPoint

    def small_grid(device, num_layers, precision=None, quick=False):
        return [GridPoint(TrainingSetup(precision="fp32", micro_batch=b, seq_len=s, dropout=0.0), num_layers)
                for b, s in ((1, 16), (1, 32), (2, 16), (2, 32), (1, 64), (2, 64))]

    monkeypatch.setattr("planner.truth.profile.default_grid", small_grid)
    monkeypatch.setattr("planner.truth.device_facts.measure_peaks",
                        lambda device: {"peak_flops": {"fp32": 1e11, "bf16": 1e10}, "bandwidth_bytes_per_s": 1e10})
    bars = _recording(monkeypatch, "planner.truth.profile")
    out = tmp_path / "profile.json"
    assert main(["calibrate", "--model", tiny_path, "--device", "cpu", "--layers", "1", "--steps", "2",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["measurements"]
    err = terminal.getvalue()
    assert bars == [NULL_BAR, NULL_BAR] and "\r" not in err
    assert err.splitlines()[-1] == f"profile written to {out}"
