"""The torchtune oracle (planner.truth.torchtune_step) and the torchtune formulas (planner.cost.memory.torchtune_tensors).

The oracle is checked against facts that need no analytic model (LoRA trains exactly torchtune's
adapter parameters, chunked cross-entropy no longer materialises the fp32 logits, optimizer-in-
backward frees the gradients, offloaded activations leave the device, paged states leave PyTorch's
allocator, FLOPs of a dense decoder in closed form); the formulas against the oracle's per-layer
bytes (2 layers minus 1) and its phase peaks. Catalog configs at 2-3 layers and 256-512 tokens keep
each trace about a second.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from planner.cost.memory import torchtune_tensors as tt
from planner.specs.catalog import load_model_config
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup

B, S = 2, 256
T = B * S


def _config(name: str) -> dict:
    return load_model_config(name)[0]


@functools.cache
def _trace(model: str, layers: int, setup: tuple = (), recipe: tuple = ()):
    from planner.truth.torchtune_step import trace_torchtune_step

    kw = {"micro_batch": B, "seq_len": S, **dict(setup)}
    return trace_torchtune_step(_config(model), TrainingSetup(**kw), layers, count_flops=False, **dict(recipe))


def _act(r) -> int:
    return r.phase_peak_by_category["forward"]["Activation"]


def _host(r) -> int:
    from planner.truth.torchtune_step import host_peak_bytes

    return host_peak_bytes(r)


# -- no torch needed -----------------------------------------------------------------------------------


def test_modules_import_without_torch():
    mods = "planner.truth.torchtune_step, planner.truth.torchtune_model, planner.truth.torchtune_patches, " \
           "planner.truth.torchtune_flops, planner.cost.memory.torchtune_tensors"
    code = f"import sys, {mods}; assert 'torch' not in sys.modules and 'torchtune' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lora_switches_map_hf_names_to_torchtune_builders():
    assert tt.lora_switches(("all-linear",)) == {
        "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
        "apply_lora_to_mlp": True, "apply_lora_to_output": False}
    sw = tt.lora_switches(("v_proj", "q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"))
    assert sw == {"lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
                  "apply_lora_to_output": True}
    with pytest.raises(ValueError, match="together"):
        tt.lora_switches(("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match="no torchtune equivalent"):
        tt.lora_switches(("c_attn",))


def test_recipe_refusals_before_tracing():
    from planner.truth.torchtune_step import trace_torchtune_step

    cfg = _config("llama-3.2-1b")
    with pytest.raises(ValueError, match="grad_accum"):
        trace_torchtune_step(cfg, TrainingSetup(grad_accum=2), 1, optimizer_in_bwd=True)
    with pytest.raises(ValueError, match="checkpointing"):
        trace_torchtune_step(cfg, TrainingSetup(), 1, activation_offloading=True)
    with pytest.raises(NotImplementedError, match="no autocast"):
        trace_torchtune_step(cfg, TrainingSetup(precision="bf16-mixed"), 1)


def test_nf4_and_state_bytes():
    assert tt.nf4_bytes_per_weight() == pytest.approx(0.5 + 1 / 64 + 2 / 16384)
    assert tt.state_bytes_per_param() == {"weight": 2, "grad": 2, "state": 4, "scratch": 2, "host": 0}
    paged = tt.state_bytes_per_param(optimizer="adamw-8bit", paged=True, optimizer_in_bwd=True)
    assert paged["grad"] == 0 and paged["host"] == 2 and paged["state"] < 0.05


# -- the oracle ----------------------------------------------------------------------------------------


@pytest.mark.oracle
def test_lora_trains_torchtune_adapter_params_and_qlora_holds_nf4():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from planner.truth.torchtune_model import adapter_param_count, torchtune_fake_model

    setup = TrainingSetup(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj", "o_proj"))
    model = torchtune_fake_model(FakeTensorMode(), _config("qwen2.5-0.5b"), setup, 2, [])
    r = 8
    per_layer = r * (896 + 896) + r * (896 + 128) + r * (896 + 896)  # q (896->896), v (896->128), o
    assert adapter_param_count(model) == 2 * per_layer
    lora = _trace("llama-3.2-1b", 2, (("method", "lora"),))
    qlora = _trace("llama-3.2-1b", 2, (("method", "qlora"),))
    assert lora.trainable_params == qlora.trainable_params < lora.total_params == qlora.total_params
    layer_weights = 2 * 60_817_408  # q, k, v, o, w1, w2, w3 of two Llama-3.2-1B layers
    saved = lora.peak_by_category["Parameter"] - qlora.peak_by_category["Parameter"]
    assert saved == pytest.approx(layer_weights * (2 - tt.nf4_bytes_per_weight()), rel=1e-3)


@pytest.mark.oracle
def test_chunked_ce_no_longer_materialises_the_fp32_logits():
    """With a frozen head (LoRA) the peak is at the loss: chunking drops at least the fp32 logits.
    (A trained tied head can move the peak to its gradient's accumulation, see the formulas' test.)"""
    lora = (("method", "lora"),)
    off = _trace("llama-3.2-1b", 1, lora)
    on = _trace("llama-3.2-1b", 1, lora, (("output_chunks", 8),))
    assert off.peak_bytes - on.peak_bytes >= 4 * 128256 * T


@pytest.mark.oracle
def test_optimizer_in_backward_frees_the_gradients():
    off = _trace("qwen2.5-0.5b", 1)
    on = _trace("qwen2.5-0.5b", 1, recipe=(("optimizer_in_bwd", True),))
    grads = 2 * off.trainable_params
    assert off.phase_peak_by_category["optimizer"]["Gradient"] == grads
    assert on.phase_peak_by_category["optimizer"]["Gradient"] == 0
    assert off.phase_peak_bytes["optimizer"] - on.phase_peak_bytes["optimizer"] >= grads
    assert on.optimizer_state_bytes == off.optimizer_state_bytes


@pytest.mark.oracle
def test_offloading_moves_checkpointed_layer_inputs_to_the_host():
    ac = (("checkpointing", "full"),)
    keep = [_trace("llama-3.2-1b", n, ac) for n in (1, 2)]
    off = [_trace("llama-3.2-1b", n, ac, (("activation_offloading", True),)) for n in (1, 2)]
    assert _act(keep[1]) - _act(keep[0]) == 2 * 2048 * T  # the checkpoint keeps the bf16 layer input
    assert _act(off[1]) - _act(off[0]) == 0
    assert _host(off[1]) - _host(off[0]) == 2 * 2048 * T


@pytest.mark.oracle
def test_paged_states_leave_the_device():
    setup = (("optimizer", "adamw-8bit"),)
    plain = _trace("qwen2.5-0.5b", 1, setup)
    paged = _trace("qwen2.5-0.5b", 1, setup, (("paged_optimizer", True),))
    assert plain.optimizer_state_bytes == paged.optimizer_state_bytes
    moved = plain.peak_by_category["Optstate"] - paged.peak_by_category["Optstate"]
    assert moved == pytest.approx(_host(paged), rel=0.01) and moved > 1.9 * plain.trainable_params


@pytest.mark.oracle
def test_forward_flops_of_a_dense_decoder_in_closed_form():
    from planner.truth.torchtune_step import trace_torchtune_step

    cfg = _config("qwen2.5-0.5b")
    r = trace_torchtune_step(cfg, TrainingSetup(micro_batch=1, seq_len=128), 1)
    h, kv, inter, v, s = 896, 128, 4864, 151936, 128
    linear = h * h + 2 * h * kv + h * h + 3 * h * inter
    attention = 2 * 2 * s * s * h  # scores and values over the full square (SDPA's math path)
    assert r.flops_forward == pytest.approx(2 * s * (linear + v * h) + attention, rel=1e-3)
    assert r.flops_backward == pytest.approx(2 * r.flops_forward, rel=0.02)


@pytest.mark.oracle
@pytest.mark.parametrize("model", ["gemma-2-2b"])
def test_other_families_build_and_trace(model):
    from planner.truth.torchtune_step import trace_torchtune_step

    r = trace_torchtune_step(_config(model), TrainingSetup(micro_batch=1, seq_len=128, method="lora"), 1,
                             count_flops=False)
    assert r.peak_bytes == max(r.phase_peak_bytes.values()) and 0 < r.trainable_params < r.total_params


# -- the formulas against the oracle -------------------------------------------------------------------

LAYER_CASES = [
    ("llama-3.2-1b", (), ()),
    ("llama-3.2-1b", (("method", "lora"),), ()),
    ("llama-3.2-1b", (("method", "qlora"), ("lora_targets", ("q_proj", "v_proj", "o_proj"))), (("packed_documents", 4),)),
    ("qwen2.5-0.5b", (), ()),
    ("qwen2.5-0.5b", (("method", "lora"),), (("packed_documents", 2),)),
]


@pytest.mark.oracle
@pytest.mark.parametrize("model,setup,recipe", LAYER_CASES)
def test_layer_bytes_per_token_match_the_oracle(model, setup, recipe):
    cfg = _config(model)
    spec = model_spec_from_config(cfg)
    s = TrainingSetup(micro_batch=B, seq_len=S, **dict(setup))
    measured = (_act(_trace(model, 2, setup, recipe)) - _act(_trace(model, 1, setup, recipe))) / T
    packed = bool(dict(recipe).get("packed_documents"))
    predicted = tt.layer_saved_bytes_per_token(
        spec.layers[1], method=s.method, lora_rank=s.lora_rank, lora_targets=s.lora_targets, micro_batch=B,
        seq_len=S, rope=tt.rope_kind(spec.model_type), packed=packed)
    assert predicted == pytest.approx(measured, abs=0.5)


@pytest.mark.oracle
@pytest.mark.parametrize("method,chunks", [("lora", 0), ("lora", 8), ("full", 8)])
def test_forward_and_backward_peaks_match_the_formulas(method, chunks):
    """Phase peaks = parameters, buffers, optimizer state + layers + head + the loss's extra bytes
    (full fine-tuning: the backward peak is then the trained head's gradient summed over chunks)."""
    spec = model_spec_from_config(_config("llama-3.2-1b"))
    r = _trace("llama-3.2-1b", 1, (("method", method),), (("output_chunks", chunks),) if chunks else ())
    layer = tt.layer_saved_bytes_per_token(spec.layers[0], method=method, first_layer=True) * T
    head = tt.head_saved_bytes_per_token(spec, method=method) * T
    loss = tt.loss_extra_bytes(spec, T, output_chunks=chunks, head_trainable=method == "full")
    for phase in ("forward", "backward"):
        fixed = sum(v for k, v in r.phase_peak_by_category[phase].items() if k in ("Parameter", "Buffer", "Optstate"))
        assert r.phase_peak_bytes[phase] == pytest.approx(fixed + layer + head + loss[phase], rel=0.01), phase
