"""Reading the loss log of a run: a CSV of (step, loss) or a Hugging Face ``trainer_state.json``.

Either way the result is the steps and losses as float arrays plus the number of rows at step 0
that were left out (the curve families need t > 0). Any other missing, NaN, non-numeric or
negative value is an error naming the file and the row, never silently dropped. CSV files go
through ``planner.loss.csv_files`` (pandas, imported only when a CSV is read).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from planner.errors import PlannerError, read_user_text, user_file
from planner.loss.csv_files import numeric_columns, read_csv_frame


def read_loss_log(path: str | Path, metric: str = "loss") -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, losses, number of rows excluded) from a CSV (columns step, loss) or an HF trainer_state.json.

    trainer_state.json: the entries of ``log_history`` that carry both ``step`` and ``metric``
    (``loss`` is the training loss the Trainer logs every ``logging_steps``; ``eval_loss`` also
    works). Rows at step 0 (the loss before any update) are excluded, and counted, because the
    curve models need t > 0. Missing, NaN or non-numeric values are errors, never dropped.
    """
    path = user_file(path, "loss log")
    if path.suffix == ".json":
        steps, losses = _trainer_state_series(path, metric)
    else:
        steps, losses = numeric_columns(read_csv_frame(path, ("step", metric)), path, ("step", metric))
    bad = ~(np.isfinite(steps) & np.isfinite(losses))
    if bad.any():
        raise PlannerError(f"{path}: missing, NaN or non-numeric value at row {int(np.argmax(bad)) + 1}")
    zero = steps <= 0
    if np.any(steps < 0):
        raise PlannerError(f"{path}: negative step at row {int(np.argmax(steps < 0)) + 1}")
    _check_losses(path, metric, losses)
    return steps[~zero], losses[~zero], int(zero.sum())


LARGEST_LOSS = 1e9
"""No training loss (cross-entropy, or even a perplexity) comes near this; a log that does is the
wrong column or the wrong file."""


def _check_losses(path: Path, metric: str, losses: np.ndarray) -> None:
    """A loss is non-negative (cross-entropy is) and of a sane size: say which row is not."""
    bad = (losses < 0) | (losses > LARGEST_LOSS)
    if bad.any():
        row = int(np.argmax(bad))
        raise PlannerError(
            f"{path}: {metric} at row {row + 1} is {losses[row]:g}; a training loss lies between 0 and {LARGEST_LOSS:g} "
            f"(cross-entropy is never negative): is this the right file and column (--metric)?")


def _trainer_state_series(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the ``log_history`` entries that carry both ``step`` and ``metric``; None becomes NaN."""
    try:
        state = json.loads(read_user_text(path, "trainer_state.json"))
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise PlannerError(f"{path} has no log_history list (is it a Hugging Face trainer_state.json?)")
    rows = [(e["step"], e[metric]) for e in history if isinstance(e, dict) and "step" in e and metric in e]
    if not rows:
        raise PlannerError(f"{path}: no log_history entry has both 'step' and {metric!r}")
    for index, (step, value) in enumerate(rows):
        for key, number in (("step", step), (metric, value)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
                raise PlannerError(f"{path}: log_history entry {index + 1} with {metric!r}: {key} is {number!r}, not a number")
    steps = np.array([r[0] if r[0] is not None else np.nan for r in rows], dtype=np.float64)
    losses = np.array([r[1] if r[1] is not None else np.nan for r in rows], dtype=np.float64)
    return steps, losses
