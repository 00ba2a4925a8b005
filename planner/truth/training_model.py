"""The training model of a set-up, built from an HF ``config.json`` dict with random weights.

Owns building the model a traced or profiled step trains (``build_model`` for real runs,
``build_training_model`` on whatever default device the caller chose, meta for the fake-tensor
oracle): the transformers config (layers reduced, dropout overridden), the attention kernel,
precision, QLoRA's 4-bit linears, activation checkpointing and peft's LoRA; the check of what one
process can trace; and small facts read off a built model (parameter counts, experts, LoRA notes)
and the autocast of ``bf16-mixed``. torch, transformers, peft and bitsandbytes are imported
inside functions only.

How each set-up switch is realised:

- precision ``fp32``: fp32 weights, no autocast. ``bf16``: ``model.to(torch.bfloat16)`` (buffers
  such as rotary ``inv_freq`` too), the optimizer on bf16 parameters, states at bf16. ``bf16-mixed``:
  fp32 weights and states, ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss.
- method ``lora``: ``peft.get_peft_model`` with ``LoraConfig(r, lora_alpha=2r, target_modules=
  "all-linear" or the names given, lora_dropout)``, peft's defaults otherwise (adapters fp32 on a
  bf16 base). peft 0.21's "all-linear" also wraps the router and stacked expert parameters
  (``lora.ParamWrapper``) of the MoE model types it converts (Mixtral, Qwen3-MoE, ...; not Qwen2-MoE:
  ``planner.specs.architecture.PEFT_MOE_CONVERTED``). Only parameters that require grad get MemTracker's gradient hooks.
  ``qlora``: as ``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit, nf4, double quant =
  setup.qlora_double_quant, compute dtype bf16 (fp32 for precision fp32))``: every ``nn.Linear``
  but the output head becomes ``bitsandbytes.nn.Linear4bit`` with NF4 blocks of
  ``setup.qlora_block_size``; the other parameters keep the precision's dtype (bf16) unless
  ``kbit_preparation`` runs peft's own ``prepare_model_for_kbit_training`` (fp32 upcast of every
  parameter that is not 4-bit); then peft's LoRA as above
  (peft's bitsandbytes layer, which clones the base output). Packed 4-bit weights are
  ``Parameter`` (uint8, half a byte per weight), the quantization constants ``Buffer``. Needs
  bitsandbytes >= 0.49 (fake-tensor kernels); see ``planner.truth.fake_tensors``.
- checkpointing ``full``: transformers' ``activation_checkpointing_enable`` with
  ``use_reentrant=False`` on every decoder layer (transformers checkpoints the layer's ``forward``;
  non-reentrant checkpointing stops the recompute once the saved tensors the backward needs are
  rebuilt, so the last matmul of a layer is not recomputed). ``selective``: the same, with
  ``context_fn`` = ``create_selective_checkpoint_contexts(policy)``, the policy of
  ``_selective_policy`` (save every matmul and attention-kernel output, recompute the rest).
- attention ``sdpa`` / ``eager`` as transformers' ``attn_implementation``; a model that refuses
  SDPA (Gemma-2) is built with eager and says so in ``notes``.
- dropout ``None``: the config's; a float: every ``*dropout*`` / ``*pdrop*`` attribute of the
  config object (class defaults included) set to it.
- ``num_gpus > 1``, ZeRO, tensor parallelism and offload raise NotImplementedError.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

from planner.specs.configs import _NESTED_KEYS, reduce_layers

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup


def build_model(config: dict, setup: TrainingSetup, num_layers: int | None = None, device: Any = "cpu"):
    """The training model of ``setup`` built from ``config`` with random weights on ``device``.

    ``device`` is a torch device (``"cpu"``, ``"cuda"``) for real runs, ``"meta"`` for shapes only.
    Precision: ``bf16`` casts weights to bfloat16; ``fp32`` and ``bf16-mixed`` keep fp32 weights
    (autocast is the caller's). LoRA adapters are peft's defaults (fp32, kaiming/zero init).
    Checkpointing is enabled as ``setup`` says. The model is in training mode.
    """
    import torch

    check_setup(setup)
    notes: list[str] = []
    with torch.device(device):
        model = build_training_model(config, setup, num_layers, attention=setup.attention, experts=None, notes=notes)
    if setup.method == "qlora" and torch.device(device).type != "meta":
        model.to(device)  # bitsandbytes quantizes a Params4bit when it is moved to a device
    return model


def check_setup(setup: TrainingSetup) -> None:
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


def build_training_model(config: dict, setup: TrainingSetup, num_layers: int | None, *, attention: str,
                         experts: str | None, notes: list[str]):
    """Build the training model (dtype, checkpointing, LoRA) on the current default device."""
    import torch

    hf = _hf_config(config, setup, num_layers, notes)
    model = _instantiate(hf, attention, experts, notes)
    if setup.precision == "bf16":
        model.to(torch.bfloat16)
    if setup.float8:  # torchao float8 linears (planner.truth.float8_model)
        from planner.truth.float8_model import apply_float8

        apply_float8(model, setup)
    if setup.method == "qlora":
        _replace_linears_with_4bit(model, setup)
    if setup.kbit_preparation:
        _prepare_for_kbit_training(model)
    _enable_checkpointing(model, setup.checkpointing)
    if setup.method in ("lora", "qlora"):
        model = _apply_lora(model, setup)
        if setup.adapter_dtype == "base":
            _adapters_to_base_dtype(model)
    model.train()
    return model


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


def _apply_lora(model, setup: TrainingSetup):
    import peft

    from planner.specs.architecture import EXPERT_PARAMETERS

    targets = "all-linear" if tuple(setup.lora_targets) == ("all-linear",) else [
        t for t in setup.lora_targets if t not in EXPERT_PARAMETERS]
    stacked = [t for t in setup.lora_targets if t in EXPERT_PARAMETERS]  # peft target_parameters
    lora = peft.LoraConfig(
        r=setup.lora_rank,
        lora_alpha=2 * setup.lora_rank,
        target_modules=targets or None,
        target_parameters=stacked or None,
        lora_dropout=setup.lora_dropout,
        task_type="CAUSAL_LM",
        modules_to_save=list(setup.modules_to_save) or None,
        use_dora=setup.dora,
    )
    with warnings.catch_warnings(), peft_ignoring_old_torchao():
        # peft 0.21 asks transformers 5.23 for the deprecated `is_gradient_checkpointing`; on MoE
        # models its own default rank pattern names gate_up_proj, which fused experts lack; GPT-2's
        # Conv1D makes it switch fan_in_fan_out by itself
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*pattern keys did not match.*", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
        # adapter_dtype "base": peft leaves the adapters in the dtype of the layer they adapt
        return peft.get_peft_model(model, lora, autocast_adapter_dtype=setup.adapter_dtype != "base")


def _adapters_to_base_dtype(model) -> None:
    """What peft's ``_move_adapter_to_device_of_base_layer`` does on a real device and skips on the
    meta device the oracle builds on: each adapter takes its base layer's floating dtype (a 4-bit
    base weight is not floating, so QLoRA's adapters stay fp32)."""
    import torch

    for module in model.modules():
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if weight is None or not weight.dtype.is_floating_point:
            continue
        for name in ("lora_A", "lora_B"):
            for adapter in getattr(module, name, torch.nn.ModuleDict()).values():
                adapter.to(weight.dtype)


def peft_ignoring_old_torchao():
    """peft (>= 0.17) raises ImportError for every LoRA layer it dispatches while a torchao older
    than its minimum (0.16) is installed; torchtune 0.6.1 needs torchao 0.11. The models built
    here hold no torchao tensors, so peft's torchao checks are answered "not available"."""
    import contextlib
    from importlib import metadata

    try:
        old = int(metadata.version("torchao").split(".")[1]) < 16 and metadata.version("torchao").startswith("0.")
    except metadata.PackageNotFoundError:
        old = False
    if not old:
        return contextlib.nullcontext()
    from peft.tuners.lora import torchao as lora_torchao
    from peft.utils import quantization_utils

    stack = contextlib.ExitStack()
    for module in (lora_torchao, quantization_utils):
        original = module.is_torchao_available
        module.is_torchao_available = lambda: False
        stack.callback(setattr, module, "is_torchao_available", original)
    return stack


def _qlora_compute_dtype(setup: TrainingSetup):
    import torch

    return torch.float32 if setup.precision == "fp32" else torch.bfloat16


def _replace_linears_with_4bit(model, setup: TrainingSetup) -> None:
    """What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=bf16))`` does
    to the modules: every ``nn.Linear`` but the output head becomes ``bnb.nn.Linear4bit``
    (MoE experts stored as 3-D parameters stay unquantized, as in transformers). The weights are
    quantized when the model is moved into fake tensors (``planner.truth.fake_tensors``). peft's
    ``prepare_model_for_kbit_training`` runs after this when the set-up asks (``_prepare_for_kbit_training``)."""
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


def _prepare_for_kbit_training(model) -> None:
    """peft's own ``prepare_model_for_kbit_training`` as QLoRA recipes call it: every floating
    parameter that is not 4-bit (embeddings, norms, the head, biases) upcast to fp32. Its gradient
    checkpointing is left to the set-up's ``checkpointing`` (the recipes' default turns it on): with
    ``checkpointing="full"`` transformers' own ``activation_checkpointing_enable`` adds the same
    ``enable_input_require_grads`` hook peft would, with ``use_reentrant=False`` (what the HF Trainer passes
    when it enables checkpointing with no kwargs in transformers 5; peft's own call with no kwargs would
    leave torch's default, reentrant, which is not traced here)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# --------------------------------------------------------------------------- facts of a built model


def param_counts(model) -> tuple[int, int]:
    """(trainable, total) numel of the model's parameters, tied weights counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def has_experts(model) -> bool:
    """Whether the model has mixture-of-experts layers (transformers marks them ``_is_expert_parallel``)."""
    return any(hasattr(m, "_is_expert_parallel") for m in model.modules())


def lora_notes(model) -> list[str]:
    """A note when peft wrapped non-Linear parameters (MoE experts) with ``lora.ParamWrapper``."""
    wrapped = sorted({type(m.get_base_layer()).__name__ for m in model.modules()
                      if type(m).__name__ == "ParamWrapper"})
    if not wrapped:
        return []
    return [f"peft wrapped non-Linear parameters with lora.ParamWrapper ({', '.join(wrapped)}): "
            "per-expert adapters; in a bf16 model its forward materialises W + BA for every expert"]


def cpu_autocast(setup: TrainingSetup):
    """bf16 autocast on CPU for ``bf16-mixed`` (the oracle's device); no autocast otherwise."""
    import contextlib

    import torch

    if setup.precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
