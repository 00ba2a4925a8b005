"""A set-up of the torchtune stack as a torchtune 0.6 recipe config (``tune run RECIPE --config FILE``).

The keys are the recipes' own (``full_finetune_single_device``, ``full_finetune_distributed``,
``lora_finetune_single_device``, ``lora_finetune_distributed``; QLoRA runs the LoRA recipes with a
``qlora_*`` model builder), so the file launches what the planner priced: the builder of the
model's family and size, LoRA rank, targets and dropout, batch size and accumulation, the
optimizer (torch AdamW, bitsandbytes 8-bit or paged 8-bit AdamW), chunked cross-entropy,
activation checkpointing and offloading, optimizer-in-backward, packing, compile and dtype. The
tokenizer and checkpoint paths are placeholders a user fills in (the planner never downloads
weights); the dataset is torchtune's ``alpaca_cleaned_dataset`` as in the shipped configs.
Nothing here imports torchtune.
"""

from __future__ import annotations

from planner.errors import PlannerError

TORCHTUNE_BUILDERS = {
    "llama-2-7b": ("llama2", "llama2_7b", "LLAMA2"),
    "llama-2-13b": ("llama2", "llama2_13b", "LLAMA2"),
    "llama-2-70b": ("llama2", "llama2_70b", "LLAMA2"),
    "llama-3-8b": ("llama3", "llama3_8b", "LLAMA3"),
    "llama-3-70b": ("llama3", "llama3_70b", "LLAMA3"),
    "llama-3.1-8b": ("llama3_1", "llama3_1_8b", "LLAMA3"),
    "llama-3.1-70b": ("llama3_1", "llama3_1_70b", "LLAMA3"),
    "llama-3.1-405b": ("llama3_1", "llama3_1_405b", "LLAMA3"),
    "llama-3.2-1b": ("llama3_2", "llama3_2_1b", "LLAMA3_2"),
    "llama-3.2-3b-instruct": ("llama3_2", "llama3_2_3b", "LLAMA3_2"),
    "mistral-7b-v0.3": ("mistral", "mistral_7b", "MISTRAL"),
    "qwen2.5-0.5b": ("qwen2_5", "qwen2_5_0_5b", "QWEN2"),
    "qwen2.5-1.5b": ("qwen2_5", "qwen2_5_1_5b_base", "QWEN2"),
    "qwen2.5-7b": ("qwen2_5", "qwen2_5_7b_base", "QWEN2"),
    "qwen2.5-32b": ("qwen2_5", "qwen2_5_32b_base", "QWEN2"),
}
"""Catalog model -> (torchtune.models subpackage, builder, checkpointer model_type)."""
_TOKENIZERS = {"llama2": "llama2.llama2_tokenizer", "llama3": "llama3.llama3_tokenizer",
               "llama3_1": "llama3.llama3_tokenizer", "llama3_2": "llama3.llama3_tokenizer",
               "mistral": "mistral.mistral_tokenizer", "qwen2_5": "qwen2_5.qwen2_5_tokenizer"}
_OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adamw-8bit": "bitsandbytes.optim.AdamW8bit",
               "paged-adamw-8bit": "bitsandbytes.optim.PagedAdamW8bit"}
_ATTENTION_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP_TARGETS = {"gate_proj", "up_proj", "down_proj"}


def recipe_name(setup) -> str:
    """The torchtune recipe that runs ``setup`` (``tune run <name>``)."""
    kind = "full_finetune" if setup.method == "full" else "lora_finetune"
    return f"{kind}_{'single_device' if setup.num_gpus == 1 else 'distributed'}"


def _builder(model: str, setup) -> tuple[str, str, str]:
    if model not in TORCHTUNE_BUILDERS:
        raise PlannerError(f"no torchtune builder known for {model!r}: export torchtune supports "
                           f"{', '.join(TORCHTUNE_BUILDERS)}")
    package, name, model_type = TORCHTUNE_BUILDERS[model]
    prefix = {"full": "", "lora": "lora_", "qlora": "qlora_"}[setup.method]
    if setup.method == "qlora" and package == "qwen2_5":
        raise PlannerError("torchtune 0.6 has no QLoRA builder for Qwen2.5: use method lora")
    return f"torchtune.models.{package}.{prefix}{name}", package, model_type


def _lora_keys(setup) -> dict:
    targets = set(setup.lora_targets)
    if "all-linear" in targets:
        targets = set(_ATTENTION_TARGETS) | _MLP_TARGETS
    attention = [_ATTENTION_TARGETS[t] for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in targets]
    mlp = targets & _MLP_TARGETS
    if mlp and mlp != _MLP_TARGETS:
        raise PlannerError("torchtune adapts the MLP's three projections together (apply_lora_to_mlp): "
                           "use all three of gate_proj, up_proj, down_proj or none")
    return {"lora_attn_modules": attention, "apply_lora_to_mlp": bool(mlp),
            "apply_lora_to_output": "lm_head" in targets, "lora_rank": int(setup.lora_rank),
            "lora_alpha": 2 * int(setup.lora_rank), "lora_dropout": float(setup.lora_dropout)}


def _optimizer(setup) -> dict:
    if setup.optimizer not in _OPTIMIZERS:
        raise PlannerError(f"torchtune recipes run {', '.join(_OPTIMIZERS)}; not {setup.optimizer!r}")
    optimizer = {"_component_": _OPTIMIZERS[setup.optimizer], "lr": 2e-5 if setup.method == "full" else 3e-4}
    if setup.optimizer == "adamw":
        optimizer["fused"] = setup.optimizer_impl == "fused"
    return optimizer


def _loss(setup) -> dict:
    if setup.loss_impl == "chunked":
        return {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss", "num_output_chunks": int(setup.loss_chunks)}
    if setup.loss_impl == "standard":
        return {"_component_": "torch.nn.CrossEntropyLoss", "ignore_index": -100}
    raise PlannerError(f"loss {setup.loss_impl!r} is not priced for torchtune: use --loss chunked or standard")


def torchtune_recipe_config(model: str, setup, output_dir: str = "/tmp/torchtune/planner") -> dict:
    """The recipe config (a dict to write as YAML) for ``setup`` of the torchtune stack."""
    if setup.stack != "torchtune":
        raise PlannerError(f"export torchtune needs a torchtune set-up (--stack torchtune), not {setup.stack!r}")
    component, package, model_type = _builder(model, setup)
    checkpoint_dir = f"<the Hugging Face checkpoint folder of {model}>"
    config = {
        "output_dir": output_dir,
        "model": {"_component_": component, **({} if setup.method == "full" else _lora_keys(setup))},
        "tokenizer": {"_component_": f"torchtune.models.{_TOKENIZERS[package]}",
                      "path": f"<the tokenizer file of {model}>", "max_seq_len": int(setup.seq_len)},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": checkpoint_dir, "checkpoint_files": ["<model-*.safetensors>"],
                         "recipe_checkpoint": None, "output_dir": "${output_dir}", "model_type": model_type},
        "resume_from_checkpoint": False,
        "dataset": {"_component_": "torchtune.datasets.alpaca_cleaned_dataset", "packed": bool(setup.packed)},
        "seed": None,
        "shuffle": True,
        "batch_size": int(setup.micro_batch),
        "optimizer": _optimizer(setup),
        "loss": _loss(setup),
        "epochs": 1,
        "max_steps_per_epoch": None,
        "gradient_accumulation_steps": int(setup.grad_accum),
        "compile": bool(setup.compile),
        "device": "cuda",
        "dtype": setup.precision,
        "enable_activation_checkpointing": setup.checkpointing == "full",
        "enable_activation_offloading": bool(setup.activation_offload),
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": "${output_dir}/logs"},
        "log_every_n_steps": 1,
        "log_peak_memory_stats": True,
    }
    if setup.method == "full":
        config["optimizer_in_bwd"] = bool(setup.optimizer_in_backward)
    if setup.checkpointing == "selective":
        raise PlannerError("torchtune's recipes checkpoint whole layers: use --checkpointing full or none")
    return config
