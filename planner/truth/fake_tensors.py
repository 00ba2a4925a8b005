"""Running the training model on fake tensors: shapes and dtypes, no data, no GPU.

Owns moving a built model into ``FakeTensorMode`` (``fake_model``: built on meta, then every
parameter and buffer swapped for a fake CPU tensor, tied weights kept tied, QLoRA's weights NF4-
quantized on the way) and the few patches that let real code run on fake tensors as it would on a
GPU: bitsandbytes' code tables and 4-bit matmul (``bitsandbytes_on_fake_tensors``), MoE experts
at fp32 (``moe_fallback_for_non_bf16``) and Adafactor's ``Tensor.item()`` (``fake_item``). Each
patch is a context manager that restores what it replaced. torch, transformers and bitsandbytes
are imported inside functions only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.truth.training_model import build_training_model

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup


def fake_model(fake_mode, config, setup, num_layers, *, attention, experts, notes):
    """Build on meta outside the fake mode (peft's and ``Module.to``'s parameter swaps fail under
    FakeTensorMode), then swap every tensor into a fake CPU tensor of ``fake_mode``."""
    import torch

    with torch.device("meta"):
        model = build_training_model(config, setup, num_layers, attention=attention, experts=experts, notes=notes)
    with fake_mode, bitsandbytes_on_fake_tensors(fake_mode, needs_bitsandbytes(setup)):
        _to_fake(model)
    return model


def _to_fake(model) -> None:
    """Replace every parameter and buffer by an uninitialised CPU tensor of the active fake mode.

    Tied weights stay tied: one replacement per original tensor object.
    """
    import torch

    memo: dict[int, Any] = {}
    _quantize_4bit_weights(model, memo)
    done = {id(t) for t in memo.values()}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in done:
                continue
            if id(p) not in memo:
                new = torch.empty(p.shape, dtype=p.dtype, device="cpu")
                memo[id(p)] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is None or name.startswith("nf4_constant_"):
                continue
            if id(b) not in memo:
                memo[id(b)] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")
            module._buffers[name] = memo[id(b)]


# --------------------------------------------------------------------------- bitsandbytes


def needs_bitsandbytes(setup: TrainingSetup) -> bool:
    return setup.method == "qlora" or setup.optimizer == "adamw-8bit"


def _quantize_4bit_weights(model, memo: dict[int, Any]) -> None:
    """NF4-quantize (fake) the weight of every ``bnb.nn.Linear4bit`` of ``model``.

    The packed weight (uint8, ``out * in / 2`` bytes) becomes a frozen plain parameter carrying
    the attributes bitsandbytes reads (``quant_state``, ``quant_type``, ...); ``Params4bit`` itself
    cannot wrap a fake tensor. The quantization constants (absmax per block, and with double
    quantization its 8-bit form plus one fp32 absmax per 256 blocks, the code tables) are registered
    as non-persistent buffers so that MemTracker counts them (category ``Buffer``).
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    import bitsandbytes.functional as bnb_f
    import torch

    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        old = module.weight
        if id(old) in memo:
            continue
        dense = torch.empty(old.shape, dtype=module.compute_dtype or torch.bfloat16, device="cpu")
        packed, state = bnb_f.quantize_4bit(
            dense, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=torch.uint8,
        )
        weight = torch.nn.Parameter(packed, requires_grad=False)
        for attr in ("quant_type", "compress_statistics", "blocksize", "quant_storage"):
            setattr(weight, attr, getattr(old, attr))
        weight.quant_state = state
        weight.bnb_quantized = True
        module._parameters["weight"] = weight
        module.quant_state = state
        constants = [state.absmax, state.code]
        if state.nested:
            constants += [state.offset, state.state2.absmax, state.state2.code]
        for i, t in enumerate(constants):
            module.register_buffer(f"nf4_constant_{i}", t, persistent=False)
        memo[id(old)] = weight


def bitsandbytes_on_fake_tensors(fake_mode, needed: bool = True):
    """Two adjustments that let bitsandbytes run, as it would on a GPU, on fake tensors.

    1. bitsandbytes builds its 8-bit code tables with ``.tolist()``, which a fake tensor cannot do:
       they are built for real (outside the fake mode) and handed out as fake copies.
    2. ``gemm_4bit`` (the forward of a 4-bit linear) is run as bitsandbytes' own default
       implementation, dequantize then ``F.linear``, which is what its CUDA kernel does for more
       than 1536 rows (tokens): the transient dequantized weight (``out x in`` at the compute
       dtype) then shows in the trace; the op's fake kernel would hide it.
    """
    import contextlib
    import types

    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    @contextlib.contextmanager
    def patched():
        if not needed:
            yield
            return
        import bitsandbytes.functional as bnb_f

        with unset_fake_temporarily():
            real = {signed: bnb_f.create_dynamic_map(signed=signed) for signed in (True, False)}
        original = bnb_f.create_dynamic_map
        saved = dict(bnb_f.name2qmap)

        def fake_map(signed=True, max_exponent_bits=7, total_bits=8):
            if max_exponent_bits != 7 or total_bits != 8:
                return original(signed, max_exponent_bits, total_bits)
            return fake_mode.from_tensor(real[signed])

        bnb_f.create_dynamic_map = fake_map
        bnb_f.name2qmap["dynamic"] = fake_mode.from_tensor(real[True])
        namespace = torch.ops.bitsandbytes
        gemm_op = namespace.gemm_4bit
        from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

        namespace.gemm_4bit = types.SimpleNamespace(default=_gemm_4bit_default_impl)
        try:
            yield
        finally:
            namespace.gemm_4bit = gemm_op
            bnb_f.create_dynamic_map = original
            bnb_f.name2qmap.clear()
            bnb_f.name2qmap.update(saved)

    return patched()


# --------------------------------------------------------------------------- other kernels


def moe_fallback_for_non_bf16():
    """Let transformers' MoE experts run their ``grouped_mm_fallback`` custom op when the expert
    weights are not bf16.

    On CPU, ``torch._grouped_mm``'s fake-tensor implementation accepts bf16 only, so fp32 experts
    (precision fp32, and bf16-mixed, where transformers casts the expert input to the fp32 weight
    dtype because grouped_mm is not autocast-enabled) cannot run it. transformers' fallback op
    (``torch.ops.transformers.grouped_mm_fallback``) has the same inputs, output shape and saved
    tensors (input and weight) and a fake implementation for every dtype.
    """
    import contextlib

    import torch

    @contextlib.contextmanager
    def patched():
        try:
            from transformers.integrations import moe
        except ImportError:  # pragma: no cover - older transformers
            yield False
            return
        original = moe._can_use_grouped_mm

        def can_use(input, weight, offs):
            return weight.dtype == torch.bfloat16 and original(input, weight, offs)

        moe._can_use_grouped_mm = can_use
        try:
            yield True
        finally:
            moe._can_use_grouped_mm = original

    return patched()


def fake_item():
    """Make ``Tensor.item()`` of a fake tensor return 1 instead of raising.

    torch.optim.Adafactor computes ``param.norm(2).item()`` to scale its step; a fake tensor has no
    value. The scalar only scales the update: no tensor's size or lifetime depends on it.
    """
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    @contextlib.contextmanager
    def patched():
        original = torch.Tensor.item

        def item(self):
            if isinstance(self, FakeTensor):
                return False if self.dtype == torch.bool else (1.0 if self.is_floating_point() else 1)
            return original(self)

        torch.Tensor.item = item
        try:
            yield
        finally:
            torch.Tensor.item = original

    return patched()
