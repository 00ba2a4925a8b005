"""Memory of the parallel layouts (pipeline, sequence, context, expert parallelism) per GPU.

Published reference: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv 2205.05198): Table 2's activation bytes per layer and sec. 4.2.3's
first pipeline stage, for the GPT-3 175B, 530B and 1T configurations of their Table 3. The rest
are hand derivations from the definitions (stage splits, in-flight micro-batches, shards).
"""

import numpy as np
import pytest

from planner.cost.estimate import estimate
from planner.cost.memory import parallel as mp
from planner.cost.memory.activation_memory import layer_activations
from planner.cost.memory.phases import training_memory, training_peak_bytes
from planner.cost.memory.pipeline import pipeline_phases_and_components, stages
from planner.cost.params import count_params
from planner.errors import PlannerError
from planner.specs.catalog import load_spec
from planner.specs.model import LayerSpec, Linear, ModelSpec
from planner.specs.setup import TrainingSetup, check_setup

GIB = 2**30


def gpt_spec(hidden: int, heads: int, layers: int, vocab: int = 51200, seq: int = 2048) -> ModelSpec:
    """Megatron's GPT layer as Korthikanti et al. count it: LayerNorm, q/k/v/o with biases, a 4h
    GELU MLP, dropout after attention and MLP (and on the scores), learned positions."""
    h = hidden
    attention = tuple(Linear(name, h, h, bias=True) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = (Linear("fc1", h, 4 * h, bias=True), Linear("fc2", 4 * h, h, bias=True))
    layer = LayerSpec(hidden_size=h, num_heads=heads, num_kv_heads=heads, head_dim=h // heads, attention=attention,
                      mlp=mlp, norms=((h, True), (h, True)), intermediate_size=4 * h, gated_mlp=False,
                      norm_kind="layer", hidden_act="gelu")
    return ModelSpec(name=f"gpt-{h}x{layers}", model_type="megatron-gpt", vocab_size=vocab, hidden_size=h,
                     layers=(layer,) * layers, tied_embeddings=True, position_embeddings=seq, final_norm=(h, True),
                     attention_dropout=0.1, hidden_dropout=0.1, embedding_dropout=0.1, max_position_embeddings=seq)


# Korthikanti et al. 2022, Table 3: (heads, hidden, layers, tensor parallel, pipeline parallel); s=2048, b=1
KORTHIKANTI_CONFIGS = {
    "gpt3-175b": (96, 12288, 96, 8, 8),
    "gpt-530b": (128, 20480, 105, 8, 35),
    "gpt-1t": (160, 25600, 128, 8, 64),
}


@pytest.fixture(scope="module")
def llama():
    return load_spec("llama-3.1-8b")


def _layers_bytes(spec, setup, b=1.0, s=2048.0):
    return float(layer_activations(spec, setup, np.float64(b), np.float64(s), setup.tensor_parallel)[0])


# ----------------------------------------------------------------------------- published: Korthikanti et al.


def test_korthikanti_table2_closed_forms():
    """Table 2 at GPT-3 175B (s=2048, b=1, h=12288, a=96, t=8): 5as/(ht) = 10, so per layer the
    tensor-parallel baseline is 23 sbh, with sequence parallelism 14.25 sbh, with selective
    recompute 13 sbh, with both 4.25 sbh (the paper's ~5x reduction), full recompute 2 sbh."""
    sbh = 2048 * 1 * 12288
    f = mp.korthikanti_layer_activation_bytes
    assert f(2048, 1, 12288, 96) == pytest.approx(sbh * (34 + 5 * 96 * 2048 / 12288))
    assert f(2048, 1, 12288, 96, 8) == pytest.approx(23 * sbh)
    assert f(2048, 1, 12288, 96, 8, sequence_parallel=True) == pytest.approx(14.25 * sbh)
    assert f(2048, 1, 12288, 96, 8, recompute="selective") == pytest.approx(13 * sbh)
    assert f(2048, 1, 12288, 96, 8, True, "selective") == pytest.approx(4.25 * sbh)
    assert f(2048, 1, 12288, 96, 8, recompute="full") == pytest.approx(2 * sbh)
    assert 23 / 4.25 > 5


@pytest.mark.parametrize("name", list(KORTHIKANTI_CONFIGS))
@pytest.mark.parametrize("sp", [False, True])
def test_inventory_matches_korthikanti_per_layer(name, sp):
    """The planner's per-layer inventory (16-bit, 1-byte CUDA dropout masks, flash attention: no
    score-sized tensors, as with Korthikanti's selective recompute) on their GPT layer gives
    Table 2's sbh(10 + 24/t) under tensor parallelism and sbh(34/t) with sequence parallelism,
    within the few bytes per token they leave out (LayerNorm statistics, the log-sum-exp)."""
    a, h, _, t, _ = KORTHIKANTI_CONFIGS[name]
    spec = gpt_spec(h, a, 1)
    setup = TrainingSetup(precision="bf16", num_gpus=t, tensor_parallel=t, sequence_parallel=sp)
    published = mp.korthikanti_layer_activation_bytes(2048, 1, h, a, t, sp, "selective")
    assert _layers_bytes(spec, setup) == pytest.approx(float(published), rel=2e-3)


def test_eager_attention_keeps_hf_fp32_softmax_beyond_korthikanti():
    """Eager attention: Megatron's fused softmax keeps 5as^2b bytes (softmax, dropout mask and
    output); transformers upcasts the scores to fp32 (4 bytes) before the 16-bit copy, 2as^2b more."""
    a, h, t = 96, 12288, 8
    spec = gpt_spec(h, a, 1)
    setup = TrainingSetup(precision="bf16", attention="eager", num_gpus=t, tensor_parallel=t, sequence_parallel=True)
    ours = _layers_bytes(spec, setup) - _layers_bytes(spec, setup.model_copy(update={"attention": "sdpa"}))
    korthikanti = float(mp.korthikanti_layer_activation_bytes(2048, 1, h, a, t, True)
                        - mp.korthikanti_layer_activation_bytes(2048, 1, h, a, t, True, "selective"))
    # sdpa's log-sum-exp and 2 more bytes per score: what transformers' eager path keeps beyond Megatron's
    assert ours == pytest.approx(korthikanti + 2 * a * 2048 * 2048 / t - 4 * a * 2048 / t, rel=1e-9)


@pytest.mark.parametrize("name", list(KORTHIKANTI_CONFIGS))
def test_first_stage_holds_all_layers_of_one_micro_batch(name):
    """Korthikanti et al. sec. 4.2.3: under 1F1B the first stage keeps p micro-batches of its L/p
    layers, sbhL(34/t) with sequence parallelism and their recompute, independent of p; at GPT-3
    175B 96 x 4.25 sbh = 10.27 GB per GPU."""
    a, h, layers, t, p = KORTHIKANTI_CONFIGS[name]
    spec = gpt_spec(h, a, layers)
    setup = TrainingSetup(precision="bf16", num_gpus=t * p, tensor_parallel=t, sequence_parallel=True,
                          pipeline_parallel=p, grad_accum=2 * p, seq_len=2048)
    first = next(st for st in stages(spec, setup) if st.first)
    assert float(first.in_flight) == p
    kept = float(first.in_flight) * _layers_bytes(first.spec, setup)
    published = layers * float(mp.korthikanti_layer_activation_bytes(2048, 1, h, a, t, True, "selective"))
    assert kept == pytest.approx(published, rel=2e-3)
    if name == "gpt3-175b":
        assert published == pytest.approx(10.27e9, rel=1e-3)
        # the interleaved schedule's extra factor (1 + (p - 1)/(p v)) on the same stage
        inter = setup.model_copy(update={"pipeline_schedule": "interleaved", "virtual_stages": 2})
        first_v = next(st for st in stages(spec, inter) if st.first)
        assert float(first_v.in_flight) * _layers_bytes(first_v.spec, inter) == pytest.approx(
            published * (1 + (p - 1) / (p * 2)), rel=2e-3)


# ----------------------------------------------------------------------------- pipeline: hand derivations


def test_stage_layers_and_interleaving():
    assert mp.stage_layers(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    # interleaved: chunk c on rank c % pp
    assert mp.stage_layers(8, 2, 2) == ((0, 1, 4, 5), (2, 3, 6, 7))
    # uneven: the earlier chunks take the remainder
    assert [len(x) for x in mp.stage_layers(10, 4)] == [3, 3, 2, 2]
    with pytest.raises(PlannerError, match="at most 8 chunks"):
        mp.stage_layers(8, 4, 4)


def test_in_flight_micro_batches_by_schedule():
    f = mp.in_flight_micro_batches
    assert [float(f("1f1b", 4, i, 16)) for i in range(4)] == [4, 3, 2, 1]
    assert float(f("1f1b", 8, 0, 3)) == 3  # fewer micro-batches than stages
    assert [float(f("gpipe", 4, i, 16)) for i in range(4)] == [16] * 4
    # Megatron's interleaved warm-up: (2 (p - i - 1) + (v - 1) p + 1) chunks of 1/v of the rank's layers
    assert float(f("interleaved", 4, 0, 16, 2)) == pytest.approx(4 * (1 + 3 / 8))
    assert float(f("interleaved", 4, 3, 16, 2)) == pytest.approx(5 / 2)
    assert float(f("interleaved", 4, 0, 16, 1)) == 4  # one chunk: plain 1F1B


def test_pipeline_path_with_one_stage_equals_the_model(llama):
    """The stage assembly on a one-stage pipeline reproduces ``training_memory`` bit for bit."""
    b, s, r = np.array([[1.0], [4.0]]), np.float64(4096), np.array([[8.0, 64.0]])
    for setup in (TrainingSetup(checkpointing="full", num_gpus=8, zero=3, grad_accum=4, precision="bf16-mixed"),
                  TrainingSetup(method="lora", checkpointing="selective", num_gpus=4, tensor_parallel=2),
                  TrainingSetup(method="qlora", checkpointing="full"),
                  TrainingSetup(num_gpus=8, tensor_parallel=4, sequence_parallel=True, context_parallel=2, zero=1)):
        whole = training_memory(llama, setup, b, s, r)
        phases, components = pipeline_phases_and_components(llama, setup, b, s, r)
        for name in phases:
            assert np.array_equal(np.broadcast_to(phases[name], whole.phases[name].shape), whole.phases[name]), name
        for name in components:
            assert np.allclose(components[name], whole.components[name], rtol=0, atol=0), name


def test_shared_cache_changes_nothing_for_pipelines(llama):
    """One cache across pipeline set-ups that differ in depth, schedule, ZeRO and accumulation (what
    the search does) gives each set-up's peak bit for bit."""
    mb, rank = np.array([1, 2, 4])[:, None], np.array([[16]])
    cache: dict = {}
    for pp, schedule, v, zero, ga, ckpt in [(2, "1f1b", 1, 1, 4, "none"), (4, "1f1b", 1, 0, 8, "full"),
                                            (4, "interleaved", 2, 1, 8, "selective"), (4, "gpipe", 1, 1, 2, "none"),
                                            (8, "1f1b", 1, 1, 16, "none"), (4, "1f1b", 1, 1, 2, "none")]:
        setup = TrainingSetup(num_gpus=64, tensor_parallel=4, sequence_parallel=True, pipeline_parallel=pp,
                              pipeline_schedule=schedule, virtual_stages=v, zero=zero, grad_accum=ga, checkpointing=ckpt,
                              precision="bf16-mixed")
        alone = training_memory(llama, setup, mb, 4096, rank)
        shared = training_memory(llama, setup, mb, 4096, rank, cache=cache)
        assert np.array_equal(alone.peak_bytes, shared.peak_bytes), setup
        assert np.array_equal(training_peak_bytes(llama, setup, mb, 4096, rank, cache=cache), alone.peak_bytes)
        for name in alone.components:
            assert np.array_equal(alone.components[name], shared.components[name]), (setup, name)


def test_first_stage_is_the_peak_and_holds_pp_micro_batches(llama):
    """Llama-3.1-8B, 8192 tokens, TP 2 x PP 4 (1F1B, 8 micro-batches): the first stage holds 4
    micro-batches of its 8 layers, as many activations as the whole model's 32 layers for one
    micro-batch, beside the embedding (525M parameters) and 8 layers' states: it is the peak; the
    last stage holds one micro-batch, the head and the loss."""
    setup = TrainingSetup(num_gpus=8, tensor_parallel=2, pipeline_parallel=4, grad_accum=8, seq_len=8192)
    mem = training_memory(llama, setup)
    whole_layers = _layers_bytes(llama, setup.model_copy(update={"pipeline_parallel": 1, "num_gpus": 2}), s=8192.0)
    ids = 8 * 8192 * 4  # int64 token ids of the 4 micro-batches in flight
    assert float(mem.components["activations"]) == pytest.approx(whole_layers + ids, rel=1e-12)
    assert float(mem.components["loss_temporaries"]) == 0.0  # the first stage has no loss
    layer_params = (count_params(llama).total - 2 * llama.vocab_size * llama.hidden_size - llama.hidden_size) / 32
    first_params = 8 * layer_params + llama.vocab_size * llama.hidden_size
    assert float(mem.components["weights"]) == pytest.approx(first_params * 2 / 2, rel=1e-9)
    # the middle ranks share one evaluation (same layers, the earlier one holds more in flight)
    assert [(st.ranks, st.first, st.last) for st in stages(llama, setup)] == [
        ((0,), True, False), ((1, 2), False, False), ((3,), False, True)]
    # TP 8 x PP 2 at 8192 tokens: the last stage (128k-vocabulary logits, their fp32 loss
    # gradients: 8 bytes per token and vocabulary entry) outweighs the first's 2 micro-batches
    two = training_memory(llama, setup.model_copy(update={"pipeline_parallel": 2, "tensor_parallel": 8, "num_gpus": 16}))
    assert float(two.components["loss_temporaries"]) == pytest.approx(8 * 128256 * 8192)


def test_gpipe_holds_every_micro_batch(llama):
    base = TrainingSetup(num_gpus=8, tensor_parallel=2, pipeline_parallel=4, grad_accum=8, seq_len=4096)
    one_f = float(training_memory(llama, base).components["activations"])
    gpipe = training_memory(llama, base.model_copy(update={"pipeline_schedule": "gpipe"}))
    # 8 micro-batches of 8 layers on every stage; the last also keeps 8 log-softmax outputs: the peak
    assert float(gpipe.components["activations"]) > 2 * one_f
    assert float(gpipe.components["loss_temporaries"]) > 0


def test_stage_parameters_add_up(llama):
    """The stages hold every parameter once; tied embeddings are kept twice (the last stage's head copy)."""
    setup = TrainingSetup(num_gpus=4, pipeline_parallel=4)
    total = sum(count_params(st.spec).total * len(st.ranks) for st in stages(llama, setup))
    assert total == count_params(llama).total
    tied = load_spec("qwen2.5-0.5b")
    assert tied.tied_embeddings
    total = sum(count_params(st.spec).total * len(st.ranks) for st in stages(tied, setup))
    assert total == count_params(tied).total + tied.vocab_size * tied.hidden_size


# ----------------------------------------------------------------------------- SP, CP, EP, TP temporaries


def test_tensor_parallel_divides_the_optimizer_temporaries(llama):
    """Issue 10's fix: foreach AdamW's ``_foreach_sqrt`` temporary is one state-sized tensor per
    rank's own shards: 8.03B x 2 bytes / 8 = 1.87 GiB under TP 8 (it was 14.96 GiB), as ZeRO-1 gives."""
    tp = estimate(llama, TrainingSetup(num_gpus=8, tensor_parallel=8))["components"]
    zero = estimate(llama, TrainingSetup(num_gpus=8, zero=1))["components"]
    n = count_params(llama).total
    assert tp["optimizer_temporaries"] == pytest.approx(n * 2 / 8)
    assert tp["optimizer_temporaries"] == pytest.approx(zero["optimizer_temporaries"])
    assert tp["optimizer_temporaries"] / GIB == pytest.approx(1.87, abs=0.01)


def test_sequence_parallel_splits_every_layer_activation(llama):
    """Without dropout, eager attention or checkpointing, every saved tensor of a Llama layer is
    split over t GPUs with sequence parallelism; without it the norms' part stays replicated."""
    one = _layers_bytes(llama, TrainingSetup())
    sp = _layers_bytes(llama, TrainingSetup(num_gpus=4, tensor_parallel=4, sequence_parallel=True))
    tp = _layers_bytes(llama, TrainingSetup(num_gpus=4, tensor_parallel=4))
    assert sp == pytest.approx(one / 4, rel=1e-12)
    assert one / 4 < tp < one / 2
    full = TrainingSetup(num_gpus=4, tensor_parallel=4, sequence_parallel=True, checkpointing="full")
    kept = layer_activations(llama, full, np.float64(1), np.float64(2048), 4)[1]
    assert float(kept) == 2048 * 4096 * 2 * 32 / 4  # the layer inputs, sequence-sharded


def test_context_parallel_splits_tokens_and_shards_states(llama):
    base = TrainingSetup(num_gpus=8, zero=3, seq_len=8192)
    cp = base.model_copy(update={"context_parallel": 4})
    a, c = training_memory(llama, base), training_memory(llama, cp)
    assert float(c.components["activations"]) == pytest.approx(float(a.components["activations"]) / 4, rel=1e-12)
    # ZeRO-3 shards over data x context ranks: the same 8 GPUs
    assert float(c.components["weights"]) == pytest.approx(float(a.components["weights"]))
    # ring attention's key/value blocks in flight: 4 blocks of k and v of the local tokens
    assert float(mp.ring_attention_buffer_bytes(2048, 1024, 2, 1, 4)) == 4 * 2 * 2048 * 1024 * 2
    assert float(mp.ring_attention_buffer_bytes(2048, 1024, 2, 1, 1)) == 0


def test_expert_parallel_shards_experts():
    """Mixtral-8x7B on 8 GPUs, EP 8, ZeRO-0: the dense part (attention, norms, routers, embeddings)
    whole, the routed experts / 8; ZeRO-3 shards both over the 8 GPUs, whatever the EP degree."""
    spec = load_spec("mixtral-8x7b")
    experts = mp.routed_expert_params(spec)
    dense = count_params(spec).total - experts
    ep = training_memory(spec, TrainingSetup(num_gpus=8, expert_parallel=8, seq_len=1024))
    assert float(ep.components["weights"]) == pytest.approx((dense + experts / 8) * 2, rel=1e-12)
    z3 = training_memory(spec, TrainingSetup(num_gpus=8, expert_parallel=8, zero=3, seq_len=1024))
    assert float(z3.components["weights"]) == pytest.approx((dense + experts) * 2 / 8, rel=1e-12)
    assert float(mp.expert_dispatch_bytes(1024, 4096, 2, 2, 8)) == 2 * 1024 * 2 * 4096 * 2


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("fields, message", [
    (dict(num_gpus=8, tensor_parallel=2, pipeline_parallel=3), "not a multiple"),
    (dict(num_gpus=8, tensor_parallel=4, expert_parallel=4), "must divide the 2 data-parallel"),
    (dict(num_gpus=2, context_parallel=2, attention="eager"), "ring attention"),
    (dict(sequence_parallel=True), "tensor_parallel > 1"),
])
def test_bad_layouts_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingSetup(**fields)


@pytest.mark.parametrize("fields, message", [
    (dict(num_gpus=64, pipeline_parallel=64), "at most 32"),
    (dict(num_gpus=3, context_parallel=3, seq_len=2048), "multiple of 6"),
    (dict(num_gpus=2, expert_parallel=2), "dense"),
    (dict(num_gpus=8, zero=3, pipeline_parallel=2, grad_accum=4), "ZeRO-0/1 only"),
    (dict(num_gpus=8, zero=2, pipeline_parallel=4, grad_accum=4), "ZeRO-0/1 only"),
])
def test_layouts_the_model_cannot_take(llama, fields, message):
    with pytest.raises(PlannerError, match=message):
        check_setup(llama, TrainingSetup(**fields))


def test_deepspeed_pipelines_take_zero_0_and_1(llama):
    """DeepSpeed's pipeline engine asserts ZeRO < 2; ZeRO-1 with stages, and ZeRO-3 without, are fine."""
    check_setup(llama, TrainingSetup(num_gpus=8, zero=1, pipeline_parallel=2))
    check_setup(llama, TrainingSetup(num_gpus=8, zero=3))


def test_torchtune_refuses_layouts_it_does_not_run(llama):
    from planner.cost.support import require_priced

    require_priced(TrainingSetup(num_gpus=8, pipeline_parallel=4, context_parallel=2))
    with pytest.raises(PlannerError, match="pipeline_parallel=4"):
        require_priced(TrainingSetup(stack="torchtune", num_gpus=8, pipeline_parallel=4))


# ----------------------------------------------------------------------------- the plan search


def test_search_pipeline_ladder_and_floor():
    """Pipeline layouts: the widest TP with ZeRO-0/1, powers of two with tp x pp dividing the GPU
    count and a layer per stage, fewest stages first; degrees whose weights and gradients alone
    exceed the memory are not tried."""
    from planner.search.pipelines import fits_states_floor, pipeline_combos, wants_pipeline

    combos = [(0, "none", 1, 8), (0, "none", 3, 8), (2, "full", 1, 8), (0, "none", 1, 1)]
    ladder = pipeline_combos(combos, 64, 32)
    assert ladder == [(0, "none", 1, 8, 2), (2, "full", 1, 8, 2), (0, "none", 1, 8, 4), (2, "full", 1, 8, 4),
                      (0, "none", 1, 8, 8), (2, "full", 1, 8, 8)]
    assert pipeline_combos([(0, "none", 1, 8)], 64, 5) == [(0, "none", 1, 8, 2), (0, "none", 1, 8, 4)]
    assert pipeline_combos([(0, "none", 3, 8), (0, "none", 2, 1)], 64, 32) == []  # --zero 2/3 only: no stages
    base = TrainingSetup(precision="bf16-mixed")
    # 405B, ZeRO-1 bf16-mixed (2 + 2 bytes of weight and gradient), TP 8: 203 GB / pp per GPU
    assert not fits_states_floor(base, 405e9, (0, "none", 1, 8, 2), 75 * GIB)
    assert fits_states_floor(base, 405e9, (0, "none", 1, 8, 4), 75 * GIB)
    assert wants_pipeline(512, "full", False) and not wants_pipeline(512, "full", True)
    assert not wants_pipeline(512, "lora", False) and not wants_pipeline(1, "full", False)


def test_plan_chooses_a_pipeline_where_the_model_needs_one():
    """Llama-3.1-405B on 512 H100s without ZeRO-2/3 (Megatron-style: distributed optimizer): no
    data / tensor-parallel layout holds its weights and gradients, so the plan runs pipeline
    stages, with sequence parallelism, and its peak is the memory model's for that layout."""
    from planner.search.plan import PlanRequest
    from planner.search.planning import make_plan

    plan = make_plan(PlanRequest(models=("llama-3.1-405b",), gpu="h100-sxm", num_gpus=512, tokens=1e11, zero=(0, 1),
                                 methods=("full",)), continuous_check=False)
    rec = plan.recommended
    assert rec.pipeline_parallel > 1 and rec.sequence_parallel and rec.tensor_parallel == 8
    assert rec.num_gpus % (rec.tensor_parallel * rec.pipeline_parallel) == 0
    setup = TrainingSetup(method="full", precision=rec.precision, checkpointing=rec.checkpointing, num_gpus=rec.num_gpus,
                          zero=rec.zero, tensor_parallel=rec.tensor_parallel, pipeline_parallel=rec.pipeline_parallel,
                          sequence_parallel=True, micro_batch=rec.micro_batch, seq_len=rec.seq_len,
                          grad_accum=rec.grad_accum)
    peak = float(training_memory(load_spec("llama-3.1-405b"), setup).peak_bytes)
    assert rec.peak_bytes == pytest.approx(peak, rel=1e-9) and peak <= rec.usable_bytes


def test_pipeline_refuses_what_its_stages_do_not_price(llama):
    setup = TrainingSetup(num_gpus=8, pipeline_parallel=4, grad_accum=8, loss_impl="fused-linear")
    with pytest.raises(PlannerError, match="loss_impl='fused-linear' with pipeline_parallel=4"):
        training_memory(llama, setup)
