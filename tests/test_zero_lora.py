"""LoRA, DoRA and QLoRA under DeepSpeed ZeRO on the Hugging Face stack (``planner.cost.memory.zero_dtypes``,
``states``, ``zero_buffers``) against DeepSpeed 0.19.8 itself, run on its CPU accelerator under PyTorch's
MemTracker (``benchmarks/zero_oracle_cpu.py``; ZERO_ORACLE_LORA in ``tests/test_zero_buffers.py``).

What the oracle's loop adds to every phase, derived (not fitted): the previous step's output is still bound
to ``out`` until the next forward returns, so its logits (seq x vocab) and transformers' DynamicCache
(layers x 2 x seq x hidden) in the model dtype and the int64 ids stay live (``leftover_bytes``). On CPU,
torch's AdamW takes the single-tensor path (foreach is its default for CUDA tensors only), whose
``exp_avg_sq.sqrt() / bias_correction2_sqrt`` makes two fp32 temporaries of DeepSpeed's flat partition
where the foreach step the planner prices (CUDA) makes one (``cpu_step_bytes``).
Tolerances: the states at a step's start within 1% (what is left is scalars, and with DoRA 131,072 bytes
not accounted for: 0.8%); each phase's peak within 6% (activations included, priced on the CPU device).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from planner.cost.memory import phases as mem_phases
from planner.cost.memory import zero_buffers as zb
from planner.cost.memory import zero_dtypes
from planner.cost.memory.states import model_states
from planner.specs.setup import TrainingSetup
from tests.test_zero_buffers import ZERO_ORACLE_LORA, tiny_llama

SEQ, VOCAB, HIDDEN, LAYERS, RANK = 128, 8192, 256, 4, 8
ADAPTERS = LAYERS * RANK * (4 * (256 + 256) + 2 * (256 + 768) + (768 + 256))  # q,k,v,o,gate,up,down


def _total(spec) -> float:
    from planner.cost import spec_facts

    return float(spec_facts.param_counts(spec).total)


def leftover_bytes(element_bytes: float) -> float:
    """The previous step's logits, KV cache and ids, live in every phase of the oracle's loop."""
    return SEQ * VOCAB * element_bytes + LAYERS * 2 * SEQ * HIDDEN * element_bytes + SEQ * 8


def oracle_config(stage: int, reduce: float) -> zb.ZeroConfig:
    """The zero_optimization keys the oracle ran (transformers' "auto" values for hidden 256 at stage 3)."""
    config = replace(zb.exported_config(stage), reduce_bucket_elems=reduce)
    if stage == 3:
        config = replace(config, prefetch_bucket_elems=58982, persistence_threshold_elems=2560)
    return config


def oracle_setup(key) -> TrainingSetup:
    ranks, stage, precision, mode, _ = key
    return TrainingSetup(method={"full": "full", "qlora": "qlora"}.get(mode, "lora"), lora_rank=RANK,
                         precision="fp32" if precision == "fp32" else "bf16-mixed", num_gpus=ranks, zero=stage,
                         micro_batch=1, seq_len=SEQ, dora=mode == "dora",
                         adapter_dtype="base" if mode == "lora-base" else "auto")


def cpu_step_bytes(setup: TrainingSetup) -> float:
    """One more fp32 temporary of this rank's flat partition (per sub-group) on CPU (module docstring)."""
    trainable = _total(tiny_llama(LAYERS)) if setup.method == "full" else ADAPTERS + (
        LAYERS * (4 * 256 + 2 * 768 + 256) if setup.dora else 0)
    return min(trainable / setup.num_gpus, 1e9) * 4.0


def predicted(key, monkeypatch):
    setup = oracle_setup(key)
    config = oracle_config(key[1], key[4])
    monkeypatch.setattr(zb, "priced_config", lambda s, h: config)
    memory = mem_phases.training_memory(tiny_llama(LAYERS), setup, device="cpu")
    return setup, config, memory


def element_bytes(key) -> float:
    return 4.0 if key[2] == "fp32" else 2.0


def test_oracle_adapter_count():
    """The oracle's LoRA holds the adapters the planner counts (a check of this file's constants)."""
    states = model_states(tiny_llama(LAYERS), oracle_setup((1, 2, "bf16", "lora", 65536)), np.float64(RANK))
    assert float(states.adapters) == ADAPTERS == 163840


@pytest.mark.parametrize("key", list(ZERO_ORACLE_LORA))
def test_dtypes_are_deepspeeds(key):
    """Bytes per element DeepSpeed gave the trainable and the frozen parameters: the engine's dtype at
    ZeRO-1/2 (adapters and 4-bit QLoRA's embeddings, norms and head included), peft's fp32 adapters at
    ZeRO-3 unless adapter_dtype is base."""
    setup, (trainable, frozen) = oracle_setup(key), ZERO_ORACLE_LORA[key]["dtypes"]
    full = setup.method == "full"
    assert (zero_dtypes.engine_dtype_bytes(setup) if full else zero_dtypes.adapter_param_bytes(setup)) == trainable
    if frozen is not None:
        assert zero_dtypes.frozen_weight_bytes(setup) == frozen


@pytest.mark.parametrize("key", [k for k in ZERO_ORACLE_LORA if k[1] < 3])
def test_states_at_step_start_against_deepspeed(key, monkeypatch):
    """ZeRO-1/2 at a step's start: frozen weights, adapters, the fp32 partition and fp32 Adam states over
    the ranks (and, full training, the fp32 partition DeepSpeed adds to a pure-16-bit layout or clones in
    fp32): the weights, adapters, master and states the planner prices plus what ZeRO adds in forward."""
    setup, config, memory = predicted(key, monkeypatch)
    c = memory.components
    bytes_setup = mem_phases._bytes_setup(setup)
    extra = zb.zero_buffer_bytes(tiny_llama(LAYERS), bytes_setup, model_states(tiny_llama(LAYERS), bytes_setup,
                                                                                np.float64(RANK)), config)
    states = c["weights"] + c["lora_adapters"] + c["master_weights"] + c["optimizer_states"] + extra["forward"]
    measured = ZERO_ORACLE_LORA[key]["before"] - leftover_bytes(element_bytes(key))
    assert float(states) == pytest.approx(measured, rel=0.01)


_KNOWN_GAP = pytest.mark.xfail(strict=True, reason=(
    "activation_memory.compute_setup cannot hand QLoRA's activations the adapters' dtype DeepSpeed holds "
    "(zero_dtypes.adapter_param_bytes): the engine's bf16 at ZeRO-1/2 (priced fp32); adapter_dtype 'base' means "
    "fp32 for a 4-bit base outside DeepSpeed (peft)"))


_BUCKETS_AFTER_THE_LOSS = pytest.mark.xfail(strict=True, reason=(
    "with a frozen head the IPG buckets are allocated at the first adapter gradient, after the loss's peak: "
    "DeepSpeed's backward peak did not move from reduce_bucket_size 65536 to 1e6; zero_buffers adds them to the "
    "whole backward phase (phases._phases has no separate moment for them)"))
REFUSED = {(2, 3, "bf16", "dora", 65536)}  # zero_dtypes.unpriced_reason: test_dora_under_zero3_is_refused


def _phase_cases():
    """Every non-full run and phase; the forward and backward of QLoRA are the known activation gap (``_KNOWN_GAP``), LoRA's backward with buckets larger than the adapters the known
    bucket over-count (strict: they fail the day they are priced, to be unmarked)."""
    for key in (k for k in ZERO_ORACLE_LORA if k[3] != "full" and k not in REFUSED):
        for phase in ("forward", "backward", "optimizer"):
            if key[3] == "qlora" and phase != "optimizer":
                yield pytest.param(key, phase, marks=_KNOWN_GAP)
            elif key[4] != 65536 and phase == "backward":
                yield pytest.param(key, phase, marks=_BUCKETS_AFTER_THE_LOSS)
            else:
                yield key, phase


@pytest.mark.parametrize(("key", "phase"), list(_phase_cases()))
def test_phase_peaks_against_deepspeed(key, phase, monkeypatch):
    """Each phase's peak of LoRA, DoRA and QLoRA under ZeRO-1/2/3 on 1 and 2 ranks, within 6%. Before this
    pricing (fp32 frozen weights and fp32 adapters under bf16-mixed, no fp32 partition) it was 44% to 103%
    over."""
    setup, _, memory = predicted(key, monkeypatch)
    value = float(memory.phases[phase]) + (cpu_step_bytes(setup) if phase == "optimizer" else 0.0)
    measured = ZERO_ORACLE_LORA[key][phase] - leftover_bytes(element_bytes(key))
    assert value == pytest.approx(measured, rel=0.06)


def test_zero3_partitions_frozen_weights_and_adapters(monkeypatch):
    """ZeRO-3 on 2 ranks: the frozen base and the adapters are partitioned (the states at a step's start
    halve from 1 to 2 ranks, less what stays whole), and the optimizer phase is what the planner prices."""
    one, two = (ZERO_ORACLE_LORA[(r, 3, "bf16", "lora-base" if r == 2 else "lora", 65536)] for r in (1, 2))
    assert two["before"] < 0.6 * one["before"]
    _, _, memory = predicted((2, 3, "bf16", "lora-base", 65536), monkeypatch)
    weights = float(memory.components["weights"])
    assert weights == pytest.approx(_total(tiny_llama(LAYERS)) * 2 / 2, rel=1e-9)


def test_lora_under_zero_is_priced_as_deepspeed_holds_it():
    """Llama-3.1-8B, LoRA r16 all-linear, ZeRO-2 over 8 GPUs, bf16-mixed: bf16 base and adapters, bf16
    adapter gradients over the ranks, fp32 partition (4) and Adam states (8) over the ranks."""
    from planner.specs.catalog import load_spec

    spec = load_spec("llama-3.1-8b")
    setup = TrainingSetup(method="lora", lora_rank=16, num_gpus=8, zero=2, precision="bf16-mixed")
    st = model_states(spec, setup, np.float64(16))
    n = float(st.adapters)
    assert float(st.weights) == pytest.approx(_total(spec) * 2)
    assert (float(st.gradients), float(st.master), float(st.states)) == pytest.approx((n * 2 / 8, n * 4 / 8, n * 8 / 8))
    three = model_states(spec, setup.model_copy(update={"zero": 3}), np.float64(16))
    assert float(three.weights) == pytest.approx(_total(spec) * 2 / 8)
    assert (float(three.gradients), float(three.master)) == pytest.approx((n * 4 / 8, 0.0))  # peft's fp32, no copy


@pytest.mark.parametrize("phase", ["forward", "optimizer"])
@pytest.mark.parametrize("key", [k for k in ZERO_ORACLE_LORA if k[3] == "full"])
def test_full_training_against_deepspeed(key, phase, monkeypatch):
    """Full training, ZeRO-1/2, bf16 and fp32: the forward (fp32 partition: DeepSpeed's surplus over a
    pure-bf16 layout, its clone in fp32) and the optimizer step (gradient partitions, their flat copy and
    fp32 cast) within 6%."""
    setup, _, memory = predicted(key, monkeypatch)
    value = float(memory.phases[phase]) + (cpu_step_bytes(setup) if phase == "optimizer" else 0.0)
    measured = ZERO_ORACLE_LORA[key][phase] - leftover_bytes(element_bytes(key))
    assert value == pytest.approx(measured, rel=0.06)


def test_zero1_partitions_gradients_like_zero2(monkeypatch):
    """DeepSpeed 0.19.8's ZeRO-1 with overlap_comm and one micro-batch per step reduces and frees gradients as
    ZeRO-2 does: the same optimizer peak on 2 ranks, and the planner prices both alike; with accumulation,
    ZeRO-1 keeps whole gradients between micro-batches."""
    one, two = ZERO_ORACLE_LORA[(2, 1, "bf16", "full", 65536)], ZERO_ORACLE_LORA[(2, 2, "bf16", "full", 65536)]
    assert one["optimizer"] == two["optimizer"] and one["before"] == two["before"]
    spec = tiny_llama(LAYERS)
    states = {z: model_states(spec, oracle_setup((2, z, "bf16", "full", 65536)), np.float64(0)) for z in (1, 2)}
    assert float(states[1].gradients) == float(states[2].gradients)
    accumulating = oracle_setup((2, 1, "bf16", "full", 65536)).model_copy(update={"grad_accum": 4})
    assert float(model_states(spec, accumulating, np.float64(0)).gradients) == 2 * float(states[2].gradients)


def test_dora_under_zero3_is_refused(monkeypatch):
    """DoRA at ZeRO-3 held 16-33% more in every phase than the LoRA-like price: refused in one line."""
    from planner.errors import PlannerError

    key = (2, 3, "bf16", "dora", 65536)
    with pytest.raises(PlannerError, match="dora with zero 3"):
        predicted(key, monkeypatch)
    monkeypatch.setattr(zero_dtypes, "unpriced_reason", lambda setup: None)
    setup, _, memory = predicted(key, monkeypatch)
    for phase in ("forward", "backward", "optimizer"):
        value = float(memory.phases[phase]) + (cpu_step_bytes(setup) if phase == "optimizer" else 0.0)
        measured = ZERO_ORACLE_LORA[key][phase] - leftover_bytes(2.0)
        assert value < 0.9 * measured
