"""`planner plan --stacks`: the plan searches training stacks as `fit` does, and `--export torchtune`
writes the torchtune recipe of the recommended run."""

from __future__ import annotations

import json

import pytest
import yaml

from planner.cli import main
from planner.errors import PlannerError
from planner.search.plan import PlanRequest
from planner.search.planning import make_plan
from planner.search.stacks import candidate_setup, layout_allowed

MEMORY_BOUND = ["--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--budget-usd", "50", "--data-pool", "200M"]


def _plan(capsys, argv):
    code = main(["plan", *argv, "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.fixture(scope="module")
def plans():
    base = dict(models=("llama-3.1-8b",), gpu="rtx-4090", budget_usd=50.0, data_pool_tokens=200e6)
    return make_plan(PlanRequest(**base), continuous_check=False), make_plan(
        PlanRequest(**base, stacks=("hf", "torchtune")), continuous_check=False)


def test_default_plan_searches_the_hf_stack_only(plans):
    hf_only, _ = plans
    assert hf_only.request.stacks == ("hf",)
    assert {c.stack for c in [hf_only.recommended, *hf_only.pareto]} == {"hf"}
    assert hf_only.recommended.techniques == []


def test_more_stacks_recommend_at_least_as_good_a_run_and_name_its_stack(plans):
    hf_only, both = plans
    rec, old = both.recommended, hf_only.recommended
    assert rec.loss <= old.loss + 1e-12
    assert rec.loss < old.loss - 1e-12 or rec.cost_usd <= old.cost_usd * (1 + 1e-9)
    # on a 24 GB card torchtune's chunked CE and FSDP2 make the cheaper run here
    assert rec.stack == "torchtune" and "chunked CE" in rec.techniques
    assert rec.cost_usd < old.cost_usd
    setup = candidate_setup(rec)
    assert setup.stack == "torchtune" and setup.loss_impl == "chunked"
    assert layout_allowed("torchtune", setup.num_gpus, setup.checkpointing, setup.zero, setup.tensor_parallel)
    assert any("stacks searched: hf" in a for a in both.assumptions)


def test_the_text_names_the_stack_of_the_recommendation(capsys):
    code = main(["plan", *MEMORY_BOUND, "--stacks", "hf,torchtune"])
    out = capsys.readouterr().out
    assert code == 0
    assert "on torchtune + chunked CE" in out.splitlines()[3]


def test_torchtitan_pretraining_is_full_training_under_fsdp(capsys):
    plan = _plan(capsys, ["--compute", "1e21", "--stacks", "torchtitan"])
    assert {c["stack"] for c in [plan["recommended"], *plan["pareto"]]} == {"torchtitan"}
    rec = plan["recommended"]
    assert rec["method"] == "full" and rec["precision"] == "bf16-mixed" and rec["zero"] in (0, 3)
    assert rec["tensor_parallel"] == 1 and rec["pipeline_parallel"] == 1


@pytest.mark.parametrize("argv,words", [
    (["--model", "gpt2", "--seq-len", "1024", "--budget-usd", "50", "--stacks", "torchtune"], "torchtune stack is priced"),
    (["--compute", "1e21", "--stacks", "torchtune"], "fine-tuning recipes"),
    (["--model", "llama-3.1-8b", "--budget-usd", "50", "--stacks", "torchtitan", "--methods", "lora"], "full training"),
    (["--model", "llama-3.2-1b", "--budget-usd", "50", "--stacks", "megatron"], "stacks"),
])
def test_a_stack_that_cannot_run_the_plan_is_one_line_exit_2(capsys, argv, words):
    code = main(["plan", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and len(err.strip().splitlines()) == 1


def test_an_unpriceable_model_is_skipped_when_other_stacks_can_run(capsys):
    plan = _plan(capsys, ["--model", "gpt2,llama-3.2-1b", "--seq-len", "1024", "--budget-usd", "20", "--stacks", "torchtune"])
    assert plan["recommended"]["model"] == "llama-3.2-1b" and plan["recommended"]["stack"] == "torchtune"
    assert any("not run for gpt2" in a for a in plan["assumptions"])


def test_any_means_every_stack():
    assert PlanRequest(stacks="any").stacks == ("hf", "torchtune", "torchtitan")
    assert PlanRequest(stacks="torchtune, hf, torchtune").stacks == ("torchtune", "hf")


def test_export_torchtune_writes_the_recipe_of_the_recommended_run(capsys, tmp_path):
    out = tmp_path / "recipe.yaml"
    code = main(["plan", *MEMORY_BOUND, "--stacks", "hf,torchtune", "--export", "torchtune", "--out", str(out),
                 "--save", str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err
    recipe = yaml.safe_load(out.read_text())
    rec = json.loads((tmp_path / "plan.json").read_text())["recommended"]
    prefix = {"full": "", "lora": "lora_", "qlora": "qlora_"}[rec["method"]]
    assert recipe["model"]["_component_"] == f"torchtune.models.llama3_1.{prefix}llama3_1_8b"
    assert recipe["loss"]["_component_"] == "torchtune.modules.loss.CEWithChunkedOutputLoss"
    assert recipe["batch_size"] == rec["micro_batch"] and recipe["gradient_accumulation_steps"] == rec["grad_accum"]
    assert recipe["epochs"] * recipe["max_steps_per_epoch"] >= rec["steps"]
    assert recipe["dtype"] == rec["precision"]


def test_export_torchtune_refuses_a_run_on_another_stack(capsys, tmp_path):
    out = tmp_path / "recipe.yaml"
    code = main(["plan", *MEMORY_BOUND, "--export", "torchtune", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not torchtune" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_candidate_setup_refuses_nothing_the_plan_recommends(plans):
    for plan in plans:
        for c in [plan.recommended, *plan.pareto]:
            setup = candidate_setup(c)
            assert (setup.stack, setup.micro_batch, setup.grad_accum, setup.num_gpus) == (
                c.stack, c.micro_batch, c.grad_accum, c.num_gpus)


def test_refusal_is_a_planner_error():
    with pytest.raises(PlannerError, match="torchtune"):
        make_plan(PlanRequest(models=("gpt2",), seq_len=1024, budget_usd=50.0, stacks=("torchtune",)))


def test_pruning_keeps_the_best_run_across_stacks(plans):
    """The dominance pruning of the set-up search holds within each stack's layouts."""
    _, both = plans
    full = make_plan(both.request, exhaustive=True, continuous_check=False)
    assert full.recommended.stack == both.recommended.stack
    assert full.recommended.loss == pytest.approx(both.recommended.loss, rel=1e-9)
    assert full.recommended.cost_usd == pytest.approx(both.recommended.cost_usd, rel=1e-9)
