"""Float8 training time (torchao ``convert_to_float8_training`` as torchtitan runs it): the
decoder layers' linears run their three GEMMs (forward, input gradient, weight gradient) in
float8 e4m3/e5m2 on the fp8 tensor cores; the output head, the attention core, norms and the
optimizer stay in bf16.

What float8 changes in a step, term by term:

- **the linears' matmuls** run at the fp8 peak times the GPU's fp8 matmul ceiling
  (``planner.cost.timing.ceiling``, Bekman's MAMF table: H100 1403 of 1979 TFLOP/s against 795
  of 989 in bf16). The roofline prices every matmul against the GPU's bf16 ceiling, which
  ``grounding`` then applies with the shared whole-step factor; so a float8 GEMM is priced here
  at ``fp8 peak x fp8 ceiling / bf16 ceiling`` (``float8_peak_flops``), which grounding turns
  into ``fp8 peak x fp8 ceiling x the shared factor``. Operands are one byte.
- **the scaled casts** (dynamic tensorwise scaling, torchao ``float8/README.md``: an amax
  reduction over each tensor, then a scaled cast to float8, per linear and per micro-batch, for
  the input and the weight in forward and the output gradient in backward; the transposed
  copies that the weight- and input-gradient GEMMs read, since cuBLAS' fp8 GEMM wants its
  operands in one layout) are memory-bound: ``CAST_BYTES_PER_ELEMENT`` bytes per element of each
  of the three tensors (``cast_traffic_bytes``), priced with the step's memory-bound work.

torchao's float8 training doc reports 1.2-1.25x over bf16 for Llama 3 8B/70B in torchtitan on
H100 (``docs/source/workflows/training.md``; torchtitan ``docs/float8.md``); this module derives
the gain from the fp8 ceiling and the cast traffic instead of carrying that number, and the
published runs score it (``benchmarks/bench_time_published.py``). Not priced: rowwise scaling
(its scale per row and its slower scaled GEMMs), delayed scaling, and FSDP's float8 all-gather
(it halves the parameter all-gather, which FSDP prefetch hides in the runs priced here).
"""

from __future__ import annotations

from planner.cost.timing.ceiling import matmul_ceiling
from planner.errors import PlannerError

FLOAT8_COMPONENTS = ("attention", "mlp", "experts")
"""Components whose linears torchao converts (torchtitan's converter skips the output head)."""
CAST_BYTES_PER_ELEMENT = 6.0
"""Traffic of one dynamic tensorwise scaled cast per element of a bf16 tensor: read 2 bytes for
the amax, read 2 bytes again for the cast, write 1 byte of float8 and 1 byte of its transposed
copy (torchao ``float8`` README, tensorwise recipe; with ``torch.compile`` the amax and the cast
are fused into few kernels, but the two reads remain: the scale needs the whole tensor's amax
before the first element is cast)."""


def require_fp8(gpu) -> None:
    """Float8 GEMMs need fp8 tensor cores: refuse GPUs whose catalog entry has no fp8 peak."""
    if "fp8" not in gpu.peak_flops:
        raise PlannerError(f"float8 training needs fp8 tensor cores, which {gpu.name} lacks "
                           "(H100, H200, B200, L4, L40S, RTX 4090, MI300X have them): leave out --float8")


def float8_peak_flops(gpu) -> float:
    """The peak a float8 linear's GEMM is priced at in the roofline: ``fp8 peak x fp8 ceiling /
    bf16 ceiling`` (see the module docstring: grounding applies the bf16 ceiling to all matmuls)."""
    require_fp8(gpu)
    return gpu.peak_flops_for("fp8") * matmul_ceiling(gpu, "fp8")[0] / matmul_ceiling(gpu, "bf16")[0]


def cast_traffic_bytes(layer_shapes, count: float = 1.0):
    """Bytes the scaled casts of one micro-batch move, per GPU: ``CAST_BYTES_PER_ELEMENT`` x
    (input + weight + output gradient elements) of each float8 linear. ``layer_shapes`` are the
    ``(component, flops, m, n, k)`` rows of ``efficiency.layer_shapes`` (m tokens, n outputs, k
    inputs, per GPU) of one layer, repeated ``count`` times."""
    total = 0.0
    for component, _, m, n, k in layer_shapes:
        if component in FLOAT8_COMPONENTS:
            total = total + CAST_BYTES_PER_ELEMENT * (m * k + k * n + m * n)
    return count * total


def cast_seconds(spec, setup, tokens, bandwidth: float):
    """Seconds the scaled casts of one micro-batch take at ``bandwidth`` (``cast_traffic_bytes``
    over every layer of ``spec``, this GPU's tensor-parallel share); 0 without ``setup.float8``."""
    if not setup.float8:
        return 0.0 * tokens
    from planner.cost import spec_facts
    from planner.cost.timing.efficiency import layer_shapes

    return sum(cast_traffic_bytes(layer_shapes(layer, tokens, setup.tensor_parallel), count)
               for layer, count in spec_facts.distinct_layers(spec)) / bandwidth
