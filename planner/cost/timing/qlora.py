"""QLoRA's dequantization time: the NF4 -> bf16 passes of the frozen projections, memory-bound
(moved out of ``planner.cost.timing.step_time``, which reads it once per micro-batch)."""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory.phases import kbit_precision
from planner.cost.memory.states import nf4_bytes
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup


def dequantization_s(spec: ModelSpec, setup: TrainingSetup, bandwidth: float):
    """QLoRA: seconds one micro-batch spends turning the NF4 projections into bf16 (Dettmers et
    al. 2023, "QLoRA", sec. 3: the storage type is dequantized to the compute type for the
    forward and again for the backward, where only the adapters get weight gradients; the
    recompute of full checkpointing dequantizes once more). Memory-bound: each pass reads the
    4-bit data and its block constants (``memory_states.nf4_bytes``) and writes 2 bytes per
    weight (bitsandbytes' fused ``dequantize_4bit``; an unfused implementation moves more, which
    ``time_model``'s ``qlora_dequant_factor`` absorbs)."""
    if setup.method != "qlora":
        return np.float64(0.0)
    quantized = spec_facts.projection_params(spec) / (setup.tensor_parallel * setup.pipeline_parallel)
    traffic = nf4_bytes(quantized, setup.qlora_block_size, setup.qlora_double_quant) + 2.0 * quantized
    passes = 2 + (1 if setup.checkpointing == "full" else 0)
    return np.asarray(passes * traffic / bandwidth, dtype=np.float64)


def kbit_twin(setup: TrainingSetup, gpu):
    """(set-up, GPU) a QLoRA step after peft's ``prepare_model_for_kbit_training`` is priced as.

    ``planner.cost.memory.phases.kbit_precision`` says which widths the step takes: under bf16
    autocast (bf16-mixed) the matmuls stay bf16 and the set-up is priced as it is (the casts of
    the fp32 norms' and embeddings' outputs are small elementwise passes, left in the eager/fused
    memory factor). Without autocast (bf16) every activation after the fp32 embedding is fp32:
    the memory-bound work moves fp32 widths (priced as precision fp32), while bitsandbytes'
    ``Linear4bit`` still multiplies in its bf16 compute dtype (it casts its input down and its
    output back, bitsandbytes 0.50 ``nn/modules.py``): the GPU's fp32 peak is taken as its bf16
    one, and the true-fp32 GEMMs (head, adapters) are added by ``fp32_head_extra_s``."""
    precision = kbit_precision(setup)
    if precision == setup.precision:
        return setup, gpu
    peaks = {**gpu.peak_flops, "fp32": gpu.peak_flops_for("bf16")}
    return setup.model_copy(update={"precision": precision}), gpu.model_copy(update={"peak_flops": peaks})


def fp32_gemm_flops(spec: ModelSpec, setup: TrainingSetup, tokens):
    """FLOPs per micro-batch of ``tokens`` that a k-bit-prepared bf16 step runs in true fp32 while
    ``kbit_twin`` prices them at the bf16 peak: the frozen fp32 head (forward and input gradient,
    2 x 2 h V per token) and peft's fp32 adapters (x A^T and (.) B^T, 2 r (in + out) per token
    forward, twice that backward, once more under full recompute)."""
    head = 4.0 * spec.hidden_size * spec.vocab_size
    passes = 3.0 + (1.0 if setup.checkpointing == "full" else 0.0)
    adapters = sum(2.0 * setup.lora_rank * (lin.in_features + lin.out_features)
                   for _, lin in spec_facts.lora_linears(spec, setup.lora_targets))
    return (head + passes * adapters) * tokens / setup.tensor_parallel


def fp32_head_extra_s(spec: ModelSpec, setup: TrainingSetup, gpu, tokens):
    """Roofline seconds ``fp32_gemm_flops`` add at ``gpu``'s true fp32 peak (PyTorch leaves TF32
    off, ``GpuSpec.peak_flops_for``) over the bf16 peak ``kbit_twin`` priced them at."""
    return fp32_gemm_flops(spec, setup, tokens) * (1.0 / gpu.peak_flops["fp32"] - 1.0 / gpu.peak_flops_for("bf16"))
