"""QLoRA's dequantization time: the NF4 -> bf16 passes of the frozen projections, memory-bound
(moved out of ``planner.cost.timing.step_time``, which reads it once per micro-batch)."""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
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
