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
    assert "torchtitan_bench_2024_12-001" not in reasons  # the 500 W Grand Teton H100: priced as its chip, capped
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


def test_power_capped_part_is_its_chip_under_a_fitted_factor(runs, tab):
    """Meta's 500 W H100 takes the H100 SXM's measured ceilings; only its runs read the fitted
    ``power_cap.h100-500w``, and held out, each of its two sources gets it from the other."""
    from planner.cost.timing.ceiling import matmul_ceiling

    run = next(r for r in runs[0] if r.id == "torchtitan_bench_2024_12-002")
    assert run.gpu.name == "h100-500w-grand-teton"
    h100 = next(r for r in runs[0] if r.id == "torchao_float8_training_doc-001").gpu
    assert matmul_ceiling(run.gpu) == matmul_ceiling(h100)
    capped = tab["features"]["power_capped"]
    assert set(tab["source"][capped]) == {"torchtitan_bench_2024_12", "torchtitan_perf_doc_2024",
                                          "torchtitan_asynctp_2025_06"}
    values = load_constants()["values"]
    doubled = {**values, "power_cap.h100-500w": 2 * values["power_cap.h100-500w"]}  # only its runs move
    moved = time_fit.predict(tab, doubled) != time_fit.predict(tab, values)
    assert np.array_equal(moved, capped)
    # with every source that ran the part left out, no run informs the factor: it stays at its prior
    others = ~np.isin(tab["source"], list(set(tab["source"][capped])))
    assert time_fit.fit(tab, others)["power_cap.h100-500w"] == pytest.approx(PRIOR["power_cap.h100-500w"], rel=1e-6)


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


def test_a_large_source_does_not_set_the_interval_alone():
    """One source of 200 runs within 1% and three of 5 runs within 20%: counting each run once, the
    80% interval is the large source's 1%; weighted as in the fit (20 + 3 x 5 runs), it is 20%."""
    sources = np.array(["big"] * 200 + ["a"] * 5 + ["b"] * 5 + ["c"] * 5)
    log_err = np.concatenate([np.full(200, 0.01), np.full(15, 0.2)])
    regimes = np.array(["multi-node"] * len(sources))
    assert time_fit.regime_interval(log_err, regimes, "multi-node")[1] == pytest.approx(0.01)
    assert time_fit.regime_interval(log_err, regimes, "multi-node", None, sources)[1] == pytest.approx(0.2)
    assert time_fit.source_weights(sources)[:200].sum() == pytest.approx(time_fit.RUNS_PER_SOURCE_CAP)


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
    measured ceilings), the 80% intervals hold >= 85% of runs, 14 sources, llm-foundry's 216
    runs within 8% at the median, every run within 35% (llm-foundry's MPT-70B on 64 A100-40GB, 140a, is
    the worst at 34.6% since torchtitan's checkpointing reruns are counted, 31% before; Qwen-1's 7B ZeRO-3 run at 256 tokens, 031, was 74% before issue 11 counted ZeRO-3's
    fetches and gathers and is within 25% since the fetches are host time priced with a measured prior,
    see benchmarks/README.md), single-GPU runs within 25%. A GPU generation seen in one source only (MI300X, in torchao's float8
    doc) is predicted from its measured matmul and attention ceilings: within 25% (108% with a
    per-generation constant, 34% and 54% with NVIDIA's attention/matmul ratio)."""
    result = time_fit.loso(tab)
    scores = time_fit.summary(tab, result)
    summary = scores["overall"]
    assert scores["by_source"]["llmfoundry_bench"]["median_abs_error"] <= 0.08
    assert summary["median_abs_error"] <= 0.08
    assert summary["interval_coverage"] >= 0.85
    # a new source's runs, not the largest table's, are what the interval is for: 69% at the median with
    # every run counted once, 81% with each source weighted as in the fit (fit.source_weights)
    assert np.median([s["interval_coverage"] for s in scores["by_source"].values()]) >= 0.8
    assert summary["sources"] >= 14
    errors = dict(zip(tab["id"], time_fit.throughput_errors(result["log_errors"]), strict=True))
    assert max(abs(e) for e in errors.values()) < 0.35
    assert max(abs(errors[f"qwen1_readme_profiling-03{i}"]) for i in (1, 2, 3)) < 0.25
    assert scores["by_regime"]["single-gpu"]["max_abs_error"] < 0.25
    assert abs(errors["torchao_float8_training_doc-005"]) < 0.25  # MI300X, float8 tensorwise
    assert abs(errors["torchao_float8_training_doc-004"]) < 0.20  # MI300X, bf16
    assert abs(errors["torchao_float8_training_doc-001"]) < 0.25  # H100, bf16
    assert abs(errors["torchao_float8_training_doc-002"]) < 0.25  # H100, float8 tensorwise


QWEN_72B_LORA_ZERO3 = {f"qwen1_readme_profiling-0{i}" for i in range(52, 58)}


def test_qwen_rows_run_with_unpublished_code_are_listed_with_their_reason(runs):
    """Qwen-1's LoRA on 2 nodes x 2 A100s and its 72B LoRA with ZeRO-3 on 4 A100s ran code that was
    not published (finetune.py at the rows' commits set device_map="auto", with which neither a
    distributed run nor ZeRO-3 loads): listed, not priced. Priced as the README states them, the
    multinode runs would be 1.4-2.1x slower per GPU than predicted at every length (a cost
    proportional to tokens no stated field explains) and the 72B runs within 21% (measured /
    predicted 0.79-1.13, with LoRA's ZeRO-3 fetches counted); kept here so the reason stays checked."""
    reasons = {key: reason for key, _, reason in runs[1]}
    assert all("not published" in reasons[run] for run in QWEN_MULTINODE_LORA | QWEN_72B_LORA_ZERO3)
    text = catalog_root().joinpath("measurements", "throughput.csv").read_text(encoding="utf-8")
    rows = {r["id"]: r for r in csv.DictReader(text.splitlines())}
    values = load_constants()["values"]

    def ratios(ids):
        stated = [map_row({**rows[i], "notes": rows[i]["notes"].split(" NOT THE PUBLISHED CODE")[0]}) for i in sorted(ids)]
        tab = time_fit.table(stated)
        return tab["measured_step_s"] / time_fit.predict(tab, values)

    multinode, large = ratios(QWEN_MULTINODE_LORA), ratios(QWEN_72B_LORA_ZERO3)
    assert all(1.2 < r < 2.5 for r in multinode) and np.median(multinode) > 1.5
    assert all(0.75 < r < 1.2 for r in large)


SWIFT = [f"swift_megatron_benchmark-00{i}" for i in range(1, 7)]


def test_swift_rows_are_listed_and_their_relative_facts_hold(runs):
    """ms-swift's 8x A800 benchmark (HF Trainer with DeepSpeed ZeRO-2 and ZeRO-3, Megatron-SWIFT) packs
    documents into 8192-token bins attended per document, whose lengths it does not state, and does not
    publish the DeepSpeed command of its MoE rows: listed, not priced. Priced as if each bin were one
    document: the dense ZeRO-3 / ZeRO-2 ratio is the measured 1.023 within 5% (ZeRO-3's fetch hooks hide
    behind 8k-token micro-batches), whole-bin attention makes the dense rows slower than measured, and HF's
    per-expert MoE loop of that time is 2x slower than priced under ZeRO-2 and several times under ZeRO-3."""
    reasons = {key: reason for key, _, reason in runs[1]}
    assert all("document" in reasons[i] for i in SWIFT[:3]) and all("MoE" in reasons[i] for i in SWIFT[3:5])
    text = catalog_root().joinpath("measurements", "throughput.csv").read_text(encoding="utf-8")
    rows = {r["id"]: r for r in csv.DictReader(text.splitlines())}
    stated = [map_row({**rows[i], "notes": rows[i]["notes"].split(" MOE DEEPSPEED")[0].split(" PER-DOCUMENT")[0]})
              for i in SWIFT[:5]]
    assert all(run.cluster.name == "a800-8gpu" and run.gpu.name == "a100-80gb" for run in stated)
    tab = time_fit.table(stated)
    measured, priced = tab["measured_step_s"], time_fit.predict(tab, load_constants()["values"])
    assert (priced[1] / priced[0]) == pytest.approx(measured[1] / measured[0], rel=0.05)
    assert all(1.1 < p / m < 1.4 for p, m in zip(priced[:2], measured[:2], strict=True))
    assert 1.7 < measured[3] / priced[3] < 2.5 and measured[4] / priced[4] > 5
