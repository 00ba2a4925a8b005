"""Published numbers the memory model must reproduce (each test cites its source)."""

import numpy as np
import pytest

from planner.cost.memory.phases import kv_cache_bytes, nf4_bytes, training_memory
from planner.cost.params import count_params
from planner.specs.catalog import load_model_config
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup

# LLaMA-65B (Touvron et al. 2023, Table 2: dim 8192, 64 heads, 80 layers; 65.2B parameters)
LLAMA_65B = {
    "model_type": "llama", "hidden_size": 8192, "num_attention_heads": 64, "num_hidden_layers": 80,
    "intermediate_size": 22016, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}


def _spec(name):
    return model_spec_from_config(load_model_config(name)[0], name)


def _model_states(mem):
    c = mem.components
    return float(c["weights"] + c["gradients"] + c["master_weights"] + c["optimizer_states"])


@pytest.mark.parametrize(
    "zero,bytes_per_param",
    # Rajbhandari et al. 2020 (ZeRO), sec. 5 / Figure 1: mixed-precision Adam keeps 2 + 2 + K
    # bytes per parameter with K = 12; P_os: 2 + 2 + K/Nd; P_os+g: 2 + (2 + K)/Nd; P_os+g+p: (2 + 2 + K)/Nd
    # DeepSpeed's ZeRO-1 keeps whole gradients (P_os) across accumulated micro-batches; with one micro-batch per
    # step and overlap_comm (the exported config) it frees them into partitions as ZeRO-2 does (run on its CPU
    # accelerator: tests/test_zero_lora.py), so P_os is checked at grad_accum 2
    [(0, 16.0), (1, 4 + 12 / 64), (2, 2 + 14 / 64), (3, 16 / 64)],
)
def test_zero_bytes_per_parameter(zero, bytes_per_param):
    spec = _spec("llama-2-7b")
    setup = TrainingSetup(precision="bf16-mixed", num_gpus=64 if zero else 1, zero=zero, micro_batch=1, seq_len=128,
                          grad_accum=2)
    psi = count_params(spec).total
    assert _model_states(training_memory(spec, setup)) == pytest.approx(bytes_per_param * psi, rel=1e-9)


def test_zero_paper_figure_1_numbers():
    """ZeRO, Figure 1: a 7.5B model on 64 GPUs needs 120 GB, 31.4 GB, 16.6 GB and 1.88 GB."""
    psi, nd = 7.5e9, 64
    assert [round(x, 2) for x in ((16 * psi) / 1e9, (4 + 12 / nd) * psi / 1e9, (2 + 14 / nd) * psi / 1e9)] == [
        120.0, 31.41, 16.64,
    ]
    assert 16 * psi / nd / 1e9 == pytest.approx(1.875)


def test_qlora_65b_fits_in_48_gb():
    """Dettmers et al. 2023 (QLoRA), abstract: finetuning a 65B model drops from >780 GB of GPU
    memory to <48 GB. Their set-up: NF4 with double quantization, LoRA on all linear layers
    (r=64), gradient checkpointing, paged optimizers (states evicted to CPU memory under
    pressure: modelled as optimizer offload with the fused step)."""
    spec = model_spec_from_config(LLAMA_65B, "llama-65b")
    assert count_params(spec).total == pytest.approx(65.2e9, rel=0.01)
    qlora = TrainingSetup(
        method="qlora", lora_rank=64, checkpointing="full", micro_batch=1, seq_len=512,
        optimizer_impl="fused", offload_optimizer=True,
    )
    assert float(training_memory(spec, qlora).peak_bytes) < 48e9
    full = TrainingSetup(method="full", precision="bf16-mixed", micro_batch=1, seq_len=512)
    assert float(training_memory(spec, full).peak_bytes) > 780e9


def test_nf4_bits_per_parameter():
    """QLoRA sec. 3: double quantization cuts the constants from 32/64 = 0.5 bits per parameter
    to 8/64 + 32/(64 * 256) = 0.127 bits."""
    n = 1e9
    assert float(nf4_bytes(n, 64, False)) * 8 / n == pytest.approx(4.5)
    assert float(nf4_bytes(n, 64, True)) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


def test_eight_bit_adam_states():
    """Dettmers et al. 2022: block-wise 8-bit Adam keeps 2 bytes of state per parameter (plus one
    fp32 absmax per block of 256) instead of 8: a 75% cut of the optimizer states."""
    spec = _spec("llama-2-7b")
    base = TrainingSetup(precision="bf16-mixed", micro_batch=1, seq_len=128)
    states32 = float(training_memory(spec, base).components["optimizer_states"])
    states8 = float(training_memory(spec, base.model_copy(update={"optimizer": "adamw-8bit"})).components["optimizer_states"])
    psi = count_params(spec).total
    assert states32 == pytest.approx(8 * psi)
    assert states8 == pytest.approx(2 * psi * (1 + 4 / 256), rel=1e-3)


def test_full_checkpointing_keeps_layer_inputs():
    """Korthikanti et al. 2022, sec. 5 ("full activation recomputation"): only each layer's input,
    2sbh bytes per layer in 16-bit, is kept."""
    spec = _spec("llama-2-7b")
    b, s = 2, 1024
    setup = TrainingSetup(checkpointing="full", micro_batch=b, seq_len=s)
    kept = training_memory(spec, setup).components["saved_activations_with_checkpointing"]
    head = training_memory(spec, setup.model_copy(update={"checkpointing": "none"}))
    head_only = float(head.components["activations"]) - _layers_only(spec, setup)
    assert float(kept) - head_only == pytest.approx(2 * s * b * spec.hidden_size * spec.num_layers)


def _layers_only(spec, setup):
    from planner.cost.memory.activation_memory import layer_activations

    total, _, _ = layer_activations(spec, setup, np.float64(setup.micro_batch), np.float64(setup.seq_len), 1)
    return float(total)


def test_kv_cache_llama_2_70b_grouped_query():
    """Llama-2-70B (GQA, 8 KV heads of 128): 2 x 80 layers x 8 x 128 x 2 bytes = 327,680 bytes
    (320 KiB) per token in bf16, 8x less than multi-head attention would need."""
    spec = _spec("llama-2-70b")
    assert float(kv_cache_bytes(spec, 1, 1, 2)) == 2 * 80 * 8 * 128 * 2
    assert float(kv_cache_bytes(spec, 4, 4096, 2)) == 4 * 4096 * 327_680
