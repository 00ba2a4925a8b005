"""The time model against published throughput: the mapping of runs, and the committed
leave-one-source-out fit (models_catalog/time_model/constants.json) reproduced by the code."""

import csv
import json

import numpy as np
import pytest

from planner.cost.timing import fit as time_fit
from planner.cost.timing.grounding import PRIOR, load_constants
from planner.cost.timing.published import map_row, published_runs
from planner.specs.catalog import catalog_root


@pytest.fixture(scope="module")
def runs():
    return published_runs()


@pytest.fixture(scope="module")
def tab(runs):
    return time_fit.table(runs[0])


def test_enough_runs_from_enough_sources(runs):
    priced, left_out = runs
    assert len(priced) >= 60
    assert len({r.source_id for r in priced}) >= 6
    assert sum(r.setup.pipeline_parallel > 1 for r in priced) >= 10
    assert {r.regime for r in priced} == {"single-gpu", "single-node", "multi-node"}
    assert all(reason for _, _, reason in left_out)  # every run left out says why


def test_left_out_by_name(runs):
    reasons = {key: reason for key, _, reason in runs[1]}
    assert "llmfoundry_bench-076" not in reasons  # amp_fp8 (TransformerEngine) is priced as float8 now
    assert "rowwise" in reasons["torchao_float8_training_doc-003"]  # only tensorwise scaling is priced
    assert "not in the catalog" in reasons["torchtitan_bench_2024_12-001"]  # the 500 W Grand Teton H100
    assert "GPTQ" in reasons["qwen1_readme_profiling-007"]
    assert "implausible" in reasons["torchtune_readme_2024_09-007"]  # 70B LoRA at 3.3x the A100's peak


def test_megatron_tflops_are_inverted_with_the_papers_count(runs):
    run = next(r for r in runs[0] if r.id == "megatron2021-017")
    text = catalog_root().joinpath("measurements", "throughput.csv").read_text(encoding="utf-8")
    value = float(next(r for r in csv.DictReader(text.splitlines()) if r["id"] == "megatron2021-017")["value"])
    L, h, V, s = run.spec.num_layers, run.spec.hidden_size, run.spec.vocab_size, 2048
    per_token = 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))  # Narayanan et al. 2021 eq. 3
    assert run.tokens_per_s_per_gpu == pytest.approx(value * 1e12 / per_token)
    assert run.setup.pipeline_parallel == 12 and run.setup.tensor_parallel == 8


def test_unknown_stack_is_refused():
    row = {"id": "x-001", "source_id": "x", "stack": "unsloth", "gpu": "a100-80gb", "notes": ""}
    assert "no counterpart" in map_row(row)


def test_committed_fit_is_reproduced(tab):
    committed = json.loads(catalog_root().joinpath("time_model", "constants.json").read_text(encoding="utf-8"))
    assert set(committed["values"]) == set(PRIOR)
    values = time_fit.fit(tab)
    for name, value in values.items():
        assert committed["values"][name] == pytest.approx(value, rel=1e-5), name
    result = time_fit.loso(tab)
    summary = time_fit.summary(tab, result)
    for key in ("runs", "sources", "median_abs_error", "max_abs_error", "interval_coverage"):
        assert committed["loso"]["overall"][key] == pytest.approx(summary["overall"][key], rel=1e-5), key
    for source, scores in summary["by_source"].items():
        assert committed["loso"]["by_source"][source]["median_abs_error"] == pytest.approx(
            scores["median_abs_error"], rel=1e-5)
    for regime, (low, high) in committed["interval_log_ratio"].items():
        assert (low, high) == pytest.approx(time_fit.regime_interval(result["log_errors"], tab["regime"], regime, None,
                                                                       tab["source"]))
    assert load_constants()["values"] == committed["values"]


def test_held_out_errors_are_held_out(tab):
    """A source's held-out error comes from constants fitted without it: refitting with the
    source in changes its error (the score is not in-sample)."""
    result = time_fit.loso(tab)
    source = "korthikanti2022"
    mask = tab["source"] == source
    in_sample = time_fit.log_errors(tab, time_fit.fit(tab), mask)
    assert not np.allclose(in_sample, result["log_errors"][mask])
    assert result["log_errors"][mask] == pytest.approx(time_fit.log_errors(tab, result["fits"][source], mask))


def test_grounded_model_beats_the_bare_roofline(tab):
    """The fitted constants earn their place: the held-out error is below the roofline's."""
    result = time_fit.loso(tab)
    bare_step_s = sum(tab["parts"].values())  # step_time(grounded=False): no ceiling, no fitted constant
    roofline = np.median(np.abs(time_fit.throughput_errors(np.log(tab["measured_step_s"] / bare_step_s))))
    held_out = np.median(np.abs(time_fit.throughput_errors(result["log_errors"])))
    assert held_out < roofline


QWEN_MULTINODE_LORA = {f"qwen1_readme_profiling-0{i}" for i in range(34, 40)}


def test_leave_one_source_out_targets(tab):
    """What the committed model meets held out (issue 11): median |error| <= 8% (10.8% before the
    measured ceilings), the 80% intervals hold >= 85% of runs, 11 sources, llm-foundry's 216
    runs within 8% at the median; the worst run apart from Qwen-1's multinode LoRA below 60% (MI300X
    float8, 54%). Qwen-1's 7B ZeRO-3 run at 256 tokens (031) within 50%: 74% before issue 11's counted
    ZeRO-3 module fetches (three per module and micro-batch under checkpointing, not two) and gathers
    (1.5 passes of the weights per micro-batch, not 2), see benchmarks/README.md. A GPU generation seen in one source only (MI300X, in
    torchao's float8 doc) is predicted from its measured matmul ceiling: within 40% (108% with
    a per-generation constant)."""
    result = time_fit.loso(tab)
    scores = time_fit.summary(tab, result)
    summary = scores["overall"]
    assert scores["by_source"]["llmfoundry_bench"]["median_abs_error"] <= 0.08
    assert summary["median_abs_error"] <= 0.08
    assert summary["interval_coverage"] >= 0.85
    assert summary["sources"] >= 11
    errors = dict(zip(tab["id"], time_fit.throughput_errors(result["log_errors"]), strict=True))
    assert max(abs(e) for run, e in errors.items() if run not in QWEN_MULTINODE_LORA) < 0.60
    assert abs(errors["qwen1_readme_profiling-031"]) < 0.50
    # Qwen-1's LoRA on 2 nodes x 2 A100s (ZeRO-2) runs 1.75x slower per GPU than the same table's
    # single-GPU LoRA row at every length: a cost proportional to tokens that no stated field
    # explains (the LoRA gradients' reduce is ~5 ms); priced, held out they stay optimistic
    assert all(0.5 < errors[run] < 1.6 for run in QWEN_MULTINODE_LORA if run != "qwen1_readme_profiling-034")
    assert abs(errors["torchao_float8_training_doc-004"]) < 0.40  # MI300X, bf16
    assert abs(errors["torchao_float8_training_doc-001"]) < 0.25  # H100, bf16
    assert abs(errors["torchao_float8_training_doc-002"]) < 0.25  # H100, float8 tensorwise
