"""`planner plan` and `planner compare` from the command line; plan files; exports accepted by the real libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from planner.cli import main

FINETUNE = ["--model", "qwen2.5-0.5b", "--gpu", "h100-sxm", "--num-gpus", "8", "--budget-usd", "200", "--data-pool", "20B"]


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_contract_plan_compute_json():
    """`planner plan --compute C --json` with no other limit: recommended params/tokens/loss, pareto points."""
    # in a fresh interpreter: the analytic path must not import torch or transformers
    code = ("import sys; from planner.cli import main; rc = main(['plan', '--compute', '1e21', '--json']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'; "
            "assert 'cvxpy' not in sys.modules and 'pandas' not in sys.modules, 'slow imports'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    rec = plan["recommended"]
    assert {"params", "tokens", "loss"} <= set(rec)
    assert rec["params"] > 0 and rec["tokens"] > 0 and rec["loss"] > 0
    assert rec["tokens"] * rec["params"] * 6 == pytest.approx(1e21, rel=1e-6)
    assert isinstance(plan["pareto"], list) and plan["pareto"]
    for point in plan["pareto"]:
        assert {"loss", "cost_usd", "time_s"} <= set(point)


def test_continuous_check_only_when_asked(capsys):
    """The geometric program (cvxpy) runs with --continuous-check; without it the plan is the same."""
    argv = ["plan", "--compute", "1e19", "--gpu", "h100-sxm", "--json"]
    _, out, _ = _run(capsys, argv)
    _, checked, _ = _run(capsys, [*argv, "--continuous-check"])
    plain, checked = json.loads(out), json.loads(checked)
    assert plain["continuous"] is None
    c = checked["continuous"]
    assert c["binding"] == ["compute_flops"] and abs(c["loss_rel_diff"]) < 1e-4
    for key in ("recommended", "pareto", "constraints", "stopping", "assumptions"):
        assert plain[key] == checked[key]
    _, text, _ = _run(capsys, argv[:-1])
    assert "not run (--continuous-check)" in text


def test_plan_text_and_plot(capsys, tmp_path):
    png = tmp_path / "plan.png"
    code, out, _ = _run(capsys, ["plan", *FINETUNE, "--plot", str(png)])
    assert code == 0
    assert "recommended:" in out and "constraints:" in out and "stopping:" in out and "Pareto front" in out
    assert "dollars" in out and "BINDING" in out
    assert png.stat().st_size > 10_000


def test_plan_json_has_constraints_and_stopping(capsys):
    code, out, _ = _run(capsys, ["plan", *FINETUNE, "--json"])
    plan = json.loads(out)
    assert code == 0
    binding = [c["name"] for c in plan["constraints"] if c["binding"]]
    assert "dollars" in binding
    stop = plan["stopping"]
    assert stop["threshold"] > 0 and stop["threshold_unit"] == "loss per USD"
    assert 0 < stop["stop_step"] <= stop["planned_steps"]
    assert len(stop["curve_step"]) == len(stop["curve_loss"])


def test_request_file_yaml_with_flag_override(capsys, tmp_path):
    req = tmp_path / "req.yaml"
    req.write_text(yaml.safe_dump({"models": ["qwen2.5-0.5b"], "gpu": "a100-80gb", "num_gpus": 2, "budget_usd": 100,
                                   "methods": ["lora", "qlora"]}))
    code, out, _ = _run(capsys, ["plan", "--request", str(req), "--budget-usd", "50", "--json"])
    plan = json.loads(out)
    assert code == 0
    assert plan["request"]["budget_usd"] == 50 and plan["gpu"] == "a100-80gb"
    assert plan["recommended"]["method"] in ("lora", "qlora")


def test_save_then_export_everything_the_libraries_accept(capsys, tmp_path):
    pytest.importorskip("transformers")
    saved = tmp_path / "plan.yaml"
    code, _, _ = _run(capsys, ["plan", *FINETUNE, "--methods", "lora", "--zero", "3", "--save", str(saved)])
    assert code == 0 and saved.exists()
    # hf-trainer (with the DeepSpeed config beside it, and the LoRA config)
    out = tmp_path / "train.json"
    code, text, _ = _run(capsys, ["plan", "--from-plan", str(saved), "--export", "hf-trainer", "--out", str(out)])
    assert code == 0
    kwargs = json.loads(out.read_text())
    ds_path = tmp_path / "train.deepspeed.json"
    peft_path = tmp_path / "train.peft.json"
    assert kwargs["deepspeed"] == str(ds_path) and ds_path.exists() and peft_path.exists()

    import torch
    from transformers import TrainingArguments

    # the Trainer refuses bf16 on a machine without a bf16 GPU unless told to use the CPU
    extra = {} if torch.cuda.is_available() else {"use_cpu": True}
    args = TrainingArguments(**kwargs, **extra)
    assert args.per_device_train_batch_size == kwargs["per_device_train_batch_size"]
    assert args.max_steps == kwargs["max_steps"]

    from peft import LoraConfig

    peft = json.loads(peft_path.read_text())
    assert LoraConfig(**peft["lora"]).r == 16

    # DeepSpeed: the ZeRO section by DeepSpeed's own pydantic model, the whole config by DeepSpeedConfig
    ds = json.loads(ds_path.read_text())
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert deepspeed is not None
    DeepSpeedZeroConfig(**ds["zero_optimization"])
    plan = yaml.safe_load(saved.read_text())
    dp = plan["recommended"]["num_gpus"] // plan["recommended"]["tensor_parallel"]
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp
    # without a process group DeepSpeedConfig counts one rank: check the rest of the config as that rank
    single = {**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]}
    config = DeepSpeedConfig(single)
    assert config.zero_optimization_stage == 3 and config.bfloat16_config.enabled

    # accelerate: its own loader rejects unknown keys
    acc = tmp_path / "accelerate.yaml"
    code, _, _ = _run(capsys, ["plan", "--from-plan", str(saved), "--export", "accelerate", "--out", str(acc)])
    assert code == 0
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(acc))
    assert cluster.num_processes == 8 and str(cluster.distributed_type).endswith("DEEPSPEED")

    # deepspeed export on its own
    ds2 = tmp_path / "ds.json"
    code, _, _ = _run(capsys, ["plan", "--from-plan", str(saved), "--export", "deepspeed", "--out", str(ds2)])
    assert code == 0 and json.loads(ds2.read_text()) == ds


def test_compare_flags_table_json_and_plot(capsys, tmp_path):
    png = tmp_path / "cmp.png"
    argv = ["compare", "--gpu", "h100-sxm", "--num-gpus", "2", "--budget-usd", "300", "--data-pool", "2B",
            "--alloc", "1.5B LoRA all:model=qwen2.5-1.5b,method=lora,selection=all",
            "--alloc", "0.5B full best half x2:model=qwen2.5-0.5b,method=full,selection=perplexity_proxy,keep_fraction=0.5,epochs=2",
            "--alloc", "1.5B QLoRA:model=qwen2.5-1.5b,method=qlora"]
    code, out, _ = _run(capsys, [*argv, "--plot", str(png)])
    assert code == 0 and "1.5B QLoRA" in out and "peak/GPU" in out
    assert png.stat().st_size > 10_000
    code, out, _ = _run(capsys, [*argv, "--json"])
    rows = json.loads(out)["rows"]
    assert [r["name"] for r in rows] == ["1.5B LoRA all", "0.5B full best half x2", "1.5B QLoRA"]
    assert all(r["feasible"] for r in rows)
    assert all({"loss", "cost_usd", "time_s", "peak_bytes"} <= set(r) for r in rows)


def test_compare_file(capsys, tmp_path):
    f = tmp_path / "cmp.yaml"
    f.write_text(yaml.safe_dump({
        "base": {"gpu": "a100-80gb", "num_gpus": 1, "budget_usd": 50, "data_pool_tokens": 1e9},
        "allocations": [{"name": "full", "model": "qwen2.5-0.5b", "method": "full"},
                        {"name": "lora", "model": "qwen2.5-0.5b", "method": "lora"}],
    }))
    code, out, _ = _run(capsys, ["compare", str(f), "--json"])
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    # each method's loss comes from its own fine-tuning law (Zhang et al. 2024), with its trust
    assert code == 0 and rows["full"]["loss_law"].endswith("-fmt-model") and rows["lora"]["loss_law"].endswith("-lora-model")
    assert {rows["full"]["loss_trust"], rows["lora"]["loss_trust"]} <= {"fitted", "held-out", "extrapolated"}
    # compare --plot draws each allocation's expected loss curve, which ends at its predicted loss
    assert rows["lora"]["curve_loss"][-1] == pytest.approx(rows["lora"]["loss"], rel=1e-4)  # whole steps
    # under the pre-training law with the PEFT placeholder, full learns more per token
    code, out, _ = _run(capsys, ["compare", str(f), "--json", "--finetune-law", "none"])
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert code == 0 and rows["full"]["loss"] < rows["lora"]["loss"]


# ----------------------------------------------------------------------------- errors: one line, exit 2


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan", "--compute", "1e21", "--gpu", "h1000"], "unknown GPU"),
        (["plan", "--compute", "-5"], "must be positive"),
        (["plan", "--compute", "lots"], "cannot read"),
        (["plan", "--model", "nope-7b", "--budget-usd", "10"], "unknown model"),
        (["plan", "--model", "llama-3.1-70b", "--gpu", "rtx-4090", "--num-gpus", "1", "--budget-usd", "100"], "relax"),
        (["plan", "--model", "qwen2.5-0.5b", "--num-gpus", "1", "--budget-usd", "0.0001"], "short by"),
        (["plan", "--model", "qwen2.5-0.5b"], "nothing limits"),
        (["plan"], "pre-training with no"),
        (["plan", "--compute", "1e21", "--export", "deepspeed"], "--out"),
        (["plan", "--compute", "1e21", "--objective", "fastest"], "invalid choice"),
        (["plan", "--compute", "1e21", "--methods", "full,dora"], "methods"),
        (["plan", "--compute", "1e21", "--selection", "semdedup"], "needs a pool"),
        (["plan", "--compute", "1e21", "--epochs", "2"], "needs a data pool"),
        (["plan", "--request", "/nonexistent/req.yaml"], "no such file"),
        (["plan", "--from-plan", "/nonexistent/plan.json"], "no such file"),
        (["compare", "--budget-usd", "10"], "nothing to compare"),
        (["compare", "--budget-usd", "10", "--alloc", "noColon"], "NAME:key=value"),
        (["compare", "--budget-usd", "10", "--alloc", "x:model=qwen2.5-0.5b,colour=red"], "colour"),
        (["plan", "--compute", "1e21", "--cluster", "dgx-h900"], "unknown cluster"),
        (["compare", "--budget-usd", "10", "--cluster", "nope", "--alloc", "x:model=qwen2.5-0.5b"], "unknown cluster"),
        (["compare", "--budget-usd", "10", "--alloc", "x:model=qwen2.5-0.5b,stack=nemo"], "stack"),
        (["plan", "--model", "qwen2.5-0.5b", "--budget-usd", "10", "--compile"], "priced eager only"),
    ],
)
def test_bad_requests_fail_on_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("planner: error:"), err
    assert needle in err, err


def test_malformed_request_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [qwen2.5-0.5b]\nbudget_usd: -3\n")
    code, _, err = _run(capsys, ["plan", "--request", str(bad)])
    assert code == 2 and err.count("\n") == 1 and "budget_usd" in err
    bad.write_text("models: [unclosed\n")
    code, _, err = _run(capsys, ["plan", "--request", str(bad)])
    assert code == 2 and err.count("\n") == 1 and "YAML" in err
    bad.write_text("[1, 2]\n")
    code, _, err = _run(capsys, ["plan", "--request", str(bad)])
    assert code == 2 and "one object" in err


# ----------------------------------------------------------------------------- cluster, stacks per allocation

CLUSTER_RUN = ["--model", "llama-3.1-8b", "--methods", "full", "--gpu", "a100-80gb", "--gpu-counts", "16", "--zero", "3",
               "--tokens", "1B", "--budget-usd", "100000", "--json"]


def test_cluster_prices_plan_and_compare_on_its_network(capsys):
    """--cluster reaches the step-time model: the same 16-GPU run is slower on AWS p4d's 100 Gb/s EFA
    links than on a DGX A100's 200 Gb/s InfiniBand per GPU, and the plan says which network it used."""
    runs = {}
    for cluster in ("dgx-a100", "aws-p4d"):
        code, out, err = _run(capsys, ["plan", *CLUSTER_RUN, "--cluster", cluster])
        assert code == 0, err
        runs[cluster] = json.loads(out)
        assert any(a.startswith(f"cluster: {cluster}") for a in runs[cluster]["assumptions"])
    fast, slow = runs["dgx-a100"]["recommended"], runs["aws-p4d"]["recommended"]
    assert (fast["num_gpus"], fast["micro_batch"]) == (slow["num_gpus"], slow["micro_batch"])
    assert slow["step_time_s"] > fast["step_time_s"] * 1.001 and slow["cost_usd"] > fast["cost_usd"]
    code, out, err = _run(capsys, ["compare", *CLUSTER_RUN[:-1], "--cluster", "aws-p4d", "--json",
                                   "--alloc", "p4d:model=llama-3.1-8b"])
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["step_time_s"] == pytest.approx(slow["step_time_s"], rel=1e-9)


def test_compare_allocations_pin_their_own_stack(capsys):
    argv = ["compare", "--gpu", "rtx-4090", "--num-gpus", "2", "--budget-usd", "20", "--data-pool", "200M", "--json",
            "--alloc", "hf:model=qwen2.5-0.5b,method=lora,stack=hf",
            "--alloc", "tune:model=qwen2.5-0.5b,method=lora,stack=torchtune",
            "--alloc", "tune eager:model=qwen2.5-0.5b,method=lora,stack=torchtune,compile=false"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    assert all(r["feasible"] for r in rows.values()), rows
    assert rows["hf"]["stack"] == "hf" and rows["hf"]["setup_fields"] == {}
    assert rows["tune"]["stack"] == "torchtune" and "chunked CE" in rows["tune"]["techniques"]
    assert rows["tune eager"]["setup_fields"]["compile"] is False and "compiled" not in rows["tune eager"]["techniques"]


def test_compare_allocation_zero_as_text_and_its_pinned_micro_batch_in_the_shortfall(capsys):
    """Issue 11: zero=3 arrives as text (it was refused by Literal[0, 1, 2, 3]), and an allocation that
    does not fit names the micro-batch it pinned, not micro-batch 1."""
    code, out, err = _run(capsys, ["compare", "--gpu", "rtx-4090", "--budget-usd", "50", "--json",
                                   "--alloc", "x:model=llama-3.1-70b,method=full,zero=3,micro_batch=4,num_gpus=2"])
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert not row["feasible"] and "micro-batch 4" in row["reason"] and "micro-batch 1)" not in row["reason"]
    assert "ZeRO-3" in row["reason"]
