"""DoRA time (peft ``LoraConfig(use_dora=True)``, peft 0.21.2): what one micro-batch spends beyond
LoRA, per GPU. Every adapted linear, in every forward (``DoraLinearVariant.forward``,
peft/tuners/lora/variants.py lines 230-257, and ``DoraLinearLayer.forward``, peft/tuners/lora/dora.py
lines 132-166), in the adapter's dtype ``a`` (fp32 by default) over a frozen weight of ``w`` bytes:

- **the weight norm** (dora.py lines 94-99 and 86-91): ``lora_B(lora_A(eye(in)))`` (two thin
  matmuls, ``2 r in (in + out)`` FLOPs, the ``in x in`` eye written), the frozen weight cast to
  ``a`` (read ``w``, write ``a``), ``scaling * lora_weight`` (read and write ``a``), their sum (read
  ``2a``, write ``a``) and its row norms (read ``a``): ``w + 8a`` bytes per weight element
  (``WEIGHT_NORM_PASSES``), plus ``a`` per eye element. Detached (line 152): no backward; the
  recompute of full checkpointing runs it again.
- **the output** (dora.py line 165 and variants.py line 248): ``(scale - 1) * base``,
  ``scale * lora * scaling``, their sum and its addition to the base output: about six
  compute-dtype and five adapter-dtype passes over ``tokens x out`` in forward
  (``OUTPUT_PASSES``), and twice that in backward (each elementwise op's gradient reads its
  inputs and the incoming gradient).
- with ``lora_dropout > 0`` peft passes no base output (variants.py line 245) and DoRA recomputes
  ``F.linear(x, W)`` (dora.py line 162): one more forward of the base linear and its input
  gradient in backward.

All of it is memory-bound except the eye products, which go through the matmul roofline. peft's
docs warn that DoRA "introduces a bigger overhead than pure LoRA"; no published DoRA throughput
is in ``throughput.csv`` to score this against, so it is physics only, with no fitted constant.
"""

from __future__ import annotations

from planner.cost import spec_facts

WEIGHT_NORM_PASSES = (1.0, 8.0)
"""(frozen-weight bytes, adapter-dtype bytes) moved per weight element by one weight norm."""
OUTPUT_PASSES = (6.0, 5.0)
"""(compute-dtype, adapter-dtype) passes over ``tokens x out`` of DoRA's output in one forward."""
BACKWARD_OVER_FORWARD = 2.0
"""Elementwise backward traffic over its forward's (inputs and the incoming gradient read)."""


def dora_seconds(spec, setup, tokens, rank, bandwidth: float, matmul_s, adapter_bytes: float, compute_bytes: float,
                 base_linear_s_per_flop=0.0):
    """Seconds DoRA adds to one micro-batch of ``tokens`` per GPU: its memory-bound passes at
    ``bandwidth``, the eye products through ``matmul_s(flops, m, n, k)`` (the caller's roofline in
    the adapter's dtype) and, with ``lora_dropout``, the base linear's forward and input-gradient
    FLOPs at ``base_linear_s_per_flop``. 0 without ``setup.dora``."""
    if not setup.dora:
        return 0.0 * tokens
    norm_passes = 1 + (1 if setup.checkpointing == "full" else 0)
    output_passes = 1 + BACKWARD_OVER_FORWARD + (1 if setup.checkpointing == "full" else 0)
    weight_b, adapter_b = WEIGHT_NORM_PASSES
    out_c, out_a = OUTPUT_PASSES
    total = 0.0 * tokens
    tp = setup.tensor_parallel
    for _, lin in spec_facts.lora_linears(spec, setup.lora_targets):
        i, o = lin.in_features, lin.out_features
        norm_bytes = i * o * (weight_b * compute_bytes + adapter_b * adapter_bytes) + i * i * adapter_bytes
        eye = matmul_s(2.0 * rank * i * i, i, rank, i) + matmul_s(2.0 * rank * i * o, i, o, rank)
        out_bytes = tokens * o * (out_c * compute_bytes + out_a * adapter_bytes)
        total = total + norm_passes * (norm_bytes / bandwidth + eye) + output_passes * out_bytes / bandwidth
        if setup.lora_dropout > 0:
            total = total + 2.0 * (2.0 * i * o * tokens) * base_linear_s_per_flop * norm_passes
    return total / tp


def dora_micro_batch_s(spec, setup, gpu, tokens, rank, bandwidth: float, corr, base_linear_s_per_flop):
    """``dora_seconds`` with the adapter dtype of ``efficiency._lora_seconds`` (peft keeps adapters
    in fp32, autocast runs their products in bf16; ``adapter_dtype="base"`` keeps the base's)."""
    from planner.cost.timing.efficiency import matmul_time_s

    if not setup.dora:
        return 0.0 * tokens
    in_base = setup.adapter_dtype == "base" or (setup.stack == "torchtune" and setup.adapter_dtype == "auto")
    sixteen = setup.precision == "bf16-mixed" or (in_base and setup.precision == "bf16")
    mm_bytes, mm_peak = (2.0, gpu.peak_flops_for("bf16")) if sixteen else (4.0, gpu.peak_flops_for("fp32"))

    def matmul_s(flops, m, n, k):
        return matmul_time_s(flops, m, n, k, mm_bytes, mm_peak, bandwidth, corr)

    compute_bytes = 4.0 if setup.precision == "fp32" else 2.0
    return dora_seconds(spec, setup, tokens, rank, bandwidth, matmul_s, 2.0 if in_base else 4.0, compute_bytes,
                        base_linear_s_per_flop) * corr.memory_time_factor
