"""Side by side on the oracle panel: ours, cli99/llm-analysis (PyPI ``llm-analysis``) and
DeepSpeed's ZeRO model-state estimator, against PyTorch's own peak (fake-tensor oracle).

Run in an environment with both peers installed (they are not dependencies of planner):
    python -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 transformers peft \
        bitsandbytes lion-pytorch llm-analysis deepspeed -e .
    /tmp/peers/bin/python benchmarks/bench_peers.py
Cases where a peer does not apply (LoRA/QLoRA, mixtures of experts, fp32, optimizers other
than AdamW, an MLP width that llm-analysis cannot express) are left blank for it.
"""

from __future__ import annotations

import statistics
import sys

from planner.cost.estimate import estimate
from planner.cost.params import count_params
from planner.specs.catalog import load_model_config
from planner.specs.configs import reduce_layers
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup
from planner.truth.oracle_panel import PANEL
from planner.truth.trace import trace_training_step


def llm_analysis_peak(spec, setup) -> float | None:
    """llm-analysis 0.2.x ``training()``: weights + optimizer state + gradients + activations."""
    from llm_analysis.analysis import ActivationRecomputation, LLMAnalysis
    from llm_analysis.config import DtypeConfig, GPUConfig, ModelConfig

    layer = spec.layers[0]
    if spec.is_moe or setup.method != "full" or setup.precision == "fp32" or setup.optimizer != "adamw":
        return None
    if layer.intermediate_size % spec.hidden_size:
        return None  # llm-analysis requires the MLP width to be a multiple of the hidden size
    model = ModelConfig(
        name=spec.name, num_layers=spec.num_layers, n_head=layer.num_heads, hidden_dim=spec.hidden_size,
        vocab_size=spec.vocab_size, max_seq_len=setup.seq_len, num_key_value_heads=layer.num_kv_heads,
        ffn_embed_dim=layer.intermediate_size, model_type=spec.model_type,
    )
    gpu = GPUConfig(name="big", mem_per_GPU_in_GB=10_000, hbm_bandwidth_in_GB_per_sec=3350,
                    intra_node_bandwidth_in_GB_per_sec=450, intra_node_min_message_latency=8e-06,
                    peak_fp16_TFLOPS=989)
    recompute = {"none": ActivationRecomputation.NONE, "selective": ActivationRecomputation.SELECTIVE,
                 "full": ActivationRecomputation.FULL}[setup.checkpointing]
    analysis = LLMAnalysis(model, gpu, DtypeConfig(), flops_efficiency=0.5, hbm_memory_efficiency=0.9)
    summary = analysis.training(
        batch_size_per_gpu=setup.micro_batch, seq_len=setup.seq_len, gradient_accumulation_steps=1,
        activation_recomputation=recompute, flash_attn=setup.attention == "sdpa",
        mlp_gated_linear_units=layer.gated_mlp,
        master_weights_dtype_bytes=4 if setup.precision == "bf16-mixed" else 2,
    )
    return float(summary["(weight+op_state+grad+act)_memory_per_gpu"])


def deepspeed_model_states(spec, setup) -> float | None:
    """DeepSpeed ``estimate_zero2_model_states_mem_needs`` on one GPU without offload (model
    states only: 2 + 18 bytes per parameter)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if setup.method != "full" or setup.optimizer != "adamw":
        return None
    _, gpu = estimate_zero2_model_states_mem_needs(count_params(spec).total, 1, 1, cpu_offload=False)
    return float(gpu)


def main() -> int:
    rows = []
    for case in PANEL:
        config = reduce_layers(load_model_config(case.model)[0], case.num_layers)
        setup = TrainingSetup(**case.setup)
        spec = model_spec_from_config(config, case.model)
        oracle = trace_training_step(config, setup, count_flops=False).peak_bytes
        ours = estimate(spec, setup, device="cpu")["peak_bytes"]
        try:
            peer = llm_analysis_peak(spec, setup)
        except Exception as exc:  # a peer that cannot express a case does not apply to it
            print(f"llm-analysis failed on {case.label}: {exc}", file=sys.stderr)
            peer = None
        ds = deepspeed_model_states(spec, setup)
        rows.append((case.label, oracle, ours, peer, ds))
        print(case.label, flush=True)

    def err(x, o):
        return "" if x is None else f"{(x / o - 1) * 100:+.1f}%"

    print("\n| case | oracle MiB | ours | llm-analysis | DeepSpeed model states |")
    print("|---|---:|---:|---:|---:|")
    for label, oracle, ours, peer, ds in rows:
        print(f"| {label} | {oracle / 2**20:.0f} | {err(ours, oracle)} | {err(peer, oracle)} | {err(ds, oracle)} |")
    for name, index in (("ours", 2), ("llm-analysis", 3), ("DeepSpeed", 4)):
        errors = [abs(r[index] / r[1] - 1) for r in rows if r[index] is not None]
        if errors:
            print(f"{name}: {len(errors)} cases, |error| median {statistics.median(errors) * 100:.1f}%, "
                  f"max {max(errors) * 100:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
