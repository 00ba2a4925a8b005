"""The fixes offered for a set-up that does not fit (``planner.search.fit.cheapest_fixes``): each is one
change that makes *that* set-up fit, at the micro-batch it pinned (QA of issue 11, item 6)."""

from __future__ import annotations

import json
import re

from planner.cli import main
from planner.search.fit import cheapest_fixes, peak_allocated_bytes, usable_allocated_bytes
from planner.specs.catalog import load_gpu, load_spec
from planner.specs.setup import TrainingSetup

BUDGET = ["--data-pool", "1B", "--budget-usd", "500"]


def _compare(capsys, *argv: str) -> dict:
    """The one row of ``planner compare ARGV --json``."""
    code = main(["compare", *argv, *BUDGET, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (row,) = json.loads(out.out)["rows"]
    return row


def _relax(reason: str) -> list[str]:
    """The fixes a shortfall names after "relax: "."""
    assert "relax: " in reason, reason
    return reason.split("relax: ", 1)[1].split("; ")


def _number(fixes: list[str], pattern: str) -> int | None:
    hits = [int(m.group(1)) for f in fixes if (m := re.fullmatch(pattern, f))]
    assert len(hits) <= 1, fixes
    return hits[0] if hits else None


def test_qa_case_fixes_are_computed_at_the_pinned_micro_batch(capsys):
    """The QA command: 8 x H100, full fine-tuning pinned at micro-batch 64 (231 GiB per GPU). It offered
    "shorter sequences: up to 4096 tokens" (the run uses 2048) and "a larger GPU: t4" (16 GB, no bf16),
    both priced at micro-batch 1. Now the micro-batch is named, and each fix makes the run fit."""
    row = _compare(capsys, "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--num-gpus", "8",
                   "--alloc", "x:method=full,zero=0,micro_batch=64")
    assert not row["feasible"] and "micro-batch 64" in row["reason"]
    fixes = _relax(row["reason"])
    assert not any("t4" in f for f in fixes), fixes
    h100 = load_gpu("h100-sxm")
    for fix in fixes:
        if fix.startswith("a larger GPU: "):
            gpu = load_gpu(fix.removeprefix("a larger GPU: "))
            assert gpu.memory_bytes > h100.memory_bytes and gpu.computes_in("bf16"), fix
    seq = _number(fixes, r"shorter sequences: up to (\d+) tokens")
    assert seq is None or seq < 2048, fixes
    micro_batch = _number(fixes, r"micro-batch <= (\d+)")
    assert micro_batch is not None and 1 <= micro_batch < 64, fixes
    # the named fixes hold in the same search
    assert _compare(capsys, "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--num-gpus", "8",
                    "--alloc", f"x:method=full,zero=0,micro_batch={micro_batch}")["feasible"]
    if seq is not None:
        assert _compare(capsys, "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--num-gpus", "8", "--seq-len", str(seq),
                        "--alloc", "x:method=full,zero=0,micro_batch=64")["feasible"]


def test_micro_batch_alone_is_named_when_it_is_the_only_problem(capsys):
    """A 1B model at 128 tokens pinned at micro-batch 4096 on one H100: no shorter sequence exists (128 is the
    shortest step), sharding does not shrink activations and no catalog GPU holds 800 GiB. The one fix is
    the micro-batch, and it is the largest that fits: one more does not (priced with accumulation, as the
    search prices it)."""
    run = ["--model", "llama-3.2-1b", "--gpu", "h100-sxm", "--num-gpus", "1", "--seq-len", "128"]
    row = _compare(capsys, *run, "--alloc", "x:method=full,zero=0,micro_batch=4096")
    assert not row["feasible"] and "micro-batch 4096" in row["reason"]
    fixes = _relax(row["reason"])
    assert len(fixes) == 1, fixes
    micro_batch = _number(fixes, r"micro-batch <= (\d+)")
    assert micro_batch is not None and 1 < micro_batch < 4096
    assert _compare(capsys, *run, "--alloc", f"x:method=full,zero=0,micro_batch={micro_batch}")["feasible"]
    assert not _compare(capsys, *run, "--alloc", f"x:method=full,zero=0,micro_batch={micro_batch + 1}")["feasible"]


def test_no_fix_when_no_single_change_fits(capsys):
    """8B full fine-tuning at 131072 tokens pinned at micro-batch 4096 on the largest catalog GPU: even
    micro-batch 1 at 131072 tokens and 4096 sequences of 128 tokens are too large, activations do not
    shard and no GPU is larger. It used to offer "shorter sequences: up to 79360 tokens" (micro-batch 1)."""
    spec, gpu = load_spec("llama-3.1-8b"), load_gpu("mi300x")
    setup = TrainingSetup(method="full", checkpointing="full", micro_batch=4096, seq_len=131072)
    assert cheapest_fixes(spec, gpu, setup, 131072, usable_allocated_bytes(gpu), 131072) == []
    row = _compare(capsys, "--model", "llama-3.1-8b", "--gpu", "mi300x", "--num-gpus", "1", "--seq-len", "131072",
                   "--alloc", "x:method=full,zero=0,micro_batch=4096")
    assert not row["feasible"] and "shorter sequences" not in row["reason"] and "micro-batch <=" not in row["reason"]


def test_a_larger_gpu_has_more_memory_and_the_set_up_s_precision():
    """bf16 LoRA of an 8B model at 1024 tokens on an RTX 4090 (26 GiB): the V100-32GB has the memory but no
    bf16 units; the fix is a bf16 card with more memory than the 4090, on which the set-up fits."""
    spec, gpu = load_spec("llama-3.1-8b"), load_gpu("rtx-4090")
    setup = TrainingSetup(method="lora", precision="bf16", seq_len=1024)
    fixes = cheapest_fixes(spec, gpu, setup, 1024, usable_allocated_bytes(gpu), 4096)
    (fix,) = [f for f in fixes if f["change"] == "gpu"]
    larger = load_gpu(fix["value"])
    assert fix["value"] != "v100-32gb"
    assert larger.memory_bytes > gpu.memory_bytes and larger.computes_in("bf16")
    assert float(peak_allocated_bytes(spec, setup, 1, 1024)) <= usable_allocated_bytes(larger)


def test_sharding_fix_keeps_at_least_the_run_s_gpus():
    """An 8-GPU ZeRO-0 run that ZeRO-3 would fit: the fix is ZeRO-3 on its 8 GPUs, not on 2."""
    spec, gpu = load_spec("llama-3.1-8b"), load_gpu("h100-sxm")
    setup = TrainingSetup(method="full", precision="bf16-mixed", checkpointing="full", num_gpus=8, zero=0)
    fixes = cheapest_fixes(spec, gpu, setup, 2048, usable_allocated_bytes(gpu), 4096)
    (fix,) = [f for f in fixes if f["change"] == "num_gpus"]
    assert fix["value"] == 8 and "ZeRO-3" in fix["fix"]
