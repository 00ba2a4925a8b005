"""The oracle's memory tracker: PyTorch's own ``MemTracker`` with a peak per phase of the step.

Owns ``phase_tracker_class`` (a ``torch.distributed._tools.mem_tracker.MemTracker`` subclass that
installs gradient hooks only on parameters that require grad and keeps, besides the global peak,
the peak of each phase of the step) and ``flatten_snapshot`` (a tracker snapshot as one
``{category: bytes}`` dict). The fake-tensor oracle runs it on fake tensors, the CPU runs of
calibration on real ones. torch is imported inside functions only.

What MemTracker puts in which category (``_MemRefType``; every byte is ``numel * itemsize`` of a
tensor storage, counted once per storage while it is alive; on a ``cpu`` device there is no
rounding to the CUDA allocator's 512-byte blocks and no allocator cache):

- ``Parameter``: every parameter of the model (frozen base weights included, LoRA adapters
  included), at its own dtype. Tied weights are one storage, counted once.
- ``Buffer``: registered buffers (rotary ``inv_freq``, ...).
- ``Gradient``: ``param.grad`` of trainable parameters, once the gradient hook has seen them. A
  gradient that was just allocated by a backward kernel is ``Temp`` until its hook runs, so a
  snapshot inside backward shows the newest gradient as ``Temp``: at an untied embedding's
  ``embedding_dense_backward`` the whole V x d embedding gradient is ``Temp``; with tied
  embeddings the lm_head's contribution waits in autograd's input buffer (``Temp``) until the
  embedding's arrives, and the sum is a third V x d tensor (3 x V x d x itemsize of ``Temp``).
- ``Activation``: every tensor created in the forward (and in the recompute of activation
  checkpointing in the backward): the tensors saved for backward, the logits, the loss's fp32
  upcast of the logits and its fp32 log-softmax (created in forward, so ``Activation``; the
  upcast and, when not saved, the low-precision logits are freed at the end of forward),
  autocast's bf16 copies of fp32 weights (saved by the matmuls that use them), masks, position ids.
- ``Temp``: tensors created in the backward outside a recompute: gradients of activations,
  and backward kernels' scratch.
- ``Optstate``: every tensor created inside ``optimizer.step()``: the optimizer state
  (AdamW ``exp_avg``/``exp_avg_sq`` and a 4-byte fp32 ``step`` per parameter tensor) *and* the
  step's transient scratch (foreach AdamW allocates one extra tensor the size of the gradients
  it updates at once). ``TraceResult.optimizer_state_bytes`` is the persistent part alone.
- ``Other``: ``input_ids`` and ``labels`` (int64, 2 * 8 * micro_batch * seq_len bytes).

Per-phase peaks: the tracker keeps, besides MemTracker's own global peak, the highest total seen
while ``phase`` is ``forward`` (from the first op of the model call to the loss), ``backward``
(``loss.backward()``) or ``optimizer`` (``optimizer.step()`` and ``zero_grad``), and the category
split at that moment. Each phase starts from the current total when it is entered, so a phase
whose highest point is its first instant is still right. The tracker's peak is updated after
every dispatched op (allocations only happen there), so these peaks are exact for what the
tracker sees.
"""

from __future__ import annotations

import copy

CATEGORIES: tuple[str, ...] = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")


def phase_tracker_class():
    """The MemTracker subclass of the module docstring (a class made on call: torch is imported lazily).

    ``devices``, a constructor argument (default ``None``: every device), names the device types
    whose bytes count in ``current``, ``peak`` and the phase peaks; the others are still tracked
    (``device_peak``): the torchtune oracle puts offloaded activations on a stand-in host device."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class _PhaseTracker(_trainable_grads_tracker_class()):
        """MemTracker that (1) skips frozen parameters when installing gradient hooks and
        (2) keeps the peak of each phase (``self.phase``) besides the global peak."""

        def __init__(self, devices: tuple[str, ...] | None = None) -> None:
            super().__init__()
            self.phase: str | None = None
            self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}
            self.phase_peak_at: dict[str, str] = {}
            self.devices = devices

        def current(self) -> dict[str, int]:
            return flatten_snapshot(_on_devices(self.get_tracker_snapshot("current"), self.devices))

        def peak(self) -> dict[str, int]:
            return flatten_snapshot(_on_devices(self.get_tracker_snapshot("peak"), self.devices))

        def device_peak(self, device_type: str) -> int:
            """The highest total seen on devices of ``device_type`` (0 if none was used)."""
            return sum(v for dev, v in self._peak_mem.items() if dev.type == device_type)

        def start_phase(self, phase: str | None) -> None:
            self.phase = phase
            if phase is not None:
                cur = self.current()
                if phase not in self.phase_peaks or self.phase_peaks[phase][0] < cur["Total"]:
                    self.phase_peaks[phase] = (cur["Total"], cur)
                    self.phase_peak_at[phase] = f"start of {phase}"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self._last_func = func
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _where(self) -> str:
            func = getattr(self, "_last_func", None)
            mods = sorted(self._mod_tracker.parents - {"Global"}, key=len)
            return f"{func} in {mods[-1] if mods else 'Global'}"

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            if self.phase is None:
                return
            counted = _on_devices(self._curr_mem_snap, self.devices)
            total = sum(snap[_TOTAL_KEY] for snap in counted.values())
            best = self.phase_peaks.get(self.phase)
            if best is None or total > best[0]:
                self.phase_peaks[self.phase] = (total, flatten_snapshot(counted))
                self.phase_peak_at[self.phase] = self._where()

    return _PhaseTracker


def _on_devices(snapshot: dict, devices: tuple[str, ...] | None) -> dict:
    """The part of a {device: ...} snapshot on devices of the given types (all when ``None``)."""
    if devices is None:
        return snapshot
    return {dev: snap for dev, snap in snapshot.items() if dev.type in devices}


def _trainable_grads_tracker_class():
    """MemTracker with gradient hooks on trainable parameters only (LoRA's frozen base weights
    cannot take one) and only the global peak (no per-module peaks)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class _TrainableGradsTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            # MemTracker's global peak, without its per-module peaks (unused here, and they cost a
            # walk over every module after every op)
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = copy.deepcopy(dev_snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            # MemTracker's own version, with hooks only on parameters that require grad
            def _grad_hook(grad):
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if (install_grad_hooks and param.requires_grad
                        and self._param_to_grad_hook_handles.get(param, None) is None):
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(_grad_hook),
                        # an optimizer stepped in an earlier post-accumulate hook may have freed the grad
                        param.register_post_accumulate_grad_hook(
                            lambda p: _grad_hook(p.grad) if p.grad is not None else None),
                    )
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

    return _TrainableGradsTracker


def flatten_snapshot(snapshot: dict) -> dict[str, int]:
    """MemTracker's {device: {_MemRefType|'Total': bytes}} summed over devices, keys as strings."""
    out = dict.fromkeys((*CATEGORIES, "Total"), 0)
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", key)
            out[name] = out.get(name, 0) + int(value)
    return out
