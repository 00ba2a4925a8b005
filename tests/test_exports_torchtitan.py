"""`planner plan --export torchtitan`: torchtitan 0.3.0's own configuration keys, as TOML, and the
launch line that applies them (``planner.io.exports_torchtitan``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from planner.cli import main
from planner.errors import PlannerError
from planner.io.exports_torchtitan import cli_arguments, launch_line, toml_text, torchtitan_config
from planner.specs.setup import TrainingSetup

TORCHTITAN_030_KEYS = {
    "": ("model_spec", "hf_assets_path", "dump_folder", "profiler", "metrics", "tokenizer", "dataloader", "optimizer",
         "lr_scheduler", "training", "parallelism", "checkpoint", "activation_checkpoint", "compile", "comm",
         "validator", "debug", "override", "loss"),
    "training": ("local_batch_size", "global_batch_size", "seq_len", "max_norm", "steps", "enable_cpu_offload",
                 "disable_cuda_graphs", "dtype", "mixed_precision_param", "mixed_precision_reduce", "gc_freq", "gc_debug"),
    "parallelism": ("data_parallel_replicate_degree", "data_parallel_shard_degree", "fsdp_reshard_after_forward",
                    "enable_fsdp_symm_mem", "tensor_parallel_degree", "enable_sequence_parallel", "spmd_backend",
                    "pipeline_parallel_degree", "module_fqns_per_model_part", "pipeline_parallel_first_stage_less_layers",
                    "pipeline_parallel_last_stage_less_layers", "pipeline_parallel_layers_per_stage",
                    "pipeline_parallel_schedule", "pipeline_parallel_schedule_csv", "pipeline_parallel_microbatch_size",
                    "context_parallel_degree", "context_parallel_load_balancer", "context_parallel_ptrr_mask_key",
                    "expert_parallel_degree"),
    "compile": ("enable", "enable_async_tensor_parallel", "components", "backend"),
    "optimizer": ("param_groups", "implementation", "optimizer_factory_kwargs_by_name"),
    "lr_scheduler": ("warmup_steps", "total_steps", "decay_ratio", "decay_type", "min_lr_factor"),
    "activation_checkpoint": (),  # a tyro subcommand union: activation_checkpoint:selective|full|memory-budget|none
}
"""torchtitan 0.3.0 (PyPI wheel torchtitan-0.3.0-py3-none-any.whl) field names, read from its dataclasses:
``trainer.py`` (``Trainer.Config``), ``config/configs.py`` (``TrainingConfig``, ``ParallelismConfig``,
``CompileConfig``), ``components/optimizer/optimizer.py`` (``OptimizersContainer.Config``),
``components/optimizer/lr_scheduler.py`` (``LRSchedulersContainer.Config``),
``distributed/activation_checkpoint.py`` (``ActivationCheckpointingConfig``)."""
_INTEGERS = {"local_batch_size", "global_batch_size", "seq_len", "steps", "warmup_steps", "data_parallel_replicate_degree",
             "data_parallel_shard_degree", "tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree",
             "pipeline_parallel_microbatch_size"}

SETUPS = {
    "fsdp compiled": TrainingSetup(stack="torchtitan", precision="bf16-mixed", optimizer_impl="fused", num_gpus=8, zero=3,
                                   micro_batch=2, grad_accum=4, seq_len=8192, compile=True, checkpointing="selective"),
    "one gpu fp32": TrainingSetup(stack="torchtitan", precision="fp32", num_gpus=1, checkpointing="full"),
    "pipelined": TrainingSetup(stack="torchtitan", precision="bf16-mixed", num_gpus=16, zero=3, tensor_parallel=2,
                               sequence_parallel=True, pipeline_parallel=4, pipeline_schedule="interleaved",
                               virtual_stages=2, micro_batch=1, grad_accum=8, context_parallel=2, seq_len=8192),
}


def _exported(setup, model="llama-3.1-70b", steps=1000):
    return torchtitan_config(model, setup, steps)


@pytest.mark.parametrize("name", SETUPS)
def test_every_section_and_key_is_torchtitan_030s(name, tmp_path):
    exported = _exported(SETUPS[name])
    text = toml_text(exported, launch_line(exported, SETUPS[name].num_gpus))
    parsed = tomllib.loads(text)
    for section, keys in parsed.items():
        if isinstance(keys, dict):
            assert section in TORCHTITAN_030_KEYS[""], section
            assert set(keys) <= set(TORCHTITAN_030_KEYS[section]), (section, set(keys) - set(TORCHTITAN_030_KEYS[section]))
            for key, value in keys.items():
                assert key not in _INTEGERS or (isinstance(value, int) and value >= 1), (key, value)
        else:
            assert section in TORCHTITAN_030_KEYS[""], section
    # the command line names the same keys, and the checkpointing subcommand
    names = {a[2:].replace("no-", "") for a in cli_arguments(exported) if a.startswith("--")} - {"module", "config"}
    for name_ in names:
        section, _, key = name_.partition(".")
        assert (key in TORCHTITAN_030_KEYS[section]) if key else section in TORCHTITAN_030_KEYS[""], name_
    assert cli_arguments(exported)[-1] == f"activation_checkpoint:{SETUPS[name].checkpointing}"


def test_batch_keys_carry_the_planned_step():
    setup = SETUPS["fsdp compiled"]
    training = _exported(setup)["toml"]["training"]
    assert training["local_batch_size"] == 2 and training["global_batch_size"] == 2 * 8 * 4
    assert training["mixed_precision_param"] == "bfloat16" and training["seq_len"] == 8192
    piped = _exported(SETUPS["pipelined"])["toml"]
    # under PP the local batch is the step's micro-batches, split into pipeline micro-batches
    assert piped["training"]["local_batch_size"] == 8 and piped["parallelism"]["pipeline_parallel_microbatch_size"] == 1
    assert piped["parallelism"]["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert piped["training"]["disable_cuda_graphs"] is True  # torchtitan 0.3.0 refuses CUDA graphs under PP
    assert piped["parallelism"]["data_parallel_shard_degree"] == 16 // (2 * 4 * 2)
    assert _exported(SETUPS["one gpu fp32"])["toml"]["training"]["mixed_precision_param"] == "float32"


@pytest.mark.parametrize("model,setup,words", [
    ("qwen2.5-7b", SETUPS["one gpu fp32"], "llama3 llama-3.1-8b (8B)"),
    ("llama-3.1-405b", SETUPS["one gpu fp32"], "float8"),
    ("llama-3.1-8b", TrainingSetup(stack="torchtune", precision="bf16"), "torchtitan set-up"),
    ("llama-3.1-8b", TrainingSetup(stack="torchtitan", precision="bf16-mixed", num_gpus=8, zero=1), "ZeRO-1"),
])
def test_what_torchtitan_cannot_launch_is_one_line(model, setup, words):
    with pytest.raises(PlannerError, match=re.escape(words)) as info:
        torchtitan_config(model, setup, 10)
    assert "\n" not in str(info.value)


ARGV = ["plan", "--model", "llama-3.1-8b", "--stacks", "torchtitan", "--methods", "full", "--gpu", "h100-sxm",
        "--num-gpus", "8", "--budget-usd", "2000", "--data-pool", "20B"]


def test_plan_export_torchtitan_writes_the_toml_and_launch_line(capsys, tmp_path):
    out = tmp_path / "run.toml"
    code = main([*ARGV, "--export", "torchtitan", "--out", str(out), "--save", str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "plan.json").read_text())["recommended"]
    config = tomllib.loads(out.read_text())
    assert config["training"]["steps"] == rec["steps"] and config["training"]["seq_len"] == rec["seq_len"]
    assert config["compile"]["enable"] == rec["setup_fields"]["compile"]
    assert config["parallelism"]["data_parallel_shard_degree"] * rec["tensor_parallel"] == rec["num_gpus"]
    launch = (tmp_path / "run.sh").read_text()
    assert "--module llama3 --config llama3_8b" in launch and f"activation_checkpoint:{rec['checkpointing']}" in launch


def test_export_torchtitan_refuses_a_run_on_another_stack(capsys, tmp_path):
    code = main([*ARGV[:3], "--gpu", "rtx-4090", "--budget-usd", "50", "--export", "torchtitan", "--out", str(tmp_path / "x.toml")])
    err = capsys.readouterr().err
    assert code == 2 and "not torchtitan" in err and len(err.strip().splitlines()) == 1


_TORCHTITAN_PATHS = [Path(p) for p in os.environ.get("PLANNER_TORCHTITAN_PATH", "/tmp/ttdeps:/tmp/ttdeps2:/tmp/tt_dl/x").split(":")]


@pytest.mark.slow  # ~10 s per command line: tyro builds torchtitan's whole config parser each time
@pytest.mark.skipif(not all(p.is_dir() for p in _TORCHTITAN_PATHS),
                    reason="torchtitan 0.3.0 unpacked locally (PLANNER_TORCHTITAN_PATH) is not available")
def test_torchtitans_own_config_manager_accepts_the_launch_lines():
    """Local only: torchtitan 0.3.0's ConfigManager parses and validates each exported command line
    (it rejects an unknown key, a wrong type and, under PP, CUDA graphs)."""
    cases = {name: cli_arguments(_exported(setup, model="llama-3.1-8b" if name == "fsdp compiled" else "llama-3.1-70b"))
             for name, setup in SETUPS.items()}
    script = ("import json, sys\nfrom torchtitan.config.manager import ConfigManager\n"
              "for name, args in json.loads(sys.argv[1]).items():\n"
              "    c = ConfigManager().parse_args(args)\n"
              "    p = c.parallelism\n"
              "    print(name, '|', type(c.activation_checkpoint).__qualname__, c.training.local_batch_size,"
              " c.training.global_batch_size, p.data_parallel_shard_degree, p.tensor_parallel_degree,"
              " p.pipeline_parallel_degree, p.context_parallel_degree, c.compile.enable, c.optimizer.implementation)\n")
    env = {**os.environ, "PYTHONPATH": ":".join(map(str, _TORCHTITAN_PATHS))}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=env,
                          timeout=300)
    if "No module named" in done.stderr:
        pytest.skip(f"torchtitan's dependencies are missing: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = dict(line.split(" | ") for line in done.stdout.splitlines() if " | " in line)
    assert parsed["fsdp compiled"].split() == ["SelectiveAC.Config", "2", "64", "8", "1", "1", "1", "True", "fused"]
    assert parsed["one gpu fp32"].split() == ["FullAC.Config", "1", "1", "1", "1", "1", "1", "False", "foreach"]
    assert parsed["pipelined"].split() == ["NoneType", "8", "8", "1", "2", "4", "2", "False", "foreach"]
