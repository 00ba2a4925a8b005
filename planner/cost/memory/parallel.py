"""Memory formulas of the parallel layouts beyond data parallelism, ZeRO and tensor parallelism.

Pure functions of the layout, one per formula (numpy, vectorized over the token arrays):
- pipeline parallelism: how the layers split into stages (``stage_layers``) and how many
  micro-batches of activations a stage holds at its peak under 1F1B, interleaved 1F1B and GPipe
  (``in_flight_micro_batches``); ``planner.cost.memory.pipeline`` assembles the stages;
- sequence parallelism: the activations Megatron replicates under tensor parallelism (norms,
  dropouts, the layer input) split over the tensor-parallel group too (applied in
  ``planner.cost.memory.activation_memory``);
- context parallelism: each GPU holds ``1/cp`` of every sequence; ring attention's key/value
  buffers in flight (``ring_attention_buffer_bytes``); ZeRO shards over data x context ranks
  (``zero_shard_degree``);
- expert parallelism: the routed experts' weights, gradients and states over ``ep`` GPUs
  (``sharded_fraction``), the all-to-all token dispatch buffers (``expert_dispatch_bytes``).

``korthikanti_layer_activation_bytes`` is the closed form of Korthikanti et al. 2022 for
Megatron's GPT layer: the published reference the inventory-based formulas are tested against.
"""

from __future__ import annotations

import numpy as np

from planner.cost import spec_facts
from planner.errors import PlannerError


def _arr(x):
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- published closed form


def korthikanti_layer_activation_bytes(seq_len, micro_batch, hidden, heads, tensor_parallel: int = 1,
                                       sequence_parallel: bool = False, recompute: str = "none"):
    """Activation bytes of one GPT transformer layer (16-bit activations, 1-byte dropout masks).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    sec. 4 and Table 2, with s tokens, b sequences, h hidden, a heads, t tensor-parallel GPUs:
    no parallelism sbh(34 + 5as/h); tensor parallel sbh(10 + 24/t + 5as/(ht)) (norms, dropouts
    and the layer input, 10sbh, stay replicated); tensor + sequence parallel sbh(34/t + 5as/(ht));
    selective recompute (the attention core: softmax, its dropout and the score-sized tensors)
    drops the 5as^2b term; full recompute keeps the layer input, 2sbh (sec. 5).
    """
    s, b, h, a, t = _arr(seq_len), _arr(micro_batch), float(hidden), float(heads), float(tensor_parallel)
    sbh = s * b * h
    if recompute == "full":
        return 2.0 * sbh / (t if sequence_parallel else 1.0)
    attention_core = 0.0 if recompute == "selective" else 5.0 * a * s / (h * t)
    linear_part = 34.0 / t if sequence_parallel else 10.0 + 24.0 / t
    return sbh * (linear_part + attention_core)


# ----------------------------------------------------------------------------- pipeline parallelism


def stage_layers(num_layers: int, pipeline_parallel: int, virtual_stages: int = 1) -> tuple[tuple[int, ...], ...]:
    """Layer indices held by each pipeline rank: the layers split into ``pp x v`` consecutive
    chunks as evenly as possible (the earlier chunks take the remainder, as ``numpy.array_split``),
    chunk c on rank ``c % pp`` (Megatron's interleaved assignment, Narayanan et al. 2021 sec. 2.2)."""
    chunks = pipeline_parallel * virtual_stages
    if chunks > num_layers:
        raise PlannerError(
            f"pipeline parallel {pipeline_parallel} x virtual stages {virtual_stages} = {chunks} chunks for "
            f"{num_layers} layers: use at most {num_layers} chunks (each needs one layer or more)"
        )
    bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(num_layers), chunks)])
    return tuple(tuple(i for c in range(rank, chunks, pipeline_parallel) for i in range(bounds[c], bounds[c + 1]))
                 for rank in range(pipeline_parallel))


def in_flight_micro_batches(schedule: str, pipeline_parallel: int, stage: int, micro_batches, virtual_stages: int = 1):
    """Micro-batches whose activations (of all the stage's layers) a pipeline rank holds at its peak.

    - GPipe (Huang et al. 2019): every forward before any backward: all ``m``.
    - 1F1B (PipeDream-Flush, Narayanan et al. 2021 sec. 2.2.1): rank i runs ``pp - i - 1`` warm-up
      forwards and one more before its first backward: ``min(pp - i, m)``; the first stage holds
      ``pp``, as many as the pipeline is deep (Korthikanti et al. 2022 sec. 4.2.3).
    - interleaved 1F1B with v chunks per rank: Megatron-LM's warm-up (``schedules.py``):
      ``2(pp - i - 1) + (v - 1) pp`` chunk forwards plus one, each chunk ``1/v`` of the rank's
      layers; on the first rank ``pp (1 + (pp - 1)/(pp v))`` micro-batches, the factor of
      Korthikanti et al. 2022 (sec. 4.2.3). At most ``m``.
    """
    m = _arr(micro_batches)
    pp, i = pipeline_parallel, stage
    if schedule == "gpipe":
        return m
    if schedule == "interleaved" and virtual_stages > 1:
        chunks = 2 * (pp - i - 1) + (virtual_stages - 1) * pp + 1
        return np.minimum(chunks / virtual_stages, m)
    return np.minimum(pp - i, m)


def head_in_flight_micro_batches(schedule: str, micro_batches):
    """Micro-batches whose loss activations (logits, log-softmax) the last stage holds: one under
    1F1B (each forward is followed by its backward), all ``m`` under GPipe."""
    return _arr(micro_batches) if schedule == "gpipe" else _arr(1.0)


# ----------------------------------------------------------------------------- sharding groups


def zero_shard_degree(setup) -> int:
    """GPUs ZeRO / FSDP shard model states over: the data-parallel ranks times the context-parallel
    ranks, which hold the same weights and see other tokens (Megatron's data-parallel group with
    context parallelism; torchtitan shards FSDP over dp x cp)."""
    return setup.data_parallel * setup.context_parallel


def routed_expert_params(spec) -> int:
    """Parameters of the routed experts (the stacked expert weights; routers and shared experts
    are dense: every rank holds them), once per spec."""
    return spec_facts.cached(spec, ("routed_experts",),
                             lambda: sum(lin.params for layer in spec.layers for lin in layer.experts))


def sharded_fraction(dense_params, expert_params, expert_parallel: int, shard: int):
    """Share of the model's elements on one GPU (before tensor parallelism) when a tensor kind is
    sharded over ``shard`` GPUs (1: replicated) and the routed experts over ``expert_parallel``.

    The experts sit on ``ep`` ranks of the data-parallel group; ZeRO shards the dense part over the
    whole group and each expert over its expert-data-parallel group (``shard / ep`` ranks): per
    GPU ``dense / shard + experts / max(ep, shard)`` (DeepSpeed-MoE, Rajbhandari et al. 2022;
    Megatron-Core's expert-data-parallel group)."""
    total = float(dense_params) + float(expert_params)
    if total == 0:
        return 0.0
    return (dense_params / shard + expert_params / max(expert_parallel, shard)) / total


# ----------------------------------------------------------------------------- transient buffers


def ring_attention_buffer_bytes(tokens_local, kv_dim: int, element_bytes: float, tensor_parallel: int,
                                context_parallel: int):
    """Key/value bytes in flight in one layer's ring attention (Liu et al. 2023, "Ring Attention
    with Blockwise Transformers"): while a block computes, the next key/value block arrives and the
    current one is sent on; backward moves the key/value blocks and their gradients around the
    ring: four blocks of k and v of the local tokens (their local copy is a saved activation).
    None without context parallelism."""
    if context_parallel == 1:
        return _arr(0.0) * tokens_local
    return 4.0 * 2.0 * tokens_local * kv_dim / tensor_parallel * element_bytes


def expert_dispatch_bytes(tokens_local, hidden: int, experts_per_token: int, element_bytes: float,
                          expert_parallel: int):
    """All-to-all buffers of one mixture-of-experts layer with expert parallelism: the local tokens'
    ``k`` routed copies permuted into a send buffer and as many received for the local experts
    (balanced routing, no dropped tokens; Megatron-Core's all-to-all token dispatcher). What the
    experts save for backward is in the layer's inventory already. None without expert parallelism."""
    if expert_parallel == 1:
        return _arr(0.0) * tokens_local
    return 2.0 * tokens_local * experts_per_token * hidden * element_bytes


def parallel_transient_bytes(spec, setup, tokens_local, element_bytes: float):
    """The larger of one layer's ring-attention and expert-dispatch buffers (they are live in
    different ops of a layer), for the layers' widest key/value and expert routing."""
    tp, cp, ep = setup.tensor_parallel, setup.context_parallel, setup.expert_parallel
    if cp == 1 and ep == 1:
        return _arr(0.0) * tokens_local
    kv = max(layer.kv_dim for layer in spec.layers)
    ring = ring_attention_buffer_bytes(tokens_local, kv, element_bytes, tp, cp)
    routed = [layer for layer in spec.layers if layer.num_experts]
    if not routed or ep == 1:
        return ring
    top = max(layer.experts_per_token * layer.hidden_size for layer in routed)
    # with sequence parallelism each tensor-parallel rank dispatches its share of the tokens
    shard = tp if setup.sequence_parallel else 1
    dispatch = expert_dispatch_bytes(tokens_local / shard, top, 1, element_bytes, ep)
    return np.maximum(ring, dispatch)
