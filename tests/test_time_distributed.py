"""`planner calibrate --distributed N`: torchrun on local processes, the communication factor it
fits (issue 11). Runs 2 CPU processes over gloo; the CUDA/NCCL and FSDP paths are not run here."""

import datetime
import json

import pytest

from planner.cli import main
from planner.cost.timing.step_time import step_time
from planner.specs.catalog import load_gpu, load_model_config
from planner.specs.configs import reduce_layers
from planner.specs.hardware import GpuSpec
from planner.specs.model import model_spec_from_config
from planner.specs.profile import Corrections, DeviceInfo, Profile, load_profile, save_profile
from planner.specs.setup import TrainingSetup
from planner.truth.distributed import communication_factor

MODEL = "smollm2-135m-instruct"


def _profile(device: DeviceInfo) -> Profile:
    return Profile(created=datetime.datetime(2026, 1, 1), device=device, configs={}, measurements=[],
                   corrections=Corrections())


def _cpu() -> DeviceInfo:
    spec = GpuSpec(name="cpu: test", vendor="cpu", memory_bytes=16 * 2**30, memory_bandwidth_bytes_per_s=10e9,
                   peak_flops={"fp32": 50e9, "bf16": 1e9}, interconnect="shared memory",
                   interconnect_bandwidth_bytes_per_s=2e9, sources={"all": "test"})
    return DeviceInfo(kind="cpu", name=spec.name, memory_bytes=spec.memory_bytes, spec=spec)


def test_communication_factor_closed_form():
    gpu = load_gpu("h100-sxm")
    base = _profile(DeviceInfo(kind="cuda", name=gpu.name, memory_bytes=gpu.memory_bytes, spec=gpu,
                               spec_source="catalog"))
    spec = model_spec_from_config(reduce_layers(load_model_config(MODEL)[0], 2), MODEL)
    setup = TrainingSetup(precision="bf16-mixed", seq_len=128, num_gpus=4)
    parts = step_time(spec, setup, gpu, profile=base)
    step, comm = float(parts["step_time_s"]), float(parts["communication_s"])
    fit = communication_factor(step + comm, spec, setup, base)  # the collectives took twice the prediction
    assert fit["communication_factor"] == pytest.approx(2.0)
    assert communication_factor(0.0, spec, setup, base)["communication_factor"] == 0.05  # hidden, not negative


@pytest.mark.oracle
@pytest.mark.slow
def test_two_cpu_processes_over_gloo(tmp_path, capsys):
    base = tmp_path / "base.json"
    save_profile(_profile(_cpu()), base)
    out = tmp_path / "out.json"
    code = main(["calibrate", "--distributed", "2", "--base", str(base), "--model", MODEL, "--out", str(out),
                 "--layers", "1", "--seq-len", "64", "--steps", "2", "--json"])
    assert code == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["world_size"] == 2 and fit["backend"] == "gloo" and fit["mode"] == "ddp"
    assert len(fit["step_times_s"]) == 2 and all(t > 0 for t in fit["step_times_s"])
    profile = load_profile(out)
    assert profile.corrections.communication_factor == pytest.approx(fit["communication_factor"])
    assert "communication_factor" in profile.corrections.fitted and "2 local processes" in profile.notes[-1]


def test_distributed_needs_a_base(capsys, tmp_path):
    code = main(["calibrate", "--distributed", "2", "--model", MODEL, "--out", str(tmp_path / "x.json")])
    assert code == 2 and "--base" in capsys.readouterr().err
