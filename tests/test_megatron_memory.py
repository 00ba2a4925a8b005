"""The megatron stack's memory against Megatron-LM's own accounting and Korthikanti et al. 2022.

The oracle is ``megatron/training/theoretical_memory_usage.py`` of NVIDIA/Megatron-LM at the commit in
``tests/data/megatron_theoretical.json``, evaluated by ``benchmarks/megatron_theoretical_oracle.py`` (loaded
from the fetched repository's git objects; not run in CI). Each comparison first rebuilds the oracle's
number from its formula's terms (so a change of Megatron's formula fails here), then checks that the
planner's first pipeline stage equals it plus the terms the planner prices and the theoretical function
leaves out, each named:

- weights + optimizer: learned position embeddings and linear biases (absent from its parameter count);
  its most loaded shard carries ``final_layernorm / pp`` (the planner puts the final norm on the last rank);
- activations (``compute_activation_memory``, its SP + selective branch): its per-layer ``18 + 4 ffn/h``
  is GPT's (plain MLP, multi-head attention, two dropout masks); the planner derives the layer for the
  model's shapes: a gated fc1 keeps 2I, k and v have the key/value width, no masks without dropout, norm
  statistics (fp32 per token); the embedding's token ids are whole on every tensor-parallel GPU;
- ``compute_activation_memory_without_sp`` (every other set-up): ``10 + 24/t`` per layer (GPT's MLP, not
  ``ffn_hidden_size``), no recompute and no SP modelled, the output layer's bf16 logits and final-norm
  output instead of the fp32 logits and both inputs, times 1.05.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from planner.cost.memory import megatron_stack as ms
from planner.cost.memory import megatron_tensors as mt
from planner.cost.memory.parallel import korthikanti_layer_activation_bytes
from planner.cost.memory.phases import training_memory
from planner.specs.catalog import load_spec
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup
from tests.cli_run import assert_one_line_error, run

FIXTURE = json.loads((Path(__file__).parent / "data" / "megatron_theoretical.json").read_text())
ROWS = {row["name"]: row for row in FIXTURE["rows"]}


def _spec(model: str):
    if model == "gpt3-175b-like":
        return model_spec_from_config(FIXTURE["gpt3_175b_like_config"], model)
    return load_spec(model)


def _case(name: str):
    row = ROWS[name]
    fields = dict(row["setup"])
    spec = _spec(fields.pop("model"))
    schedule = "interleaved" if fields["virtual_stages"] > 1 else "1f1b"
    setup = TrainingSetup(stack="megatron", precision="bf16-mixed", pipeline_schedule=schedule, **fields)
    rank = ms.ranks(spec, setup)[0]
    _, components = ms.rank_phases_and_components(spec, setup, rank, setup.micro_batch, setup.seq_len)
    return row, spec, setup, rank, {k: float(v) for k, v in components.items()}


def _oracle_factor(setup: TrainingSetup) -> float:
    """The theoretical function's in-flight factor on the L layers of the first stage."""
    p, v, m = setup.pipeline_parallel, setup.virtual_stages, setup.grad_accum
    if v > 1:
        return 1 + (p - 1) / (p * v)
    return min(1.0, m / p) if p > 1 else 1.0


@pytest.mark.parametrize("name", sorted(ROWS))
def test_weights_and_optimizer_equal_megatron_theoretical(name):
    row, spec, setup, rank, comp = _case(name)
    t, p, d = setup.tensor_parallel, setup.pipeline_parallel, setup.data_parallel
    per_param = 6 + 12 / d if setup.zero == 1 else 18  # the theoretical function's bf16 bytes per parameter
    ours = comp["weights"] + comp["gradients"] + comp["master_weights"] + comp["optimizer_states"]
    # what it leaves out or places elsewhere, in parameters of the first stage's GPU
    positions = spec.position_embeddings * spec.hidden_size
    biases = sum(ms.layer_params_per_gpu(spec.layers[i], t)
                 - sum(lin.weight_params for lin in spec.layers[i].linears) / t
                 - sum(dim * (2 if bias else 1) for dim, bias in spec.layers[i].norms) for i in rank.layers)
    final_norm = spec.final_norm[0] * (2 if spec.final_norm[1] else 1)
    moved = -final_norm / p if p > 1 else 0.0
    assert ours == pytest.approx(row["weight_and_optimizer_bytes"] + per_param * (positions + biases + moved), rel=1e-12)
    if spec.model_type == "llama":  # nothing left out: equal to the byte
        assert ours == pytest.approx(row["weight_and_optimizer_bytes"] + per_param * moved, rel=1e-12)


def _oracle_rebuilt(row, spec, setup) -> float:
    """The theoretical function's activation bytes from its terms (Korthikanti Table 2 / sec. 4.3 as coded)."""
    s, b, h = setup.seq_len, setup.micro_batch, spec.hidden_size
    t, p, L = setup.tensor_parallel, setup.pipeline_parallel, spec.num_layers
    ffn, vocab = spec.layers[0].intermediate_size, row["padded_vocab_size"]
    if row["report_branch"] == "with_sp":
        body = (L * s * b * h * (18 + 4 * ffn / h) + (8 * s * b + s * b * h) * p) * _oracle_factor(setup)
        head = 4 * s * b * h * (1 + vocab / h) if p == 1 else 0.0
        return (body + head) / t
    body = (L * s * b * h * (10 + 24 / t) + (8 * s * b + s * b * h) * p) * _oracle_factor(setup)
    head = 2 * (s * b * vocab / t + s * b * h) if p == 1 else 0.0
    return 1.05 * (body + head)


def _left_out_per_token(spec, setup, vocab: int, branch: str) -> tuple[float, float, float]:
    """(per layer, embedding, head) bytes per token the planner prices beyond the theoretical function."""
    layer, t, sp, h = spec.layers[0], setup.tensor_parallel, setup.sequence_parallel, spec.hidden_size
    w, stats = 2, mt.NORM_STAT_BYTES[layer.norm_kind]
    masks = 1 if (spec.hidden_dropout if setup.dropout is None else setup.dropout) > 0 else 0
    fc1, act = mt.mlp_width_elements(layer)
    ids = 8 * (2 if spec.position_embeddings else 1)
    ours_layer = mt.layer_saved_bytes_per_token(layer, w, t, sp, setup.checkpointing, setup.attention,
                                                spec.hidden_dropout, spec.attention_dropout, setup.seq_len)
    ours_head = (2 * h + stats + 2 * h) / (t if sp else 1) + 4 * vocab / t
    if branch == "with_sp":
        named = (2 * stats  # two norms' fp32 statistics
                 - 2 * h * (1 - masks)  # no residual-dropout masks without dropout
                 + w * (layer.q_dim + 2 * layer.kv_dim) - 6 * h + w * layer.q_dim - 2 * h  # GQA / q width
                 + w * (fc1 + act) - 4 * layer.intermediate_size) / t  # gated fc1 keeps 2I
        assert ours_layer - (18 * h + 4 * layer.intermediate_size) / t == pytest.approx(named, rel=1e-12)
        return named, ids + h * masks / t - (8 + h) / t, ours_head - 4 * h * (1 + vocab / h) / t
    oracle_layer = 10 * h + 24 * h / t
    if setup.checkpointing != "full" and not sp:
        core = 0 if setup.checkpointing == "selective" else mt.LSE_BYTES * layer.num_heads
        named = (2 * stats - 2 * h * (1 - masks)
                 + (w * (layer.q_dim + 2 * layer.kv_dim) - 6 * h + w * layer.q_dim - 2 * h
                    + w * (fc1 + act) - 16 * h + core) / t)  # its 24/t is GPT's 4h MLP
        assert ours_layer - oracle_layer == pytest.approx(named, rel=1e-12)
    embedding = ids + h * masks / (t if sp else 1) - (8 + h)
    return ours_layer - oracle_layer, embedding, ours_head - 2 * (vocab / t + h)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_activations_equal_megatron_theoretical_plus_named_terms(name):
    row, spec, setup, rank, comp = _case(name)
    oracle = row["activation_bytes_with_sp"] if row["report_branch"] == "with_sp" else row["activation_bytes_without_sp"]
    assert _oracle_rebuilt(row, spec, setup) == pytest.approx(oracle, rel=1e-12)  # our reading of its formula
    tokens = setup.micro_batch * setup.seq_len
    layer, embedding, head = _left_out_per_token(spec, setup, row["padded_vocab_size"], row["report_branch"])
    n, p = float(rank.in_flight), setup.pipeline_parallel
    base = oracle if row["report_branch"] == "with_sp" else oracle / 1.05  # the planner adds no 5% margin
    expected = base + n * tokens * (len(rank.layers) * layer + embedding) + (tokens * head if p == 1 else 0.0)
    assert comp["activations"] == pytest.approx(expected, rel=1e-12)


def test_gpt_sp_selective_equals_the_theoretical_function_within_norm_statistics():
    """GPT-3's shapes are the paper's: the only difference left is the norms' fp32 statistics and the ids."""
    row, spec, setup, rank, comp = _case("gpt3-175b tp8 pp8 sp selective")
    assert comp["activations"] / row["activation_bytes_with_sp"] - 1 == pytest.approx(0, abs=2e-4)


@pytest.mark.parametrize("tp,sp", [(1, False), (8, False), (8, True)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_gpt_layer_equals_korthikanti_table2_with_unfused_attention(tp, sp, recompute):
    """Megatron's unfused core attention (attention eager) on GPT's layer: Table 2 of the paper,
    plus the two LayerNorms' fp32 mean and rstd (16 bytes per token) the paper leaves out."""
    spec = _spec("gpt3-175b-like")
    layer, s, b = spec.layers[0], 2048, 1
    ours = mt.layer_saved_bytes_per_token(layer, 2, tp, sp, recompute, "eager", 0.1, 0.1, s) * s * b
    paper = korthikanti_layer_activation_bytes(s, b, spec.hidden_size, layer.num_heads, tp, sp, recompute)
    stats = 0 if recompute == "full" else 16 * s * b / (tp if sp else 1)
    assert ours == pytest.approx(float(paper) + stats, rel=1e-12)


def test_flash_attention_has_no_score_sized_term():
    spec = load_spec("llama-3.1-8b")
    layer = spec.layers[0]
    short = mt.layer_saved_bytes_per_token(layer, 2, 1, False, "none", "sdpa", 0, 0, 1024)
    long = mt.layer_saved_bytes_per_token(layer, 2, 1, False, "none", "sdpa", 0, 0, 131072)
    assert short == long
    assert mt.layer_saved_bytes_per_token(layer, 2, 1, False, "none", "sdpa") - mt.layer_saved_bytes_per_token(
        layer, 2, 1, False, "selective", "sdpa") == mt.LSE_BYTES * layer.num_heads


def test_distributed_optimizer_bytes_per_param_are_the_docs_table():
    for precision, plain, sharded in (("bf16-mixed", 18, (6, 12)), ("fp32", 16, (8, 8))):
        assert sum(mt.state_bytes_per_param(precision, False, 8)) == plain
        assert sum(mt.state_bytes_per_param(precision, True, 8)) == sharded[0] + sharded[1] / 8


def test_context_parallel_divides_the_sequence_and_shards_the_optimizer_over_dp_x_cp():
    spec = load_spec("llama-3.1-8b")
    base = dict(stack="megatron", precision="bf16-mixed", tensor_parallel=2, sequence_parallel=True,
                checkpointing="selective", seq_len=8192, zero=1)
    one = training_memory(spec, TrainingSetup(num_gpus=4, **base))
    two = training_memory(spec, TrainingSetup(num_gpus=8, context_parallel=2, **base))
    assert float(two.components["activations"]) == pytest.approx(float(one.components["activations"]) / 2, rel=1e-12)
    assert float(two.components["optimizer_states"]) == pytest.approx(float(one.components["optimizer_states"]) / 2)


def test_interleaving_raises_the_first_stage_by_the_paper_factor():
    spec = load_spec("llama-3.1-70b")
    base = dict(stack="megatron", precision="bf16-mixed", num_gpus=32, tensor_parallel=8, pipeline_parallel=4,
                sequence_parallel=True, checkpointing="selective", seq_len=4096, grad_accum=32)
    plain = TrainingSetup(**base)
    inter = TrainingSetup(pipeline_schedule="interleaved", virtual_stages=5, **base)
    first = [ms.rank_phases_and_components(spec, s, ms.ranks(spec, s)[0], 1, 4096)[1]["activations"]
             for s in (plain, inter)]
    assert float(first[1] / first[0]) == pytest.approx(1 + 3 / 20, rel=1e-12)


def test_peak_is_the_worst_rank_and_vectorized():
    spec = load_spec("llama-3.1-8b")
    setup = TrainingSetup(stack="megatron", precision="bf16-mixed", num_gpus=8, tensor_parallel=2,
                          pipeline_parallel=2, sequence_parallel=True, checkpointing="selective", seq_len=4096,
                          grad_accum=8)
    b = np.array([1, 2, 4])
    mem = training_memory(spec, setup, micro_batch=b)
    worst = [max(float(np.max(list(ms.rank_phases_and_components(spec, setup, r, x, 4096)[0].values())))
                 for r in ms.ranks(spec, setup)) for x in b]
    assert np.allclose(mem.peak_bytes, worst, rtol=1e-12)
    assert np.all(np.diff(mem.peak_bytes) > 0)


def test_cli_estimate_answers_memory_and_time():
    code, out, err = run("estimate", "--model", "llama-3.1-8b", "--stack", "megatron", "--precision", "bf16-mixed",
                         "--num-gpus", "8", "--tensor-parallel", "2", "--pipeline-parallel", "2",
                         "--sequence-parallel", "--checkpointing", "selective", "--seq-len", "4096",
                         "--micro-batch", "1", "--grad-accum", "8", "--gpu", "h100-sxm")
    assert code == 0, err
    assert "peak allocated" in out and "step" in out


@pytest.mark.parametrize("flags,needle", [
    (["--precision", "bf16"], "precision"),
    (["--precision", "bf16-mixed", "--method", "lora"], "method"),
    (["--precision", "bf16-mixed", "--zero", "3"], "zero"),
    (["--precision", "bf16-mixed", "--optimizer", "adamw-8bit"], "optimizer"),
])
def test_cli_refuses_unpriced_in_one_line(flags, needle):
    assert_one_line_error(run("estimate", "--model", "llama-3.1-8b", "--stack", "megatron", "--num-gpus", "8", *flags),
                          needle)


def test_mixture_of_experts_refused_in_one_line():
    assert_one_line_error(run("estimate", "--model", "mixtral-8x7b", "--stack", "megatron", "--precision",
                              "bf16-mixed", "--num-gpus", "8", "--tensor-parallel", "8"), "mixtures of experts")


# ----------------------------------------------------------------------------- published measurements

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_memory_published.py"


@pytest.fixture(scope="module")
def bench():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_memory_published_megatron", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def megatron_rows(bench):
    import pandas as pd

    table = pd.read_csv(bench.CSV)
    return bench, table[table["stack"] == "megatron"]


def test_megatron_ci_measurements_within_targets(megatron_rows):
    """Megatron-LM's CI golden values (allocated peak of the last pipeline rank, DGX A100/H100): every
    row the planner can express, within the issue's targets (median 5%, max 15%); all sit under, by
    about the ~0.1 GiB of cuBLAS / TE workspaces the caching allocator counts (the planner books them
    in the fixed context part, ``models_catalog/device_overheads.json``)."""
    bench, rows = megatron_rows
    compared, skipped = bench.compare_all(rows)
    reasons = dict(skipped)
    assert set(reasons) == {"megatron_pr482-001", "megatron_functional_tests-010"}, reasons
    errors = [abs(c.error) for c in compared]
    assert len(compared) >= 16
    assert np.median(errors) <= 0.05 and max(errors) <= 0.15
    big = [c for c in compared if c.measured_gib > 40]  # the 7B cases: the fixed part is negligible
    assert len(big) == 4 and all(abs(c.error) <= 0.03 for c in big)


def test_megatron_states_equal_the_allocated_bytes_after_the_step(megatron_rows):
    """The second counter of the same runs: ``mem-allocated-bytes`` after the optimizer step is the
    last rank's weights, fp32 gradient buffer, master copy and Adam moments plus the allocator-counted
    workspaces (25-140 MiB). The interleaved 7B rows (8 chunks per rank) hold 1.1-1.4 GiB more that
    nothing priced explains (listed, not fitted)."""
    import re

    bench, rows = megatron_rows
    for _, row in rows.iterrows():
        try:
            spec, setup = bench.setup_for(row)
        except bench.Unexpressible:
            continue
        rank = ms.ranks(spec, setup)[-1]
        _, comp = ms.rank_phases_and_components(spec, setup, rank, setup.micro_batch, setup.seq_len)
        static = float(comp["weights"] + comp["gradients"] + comp["master_weights"] + comp["optimizer_states"])
        after = int(re.search(r"mem-allocated-bytes after the step (\d+)", row["notes"]).group(1))
        gap = (after - static) / 2**20
        if row["id"] in ("megatron_functional_tests-001", "megatron_functional_tests-002"):
            assert 1000 < gap < 1500, (row["id"], gap)
        else:
            assert 0 < gap < 160, (row["id"], gap)
