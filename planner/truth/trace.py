"""Ground truth for the analytic model: a real ``transformers`` training step on fake tensors.

The model is built from an HF ``config.json`` dict with random init (no download), its
parameters are swapped into ``FakeTensorMode`` CPU tensors (shapes and dtypes only, no data),
and two full training steps run under PyTorch's own
``torch.distributed._tools.mem_tracker.MemTracker``; FLOPs come from one forward and one
backward under ``torch.utils.flop_counter.FlopCounterMode``. No GPU, no weights.

What one step is (``grad_accum`` micro-batches, then the optimizer)::

    for _ in range(setup.grad_accum):
        with autocast (bf16-mixed only):
            loss = model(input_ids=ids, labels=labels).loss / grad_accum
        loss.backward(); del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

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

Per-phase peaks: ``_PhaseTracker`` (a MemTracker subclass) keeps, besides MemTracker's own global
peak, the highest total seen while ``phase`` is ``forward`` (from the first op of the model call to
the loss), ``backward`` (``loss.backward()``) or ``optimizer`` (``optimizer.step()`` and
``zero_grad``), and the category split at that moment. Each phase starts from the current total
when it is entered, so a phase whose highest point is its first instant is still right. The
tracker's peak is updated after every dispatched op (allocations only happen there), so these
peaks are exact for what the tracker sees.

How each set-up switch is realised:

- precision ``fp32``: fp32 weights, no autocast. ``bf16``: ``model.to(torch.bfloat16)`` (buffers
  such as rotary ``inv_freq`` too), the optimizer on bf16 parameters, states at bf16. ``bf16-mixed``:
  fp32 weights and states, ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss.
- method ``lora``: ``peft.get_peft_model`` with ``LoraConfig(r, lora_alpha=2r, target_modules=
  "all-linear" or the names given, lora_dropout)``, peft's defaults otherwise (adapters fp32 on a
  bf16 base). peft 0.21's "all-linear" also wraps MoE expert and router parameters
  (``lora.ParamWrapper``). Only parameters that require grad get MemTracker's gradient hooks.
  ``qlora``: as ``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit, nf4, double quant =
  setup.qlora_double_quant, compute dtype bf16 (fp32 for precision fp32))``: every ``nn.Linear``
  but the output head becomes ``bitsandbytes.nn.Linear4bit`` with NF4 blocks of
  ``setup.qlora_block_size``; the other parameters keep the precision's dtype (bf16), i.e. peft's
  ``prepare_model_for_kbit_training`` fp32 upcast is *not* applied; then peft's LoRA as above
  (peft's bitsandbytes layer, which clones the base output). Packed 4-bit weights are
  ``Parameter`` (uint8, half a byte per weight), the quantization constants ``Buffer``. Needs
  bitsandbytes >= 0.49 (fake-tensor kernels); see ``_quantize_4bit_weights`` and
  ``_bnb_on_fake_tensors``.
- checkpointing ``full``: transformers' ``activation_checkpointing_enable`` with
  ``use_reentrant=False`` on every decoder layer (transformers checkpoints the layer's ``forward``;
  non-reentrant checkpointing stops the recompute once the saved tensors the backward needs are
  rebuilt, so the last matmul of a layer is not recomputed). ``selective``: the same, with
  ``context_fn`` = ``create_selective_checkpoint_contexts(policy)``, the policy of
  ``_selective_policy`` (save every matmul and attention-kernel output, recompute the rest).
- attention ``sdpa`` / ``eager`` as transformers' ``attn_implementation``; a model that refuses
  SDPA (Gemma-2) is traced with eager and says so in ``notes``.
- dropout ``None``: the config's; a float: every ``*dropout*`` / ``*pdrop*`` attribute of the
  config object (class defaults included) set to it.
- optimizer: ``torch.optim.AdamW(foreach=True | fused=True | foreach=False)``, ``SGD(momentum=0.9,
  same switch)``, ``torch.optim.Adafactor(foreach=...)``, Lion from ``lion-pytorch`` (or the
  same update in ``Lion`` here when the package is absent), ``adamw-8bit`` = bitsandbytes'
  ``AdamW8bit`` (uint8 moments and one fp32 absmax per 256 values for tensors of >= 4096
  elements, fp32 moments for smaller ones, two shared 256-entry code tables, no scratch).
- MoE experts: transformers' default ``grouped_mm`` kernel at bf16; at fp32 (fp32 and bf16-mixed)
  transformers' own ``grouped_mm_fallback`` op with the same shapes (``_moe_fallback_for_non_bf16``).
- ``num_gpus > 1``, ZeRO, tensor parallelism and offload raise NotImplementedError.

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

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planner.specs.configs import _NESTED_KEYS, num_layers_of, reduce_layers

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

CATEGORIES: tuple[str, ...] = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")
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


def _apply_dropout(hf_config, p: float) -> list[str]:
    """Set every numeric dropout probability of an HF config object to ``p``.

    Every attribute whose name contains ``dropout`` or ``pdrop`` (``attention_dropout``,
    ``hidden_dropout``, ``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``, ``classifier_dropout``...)
    and holds a number, including class defaults the config.json does not spell out, and those of
    nested sub-configs (``text_config``).
    """
    changed = []
    for key, value in hf_config.to_dict().items():
        low = key.lower()
        if ("dropout" in low or "pdrop" in low) and isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(hf_config, key, p)
            changed.append(key)
    for key in _NESTED_KEYS:
        sub = getattr(hf_config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            changed += [f"{key}.{k}" for k in _apply_dropout(sub, p)]
    return changed


def _check_setup(setup: TrainingSetup) -> None:
    """Raise NotImplementedError, before torch is imported, for what one fake-tensor process cannot trace."""
    if setup.num_gpus > 1 or setup.tensor_parallel > 1 or setup.zero or setup.offload_optimizer:
        raise NotImplementedError(
            "trace runs one process on one device: it cannot shard (num_gpus>1, zero, tensor_parallel) "
            "or offload; trace the single-GPU set-up and divide the shardable parts analytically"
        )
    if setup.method == "qlora" or setup.optimizer == "adamw-8bit":
        what = "qlora" if setup.method == "qlora" else "adamw-8bit"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise NotImplementedError(
                f"{what} is traced with bitsandbytes (>= 0.49, whose ops have fake-tensor kernels); "
                "it is not installed: pip install bitsandbytes"
            ) from err
    if setup.optimizer == "adafactor" and setup.optimizer_impl == "fused":
        raise NotImplementedError("torch.optim.Adafactor has no fused implementation; use foreach or for-loop")


# --------------------------------------------------------------------------- model building


def _hf_config(config: dict, setup: TrainingSetup, num_layers: int | None, notes: list[str]):
    """The transformers config object: layers reduced, keys that would change what is built
    (quantization, remote code, dtype, attention) dropped, cache off, dropout overridden."""
    import transformers

    cfg = reduce_layers(config, num_layers) if num_layers is not None else copy.deepcopy(config)
    for key in ("quantization_config", "auto_map", "_name_or_path", "transformers_version",
                "attn_implementation", "_attn_implementation", "torch_dtype", "dtype"):
        if key in cfg:
            if key == "quantization_config":
                notes.append("dropped the config's quantization_config: the trace builds the unquantized model")
            cfg.pop(key)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError("config has no 'model_type'")
    try:
        hf = transformers.AutoConfig.for_model(model_type, **cfg)
    except ValueError as err:
        raise ValueError(f"transformers {transformers.__version__} does not know model_type {model_type!r}: {err}") from err
    hf.use_cache = False
    if setup.dropout is not None:
        changed = _apply_dropout(hf, setup.dropout)
        notes.append(f"dropout={setup.dropout} set on {', '.join(changed) or 'no config key'}")
    return hf


def _instantiate(hf_config, attention: str, experts: str | None, notes: list[str]):
    import torch
    import transformers

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": attention}
    if experts is not None:
        kwargs["experts_implementation"] = experts
    try:
        return transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
    except ValueError as err:
        text = str(err).lower()
        if attention == "sdpa" and ("sdpa" in text or "scaled_dot_product_attention" in text):
            notes.append(
                f"{hf_config.model_type}: transformers refuses SDPA ({str(err).splitlines()[0][:120]}); "
                "traced with eager attention, which stores the s x s scores and probabilities"
            )
            kwargs["attn_implementation"] = "eager"
            return transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        raise


def _selective_policy():
    """The op-level selective-checkpointing policy (torchtitan's 'op' SAC, all matmuls saved).

    SAVED (``CheckpointPolicy.MUST_SAVE``): the outputs of ``aten.mm``, ``aten.addmm``,
    ``aten.bmm``, ``aten.baddbmm``, ``aten._grouped_mm`` (MoE experts) and of the fused attention
    kernels ``aten._scaled_dot_product_{flash_attention, flash_attention_for_cpu,
    efficient_attention, cudnn_attention, fused_attention_overrideable}``,
    ``aten._flash_attention_forward``, ``aten._efficient_attention_forward``.
    RECOMPUTED (``PREFER_RECOMPUTE``): every other op (norms, activations, rotary, casts, softmax of
    eager attention, dropout masks are replayed by the checkpoint's RNG state).
    torchtitan's own policy differs in two details: it recomputes every second ``aten.mm`` and saves
    ``aten.max``; this one saves every matmul, as the planner's 'selective' means.
    """
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten._grouped_mm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_fused_attention_overrideable.default,
        aten._flash_attention_forward.default,
        aten._efficient_attention_forward.default,
    }

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _enable_checkpointing(model, mode: str) -> None:
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
    elif mode != "full":
        raise ValueError(f"unknown checkpointing {mode!r}; accepted: none, full, selective")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def _apply_lora(model, setup: TrainingSetup):
    import peft

    targets = "all-linear" if tuple(setup.lora_targets) == ("all-linear",) else list(setup.lora_targets)
    lora = peft.LoraConfig(
        r=setup.lora_rank,
        lora_alpha=2 * setup.lora_rank,
        target_modules=targets,
        lora_dropout=setup.lora_dropout,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5.23 for the deprecated `is_gradient_checkpointing`; on MoE
        # models its own default rank pattern names gate_up_proj, which fused experts lack; GPT-2's
        # Conv1D makes it switch fan_in_fan_out by itself
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*pattern keys did not match.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
        return peft.get_peft_model(model, lora)


def _lora_notes(model) -> list[str]:
    wrapped = sorted({type(m.get_base_layer()).__name__ for m in model.modules()
                      if type(m).__name__ == "ParamWrapper"})
    if not wrapped:
        return []
    return [f"peft wrapped non-Linear parameters with lora.ParamWrapper ({', '.join(wrapped)}): "
            "per-expert adapters; in a bf16 model its forward materialises W + BA for every expert"]


def _build(config: dict, setup: TrainingSetup, num_layers: int | None, *, attention: str,
           experts: str | None, notes: list[str]):
    """Build the training model (dtype, checkpointing, LoRA) on the current default device."""
    import torch

    hf = _hf_config(config, setup, num_layers, notes)
    model = _instantiate(hf, attention, experts, notes)
    if setup.precision == "bf16":
        model.to(torch.bfloat16)
    if setup.method == "qlora":
        _replace_linears_with_4bit(model, setup)
    _enable_checkpointing(model, setup.checkpointing)
    if setup.method in ("lora", "qlora"):
        model = _apply_lora(model, setup)
    model.train()
    return model


def _qlora_compute_dtype(setup: TrainingSetup):
    import torch

    return torch.float32 if setup.precision == "fp32" else torch.bfloat16


def _replace_linears_with_4bit(model, setup: TrainingSetup) -> None:
    """What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=bf16))`` does
    to the modules: every ``nn.Linear`` but the output head becomes ``bnb.nn.Linear4bit``
    (MoE experts stored as 3-D parameters stay unquantized, as in transformers). The weights are
    quantized when the model is moved into fake tensors (``_to_fake``). peft's
    ``prepare_model_for_kbit_training`` (fp32 upcast of the other parameters) is not applied."""
    import bitsandbytes as bnb
    import torch

    head = model.get_output_embeddings()
    compute = _qlora_compute_dtype(setup)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            new = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute,
                compress_statistics=setup.qlora_double_quant, quant_type="nf4", quant_storage=torch.uint8,
                device=child.weight.device,
            )
            new.weight.blocksize = setup.qlora_block_size
            new.weight.requires_grad_(False)
            if child.bias is not None:
                new.bias = torch.nn.Parameter(torch.empty_like(child.bias), requires_grad=False)
            setattr(parent, name, new)
    model.is_loaded_in_4bit = True  # what peft reads to dispatch its bitsandbytes LoRA layer


def build_model(config: dict, setup: TrainingSetup, num_layers: int | None = None, device: Any = "cpu"):
    """The training model of ``setup`` built from ``config`` with random weights on ``device``.

    ``device`` is a torch device (``"cpu"``, ``"cuda"``) for real runs, ``"meta"`` for shapes only.
    Precision: ``bf16`` casts weights to bfloat16; ``fp32`` and ``bf16-mixed`` keep fp32 weights
    (autocast is the caller's). LoRA adapters are peft's defaults (fp32, kaiming/zero init).
    Checkpointing is enabled as ``setup`` says. The model is in training mode.
    """
    import torch

    _check_setup(setup)
    notes: list[str] = []
    with torch.device(device):
        model = _build(config, setup, num_layers, attention=setup.attention, experts=None, notes=notes)
    if setup.method == "qlora" and torch.device(device).type != "meta":
        model.to(device)  # bitsandbytes quantizes a Params4bit when it is moved to a device
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


def _needs_bnb(setup: TrainingSetup) -> bool:
    return setup.method == "qlora" or setup.optimizer == "adamw-8bit"


def _bnb_on_fake_tensors(fake_mode, needed: bool = True):
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


def _param_counts(model) -> tuple[int, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------- optimizers


def _make_optimizer(params, setup: TrainingSetup, notes: list[str]):
    import torch

    impl = setup.optimizer_impl
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[impl]
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **flags)
    if setup.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2, foreach=(impl == "foreach"))
    if setup.optimizer == "adamw-8bit":
        import bitsandbytes as bnb

        notes.append("adamw-8bit: bitsandbytes AdamW8bit (blockwise 8-bit moments for tensors of >= 4096 "
                     "elements, fp32 moments below; optimizer_impl ignored)")
        return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01)
    if setup.optimizer == "lion":
        try:
            from lion_pytorch import Lion

            notes.append("lion: lion-pytorch's Lion (per-parameter loop; optimizer_impl ignored)")
            return Lion(params, lr=1e-4, weight_decay=0.01)
        except ImportError:
            notes.append("lion: lion-pytorch not installed; planner.truth.trace.Lion (same per-parameter update)")
            return Lion(params, lr=1e-4, weight_decay=0.01)
    raise NotImplementedError(f"optimizer {setup.optimizer!r} cannot be traced")


def _lion_class():
    import torch

    class _Lion(torch.optim.Optimizer):
        """Lion (Chen et al. 2023, arXiv:2302.06675), the update of lion-pytorch 0.2.5.

        State: one ``exp_avg`` per parameter, at the parameter's dtype. Per parameter::

            p *= 1 - lr * wd
            update = sign(beta1 * exp_avg + (1 - beta1) * grad)     # one param-sized temporary
            p -= lr * update
            exp_avg = beta2 * exp_avg + (1 - beta2) * grad
        """

        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
            super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p)
                    exp_avg = state["exp_avg"]
                    p.mul_(1 - lr * wd)
                    update = exp_avg.clone().mul_(beta1).add(p.grad, alpha=1 - beta1).sgn_()
                    p.add_(update, alpha=-lr)
                    exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
            return None

    return _Lion


def Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):  # noqa: N802 - mirrors a class name
    """A minimal Lion optimizer (lion-pytorch's update) for when lion-pytorch is absent."""
    return _lion_class()(params, lr=lr, betas=betas, weight_decay=weight_decay)


# --------------------------------------------------------------------------- memory tracking


def _phase_tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class _PhaseTracker(MemTracker):
        """MemTracker that (1) skips frozen parameters when installing gradient hooks and
        (2) keeps the peak of each phase (``self.phase``) besides the global peak."""

        def __init__(self) -> None:
            super().__init__()
            self.phase: str | None = None
            self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}
            self.phase_peak_at: dict[str, str] = {}

        def current(self) -> dict[str, int]:
            return _flatten(self.get_tracker_snapshot("current"))

        def peak(self) -> dict[str, int]:
            return _flatten(self.get_tracker_snapshot("peak"))

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
            # MemTracker's global peak, without its per-module peaks (unused here, and they cost a
            # walk over every module after every op)
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = copy.deepcopy(dev_snap)
            if self.phase is None:
                return
            total = sum(snap[_TOTAL_KEY] for snap in self._curr_mem_snap.values())
            best = self.phase_peaks.get(self.phase)
            if best is None or total > best[0]:
                self.phase_peaks[self.phase] = (total, _flatten(self._curr_mem_snap))
                self.phase_peak_at[self.phase] = self._where()

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
                        param.register_post_accumulate_grad_hook(lambda p: _grad_hook(p.grad)),
                    )
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

    return _PhaseTracker


def _flatten(snapshot: dict) -> dict[str, int]:
    """MemTracker's {device: {_MemRefType|'Total': bytes}} summed over devices, keys as strings."""
    out = dict.fromkeys((*CATEGORIES, "Total"), 0)
    for dev_snap in snapshot.values():
        for key, value in dev_snap.items():
            name = getattr(key, "value", key)
            out[name] = out.get(name, 0) + int(value)
    return out


def _moe_fallback_for_non_bf16():
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


def _fake_item():
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


def _autocast(setup: TrainingSetup):
    import contextlib

    import torch

    if setup.precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fake_model(fake_mode, config, setup, num_layers, *, attention, experts, notes):
    """Build on meta outside the fake mode (peft's and ``Module.to``'s parameter swaps fail under
    FakeTensorMode), then swap every tensor into a fake CPU tensor of ``fake_mode``."""
    import torch

    with torch.device("meta"):
        model = _build(config, setup, num_layers, attention=attention, experts=experts, notes=notes)
    with fake_mode, _bnb_on_fake_tensors(fake_mode, _needs_bnb(setup)):
        _to_fake(model)
    return model


def trace_training_step(config: dict, setup: TrainingSetup, num_layers: int | None = None,
                        *, count_flops: bool = True) -> TraceResult:
    """Two training steps of ``setup`` on the model of ``config`` (``num_layers`` decoder layers,
    ``None``: as the config says) on fake CPU tensors; see the module docstring for what is
    measured. ``count_flops=False`` skips the FLOP count (flops fields are then 0)."""
    _check_setup(setup)
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    notes: list[str] = []
    layers = num_layers if num_layers is not None else num_layers_of(config)
    b, s = setup.micro_batch, setup.seq_len
    t0 = time.perf_counter()
    fake_mode = FakeTensorMode()
    model = _fake_model(fake_mode, config, setup, num_layers, attention=setup.attention, experts=None, notes=notes)
    with fake_mode:
        vocab = model.get_input_embeddings().num_embeddings
        trainable, total = _param_counts(model)
        if setup.method in ("lora", "qlora"):
            notes += _lora_notes(model)
        params = [p for p in model.parameters() if p.requires_grad]
        with _bnb_on_fake_tensors(fake_mode, _needs_bnb(setup)):
            optimizer = _make_optimizer(params, setup, notes)
        ids = torch.randint(0, vocab, (b, s), dtype=torch.int64)
        labels = torch.randint(0, vocab, (b, s), dtype=torch.int64)
        tracker = _phase_tracker_class()()
        tracker.track_external(model, optimizer, ids, labels)
        moe = _has_experts(model)
        if moe and setup.precision != "bf16":
            notes.append("MoE experts at fp32: traced with transformers' grouped_mm_fallback op "
                         "(torch._grouped_mm's CPU fake kernel takes bf16 only); same shapes and saved tensors")
        if setup.optimizer == "adafactor":
            notes.append("adafactor: Tensor.item() of a fake tensor returns 1.0 (torch's Adafactor reads the "
                         "parameter RMS as a Python float; it scales the update, no tensor depends on it)")
        with tracker, _moe_fallback_for_non_bf16(), _fake_item(), \
                _bnb_on_fake_tensors(fake_mode, _needs_bnb(setup)), \
                warnings.catch_warnings():
            # MemTracker warns when a module's backward hook fires after the module is gone
            warnings.filterwarnings("ignore", message="Module is None")
            for step in range(2):
                if step == 1:
                    tracker.phase_peaks.clear()
                    tracker.phase_peak_at.clear()
                for _ in range(setup.grad_accum):
                    tracker.start_phase("forward")
                    with _autocast(setup):
                        loss = model(input_ids=ids, labels=labels).loss
                    if setup.grad_accum > 1:
                        loss = loss / setup.grad_accum
                    tracker.start_phase("backward")
                    loss.backward()
                    del loss
                    tracker.start_phase(None)
                    tracker.reset_mod_stats()  # else MemTracker refuses a 2nd call of the root module
                tracker.start_phase("optimizer")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.start_phase(None)
        peak = tracker.peak()
        phase = {p: tracker.phase_peaks[p][1] for p in PHASES}
        if peak["Total"] > max(v["Total"] for v in phase.values()):
            notes.append("the peak of the two steps is in step 1, above every phase of step 2")
        phase_at = dict(tracker.phase_peak_at)
        storages = {}  # one entry per storage: bitsandbytes shares its code tables between tensors
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    storage = v.untyped_storage()
                    storages[id(storage)] = storage.nbytes()
        opt_state = sum(storages.values())
    wall = time.perf_counter() - t0
    if count_flops:
        t1 = time.perf_counter()
        fwd, bwd, by_module, fnotes = _count_flops(config, setup, num_layers)
        flops_wall = time.perf_counter() - t1
        notes += [n for n in fnotes if n not in notes]
    else:
        fwd = bwd = 0
        by_module = {}
        flops_wall = 0.0
    return TraceResult(
        peak_bytes=peak["Total"],
        peak_by_category={c: peak[c] for c in CATEGORIES},
        phase_peak_bytes={p: phase[p]["Total"] for p in PHASES},
        phase_peak_by_category={p: {c: phase[p][c] for c in CATEGORIES} for p in PHASES},
        flops_forward=fwd,
        flops_backward=bwd,
        flops_by_module=by_module,
        trainable_params=trainable,
        total_params=total,
        num_layers=layers,
        notes=notes,
        optimizer_state_bytes=opt_state,
        wall_s=wall,
        flops_wall_s=flops_wall,
        phase_peak_at=phase_at,
    )


# --------------------------------------------------------------------------- FLOPs


def trace_flops(config: dict, setup: TrainingSetup, num_layers: int | None = None) -> tuple[int, int, dict[str, int]]:
    """(forward FLOPs, backward FLOPs, forward+backward FLOPs per component) of one micro-batch.

    Counted by FlopCounterMode (matmuls, convolutions, attention kernels; elementwise ops count 0)
    with eager attention, whatever ``setup.attention`` says, and for mixture-of-experts models with
    transformers' ``batched_mm`` experts kernel (per-token ``bmm`` over the top-k experts, which
    FlopCounterMode counts; the default ``grouped_mm`` counts 0). Precision does not change the count.
    """
    fwd, bwd, by_module, _ = _count_flops(config, setup, num_layers)
    return fwd, bwd, by_module


_COMPONENT_KEY = "planner_component"


def _count_flops(config, setup, num_layers):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    _check_setup(setup)
    notes: list[str] = []
    if setup.method == "qlora":
        notes.append("qlora: FLOPs counted on the same model with bf16 LoRA layers (FlopCounterMode does not "
                     "count bitsandbytes' gemm_4bit; the matmul shapes are those of LoRA)")
        setup = setup.model_copy(update={"method": "lora"})
    if setup.optimizer == "adamw-8bit":
        setup = setup.model_copy(update={"optimizer": "adamw"})  # the optimizer does not change FLOPs
    b, s = setup.micro_batch, setup.seq_len
    fake_mode = FakeTensorMode()
    model = _fake_model(fake_mode, config, setup, num_layers, attention="eager", experts="batched_mm", notes=notes)
    if _has_experts(model):
        notes.append("MoE: FLOPs counted with experts_implementation='batched_mm' (bmm over the "
                     "top-k experts of each token); memory traced with transformers' default grouped_mm")
    components = _components(model)
    counter_cls, tag_mode_cls, stack = _attributing_counter(components)
    handles = []
    for fqn in components:
        module = model.get_submodule(fqn)
        handles.append(module.register_forward_pre_hook(lambda m, a, fqn=fqn: stack.append(fqn)))
        handles.append(module.register_forward_hook(lambda m, a, o, fqn=fqn: _pop(stack, fqn)))
    try:
        with fake_mode:
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.randint(0, vocab, (b, s), dtype=torch.int64)
            counter = counter_cls(display=False)
            with counter:
                with tag_mode_cls(), _autocast(setup):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
    fwd = sum(v for (phase, _), v in counter.by_component.items() if phase == "forward")
    total = counter.get_total_flops()
    by_module: dict[str, int] = {}
    for (_, comp), v in counter.by_component.items():
        if v:
            by_module[_short(comp)] = by_module.get(_short(comp), 0) + v
    by_module.setdefault("other", 0)
    return fwd, total - fwd, by_module, notes


def _pop(stack: list[str], fqn: str) -> None:
    while stack and stack.pop() != fqn:
        pass


def _attributing_counter(components):
    """A FlopCounterMode that also books each op's FLOPs to (phase, component).

    Forward ops (no autograd node running) go to the innermost component module being called
    (forward hooks keep a stack). A TorchFunctionMode, active in the forward, tags every autograd
    node created inside a component with that component's name (``node.metadata``); a backward op
    goes to the component of the autograd node that runs it. Recomputed ops of activation
    checkpointing run inside the backward of the node whose saved tensor they rebuild and go to
    that node's component (the same decoder layer).
    """
    from collections import defaultdict

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    stack: list[str] = []

    class _Counter(FlopCounterMode):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.by_component: dict[tuple[str, str], int] = defaultdict(int)

        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                node = torch._C._current_autograd_node()
                if node is None:
                    key = ("forward", stack[-1] if stack else "other")
                else:
                    key = ("backward", node.metadata.get(_COMPONENT_KEY, "other"))
                self.by_component[key] += flops
                for par in set(self.mod_tracker.parents):
                    self.flop_counts[par][func_packet] += flops
            return out

    class _Tag(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch._C._current_autograd_node() is None:
                name = stack[-1] if stack else "other"
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        _tag_new_nodes(t.grad_fn, name)
            return out

    return _Counter, _Tag, stack


def _tag_new_nodes(node, name: str) -> None:
    """Tag ``node`` and its untagged ancestors: exactly the nodes the last call created."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n is None or _COMPONENT_KEY in n.metadata:
            continue
        n.metadata[_COMPONENT_KEY] = name
        todo.extend(nxt for nxt, _ in n.next_functions)


def _has_experts(model) -> bool:
    return any(hasattr(m, "_is_expert_parallel") for m in model.modules())


def _components(model) -> list[str]:
    """The model's components for ``flops_by_module``.

    The direct children of each decoder layer (``model.layers.0.self_attn``, ...) and, on the path
    from the root to the decoder-layer list (the ModuleList with the most parameters), every
    sibling module (``model.embed_tokens``, ``model.norm``, ``lm_head``).
    """
    import torch

    layers_fqn, best = None, -1
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            size = sum(p.numel() for p in m.parameters())
            if size > best:
                layers_fqn, best = fqn, size
    components: list[str] = []
    if layers_fqn is None:
        return components
    layers = model.get_submodule(layers_fqn)
    for i, layer in enumerate(layers):
        components += [f"{layers_fqn}.{i}.{name}" for name, _ in layer.named_children()]
    parts = layers_fqn.split(".")
    for depth in range(len(parts)):
        parent_fqn = ".".join(parts[:depth])
        parent = model.get_submodule(parent_fqn) if parent_fqn else model
        for name, _ in parent.named_children():
            if name != parts[depth]:
                components.append(f"{parent_fqn}.{name}" if parent_fqn else name)
    return components


def _short(fqn: str) -> str:
    for prefix in ("base_model.model.",):
        if fqn.startswith(prefix):
            return fqn[len(prefix):]
    return fqn
