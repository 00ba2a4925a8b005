"""Step-time model (planner.cost.timing.step_time): structure, vectorization, closed forms, corrections."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from planner.cost.timing.step_time import (
    DEFAULT_MAX_EFFICIENCY,
    DEFAULT_PRICE_USD_PER_GPU_HOUR,
    default_efficiency,
    optimizer_bytes_per_element,
    price_usd_per_gpu_hour,
    ring_all_reduce_s,
    ring_gather_s,
    step_time,
)
from planner.errors import PlannerError
from planner.specs.catalog import load_gpu, load_spec
from planner.specs.setup import TrainingSetup

H100 = load_gpu("h100-sxm")
KEYS = ("compute_s", "memory_s", "recompute_s", "optimizer_s", "communication_s", "step_time_s", "tokens_per_s", "mfu",
        "achieved_flops_per_s")


@pytest.fixture(scope="module")
def llama8b():
    return load_spec("llama-3.1-8b")


def _f(x) -> float:
    return float(np.asarray(x))


def test_keys_and_step_is_the_sum(llama8b):
    r = step_time(llama8b, TrainingSetup(precision="bf16-mixed", seq_len=4096), H100)
    assert set(KEYS) <= set(r)
    parts = ("compute_s", "attention_s", "memory_s", "recompute_s", "overhead_s", "optimizer_s", "communication_s",
             "dequantization_s", "offload_s", "pipeline_bubble_s")
    assert _f(r["step_time_s"]) == pytest.approx(sum(_f(r[k]) for k in parts))
    assert {k for k in r if k.endswith("_s") and not k.endswith("_per_s")} == {*parts, "step_time_s"}
    assert 0.25 < _f(r["mfu"]) < 0.65  # one H100, 8B full fine-tuning: published runs report 35-55%


def _setups():
    """Set-ups that differ in everything the step reads (a search's worth, thinned)."""
    for i, (method, ckpt, zero, tp, ga, optimizer, impl) in enumerate(itertools.product(
            ("full", "lora", "qlora"), ("none", "selective", "full"), (0, 1, 2, 3), (1, 2), (1, 3),
            ("adamw", "adamw-8bit", "adafactor"), ("foreach", "fused"))):
        if i % 5 == 0:
            yield TrainingSetup(method=method, precision="bf16-mixed" if method == "full" else "bf16", checkpointing=ckpt,
                                num_gpus=16 if i % 2 else 8, zero=zero, tensor_parallel=tp, grad_accum=ga,
                                optimizer=optimizer, optimizer_impl=impl, offload_optimizer=i % 7 == 0)


def test_shared_cache_changes_nothing(llama8b):
    """One cache across many set-ups (what the search does) gives every set-up's step time bit for bit."""
    mb, rank = np.array([1, 4, 16])[:, None], np.array([[8, 64]])
    cache: dict = {}
    for setup in _setups():
        alone = step_time(llama8b, setup, H100, mb, 2048, rank)
        shared = step_time(llama8b, setup, H100, mb, 2048, rank, cache=cache)
        for key, value in alone.items():
            assert np.array_equal(value, shared[key]), (setup, key)
    assert len(cache) < 60  # the per-micro-batch work is shared, not recomputed per set-up


def test_shared_cache_keys_name_real_fields():
    """The lists of fields a shared part does not read name fields of the set-up (every other field,
    one added later included, keeps parts apart)."""
    from planner.cost.memory.activation_memory import NOT_READ_BY_ACTIVATIONS
    from planner.cost.memory.states import NOT_READ_BY_STATES
    from planner.cost.spec_facts import setup_key
    from planner.cost.timing import step_time as st

    fields = set(TrainingSetup.model_fields)
    for ignored in (NOT_READ_BY_ACTIVATIONS, NOT_READ_BY_STATES, st.NOT_READ_BY_WORK, st._NOT_READ_BY_FLOPS,
                    st._NOT_READ_BY_FORWARD, st._NOT_READ_BY_TRAFFIC):
        assert ignored <= fields
    key = setup_key("work", TrainingSetup(), st.NOT_READ_BY_WORK)
    assert {name for name, _ in key[1:]} == fields - st.NOT_READ_BY_WORK


def test_vectorized_matches_scalar_calls(llama8b):
    setup = TrainingSetup(method="lora", precision="bf16")
    b = np.array([1, 2, 4])[:, None]
    s = np.array([512, 2048])[None, :]
    rank = 16
    grid = step_time(llama8b, setup, H100, micro_batch=b, seq_len=s, lora_rank=rank)
    assert grid["step_time_s"].shape == (3, 2)
    for i, bb in enumerate((1, 2, 4)):
        for j, ss in enumerate((512, 2048)):
            one = step_time(llama8b, setup.model_copy(update={"micro_batch": bb, "seq_len": ss}), H100)
            assert _f(one["step_time_s"]) == pytest.approx(grid["step_time_s"][i, j])
    assert np.all(np.diff(grid["step_time_s"], axis=0) > 0)  # more tokens, more time


def test_lora_rank_array(llama8b):
    r = step_time(llama8b, TrainingSetup(method="lora"), H100, lora_rank=np.array([8, 64, 512]))
    assert r["step_time_s"].shape == (3,)
    assert np.all(np.diff(r["step_time_s"]) > 0)


def test_tokens_per_s_and_mfu_definitions(llama8b):
    setup = TrainingSetup(precision="bf16-mixed", micro_batch=2, seq_len=2048, grad_accum=4, num_gpus=8)
    r = step_time(llama8b, setup, H100)
    tokens = 2 * 2048 * 4 * 8
    assert _f(r["tokens_per_s"]) == pytest.approx(tokens / _f(r["step_time_s"]))
    from planner.cost.estimate import training_flops

    model_flops = float(training_flops(llama8b, setup).model) * 4 * 8
    assert _f(r["mfu"]) == pytest.approx(model_flops / (_f(r["step_time_s"]) * H100.peak_flops_for("bf16") * 8))


def test_checkpointing_adds_recompute(llama8b):
    base = TrainingSetup(precision="bf16-mixed", seq_len=2048)
    none = step_time(llama8b, base, H100)
    full = step_time(llama8b, base.model_copy(update={"checkpointing": "full"}), H100)
    selective = step_time(llama8b, base.model_copy(update={"checkpointing": "selective"}), H100)
    assert _f(none["recompute_s"]) == 0
    assert 0 < _f(selective["recompute_s"]) < _f(full["recompute_s"])
    # full recompute reruns the layers' forward: about a third of forward+backward
    assert _f(full["recompute_s"]) == pytest.approx(_f(none["compute_s"]) / 3, rel=0.2)
    assert _f(full["mfu"]) < _f(none["mfu"])  # MFU counts model FLOPs only


def test_lora_is_cheaper_than_full(llama8b):
    full = step_time(llama8b, TrainingSetup(precision="bf16-mixed", seq_len=2048), H100)
    lora = step_time(llama8b, TrainingSetup(method="lora", precision="bf16-mixed", seq_len=2048), H100)
    assert _f(lora["step_time_s"]) < _f(full["step_time_s"])
    assert _f(lora["optimizer_s"]) < 0.2 * _f(full["optimizer_s"])  # host-bound: ~450 adapter tensors


def test_default_efficiency_curve():
    assert default_efficiency(4096, 4096, 4096) == pytest.approx(DEFAULT_MAX_EFFICIENCY * (4096 / 4160) ** 3)
    sizes = np.array([16, 64, 256, 1024, 8192])
    eff = default_efficiency(sizes, 4096, 4096)
    assert np.all(np.diff(eff) > 0) and np.all(eff < DEFAULT_MAX_EFFICIENCY)
    assert default_efficiency(128, 4096, 64) == pytest.approx(default_efficiency(64, 128, 4096))  # symmetric


def test_ring_collectives_closed_form():
    # ring all-reduce moves 2 (N-1)/N of the buffer per GPU (Patarasuk & Yuan 2009)
    assert _f(ring_all_reduce_s(8e9, 8, 1e9)) == pytest.approx(2 * 7 / 8 * 8)
    assert _f(ring_gather_s(8e9, 8, 1e9)) == pytest.approx(7 / 8 * 8)
    assert _f(ring_all_reduce_s(8e9, 1, 1e9)) == 0


def test_tensor_parallel_all_reduces_are_exposed(llama8b):
    """Megatron: 2 all-reduces of b x s x h per layer in forward, 2 in backward."""
    setup = TrainingSetup(precision="bf16", micro_batch=1, seq_len=4096, num_gpus=2, tensor_parallel=2)
    r = step_time(llama8b, setup, H100, grounded=False)
    # NCCL's achieved ring bandwidth: 370 of 450 GB/s on H100 NVLink (nccl-tests issue #212)
    per = 2 * (2 - 1) / 2 * 4096 * llama8b.hidden_size * 2 / 370e9
    assert _f(r["communication_s"]) == pytest.approx(4 * llama8b.num_layers * per)


def test_data_parallel_communication(llama8b):
    one = TrainingSetup(precision="bf16-mixed", seq_len=4096)
    dp = step_time(llama8b, one.model_copy(update={"num_gpus": 8}), H100)
    assert _f(dp["communication_s"]) > 0  # at least the last DDP bucket
    z3 = step_time(llama8b, one.model_copy(update={"num_gpus": 8, "zero": 3}), H100)
    assert _f(z3["optimizer_s"]) < _f(dp["optimizer_s"])  # states sharded 8 ways
    # across nodes the data-parallel traffic slows down
    z3_64 = step_time(llama8b, one.model_copy(update={"num_gpus": 64, "zero": 3}), H100)
    assert _f(z3_64["communication_s"]) > _f(z3["communication_s"])
    slow = load_gpu("l40s")  # PCIe, 32 GB/s: DDP's all-reduce cannot hide behind backward
    assert _f(step_time(llama8b, one.model_copy(update={"num_gpus": 8, "method": "full"}), slow)["communication_s"]) > 1


def test_optimizer_bytes_per_element():
    # foreach AdamW in fp32: 4w + 2g + 12s = 16 + 8 + 48
    assert optimizer_bytes_per_element(TrainingSetup(precision="fp32")) == 72
    assert optimizer_bytes_per_element(TrainingSetup(precision="fp32", optimizer_impl="fused")) == 28
    assert optimizer_bytes_per_element(TrainingSetup(precision="bf16", optimizer="sgd")) == 2 * 2 + 2 + 5 * 2


def test_corrections_scale_the_terms(llama8b):
    class Corr:
        efficiency_scale = 0.5
        memory_time_factor = 2.0
        optimizer_time_factor = 3.0

    setup = TrainingSetup(precision="bf16-mixed", seq_len=4096)
    base = step_time(llama8b, setup, H100, grounded=False)  # a profile's corrections act on the bare roofline
    corr = step_time(llama8b, setup, H100, profile=Corr())
    assert _f(corr["memory_s"]) == pytest.approx(2 * _f(base["memory_s"]))
    assert _f(corr["optimizer_s"]) == pytest.approx(3 * _f(base["optimizer_s"]))
    assert 1.5 * _f(base["compute_s"]) < _f(corr["compute_s"]) <= 2.0 * _f(base["compute_s"]) + 1e-12


def test_needs_a_device(llama8b):
    with pytest.raises(PlannerError, match="GPU"):
        step_time(llama8b, TrainingSetup(), None)


def test_prices():
    assert price_usd_per_gpu_hour(H100) == H100.price_usd_per_hour
    assert price_usd_per_gpu_hour(load_gpu("h200")) == DEFAULT_PRICE_USD_PER_GPU_HOUR["h200"]


def test_analytic_path_does_not_import_torch():
    code = ("import sys, planner.cost.timing.step_time, planner.truth.calibrate; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
