"""Plan questions with answers a practitioner would sign (issue 13): the recommendation stays inside
the evidence of its models (selection methods with results in the task's setting, repetition
within Muennighoff et al.'s range, tokens per parameter within the runs the law was fitted on,
fine-tuning within 1-5 epochs), says what going beyond would gain, and the task changes the
chosen subset the way the literature says (LESS for instruction tuning, never for pre-training).
"""

from __future__ import annotations

import pytest

from planner.loss import evidence, pruning, scaling
from planner.search import candidates, planning
from planner.search.plan import PlanRequest

LAW = scaling.load_law("besiroglu2024")
TPP = tuple(LAW.evidence["tokens_per_param_central90"])


def _inside(plan, task: str, max_epochs: float) -> None:
    """The checks every plan inside the evidence passes."""
    rec = plan.recommended
    assert plan.evidence is not None and not plan.evidence.beyond_evidence
    if rec.selection not in ("all",):
        method = pruning.load_method(rec.selection)
        assert evidence.applies_to(method, task), (rec.selection, task)
        lo, hi = evidence.keep_fraction_range(method)
        assert lo * (1 - 1e-9) <= rec.keep_fraction <= hi * (1 + 1e-9)
    if rec.epochs is not None:
        assert rec.epochs <= max_epochs * (1 + 1e-6)
    if plan.mode == "pretrain":
        assert TPP[0] * (1 - 1e-6) <= rec.tokens / rec.params <= TPP[1] * (1 + 1e-6)
    assert rec.loss_law and rec.loss_trust in ("fitted", "held-out", "extrapolated")


@pytest.mark.parametrize("compute", [1e21, 1e22, 1e23, 1e24])
def test_pretraining_without_a_pool_is_near_chinchilla(compute):
    plan = planning.make_plan(PlanRequest(compute_flops=compute), continuous_check=False)
    _inside(plan, "pretraining", evidence.PRETRAIN_MAX_EPOCHS)
    ratio = plan.recommended.tokens / plan.recommended.params
    assert 10 <= ratio <= 40  # Hoffmann et al. 2022: ~20 tokens per parameter at the compute optimum


@pytest.mark.parametrize("compute", [1e21, 1e23, 1e24])
def test_pretraining_with_a_small_pool_stays_inside_the_evidence(compute):
    _, d_star = scaling.optimal_closed_form(LAW, compute)
    plan = planning.make_plan(PlanRequest(compute_flops=compute, data_pool_tokens=float(d_star) / 6), continuous_check=False)
    _inside(plan, "pretraining", evidence.PRETRAIN_MAX_EPOCHS)
    assert plan.recommended.selection != "influence_lora"  # instruction-tuning evidence only
    # the plan says what going beyond would gain, and beyond is never worse
    assert plan.evidence.beyond_loss is not None and plan.evidence.beyond_gain <= 1e-9
    binding = {c.name for c in plan.constraints if c.binding}
    assert binding & {"epochs", "tokens_per_param_max", "tokens_per_param_min", "compute", "data_pool"}


def test_the_issue_example_moves_inside_the_evidence():
    """`planner plan --compute 1e23 --data-pool 100B` used to answer 149B params on 98B tokens,
    influence_lora keeping 5%, 19.7 epochs."""
    request = dict(compute_flops=1e23, data_pool_tokens=1e11)
    plan = planning.make_plan(PlanRequest(**request), continuous_check=False)
    _inside(plan, "pretraining", 4.0)
    rec = plan.recommended
    assert rec.params < 1e11 and rec.tokens / rec.params >= TPP[0]
    assert plan.evidence.beyond_gain < 0 and "influence_lora" in plan.evidence.beyond_plan
    wide = planning.make_plan(PlanRequest(**request, beyond_evidence=True), continuous_check=False)
    assert wide.recommended.loss == pytest.approx(plan.evidence.beyond_loss, rel=1e-3)  # its own size ladder
    assert wide.recommended.epochs > 4  # what the evidence rules out


def test_finetuning_on_a_consumer_gpu_repeats_within_the_fine_tuning_range():
    """`planner plan --model llama-3.1-8b --gpu rtx-4090 --budget-usd 50 --data-pool 200M` used to
    repeat the pool 57, 149 and 39 times."""
    plan = planning.make_plan(PlanRequest(models=("llama-3.1-8b",), gpu="rtx-4090", budget_usd=50, data_pool_tokens=2e8))
    _inside(plan, "instruction-tuning", evidence.FINETUNE_MAX_EPOCHS)
    rec = plan.recommended
    assert rec.method in ("lora", "qlora")  # full fine-tuning of 8B does not fit 24 GB
    assert rec.loss_law.startswith("zhang2024") and rec.loss_law.endswith("lora-model")
    assert all(q.epochs is None or q.epochs <= 5 * (1 + 1e-6) for q in plan.pareto)
    widened = planning.make_plan(PlanRequest(models=("llama-3.1-8b",), gpu="rtx-4090", budget_usd=50,
                                             data_pool_tokens=2e8, max_epochs=20))
    assert widened.recommended.epochs > 5  # the user may widen it


def test_lora_against_full_on_one_consumer_gpu_uses_each_method_s_law():
    base = dict(models=("qwen2.5-1.5b",), gpu="rtx-4090", num_gpus=1, budget_usd=20, data_pool_tokens=5e8)
    full = planning.make_plan(PlanRequest(**base, methods=("full",))).recommended
    lora = planning.make_plan(PlanRequest(**base, methods=("lora",))).recommended
    assert full.loss_law.endswith("fmt-model") and lora.loss_law.endswith("lora-model")
    assert full.precision in ("bf16-mixed", "bf16")  # full fine-tuning searched over its precisions
    for rec in (full, lora):
        assert rec.epochs <= 5 * (1 + 1e-6) and rec.peak_bytes <= rec.usable_bytes


def test_a_cluster_budget_stays_inside_the_evidence():
    plan = planning.make_plan(PlanRequest(gpu="h100-sxm", num_gpus=256, budget_usd=300_000, data_pool_tokens=1e11),
                              continuous_check=False)
    _inside(plan, "pretraining", evidence.PRETRAIN_MAX_EPOCHS)
    assert plan.recommended.num_gpus <= 256


def test_the_task_changes_the_candidate_subsets_the_way_the_literature_says():
    """LESS (Xia et al. 2024) selects for instruction tuning; perplexity filtering (Ankner et al. 2024)
    and deduplication (Lee et al. 2022) are pre-training results."""
    pool = dict(data_pool_tokens=1e9)
    seen = {}
    for task in ("pretraining", "instruction-tuning", "domain-adaptation"):
        req = PlanRequest(models=("qwen2.5-0.5b",), budget_usd=10, task=task, **pool)
        plaus = evidence.plausibility(LAW, False, task)
        data, _ = candidates.data_choices(req, LAW, plaus)
        seen[task] = set(data.selection)
    assert "perplexity_proxy" in seen["pretraining"] and "influence_lora" not in seen["pretraining"]
    assert "influence_lora" in seen["instruction-tuning"] and "perplexity_proxy" not in seen["instruction-tuning"]
    assert seen["domain-adaptation"] == {"all"}  # no catalog method has continued-pre-training results
    # and a plan follows: instruction tuning on a large pool selects with LESS where selection pays
    plan = planning.make_plan(PlanRequest(models=("llama-3.1-8b",), gpu="h100-sxm", num_gpus=8, budget_usd=300,
                                          data_pool_tokens=2e10, task="instruction-tuning"))
    assert plan.recommended.selection in ("all", "influence_lora")


# ----------------------------------------------------------------------------- training + lifetime inference


def test_inference_tokens_move_the_plan_to_a_smaller_model_trained_longer():
    """Sardana et al. 2024: with inference demand, the same loss is cheapest with a smaller model on more data."""
    plan = planning.make_plan(PlanRequest(compute_flops=1e22, inference_tokens=2e12), continuous_check=False)
    inf, rec = plan.inference, plan.recommended
    base = inf.training_only
    assert rec.params < base.params and rec.tokens > base.tokens
    assert rec.loss <= inf.target_loss * (1 + 1e-9) and inf.target_loss == pytest.approx(base.loss)
    assert inf.recommended_total < inf.training_only_total and inf.savings_fraction > 0
    assert rec.inference_flops == pytest.approx(2 * rec.params * 2e12)
    assert inf.unit == "FLOP" and inf.recommended_total == pytest.approx(rec.compute_flops + rec.inference_flops)
    # the continuous optimum of planner.loss.inference_aware is smaller still than the training-only model
    assert inf.analytic_params < base.params and inf.analytic_tokens > base.tokens
    # no demand: the plan is the training-only one
    none = planning.make_plan(PlanRequest(compute_flops=1e22, inference_tokens=0), continuous_check=False)
    assert none.inference is None and none.recommended.params == base.params


def test_inference_tokens_from_the_cli_with_json_and_plot(tmp_path, capsys):
    import json

    from planner.cli import main

    png = tmp_path / "split.png"
    assert main(["plan", "--compute", "1e21", "--inference-tokens", "1T", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inference"]["savings_fraction"] > 0 and png.stat().st_size > 10_000
    assert main(["plan", "--compute", "1e21", "--inference-tokens", "1T"]) == 0
    text = capsys.readouterr().out
    assert "training + lifetime inference" in text and "saved" in text


def test_a_fine_tuning_loss_is_the_method_s_law_at_the_fresh_token_equivalent():
    """One epoch of unselected data is D itself; the plan's loss is Zhang et al.'s law of the method
    at D / tokens per example (planner.search.finetuning)."""
    from planner.loss import finetune
    from planner.search.context import make_context
    from planner.search.finetuning import data_tokens

    req = PlanRequest(models=("llama-3.1-8b",), gpu="h100-sxm", num_gpus=8, budget_usd=100, data_pool_tokens=1e12,
                      selection=("all",), methods=("full",))
    ctx = make_context(req)
    assert data_tokens(ctx, 8e9, 1e9) == pytest.approx(1e9)  # 1e9 of a 1e12 pool: no repetition
    assert data_tokens(ctx, 8e9, 3e12) < 3e12  # three epochs are worth less than fresh data (Muennighoff et al.)
    rec = planning.make_plan(req).recommended
    law = finetune.finetune_law("full")
    assert rec.loss == pytest.approx(float(law.loss(rec.params, rec.tokens / req.tokens_per_example)), rel=1e-9)
