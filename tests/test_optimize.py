"""The search (planner.search.*): Pareto front against brute force, known answers, infeasibility."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from planner.errors import PlannerError
from planner.loss import pruning, scaling
from planner.search import candidates, compare, convex, pareto, planning, setups
from planner.search.context import make_context
from planner.search.plan import Allocation, CompareRequest, PlanRequest

LAW = scaling.load_law("besiroglu2024")
FINE_STEP = 10 ** (1 / candidates.LADDER_FINE_PER_DECADE)  # spacing of the pre-training size ladder near the optimum


def _brute_front(f: np.ndarray) -> np.ndarray:
    """O(n^2) reference: rows not strictly dominated by any row (duplicates all kept)."""
    le = np.all(f[None, :, :] <= f[:, None, :], axis=2)  # le[j, i]: row i <= row j everywhere
    lt = np.any(f[None, :, :] < f[:, None, :], axis=2)
    return ~np.any(le & lt, axis=1)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    f = rng.integers(0, 6, size=(700, 3)).astype(float)  # many ties and duplicates
    f[::7] = f[1::7][: f[::7].shape[0]]
    mask = pareto.pareto_mask(f)
    ref = _brute_front(f)
    # same set of objective vectors; one representative per duplicated vector
    assert {tuple(r) for r in f[mask]} == {tuple(r) for r in f[ref]}
    assert len({tuple(r) for r in f[mask]}) == mask.sum()


@pytest.mark.parametrize("seed", range(4))
def test_fastest_per_group_is_pandas_groupby_idxmax(seed):
    """The set-up reduction without pandas equals ``groupby(keys, sort=False)[value].idxmax()``."""
    import pandas as pd

    from planner.search.table import SetupTable, fastest_per_group

    rng = np.random.default_rng(seed)
    n = 400
    columns = {"model": rng.integers(0, 3, n), "method": rng.choice(np.array(["full", "lora", "qlora"], dtype=object), n),
               "num_gpus": rng.choice([1, 2, 8], n), "tokens_per_step": rng.choice([2.0**19, 2.0**20, 3e5], n),
               "tokens_per_s": rng.integers(0, 6, n).astype(float)}  # many ties
    got = fastest_per_group(SetupTable(columns), ("model", "method", "num_gpus", "tokens_per_step"), "tokens_per_s")
    frame = pd.DataFrame(columns)
    idx = frame.groupby(["model", "method", "num_gpus", "tokens_per_step"], sort=False)["tokens_per_s"].idxmax()
    want = frame.loc[idx.to_numpy()].reset_index(drop=True)
    for name in columns:
        assert list(got[name]) == list(want[name]), name


def test_pareto_mask_continuous_values():
    rng = np.random.default_rng(1)
    f = rng.random((3000, 3))
    assert np.array_equal(pareto.pareto_mask(f), _brute_front(f))


SMALL = dict(
    models=("smollm2-135m-instruct",), gpu="a10g", num_gpus=2, gpu_counts=(1, 2), budget_usd=40.0,
    data_pool_tokens=3e8, selection=("all", "perplexity_proxy"), keep_fractions=(0.5,), micro_batches=(1, 4, 16),
    checkpointing=("none", "full"), zero=(0, 3), tensor_parallel=(1, 2), token_grid=4, seq_len=1024,
    global_batch_tokens=2**17,
)


def _dominated_by(points: np.ndarray, q: np.ndarray, strict: bool) -> np.ndarray:
    """For each row of q: is some row of points <= it everywhere (and < somewhere if strict)?"""
    tol = 1e-9 * np.maximum(np.abs(q), 1.0)
    le = np.all(points[None, :, :] <= q[:, None, :] + tol[:, None, :], axis=2)
    if not strict:
        return le.any(axis=1)
    lt = np.any(points[None, :, :] < q[:, None, :] - tol[:, None, :], axis=2)
    return (le & lt).any(axis=1)


def test_front_against_brute_force_on_a_small_grid():
    request = PlanRequest(**SMALL)
    flat = planning.evaluate_candidates(request, exhaustive=True)
    feasible = flat[flat["feasible"]]
    assert len(feasible) > 100
    all_points = feasible[["loss", "cost_usd", "time_s"]].to_numpy()
    plan = planning.make_plan(request)
    front = np.array([[p.loss, p.cost_usd, p.time_s] for p in plan.pareto])
    # no point of the returned front is dominated by any feasible candidate
    assert not _dominated_by(all_points, front, strict=True).any()
    # every feasible candidate is dominated by (or equal to) a point on the front
    assert _dominated_by(front, all_points, strict=False).all()
    # and the brute-force front has no point the plan's front misses
    ref = all_points[_brute_front(all_points)]
    assert _dominated_by(front, ref, strict=False).all()
    # the recommended plan is on the front and is the least loss
    rec = plan.recommended
    assert math.isclose(rec.loss, all_points[:, 0].min(), rel_tol=1e-12)
    assert any(p == rec for p in plan.pareto)


def test_dominance_pruning_finds_the_exhaustive_optimum():
    request = PlanRequest(**{**SMALL, "micro_batches": (1, 2, 4, 8, 16, 32), "checkpointing": ("none", "selective", "full")})
    fast = planning.make_plan(request)
    full = planning.make_plan(request, exhaustive=True)
    assert fast.recommended.loss == pytest.approx(full.recommended.loss, rel=1e-12)
    assert fast.recommended.cost_usd == pytest.approx(full.recommended.cost_usd, rel=1e-12)
    assert fast.search.setups_evaluated <= full.search.setups_evaluated


def test_step_decomposition_matches_direct_step_time():
    """The search's step time as a function of the accumulation (``setups.AffineStep``) equals
    step_time at every ga: exactly where the step is affine from ga = 2 on, within 2% where the
    host time's smooth exposure bends it (short sequences, full fine-tuning: host and device close)."""
    from planner.cost.timing.step_time import step_time
    from planner.specs.catalog import load_spec
    from planner.specs.setup import TrainingSetup

    ctx = make_context(PlanRequest(gpu="h100-sxm", compute_flops=1e20))
    rank = np.array([[16]])
    cases = [("qwen2.5-0.5b", 2048, np.array([1, 4, 16])[:, None], 5e-4),
             ("llama-3.1-8b", 128, np.array([1, 4])[:, None], 2e-2)]
    for name, seq, mb, tol in cases:
        spec = load_spec(name)
        for method, g, zero, tp in itertools.product(("full", "lora"), (1, 2, 16), (0, 1, 2, 3), (1, 8)):
            if tp > g or g % tp or (g == 1 and zero):
                continue
            setup = TrainingSetup(method=method, precision="bf16", num_gpus=g, zero=zero, tensor_parallel=tp)
            line = setups._affine_step(ctx, spec, setup, mb, seq, rank)
            for ga in (1, 2, 3, 8, 32, 128):
                direct = step_time(spec, setup.model_copy(update={"grad_accum": ga}), ctx.gpu, mb, seq, rank)
                np.testing.assert_allclose(line.at(ga), direct["step_time_s"], rtol=tol, err_msg=f"{name} {setup} {ga}")


# ----------------------------------------------------------------------------- known answers


def test_allocation_gp_reproduces_the_closed_form():
    for law_name, c in (("besiroglu2024", 1e21), ("hoffmann2022", 3e23), ("muennighoff2023", 1e19)):
        law = scaling.load_law(law_name)
        sol = convex.allocation_gp(law, {"compute": c / 6.0})
        n, d = scaling.optimal_closed_form(law, c)
        assert sol["params_n"] == pytest.approx(float(n), rel=1e-4)
        assert sol["tokens_d"] == pytest.approx(float(d), rel=1e-4)
        assert sol["loss"] == pytest.approx(float(scaling.optimal_loss(law, c)), rel=1e-7)
        assert sol["binding"] == ["compute"]


def test_allocation_gp_data_pool_and_memory_caps():
    c = 1e22
    n_star, d_star = scaling.optimal_closed_form(LAW, c)
    pool = float(d_star) / 4
    sol = convex.allocation_gp(LAW, {"compute": c / 6.0}, tokens_cap=pool)
    assert sol["tokens_d"] == pytest.approx(pool, rel=1e-5)  # the pool binds: D = U, N = C / (6 U)
    assert sol["params_n"] == pytest.approx(c / 6.0 / pool, rel=1e-4)
    assert set(sol["binding"]) == {"compute", "data_pool"}
    cap = float(n_star) / 3
    sol = convex.allocation_gp(LAW, {"compute": c / 6.0}, params_cap=cap)
    assert sol["params_n"] == pytest.approx(cap, rel=1e-5)
    assert sol["tokens_d"] == pytest.approx(c / 6.0 / cap, rel=1e-4)


def test_no_limits_reproduces_the_closed_form_split():
    c = 1e21
    plan = planning.make_plan(PlanRequest(compute_flops=c))
    n, d = (float(v) for v in scaling.optimal_closed_form(LAW, c))
    rec = plan.recommended
    assert plan.mode == "pretrain"
    assert n / FINE_STEP <= rec.params <= n * FINE_STEP
    assert rec.tokens == pytest.approx(c / (6 * rec.params), rel=1e-9)  # the whole budget, 6 N D = C
    assert d / FINE_STEP <= rec.tokens <= d * FINE_STEP
    assert rec.loss == pytest.approx(float(scaling.optimal_loss(LAW, c)), rel=1e-5)
    # the geometric program gives the closed form itself, and the grid agrees with it
    assert plan.continuous.params == pytest.approx(n, rel=1e-4)
    assert abs(plan.continuous.loss_rel_diff) < 1e-5
    assert [c.name for c in plan.constraints if c.binding] == ["compute"]
    # at a compute-optimal allocation the run's marginal gain per FLOP at its end equals the
    # frontier's shadow price, so the stopping rule stops at the planned end
    s = plan.stopping
    assert s.threshold == pytest.approx(float(scaling.compute_shadow_price(LAW, c)), rel=0.05)
    assert s.stop_step >= 0.97 * s.planned_steps
    # the contract's fields
    assert plan.pareto and all({"loss", "cost_usd", "time_s"} <= set(p.model_dump()) for p in plan.pareto)


def test_pool_smaller_than_optimal_tokens_repeats_as_the_data_constrained_law_says():
    c = 1e20
    _, d_star = scaling.optimal_closed_form(LAW, c)
    pool = float(d_star) / 8
    one_node = dict(gpu="h100-sxm", num_gpus=8)  # memory never binds at this size: only the pool and compute do
    # the data-constrained law's own optimum: beyond the plausibility limits (4 epochs, the law's tokens per parameter)
    one_node["beyond_evidence"] = True
    plan = planning.make_plan(PlanRequest(compute_flops=c, data_pool_tokens=pool, selection=("all",), **one_node))
    ref = scaling.compute_optimal(LAW, c, pool, repeat=True)
    rec = plan.recommended
    assert ref.epochs > 1 and rec.epochs > 1  # it repeats
    assert ref.params_n / FINE_STEP**2 <= rec.params <= ref.params_n * FINE_STEP**2
    assert rec.loss == pytest.approx(ref.loss, rel=2e-4)
    assert rec.loss >= ref.loss - 1e-9  # a grid never beats the refined optimum
    # without repetition it trains on the pool once and shrinks D accordingly
    once = planning.make_plan(PlanRequest(compute_flops=c, data_pool_tokens=pool, selection=("all",), repeat=False,
                                          **one_node))
    assert once.recommended.tokens <= pool * (1 + 1e-9)
    assert once.recommended.loss > rec.loss


def test_pool_with_a_selection_method_prunes_as_the_pruning_model_says():
    c = 1e21
    _, d_star = scaling.optimal_closed_form(LAW, c)
    pool = float(d_star) / 2
    method = "perplexity_proxy"
    plan = planning.make_plan(PlanRequest(compute_flops=c, data_pool_tokens=pool, selection=("all", method),
                                          gpu="h100-sxm", num_gpus=8, beyond_evidence=True))  # the pruning model's own grid
    ref = pruning.plan_pruning(c, pool, method, LAW)
    rec = plan.recommended
    assert rec.loss == pytest.approx(ref.loss, rel=1e-3)
    assert rec.loss >= ref.loss - 1e-6
    if ref.keep_fraction < 1:
        assert rec.selection == method
        assert rec.keep_fraction == pytest.approx(ref.keep_fraction, rel=0.25)
        assert rec.scoring_flops == pytest.approx(ref.scoring_flops, rel=1e-9)
    else:
        assert rec.selection == "all"


def _fits_any(model: str, gpu: str, method: str, request: PlanRequest, checkpointing=None) -> bool:
    """Independent oracle: does any set-up of the search space fit, by planner.cost.memory.phases directly?"""
    from planner.cost.memory.phases import training_memory
    from planner.search.fit import usable_allocated_bytes
    from planner.specs.catalog import load_gpu, load_spec
    from planner.specs.setup import TrainingSetup

    spec, budget = load_spec(model), usable_allocated_bytes(load_gpu(gpu))
    for ckpt in checkpointing or request.checkpointing:
        for mb in request.micro_batches:
            for precision in setups.FINETUNE_PRECISIONS[method]:  # full fine-tuning: mixed or pure bf16
                ga = int(setups.grad_accum_for(request.global_batch_tokens, mb, request.seq_len, 1))
                setup = TrainingSetup(method=method, precision=precision, checkpointing=ckpt,
                                      micro_batch=mb, seq_len=request.seq_len, grad_accum=ga, lora_rank=16)
                if float(training_memory(spec, setup).peak_bytes) <= budget:
                    return True
    return False


@pytest.mark.parametrize(
    "model,gpu",
    [("qwen2.5-1.5b", "a100-40gb"), ("qwen2.5-1.5b", "l4"), ("llama-3.1-8b", "a100-80gb"), ("llama-3.1-8b", "l4"),
     ("qwen2.5-32b", "a100-40gb")],
)
def test_memory_limit_switches_method_exactly_where_the_memory_model_says(model, gpu):
    # the pre-training law with the PEFT placeholder: full learns most per token, so memory alone decides
    request = PlanRequest(models=(model,), gpu=gpu, num_gpus=1, price_usd_per_hour=2.0, budget_usd=300.0, finetune_law=None)
    plan = planning.make_plan(request)
    rec = plan.recommended
    full_fits = _fits_any(model, gpu, "full", request)
    assert (rec.method == "full") == full_fits
    if not full_fits:
        lora_fits = _fits_any(model, gpu, "lora", request)
        assert rec.method == ("lora" if lora_fits else "qlora") or (lora_fits and rec.method == "qlora")
        if not lora_fits:
            assert rec.method == "qlora"
    # checkpointing: used exactly when the chosen method does not fit without it
    no_ckpt_fits = _fits_any(model, gpu, rec.method, request, checkpointing=("none",))
    if not no_ckpt_fits:
        assert rec.checkpointing != "none"
    assert rec.peak_bytes <= rec.usable_bytes
    # the constraint table says memory decided the method when it excluded full fine-tuning
    memory = next(c for c in plan.constraints if c.name == "memory_per_gpu")
    if not full_fits:
        assert memory.binding and "excluded full" in memory.source


def test_peft_efficiency_one_and_cost_objective_prefer_the_cheaper_method():
    base = dict(models=("qwen2.5-0.5b",), gpu="a100-80gb", num_gpus=1, budget_usd=50.0, data_pool_tokens=2e8,
                finetune_law=None)  # the pre-training law, where the PEFT placeholder applies
    lossy = planning.make_plan(PlanRequest(**base)).recommended
    assert lossy.method == "full"  # full fits, and LoRA learns less per token (eta = 0.5)
    equal = planning.make_plan(PlanRequest(**base, peft_efficiency={"full": 1.0, "lora": 1.0, "qlora": 1.0})).recommended
    assert equal.loss <= lossy.loss + 1e-12


# ----------------------------------------------------------------------------- infeasible


def test_memory_infeasible_says_what_is_short_and_what_to_relax():
    with pytest.raises(PlannerError, match=r"short|more than") as err:
        planning.make_plan(PlanRequest(models=("llama-3.1-70b",), gpu="rtx-4090", num_gpus=1, price_usd_per_hour=0.4,
                                       budget_usd=100.0))
    text = str(err.value)
    assert "\n" not in text and "relax" in text and "GiB" in text


def test_budget_below_one_step_is_infeasible():
    with pytest.raises(PlannerError, match="short by") as err:
        planning.make_plan(PlanRequest(models=("qwen2.5-0.5b",), gpu="h100-sxm", num_gpus=1, budget_usd=0.001))
    assert "\n" not in str(err.value)


def test_nothing_limits_tokens_is_an_error():
    with pytest.raises(PlannerError, match="nothing limits"):
        planning.make_plan(PlanRequest(models=("qwen2.5-0.5b",), gpu="h100-sxm", num_gpus=1))
    with pytest.raises(PlannerError, match="pre-training with no"):
        planning.make_plan(PlanRequest(gpu="h100-sxm"))


def test_unreachable_target_loss():
    with pytest.raises(PlannerError, match="target loss"):
        planning.make_plan(PlanRequest(models=("qwen2.5-0.5b",), gpu="h100-sxm", num_gpus=1, budget_usd=10.0,
                                       objective="cost", target_loss=1.0))


# ----------------------------------------------------------------------------- compare, objectives


def test_compare_allocations():
    base = PlanRequest(gpu="h100-sxm", num_gpus=2, budget_usd=500.0, data_pool_tokens=2e9)
    request = CompareRequest(base=base, allocations=(
        Allocation(name="1.5B LoRA all data", model="qwen2.5-1.5b", method="lora", selection="all"),
        Allocation(name="0.5B full, best half x2", model="qwen2.5-0.5b", method="full", selection="perplexity_proxy",
                   keep_fraction=0.5, epochs=2),
        Allocation(name="1.5B QLoRA", model="qwen2.5-1.5b", method="qlora", selection="all"),
        Allocation(name="too many tokens", model="qwen2.5-0.5b", num_gpus=2, micro_batch=1, tokens=1e15),
    ))
    rows = {r["name"]: r for r in compare.compare(request)}
    half = rows["0.5B full, best half x2"]
    assert half["feasible"] and half["epochs"] == pytest.approx(2.0) and half["keep_fraction"] == 0.5
    assert half["tokens"] == pytest.approx(2 * 0.5 * 2e9)
    assert rows["1.5B LoRA all data"]["method"] == "lora" and rows["1.5B QLoRA"]["method"] == "qlora"
    assert not rows["too many tokens"]["feasible"] and "infeasible" in rows["too many tokens"]["reason"]


def test_cost_objective_is_cheaper_within_tolerance():
    base = dict(models=("qwen2.5-0.5b",), gpu="h100-sxm", num_gpus=2, budget_usd=300.0)
    best = planning.make_plan(PlanRequest(**base)).recommended
    cheap = planning.make_plan(PlanRequest(**base, objective="cost", loss_tolerance=0.05)).recommended
    assert cheap.cost_usd < best.cost_usd
    assert cheap.loss <= best.loss + 0.05 + 1e-12


def test_synthetic_configs_hit_the_requested_size():
    from planner.cost.params import count_params
    from planner.specs.model import model_spec_from_config

    for n in (3e7, 1e8, 1e9, 7e9, 7e10, 1e12):
        got = count_params(model_spec_from_config(candidates.synthetic_llama_config(n))).total
        assert got == pytest.approx(n, rel=0.12)
