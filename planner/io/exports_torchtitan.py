"""A set-up of the torchtitan stack as torchtitan 0.3.0's training configuration: a TOML file whose
sections and keys are ``Trainer.Config``'s own, and the launch line that applies them.

torchtitan 0.3.0 (the PyPI wheel, ``torchtitan-0.3.0-py3-none-any.whl``) reads no TOML file: a run
is a config function of a model module (``torchtitan/models/llama3/config_registry.py``:
``llama3_8b``, ``llama3_70b``, ``llama3_405b``) chosen with ``--module`` and ``--config``, and
overridden on the command line as ``--<section>.<key> value`` (``torchtitan/config/manager.py:
ConfigManager``, tyro). The model and its flavor are fixed by the config function
(``Trainer.Config.model_spec`` is suppressed from the command line), so they are written as the
launch line's ``--module``/``--config``, not as keys. The TOML file holds the overrides, one
section per ``Trainer.Config`` field, with the key names of:

- ``torchtitan/config/configs.py``: ``TrainingConfig`` (local_batch_size, global_batch_size,
  seq_len, steps, dtype, mixed_precision_param, mixed_precision_reduce), ``ParallelismConfig``
  (data_parallel_replicate_degree, data_parallel_shard_degree, tensor_parallel_degree,
  enable_sequence_parallel, pipeline_parallel_degree, pipeline_parallel_schedule,
  pipeline_parallel_microbatch_size, context_parallel_degree), ``CompileConfig`` (enable, components);
- ``torchtitan/components/optimizer/optimizer.py``: ``OptimizersContainer.Config.implementation``;
- ``torchtitan/components/optimizer/lr_scheduler.py``: ``LRSchedulersContainer.Config.warmup_steps``;
- ``torchtitan/trainer.py``: ``Trainer.Config.dump_folder``; its ``activation_checkpoint`` field is a
  union chosen by a tyro subcommand (``torchtitan/distributed/activation_checkpoint.py``:
  ``activation_checkpoint:selective|full|none``): the TOML names it in an empty section's comment
  and the launch line carries it.

Float8 is a model converter of the config function (``Float8LinearConverter`` in
``llama3_405b``), not a key: a plan's float8 choice must match the config function's, or the export
refuses. The learning rate stays the config function's (its ``default_adamw(lr=...)`` param group).
Nothing here imports torchtitan.
"""

from __future__ import annotations

import shlex

from planner.errors import PlannerError

TORCHTITAN_FLAVORS = {
    "llama-3.1-8b": ("llama3", "llama3_8b", "8B", False),
    "llama-3.1-70b": ("llama3", "llama3_70b", "70B", False),
    "llama-3.1-405b": ("llama3", "llama3_405b", "405B", True),
}
"""Catalog model -> (``--module``, ``--config`` function, flavor, whether that config trains in float8):
torchtitan 0.3.0 ``models/llama3/__init__.py`` (``llama3_configs``: 8B, 70B, 405B, the Llama 3.1
shapes with its RoPE scaling) and ``models/llama3/config_registry.py``."""
_SCHEDULES = {"1f1b": "1F1B", "interleaved": "Interleaved1F1B", "gpipe": "GPipe"}
"""``pipeline_schedule`` -> torch.distributed.pipelining schedule names (``ParallelismConfig``)."""
_CHECKPOINTING = {"none": "none", "selective": "selective", "full": "full"}
_DEFAULT_WARMUP_STEPS = 200  # LRSchedulersContainer.Config.warmup_steps in 0.3.0


def flavor_of(model: str, setup) -> tuple[str, str, str]:
    """(module, config function, flavor) of a catalog model, or a one-line refusal."""
    if model not in TORCHTITAN_FLAVORS:
        known = ", ".join(f"{m} ({v[2]})" for m, v in TORCHTITAN_FLAVORS.items())
        raise PlannerError(f"no torchtitan 0.3.0 flavor known for {model!r}: export torchtitan knows llama3 {known}")
    module, config, flavor, float8 = TORCHTITAN_FLAVORS[model]
    if bool(setup.float8) != float8:
        what = "trains the linears in float8 (Float8LinearConverter)" if float8 else "trains in bf16 without float8"
        raise PlannerError(f"torchtitan 0.3.0's {config} config {what} and the plan {'does not' if float8 else 'does'}: "
                           f"the converter is fixed by the config function; re-plan to match or write a config function")
    return module, config, flavor


def _parallelism(setup) -> dict:
    dp = setup.data_parallel
    sharded = setup.zero == 3 or (setup.zero == 0 and dp == 1)
    if setup.zero not in (0, 3):
        raise PlannerError(f"torchtitan shards with FSDP2 (ZeRO-3) or replicates (DDP); ZeRO-{setup.zero} is neither: "
                           "re-plan with --zero 0,3")
    out = {"data_parallel_replicate_degree": 1 if sharded else dp, "data_parallel_shard_degree": dp if sharded else 1,
           "tensor_parallel_degree": setup.tensor_parallel, "enable_sequence_parallel": bool(setup.sequence_parallel),
           "pipeline_parallel_degree": setup.pipeline_parallel, "context_parallel_degree": setup.context_parallel}
    if setup.pipeline_parallel > 1:
        out["pipeline_parallel_schedule"] = _SCHEDULES[setup.pipeline_schedule]
        out["pipeline_parallel_microbatch_size"] = int(setup.micro_batch)
    return out


def _training(setup, steps: int) -> dict:
    """Per data-parallel rank: ``local_batch_size`` sequences per accumulation step (split into
    pipeline micro-batches under PP); ``global_batch_size`` sets the accumulation (torchtitan runs
    global / (local x data-parallel) micro-steps)."""
    if setup.precision not in ("bf16-mixed", "fp32"):
        raise PlannerError(f"torchtitan trains with FSDP mixed precision (bf16-mixed) or fp32, not {setup.precision!r}")
    pipelined = setup.pipeline_parallel > 1
    local = setup.micro_batch * (setup.grad_accum if pipelined else 1)
    micro_steps = 1 if pipelined else setup.grad_accum
    out = {"local_batch_size": int(local), "global_batch_size": int(local * setup.data_parallel * micro_steps),
           "seq_len": int(setup.seq_len), "steps": int(steps), "dtype": "float32",
           "mixed_precision_param": "bfloat16" if setup.precision == "bf16-mixed" else "float32",
           "mixed_precision_reduce": "float32"}
    if pipelined:  # trainer.py Trainer.Config._validate_cuda_graphs: "CUDA graphs do not support pipeline parallelism yet"
        out["disable_cuda_graphs"] = True
    return out


def torchtitan_config(model: str, setup, steps: int, dump_folder: str = "./outputs/planner") -> dict:
    """The overrides (a dict of sections) and the launch choices of ``setup`` for torchtitan 0.3.0.

    Returns ``{"module", "config", "flavor", "activation_checkpoint", "toml": {section: {key: value}}}``."""
    if setup.stack != "torchtitan":
        raise PlannerError(f"export torchtitan needs a torchtitan set-up (--stacks torchtitan), not {setup.stack!r}")
    if setup.method != "full":
        raise PlannerError("torchtitan trains every parameter: export torchtitan needs method full")
    if setup.optimizer != "adamw":
        raise PlannerError(f"torchtitan's configs run AdamW; the plan uses {setup.optimizer!r}: re-plan with --optimizers adamw")
    module, config, flavor = flavor_of(model, setup)
    toml = {
        "dump_folder": dump_folder,
        "training": _training(setup, steps),
        "parallelism": _parallelism(setup),
        "optimizer": {"implementation": setup.optimizer_impl},
        "lr_scheduler": {"warmup_steps": int(min(_DEFAULT_WARMUP_STEPS, max(1, steps // 10)))},
        "compile": {"enable": bool(setup.compile), "components": ["model", "loss"]},
    }
    return {"module": module, "config": config, "flavor": flavor,
            "activation_checkpoint": _CHECKPOINTING[setup.checkpointing], "toml": toml}


# ----------------------------------------------------------------------------- writing


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_text(exported: dict, launch: str) -> str:
    """The TOML file: the launch line and the checkpointing subcommand as comments, then the
    top-level keys and one table per section (a small writer: the project has no TOML writer dependency)."""
    lines = ["# torchtitan 0.3.0 overrides of the config function below, written by `planner plan --export torchtitan`.",
             "# torchtitan 0.3.0 reads no TOML file: launch with the command line these keys make:",
             f"#   {launch}", ""]
    toml = exported["toml"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in toml.items() if not isinstance(value, dict)]
    for section, keys in toml.items():
        if not isinstance(keys, dict):
            continue
        lines += ["", f"[{section}]"] + [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
    lines += ["", "[activation_checkpoint]",
              f"# mode: {exported['activation_checkpoint']} (the subcommand activation_checkpoint:"
              f"{exported['activation_checkpoint']} of the launch line)", ""]
    return "\n".join(lines)


def cli_arguments(exported: dict) -> list[str]:
    """``--module M --config C --<section>.<key> value ... activation_checkpoint:MODE``: what
    torchtitan 0.3.0's ``ConfigManager.parse_args`` takes (tyro: booleans are ``--x.enable`` /
    ``--x.no-enable`` flags, lists comma-separated)."""
    args = ["--module", exported["module"], "--config", exported["config"]]
    for section, keys in exported["toml"].items():
        items = keys.items() if isinstance(keys, dict) else [(None, keys)]
        for key, value in items:
            name = f"{section}.{key}" if key is not None else section
            if isinstance(value, bool):  # sections only: tyro's flag pair --s.key / --s.no-key
                args.append(f"--{name}" if value else f"--{section}.no-{key}")
            elif isinstance(value, list | tuple):
                args += [f"--{name}", ",".join(map(str, value))]
            else:
                args += [f"--{name}", str(value)]
    return args + [f"activation_checkpoint:{exported['activation_checkpoint']}"]


def launch_line(exported: dict, num_gpus: int) -> str:
    """The ``torchrun`` command of the run (one node's GPUs per process group; more nodes add
    torchrun's --nnodes and rendezvous flags)."""
    per_node = min(num_gpus, 8)
    nodes = f"--nnodes {-(-num_gpus // 8)} " if num_gpus > 8 else ""
    return (f"torchrun {nodes}--nproc_per_node {per_node} -m torchtitan.train "
            + " ".join(shlex.quote(a) for a in cli_arguments(exported)))
