"""Reading the user's CSV files: the runs of a scaling fit and the loss log of a run.

Both readers (:func:`planner.loss.scaling.fit.read_runs_csv`, :func:`planner.loss.stopping.logs.read_loss_log`)
go through these two steps so that a missing file, an empty one, one that is not CSV, a missing
column or a header without rows fails the same way, naming the file and the columns it should
have. Column names are matched case- and space-insensitively; a non-numeric cell becomes NaN here
and is reported by the caller with its row. pandas is imported only when a file is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from planner.errors import PlannerError, user_file


def read_csv_frame(path: str | Path, expected: tuple[str, ...]):
    """The file as a pandas DataFrame with stripped, lower-case column names.

    ``expected`` names the columns the caller needs; it is only quoted in the error messages.
    """
    import pandas as pd

    path = user_file(path, "CSV")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise PlannerError(f"{path} is empty; expected columns {', '.join(expected)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PlannerError(f"{path} is not a readable CSV ({str(exc).splitlines()[0]}); expected columns "
                           f"{', '.join(expected)}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame


def numeric_columns(frame, path: str | Path, names: tuple[str, ...]) -> list[np.ndarray]:
    """The named columns as float arrays (NaN where a cell is not a number); every one must exist and have rows."""
    import pandas as pd

    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise PlannerError(f"{path} lacks column(s) {', '.join(missing)}; expected {', '.join(names)} (found {', '.join(frame.columns) or 'none'})")
    if frame.empty:
        raise PlannerError(f"{path} has a header but no rows")
    return [pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64) for c in names]
