"""Ground truth for the torchtune stack: a training step of torchtune's own model code on fake tensors.

Owns ``trace_torchtune_step`` (two training steps of torchtune 0.6.1's single-device recipes,
``recipes/full_finetune_single_device.py`` and ``lora_finetune_single_device.py``, under the
oracle's phase tracker, with the same ``TraceResult`` as ``planner.truth.trace``) and the recipe
techniques it switches on (``TorchtuneRecipe``). The model is ``planner.truth.torchtune_model``'s;
the fake-tensor stand-ins for CUDA-only pieces (activation offloading, paged optimizers) are
``planner.truth.torchtune_patches``'s. torch and torchtune are imported inside functions only.

One step, as the recipes' ``train`` and ``_loss_step`` run it::

    for _ in range(grad_accum):
        labels = batch.pop("labels"); n = (labels != -100).sum(); num_tokens += n
        with activations_handling_ctx:                  # OffloadActivations or a null context
            logits = model(tokens, mask=..., input_pos=...)   # bf16 logits .float() in the model,
        labels = hstack(labels[:, 1:], ignore)              # or a list of bf16 chunks
        loss = loss_fn(logits, labels); del logits           # CrossEntropyLoss / CEWithChunkedOutputLoss
        (loss * n).backward()                                # optimizer_in_bwd: each parameter's
    scale_grads(model, 1 / num_tokens)                       # optimizer steps in its
    optimizer.step(); optimizer.zero_grad(set_to_none=True)  # post-accumulate-grad hook instead

Phases as in the HF oracle: ``forward`` (labels, model call and loss), ``backward``,
``optimizer`` (grad scaling, step, zero_grad; empty with ``optimizer_in_bwd``, whose steps
happen, and are counted, inside ``backward``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planner.specs.configs import num_layers_of
from planner.truth.fake_tensors import bitsandbytes_on_fake_tensors
from planner.truth.optimizers import make_optimizer
from planner.truth.phase_tracker import phase_tracker_class
from planner.truth.torchtune_flops import count_torchtune_flops
from planner.truth.torchtune_model import adapter_param_count, check_torchtune_setup, torchtune_fake_model
from planner.truth.torchtune_patches import (
    HOST_DEVICE,
    offloading_on_fake_tensors,
    paged_optimizer,
    paged_states_on_host,
    redirect_offloading,
)
from planner.truth.trace import TraceResult, peak_fields
from planner.truth.training_model import param_counts

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TorchtuneRecipe:
    """The recipe switches of torchtune's single-device recipes that the trace can run.

    output_chunks: ``0``: ``torch.nn.CrossEntropyLoss`` on the model's fp32 logits (``unembed``
        calls ``.float()``); ``n > 0``: ``model.set_num_output_chunks(n)`` and
        ``CEWithChunkedOutputLoss(n)`` (bf16 chunks, each upcast to fp32 inside the loss).
    optimizer_in_bwd: one optimizer per parameter, stepped and zeroed in its post-accumulate-grad
        hook (``training.register_optim_in_bwd_hooks``); needs ``grad_accum == 1``.
    activation_offloading: ``training.get_act_offloading_ctx_manager(model, True)`` around the
        model call (``OffloadActivations()``, streams on, the output head excluded); needs
        checkpointing ``full``, as the recipes require. Offloaded copies go to a stand-in host
        device, reported apart (see ``planner.truth.torchtune_patches``).
    packed_documents: ``0``: plain sequences (SDPA ``is_causal``); ``k > 0``: each sequence is a
        pack of ``k`` equal documents as ``PackedDataset`` + ``padded_collate_packed`` give it
        (``input_pos`` restarting per document, a dense ``b x s x s`` bool block-causal mask:
        without flex attention, i.e. on CPU and GPUs below SM 7.5, torchtune passes it to SDPA).
    paged_optimizer: with ``optimizer="adamw-8bit"``, bitsandbytes' ``PagedAdamW8bit`` (the full
        single-device configs' optimizer): states of >= 1e5 elements in CUDA managed memory,
        outside PyTorch's allocator; traced on the host stand-in device.
    """

    output_chunks: int = 0
    optimizer_in_bwd: bool = False
    activation_offloading: bool = False
    packed_documents: int = 0
    paged_optimizer: bool = False

    def check(self, setup: TrainingSetup) -> None:
        """Raise ValueError for what the recipes refuse, NotImplementedError for what cannot be traced."""
        if self.optimizer_in_bwd and setup.grad_accum > 1:
            raise ValueError("optimizer_in_bwd needs grad_accum == 1 (torchtune's recipes refuse both)")
        if self.activation_offloading and setup.checkpointing != "full":
            raise ValueError("activation_offloading needs checkpointing 'full' (torchtune's recipes refuse it otherwise)")
        if self.paged_optimizer and setup.optimizer != "adamw-8bit":
            raise ValueError("paged_optimizer is bitsandbytes' PagedAdamW8bit: set optimizer 'adamw-8bit'")
        if self.packed_documents and setup.seq_len % self.packed_documents:
            raise ValueError(f"seq_len {setup.seq_len} is not a multiple of packed_documents {self.packed_documents}")


def recipe_from_setup(setup: TrainingSetup) -> tuple[TorchtuneRecipe, TrainingSetup]:
    """The recipe switches a set-up's fields ask for (chunked loss, optimizer in backward,
    activation offload, packing with 4 documents per sequence, paged 8-bit AdamW), and the set-up
    the oracle's optimizer factory builds (``paged-adamw-8bit`` is bitsandbytes' AdamW8bit, paged)."""
    recipe = TorchtuneRecipe(
        output_chunks=setup.loss_chunks if setup.loss_impl == "chunked" else 0,
        optimizer_in_bwd=setup.optimizer_in_backward,
        activation_offloading=setup.activation_offload,
        packed_documents=4 if setup.packed else 0,
        paged_optimizer=setup.optimizer == "paged-adamw-8bit",
    )
    if recipe.paged_optimizer:
        setup = setup.model_copy(update={"optimizer": "adamw-8bit"})
    return recipe, setup


def trace_torchtune_step(config: dict, setup: TrainingSetup, num_layers: int | None = None, *,
                         count_flops: bool = True, **techniques: Any) -> TraceResult:
    """Two training steps of ``setup`` with torchtune's model of ``config`` (``num_layers`` layers,
    ``None``: as the config says) on fake CPU tensors, the ``TorchtuneRecipe`` switches given as
    keywords (``output_chunks=8``, ``optimizer_in_bwd=True``, ...) or, with none given, read from
    the set-up's own fields (``recipe_from_setup``). Peaks count the compute
    device only; with offloading or paged states, ``notes`` give the host stand-in's peak.
    ``flops_*``: FlopCounterMode over one micro-batch (SDPA's math path, so attention is counted
    over the full s x s square as the HF oracle's eager count is)."""
    if techniques:
        recipe = TorchtuneRecipe(**techniques)
    else:
        recipe, setup = recipe_from_setup(setup)
    check_torchtune_setup(setup)
    recipe.check(setup)
    from torch._subclasses.fake_tensor import FakeTensorMode

    notes: list[str] = []
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode()
    model = torchtune_fake_model(fake_mode, config, setup, num_layers, notes)
    with fake_mode:
        memory = _trace_memory(model, fake_mode, setup, recipe, notes)
    wall = time.perf_counter() - t0
    flops = {"flops_forward": 0, "flops_backward": 0, "flops_by_module": {}, "flops_wall_s": 0.0}
    if count_flops:
        t1 = time.perf_counter()
        fwd, bwd, by_module = count_torchtune_flops(config, setup, num_layers, recipe)
        flops = {"flops_forward": fwd, "flops_backward": bwd, "flops_by_module": by_module,
                 "flops_wall_s": time.perf_counter() - t1}
    layers = num_layers if num_layers is not None else num_layers_of(config)
    return TraceResult(**memory, **flops, num_layers=layers, notes=notes, wall_s=wall)


# --------------------------------------------------------------------------- the memory trace


def _trace_memory(model, fake_mode, setup: TrainingSetup, recipe: TorchtuneRecipe, notes: list[str]) -> dict[str, Any]:
    """Inside ``fake_mode``: loss, optimizer(s), batch, two steps under the phase tracker."""
    import torch

    trainable, total = param_counts(model)
    if setup.method != "full" and trainable != adapter_param_count(model):
        raise AssertionError("trainable parameters differ from torchtune's get_adapter_params")
    loss_fn = make_loss_fn(model, recipe)
    batch = make_batch(model, setup, recipe, fake_mode)
    ignore = torch.full((setup.micro_batch, 1), IGNORE_INDEX, dtype=torch.int64)
    tracker = phase_tracker_class()(devices=("cpu",))
    with offloading_on_fake_tensors(recipe.activation_offloading), _bnb(fake_mode, setup), \
            paged_states_on_host(recipe.paged_optimizer):
        optimizers, in_bwd = _optimizers(model, setup, recipe, notes)
        ctx = _activations_ctx(model, recipe)
        tracker.track_external(model, *optimizers, *batch.values(), ignore)
        with tracker, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Module is None")
            for step in range(2):
                if step == 1:
                    tracker.phase_peaks.clear()
                    tracker.phase_peak_at.clear()
                _training_step(tracker, model, optimizers, in_bwd, loss_fn, batch, ignore, ctx, setup)
    _host_notes(tracker, recipe, notes)
    return {**peak_fields(tracker, notes), "trainable_params": trainable, "total_params": total,
            "optimizer_state_bytes": _state_bytes(optimizers)}


def _bnb(fake_mode, setup: TrainingSetup):
    return bitsandbytes_on_fake_tensors(fake_mode, setup.optimizer == "adamw-8bit")


def make_loss_fn(model, recipe: TorchtuneRecipe):
    import torch
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    if recipe.output_chunks:
        model.set_num_output_chunks(recipe.output_chunks)
        return CEWithChunkedOutputLoss(num_output_chunks=recipe.output_chunks, ignore_index=IGNORE_INDEX)
    return torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


def _optimizers(model, setup: TrainingSetup, recipe: TorchtuneRecipe, notes: list[str]) -> tuple[list, bool]:
    """The optimizer over the trainable parameters, or (``optimizer_in_bwd``) one per parameter
    with torchtune's hooks registered; the bool says which."""
    from torchtune import training

    params = [p for p in model.parameters() if p.requires_grad]

    def make(ps):
        if recipe.paged_optimizer:
            return paged_optimizer(ps, notes)
        return make_optimizer(ps, setup, notes)

    if not recipe.optimizer_in_bwd:
        return [make(params)], False
    optim_dict = {p: make([p]) for p in params}
    training.register_optim_in_bwd_hooks(model=model, optim_dict=optim_dict)
    notes.append(f"optimizer_in_bwd: {len(optim_dict)} per-parameter optimizers stepped in post-accumulate-grad hooks")
    return list(optim_dict.values()), True


def _activations_ctx(model, recipe: TorchtuneRecipe):
    from torchtune import training

    ctx = training.get_act_offloading_ctx_manager(model, recipe.activation_offloading)
    if recipe.activation_offloading:
        redirect_offloading(ctx)
    return ctx


def make_batch(model, setup: TrainingSetup, recipe: TorchtuneRecipe, fake_mode) -> dict[str, Any]:
    """``tokens`` and ``labels`` (b x s int64) and, packed, ``input_pos`` and the block-causal
    ``mask`` that torchtune's ``padded_collate_packed`` builds (in real CPU mode, then faked)."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    b, s = setup.micro_batch, setup.seq_len
    vocab = model.tok_embeddings.num_embeddings
    batch = {"tokens": torch.randint(0, vocab, (b, s)), "labels": torch.randint(0, vocab, (b, s))}
    if recipe.packed_documents:
        from torchtune.data import padded_collate_packed

        k = recipe.packed_documents
        with unset_fake_temporarily():
            packs = [{"tokens": torch.zeros(s, dtype=torch.long), "labels": torch.zeros(s, dtype=torch.long),
                      "input_pos": torch.arange(s // k).repeat(k), "seq_lens": torch.full((k,), s // k)}
                     for _ in range(b)]
            real = padded_collate_packed(packs)
        batch["input_pos"] = fake_mode.from_tensor(real["input_pos"])
        batch["mask"] = fake_mode.from_tensor(real["mask"])
    return batch


def _training_step(tracker, model, optimizers, in_bwd: bool, loss_fn, batch, ignore, ctx,
                   setup: TrainingSetup) -> None:
    """One step as the module docstring shows it, each phase marked on ``tracker``."""
    import torch
    from torchtune import training

    num_tokens = 0
    for _ in range(setup.grad_accum):
        tracker.start_phase("forward")
        inputs = dict(batch)
        labels = inputs.pop("labels")
        current_num_tokens = (labels != IGNORE_INDEX).sum()
        num_tokens = num_tokens + current_num_tokens
        tokens = inputs.pop("tokens")
        with ctx:
            logits = model(tokens, **inputs)
        labels = torch.hstack((labels[..., 1:], ignore[: labels.shape[0]]))
        if not isinstance(logits, list):
            labels = labels.reshape(-1)
            logits = logits.reshape(-1, logits.size(-1))
        loss = loss_fn(logits, labels)
        del logits
        current_loss = loss * current_num_tokens
        del loss
        tracker.start_phase("backward")
        current_loss.backward()
        del current_loss
        tracker.start_phase(None)
        tracker.reset_mod_stats()  # else MemTracker refuses a 2nd call of the root module
    tracker.start_phase("optimizer")
    if not in_bwd:
        training.scale_grads(model, 1 / num_tokens)
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
    tracker.start_phase(None)


_HOST_NOTE = "host stand-in device"


def host_peak_bytes(result: TraceResult) -> int:
    """The host stand-in device's peak (offloaded activations, paged states) that
    ``trace_torchtune_step`` reports in ``notes``; 0 when nothing went there."""
    for note in result.notes:
        if note.startswith(_HOST_NOTE):
            return int(note.split("peak: ")[1].split(" ")[0])
    return 0


def _host_notes(tracker, recipe: TorchtuneRecipe, notes: list[str]) -> None:
    what = [w for w, on in (("offloaded activations", recipe.activation_offloading),
                            ("paged optimizer states", recipe.paged_optimizer)) if on]
    if what:
        notes.append(f"{_HOST_NOTE} ({HOST_DEVICE}) peak: {tracker.device_peak(HOST_DEVICE)} bytes "
                     f"({' and '.join(what)}); not in the peaks")


def _state_bytes(optimizers) -> int:
    """Bytes of the tensors in the optimizers' states, one entry per storage."""
    import torch

    storages: dict[int, int] = {}
    for optimizer in optimizers:
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    storage = v.untyped_storage()
                    storages[id(storage)] = storage.nbytes()
    return sum(storages.values())
