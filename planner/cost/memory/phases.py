"""Training memory by phase; the peak is the maximum over the phases.

Every function is vectorized over ``micro_batch``, ``seq_len`` and ``lora_rank`` (numpy arrays
broadcast together); the categorical choices of a ``TrainingSetup`` (method, precision,
optimizer, checkpointing, attention, sharding) are fixed per call.

Phases of one steady-state step (``zero_grad(set_to_none=True)``, so no gradients exist in
forward unless gradients are accumulated over micro-batches):
- forward: weights, optimizer states, every saved activation, the loss's logits;
- backward: at its start all activations plus the loss's fp32 gradient temporaries; at its end
  every gradient (activations released) plus the embedding gradient's transient;
- optimizer: weights, gradients, states and the step's temporaries (foreach AdamW makes one
  full-size temporary: ``torch._foreach_sqrt(exp_avg_sqs)``; the fused step makes none).

What each phase holds comes from two halves: ``planner.cost.memory.states`` (weights, gradients,
optimizer states and temporaries: no tokens) and ``planner.cost.memory.activation_memory`` (what the
micro-batch saves: no ZeRO stage, GPU count, accumulation or optimizer). Serving memory is in
``planner.cost.memory.inference``; its names are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost.memory import activations as act
from planner.cost.memory import zero_buffers
from planner.cost.memory.activation_memory import (
    NOT_READ_BY_ACTIVATIONS,
    ActivationMemory,
    activation_memory,
    compute_setup,
)
from planner.cost.memory.dora import forward_transient_bytes as dora_forward_transient_bytes
from planner.cost.memory.inference import (
    inference_memory,
    kv_cache_bytes,
    prefill_activation_bytes,
    weight_bytes_inference,
)
from planner.cost.memory.parallel import parallel_transient_bytes, zero_shard_degree
from planner.cost.memory.saved_modules import saved_modules_extra_bytes
from planner.cost.memory.states import (
    ADAM8BIT_BLOCK,
    ADAM8BIT_MIN_SIZE,
    NF4_BITS,
    NOT_READ_BY_STATES,
    Bytes,
    ModelStates,
    adam8bit_state_bytes,
    adapter_bytes,
    dtype_layout,
    model_states,
    nf4_bytes,
    optimizer_state_elems,
    trainable_tensors,
)
from planner.cost.spec_facts import setup_key, shared
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

__all__ = ["ADAM8BIT_BLOCK", "ADAM8BIT_MIN_SIZE", "NF4_BITS", "Bytes", "MemoryEstimate", "adam8bit_state_bytes",
           "dtype_layout", "embedding_backward_bytes", "inference_memory", "kv_cache_bytes", "nf4_bytes",
           "optimizer_state_elems", "prefill_activation_bytes", "trainable_tensors", "training_memory",
           "training_peak_bytes",
           "weight_bytes_inference"]


def _arr(x):
    return np.asarray(x, dtype=np.float64)


SAME_BYTES_AS = {"fp16": "bf16", "fp16-mixed": "bf16-mixed"}
"""fp16 takes the bytes of bf16 in every tensor; fp16-mixed (autocast to float16 plus
``torch.amp.GradScaler``) adds only the scaler's scale and found-inf scalars: unscaling runs in
place (``_amp_foreach_non_finite_check_and_unscale_``), so it is priced as bf16-mixed."""


def _bytes_setup(setup: TrainingSetup) -> TrainingSetup:
    """The set-up whose byte widths the formulas read (fp16 modes priced as their bf16 twins; QLoRA
    after peft's k-bit preparation without autocast as fp32, see ``kbit_precision``)."""
    twin = SAME_BYTES_AS.get(setup.precision)
    setup = setup if twin is None else setup.model_copy(update={"precision": twin})
    if setup.kbit_preparation and setup.stack == "hf":  # other stacks refuse it (planner.cost.support)
        setup = setup.model_copy(update={"precision": kbit_precision(setup)})
    return setup


def kbit_precision(setup: TrainingSetup) -> str:
    """The precision whose byte widths a QLoRA step takes after peft's ``prepare_model_for_kbit_training``.

    The preparation casts every parameter that is not 4-bit (embeddings, norms, the head) to fp32
    (peft 0.21.2 ``src/peft/utils/other.py``). Without autocast (precision bf16) the embedding's
    output is then fp32, RMSNorm returns its input dtype, bitsandbytes' ``Linear4bit`` casts its
    input to the bf16 compute dtype and its output back to the input's dtype (bitsandbytes 0.50
    ``nn/modules.py``), and the head multiplies in fp32: every activation is fp32, as at precision
    fp32 (fp32 logits end to end). Under bf16 autocast (the HF Trainer's ``bf16=True``,
    precision bf16-mixed) the step is priced as bf16-mixed with the layers of
    ``activations.kbit_autocast_layer_bytes``. Checked against peft 0.21 on fake tensors (oracle panel)."""
    from planner.errors import PlannerError

    if setup.method != "qlora":
        raise PlannerError(f"kbit_preparation with method {setup.method}: not priced (peft's "
                           "prepare_model_for_kbit_training prepares a 4-bit base model): use method qlora, "
                           "or leave --kbit-preparation out")
    if setup.checkpointing == "selective":
        raise PlannerError("kbit_preparation with selective checkpointing is not priced (not traced): "
                           "use checkpointing none or full")
    return "fp32" if setup.precision == "bf16" else setup.precision


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU. ``components`` are sizes; ``phases`` are the live totals at each phase's
    peak; ``peak_bytes`` = max over phases. All values broadcast over the candidate arrays."""

    components: dict
    phases: dict
    peak_bytes: object
    peak_phase: object


def training_memory(spec: ModelSpec, setup: TrainingSetup, micro_batch=None, seq_len=None, lora_rank=None,
                    device: str = "cuda", cache: dict | None = None) -> MemoryEstimate:
    """Memory of one training step on one GPU for ``setup`` (arrays override its numbers).

    ``device``: "cuda" (what users run) or "cpu" (the fake-tensor oracle runs CPU kernels,
    whose embedding backward accumulates in a V x h fp32 buffer; see ``embedding_backward_bytes``).
    ``cache``: a dict the caller keeps for calls of one model over the same arrays; the
    activations (``memory_activations.activation_memory``: no ZeRO stage, GPU count,
    accumulation or optimizer) and the states (``memory_states.model_states``: no tokens, no
    accumulation) are computed once into it per key of the set-up fields they read.
    """
    setup = _bytes_setup(setup)
    if setup.stack == "torchtune":
        phases, components = _torchtune(spec, setup, micro_batch, seq_len, lora_rank)
    elif setup.stack == "torchtitan":
        phases, components = _torchtitan(spec, setup, micro_batch, seq_len, device)
    elif setup.stack == "megatron":
        phases, components = _megatron(spec, setup, micro_batch, seq_len)
    elif setup.pipeline_parallel > 1:
        phases, components = _pipeline(spec, setup, micro_batch, seq_len, lora_rank, device, cache)
    else:
        states, acts, tokens, phases = _phase_totals(spec, setup, micro_batch, seq_len, lora_rank, device, cache)
        components = _components(states, acts, tokens, setup)
    stacked = np.stack(np.broadcast_arrays(*phases.values()))
    peak = stacked.max(axis=0)
    names = np.array(list(phases))
    return MemoryEstimate(components, phases, peak, names[stacked.argmax(axis=0)])


def training_peak_bytes(spec: ModelSpec, setup: TrainingSetup, micro_batch=None, seq_len=None, lora_rank=None,
                        device: str = "cuda", cache: dict | None = None):
    """``training_memory(...).peak_bytes`` alone (a search needs nothing else)."""
    setup = _bytes_setup(setup)
    if setup.stack == "torchtune":
        phases = _torchtune(spec, setup, micro_batch, seq_len, lora_rank)[0]
    elif setup.stack == "torchtitan":
        phases = _torchtitan(spec, setup, micro_batch, seq_len, device)[0]
    elif setup.stack == "megatron":
        phases = _megatron(spec, setup, micro_batch, seq_len)[0]
    elif setup.pipeline_parallel > 1:
        phases = _pipeline(spec, setup, micro_batch, seq_len, lora_rank, device, cache, components=False)[0]
    else:
        phases = _phase_totals(spec, setup, micro_batch, seq_len, lora_rank, device, cache)[3]
    return np.stack(np.broadcast_arrays(*phases.values())).max(axis=0)


def _pipeline(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len, lora_rank, device: str,
              cache: dict | None, components: bool = True) -> tuple[dict, dict | None]:
    """The worst pipeline stage's phases and components (``planner.cost.memory.pipeline``)."""
    from planner.cost.memory.pipeline import pipeline_phases_and_components

    if setup.float8:  # float8 hook: pipeline stages are not priced with fp8 linears
        from planner.cost.memory.float8 import hf_unpriced_reason
        from planner.errors import PlannerError

        raise PlannerError(hf_unpriced_reason(spec, setup) or "float8 with pipeline parallelism: not priced")
    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    rank = _arr(setup.lora_rank if lora_rank is None else lora_rank)
    return pipeline_phases_and_components(spec, setup, b, s, rank, device, cache, components)


def _torchtune(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len, lora_rank) -> tuple[dict, dict]:
    """The torchtune stack's phases and components (``planner.cost.memory.torchtune_stack``)."""
    from planner.cost.memory.torchtune_stack import torchtune_phases_and_components
    from planner.cost.memory.torchtune_tensors import unpriced_reason
    from planner.errors import PlannerError

    reason = unpriced_reason(spec)
    if reason:
        raise PlannerError(reason)

    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    rank = _arr(setup.lora_rank if lora_rank is None else lora_rank)
    return torchtune_phases_and_components(spec, setup, b, s, rank)


def _torchtitan(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len, device: str) -> tuple[dict, dict]:
    """The torchtitan stack's phases and components (``planner.cost.memory.torchtitan_stack``)."""
    from planner.cost.memory.torchtitan_stack import torchtitan_phases_and_components
    from planner.cost.memory.torchtitan_tensors import unpriced_reason
    from planner.errors import PlannerError

    reason = unpriced_reason(spec)
    if reason:
        raise PlannerError(reason)
    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    return torchtitan_phases_and_components(spec, setup, b, s, 0, device)


def _megatron(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len) -> tuple[dict, dict]:
    """The Megatron stack's phases and components (``planner.cost.memory.megatron_stack``)."""
    from planner.cost.memory.megatron_stack import megatron_phases_and_components

    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    return megatron_phases_and_components(spec, setup, b, s)


def _phase_totals(spec: ModelSpec, setup: TrainingSetup, micro_batch, seq_len, lora_rank, device: str,
                  cache: dict | None):
    """(states, activations, tokens, phases) of one step (see ``training_memory``)."""
    b = _arr(setup.micro_batch if micro_batch is None else micro_batch)
    s = _arr(setup.seq_len if seq_len is None else seq_len)
    rank = _arr(setup.lora_rank if lora_rank is None else lora_rank)
    tokens = b * s / setup.context_parallel  # per GPU: context parallelism splits every sequence
    states = shared(cache, setup_key("states", setup, NOT_READ_BY_STATES), lambda: model_states(spec, setup, rank))
    acts = shared(cache, (device, *setup_key("activations", compute_setup(setup), NOT_READ_BY_ACTIVATIONS)),
                  lambda: activation_memory(spec, setup, b, s, rank, device))
    if setup.float8:  # float8 hook (planner.cost.memory.float8): fp8 weight copies kept for backward
        acts = _float8_activations(spec, setup, acts)
    return states, acts, tokens, _phases(spec, setup, states, acts, tokens, device)


def _float8_activations(spec: ModelSpec, setup: TrainingSetup, acts: ActivationMemory) -> ActivationMemory:
    """torchao float8 on the Hugging Face stack: its fp8 weight copies join the casts kept for backward."""
    from planner.cost.memory import float8
    from planner.errors import PlannerError

    reason = float8.hf_unpriced_reason(spec, setup)
    if reason:
        raise PlannerError(reason)
    fixed = float8.hf_saved_weight_bytes(spec, setup)
    return acts._replace(casts=acts.casts + fixed, saved=acts.saved + fixed)


def _phases(spec: ModelSpec, setup: TrainingSetup, st: ModelStates, acts: ActivationMemory, tokens, device: str,
            first: bool = True, last: bool = True) -> dict:
    """Live bytes at the peak of forward, backward and the optimizer step. ``tokens``: per GPU;
    ``first``/``last``: this GPU holds the embedding / the head (pipeline stages: ``memory_pipeline``)."""
    tp = setup.tensor_parallel
    grads_in_forward = st.gradients if setup.grad_accum > 1 else 0.0
    weights = st.weights + st.adapters * adapter_bytes(setup)
    static = weights + st.states + st.master + grads_in_forward
    # one layer's ring-attention / expert-dispatch buffers, live while the loss's are not
    transient = parallel_transient_bytes(spec, setup, tokens, act.PRECISION[setup.precision].matmul)
    transient = np.maximum(transient, dora_forward_transient_bytes(spec, setup, adapter_bytes(setup)))
    forward = static + acts.saved + np.maximum(acts.forward_logits, transient)
    backward_start = static + acts.saved + np.maximum(acts.loss_temporaries, transient)
    hidden_grad = tokens * spec.hidden_size * act.PRECISION[setup.precision].residual
    if not last:  # the gradient received from the next stage and the one computed for it
        backward_start = backward_start + 2 * hidden_grad
    if setup.checkpointing != "none":
        # recomputing the last layer: its full activations beside what checkpointing kept, the
        # loss's log-softmax released, the head's gradient and the hidden-state gradient live
        head_grad = spec.vocab_size * spec.hidden_size * st.grad_bytes / tp if setup.method == "full" and last else 0.0
        released = tokens * 4 * spec.vocab_size if last and setup.loss_impl != "fused-linear" else 0.0
        recompute = static + acts.saved - released + acts.recompute_transient + head_grad + 2 * hidden_grad
        backward_start = np.maximum(backward_start, recompute)
    if setup.method == "full" and first:
        shard_grads = zero_shard_degree(setup) if setup.zero >= 2 else 1
        embedding = spec.vocab_size * spec.hidden_size * st.grad_bytes / shard_grads / tp
        # the embedding's own gradient is still a temporary when backward ends (a stage without
        # the head holds the table alone, untied); tied, with gradient accumulation, the table's .grad
        # of the earlier micro-batches is live too (autograd adds into it after): one table more
        # (traced: llama-3.2-1b 2L, grad_accum 2, b1 s256 was 11.3% under; untied on CPU the oracle sits
        # between the two prices, -2.1% / +2.4% on llama-2-7b 2L, never the peak: left as it was)
        if setup.grad_accum > 1 and spec.tied_embeddings and last:
            embedding = 0.0
        backward_end = weights + st.states + st.master + st.gradients - embedding + embedding_backward_bytes(
            spec, st.grad_bytes, device, tied=spec.tied_embeddings and last
        ) / shard_grads / tp
    else:
        backward_end = weights + st.states + st.master + st.gradients
    # peft's expert LoRA: a merged stack's gradient while the loss's log-softmax is already released
    released_loss = tokens * 4 * spec.vocab_size if last and setup.loss_impl != "fused-linear" else 0.0
    expert_moment = static + acts.saved - released_loss + acts.expert_grad
    backward = np.maximum(np.maximum(backward_start, backward_end), np.where(acts.expert_grad > 0, expert_moment, 0))
    optimizer = weights + st.gradients + st.states + st.master + st.temporaries
    phases = {"forward": forward, "backward": backward, "optimizer": optimizer + 0 * tokens}
    if setup.modules_to_save:  # peft's trained copies of the embedding / head beside LoRA
        extra = saved_modules_extra_bytes(spec, setup, tokens, acts.loss_temporaries)
        phases = {name: value + extra[name] for name, value in phases.items()}
    if zero_buffers.applies(setup):  # DeepSpeed ZeRO's buckets and buffers beyond ideal sharding
        extra = zero_buffers.zero_buffer_bytes(spec, setup, st)
        phases = {name: value + extra[name] for name, value in phases.items()}
    return phases


def _components(st: ModelStates, acts: ActivationMemory, tokens, setup: TrainingSetup) -> dict:
    """Sizes of what a step holds (each broadcast over the candidates)."""
    return {
        "weights": st.weights + 0 * tokens,
        "lora_adapters": st.adapters * adapter_bytes(setup) + 0 * tokens,
        "gradients": st.gradients + 0 * tokens,
        "master_weights": st.master + 0 * tokens,
        "optimizer_states": st.states + 0 * tokens,
        "optimizer_temporaries": st.temporaries + 0 * tokens,
        "activations": acts.layers + acts.head,
        "saved_activations_with_checkpointing": acts.kept + acts.head,
        "autocast_weight_copies": acts.casts + 0 * tokens,
        "loss_temporaries": acts.loss_temporaries,
    }


def embedding_backward_bytes(spec: ModelSpec, grad_bytes: float, device: str, tied: bool | None = None) -> float:
    """Live gradient bytes of the embedding table when backward computes it (its last step).

    Tied embeddings: the autograd engine holds the head's contribution, computes the
    embedding's, and adds them into a new tensor: three V x h gradients at once (measured with
    MemTracker; autograd logic, so on CUDA too). Untied: the embedding's gradient alone, which
    CPU's ``embedding_dense_backward`` accumulates in an fp32 buffer (4 bytes per element).
    """
    table = spec.vocab_size * spec.hidden_size
    if spec.tied_embeddings if tied is None else tied:
        return 3.0 * table * grad_bytes
    return table * (grad_bytes if device == "cuda" else max(4.0, grad_bytes))
