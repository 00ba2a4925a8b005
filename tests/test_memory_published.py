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


B200_ROWS = {"torchao_float8_training_doc-008", "torchao_float8_training_doc-009", "torchao_float8_training_doc-012"}
"""The same torchtitan set-up (Llama-3-8B, 8 GPUs, 1 x 8192, compiled, op-SAC) measured 47.65 GiB reserved on
H100, 39.09 on MI300X and 33.71 on B200 in one document. On B200 that torchtitan (6fc499f) ran SDPA's cuDNN
backend, which its op-SAC policy did not save (torchtitan PRs #1196 and #2095): a set-up torchtitan 0.3.0,
the one priced, no longer runs; listed as not expressible
(``bench_memory_published.CUDNN_ATTENTION_RECOMPUTED``). Priced as 0.3.0 they read +19%; without the
attention output (2.0 GiB) about +13%, which nothing sourced explains further."""


def test_rows_with_a_stated_counter_meet_the_targets(compared):
    """Median |error| <= 5% and max <= 15% over every row whose source says which counter it reports."""
    rows, _ = compared
    stated = [c for c in rows if c.metric != "unknown"]
    assert len(stated) >= 16 and {c.source_id for c in stated} >= {"torchtune_readme_2024_11", "torchtitan_bench_2024_12"}
    errors = {c.row_id: abs(c.error) for c in stated}
    assert np.median(list(errors.values())) <= 0.05
    assert max(errors.values()) <= 0.15


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
    assert all(abs(c.error) <= 0.05 for c in fp8.values())


def test_b200_rows_ran_a_torchtitan_that_recomputed_cudnn_attention(compared):
    """Listed with their reason, not compared: the reason names the torchtitan change."""
    _, skipped = compared
    reasons = dict(skipped)
    assert B200_ROWS <= set(reasons) and all("cuDNN attention" in reasons[row] for row in B200_ROWS)


def test_a_technique_the_planner_does_not_price_is_not_expressible(bench):
    row = pd.read_csv(bench.CSV).set_index("id", drop=False).loc["torchtitan_bench_2024_12-003"].copy()
    row["stack"] = "torchtune"
    with pytest.raises(bench.Unexpressible, match="fp8"):
        bench.setup_for(row)
