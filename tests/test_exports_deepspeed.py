"""`planner plan --export deepspeed`: explicit ZeRO bucket sizes, the very numbers the memory model
prices (``planner.cost.memory.zero_buffers.priced_config``), accepted by DeepSpeed's own config model."""

from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.cost.memory import zero_buffers as zb
from planner.specs.catalog import load_spec

PLAN = ["plan", "--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--num-gpus", "8", "--budget-usd", "200",
        "--data-pool", "20B", "--methods", "full"]


def _export(capsys, tmp_path, zero: int) -> tuple[dict, dict]:
    saved, out = tmp_path / f"plan{zero}.yaml", tmp_path / f"ds{zero}.json"
    assert main([*PLAN, "--zero", str(zero), "--save", str(saved)]) == 0
    assert main(["plan", "--from-plan", str(saved), "--export", "deepspeed", "--out", str(out)]) == 0
    capsys.readouterr()
    import yaml

    return json.loads(out.read_text()), yaml.safe_load(saved.read_text())["recommended"]


@pytest.mark.parametrize("zero", [2, 3])
def test_exported_buckets_are_the_priced_ones(capsys, tmp_path, zero):
    ds, rec = _export(capsys, tmp_path, zero)
    assert rec["zero"] == zero
    section = ds["zero_optimization"]
    hidden = load_spec("qwen2.5-0.5b").hidden_size
    priced = zb.priced_config(type("S", (), {"zero": zero})(), hidden)
    assert section["reduce_bucket_size"] == int(priced.reduce_bucket_elems) == hidden * hidden
    assert section["overlap_comm"] is priced.overlap_comm and section["contiguous_gradients"] is True
    if zero == 3:
        assert section["stage3_prefetch_bucket_size"] == int(priced.prefetch_bucket_elems) == int(0.9 * hidden * hidden)
        assert section["stage3_param_persistence_threshold"] == int(priced.persistence_threshold_elems) == 10 * hidden
    else:
        assert not any(k.startswith("stage3_") for k in section)
    # the written numbers reach DeepSpeed's own config model unchanged (not its 5e8 defaults)
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    checked = DeepSpeedZeroConfig(**section)
    assert checked.reduce_bucket_size == hidden * hidden != 5e8
    if zero == 3:
        assert checked.prefetch_bucket_size == int(0.9 * hidden * hidden)
        assert checked.param_persistence_threshold == 10 * hidden


def test_memory_model_prices_the_exported_buckets(monkeypatch):
    """The memory model's ZeRO-2 backward grows by the export's buckets (two hidden^2 buckets and one
    reduction copy, bf16), not by DeepSpeed's 5e8-element defaults (2.8 GiB at 8B)."""
    from planner.cost.memory.phases import training_memory
    from planner.specs.setup import TrainingSetup

    spec = load_spec("llama-3.1-8b")
    setup = TrainingSetup(num_gpus=8, zero=2, precision="bf16-mixed", checkpointing="full")
    with_buffers = training_memory(spec, setup).phases["backward"]
    monkeypatch.setattr(zb, "applies", lambda s: False)
    without = training_memory(spec, setup).phases["backward"]
    assert float(with_buffers - without) == pytest.approx(3 * spec.hidden_size**2 * 2)
