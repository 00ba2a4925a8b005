"""The torchtitan stack's formulas against what its own model code keeps (fake-tensor trace, pinned).

Measured 2026-11-29 with torchtitan 0.3.0 (wheel), torch 2.13.0+cpu, on fake CPU tensors:

    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py            # eager, per AC mode
    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py --compile  # compiled blocks

Bytes per token: one block's saved set (difference of 2- and 4-layer traces), the rest at the
forward's peak (final norm, head input, logits, fp32 copy, log-softmax) and the loss backward's
fp32 temporaries (8 V at T = 4096). The CPU trace runs torch's composite RMSNorm (``device="cpu"``).
"""

import pytest

from planner.cost.memory import torchtitan_tensors as tt
from planner.cost.memory.phases import training_memory
from planner.errors import PlannerError
from planner.specs.catalog import load_spec
from planner.specs.setup import TrainingSetup

MEASURED_LAYER = {  # model -> AC mode -> bytes per token and block (eager, bf16 compute)
    "llama-3.1-8b": {"none": 217224, "full": 8192, "selective": 65664},
    "llama-2-13b": {"none": 254120, "full": 10240, "selective": 89248},
}
MEASURED_COMPILED = {"llama-3.1-8b": 139400, "llama-2-13b": 165032}  # aot_eager_decomp_partition, no AC
MEASURED_FORWARD_REST = {"llama-3.1-8b": 1323524, "llama-2-13b": 371204}
MEASURED_LOSS_BACKWARD_TEMP = {"llama-3.1-8b": 4202692608 // 4096}  # Temp at the backward's peak, T = 4096
MEASURED_BLOCK_FLOPS = {  # model -> AC mode -> one block's forward + backward FLOPs at 256 tokens (FlopCounterMode;
    # `torchtitan_oracle.py --flops`, 2026-11-29): SelectiveAC reruns wo and w3, full the whole forward
    "llama-3.1-8b": {"none": 335007449088, "selective": 373662154752, "full": 446676598784},
    "llama-2-13b": {"none": 487210352640, "selective": 536870912000, "full": 649613803520},
}


@pytest.mark.parametrize("name", sorted(MEASURED_LAYER))
@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_block_saved_set_matches_trace(name, mode):
    layer = load_spec(name).layers[0]
    assert tt.layer_saved_bytes_per_token(layer, checkpointing=mode, device="cpu") == MEASURED_LAYER[name][mode]


@pytest.mark.parametrize("name", sorted(MEASURED_COMPILED))
def test_compiled_block_matches_trace(name):
    layer = load_spec(name).layers[0]
    assert tt.layer_saved_bytes_per_token(layer, compiled=True) == MEASURED_COMPILED[name]


@pytest.mark.parametrize("name", sorted(MEASURED_FORWARD_REST))
def test_head_and_loss_match_trace(name):
    spec = load_spec(name)
    rest = tt.head_saved_bytes_per_token(spec, device="cpu") + tt.loss_extra_bytes_per_token(spec)["forward"]
    assert rest == MEASURED_FORWARD_REST[name]


def test_loss_backward_temporaries_match_trace():
    spec = load_spec("llama-3.1-8b")
    extra = tt.loss_extra_bytes_per_token(spec)
    assert extra["backward"] - 4 * spec.vocab_size == MEASURED_LOSS_BACKWARD_TEMP["llama-3.1-8b"]


def _setup(**kw):
    base = dict(stack="torchtitan", precision="bf16-mixed", micro_batch=2, seq_len=4096, num_gpus=8, zero=3,
                optimizer_impl="fused")
    return TrainingSetup(**{**base, **kw})


def test_sharding_divides_states_and_checkpointing_orders_peaks():
    spec = load_spec("llama-2-13b")
    one, eight = (training_memory(spec, _setup(num_gpus=n, zero=3 if n > 1 else 0)) for n in (1, 8))
    assert one.components["optimizer_states"] == pytest.approx(8 * eight.components["optimizer_states"])
    peaks = [float(training_memory(spec, _setup(checkpointing=c)).peak_bytes) for c in ("none", "selective", "full")]
    assert peaks[0] > peaks[1] > peaks[2]


def test_torchtitan_below_hf_for_the_same_layout():
    spec = load_spec("llama-2-13b")
    titan = float(training_memory(spec, _setup()).peak_bytes)
    hf = float(training_memory(spec, _setup(stack="hf")).peak_bytes)
    # hf ZeRO-3 is DeepSpeed's pure bf16 (no autocast copies: activation_memory.compute_setup): 0.87 of it
    assert titan < 0.9 * hf


def test_unpriced_models_and_setups_are_refused():
    with pytest.raises(PlannerError, match="torchtitan"):
        training_memory(load_spec("qwen2.5-0.5b"), _setup(num_gpus=1, zero=0))
    with pytest.raises(ValueError, match="bf16-mixed"):
        tt.compute_bytes("bf16")


@pytest.mark.parametrize("name", sorted(MEASURED_BLOCK_FLOPS))
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_flops_match_torchtitans_block(name, mode):
    """What each AC mode reruns of one block, as torchtitan 0.3.0's own block counts it (the selective
    policy's every second matmul: wo and w3; full: the whole forward, down projection included: its
    wrappers pass early_stop=False). FlopCounterMode counts nothing for the CPU flash kernel, so the
    attention core, which full AC reruns too, is left out of the comparison."""
    from planner.cost.estimate import training_flops
    from planner.cost.flops import attention_core_forward_flops

    spec = load_spec(name)
    setup = _setup(checkpointing=mode, micro_batch=1, seq_len=256)
    per_block = float(training_flops(spec, setup).recompute) / spec.num_layers
    if mode == "full":
        per_block -= float(attention_core_forward_flops(spec.layers[0], 1, 256))
    measured = MEASURED_BLOCK_FLOPS[name]
    assert per_block == pytest.approx(measured[mode] - measured["none"], rel=1e-9)
