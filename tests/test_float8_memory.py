"""torchao float8 training's memory (``planner.cost.memory.float8``) against traces of the real code, pinned.

Measured 2026-11-29 on fake CPU tensors, torch 2.13.0+cpu, torchao 0.11.0, torchtitan 0.3.0 (wheel)::

    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py --float8 tensorwise
    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py --float8 rowwise
    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py --compile --float8 rowwise
    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py --loss

Per block: bytes per token (slope of 512 and 1024 tokens) and bytes that do not grow with the tokens
(intercept); compiled: ``aot_eager_decomp_partition`` (Inductor's min-cut partitioner), no AC.
"""

import numpy as np
import pytest

from planner.cost.estimate import estimate
from planner.cost.memory import float8 as f8
from planner.cost.memory import torchtitan_tensors as tt
from planner.cost.memory.phases import training_memory
from planner.errors import PlannerError
from planner.specs.catalog import load_spec
from planner.specs.setup import TrainingSetup

MEASURED_FIXED = {  # (model, recipe, AC mode) -> bytes per block that do not grow with the tokens
    ("llama-3.1-8b", "tensorwise", "none"): 218103828,
    ("llama-3.1-8b", "tensorwise", "full"): 0,
    ("llama-3.1-8b", "tensorwise", "selective"): 20,
    ("llama-3.1-8b", "rowwise", "none"): 0,
    ("llama-3.1-8b", "rowwise", "full"): 0,
    ("llama-3.1-8b", "rowwise", "selective"): 0,
    ("llama-3.1-8b", "rowwise_with_gw_hp", "none"): 0,
    ("llama-2-13b", "tensorwise", "none"): 317194260,  # the Llama-2-13B-shaped block (MHA)
    ("llama-2-13b", "tensorwise", "full"): 0,
    ("llama-2-13b", "tensorwise", "selective"): 20,
    ("llama-2-13b", "rowwise", "none"): 0,
}
MEASURED_PER_TOKEN_UNCHANGED = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
"""Every recipe, eager, every AC mode: the per-token saved set of a bf16 block (217,224 / 8,192 /
65,664 bytes on Llama-3-8B for none / full / op-SAC), pinned in tests/test_torchtitan_memory.py."""
MEASURED_COMPILED_FLOAT8 = {"llama-3.1-8b": 98440, "llama-2-13b": 122024}
"""tensorwise, s = 256; rowwise adds one h-sized bf16 vector per block that does not grow with the tokens
(+32 and +40 bytes per token at s = 256)."""
MEASURED_COMPILED_SAC = {"bf16": 57472, "tensorwise": 57472, "rowwise": 57476}
"""Llama-3-8B block, compiled with torchtitan's op-SAC (``--compile --sac``), bytes per token at s = 256:
float8 leaves the saved set as it is (rowwise: + one h-sized vector per block)."""
MEASURED_HF_DELTA = {  # (model, layers, micro-batch, seq) -> (forward, backward) phase peak, float8 minus bf16
    ("llama-3.2-1b", 2, 2, 1024): (121634872, 121634872),
    ("llama-3.1-8b", 2, 1, 1024): (436207672, 0),  # the backward's peak is at its end, copies released
    ("qwen2.5-0.5b", 2, 2, 512): (29818936, 29818936),
}
"""Hugging Face model + ``convert_to_float8_training`` (tensorwise, head in bf16), precision bf16, no AC:
the oracle's phase peaks with float8 minus without (``planner.truth.float8_model``)."""
MEASURED_HF_MIXED_DELTA = {  # precision bf16-mixed: the fp8 copy replaces autocast's bf16 copy
    ("llama-3.2-1b", 2, 2, 1024): (-121634760, -121634760),
    ("qwen2.5-0.5b", 2, 2, 512): (-29823432, -29818824),  # forward: autocast's cached bias copies (4,608) gone too
}
HF_BIAS_COPIES_NOT_PRICED = {("qwen2.5-0.5b", 2, 2, 512): 4608}
MEASURED_LOSS_SAVED = {"eager": 4 * 128256 + 8, "compiled": 2 * 128256 + 16}  # bytes per token, V = 128,256


@pytest.mark.parametrize(("name", "recipe", "ac"), sorted(MEASURED_FIXED))
def test_token_independent_bytes_match_trace(name, recipe, ac):
    layer = load_spec(name).layers[0]
    assert f8.saved_weight_bytes(layer, recipe, checkpointing=ac) == MEASURED_FIXED[(name, recipe, ac)]


def test_compiled_block_with_float8_matches_trace():
    for name, measured in MEASURED_COMPILED_FLOAT8.items():
        layer = load_spec(name).layers[0]
        assert f8.compiled_block_saved_bytes_per_token(layer, 2) == measured
        assert f8.saved_weight_bytes(layer, "tensorwise", compiled=True) == 0
        # fewer bytes than the compiled bf16 block (139,400), more than full AC's input
        assert tt.layer_saved_bytes_per_token(layer, checkpointing="full") < measured < tt.layer_saved_bytes_per_token(
            layer, compiled=True)


def test_compiled_loss_saves_the_logits_not_the_fp32_log_softmax():
    spec = load_spec("llama-3.1-8b")
    eager, compiled = (tt.loss_extra_bytes_per_token(spec, compiled=c) for c in (False, True))
    assert compiled["forward"] - 2 * spec.vocab_size == MEASURED_LOSS_SAVED["compiled"] - 2 * spec.vocab_size
    assert eager["backward"] - 8 * spec.vocab_size == MEASURED_LOSS_SAVED["eager"] - 8
    assert compiled["backward"] < eager["backward"] / 2


def test_recipes_and_converted_linears():
    layer = load_spec("llama-3.1-8b").layers[0]
    assert f8.converted_params(layer) == 218103808  # wqkv + wo + w1 + w3 + w2 of Llama-3-8B
    with pytest.raises(ValueError, match="rowwise"):
        f8.saved_weight_bytes(layer, "delayed")
    compiled = f8.cast_transient_bytes(8192, 4096, 14336, compiled=True)
    assert 0 < compiled < f8.cast_transient_bytes(8192, 4096, 14336, compiled=False)


def _setup(**kw):
    base = dict(stack="torchtitan", precision="bf16-mixed", micro_batch=1, seq_len=8192, num_gpus=8, zero=3,
                optimizer_impl="fused", checkpointing="selective", compile=True)
    return TrainingSetup(**{**base, **kw})


def test_torchtitan_float8_under_op_sac_keeps_the_bf16_saved_set():
    spec = load_spec("llama-3-8b")
    bf16, fp8 = (training_memory(spec, _setup(float8=f)) for f in (False, True))
    per_token_layer = float(fp8.components["activations"] - bf16.components["activations"]) / 8192 / 32
    assert abs(per_token_layer - (MEASURED_COMPILED_SAC["tensorwise"] - MEASURED_COMPILED_SAC["bf16"])) <= 4
    assert abs(float(fp8.peak_bytes) / float(bf16.peak_bytes) - 1) < 0.01


def test_torchtitan_float8_compiled_without_ac_saves_less():
    spec = load_spec("llama-3-8b")
    bf16, fp8 = (training_memory(spec, _setup(float8=f, checkpointing="none")) for f in (False, True))
    saved_less = bf16.components["activations"] - fp8.components["activations"]
    assert saved_less == pytest.approx(8192 * 32 * (139400 - 98440))


def test_compiled_loss_lowers_the_peak_and_needs_compile():
    spec = load_spec("llama-3-8b")
    eager, compiled = (float(training_memory(spec, _setup(loss_impl=li)).peak_bytes) for li in ("standard", "compiled"))
    assert compiled < eager - 4 * 2**30
    with pytest.raises((PlannerError, ValueError), match="compile"):
        training_memory(spec, _setup(loss_impl="compiled", compile=False))
    with pytest.raises(PlannerError, match="float8"):  # the torchtune stack's float8 is not priced
        estimate(spec, _setup(stack="torchtune", precision="bf16", float8=True, compile=False,
                              checkpointing="none", zero=0, num_gpus=1))


def test_arrays_broadcast():
    spec = load_spec("llama-3-8b")
    peaks = training_memory(spec, _setup(float8=True), seq_len=np.array([2048, 4096])).peak_bytes
    assert peaks.shape == (2,) and peaks[0] < peaks[1]


@pytest.mark.parametrize("case", sorted(MEASURED_HF_DELTA))
def test_hf_float8_weight_copies_match_trace(case):
    from planner.specs.catalog import load_model_config
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    name, layers, b, s = case
    spec = model_spec_from_config(reduce_layers(load_model_config(name)[0], layers), name)
    setup = TrainingSetup(precision="bf16", float8=True, micro_batch=b, seq_len=s)
    assert f8.hf_saved_weight_bytes(spec, setup) == MEASURED_HF_DELTA[case][0]
    on, off = (training_memory(spec, setup.model_copy(update={"float8": f}), device="cpu") for f in (True, False))
    deltas = tuple(float(on.phases[p] - off.phases[p]) for p in ("forward", "backward"))
    assert deltas == MEASURED_HF_DELTA[case]


@pytest.mark.parametrize("case", sorted(MEASURED_HF_MIXED_DELTA))
def test_hf_float8_under_autocast_matches_trace(case):
    from planner.specs.catalog import load_model_config
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    name, layers, b, s = case
    spec = model_spec_from_config(reduce_layers(load_model_config(name)[0], layers), name)
    setup = TrainingSetup(precision="bf16-mixed", float8=True, micro_batch=b, seq_len=s)
    on, off = (training_memory(spec, setup.model_copy(update={"float8": f}), device="cpu") for f in (True, False))
    forward, backward = (float(on.phases[p] - off.phases[p]) for p in ("forward", "backward"))
    assert forward == MEASURED_HF_MIXED_DELTA[case][0] + HF_BIAS_COPIES_NOT_PRICED.get(case, 0)
    assert backward == MEASURED_HF_MIXED_DELTA[case][1]


def test_hf_float8_refuses_what_is_not_traced():
    spec = load_spec("llama-3.2-1b")
    for kw, word in ((dict(precision="fp32"), "precision"), (dict(method="lora"), "method"),
                     (dict(precision="bf16-mixed", checkpointing="full"), "checkpointing"),
                     (dict(zero=3, num_gpus=2), "replicated"), (dict(pipeline_parallel=2, num_gpus=2), "pipeline")):
        with pytest.raises(PlannerError, match=word):
            training_memory(spec, TrainingSetup(**{"precision": "bf16", "float8": True, **kw}))


def test_fp8_all_gather_halves_the_gathered_linears():
    spec = load_spec("llama-3-8b")
    layer = spec.layers[0]
    params = layer.params
    bf16 = f8.gathered_block_bytes(layer, params, 2, 8, False)
    fp8 = f8.gathered_block_bytes(layer, params, 2, 8, True)
    assert bf16 == 2 * params
    assert fp8 == pytest.approx(2 * params - f8.converted_params(layer) * (1 - 1 / 8))
    off, on = (training_memory(spec, _setup(float8=True, float8_all_gather=g)) for g in (False, True))
    assert float(off.peak_bytes - on.peak_bytes) == pytest.approx(bf16 - fp8, rel=1e-9)
    with pytest.raises(PlannerError, match="set float8"):
        training_memory(spec, _setup(float8_all_gather=True))
