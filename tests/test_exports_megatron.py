"""`planner plan --export megatron`: the torchrun script of Megatron-LM's ``pretrain_gpt.py``
(``planner.io.exports_megatron``), checked against what Megatron-LM's own parser accepted.

``tests/data/megatron_args.json`` is written by ``benchmarks/megatron_args_oracle.py``: Megatron-LM
(commit in the file) ran ``parse_args`` + ``validate_args`` on each panel case's arguments and parsed
the values the planner priced. Here, without Megatron: the exporter must reproduce those accepted
lists exactly (a change to the exporter is re-validated by re-running the oracle) and emit only
option strings Megatron's parser has."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from planner.cli import main
from planner.cost.memory.megatron_tensors import padded_vocab_size
from planner.errors import PlannerError
from planner.io.exports_megatron import MEGATRON_COMMIT, PLACEHOLDERS, launch_script, megatron_arguments
from planner.specs.catalog import load_spec
from planner.specs.setup import TrainingSetup

RECORD = json.loads((Path(__file__).parent / "data" / "megatron_args.json").read_text())
BASE = {"stack": "megatron", "precision": "bf16-mixed", "optimizer": "adamw", "optimizer_impl": "fused"}
OPTIONS = set(RECORD["options"])


def _setup(case: dict) -> TrainingSetup:
    return TrainingSetup(**{**BASE, **case["setup"]})


def test_the_record_is_megatrons_at_the_exporters_commit():
    assert RECORD["megatron_commit"] == MEGATRON_COMMIT
    assert len(RECORD["cases"]) >= 8 and len(OPTIONS) > 500
    assert {"--tensor-model-parallel-size", "--recompute-granularity", "--use-distributed-optimizer"} <= OPTIONS


@pytest.mark.parametrize("name", list(RECORD["cases"]))
def test_re_export_gives_the_list_megatron_accepted(name):
    case = RECORD["cases"][name]
    assert megatron_arguments(case["model"], _setup(case), case["steps"]) == case["arguments"]


@pytest.mark.parametrize("name", list(RECORD["cases"]))
def test_megatron_parsed_what_the_planner_priced(name):
    case, parsed = RECORD["cases"][name], RECORD["cases"][name]["parsed"]
    setup = _setup(case)
    assert parsed["tensor_model_parallel_size"] == setup.tensor_parallel
    assert parsed["pipeline_model_parallel_size"] == setup.pipeline_parallel
    assert parsed["context_parallel_size"] == setup.context_parallel
    assert parsed["sequence_parallel"] == setup.sequence_parallel
    assert parsed["data_parallel_size"] == setup.data_parallel
    assert parsed["global_batch_size"] == setup.micro_batch * setup.grad_accum * setup.data_parallel
    assert parsed["use_distributed_optimizer"] == (setup.zero == 1)
    assert parsed["virtual_pipeline_model_parallel_size"] == (setup.virtual_stages if setup.virtual_stages > 1 else None)
    assert parsed["transformer_config"] == "ok"
    spec = load_spec(case["model"])
    layer, built = spec.layers[0], parsed["config"]  # Megatron's TransformerConfig: the model it builds
    assert (built["num_layers"], built["hidden_size"], built["ffn_hidden_size"]) == (
        len(spec.layers), spec.hidden_size, layer.intermediate_size)
    assert (built["num_attention_heads"], built["num_query_groups"], built["kv_channels"]) == (
        layer.num_heads, layer.num_kv_heads, layer.head_dim)
    assert built["gated_linear_unit"] == layer.gated_mlp
    assert parsed["padded_vocab_size"] == padded_vocab_size(spec.vocab_size, setup.tensor_parallel)
    assert (built["hidden_dropout"], built["attention_dropout"]) == (spec.hidden_dropout, spec.attention_dropout)


def _flags(args):
    return {a for a in args if a.startswith("--")}


def test_every_flag_the_exporter_can_emit_is_megatrons():
    """The panel plus set-ups that switch on the remaining branches (fp32 with TP, tied embeddings)."""
    extra = [("llama-3.1-8b", TrainingSetup(stack="megatron", precision="fp32", num_gpus=2, tensor_parallel=2)),
             ("qwen2.5-0.5b", TrainingSetup(**BASE, num_gpus=1, seq_len=2048)),  # tied embeddings
             ("phi-2", TrainingSetup(**BASE, num_gpus=1, seq_len=2048))]
    emitted = set()
    for case in RECORD["cases"].values():
        emitted |= _flags(megatron_arguments(case["model"], _setup(case), case["steps"]))
    for model, setup in extra:
        try:
            emitted |= _flags(megatron_arguments(model, setup, 10))
        except PlannerError as refusal:  # a refusal is one line, never a flag Megatron lacks
            assert "\n" not in str(refusal)
    assert emitted <= OPTIONS, emitted - OPTIONS
    # the exporter's source names no flag outside Megatron's parser either
    source = (Path(__file__).parents[1] / "planner" / "io" / "exports_megatron.py").read_text()
    assert set(re.findall(r'"(--[a-z0-9-]+)"', source)) <= OPTIONS


def test_the_script_quotes_placeholders_and_carries_the_arguments():
    case = RECORD["cases"]["405b uneven pp8 cp2"]
    text = launch_script(case["model"], _setup(case), case["steps"])
    assert "--nproc_per_node 8 --nnodes 32" in text and "NODE_RANK:?" in text and "MASTER_ADDR:?" in text
    for name in PLACEHOLDERS:
        assert f'"{name}"' in text and f"#   {name[1:]}" in text
    words = shlex.split(text.split("pretrain_gpt.py\" \\\n", 1)[1].replace("\\\n", " "), posix=True)
    assert words == case["arguments"]  # the placeholders stay shell variables, in double quotes


@pytest.mark.parametrize("model,setup,words", [
    ("llama-3.1-8b", TrainingSetup(stack="torchtitan", precision="bf16-mixed"), "not 'torchtitan'"),
    ("llama-3.1-8b", TrainingSetup(**BASE, num_gpus=8, zero=3), "ZeRO-3"),
    ("llama-3.1-70b", TrainingSetup(**BASE, num_gpus=8, pipeline_parallel=2, pipeline_schedule="gpipe"), "GPipe"),
    ("llama-3.1-8b", TrainingSetup(**BASE, num_gpus=12), "multiple of 8"),
    ("gemma-2-2b", TrainingSetup(**BASE), "soft-capping"),
    ("llama-3.1-8b", TrainingSetup(**{**BASE, "optimizer": "lion"}), "--optimizers adamw"),
])
def test_what_megatron_cannot_express_is_one_line(model, setup, words):
    with pytest.raises(PlannerError, match=re.escape(words)) as info:
        launch_script(model, setup, 10)
    assert "\n" not in str(info.value)


ARGV = ["plan", "--model", "llama-3.1-8b", "--stacks", "megatron", "--methods", "full", "--gpu", "h100-sxm",
        "--num-gpus", "8", "--budget-usd", "2000", "--data-pool", "20B"]


def test_plan_export_megatron_writes_an_executable_script(capsys, tmp_path):
    out = tmp_path / "run.sh"
    code = main([*ARGV, "--export", "megatron", "--out", str(out), "--save", str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "plan.json").read_text())["recommended"]
    assert os.access(out, os.X_OK) and out.read_text().startswith("#!/bin/bash\n")
    args = shlex.split(out.read_text().split("pretrain_gpt.py\" \\\n", 1)[1].replace("\\\n", " "))
    value = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    dp = rec["num_gpus"] // (rec["tensor_parallel"] * rec["pipeline_parallel"])
    assert int(value["--train-iters"]) == rec["steps"] and int(value["--seq-length"]) == rec["seq_len"]
    assert int(value["--global-batch-size"]) == rec["micro_batch"] * rec["grad_accum"] * dp
    assert int(value["--tensor-model-parallel-size"]) == rec["tensor_parallel"]
    assert _flags(args) <= OPTIONS


def test_export_megatron_refuses_a_run_on_another_stack(capsys, tmp_path):
    code = main([*ARGV[:3], "--gpu", "rtx-4090", "--budget-usd", "50", "--export", "megatron",
                 "--out", str(tmp_path / "x.sh")])
    err = capsys.readouterr().err
    assert code == 2 and "not megatron" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.sh").exists()


def test_the_cli_offers_every_export_format_of_the_library():
    from planner.cli.plan import EXPORT_CHOICES
    from planner.search.plan import EXPORT_FORMATS

    assert set(EXPORT_CHOICES) == set(EXPORT_FORMATS) and "megatron" in EXPORT_FORMATS
