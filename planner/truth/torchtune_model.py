"""torchtune's own model of a set-up, built from an HF ``config.json`` and moved into fake tensors.

Owns building the model a torchtune recipe trains (``torchtune_fake_model``; torchtune 0.6.1 with
torchao 0.11.0): the component builder of the config's family with its keyword arguments
(``torchtune_builder``; the LoRA switches of its ``lora_*`` builders are
``planner.cost.memory.torchtune_tensors.lora_switches``), dtype, LoRA/QLoRA, trainable parameters and
activation checkpointing as the single-device recipes set them, and the move into
``FakeTensorMode`` (parameters, torchao NF4 weights, RoPE caches). torch, torchtune and torchao are imported inside functions only.

Families (``model_type`` -> torchtune builder; ``head_dim`` must be ``hidden / heads``, as the
builders derive it):

- ``llama`` with ``rope_scaling.rope_type == "llama3"``: ``llama3_2`` (tied embeddings) or
  ``llama3_1`` (untied), ``scale_factor`` from the config (``Llama3ScaledRoPE``).
  ``llama`` without scaling: ``llama3`` (untied; ``RotaryPositionalEmbeddings``; Llama-2 and
  Llama-3 share these modules) or, tied, ``llama3_2`` with ``scale_factor=1`` (same frequencies).
- ``qwen2`` (Qwen2, Qwen2.5): ``qwen2`` (q/k/v biases, tied or untied).
- ``mistral``: ``mistral``.
- ``gemma2``: ``gemma2`` (torchtune's eager ``Gemma2Attention``: s x s scores, soft-capping,
  sliding-window masks built per layer).

How each set-up switch is realised (as ``recipes/{full,lora}_finetune_single_device.py`` do):

- precision ``bf16`` / ``fp32``: the model is built under ``training.set_default_dtype`` (every
  parameter, LoRA adapters included, at that dtype; no autocast anywhere). ``bf16-mixed`` raises:
  torchtune's recipes train in one dtype (``training.get_dtype``).
- method ``lora`` / ``qlora``: the family's ``lora_*`` builder (``lora_alpha = 2 r``, the set-up's
  ``lora_dropout``), ``quantize_base=True`` for QLoRA (every frozen linear of the layers a torchao
  ``NF4Tensor``: block 64, scaler block 256; the head stays at the model dtype), then
  ``set_trainable_params(model, get_adapter_params(model))``: embeddings and norms frozen.
- checkpointing ``full``: ``training.set_activation_checkpointing(model, auto_wrap_policy=
  {TransformerSelfAttentionLayer})`` (non-reentrant ``checkpoint_wrapper`` around every layer).
  ``selective`` raises: the single-device recipes wrap whole layers only.
- RoPE: the caches are computed in real CPU mode (``Llama3ScaledRoPE.rope_init`` returns early on
  the meta device) and registered as fake buffers; ``max_seq_len`` is the config's
  ``max_position_embeddings``, as torchtune's model builders set it, so the fp32 cache is
  ``max_seq_len x head_dim x 4`` bytes (one module shared by all layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.cost.memory.torchtune_tensors import lora_switches
from planner.specs.configs import reduce_layers

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

def check_torchtune_setup(setup: TrainingSetup) -> None:
    """Raise NotImplementedError, before torch is imported, for what a torchtune trace cannot run."""
    if setup.num_gpus > 1 or setup.tensor_parallel > 1 or setup.zero or setup.offload_optimizer:
        raise NotImplementedError("the torchtune trace runs the single-device recipes: one process, no sharding")
    if setup.precision == "bf16-mixed":
        raise NotImplementedError("torchtune trains in one dtype (bf16 or fp32, no autocast): use precision bf16")
    if setup.checkpointing == "selective":
        raise NotImplementedError("torchtune's single-device recipes checkpoint whole layers only: "
                                  "use checkpointing none or full")
    if setup.optimizer not in ("adamw", "adamw-8bit", "sgd"):
        raise NotImplementedError(f"optimizer {setup.optimizer!r}: the torchtune trace runs adamw, adamw-8bit or sgd")
    if setup.attention != "sdpa":
        raise NotImplementedError("torchtune's MultiHeadAttention calls SDPA (no eager option): use attention sdpa")


def torchtune_builder(config: dict, num_layers: int | None, notes: list[str]) -> tuple[str, str, dict[str, Any]]:
    """``(module, builder name, keyword arguments)`` of the config's torchtune component builder
    (the full-model one; the LoRA builder is ``lora_`` + its name, same module)."""
    cfg = reduce_layers(config, num_layers) if num_layers is not None else dict(config)
    kind = cfg.get("model_type")
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if kind != "gemma2" and cfg.get("head_dim") not in (None, h // heads):
        raise NotImplementedError(f"head_dim {cfg['head_dim']} != hidden/heads {h // heads}: "
                                  "torchtune's builders derive head_dim from them")
    common = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
                  num_kv_heads=cfg.get("num_key_value_heads") or heads, embed_dim=h,
                  max_seq_len=cfg.get("max_position_embeddings", 4096), intermediate_dim=cfg["intermediate_size"],
                  attn_dropout=0.0)
    tied = bool(cfg.get("tie_word_embeddings", False))
    eps = cfg.get("rms_norm_eps", 1e-5)
    base = cfg.get("rope_theta", 10_000)
    if kind == "llama":
        scaling = cfg.get("rope_scaling") or {}
        scaled = scaling.get("rope_type", scaling.get("type")) == "llama3"
        factor = scaling.get("factor", 1) if scaled else 1
        if not scaled and not tied:
            return "torchtune.models.llama3._component_builders", "llama3", dict(common, norm_eps=eps, rope_base=base)
        if not scaled:
            notes.append("tied llama without rope scaling: torchtune's llama3_2 builder with scale_factor=1")
        if tied:
            return ("torchtune.models.llama3_2._component_builders", "llama3_2",
                    dict(common, norm_eps=eps, rope_base=base, scale_factor=factor, tie_word_embeddings=True))
        return "torchtune.models.llama3_1._component_builders", "llama3_1", dict(
            common, norm_eps=eps, rope_base=base, scale_factor=factor)
    if kind == "qwen2":
        return "torchtune.models.qwen2._component_builders", "qwen2", dict(
            common, norm_eps=eps, rope_base=base, tie_word_embeddings=tied)
    if kind == "mistral" and not tied:
        return "torchtune.models.mistral._component_builders", "mistral", dict(common, norm_eps=eps, rope_base=base)
    if kind == "gemma2":
        return "torchtune.models.gemma2._component_builders", "gemma2", _gemma2_kwargs(cfg, common, eps, base)
    raise NotImplementedError(f"model_type {kind!r} (tied={tied}): the torchtune trace builds llama, qwen2, "
                              "untied mistral and gemma2")


def _gemma2_kwargs(cfg: dict, common: dict, eps: float, base: float) -> dict[str, Any]:
    kw = dict(common, norm_eps=eps, rope_base=base, head_dim=cfg.get("head_dim") or cfg["hidden_size"]
              // cfg["num_attention_heads"])
    kw.update(hidden_capping_value=cfg.get("attn_logit_softcapping", 50.0),
              final_capping_value=cfg.get("final_logit_softcapping", 30.0),
              sliding_window_size=cfg.get("sliding_window", 4096),
              query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"))
    return kw


def build_torchtune_model(config: dict, setup: TrainingSetup, num_layers: int | None, notes: list[str]):
    """The recipe's model on the meta device: dtype, LoRA/QLoRA and trainable set, checkpointing."""
    import importlib

    import torch
    from torchtune import modules, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    check_torchtune_setup(setup)
    module, name, kwargs = torchtune_builder(config, num_layers, notes)
    if setup.method != "full":
        name = "lora_" + name
        kwargs.update(lora_switches(setup.lora_targets), lora_rank=setup.lora_rank, lora_alpha=2.0 * setup.lora_rank,
                      lora_dropout=setup.lora_dropout, quantize_base=setup.method == "qlora")
        if kwargs["apply_lora_to_output"] and name == "lora_gemma2":
            raise NotImplementedError("torchtune's lora_gemma2 has no apply_lora_to_output (tied head)")
        if name == "lora_gemma2":
            kwargs.pop("apply_lora_to_output")
    builder = getattr(importlib.import_module(module), name)
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = builder(**kwargs)
    if setup.method != "full":
        set_trainable_params(model, get_adapter_params(model))
    if setup.checkpointing == "full":
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    model.train()
    return model


def torchtune_fake_model(fake_mode, config: dict, setup: TrainingSetup, num_layers: int | None, notes: list[str]):
    """``build_torchtune_model`` moved into ``fake_mode``: every parameter a fresh fake CPU tensor (one
    per original, so tied weights stay tied), NF4 weights rebuilt around fake inner tensors,
    RoPE caches computed for real and registered as fake buffers."""
    model = build_torchtune_model(config, setup, num_layers, notes)
    caches = _real_rope_caches(model)
    with fake_mode:
        _params_to_fake(model)
    for module, buffers in caches:
        for name, real in buffers.items():
            module.register_buffer(name, fake_mode.from_tensor(real), persistent=False)
        module.is_cache_built = True
    with fake_mode:
        _other_buffers_to_fake(model, {id(m) for m, _ in caches})
    return model


def _params_to_fake(model) -> None:
    import torch
    from torchao.dtypes.nf4tensor import NF4Tensor

    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                new = _fake_nf4(p) if isinstance(p, NF4Tensor) else torch.empty(p.shape, dtype=p.dtype, device="cpu")
                memo[id(p)] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
            module._parameters[name] = memo[id(p)]


def _fake_nf4(weight):
    """A torchao ``NF4Tensor`` like ``weight`` (built on meta) whose inner tensors (4-bit codes,
    int8 scalers, quantization factors, mean, code table) are fresh tensors of the active fake
    mode; quantizing a fake tensor with ``to_nf4`` gives the same shapes, only slower."""
    import dataclasses

    import torch
    from torchao.dtypes.nf4tensor import NF4Tensor

    names, ctx = weight.__tensor_flatten__()
    inner = {n: torch.empty(getattr(weight, n).shape, dtype=getattr(weight, n).dtype, device="cpu") for n in names}
    meta = dataclasses.replace(ctx["tensor_meta"], device=torch.device("cpu"), requires_grad=False)
    return NF4Tensor(meta, ctx["block_size"], ctx["n_blocks"], ctx["scaler_block_size"], **inner)


def _real_rope_caches(model) -> list[tuple[Any, dict[str, Any]]]:
    """For each RoPE module (one with ``rope_init``), its buffers built for real on the CPU."""
    import torch

    out = []
    for module in model.modules():
        if not callable(getattr(module, "rope_init", None)):
            continue
        with torch.device("cpu"):
            module.rope_init()
        out.append((module, {n: b for n, b in module._buffers.items() if b is not None}))
    return out


def _other_buffers_to_fake(model, done: set[int]) -> None:
    import torch

    for module in model.modules():
        if id(module) in done:
            continue
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")


def adapter_param_count(model) -> int:
    """numel of torchtune's ``get_adapter_params`` (what its LoRA recipe trains)."""
    from torchtune.modules.peft import get_adapter_params

    return sum(p.numel() for p in get_adapter_params(model).values())
