"""Exports: a planned run in the configuration format of the engine that launches it.

- ``hf-trainer``: keyword arguments of ``transformers.TrainingArguments`` (and, for LoRA/QLoRA,
  ``peft.LoraConfig`` and ``transformers.BitsAndBytesConfig`` keyword arguments beside them);
- ``deepspeed``: a DeepSpeed JSON config (ZeRO stage, micro-batch, accumulation, bf16);
- ``accelerate``: an ``accelerate`` config YAML (``accelerate launch --config_file``);
- ``torchtune``: the recipe config of a torchtune run (``planner.io.exports_torchtune``);
- ``torchtitan``: torchtitan 0.3.0's configuration overrides as TOML and the launch script that
  applies them (``planner.io.exports_torchtitan``).

Nothing here imports torch, transformers or deepspeed.
"""

from __future__ import annotations

from pathlib import Path

from planner.errors import PlannerError
from planner.io.planfiles import write_data
from planner.search.plan import EXPORT_FORMATS, Candidate, Plan

# --------------------------------------------------------------------------------------------
# Exports: what an existing engine launches with


_HF_OPTIM = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "adafactor": "adafactor", "sgd": "sgd", "lion": "lion_32bit"}
"""TrainingArguments.optim names (transformers.training_args.OptimizerNames)."""


def _need_single_node_tp(c: Candidate, engine: str) -> None:
    """A one-line refusal of what the Hugging Face exports cannot launch: another stack's run, tensor
    parallelism, pipeline stages."""
    if c.stack != "hf":
        raise PlannerError(f"the recommended run is on stack {c.stack}, which {engine} does not launch: "
                           f"--export {c.stack}, or re-plan with --stacks hf")
    if c.tensor_parallel > 1:
        raise PlannerError(
            f"the plan uses tensor parallelism {c.tensor_parallel}, which {engine} does not launch; "
            "re-plan with --tensor-parallel 1 or use Megatron / torchtitan"
        )
    if c.pipeline_parallel > 1:
        raise PlannerError(f"the plan uses {c.pipeline_parallel} pipeline stages, which {engine} does not launch here: "
                           "use Megatron / torchtitan, or re-plan with ZeRO-3 (--zero 3)")


def zero_bucket_keys(c: Candidate) -> dict:
    """The ``zero_optimization`` bucket sizes the memory model prices
    (``planner.cost.memory.zero_buffers.priced_config``), as explicit integers: transformers'
    integration fills ``"auto"`` with ``reduce_bucket_size = hidden^2`` and, at stage 3,
    ``stage3_prefetch_bucket_size = int(0.9 hidden^2)`` and ``stage3_param_persistence_threshold =
    10 hidden`` (``HfTrainerDeepSpeedConfig.trainer_config_finalize``,
    ``transformers/integrations/deepspeed.py``); a config without them gets DeepSpeed's 5e8-element
    buckets (2.8 GiB of bf16 backward buffers at stage 1/2), which the planner does not price."""
    from planner.cost.memory.zero_buffers import priced_config
    from planner.search.stacks import candidate_setup
    from planner.specs.catalog import load_spec

    cfg = priced_config(candidate_setup(c), load_spec(c.model).hidden_size)
    keys = {"reduce_bucket_size": int(cfg.reduce_bucket_elems)}
    if c.zero == 3:
        keys["stage3_prefetch_bucket_size"] = int(cfg.prefetch_bucket_elems)
        keys["stage3_param_persistence_threshold"] = int(cfg.persistence_threshold_elems)
    return keys


def deepspeed_config(c: Candidate) -> dict:
    """DeepSpeed config for the run (keys of deepspeed.runtime.config / zero.config).

    train_batch_size = micro-batch x accumulation x data-parallel ranks, as DeepSpeed checks. The
    ZeRO bucket sizes are written as numbers (``zero_bucket_keys``): the ones the memory model prices.
    """
    _need_single_node_tp(c, "DeepSpeed's ZeRO engine")
    dp = c.num_gpus // c.tensor_parallel
    zero: dict = {"stage": int(c.zero), "overlap_comm": True, "contiguous_gradients": True}
    if c.zero >= 1:
        zero.update(zero_bucket_keys(c))
    if c.zero >= 2:
        zero["reduce_scatter"] = True
    if c.zero == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": c.micro_batch * c.grad_accum * dp,
        "train_micro_batch_size_per_gpu": c.micro_batch,
        "gradient_accumulation_steps": c.grad_accum,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": c.precision in ("bf16", "bf16-mixed")},
        "zero_optimization": zero,
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }


def _hf_checkpointing_key() -> str:
    """transformers 5 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name
    warns and goes in v6); read the installed version without importing transformers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        major = 5
    return "activation_checkpointing" if major >= 5 else "gradient_checkpointing"


def hf_trainer_kwargs(c: Candidate, output_dir: str = "runs/planner", deepspeed_path: str | None = None) -> dict:
    """``transformers.TrainingArguments(**kwargs)`` for the run.

    max_steps carries the planned tokens (steps = tokens / global batch); the learning rate and
    schedule are not planned and keep transformers' defaults. ZeRO runs point ``deepspeed`` at the
    exported DeepSpeed config; activation checkpointing maps to ``activation_checkpointing``
    (``gradient_checkpointing`` before transformers 5): every layer, so a plan with selective
    checkpointing runs with full checkpointing under the Trainer (slower, never more memory).
    """
    _need_single_node_tp(c, "the Hugging Face Trainer")
    kwargs = {
        "output_dir": output_dir,
        "per_device_train_batch_size": c.micro_batch,
        "gradient_accumulation_steps": c.grad_accum,
        "max_steps": c.steps,
        "bf16": c.precision in ("bf16", "bf16-mixed"),
        "optim": _HF_OPTIM[c.optimizer],
        _hf_checkpointing_key(): c.checkpointing != "none",
        "logging_steps": max(1, c.steps // 200),
        "save_steps": max(1, c.steps // 10),
        "report_to": "none",
    }
    if c.zero > 0:
        kwargs["deepspeed"] = deepspeed_path or "ds_config.json"
    return kwargs


def peft_kwargs(c: Candidate) -> dict | None:
    """``peft.LoraConfig(**kwargs)`` (and for QLoRA the ``BitsAndBytesConfig`` the model loads with)."""
    if c.method == "full":
        return None
    out = {"lora": {"r": c.lora_rank, "lora_alpha": 2 * (c.lora_rank or 16), "target_modules": "all-linear",
                    "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}}
    if c.method == "qlora":
        out["bitsandbytes"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                               "bnb_4bit_compute_dtype": "bfloat16"}
    return out


def accelerate_config(c: Candidate, deepspeed_path: str | None = None) -> dict:
    """An ``accelerate launch --config_file`` YAML (keys of accelerate's ClusterConfig)."""
    _need_single_node_tp(c, "accelerate")
    cfg: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,
        "num_machines": max(1, -(-c.num_gpus // 8)),
        "num_processes": c.num_gpus,
        "mixed_precision": "bf16" if c.precision in ("bf16", "bf16-mixed") else "no",
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "downcast_bf16": "no",
        "debug": False,
    }
    if c.zero > 0:
        cfg["distributed_type"] = "DEEPSPEED"
        cfg["deepspeed_config"] = {
            "zero_stage": int(c.zero),
            "gradient_accumulation_steps": c.grad_accum,
            "gradient_clipping": 1.0,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": c.zero == 3,
        }
        if deepspeed_path:
            cfg["deepspeed_config"] = {"deepspeed_config_file": deepspeed_path, "zero3_init_flag": c.zero == 3}
    elif c.num_gpus > 1:
        cfg["distributed_type"] = "MULTI_GPU"
    else:
        cfg["distributed_type"] = "NO"
    return cfg


def torchtune_config(c: Candidate) -> dict:
    """The torchtune recipe config of a torchtune run (``planner.io.exports_torchtune``), its
    epochs and optimizer steps per epoch carrying the planned tokens."""
    import math

    from planner.io.exports_torchtune import torchtune_recipe_config
    from planner.search.stacks import candidate_setup

    if c.stack != "torchtune":
        raise PlannerError(f"the recommended run is on stack {c.stack}, not torchtune: re-plan with --stacks torchtune "
                           "(or hf,torchtune) to export a torchtune recipe")
    config = torchtune_recipe_config(c.model, candidate_setup(c))
    epochs = max(1, math.ceil(c.epochs - 1e-9)) if c.epochs else 1
    config["epochs"] = epochs
    config["max_steps_per_epoch"] = math.ceil(c.steps / epochs)
    return config


def torchtitan_files(c: Candidate, path: Path) -> list[Path]:
    """``<stem>.toml`` (the overrides) and ``<stem>.sh`` (the torchrun launch line) of a torchtitan run."""
    from planner.errors import writable_file
    from planner.io.exports_torchtitan import launch_line, toml_text, torchtitan_config
    from planner.search.stacks import candidate_setup

    if c.stack != "torchtitan":
        raise PlannerError(f"the recommended run is on stack {c.stack}, not torchtitan: re-plan with --stacks torchtitan "
                           "(or hf,torchtitan) to export a torchtitan configuration")
    exported = torchtitan_config(c.model, candidate_setup(c), c.steps)
    launch = launch_line(exported, c.num_gpus)
    toml_path = writable_file(path if path.suffix == ".toml" else path.with_suffix(".toml"), "export")
    script = writable_file(toml_path.with_suffix(".sh"), "export")
    toml_path.write_text(toml_text(exported, launch))
    script.write_text(f"#!/bin/sh\n# torchtitan 0.3.0 run planned by `planner plan` (overrides as in {toml_path.name})\n"
                      f"{launch}\n")
    return [toml_path, script]


def export(plan_or_candidate: Plan | Candidate, fmt: str, path: str | Path) -> list[Path]:
    """Write the recommended run as ``fmt`` to ``path``; returns every file written.

    hf-trainer: ``path`` (JSON) holds the TrainingArguments kwargs; beside it ``<stem>.deepspeed.json``
    when the run uses ZeRO and ``<stem>.peft.json`` for LoRA/QLoRA. accelerate: ``path`` (YAML).
    deepspeed: ``path`` (JSON). torchtune: ``path`` (YAML), for ``tune run <recipe> --config``.
    torchtitan: ``path`` (TOML) and beside it ``<stem>.sh``, the torchrun line torchtitan 0.3.0 launches.
    megatron: ``<stem>.sh``, the torchrun script of Megatron-LM's ``pretrain_gpt.py``.
    """
    c = plan_or_candidate.recommended if isinstance(plan_or_candidate, Plan) else plan_or_candidate
    path = Path(path)
    if fmt not in EXPORT_FORMATS:
        raise PlannerError(f"unknown export format {fmt!r}; use {', '.join(EXPORT_FORMATS)}")
    if not path.parent.exists():
        raise PlannerError(f"cannot write {path}: folder {path.parent} does not exist")
    written = []
    if fmt == "megatron":
        from planner.io.exports_megatron import megatron_files

        written += megatron_files(c, path)
    elif fmt == "torchtitan":
        written += torchtitan_files(c, path)
    elif fmt == "torchtune":
        target = path if path.suffix in (".yaml", ".yml") else path.with_suffix(".yaml")
        written.append(write_data(torchtune_config(c), target))
    elif fmt == "deepspeed":
        if c.zero == 0 and c.num_gpus == 1:
            pass  # a single-GPU DeepSpeed run is still valid (ZeRO stage 0)
        written.append(write_data(deepspeed_config(c), path.with_suffix(".json") if path.suffix != ".json" else path))
    elif fmt == "accelerate":
        ds_path = None
        target = path if path.suffix in (".yaml", ".yml") else path.with_suffix(".yaml")
        written.append(write_data(accelerate_config(c, ds_path), target))
    else:
        target = path if path.suffix == ".json" else path.with_suffix(".json")
        ds_path = None
        if c.zero > 0:
            ds_path = target.with_name(target.stem + ".deepspeed.json")
            written.append(write_data(deepspeed_config(c), ds_path))
        written.insert(0, write_data(hf_trainer_kwargs(c, deepspeed_path=str(ds_path) if ds_path else None), target))
        peft = peft_kwargs(c)
        if peft is not None:
            written.append(write_data(peft, target.with_name(target.stem + ".peft.json")))
    return written
