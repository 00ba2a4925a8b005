"""DeepSpeed ZeRO-3's module fetches under HF Trainer: how many ``fetch_sub_module`` calls a step makes.

ZeRO-3 hooks every ``nn.Module``: before a module's forward, before its backward and, under full
checkpointing, before its recompute, the ``PartitionedParameterCoordinator`` (Python, on the host)
gathers the module's parameters and schedules prefetches. The time model prices each call at
``zero3_s_per_module_visit.hf`` host seconds (``planner.cost.timing.grounding``). The counts are the
modules HF builds, checked against the calls ``benchmarks/comm_oracle_cpu.py`` recorded on the real
engine (DeepSpeed 0.19.8, transformers 5; ``tests/data/comm_oracle.json``, every ``ds3-*`` case):
a Llama layer makes 13 fetches per pass (41 with peft LoRA on its 7 linears). Qwen-1's block makes about
11 (its attention has one fused ``c_attn``); the planner's Qwen-1 spec splits it into q, k and v and counts
13, and the per-fetch cost fitted on Qwen-1's runs absorbs the difference (about 16%).
"""

from __future__ import annotations

from planner.cost.spec_facts import lora_linears

LAYER_MODULES_BESIDES_LINEARS_AND_NORMS = 4
"""Modules of an HF decoder layer besides its linears and norms: the layer, its attention block, its
MLP block and the activation (``ACT2FN`` is an ``nn.Module``)."""
PEFT_MODULES_PER_ADAPTED_LINEAR = 4
"""Modules peft adds around each adapted linear (``lora.Linear`` keeps the original as ``base_layer`` and
calls ``lora_dropout``, ``lora_A`` and ``lora_B``): four more fetches per pass."""
LORA_FETCH_COST_RATIO = 0.67
"""Host cost of a LoRA run's average fetch over a full fine-tuning run's: ``benchmarks/zero3_hook_cpu.py``
on a 32-layer Llama, 0.286 ms with peft LoRA r=16 on every linear against 0.426 ms (0.79 at 8 layers). Half
of LoRA's extra modules hold no parameters (the wrapper, the dropout) and the frozen ones have no gradient
to partition."""
ROOT_FETCHES = {"forward": 6, "backward": 5}
"""Fetches outside the layers per micro-batch: the model, the decoder stack, embedding, final norm, head,
rotary embedding (forward); one fewer in backward. peft's wrapper adds one to each."""


def layer_fetches(layer, adapted: int) -> int:
    """Fetches of one decoder layer in one forward pass: its modules (stacked experts are one module, the
    experts block of transformers 5) plus peft's around its ``adapted`` linears."""
    linears = sum(1 for lin in layer.linears if lin.is_module) + (1 if layer.experts else 0)
    return (LAYER_MODULES_BESIDES_LINEARS_AND_NORMS + len(layer.norms) + linears
            + PEFT_MODULES_PER_ADAPTED_LINEAR * adapted)


def zero3_module_visits(spec, setup) -> float:
    """``fetch_sub_module`` calls of one step on one pipeline stage: every layer's modules in forward, in
    backward, and (full checkpointing) in the recompute, which skips the checkpointed layer itself; with
    LoRA and no checkpointing the backward skips two more per layer (counted); plus the modules outside
    the layers; times the accumulation. 0 for stacks and stages other than HF + ZeRO-3."""
    if setup.stack != "hf" or setup.zero != 3:
        return 0.0
    lora = setup.method in ("lora", "qlora")
    adapted = [0] * spec.num_layers
    if lora:
        for index, _ in lora_linears(spec, setup.lora_targets):
            adapted[index] += 1
    forward = sum(layer_fetches(layer, count) for layer, count in zip(spec.layers, adapted, strict=True))
    full = setup.checkpointing == "full"
    backward = forward - (2 * spec.num_layers if lora and not full else 0)
    recompute = forward - spec.num_layers if full else 0
    root = ROOT_FETCHES["forward"] + ROOT_FETCHES["backward"] + (2 if lora else 0)
    return ((forward + backward + recompute) / setup.pipeline_parallel + root) * setup.grad_accum


def zero3_fetch_cost_units(spec, setup) -> float:
    """``zero3_module_visits`` in units of a full fine-tuning fetch's host cost (``LORA_FETCH_COST_RATIO``
    for LoRA and QLoRA): what ``zero3_s_per_module_visit.hf`` multiplies."""
    lora = setup.method in ("lora", "qlora")
    return zero3_module_visits(spec, setup) * (LORA_FETCH_COST_RATIO if lora else 1.0)
