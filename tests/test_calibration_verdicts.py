"""A calibration profile moves every verdict it bears on, in `estimate`, `fit`, `plan` and `compare`
(issue 13, item 3): one memory verdict (``planner.cost.memory.device``) serves all four.

The profiles are synthetic, built with the profile model: a "heavy" one (peak bytes x1.5, a 20%
allocator reserve, a 2 GiB context) under which set-ups that fit by default do not, and a "light"
one (peak bytes x0.6, no reserve, a 0.25 GiB context) under which set-ups that do not fit by
default do. The expected verdicts are recomputed here from the corrections' definitions
(``planner.specs.profile``), independently of the code under test.
"""

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from planner.cli import main
from planner.cost.memory.phases import training_memory
from planner.specs.catalog import load_gpu, load_spec
from planner.specs.profile import Corrections, DeviceInfo, MemoryCorrection, Profile, save_profile
from planner.specs.setup import TrainingSetup

GiB = 2**30
GPU = "rtx-4090"
MODEL = "llama-3.2-1b"
HEAVY = Corrections(memory={"*": MemoryCorrection(static_factor=1.5, activation_factor=1.5)},
                    reserve_fraction=0.2, reserve_offset_bytes=0.0, context_bytes=2 * GiB, efficiency_scale=0.5)
LIGHT = Corrections(memory={"*": MemoryCorrection(static_factor=0.6, activation_factor=0.6)},
                    reserve_fraction=0.0, reserve_offset_bytes=0.0, context_bytes=0.25 * GiB)


def _profile(corrections: Corrections, gpu: str = GPU) -> Profile:
    spec = load_gpu(gpu)
    device = DeviceInfo(kind="cuda", name=spec.name, memory_bytes=spec.memory_bytes, spec=spec, spec_source="catalog")
    return Profile(created=dt.datetime(2025, 1, 1), device=device, configs={}, measurements=[], corrections=corrections)


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles")
    paths = {}
    for name, corrections in (("heavy", HEAVY), ("light", LIGHT)):
        paths[name] = str(folder / f"{name}.json")
        save_profile(_profile(corrections), paths[name])
    return paths


def _run(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _device_bytes(setup: TrainingSetup, c: Corrections | None, micro_batch=None, seq_len=None) -> np.ndarray:
    """Independent oracle: device bytes by the definitions of the corrections (phases of
    planner.cost.memory.phases with and without tokens, affine reserve, context)."""
    spec = load_spec(MODEL)
    b = setup.micro_batch if micro_batch is None else micro_batch
    full = training_memory(spec, setup, b, seq_len).phases
    if c is None:  # the defaults: 6% reserve; context and two pre-Hopper cuBLAS workspaces (the table's figures)
        table = json.loads((Path(__file__).parents[1] / "models_catalog" / "device_overheads.json").read_text())
        fixed = table["driver_context_bytes"] + 2 * table["cublas_workspace_bytes"]["default"]
        return np.asarray(training_memory(spec, setup, b, seq_len).peak_bytes) * 1.06 + fixed
    empty = training_memory(spec, setup, np.zeros_like(np.asarray(b, float)), seq_len).phases
    m = c.memory["*"]
    peak = np.max(np.stack(np.broadcast_arrays(*[m.static_factor * empty[p] + m.activation_factor * (full[p] - empty[p])
                                                 for p in full])), axis=0)
    return peak * (1 + c.reserve_fraction) + c.reserve_offset_bytes + c.context_bytes


# ------------------------------------------------------------------------------ estimate


def test_estimate_verdict_moves_with_the_profile(profiles, capsys):
    memory = load_gpu(GPU).memory_bytes
    base = ["estimate", "--model", MODEL, "--gpu", GPU, "--method", "full", "--seq-len", "2048"]
    # pure bf16 fits by default and not under the heavy profile
    plain = _run(capsys, *base, "--precision", "bf16")
    heavy = _run(capsys, *base, "--precision", "bf16", "--calibration", profiles["heavy"])
    assert plain["gpu"]["fits"] and not heavy["gpu"]["fits"]
    assert not plain["gpu"]["calibrated"] and heavy["gpu"]["calibrated"] and heavy["overheads"]["calibrated"]
    setup = TrainingSetup(method="full", precision="bf16", seq_len=2048)
    assert heavy["overheads"]["estimated_device_bytes"] == pytest.approx(float(_device_bytes(setup, HEAVY)), rel=1e-9)
    assert heavy["gpu"]["headroom_bytes"] == pytest.approx(memory - heavy["overheads"]["estimated_device_bytes"])
    assert heavy["peak_bytes"] > 1.4 * plain["peak_bytes"] and heavy["overheads"]["cuda_context_bytes"] == 2 * GiB
    # the JSON names what the profile set: the memory verdict and the step time
    assert {"peak_bytes", "phases", "overheads", "gpu", "step_time_s", "tokens_per_s", "mfu"} <= set(heavy["calibrated_fields"])
    assert "calibrated_fields" not in plain
    # the heavy profile halves the achieved efficiency: slower than a profile that leaves efficiency alone (the
    # uncalibrated answer is the grounded model, another level, so it is not the reference here)
    neutral = _run(capsys, *base, "--precision", "bf16", "--calibration", profiles["light"])
    assert heavy["step_time_s"] > 1.5 * neutral["step_time_s"]
    # bf16-mixed does not fit by default and fits under the light profile
    plain = _run(capsys, *base, "--precision", "bf16-mixed")
    light = _run(capsys, *base, "--precision", "bf16-mixed", "--calibration", profiles["light"])
    assert not plain["gpu"]["fits"] and light["gpu"]["fits"] and light["gpu"]["headroom_bytes"] > 0
    assert plain["overheads"]["estimated_device_bytes"] == pytest.approx(
        float(_device_bytes(setup.model_copy(update={"precision": "bf16-mixed"}), None)), rel=1e-9)


def test_estimate_without_gpu_answers_for_the_profiles_device(profiles, capsys):
    out = _run(capsys, "estimate", "--model", MODEL, "--method", "full", "--precision", "bf16",
               "--calibration", profiles["heavy"])
    assert out["gpu"]["name"] == GPU and not out["gpu"]["fits"] and out["gpu"]["calibrated"]
    # a profile of another device does not answer for this one (one line, exit 2)
    assert main(["estimate", "--model", MODEL, "--gpu", "h100-sxm", "--calibration", profiles["heavy"]]) == 2


# ------------------------------------------------------------------------------ fit


def _row(payload: dict, precision: str) -> dict:
    return next(r for r in payload["rows"] if r["method"] == "full" and r["precision"] == precision
                and r["optimizer"] == "adamw" and r["checkpointing"] == "none" and r["stack"] == "hf")


def test_fit_rows_move_with_the_profile(profiles, capsys):
    argv = ["fit", MODEL, "--gpu", GPU, "--seq-len", "2048", "--stack", "hf"]
    plain = _run(capsys, *argv)
    heavy = _run(capsys, *argv, "--calibration", profiles["heavy"])
    light = _run(capsys, *argv, "--calibration", profiles["light"])
    assert plain["calibrated_fields"] == [] and "rows.max_micro_batch" in heavy["calibrated_fields"]
    p, h, lt = _row(plain, "bf16"), _row(heavy, "bf16"), _row(light, "bf16")
    assert p["fits"] and not h["fits"] and h["calibrated"] and not p["calibrated"]
    assert h["max_micro_batch"] == 0 and p["max_micro_batch"] >= 1 and "step_time_s" not in h
    assert lt["max_micro_batch"] > p["max_micro_batch"] and lt["max_seq_len"] > p["max_seq_len"]
    assert lt["headroom_bytes"] > p["headroom_bytes"] > 0 > h["headroom_bytes"]
    # bf16-mixed: short by default, fits under the light profile (and is timed there)
    p, lt = _row(plain, "bf16-mixed"), _row(light, "bf16-mixed")
    assert not p["fits"] and lt["fits"] and lt["step_time_s"] > 0
    assert sum(r["fits"] for r in heavy["rows"]) < sum(r["fits"] for r in plain["rows"]) < sum(r["fits"] for r in light["rows"])


def test_fit_calibrated_boundaries_and_headroom_agree_with_estimate(profiles, capsys):
    """The reported largest micro-batch and longest sequence fit by the corrections' own
    definitions and one step more does not; the headroom is estimate's for the same set-up."""
    memory = load_gpu(GPU).memory_bytes
    light = _run(capsys, "fit", MODEL, "--gpu", GPU, "--seq-len", "2048", "--stack", "hf", "--calibration", profiles["light"])
    row = _row(light, "bf16")
    setup = TrainingSetup(method="full", precision="bf16", seq_len=2048)
    b, s = row["max_micro_batch"], row["max_seq_len"]
    assert _device_bytes(setup, LIGHT, micro_batch=b) <= memory < _device_bytes(setup, LIGHT, micro_batch=b + 1)
    assert _device_bytes(setup, LIGHT, micro_batch=1, seq_len=s) <= memory < _device_bytes(setup, LIGHT, 1, s + 128)
    est = _run(capsys, "estimate", "--model", MODEL, "--gpu", GPU, "--method", "full", "--precision", "bf16",
               "--seq-len", "2048", "--calibration", profiles["light"])
    assert row["headroom_bytes"] == pytest.approx(est["gpu"]["headroom_bytes"], rel=1e-9)
    assert row["peak_bytes"] == pytest.approx(est["peak_bytes"], rel=1e-9)


def test_fit_fixes_use_the_profile(profiles, capsys):
    """Where nothing fits, the shortfall and the sharding fix are the calibrated ones."""
    argv = ["fit", "llama-3.1-70b", "--gpu", GPU, "--seq-len", "2048", "--stack", "hf"]
    plain = _run(capsys, *argv)
    heavy = _run(capsys, *argv, "--calibration", profiles["heavy"])
    assert heavy["short_by_bytes"] > plain["short_by_bytes"] > 0
    shard = {name: next(f["value"] for f in out["fixes"] if f["change"] == "num_gpus")
             for name, out in (("plain", plain), ("heavy", heavy))}
    assert shard["heavy"] > shard["plain"]


# ------------------------------------------------------------------------------ plan and compare


PLAN = ["--model", MODEL, "--methods", "full", "--gpu", GPU, "--num-gpus", "1", "--checkpointing", "none",
        "--optimizers", "adamw", "--zero", "0", "--tensor-parallel", "1", "--budget-usd", "20", "--data-pool", "100M"]


def test_plan_feasibility_moves_with_the_profile(profiles, capsys):
    plain = _run(capsys, "plan", *PLAN, "--micro-batches", "1")
    rec = plain["recommended"]
    assert rec["peak_bytes"] <= rec["usable_bytes"]
    # heavy: the same request has nothing that fits (one line, exit 2: the shortfall)
    assert main(["plan", *PLAN, "--micro-batches", "1", "--calibration", profiles["heavy"], "--json"]) == 2
    assert "nothing fits in memory" in capsys.readouterr().err
    # light: micro-batch 4 fits nowhere by default and fits calibrated
    assert main(["plan", *PLAN, "--micro-batches", "4", "--json"]) == 2
    assert "nothing fits in memory" in capsys.readouterr().err
    light = _run(capsys, "plan", *PLAN, "--micro-batches", "4", "--calibration", profiles["light"])
    rec = light["recommended"]
    assert rec["micro_batch"] == 4 and rec["peak_bytes"] <= rec["usable_bytes"]
    assert rec["usable_bytes"] == pytest.approx(load_gpu(GPU).memory_bytes - LIGHT.context_bytes)
    assert any("calibration:" in a and "peak_bytes" in a for a in light["assumptions"])


def test_compare_feasibility_moves_with_the_profile(profiles, capsys):
    base = ["compare", *PLAN, "--alloc", "mb4:micro_batch=4", "--alloc", "mb1:micro_batch=1"]
    plain = {r["name"]: r for r in _run(capsys, *base)["rows"]}
    light = {r["name"]: r for r in _run(capsys, *base, "--calibration", profiles["light"])["rows"]}
    heavy = {r["name"]: r for r in _run(capsys, *base, "--calibration", profiles["heavy"])["rows"]}
    assert not plain["mb4"]["feasible"] and light["mb4"]["feasible"]
    assert plain["mb1"]["feasible"] and not heavy["mb1"]["feasible"] and "nothing fits" in heavy["mb1"]["reason"]


# ------------------------------------------------------------------------------ the fixed part


def test_fixed_part_depends_on_the_architecture(capsys):
    """CUDA context + two cuBLAS workspaces: 32 MiB each on Hopper (sm90), 8.125 MiB elsewhere
    (PyTorch's CublasHandlePool.cpp), 128 MiB on an MI300X (ROCm gfx94x); every figure sourced."""
    from planner.specs.hardware import default_context_bytes

    table = json.loads((Path(__file__).parents[1] / "models_catalog" / "device_overheads.json").read_text())
    assert table["cublas_workspace_bytes"]["default"] == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert all(table[f"{key}_source" if key == "cublas_workspace" else "driver_context_sources"]
               for key in ("cublas_workspace", "driver_context"))
    h100, a100, mi300x = (default_context_bytes(load_gpu(g))[0] for g in ("h100-sxm", "a100-80gb", "mi300x"))
    assert h100 - a100 == 2 * (32 * 2**20 - 8519680) and mi300x - a100 == 2 * (128 * 2**20 - 8519680)
    out = _run(capsys, "estimate", "--model", MODEL, "--gpu", "h100-sxm")
    assert out["overheads"]["cuda_context_bytes"] == h100 and "sm90" in out["overheads"]["cuda_context_source"]


def test_every_estimate_says_what_the_memory_leaves_out(capsys):
    out = _run(capsys, "estimate", "--model", MODEL)
    assert any(note.startswith("memory leaves out:") for note in out["notes"])
