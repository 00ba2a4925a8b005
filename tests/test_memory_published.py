"""Predicted peak memory against peak memory published for real runs on real GPUs (issue 10).

The rows are ``models_catalog/measurements/memory.csv``; the mapping and the comparison are
``benchmarks/bench_memory_published.py`` (its table is in ``benchmarks/README.md``). No constant of
the memory model is fitted on these rows.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_memory_published.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory_published", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compared(bench):
    return bench.compare_all(pd.read_csv(bench.CSV))


KNOWN_MISSES = {"torchao_float8_training_doc-008", "torchao_float8_training_doc-009", "torchao_float8_training_doc-012"}
"""The same torchtitan set-up (Llama-3-8B, 8 GPUs, 1 x 8192, compiled) measured 47.65 GiB reserved on
H100, 39.09 on MI300X and 33.71 on B200 in one document. H100 ran a torchtitan older than PR #1033
(eager loss; 47.03 predicted), MI300X and B200 torchtitan commits of August 2025 that compile the
loss (``loss_impl="compiled"``; 40.03 predicted: MI300X +2.4%; Trainy's H200 runs with a June 2025
torchtitan agree within 2.2%). B200 (bf16, fp8 tensorwise and rowwise, 33.4-33.7 GiB) stays +19% with
nothing sourced to explain it (the two August commits differ in nothing memory-related). Listed, not fitted."""


def test_rows_with_a_stated_counter_meet_the_targets(compared):
    """Median |error| <= 5% over every row whose source says which counter it reports; max <= 15%
    everywhere but the unexplained rows above, which stay within 50% (a new miss fails here)."""
    rows, _ = compared
    stated = [c for c in rows if c.metric != "unknown"]
    assert len(stated) >= 16 and {c.source_id for c in stated} >= {"torchtune_readme_2024_11", "torchtitan_bench_2024_12"}
    errors = {c.row_id: abs(c.error) for c in stated}
    assert np.median(list(errors.values())) <= 0.05
    assert max(e for row, e in errors.items() if row not in KNOWN_MISSES) <= 0.15
    assert {row for row, e in errors.items() if e > 0.15} <= KNOWN_MISSES
    assert all(errors[row] < 0.5 for row in KNOWN_MISSES & set(errors))


def test_every_published_row_is_compared_or_has_a_reason(compared, bench):
    rows, skipped = compared
    table = pd.read_csv(bench.CSV)
    assert len(rows) + len(skipped) == len(table)
    assert all(reason for _, reason in skipped)
    # stacks and techniques the memory model does not price are listed, never forced onto other numbers
    assert any(reason == "stack unsloth not priced" for _, reason in skipped)
    assert any("fp8" in reason for _, reason in skipped)  # fp8 weight all-gather is not priced


def test_float8_rows_are_compared(compared):
    """torchao float8 rows that torchtitan's rowwise converter and op-SAC express are compared."""
    rows, _ = compared
    fp8 = {c.row_id: c for c in rows if "fp8" in c.label}
    assert {"torchtitan_bench_2024_12-003", "torchao_float8_training_doc-003", "torchao_float8_training_doc-007",
            "torchao_float8_training_doc-005", "torchtitan_bench_trainy_h200-001"} <= set(fp8)
    assert all(abs(c.error) <= 0.05 for row, c in fp8.items() if row not in KNOWN_MISSES)


def test_a_technique_the_planner_does_not_price_is_not_expressible(bench):
    row = pd.read_csv(bench.CSV).set_index("id", drop=False).loc["torchtitan_bench_2024_12-003"].copy()
    row["stack"] = "torchtune"
    with pytest.raises(bench.Unexpressible, match="fp8"):
        bench.setup_for(row)
