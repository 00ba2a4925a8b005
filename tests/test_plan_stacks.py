"""`planner plan --stacks`: the plan searches training stacks as `fit` does, and `--export torchtune`
writes the torchtune recipe of the recommended run."""

from __future__ import annotations

import json

import pytest
import yaml

from planner.cli import main
from planner.errors import PlannerError
from planner.search.plan import Candidate, PlanRequest
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
    (["--model", "qwen3-30b-a3b", "--budget-usd", "500", "--methods", "full", "--stacks", "megatron"],
     "mixtures of experts"),
    (["--model", "llama-3.1-8b", "--budget-usd", "50", "--stacks", "megatron", "--methods", "lora"], "full training"),
    (["--model", "llama-3.2-1b", "--budget-usd", "50", "--stacks", "nemo"], "stacks"),
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
    assert PlanRequest(stacks="any").stacks == ("hf", "torchtune", "torchtitan", "megatron")
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


# ----------------------------------------------------------------------------- techniques the search covers


TITAN = dict(models=("llama-3.1-8b",), gpu="h100-sxm", num_gpus=8, budget_usd=2000.0, data_pool_tokens=20e9,
             stacks=("torchtitan",), methods=("full",))


@pytest.fixture(scope="module")
def titan_plans():
    return {c: make_plan(PlanRequest(**TITAN, compile=c), continuous_check=False) for c in (None, False, True)}


def test_compile_is_searched_on_the_stacks_that_price_it(titan_plans):
    free, eager, compiled = titan_plans[None], titan_plans[False], titan_plans[True]
    for plan, want in ((eager, {False}), (compiled, {True})):
        assert {c.setup_fields["compile"] for c in [plan.recommended, *plan.pareto]} == want
    # compiled runs are never slower in the time model, so the free search takes them where they fit
    assert free.recommended.setup_fields["compile"] is True and "compiled" in free.recommended.techniques
    assert free.recommended.loss <= eager.recommended.loss + 1e-12
    assert candidate_setup(free.recommended).compile is True
    # torchtitan 0.3 compiles the loss with compile.enable (PR #1033): the compiled variant prices it
    from planner.search.stacks import priced, titan_loss_impl

    loss = "compiled" if priced("torchtitan", "loss_impl", "compiled") else "standard"
    assert titan_loss_impl(True) == loss and titan_loss_impl(False) == "standard"
    for plan in titan_plans.values():
        for c in [plan.recommended, *plan.pareto]:
            assert c.setup_fields["loss_impl"] == (loss if c.setup_fields["compile"] else "standard")
    assert candidate_setup(compiled.recommended).loss_impl == loss


def test_compiled_twin_pruning_matches_the_exhaustive_search(titan_plans):
    """Eager set-ups are evaluated only where their compiled twin does not fit (planner.search.stacks)."""
    pruned = titan_plans[None]
    full = make_plan(pruned.request, exhaustive=True, continuous_check=False)
    assert full.recommended.setup_fields == pruned.recommended.setup_fields
    assert full.recommended.cost_usd == pytest.approx(pruned.recommended.cost_usd, rel=1e-9)
    assert pruned.search.rows_feasible < full.search.rows_feasible  # eager rows where the compiled twin fits: dropped


def test_paged_8bit_adamw_in_backward_only_where_one_micro_batch_fills_the_step():
    base = dict(models=("llama-3.1-8b",), gpu="rtx-4090", budget_usd=50.0, data_pool_tokens=200e6, stacks=("torchtune",),
                methods=("full",), optimizers=("adamw", "adamw-8bit"))
    small = make_plan(PlanRequest(**base, global_batch_tokens=8192), continuous_check=False).recommended
    assert small.optimizer == "paged-adamw-8bit" and small.setup_fields["optimizer_in_backward"] is True
    assert small.grad_accum == 1 and "optimizer in backward" in small.techniques
    setup = candidate_setup(small)  # a valid TrainingSetup: no accumulation with the step in backward
    assert setup.optimizer_in_backward and setup.grad_accum == 1
    # the default 512K-token step needs accumulation on 24 GB cards: no in-backward candidate at all
    big = make_plan(PlanRequest(**base), continuous_check=False)
    assert not any(c.setup_fields.get("optimizer_in_backward") for c in [big.recommended, *big.pareto])


def test_paged_8bit_alone_on_the_hf_stack_is_one_line(capsys):
    code = main(["plan", "--model", "llama-3.2-1b", "--budget-usd", "10", "--optimizers", "paged-adamw-8bit"])
    err = capsys.readouterr().err
    assert code == 2 and "torchtune" in err and len(err.strip().splitlines()) == 1


def test_packed_data_runs_torchtune_packed_and_exports_it(capsys, tmp_path):
    out = tmp_path / "recipe.yaml"
    code = main(["plan", *MEMORY_BOUND, "--stacks", "torchtune", "--packed", "--export", "torchtune", "--out", str(out),
                 "--save", str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "plan.json").read_text())["recommended"]
    assert rec["setup_fields"]["packed"] is True and "packed" in rec["techniques"]
    assert yaml.safe_load(out.read_text())["dataset"]["packed"] is True
    # the block-causal mask costs memory: the unpacked twin of the same set-up is lighter
    from planner.cost.memory.device import peak_allocated_bytes
    from planner.specs.catalog import load_spec

    setup = candidate_setup(Candidate.model_validate(rec))
    spec = load_spec("llama-3.1-8b")
    assert peak_allocated_bytes(spec, setup) > peak_allocated_bytes(spec, setup.model_copy(update={"packed": False}))


def test_saved_plans_without_setup_fields_read_back_with_the_stacks_defaults(plans):
    _, both = plans
    old = both.recommended.model_copy(update={"setup_fields": {}})
    setup = candidate_setup(old)
    assert setup.stack == old.stack and (setup.loss_impl == "chunked") == (old.stack == "torchtune")


def test_activation_offload_only_where_its_twin_on_the_gpu_does_not_fit():
    """torchtune's activation offloading enters where keeping the checkpoints on the GPU does not fit,
    and the pruned search agrees with the exhaustive one."""
    request = PlanRequest(models=("llama-3.1-8b",), gpu="rtx-4090", num_gpus=1, budget_usd=50.0, data_pool_tokens=200e6,
                          stacks=("torchtune",), methods=("qlora",), seq_len=32768, micro_batches=(1,))
    plan = make_plan(request, continuous_check=False)
    rec = plan.recommended
    assert rec.setup_fields["activation_offload"] is True and rec.checkpointing == "full"
    assert "activation offload" in rec.techniques
    full = make_plan(request, exhaustive=True, continuous_check=False)
    assert full.recommended.setup_fields == rec.setup_fields
    assert full.recommended.cost_usd == pytest.approx(rec.cost_usd, rel=1e-9)
    short = make_plan(request.model_copy(update={"seq_len": 2048}), continuous_check=False)
    assert not any(c.setup_fields.get("activation_offload") for c in [short.recommended, *short.pareto])


# ----------------------------------------------------------------------------- Megatron

def test_megatron_plans_tensor_parallel_with_sequence_parallel_and_its_distributed_optimizer():
    """A 70B full fine-tune on 64 H100s with --stacks megatron: tensor parallelism with sequence
    parallelism on, ZeRO 0 or 1 (the distributed optimizer), the candidate's set-up read back exactly,
    and the pruned search agrees with the exhaustive one."""
    from planner.cost.memory.phases import training_memory
    from planner.specs.catalog import load_spec

    request = PlanRequest(models=("llama-3.1-70b",), methods=("full",), gpu="h100-sxm", num_gpus=64, budget_usd=20000.0,
                          data_pool_tokens=20e9, stacks=("megatron",))
    plan = make_plan(request, continuous_check=False)
    rec = plan.recommended
    setup = candidate_setup(rec)
    assert setup.stack == "megatron" and setup.zero in (0, 1) and setup.tensor_parallel > 1 and setup.sequence_parallel
    assert all(c.stack == "megatron" and (c.tensor_parallel == 1 or c.sequence_parallel) for c in plan.pareto)
    assert float(training_memory(load_spec("llama-3.1-70b"), setup, setup.micro_batch).peak_bytes) == pytest.approx(
        rec.peak_bytes, rel=1e-9)
    full = make_plan(request, exhaustive=True, continuous_check=False)
    assert full.recommended.cost_usd == pytest.approx(rec.cost_usd, rel=1e-9)
    assert full.recommended.loss == pytest.approx(rec.loss, rel=1e-9)


def test_megatron_takes_pipeline_stages_where_tensor_parallelism_alone_does_not_fit():
    request = PlanRequest(models=("llama-3.1-405b",), methods=("full",), gpu="h100-sxm", num_gpus=256,
                          budget_usd=500000.0, data_pool_tokens=20e9, stacks=("megatron",), micro_batches=(1,))
    rec = make_plan(request, continuous_check=False).recommended
    assert rec.stack == "megatron" and rec.pipeline_parallel > 1 and rec.tensor_parallel == 8 and rec.sequence_parallel


def test_fit_lists_megatron_and_its_fix_uses_its_own_sharding(capsys):
    code = main(["fit", "llama-3.1-8b", "--gpu", "h100-sxm", "--stack", "megatron", "--seq-len", "4096", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and {r["stack"] for r in payload["rows"]} == {"megatron"}
    assert {r["checkpointing"] for r in payload["rows"]} == {"none", "selective", "full"}
    assert not any(r["fits"] for r in payload["rows"])  # 18 bytes per parameter on one GPU: 134 GiB of states
    fix = next(f for f in payload["fixes"] if f["change"] == "num_gpus")
    assert "distributed optimizer" in fix["fix"]


@pytest.mark.parametrize("export", ["hf-trainer", "deepspeed", "accelerate", "torchtitan"])
def test_a_megatron_run_is_not_exported_as_another_stack(capsys, tmp_path, export):
    code = main(["plan", "--model", "llama-3.1-8b", "--methods", "full", "--gpu", "h100-sxm", "--num-gpus", "8",
                 "--stacks", "megatron", "--budget-usd", "500", "--export", export, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "stack megatron" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_compare_pins_an_allocation_to_megatron(capsys):
    code = main(["compare", "--model", "llama-3.1-8b", "--gpu", "h100-sxm", "--num-gpus", "8", "--budget-usd", "500",
                 "--alloc", "a:method=full,stack=megatron,zero=1", "--alloc", "b:method=full,stack=torchtitan,zero=3",
                 "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = {r["name"]: r for r in json.loads(out.out)["rows"]}
    assert rows["a"]["stack"] == "megatron" and rows["a"]["zero"] == 1 and rows["b"]["stack"] == "torchtitan"


def test_torchtitan_can_replicate_its_fsdp2_module():
    """torchtitan runs data_parallel_replicate_degree = GPUs with shard degree 1 (``zero=0``): searched when the
    request allows ZeRO-0, and exported as the replicate degree."""
    from planner.io.exports_torchtitan import _parallelism

    assert layout_allowed("torchtitan", 8, "none", 0, 1) and not layout_allowed("torchtune", 8, "none", 0, 1)
    request = PlanRequest(compute_flops=1e20, gpu="h100-sxm", num_gpus=8, gpu_counts=(8,), stacks=("torchtitan",),
                          zero=(0,))
    rec = make_plan(request, continuous_check=False).recommended
    assert rec.stack == "torchtitan" and rec.zero == 0 and rec.num_gpus == 8
    parallelism = _parallelism(candidate_setup(rec))
    assert parallelism["data_parallel_replicate_degree"] == 8 and parallelism["data_parallel_shard_degree"] == 1
