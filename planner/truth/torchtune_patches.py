"""Stand-ins that let torchtune's CUDA-only memory techniques run on fake CPU tensors.

Owns ``offloading_on_fake_tensors`` (torchtune's ``OffloadActivations`` run unchanged, its CUDA
streams replaced by no-op objects and its two device moves redirected: the offloaded copy goes to
``HOST_DEVICE``, the copy brought back in the backward to the compute device ``cpu``) and
``paged_optimizer`` (bitsandbytes' ``PagedAdamW8bit`` whose paged state buffers, CUDA managed
memory outside PyTorch's allocator, are allocated on ``HOST_DEVICE``). The host stand-in is the
``meta`` device: a fake tensor there has a size and no data, and MemTracker books it on its own
device, so the compute device's peak excludes it and ``device_peak("meta")`` reports it.
torch, torchtune and bitsandbytes are imported inside functions only.

What the stand-ins change, and what they do not:

- Offloading: ``pack_tensor`` (forward) copies each saved tensor of >= 1024 bytes that is not a
  parameter into a host tensor and keeps the compute-device tensor alive in a stash of the last
  ``max_fwd_stash_size = 5`` offloaded tensors (streams mode, the recipe's default), so it is freed
  once nothing else holds it; ``unpack_tensor`` (backward) brings it back as a new compute-device
  tensor (``Temp``), freed after the autograd node that used it. Stream synchronisation
  (events, ``wait_stream``, ``record_stream``) only orders work in time: on one fake device it is a
  no-op, so what the trace shows is the memory of a perfectly overlapped transfer.
- Paged states: bitsandbytes allocates a state buffer of >= 1e5 elements with
  ``cudaMallocManaged`` (``F.get_paged``), which ``torch.cuda.memory_allocated`` never counts and
  the driver may evict to host memory under pressure. Smaller states stay ordinary tensors.
"""

from __future__ import annotations

import contextlib

HOST_DEVICE = "meta"


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream`` and its events."""

    def wait_stream(self, *args, **kwargs) -> None:
        return None

    def wait_event(self, *args, **kwargs) -> None:
        return None

    def record_event(self, *args, **kwargs) -> _NoOpStream:
        return self


@contextlib.contextmanager
def offloading_on_fake_tensors(enabled: bool = True):
    """Let ``torchtune.training.OffloadActivations`` be built and run on fake CPU tensors: CUDA
    streams become no-op objects while this is active; ``redirect_offloading`` (on the built
    context manager) redirects its device moves. A no-op when ``enabled`` is false."""
    if not enabled:
        yield
        return
    import torch

    saved = {name: getattr(torch.cuda, name) for name in ("default_stream", "Stream", "stream")}
    record_stream = torch.Tensor.record_stream
    torch.cuda.default_stream = lambda *a, **k: _NoOpStream()
    torch.cuda.Stream = _NoOpStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, stream: None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
        torch.Tensor.record_stream = record_stream


def redirect_offloading(ctx) -> None:
    """Wrap the pack and unpack hooks of an ``OffloadActivations`` (a ``saved_tensors_hooks``, not
    yet entered): during a pack, ``torch.empty_like(..., pin_memory=...)`` (the host copy) makes a
    ``HOST_DEVICE`` tensor; during an unpack, ``Tensor.to("cuda")`` goes to ``cpu``. The patches
    live only inside the hook calls (a global ``Tensor.to`` patch breaks torchao's NF4 tensor,
    whose ``__torch_function__`` is keyed on the original method)."""
    import torch

    pack, unpack = ctx.pack_hook, ctx.unpack_hook
    empty_like, to = torch.empty_like, torch.Tensor.to

    def host_empty_like(*args, **kwargs):
        if "pin_memory" in kwargs:
            kwargs.update(device=HOST_DEVICE, pin_memory=False)
        return empty_like(*args, **kwargs)

    def to_device(self, *args, **kwargs):
        if args and args[0] == "cuda":
            args = ("cpu", *args[1:])
        return to(self, *args, **kwargs)

    def pack_hook(tensor):
        torch.empty_like = host_empty_like
        try:
            return pack(tensor)
        finally:
            torch.empty_like = empty_like

    def unpack_hook(tensor_id):
        torch.Tensor.to = to_device
        try:
            return unpack(tensor_id)
        finally:
            torch.Tensor.to = to

    ctx.pack_hook, ctx.unpack_hook = pack_hook, unpack_hook


@contextlib.contextmanager
def paged_states_on_host(enabled: bool = True):
    """Let bitsandbytes' 8-bit update take state buffers on ``HOST_DEVICE`` beside a parameter on
    the compute device (its ``is_on_gpu`` check refuses mixed devices)."""
    if not enabled:
        yield
        return
    import bitsandbytes.functional as bnb_f

    original = bnb_f.is_on_gpu
    bnb_f.is_on_gpu = lambda tensors: True
    try:
        yield
    finally:
        bnb_f.is_on_gpu = original


def paged_optimizer(params, notes: list[str]):
    """bitsandbytes' ``PagedAdamW8bit`` over ``params`` (the torchtune full single-device configs'
    optimizer, ``lr`` as there), its paged state buffers on ``HOST_DEVICE``."""
    import bitsandbytes as bnb
    import torch

    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-5)

    def get_state_buffer(p, dtype=torch.float32):
        device = HOST_DEVICE if p.numel() >= 1e5 else p.device
        return torch.zeros_like(p, dtype=dtype, device=device)

    optimizer.get_state_buffer = get_state_buffer
    note = ("paged_optimizer: bitsandbytes PagedAdamW8bit; states of >= 1e5 elements in CUDA managed memory "
            f"(outside PyTorch's allocator), traced on the host stand-in ({HOST_DEVICE})")
    if note not in notes:
        notes.append(note)
    return optimizer
