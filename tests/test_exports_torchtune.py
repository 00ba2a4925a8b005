"""The torchtune recipe config `estimate --export torchtune` writes, checked against torchtune 0.6.1 itself:
its keys are those of the shipped recipe configs, every component resolves, the model section builds
torchtune's own model (on the meta device) with the trainable parameters the estimate priced."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from planner.cli import main
from planner.errors import PlannerError
from planner.io.exports_torchtune import recipe_name, torchtune_recipe_config
from planner.specs.setup import TrainingSetup

torchtune = pytest.importorskip("torchtune")


def _shipped(family: str, name: str) -> tuple[dict, str]:
    configs = Path(inspect.getfile(torchtune)).parent.parent / "recipes" / "configs"
    text = (configs / family / name).read_text()
    return yaml.safe_load(text), text


def _resolve(path: str):
    from torchtune.config._utils import _get_component_from_path

    return _get_component_from_path(path)


CASES = [
    ("llama-3.1-8b", dict(method="lora", loss_impl="chunked", checkpointing="full"), "llama3_1", "8B_lora_single_device.yaml"),
    ("llama-3.1-8b", dict(method="qlora", loss_impl="chunked", checkpointing="full", compile=True, packed=True),
     "llama3_1", "8B_qlora_single_device.yaml"),
    ("llama-3.1-8b", dict(method="full", optimizer="paged-adamw-8bit", optimizer_in_backward=True, loss_impl="chunked",
                          checkpointing="full"), "llama3_1", "8B_full_single_device.yaml"),
    ("llama-3.2-3b-instruct", dict(method="full", num_gpus=4, zero=3, optimizer_impl="fused", loss_impl="chunked"),
     "llama3_2", "3B_full.yaml"),
]


@pytest.mark.parametrize("model,fields,family,shipped", CASES, ids=[c[3] for c in CASES])
def test_keys_and_components_are_torchtunes(model, fields, family, shipped):
    setup = TrainingSetup(stack="torchtune", **fields)
    ours, (theirs, text) = torchtune_recipe_config(model, setup), _shipped(family, shipped)
    assert set(ours) - set(theirs) <= {"optimizer_in_bwd"}
    assert f"tune run {recipe_name(setup)}" in text or f"{recipe_name(setup)} --config" in text
    assert set(ours["model"]) <= set(theirs["model"])
    for section in ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "loss", "metric_logger"):
        component = _resolve(ours[section]["_component_"])
        keys = set(ours[section]) - {"_component_"}
        parameters = inspect.signature(component).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        assert accepts_any or keys <= set(parameters), (section, keys - set(parameters))


def test_the_exported_model_builds_with_the_trainable_parameters_priced():
    import torch
    from torchtune.modules.peft import get_adapter_params

    from planner.cost.estimate import estimate
    from planner.specs.catalog import load_spec

    setup = TrainingSetup(stack="torchtune", method="lora", lora_rank=8, lora_targets="q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    section = dict(torchtune_recipe_config("llama-3.2-1b", setup)["model"])
    builder = _resolve(section.pop("_component_"))
    with torch.device("meta"):
        model = builder(**section)
    adapters = sum(p.numel() for p in get_adapter_params(model).values())
    assert adapters == estimate(load_spec("llama-3.2-1b"), setup)["params"]["trainable"]


def test_cli_writes_the_recipe_and_refuses_what_torchtune_cannot_run(tmp_path, capsys):
    out = tmp_path / "run.yaml"
    code = main(["estimate", "--model", "llama-3.2-1b", "--stack", "torchtune", "--method", "lora",
                 "--export", "torchtune", "--out", str(out)])
    assert code == 0 and yaml.safe_load(out.read_text())["model"]["_component_"].endswith("lora_llama3_2_1b")
    assert "tune run lora_finetune_single_device" in capsys.readouterr().err
    with pytest.raises(PlannerError, match="--stack torchtune"):
        torchtune_recipe_config("llama-3.2-1b", TrainingSetup())
    with pytest.raises(PlannerError, match="no torchtune builder"):
        torchtune_recipe_config("gpt2", TrainingSetup(stack="torchtune"))
