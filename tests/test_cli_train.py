"""`planner estimate`, `planner fit`, `planner catalog`: the contract, and bad input."""

import json
import subprocess
import sys

import pytest

from planner.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_contract(capsys):
    code, out, _ = run(
        capsys, "estimate", "--model", "qwen2.5-7b", "--method", "lora", "--precision", "bf16", "--optimizer", "adamw",
        "--micro-batch", "1", "--seq-len", "4096", "--checkpointing", "full", "--attention", "sdpa",
        "--lora-rank", "16", "--lora-targets", "q_proj,v_proj", "--gpu", "rtx-4090", "--json",
    )
    assert code == 0
    result = json.loads(out)
    for key in ("peak_bytes", "flops_per_micro_batch", "phases", "components"):
        assert key in result
    assert result["peak_bytes"] == max(result["phases"].values())
    assert set(result["phases"]) == {"forward", "backward", "optimizer"}
    assert result["gpu"]["fits"] is (result["gpu"]["headroom_bytes"] >= 0)
    assert result["setup"]["lora_targets"] == ["q_proj", "v_proj"]


def test_estimate_table_and_zero_sharding(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "llama-3.1-8b", "--num-gpus", "8", "--zero", "3",
                       "--precision", "bf16-mixed")
    assert code == 0
    assert "peak allocated" in out and "optimizer_states" in out


def test_estimate_accepts_a_config_path(capsys, tmp_path):
    from planner.specs.catalog import load_model_config

    config, _ = load_model_config("smollm2-135m-instruct")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, out, _ = run(capsys, "estimate", "--model", str(path), "--json")
    assert code == 0 and json.loads(out)["params"]["total"] == 134_515_008


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["estimate", "--model", "qwen2.5-7", "--json"], "qwen2.5-7b"),
        (["estimate", "--model", "llama-3.1-8b", "--gpu", "h1000"], "h100"),
        (["estimate", "--model", "llama-3.1-8b", "--micro-batch", "0"], "positive"),
        (["estimate", "--model", "llama-3.1-8b", "--seq-len", "-5"], "positive"),
        (["estimate", "--model", "llama-3.1-8b", "--method", "dora"], "invalid choice"),
        (["estimate", "--model", "llama-3.1-8b", "--method", "lora", "--lora-targets", "wq"], "q_proj"),
        (["estimate", "--model", "llama-3.1-8b", "--num-gpus", "6", "--tensor-parallel", "4"], "multiple"),
        (["estimate", "--model", "llama-3.1-8b", "--lora-dropout", "1.5"], "lora_dropout"),
        (["fit", "nonexistent-model", "--gpu", "h100"], "closest"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code = None
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit directly
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_malformed_config_json(capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 4096,')
    code, _, err = run(capsys, "estimate", "--model", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "config" in err


def test_unsupported_architecture_points_to_simulate(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mamba", "hidden_size": 768, "vocab_size": 50280}))
    code, _, err = run(capsys, "estimate", "--model", str(path))
    assert code == 2 and "simulate" in err


def test_fit_reports_rows_and_fixes(capsys):
    code, out, _ = run(capsys, "fit", "qwen2.5-7b", "--gpu", "rtx-4090", "--seq-len", "4096", "--json")
    assert code == 0
    payload = json.loads(out)
    fitting = [r for r in payload["rows"] if r["fits"]]
    hf = [r for r in fitting if r["stack"] == "hf"]
    assert hf and {r["method"] for r in hf} <= {"lora", "qlora"}
    assert all(r["max_micro_batch"] >= 1 and r["max_seq_len"] >= 4096 for r in fitting)
    # torchtune's single-device full recipe (paged 8-bit AdamW stepped in backward) fits where HF's does not
    assert any(r["stack"] == "torchtune" and r["method"] == "full" and "optimizer in backward" in r["techniques"]
               for r in fitting)
    # the 405B model fits nowhere on one card: shortfall and fixes
    code, out, _ = run(capsys, "fit", "llama-3.1-405b", "--gpu", "rtx-4090", "--json")
    payload = json.loads(out)
    assert payload["short_by_bytes"] > 0
    assert any(f["change"] == "num_gpus" for f in payload["fixes"])


def test_fit_max_micro_batch_is_the_boundary(capsys):
    """The reported micro-batch fits and one more does not (the estimate agrees with fit)."""
    from planner.cost.memory.phases import training_memory
    from planner.search.fit import usable_allocated_bytes
    from planner.specs.catalog import load_gpu, load_spec
    from planner.specs.setup import TrainingSetup

    code, out, _ = run(capsys, "fit", "llama-3.2-1b", "--gpu", "a100-80gb", "--seq-len", "2048", "--json")
    row = next(r for r in json.loads(out)["rows"] if r["method"] == "lora" and r["checkpointing"] == "none" and r["stack"] == "hf")
    spec, budget = load_spec("llama-3.2-1b"), usable_allocated_bytes(load_gpu("a100-80gb"))
    setup = TrainingSetup(method="lora", seq_len=2048)
    b = row["max_micro_batch"]
    assert float(training_memory(spec, setup, b).peak_bytes) <= budget < float(training_memory(spec, setup, b + 1).peak_bytes)


def test_fit_inference(capsys):
    code, out, _ = run(capsys, "fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--inference", "--seq-len", "8192", "--json")
    result = json.loads(out)
    assert code == 0 and result["fits"] and result["max_context_len"] >= 8192 and result["max_batch"] >= 1


def test_catalog(capsys):
    code, out, _ = run(capsys, "catalog", "--json")
    payload = json.loads(out)
    assert len(payload["models"]) >= 25 and len(payload["gpus"]) >= 12


def test_estimate_as_a_process_does_not_import_torch():
    code = (
        "import sys; from planner.cli import main; main(['estimate', '--model', 'llama-3.1-8b', '--json']);"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_bytes"] > 0


def test_fit_with_a_named_stack_gets_only_that_stack(capsys):
    code, out, _ = run(capsys, "fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--stack", "torchtune", "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and {r["stack"] for r in rows} == {"torchtune"}
    best = {r["method"]: r for r in rows if r["fits"]}
    # torchtune's README (Sept 2024): 8B full 18.9, LoRA 16.2, QLoRA 7.4 GiB on a 4090 at batch 2 x 2048
    assert set(best) == {"full", "lora", "qlora"}
    code, out, _ = run(capsys, "fit", "llama-3.1-8b", "--gpu", "rtx-4090")
    assert "full: fits with torchtune" in out and "(only torchtune fits)" in out


def test_fit_on_a_gpu_without_bf16_uses_fp16(capsys):
    code, out, _ = run(capsys, "fit", "llama-3.2-1b", "--gpu", "t4", "--json")
    precisions = {r["precision"] for r in json.loads(out)["rows"]}
    assert code == 0 and not any(p.startswith("bf16") for p in precisions) and "fp16-mixed" in precisions
    code, out, _ = run(capsys, "fit", "llama-3.2-1b", "--gpu", "t4", "--precision", "fp16", "--json")
    assert code == 0 and {r["precision"] for r in json.loads(out)["rows"]} <= {"fp16", "fp16-mixed"}
    code, _, err = run(capsys, "fit", "llama-3.2-1b", "--gpu", "t4", "--precision", "bf16")
    assert code == 2 and "no bf16 units" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "estimate", "--model", "llama-3.2-1b", "--gpu", "t4", "--precision", "bf16-mixed")
    assert code == 2 and "fp16-mixed" in err


def test_recipe_details_of_peft_change_the_estimate(capsys):
    """Adapters in the base dtype (peft autocast_adapter_dtype=False) cost less than fp32 ones; trained copies
    of the head and embedding (modules_to_save) cost their weights, gradients and states (oracle panel checks
    the numbers); what is not priced is refused in one line."""
    common = ["estimate", "--model", "llama-3.1-8b", "--method", "lora", "--json"]
    peaks = {}
    for extra in ([], ["--adapter-dtype", "base"], ["--modules-to-save", "lm_head"]):
        code, out, _ = run(capsys, *common, *extra)
        assert code == 0
        peaks[" ".join(extra)] = json.loads(out)["peak_bytes"]
    assert peaks["--adapter-dtype base"] < peaks[""] < peaks["--modules-to-save lm_head"]
    head_params = 128256 * 4096
    assert peaks["--modules-to-save lm_head"] - peaks[""] >= 6 * head_params  # copy + two bf16 Adam states
    code, _, err = run(capsys, *common, "--modules-to-save", "embed_tokens", "--num-gpus", "2", "--zero", "3")
    assert code == 2 and "one GPU" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, *common, "--modules-to-save", "score")
    assert code == 2 and "modules_to_save" in err
    code, _, err = run(capsys, "estimate", "--model", "llama-3.1-8b", "--method", "lora", "--kbit-preparation")
    assert code == 2 and "kbit_preparation" in err and "not priced" in err  # priced for qlora only


def test_estimate_takes_float8_all_gather_and_the_compiled_loss(capsys):
    """The fields the cost model prices reach `estimate` by flag (``--loss-impl`` is ``--loss``'s long name)."""
    base = ["estimate", "--model", "llama-3.1-8b", "--stack", "torchtitan", "--method", "full", "--precision",
            "bf16-mixed", "--optimizer-impl", "fused", "--num-gpus", "8", "--zero", "3", "--compile", "--json"]
    code, out, _ = run(capsys, *base, "--float8")
    plain = json.loads(out)
    code2, out, _ = run(capsys, *base, "--float8", "--float8-all-gather", "--loss-impl", "compiled")
    both = json.loads(out)
    assert code == code2 == 0
    assert both["setup"]["float8_all_gather"] is True and both["setup"]["loss_impl"] == "compiled"
    assert both["peak_bytes"] != plain["peak_bytes"]
    code, out, _ = run(capsys, *base[:-1], "--float8", "--float8-all-gather")
    assert code == 0 and "fp8 all-gather" in out.splitlines()[0]


def test_estimate_header_names_the_optimizer_impl_only_where_it_means_something(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "llama-3.2-1b", "--optimizer", "galore-adamw", "--galore-rank", "64")
    assert code == 0 and "galore-adamw (rank 64)," in out.splitlines()[0] and "foreach" not in out.splitlines()[0]
    code, out, _ = run(capsys, "estimate", "--model", "llama-3.2-1b", "--optimizer-impl", "fused")
    assert code == 0 and "adamw (fused)," in out.splitlines()[0]


def test_fit_keeps_only_the_set_ups_that_use_the_asked_techniques(capsys):
    from planner.search.fit_setups import torchtitan_setups, with_techniques
    from planner.specs.catalog import load_gpu

    titan = torchtitan_setups(load_gpu("h100-sxm"), 8)
    kept = with_techniques(titan, {"float8": True, "float8_all_gather": True, "loss_impl": "compiled"})
    assert kept and all(s.float8_all_gather and s.loss_impl == "compiled" and s.compile for s in kept)
    assert len(kept) == sum(s.compile for s in titan)  # the compiled loss needs --compile
    code, out, _ = run(capsys, "fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--kbit-preparation", "--json")
    rows = json.loads(out)["rows"]
    assert code == 0 and rows and {(r["method"], r["stack"]) for r in rows} == {("qlora", "hf")}
    code, _, err = run(capsys, "fit", "llama-3.1-8b", "--gpu", "rtx-4090", "--stack", "torchtune", "--kbit-preparation")
    assert code == 2 and "kbit_preparation=True" in err and len(err.strip().splitlines()) == 1


def test_fit_lists_galore_where_it_is_priced(capsys):
    """GaLore-AdamW rows (unsharded only) carry the same peak as `estimate` of that set-up."""
    from planner.cost.memory.phases import training_memory
    from planner.specs.catalog import load_spec
    from planner.specs.setup import TrainingSetup

    code, out, _ = run(capsys, "fit", "llama-3.2-1b", "--gpu", "rtx-4090", "--seq-len", "2048", "--json")
    rows = [r for r in json.loads(out)["rows"] if r["optimizer"] == "galore-adamw"]
    assert code == 0 and {r["checkpointing"] for r in rows} == {"none", "selective", "full"}
    row = next(r for r in rows if r["checkpointing"] == "full")
    setup = TrainingSetup(method="full", precision="bf16", optimizer="galore-adamw", checkpointing="full", seq_len=2048)
    assert row["fits"] and row["peak_bytes"] == float(training_memory(load_spec("llama-3.2-1b"), setup, 1).peak_bytes)
    code, out, _ = run(capsys, "fit", "llama-3.2-1b", "--gpu", "h100-sxm", "--num-gpus", "8", "--zero", "3", "--json")
    assert code == 0 and not any(r["optimizer"] == "galore-adamw" for r in json.loads(out)["rows"])
