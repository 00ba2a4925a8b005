"""The set-up table: one row per set-up x micro-batch x LoRA rank, as columns of numpy arrays.

What ``planner.search.setups`` produces and the scoring reads: a small column store (a dict of
equal-length arrays) with the few operations the search needs, row selection, concatenation, one
row as Python values and the reduction to the fastest set-up of a group. It keeps pandas out of
the planning path; ``to_frame`` lays it out as a DataFrame for tests and notebooks.
"""

from __future__ import annotations

import numpy as np

COLUMNS = ("model", "method", "lora_rank", "precision", "optimizer", "stack", "variant", "checkpointing", "num_gpus", "zero",
           "tensor_parallel", "pipeline_parallel", "sequence_parallel", "micro_batch", "grad_accum", "peak_bytes", "step_time_s", "tokens_per_step",
           "tokens_per_s", "mfu", "work_ratio")
"""Field names (an ``Estimate`` / ``Candidate`` field is also a column name)."""


class SetupTable:
    """Equal-length numpy columns named ``COLUMNS``; ``table[name]`` is a column."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.columns = columns

    @classmethod
    def empty_table(cls) -> SetupTable:
        return cls({name: np.empty(0, dtype=object) for name in COLUMNS})

    @classmethod
    def concat(cls, tables: list[SetupTable]) -> SetupTable:
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls.empty_table()
        return cls({name: np.concatenate([t.columns[name] for t in tables]) for name in tables[0].columns})

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def empty(self) -> bool:
        return len(self) == 0

    def take(self, rows) -> SetupTable:
        """The rows at ``rows`` (a boolean mask or integer indices), in that order."""
        return SetupTable({name: column[rows] for name, column in self.columns.items()})

    def with_column(self, name: str, values: np.ndarray) -> SetupTable:
        return SetupTable({**self.columns, name: values})

    def row(self, i: int) -> dict:
        """Row ``i`` as Python values."""
        return {name: column[i].item() if hasattr(column[i], "item") else column[i] for name, column in self.columns.items()}

    def to_frame(self):
        """The table as a pandas DataFrame (imported only here)."""
        import pandas as pd

        return pd.DataFrame(self.columns)


def fastest_per_group(table: SetupTable, keys: tuple[str, ...], value: str) -> SetupTable:
    """For each group of equal ``keys``, its row of largest ``value`` (the first among equals),
    groups in the order of their first row: pandas' ``groupby(keys, sort=False)[value].idxmax()``."""
    n = len(table)
    if n == 0:
        return table
    group = np.zeros(n, dtype=np.int64)
    for key in keys:
        _, inverse = np.unique(table[key], return_inverse=True)
        _, group = np.unique(group * (int(inverse.max()) + 1) + inverse.reshape(-1), return_inverse=True)
        group = group.reshape(-1)
    order = np.lexsort((np.arange(n), -np.asarray(table[value], dtype=np.float64), group))
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    best = order[starts]  # one per group, groups in sorted-code order
    first_row = np.full(group.max() + 1, n)
    np.minimum.at(first_row, group, np.arange(n))
    return table.take(best[np.argsort(first_row[group[best]], kind="stable")])
