"""DeepSpeed ZeRO's buckets and buffers: the GPU bytes ZeRO allocates beyond the sharded model states.

``planner.cost.memory.states`` prices ZeRO as ideal sharding (weights, gradients, fp32 master and
optimizer states over the data-parallel ranks). DeepSpeed allocates more, and these functions price
what its code allocates, read from DeepSpeed 0.19.8 (``deepspeed/runtime/zero/``):

- stage 1/2 (``stage_1_and_2.py``): the contiguous-gradient (IPG) buckets, one or two of
  ``reduce_bucket_size`` elements (``setup_buckets``: a second one with ``overlap_comm``), live from the
  first gradient hook of a backward to its epilogue (``_release_ipg_buffers``); the flattened copy a
  bucket reduction makes (``allreduce_bucket``: ``self.flatten(bucket)``); in the optimizer step the
  flattened copy of this rank's gradient partition and its fp32 cast (``step``: ``flatten`` then
  ``.to(fp32)``), the bf16 gradients being freed only after the cast. The parameter all-gather after
  the step writes into the flat bf16 groups (``all_gather_into_tensor``): the
  ``allgather_bucket_size`` buffer does not exist on NCCL with all-gather-into-tensor.
- stage 3 (``stage3.py``, ``partitioned_param_coordinator.py``, ``comm/coalesced_collectives.py``):
  one persistent IPG bucket (``reduce_bucket_size`` elements), the persistent flat buffer of gradient
  partitions (live in forward too), the ``torch.cat`` copy a multi-tensor reduce-scatter makes, small
  parameters kept whole (``stage3_param_persistence_threshold``), the gathered parameters live at the
  turn from forward to backward (the head and whatever is reused within ``stage3_max_reuse_distance``
  elements; with prefetching, up to ``stage3_max_live_parameters``), and per optimizer sub-group
  (``sub_group_size``) the flattened gradient copy and its fp32 cast.
- both: the fp32 partition and fp32 optimizer states DeepSpeed keeps under bf16/fp16 even where the
  planner's layout prices a pure 16-bit step (precision bf16), and the fp32 clone ZeRO-1/2 make in fp32.
- LoRA, DoRA, QLoRA (``zero_dtypes``: the adapters' dtype, their fp32 partition and states are priced by
  ``states.model_states``): buckets and copies in the adapters' dtype, the adapters' weights as DeepSpeed
  holds them (the phases count peft's), at stage 3 partitioned like every parameter (those under the
  persistence threshold kept whole) and a frozen embedding not fetched again in backward.

Checked against DeepSpeed 0.19.8 itself run on the CPU accelerator under PyTorch's MemTracker
(``benchmarks/zero_oracle_cpu.py``; numbers in ``tests/test_zero_buffers.py``).

The DeepSpeed and transformers docs say ``overlap_comm`` uses 4.5x ``allgather_bucket_size`` and
``reduce_bucket_size`` (9 GB at 5e8); DeepSpeed 0.19.8's code allocates 2 reduce buckets plus one
flattened copy (3 x 5e8 x 2 bytes = 2.8 GiB in bf16) and no all-gather bucket.

Bucket sizes come from a ``ZeroConfig``: ``deepspeed_defaults`` (``deepspeed/runtime/zero/config.py``),
``exported_config`` (what ``planner plan --export deepspeed`` writes: ``overlap_comm`` and
``contiguous_gradients`` on, no bucket keys, so DeepSpeed's defaults) and ``hf_auto`` (transformers'
``HfTrainerDeepSpeedConfig`` fills ``"auto"`` with hidden^2, 0.9 hidden^2 and 10 hidden).
``zero_buffer_bytes`` gives the bytes each phase adds for a set-up; the memory model prices
``exported_config`` (the run the planner launches).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from planner.cost import spec_facts
from planner.cost.memory import zero_dtypes
from planner.cost.memory.parallel import zero_shard_degree
from planner.cost.memory.states import adapter_bytes

DEEPSPEED_VERSION = "0.19.8"
FP32_BYTES = zero_dtypes.FP32_BYTES


@dataclass(frozen=True)
class ZeroConfig:
    """The ``zero_optimization`` keys that size DeepSpeed's buffers (elements, not bytes), with
    DeepSpeed 0.19.8's defaults (``DeepSpeedZeroConfig`` in ``deepspeed/runtime/zero/config.py``);
    ``overlap_comm`` None is DeepSpeed's dynamic default (on for stage 3 only)."""

    stage: int
    reduce_bucket_elems: float = 5e8
    allgather_bucket_elems: float = 5e8
    prefetch_bucket_elems: float = 5e7
    max_live_elems: float = 1e9
    max_reuse_distance_elems: float = 1e9
    persistence_threshold_elems: float = 1e5
    sub_group_elems: float = 1e9
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True

    @property
    def overlap(self) -> bool:
        """``overlap_comm_valid`` in config.py: None means stage == 3."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm


def deepspeed_defaults(stage: int) -> ZeroConfig:
    """DeepSpeed 0.19.8's defaults (``deepspeed/runtime/zero/config.py``): reduce and all-gather
    buckets 5e8, prefetch 5e7, max live 1e9, max reuse distance 1e9, persistence threshold 1e5,
    sub-group 1e9, contiguous gradients on, overlap_comm on for stage 3 only."""
    return ZeroConfig(stage=stage)


def exported_config(stage: int) -> ZeroConfig:
    """What ``planner.io.exports.deepspeed_config`` writes: ``overlap_comm`` and
    ``contiguous_gradients`` true, no bucket keys (so DeepSpeed's defaults, not transformers' "auto")."""
    return replace(deepspeed_defaults(stage), overlap_comm=True, contiguous_gradients=True)


def hf_auto(config: ZeroConfig, hidden_size: int) -> ZeroConfig:
    """transformers' ``HfTrainerDeepSpeedConfig.trainer_config_finalize``
    (``transformers/integrations/deepspeed.py``, 5.24): ``"auto"`` becomes ``reduce_bucket_size =
    hidden^2`` and, for stage 3, ``stage3_prefetch_bucket_size = int(0.9 hidden^2)`` and
    ``stage3_param_persistence_threshold = 10 hidden`` (HF's example ZeRO-3 config sets these three
    to "auto" and keeps max live / max reuse / sub-group at 1e9)."""
    h = float(hidden_size)
    update = {"reduce_bucket_elems": h * h}
    if config.stage == 3:
        update.update(prefetch_bucket_elems=float(int(0.9 * h * h)), persistence_threshold_elems=10.0 * h)
    return replace(config, **update)


# ----------------------------------------------------------------------------- one term per function


def ipg_bucket_bytes(config: ZeroConfig, element_bytes: float) -> float:
    """Contiguous-gradient (IPG) buckets. Stage 1/2 (``DeepSpeedZeroOptimizer.setup_buckets``,
    stage_1_and_2.py, DeepSpeed 0.19.8): ``torch.empty(reduce_bucket_size)`` once, twice with
    ``overlap_comm`` (double buffering), allocated at a backward's first gradient and released at its
    epilogue. Stage 3 (``DeepSpeedZeroOptimizer_Stage3.__init__``, stage3.py): one bucket allocated
    at start-up and kept. None without ``contiguous_gradients``. Model-dtype elements."""
    if not config.contiguous_gradients:
        return 0.0
    count = 2 if config.stage < 3 and config.overlap else 1
    return count * config.reduce_bucket_elems * element_bytes


def reduce_copy_bytes(config: ZeroConfig, trainable_elems: float, element_bytes: float) -> float:
    """The copy one bucket reduction makes: stage 1/2 ``allreduce_bucket`` flattens the bucket's
    slices (``self.flatten(bucket)``, at most ``reduce_bucket_size`` elements); stage 3
    ``reduce_scatter_coalesced`` (``runtime/comm/coalesced_collectives.py``) ``torch.cat``s the padded
    partitions of a multi-tensor bucket (a single tensor divisible by the ranks is reduced in place).
    Never more than the trainable elements."""
    return min(config.reduce_bucket_elems, float(trainable_elems)) * element_bytes


def step_gradient_bytes(partition_elems: float, grad_bytes: float) -> tuple[float, float]:
    """Gradient copies of the optimizer step on this rank's partition of ``partition_elems``
    (stage 1/2 ``DeepSpeedZeroOptimizer.step``; stage 3 ``_prepare_fp32_grad_for_sub_group`` per
    sub-group): ``flatten(averaged_gradients)`` (a model-dtype copy) then ``.to(fp32)``, before the
    model-dtype gradients are freed (no second copy when they are fp32 already: ``.to`` returns its
    input); the fp32 gradient then lives through the inner optimizer's step.
    Returns (bytes while casting, bytes during the inner step)."""
    cast = FP32_BYTES if grad_bytes != FP32_BYTES else 0.0
    return partition_elems * (grad_bytes + cast), partition_elems * FP32_BYTES


def optimizer_sub_group_elems(config: ZeroConfig, partition_elems: float) -> float:
    """Stage 3 steps its partition in sub-groups of about ``sub_group_size`` elements
    (``_create_fp16_sub_groups``, stage3.py); stage 1/2 steps the whole partition at once."""
    return min(float(partition_elems), config.sub_group_elems) if config.stage == 3 else float(partition_elems)


def fp32_partition_bytes(partition_elems: float, state_bytes: float, temporary_bytes: float,
                         precision: str) -> tuple[float, float]:
    """DeepSpeed's bf16/fp16 ZeRO keeps an fp32 copy of this rank's partition
    (``single_partition_of_fp32_groups``, stage_1_and_2.py; ``fp32_partitioned_groups_flat``,
    stage3.py, DeepSpeed 0.19.8) and the inner optimizer steps it, so its states and temporaries are
    fp32 too. ``states.dtype_layout`` prices precision bf16 as pure bf16 (no master, 16-bit states):
    returns the (persistent, optimizer-step) bytes DeepSpeed adds to it; none at other precisions,
    which the layout already prices with fp32 master and states."""
    if precision not in ("bf16", "fp16"):
        return 0.0, 0.0
    return partition_elems * FP32_BYTES + state_bytes, temporary_bytes


def persisted_param_bytes(shapes, threshold_elems: float, element_bytes: float, shard: int) -> float:
    """Stage 3 keeps every parameter of at most ``stage3_param_persistence_threshold`` elements whole on
    every rank (``ds_persist`` in ``partition_parameters.py``): norms and biases. Bytes beyond their
    shard, which the states already count."""
    return persisted_param_elems(shapes, threshold_elems) * element_bytes * (1.0 - 1.0 / shard)


def persisted_param_elems(shapes, threshold_elems: float) -> float:
    """Elements of the parameters at or under the persistence threshold (``persisted_param_bytes``)."""
    return float(sum(rows * (cols or 1) for rows, cols in shapes if rows * (cols or 1) <= threshold_elems))


def reuse_trace(spec, checkpointing: bool, embedding_backward: bool = True) -> list[tuple[str, float]]:
    """The order in which ZeRO-3 fetches parameters over one step, per module group with its elements:
    embedding, the layers, the head in forward; the head, then each layer (recomputed first with
    activation checkpointing), then the embedding in backward (``PartitionedParameterCoordinator``
    records this trace on the first step). Tied embeddings are the head's tensor: one name. A frozen
    embedding (LoRA: ``embedding_backward`` False) has no backward, so it is not fetched again."""
    table = float(spec.vocab_size * spec.hidden_size)
    embed = "head" if spec.tied_embeddings else "embed"
    layers = [(f"layer{i}", float(layer.params)) for i, layer in enumerate(spec.layers)]
    backward = []
    for name, elems in reversed(layers):
        backward += [(name, elems)] * (2 if checkpointing else 1)
    last = [(embed, table)] if embedding_backward else []
    return [(embed, table), *layers, ("head", table), ("head", table), *backward, *last]


def kept_for_reuse_elems(trace: list[tuple[str, float]], turn: int, max_reuse_distance_elems: float) -> float:
    """Elements still gathered after position ``turn`` of ``trace``: a module's parameters are released
    after its use unless they recur before ``stage3_max_reuse_distance`` elements of other fetches
    (``__params_to_release`` in ``partitioned_param_coordinator.py``, DeepSpeed 0.19.8: the scan stops
    once the elements traversed reach the distance, so a distance of 0 releases everything)."""
    last_use = {name: i for i, (name, _) in enumerate(trace[: turn + 1])}
    kept = 0.0
    for name, i in last_use.items():
        traversed = 0.0
        for later, later_elems in trace[i + 1:]:
            if traversed >= max_reuse_distance_elems:
                break
            if later == name:
                kept += trace[i][1]
                break
            traversed += later_elems
    return kept


def gathered_at_turn_elems(spec, config: ZeroConfig, checkpointing: bool, embedding_backward: bool = True) -> float:
    """Whole (gathered) parameter elements live at the turn from forward to backward, where the logits
    and the loss are: what ``kept_for_reuse_elems`` keeps after the head's forward (the head itself,
    whose backward comes next, and any layer reused within the distance); with prefetching on
    (``stage3_prefetch_bucket_size`` > 0) at least ``stage3_max_live_parameters`` elements (or all the
    parameters still to be used in backward if fewer), the limit ``fetch_sub_module`` prefetches up to.
    The last part is measured, not read: DeepSpeed 0.19.8 run on the CPU accelerator under PyTorch's
    MemTracker (2 ranks, a 12-layer Llama) held the whole model gathered at the forward peak with any
    prefetch bucket and the default max live 1e9, and 5.05M elements with max live 5e6 (ZERO_ORACLE in
    tests/test_zero_buffers.py); with LoRA (a frozen embedding, no backward) the model without its
    embedding table (ZERO_ORACLE_LORA: ADAPTER_DTYPE=base run)."""
    trace = reuse_trace(spec, checkpointing, embedding_backward)
    turn = len(spec.layers) + 1
    kept = kept_for_reuse_elems(trace, turn, config.max_reuse_distance_elems)
    if config.prefetch_bucket_elems <= 0:
        return kept
    future = sum(dict(trace[turn + 1:]).values())
    return max(kept, min(future, config.max_live_elems))


# ----------------------------------------------------------------------------- one set-up's phases


def priced_config(setup, hidden_size: int) -> ZeroConfig:
    """The configuration the memory model prices: the one ``plan --export deepspeed`` writes
    (``planner.io.exports.deepspeed_config`` writes these numbers): ``overlap_comm`` and
    ``contiguous_gradients`` on, and the bucket sizes transformers' integration fills ``"auto"`` with
    (``hf_auto``: reduce bucket hidden^2; stage 3 also prefetch int(0.9 hidden^2) and persistence
    threshold 10 hidden), written as explicit numbers so that DeepSpeed's 5e8 defaults never apply."""
    return hf_auto(exported_config(setup.zero), hidden_size)


def applies(setup) -> bool:
    """``zero_dtypes.launched_by_deepspeed``: stack hf, ZeRO >= 1, no pipeline stages."""
    return zero_dtypes.launched_by_deepspeed(setup)


def _zeros(like) -> dict:
    zero = np.zeros_like(np.asarray(like, dtype=np.float64))
    return {"forward": zero, "backward": zero, "optimizer": zero}


def zero_buffer_bytes(spec, setup, states, config: ZeroConfig | None = None) -> dict:
    """Bytes DeepSpeed ZeRO adds to each phase (forward, backward, optimizer) of ``setup`` beyond the
    ideal sharding ``states`` (a ``ModelStates``) prices; zeros where ``applies`` is false.

    - forward: stage 3's persistent IPG bucket, whole small parameters, the flat gradient-partition
      buffer (the states count gradients in forward only with accumulation) and the parameters
      gathered at the forward/backward turn;
    - backward: the IPG buckets (stage 1/2: one or two; stage 3: the persistent one), one reduction's
      copy, stage 3's whole small parameters and gathered parameters;
    - optimizer: the step's gradient copies beyond the states' gradients and optimizer temporaries
      (``step_gradient_bytes``), none when the optimizer is offloaded;
    - every phase, full training at precision bf16/fp16: DeepSpeed's fp32 partition and fp32 states
      (``fp32_partition_bytes``), their temporaries in the optimizer step.
    """
    st = states
    if not applies(setup):
        return _zeros(st.gradients)
    cfg = config or priced_config(setup, spec.hidden_size)
    shard, tp = zero_shard_degree(setup), setup.tensor_parallel
    counts = spec_facts.param_counts(spec)
    full = setup.method == "full"
    # gradient (and IPG bucket) dtype: the model's (DeepSpeed casts it to bf16/fp16), the adapters' (zero_dtypes)
    element = zero_dtypes.engine_dtype_bytes(setup) if full else st.grad_bytes
    trainable = np.asarray(counts.total / tp if full else st.adapters, dtype=np.float64)
    partition = trainable / shard
    # DeepSpeed's fp32 partition (and fp32 states) where the layout priced a pure-16-bit step
    master, master_temps = fp32_partition_bytes(partition, np.asarray(st.states, dtype=np.float64),
                                                np.asarray(st.temporaries, dtype=np.float64), setup.precision) \
        if full and setup.optimizer != "adamw-8bit" and not setup.offload_optimizer else (0.0, 0.0)
    if full and setup.precision == "fp32" and cfg.stage < 3 and not setup.offload_optimizer:
        master = master + fp32_clone_bytes(partition)  # ZeRO-1/2 clone the fp32 partition even in fp32
    ipg = ipg_bucket_bytes(cfg, element)
    reduce_copy = np.minimum(cfg.reduce_bucket_elems, trainable) * element
    # the optimizer step's copies, against the states' gradients (G) and temporaries (T)
    grads, temps = np.asarray(st.gradients, dtype=np.float64), np.asarray(st.temporaries, dtype=np.float64)
    if setup.offload_optimizer:
        optimizer = 0.0 * grads
    else:
        sub = np.minimum(partition, cfg.sub_group_elems) if cfg.stage == 3 else partition
        casting, inner = step_gradient_bytes(sub, element)
        # the inner step's temporaries: the states' and, at 16-bit precision, their fp32 surplus
        inner_temps = temps + master_temps
        if cfg.stage == 3:  # the gradient-partition buffer stays; the inner step's temporaries are per sub-group
            share = np.divide(sub, partition, out=np.ones_like(sub), where=partition > 0)
            inner_extra = inner + inner_temps * share - temps
        else:  # the model-dtype gradients are freed before the inner step
            inner_extra = inner + inner_temps - temps - grads
        optimizer = np.maximum(0.0, np.maximum(casting - temps, inner_extra))
    if not full:  # the phases count peft's adapters (states.adapter_bytes); DeepSpeed holds them in its dtype
        master = master + trainable * (st.grad_bytes - adapter_bytes(setup))
    if cfg.stage < 3:
        backward = ipg + reduce_copy
        if setup.offload_optimizer:  # temp_grad_buffer_for_gpu_offload: the largest parameter, all phases
            largest = max(r * (c or 1) for r, c in spec_facts.full_tensor_shapes(spec)) * element / tp
            return {"forward": master + largest + 0 * grads, "backward": master + backward + largest,
                    "optimizer": master + optimizer + largest}
        return {"forward": master + 0 * grads, "backward": master + backward + 0 * grads,
                "optimizer": master + optimizer}
    stored = float(np.asarray(st.weights).max()) * shard / max(counts.total, 1)  # base weight bytes per element
    # per model and configuration, not per set-up: a plan prices hundreds of set-ups of one model
    small_elems = spec_facts.cached(spec, ("zero_persisted_elems", cfg.persistence_threshold_elems),
                                    lambda: persisted_param_elems(spec_facts.full_tensor_shapes(spec),
                                                                  cfg.persistence_threshold_elems))
    persistent = ipg + small_elems * stored * (1.0 - 1.0 / shard) / tp
    recompute = setup.checkpointing != "none"
    gathered_elems = spec_facts.cached(spec, ("zero_gathered_elems", cfg, recompute, full),
                                       lambda: gathered_at_turn_elems(spec, cfg, recompute, embedding_backward=full))
    # one rank gathers nothing: its partition is the whole parameter (measured, ZERO_ORACLE_LORA 1-rank ZeRO-3)
    gathered = gathered_elems * stored / tp if shard > 1 else 0.0
    grads_in_forward = grads if setup.grad_accum == 1 else 0.0 * grads
    persistent = persistent + master
    if not full:  # ZeRO-3 partitions the adapters too: the phases count them whole
        whole = trainable * st.grad_bytes
        kept = persisted_adapter_elems(spec, setup, trainable, cfg.persistence_threshold_elems) * st.grad_bytes
        persistent = persistent - (whole - kept) * (1.0 - 1.0 / shard)
        gathered = gathered + (whole - kept) * (1.0 - 1.0 / shard) * min(1.0, gathered_elems / counts.total)
    return {"forward": persistent + gathered + grads_in_forward,
            "backward": persistent + gathered + reduce_copy,
            "optimizer": persistent + optimizer}


def fp32_clone_bytes(partition_elems):
    """ZeRO-1/2 in fp32 (no bf16/fp16 block): ``single_partition_of_fp32_groups`` is still a ``.clone()``
    of this rank's flat partition (``stage_1_and_2.py``, DeepSpeed 0.19.8), a second fp32 copy that
    ``states.dtype_layout`` (fp32: no master) does not count. ZeRO-3 reuses the flat group instead."""
    return partition_elems * FP32_BYTES


def persisted_adapter_elems(spec, setup, adapter_elems, threshold_elems: float):
    """Adapter elements ZeRO-3 keeps whole (``ds_persist``: at most ``stage3_param_persistence_threshold``
    elements): LoRA A (rank x in) and B (out x rank) of each adapted linear and DoRA's magnitude vectors
    under the threshold. Vectorized over the ranks (recovered from ``adapter_elems``); peft's expert
    adapters are left out (counted partitioned)."""
    from collections import Counter

    from planner.cost import params
    from planner.cost.memory import dora

    targets = tuple(setup.lora_targets)
    linears = spec_facts.lora_linears(spec, targets)
    per_rank = spec_facts.lora_params_per_rank(spec, targets) + spec_facts.cached(
        spec, ("expert_lora_per_rank", targets), lambda: params.expert_lora_params_per_rank(spec, targets))
    magnitudes = float(dora.magnitude_elems(spec, setup))
    rank = np.maximum(np.asarray(adapter_elems, dtype=np.float64) - magnitudes, 0.0) / max(per_rank, 1)
    sides = spec_facts.cached(spec, ("lora_sides", targets), lambda: tuple(Counter(
        side for _, lin in linears for side in (lin.in_features, lin.out_features)).items()))
    kept = 0.0 * rank
    for side, count in sides:
        kept = kept + count * np.where(rank * side <= threshold_elems, rank * side, 0.0)
    if setup.dora:
        kept = kept + sum(lin.out_features for _, lin in linears if lin.out_features <= threshold_elems)
    return kept
