"""The fake-tensor oracle (planner.truth.trace) checked against facts that need no analytic model of ours:
byte sizes of the tensors that must exist (parameters, gradients, AdamW moments), closed-form FLOPs of
a dense decoder, linearity of activations in the micro-batch, and what each set-up switch must change.

Tiny configs (2 layers, hidden 64, vocab 1000, 2 x 32 tokens) keep every trace about a second.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from planner.specs.configs import reduce_layers
from planner.specs.setup import TrainingSetup

# -- tiny configs, written out so the tests do not depend on the catalog ------------------------------
D, FF, V, L, H, KV = 64, 176, 1000, 2, 4, 2
HD = D // H
LLAMA = dict(
    model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
    num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=256,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
QWEN2_TIED = dict(LLAMA, model_type="qwen2", tie_word_embeddings=True)
MIXTRAL = dict(
    model_type="mixtral", vocab_size=V, hidden_size=D, intermediate_size=128, num_hidden_layers=L,
    num_attention_heads=H, num_key_value_heads=KV, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
)
GEMMA2 = dict(
    model_type="gemma2", vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
    num_attention_heads=H, num_key_value_heads=KV, head_dim=HD, max_position_embeddings=256,
    sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
B, S = 2, 32
TOKENS = B * S

# parameter counts by hand (llama: no biases; RMSNorm weight d per norm)
ATTN_LINEAR = D * D + 2 * D * (KV * HD) + D * D  # q, k, v, o
MLP_LINEAR = 3 * D * FF  # gate, up, down
LAYER_LINEAR = ATTN_LINEAR + MLP_LINEAR
NORMS = (2 * L + 1) * D
LLAMA_PARAMS = V * D + L * LAYER_LINEAR + NORMS + V * D  # embed, layers, norms, untied lm_head
LLAMA_TENSORS = 1 + L * (7 + 2) + 1 + 1  # embed, per layer 7 linears + 2 norms, final norm, lm_head
ROTARY_BUFFER_BYTES = 2 * (HD // 2) * 4  # rotary inv_freq and original_inv_freq, fp32


def setup(**kw) -> TrainingSetup:
    base = dict(micro_batch=B, seq_len=S, precision="fp32")
    base.update(kw)
    return TrainingSetup(**base)


def trace(config=LLAMA, count_flops=False, num_layers=None, **kw):
    from planner.truth.trace import trace_training_step

    return trace_training_step(config, setup(**kw), num_layers=num_layers, count_flops=count_flops)


# -- no torch needed -----------------------------------------------------------------------------------


def test_module_imports_without_torch():
    code = "import sys, planner.truth.trace; assert 'torch' not in sys.modules, 'planner.truth.trace imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reduce_layers_truncates_per_layer_lists_and_index_lists():
    cfg = {
        "model_type": "qwen3_moe", "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "mlp_only_layers": [0, 3], "eos_token_id": [1, 2, 3, 4], "max_window_layers": 28,
        "text_config": {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"]},
    }
    out = reduce_layers(cfg, 2)
    assert out["num_hidden_layers"] == 2
    assert out["layer_types"] == ["sliding_attention", "full_attention"]
    assert out["mlp_only_layers"] == [0]
    assert out["eos_token_id"] == [1, 2, 3, 4]  # not a per-layer list
    assert out["max_window_layers"] == 28  # integer knobs stay
    assert out["text_config"] == {"num_hidden_layers": 2, "layer_types": ["a", "b"]}
    assert cfg["num_hidden_layers"] == 4  # input untouched
    assert reduce_layers({"model_type": "gpt2", "n_layer": 12}, 3)["n_layer"] == 3
    with pytest.raises(ValueError, match="more than"):
        reduce_layers(cfg, 5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_gpus=2), "shard"),
        (dict(zero=3), "shard"),
        (dict(optimizer="adafactor", optimizer_impl="fused"), "fused"),
    ],
)
def test_untraceable_setups_raise_not_implemented(kw, match):
    from planner.truth.trace import trace_training_step

    with pytest.raises(NotImplementedError, match=match):
        trace_training_step(LLAMA, setup(**kw))


# -- memory: bytes of the tensors that must exist --------------------------------------------------------


@pytest.mark.oracle
def test_fp32_adamw_foreach_parameter_gradient_and_state_bytes():
    r = trace()
    assert r.total_params == r.trainable_params == LLAMA_PARAMS
    assert r.num_layers == L
    cats = r.peak_by_category
    assert sum(cats.values()) == r.peak_bytes
    assert cats["Parameter"] == 4 * LLAMA_PARAMS
    assert cats["Buffer"] == ROTARY_BUFFER_BYTES
    assert cats["Other"] == 2 * 8 * TOKENS  # input_ids and labels, int64
    # AdamW state: exp_avg + exp_avg_sq at fp32, plus a 4-byte fp32 `step` per parameter tensor
    assert r.optimizer_state_bytes == 2 * 4 * LLAMA_PARAMS + 4 * LLAMA_TENSORS
    # tiny model: the peak is in the optimizer step, all gradients alive, and the foreach step's
    # one gradient-sized scratch buffer (from _foreach_sqrt) counted as Optstate
    assert r.peak_phase == "optimizer"
    assert cats["Gradient"] == 4 * LLAMA_PARAMS
    assert cats["Optstate"] == r.optimizer_state_bytes + 4 * LLAMA_PARAMS
    assert cats["Activation"] == 0 and cats["Temp"] == 0
    # the global peak is step 2's optimizer peak; no phase exceeds it
    assert r.phase_peak_bytes["optimizer"] == r.peak_bytes
    assert max(r.phase_peak_bytes.values()) == r.peak_bytes
    for phase, split in r.phase_peak_by_category.items():
        assert sum(split.values()) == r.phase_peak_bytes[phase]
        assert split["Parameter"] == 4 * LLAMA_PARAMS
    # step 2's forward starts with the optimizer state alive and no gradients (set_to_none)
    assert r.phase_peak_by_category["forward"]["Optstate"] == r.optimizer_state_bytes
    assert r.phase_peak_by_category["forward"]["Gradient"] == 0


@pytest.mark.oracle
def test_fused_adamw_has_no_scratch_and_bf16_halves_weights_and_state():
    fused = trace(optimizer_impl="fused")
    assert fused.phase_peak_by_category["optimizer"]["Optstate"] == fused.optimizer_state_bytes
    bf16 = trace(precision="bf16", optimizer_impl="fused")
    assert bf16.peak_by_category["Parameter"] * 2 == fused.peak_by_category["Parameter"]
    # AdamW moments follow the parameter dtype; the `step` scalars stay fp32
    assert bf16.optimizer_state_bytes == 2 * 2 * LLAMA_PARAMS + 4 * LLAMA_TENSORS
    assert bf16.phase_peak_by_category["optimizer"]["Gradient"] == 2 * LLAMA_PARAMS


@pytest.mark.oracle
def test_bf16_mixed_keeps_fp32_weights_and_gradients():
    r = trace(precision="bf16-mixed", optimizer_impl="fused")
    assert r.peak_by_category["Parameter"] == 4 * LLAMA_PARAMS
    assert r.phase_peak_by_category["optimizer"]["Gradient"] == 4 * LLAMA_PARAMS
    assert r.optimizer_state_bytes == 2 * 4 * LLAMA_PARAMS + 4 * LLAMA_TENSORS


@pytest.mark.oracle
def test_tied_embeddings_are_one_tensor():
    r = trace(QWEN2_TIED, optimizer="sgd")
    # qwen2 has q/k/v biases; the lm_head is the embedding
    qwen2_params = LLAMA_PARAMS - V * D + L * (D + 2 * KV * HD)
    assert r.total_params == qwen2_params
    assert r.peak_by_category["Parameter"] == 4 * qwen2_params


@pytest.mark.oracle
def test_optimizer_state_bytes_by_optimizer():
    sgd = trace(optimizer="sgd", precision="bf16")
    assert sgd.optimizer_state_bytes == 2 * LLAMA_PARAMS  # momentum buffer at parameter dtype
    lion = trace(optimizer="lion", precision="bf16")
    assert lion.optimizer_state_bytes == 2 * LLAMA_PARAMS  # exp_avg
    ada = trace(optimizer="adafactor", precision="bf16")
    # torch Adafactor: a matrix (r, c) keeps a row and a column factor, a vector its full variance
    shapes = [(V, D), (V, D)] + L * [(D, D), (KV * HD, D), (KV * HD, D), (D, D), (FF, D), (FF, D), (D, FF)]
    vectors = (2 * L + 1) * [D]
    expected = sum(2 * (r + c) for r, c in shapes) + sum(2 * n for n in vectors) + 4 * LLAMA_TENSORS
    assert ada.optimizer_state_bytes == expected
    assert any("adafactor" in n for n in ada.notes)


@pytest.mark.oracle
def test_lora_only_adapters_get_gradients_and_state():
    r = trace(method="lora", precision="bf16", lora_rank=4, optimizer_impl="fused")
    rank = 4
    # peft "all-linear": every nn.Linear of the layers, not lm_head; A is (r, in), B is (out, r)
    adapters = L * rank * (
        (D + D) + (D + KV * HD) + (D + KV * HD) + (D + D) + 2 * (D + FF) + (FF + D)
    )
    assert r.trainable_params == adapters
    assert r.total_params == LLAMA_PARAMS + adapters
    # base weights bf16, adapters fp32 (peft's autocast_adapter_dtype=True)
    assert r.peak_by_category["Parameter"] == 2 * LLAMA_PARAMS + 4 * adapters
    assert r.phase_peak_by_category["optimizer"]["Gradient"] == 4 * adapters
    assert r.optimizer_state_bytes == 2 * 4 * adapters + 4 * (L * 7 * 2)


@pytest.mark.oracle
@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_packs_linear_weights_into_half_a_byte(double_quant):
    pytest.importorskip("bitsandbytes")
    rank, block = 4, 64
    r = trace(method="qlora", precision="bf16", lora_rank=rank, qlora_double_quant=double_quant)
    linears = [D * D, D * KV * HD, D * KV * HD, D * D, D * FF, D * FF, FF * D]  # per layer
    quantized = L * sum(linears)
    adapters = L * rank * ((D + D) + 2 * (D + KV * HD) + (D + D) + 2 * (D + FF) + (FF + D))
    unquantized = LLAMA_PARAMS - quantized  # embedding, lm_head, norms stay bf16
    assert r.trainable_params == adapters
    assert r.peak_by_category["Parameter"] == 2 * unquantized + quantized // 2 + 4 * adapters
    # NF4 constants per quantized linear: one absmax per block of 64 (fp32, or uint8 with double
    # quantization plus an fp32 absmax per 256 blocks, an fp32 offset and a 256-entry fp32 code),
    # and the 16-entry fp32 NF4 code
    constants = 0
    for n in L * linears:
        blocks = n // block
        if double_quant:
            constants += blocks + 4 * -(-blocks // 256) + 4 + 256 * 4 + 16 * 4
        else:
            constants += 4 * blocks + 16 * 4
    rotary_bf16 = 2 * (HD // 2) * 2
    assert r.peak_by_category["Buffer"] == constants + rotary_bf16
    assert r.phase_peak_by_category["optimizer"]["Gradient"] == 4 * adapters


@pytest.mark.oracle
def test_adamw_8bit_state_is_two_bytes_per_parameter_plus_block_scales():
    pytest.importorskip("bitsandbytes")
    r = trace(optimizer="adamw-8bit", precision="bf16")
    shapes = [(V, D), (V, D)] + L * [(D, D), (KV * HD, D), (KV * HD, D), (D, D), (FF, D), (FF, D), (D, FF)]
    sizes = [r_ * c for r_, c in shapes] + (2 * L + 1) * [D]
    # bitsandbytes: uint8 exp_avg and exp_avg_sq plus an fp32 absmax per 256 values for tensors of
    # >= 4096 elements, fp32 moments below that; two 256-entry fp32 code tables shared by all
    expected = sum(2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 8 * n for n in sizes) + 2 * 256 * 4
    assert r.optimizer_state_bytes == expected
    assert r.phase_peak_by_category["optimizer"]["Optstate"] == expected  # no scratch


@pytest.mark.oracle
def test_grad_accumulation_keeps_gradients_through_the_next_forward():
    r = trace(precision="bf16", grad_accum=2)
    assert r.phase_peak_by_category["forward"]["Gradient"] == 2 * LLAMA_PARAMS


# -- memory: what scales with what -----------------------------------------------------------------------


@pytest.mark.oracle
def test_activations_linear_in_micro_batch():
    acts = {b: trace(micro_batch=b, precision="bf16").phase_peak_by_category["forward"]["Activation"]
            for b in (1, 2, 4)}
    assert acts[1] > 0
    assert acts[2] / acts[1] == pytest.approx(2, rel=0.02)
    assert acts[4] / acts[2] == pytest.approx(2, rel=0.02)


@pytest.mark.oracle
def test_checkpointing_reduces_saved_activations():
    def fwd_act(r):
        return r.phase_peak_by_category["forward"]["Activation"]

    # the loss's fp32 logits dominate a tiny model; a small vocab makes the layers visible
    layers = 3
    cfg = dict(LLAMA, num_hidden_layers=layers, vocab_size=128)
    none = trace(cfg, precision="bf16", count_flops=True)
    full = trace(cfg, precision="bf16", checkpointing="full", count_flops=True)
    sel = trace(cfg, precision="bf16", checkpointing="selective", count_flops=True)
    assert fwd_act(full) < fwd_act(sel) < fwd_act(none)
    # same forward; full recomputes the layers in backward (less the last matmul of each, which
    # non-reentrant checkpointing's early stop skips); selective saves every matmul: no recompute FLOPs
    assert full.flops_forward == sel.flops_forward == none.flops_forward
    layer_fwd = layers * (2 * LAYER_LINEAR * TOKENS + 2 * 2 * S * S * D * B)
    extra = full.flops_backward - none.flops_backward
    assert 0.5 * layer_fwd < extra < layer_fwd
    assert sel.flops_backward == none.flops_backward


@pytest.mark.oracle
def test_dropout_override_reaches_the_model_and_sdpa_stays_flash_without_it():
    from planner.truth.training_model import build_model

    model = build_model(LLAMA, setup(dropout=0.1), device="meta")
    assert model.config.attention_dropout == 0.1
    eager = trace(precision="bf16", attention="eager")
    sdpa = trace(precision="bf16", attention="sdpa")
    # eager keeps the s x s scores; CPU's flash-style SDPA does not
    assert eager.phase_peak_by_category["forward"]["Activation"] > sdpa.phase_peak_by_category["forward"]["Activation"]


@pytest.mark.oracle
def test_gemma2_falls_back_to_eager_with_a_note():
    r = trace(GEMMA2, precision="bf16")
    assert any("eager" in n for n in r.notes)


# -- FLOPs: closed forms ---------------------------------------------------------------------------------


@pytest.mark.oracle
def test_dense_flops_match_closed_form():
    from planner.truth.trace import trace_flops

    fwd, bwd, by_module = trace_flops(LLAMA, setup())
    linear = L * LAYER_LINEAR + V * D  # matmul weights: layers and lm_head (the embedding is a lookup)
    attention = 2 * 2 * L * S * S * D * B  # scores q.k and values p.v over the full s x s square
    assert fwd == pytest.approx(2 * linear * TOKENS + attention, rel=0.01)
    assert bwd == pytest.approx(2 * fwd, rel=0.01)
    assert sum(by_module.values()) == fwd + bwd
    assert by_module["lm_head"] == 3 * 2 * V * D * TOKENS
    assert by_module["model.layers.0.mlp"] == 3 * 2 * MLP_LINEAR * TOKENS
    assert by_module["other"] == 0


@pytest.mark.oracle
def test_moe_flops_count_only_the_routed_experts():
    from planner.truth.trace import trace_flops

    fwd, bwd, _ = trace_flops(MIXTRAL, setup(precision="bf16"))
    experts_per_token = 2 * 3 * D * 128  # top-2 of 4 experts, gate/up/down
    router = 4 * D
    linear = L * (ATTN_LINEAR + router + experts_per_token) + V * D
    attention = 2 * 2 * L * S * S * D * B
    assert fwd == pytest.approx(2 * linear * TOKENS + attention, rel=0.01)
    assert bwd == pytest.approx(2 * fwd, rel=0.01)


@pytest.mark.oracle
def test_lora_backward_skips_frozen_weight_gradients():
    from planner.truth.trace import trace_flops

    fwd, bwd, _ = trace_flops(LLAMA, setup(method="lora", lora_rank=4))
    # frozen weights need only the input gradient: backward is about one forward, not two
    assert 0.8 * fwd < bwd < 1.3 * fwd


@pytest.mark.oracle
def test_build_model_runs_a_real_step_on_cpu():
    import torch

    from planner.truth.training_model import build_model

    model = build_model(LLAMA, setup(method="lora"), device="cpu")
    ids = torch.randint(0, V, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.oracle
def test_build_model_qlora_quantizes_on_cpu():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    from planner.truth.training_model import build_model

    model = build_model(LLAMA, setup(method="qlora", precision="bf16"), device="cpu")
    linear = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert linear.weight.dtype == torch.uint8 and linear.weight.numel() * 2 == linear.in_features * linear.out_features
    ids = torch.randint(0, V, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()


def test_fallback_lion_matches_its_definition():
    import torch

    from planner.truth.optimizers import Lion

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = torch.tensor([0.5, 0.5, -0.5])
    opt.step()
    # exp_avg starts at 0: update = sign(0.1 * grad); p -= lr * update; exp_avg = 0.01 * grad
    assert torch.allclose(p.detach(), torch.tensor([0.9, -2.1, 3.1]))
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * p.grad)


def test_lion_fallback_without_lion_pytorch(monkeypatch):
    """With lion-pytorch absent the oracle uses its own Lion (the import must not shadow it)."""
    import sys

    import torch

    from planner.specs.setup import TrainingSetup
    from planner.truth.optimizers import make_optimizer

    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    notes: list[str] = []
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainingSetup(optimizer="lion"), notes)
    assert "not installed" in notes[-1] and isinstance(opt, torch.optim.Optimizer)
