"""Ground truth for the analytic model: a real ``transformers`` training step on fake tensors.

Owns the oracle's entry points: ``trace_training_step`` (two full training steps of a set-up
under PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``, peaks overall and per
phase, plus the FLOPs of one micro-batch under ``torch.utils.flop_counter.FlopCounterMode``),
``trace_flops`` (the FLOPs alone) and what they return (``TraceResult``, ``CATEGORIES``,
``PHASES``). The model is built from an HF ``config.json`` dict with random init (no download,
``planner.truth.training_model``), its parameters are swapped into ``FakeTensorMode`` CPU tensors
(shapes and dtypes only, no data: ``planner.truth.fake_tensors``), memory is tracked by
``planner.truth.phase_tracker`` (which says what lands in which category) and FLOPs are booked
per component by ``planner.truth.flop_attribution``. No GPU, no weights; torch is imported
inside functions only.

What one step is (``grad_accum`` micro-batches, then the optimizer of ``planner.truth.optimizers``)::

    for _ in range(setup.grad_accum):
        with autocast (bf16-mixed only):
            loss = model(input_ids=ids, labels=labels).loss / grad_accum
        loss.backward(); del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

MoE experts run transformers' default ``grouped_mm`` kernel at bf16; at fp32 (fp32 and bf16-mixed)
transformers' own ``grouped_mm_fallback`` op with the same shapes (``moe_fallback_for_non_bf16``).

Recorded by design:

- The peak (``peak_bytes``) is MemTracker's over both steps; step 1 creates the optimizer state
  lazily, so the peak is normally in step 2, and phase peaks are those of step 2.
- SDPA on fake CPU tensors takes CPU's flash-style kernel (no s x s score storage), like a GPU
  with flash or memory-efficient attention. Eager attention stores the scores and probabilities.
- FLOPs are counted with eager attention (CPU flash SDPA counts 0 in FlopCounterMode), on the
  same model (same method, checkpointing), so ``flops_backward`` includes the recompute of
  activation checkpointing and, for LoRA, no weight gradients of frozen weights.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planner.io.progress import progress_bar
from planner.specs.configs import num_layers_of
from planner.truth.fake_tensors import (
    bitsandbytes_on_fake_tensors,
    fake_item,
    fake_model,
    moe_fallback_for_non_bf16,
    needs_bitsandbytes,
)
from planner.truth.flop_attribution import count_training_flops
from planner.truth.optimizers import make_optimizer
from planner.truth.phase_tracker import CATEGORIES, phase_tracker_class
from planner.truth.training_model import check_setup, cpu_autocast, has_experts, lora_notes, param_counts

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class TraceResult:
    """What one fake-tensor trace measured. Bytes are bytes, FLOPs are FLOPs (a multiply-add is 2).

    peak_bytes: MemTracker's highest total over two full training steps.
    peak_by_category: the split of that peak over ``CATEGORIES`` (sums to ``peak_bytes``).
    phase_peak_bytes: highest total within each phase of the 2nd step: ``forward`` (model call
        and loss), ``backward`` (``loss.backward()``), ``optimizer`` (``step`` and ``zero_grad``).
    phase_peak_by_category: the split at each phase's peak.
    flops_forward / flops_backward: FlopCounterMode over one micro-batch with eager attention;
        backward includes the recompute of activation checkpointing.
    flops_by_module: forward+backward FLOPs per component (``embed``-like names as the model
        names them: ``model.embed_tokens``, ``model.layers.0.self_attn``, ``model.layers.0.mlp``,
        ``lm_head``; ``other`` holds what runs outside those modules, e.g. the loss).
    trainable_params / total_params: numel of parameters with ``requires_grad`` / of all of them
        (tied weights counted once).
    num_layers: decoder layers of the traced model.
    optimizer_state_bytes: bytes of the tensors in ``optimizer.state`` after step 2 (the
        persistent part of ``Optstate``; the rest of ``Optstate`` at a peak is step scratch).
    wall_s: seconds the memory trace (two steps) took; flops_wall_s the FLOP count.
    phase_peak_at: for each phase, the aten op after which its peak was reached and the innermost
        module ModTracker had active then (e.g. ``aten.nll_loss_forward.default in
        LlamaForCausalLM``); in the backward ModTracker's module can lag behind, trust the op.
    notes: what was approximated or substituted (attention fallback, MoE expert kernel, Lion's
        implementation, ...).
    """

    peak_bytes: int
    peak_by_category: dict[str, int]
    phase_peak_bytes: dict[str, int]
    phase_peak_by_category: dict[str, dict[str, int]]
    flops_forward: int
    flops_backward: int
    flops_by_module: dict[str, int]
    trainable_params: int
    total_params: int
    num_layers: int
    notes: list[str] = field(default_factory=list)
    optimizer_state_bytes: int = 0
    wall_s: float = 0.0
    flops_wall_s: float = 0.0
    phase_peak_at: dict[str, str] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        """The phase of step 2 whose peak is highest (ties: the earliest)."""
        return max(PHASES, key=lambda p: self.phase_peak_bytes[p])




def trace_training_step(config: dict, setup: TrainingSetup, num_layers: int | None = None,
                        *, count_flops: bool = True, show_progress: bool = False) -> TraceResult:
    """Two training steps of ``setup`` on the model of ``config`` (``num_layers`` decoder layers,
    ``None``: as the config says) on fake CPU tensors; see the module docstring for what is
    measured. ``count_flops=False`` skips the FLOP count (flops fields are then 0).
    ``show_progress``: a bar on stderr (when it is a terminal) advancing after each phase run."""
    check_setup(setup)
    from torch._subclasses.fake_tensor import FakeTensorMode

    notes: list[str] = []
    layers = num_layers if num_layers is not None else num_layers_of(config)
    phases_run = 2 * (2 * setup.grad_accum + 1) + (2 if count_flops else 0)
    with progress_bar(phases_run, "trace", enabled=show_progress, unit="phase") as bar:
        t0 = time.perf_counter()
        fake_mode = FakeTensorMode()
        model = fake_model(fake_mode, config, setup, num_layers, attention=setup.attention, experts=None, notes=notes)
        with fake_mode:
            memory = _trace_memory(model, fake_mode, setup, notes, bar)
        wall = time.perf_counter() - t0
        if count_flops:
            flops = _timed_flop_count(config, setup, num_layers, notes, bar)
        else:
            flops = {"flops_forward": 0, "flops_backward": 0, "flops_by_module": {}, "flops_wall_s": 0.0}
    return TraceResult(**memory, **flops, num_layers=layers, notes=notes, wall_s=wall)


def trace_flops(config: dict, setup: TrainingSetup, num_layers: int | None = None) -> tuple[int, int, dict[str, int]]:
    """(forward FLOPs, backward FLOPs, forward+backward FLOPs per component) of one micro-batch.

    Counted by FlopCounterMode (matmuls, convolutions, attention kernels; elementwise ops count 0)
    with eager attention, whatever ``setup.attention`` says, and for mixture-of-experts models with
    transformers' ``batched_mm`` experts kernel (per-token ``bmm`` over the top-k experts, which
    FlopCounterMode counts; the default ``grouped_mm`` counts 0). Precision does not change the count.
    """
    fwd, bwd, by_module, _ = count_training_flops(config, setup, num_layers)
    return fwd, bwd, by_module


# --------------------------------------------------------------------------- the memory trace


def _trace_memory(model, fake_mode, setup: TrainingSetup, notes: list[str], bar) -> dict[str, Any]:
    """Inside ``fake_mode``: the optimizer and a batch, two steps under the phase tracker, and the
    ``TraceResult`` fields they give (peaks, parameter counts, optimizer state)."""
    trainable, total = param_counts(model)
    if setup.method in ("lora", "qlora"):
        notes += lora_notes(model)
    optimizer, ids, labels = _optimizer_and_batch(model, fake_mode, setup, notes)
    tracker = phase_tracker_class()()
    tracker.track_external(model, optimizer, ids, labels)
    notes += _substitution_notes(model, setup)
    if setup.dora:
        _collect_dora_garbage(model, notes)
    _run_two_steps(tracker, model, optimizer, ids, labels, setup, fake_mode, bar)
    return {**peak_fields(tracker, notes), "trainable_params": trainable, "total_params": total,
            "optimizer_state_bytes": _optimizer_state_bytes(optimizer)}


def peak_fields(tracker, notes: list[str]) -> dict[str, Any]:
    """The ``TraceResult`` peak fields of a phase tracker after two steps (the HF and torchtune oracles)."""
    peak = tracker.peak()
    phase = {p: tracker.phase_peaks[p][1] for p in PHASES}
    if peak["Total"] > max(v["Total"] for v in phase.values()):
        notes.append("the peak of the two steps is in step 1, above every phase of step 2")
    return {
        "peak_bytes": peak["Total"],
        "peak_by_category": {c: peak[c] for c in CATEGORIES},
        "phase_peak_bytes": {p: phase[p]["Total"] for p in PHASES},
        "phase_peak_by_category": {p: {c: phase[p][c] for c in CATEGORIES} for p in PHASES},
        "phase_peak_at": dict(tracker.phase_peak_at),
    }


def _optimizer_and_batch(model, fake_mode, setup: TrainingSetup, notes: list[str]):
    """The optimizer over the trainable parameters, and random ``input_ids`` and ``labels``."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    with bitsandbytes_on_fake_tensors(fake_mode, needs_bitsandbytes(setup)):
        optimizer = make_optimizer(params, setup, notes, model=model)
    b, s = setup.micro_batch, setup.seq_len
    ids = torch.randint(0, vocab, (b, s), dtype=torch.int64)
    labels = torch.randint(0, vocab, (b, s), dtype=torch.int64)
    return optimizer, ids, labels


def _collect_dora_garbage(model, notes: list[str]) -> None:
    """peft's DoRA builds B @ A as ``lora_B(lora_A(eye))`` and uses it detached; on a GPU the identity
    and its graph are freed when the layer returns, but the tracker's gradient hooks close a reference
    cycle around them, so here they would wait for Python's garbage collector at random moments.
    Collecting after each DoRA layer's forward restores what a real run frees."""
    import gc

    def collect(*_):  # a forward hook's return value would replace the output: return None
        gc.collect()

    layers = [m for m in model.modules() if type(m).__name__ == "DoraLinearLayer"]
    for layer in layers:
        layer.register_forward_hook(collect)
    if layers:
        notes.append(f"DoRA: garbage collected after each of {len(layers)} DoRA layers' forward (the tracker's "
                     "hooks would otherwise keep peft's identity matrix alive in a reference cycle)")


def _substitution_notes(model, setup: TrainingSetup) -> list[str]:
    """What the fake-tensor patches of the steps substitute for this model and set-up."""
    notes = []
    if has_experts(model) and setup.precision != "bf16":
        notes.append("MoE experts at fp32: traced with transformers' grouped_mm_fallback op "
                     "(torch._grouped_mm's CPU fake kernel takes bf16 only); same shapes and saved tensors")
    if setup.optimizer == "adafactor":
        notes.append("adafactor: Tensor.item() of a fake tensor returns 1.0 (torch's Adafactor reads the "
                     "parameter RMS as a Python float; it scales the update, no tensor depends on it)")
    return notes


def _run_two_steps(tracker, model, optimizer, ids, labels, setup: TrainingSetup, fake_mode, bar) -> None:
    """Two training steps under ``tracker`` and the fake-tensor patches; the phase peaks kept are
    those of step 2 (step 1 creates the optimizer state)."""
    with tracker, moe_fallback_for_non_bf16(), fake_item(), \
            bitsandbytes_on_fake_tensors(fake_mode, needs_bitsandbytes(setup)), \
            warnings.catch_warnings():
        # MemTracker warns when a module's backward hook fires after the module is gone
        warnings.filterwarnings("ignore", message="Module is None")
        for step in range(2):
            if step == 1:
                tracker.phase_peaks.clear()
                tracker.phase_peak_at.clear()
            _training_step(tracker, model, optimizer, ids, labels, setup, bar)


def _training_step(tracker, model, optimizer, ids, labels, setup: TrainingSetup, bar) -> None:
    """One step as the module docstring shows it, each phase marked on ``tracker``; ``bar``
    advances after every forward, backward and optimizer phase."""
    for _ in range(setup.grad_accum):
        tracker.start_phase("forward")
        with cpu_autocast(setup):
            loss = model(input_ids=ids, labels=labels).loss
        if setup.grad_accum > 1:
            loss = loss / setup.grad_accum
        bar.update()
        tracker.start_phase("backward")
        loss.backward()
        del loss
        tracker.start_phase(None)
        tracker.reset_mod_stats()  # else MemTracker refuses a 2nd call of the root module
        bar.update()
    tracker.start_phase("optimizer")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker.start_phase(None)
    bar.update()


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state``, one entry per storage (bitsandbytes shares
    its code tables between tensors)."""
    import torch

    storages = {}
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                storage = v.untyped_storage()
                storages[id(storage)] = storage.nbytes()
    return sum(storages.values())


def _timed_flop_count(config: dict, setup: TrainingSetup, num_layers: int | None, notes: list[str],
                      bar) -> dict[str, Any]:
    """The FLOP fields of ``TraceResult``; the count's notes join ``notes`` (no repeats)."""
    t1 = time.perf_counter()
    fwd, bwd, by_module, fnotes = count_training_flops(config, setup, num_layers, bar)
    flops_wall = time.perf_counter() - t1
    notes += [n for n in fnotes if n not in notes]
    return {"flops_forward": fwd, "flops_backward": bwd, "flops_by_module": by_module, "flops_wall_s": flops_wall}
