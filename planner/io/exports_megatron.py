"""A set-up of the megatron stack as a Megatron-LM launch: the ``torchrun`` line of ``pretrain_gpt.py``
with the command-line arguments that reproduce what the planner priced.

The arguments are those of Megatron-LM's own parser (``megatron/training/arguments.py`` at commit
d98e8a64ddf34856e74b24714e3bedb2f5a39553; its ``TransformerConfig`` fields enter the parser through
``ArgumentGroupFactory``); ``benchmarks/megatron_args_oracle.py`` runs that parser and its
``validate_args`` on a panel of exports and records the accepted lists in
``tests/data/megatron_args.json``. What Megatron builds from them:

- the model (``planner.specs.catalog.load_spec``): layers, hidden, MLP width, heads and key/value
  groups, head_dim (``--kv-channels`` when it is not hidden / heads), the gated SiLU MLP
  (``--swiglu``), the norm and its epsilon, RoPE (base; Llama 3.x scaling is ``--use-rope-scaling``:
  Megatron hard-codes low/high frequency factors 1 and 4 and an original context of 8192,
  ``megatron/core/models/common/embeddings/rotary_pos_embedding.py``), untied output layer, biases,
  dropouts (Megatron's default is 0.1: written out), the embedding and output rows as
  ``planner.cost.memory.megatron_tensors.padded_vocab_size`` prices them (the config's vocabulary
  padded to 128 x TP) pinned with ``--padded-vocab-size``: Megatron would otherwise pad
  ``len(tokenizer)``, which differs from the config's size for Qwen2.5 (151665 vs 152064);
- the layout: TP, PP (uneven splits as ``--pipeline-model-parallel-layout``, the planner's
  ``parallel.stage_layers`` chunks), interleaved virtual stages, sequence and context parallelism,
  the distributed optimizer (``zero=1``); recompute none / selective (core attention) / full
  (uniform, one layer per group);
- the step: micro-batch, global batch = micro x accumulation x data-parallel, sequence length,
  ``--bf16``, ``--train-iters`` = the planned steps, no evaluation (``--eval-iters 0``: the plan
  prices training steps only) and no checkpoint saving (add ``--save``). The learning-rate schedule
  is not planned: a cosine schedule is written as a starting point.

Anything the planner priced that Megatron cannot express is a one-line ``PlannerError``.
No torch, no Megatron import.
"""

from __future__ import annotations

import math
import shlex

from planner.errors import PlannerError

MEGATRON_COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"
GPUS_PER_NODE = 8
PLACEHOLDERS = {"$DATA_PATH": "a Megatron indexed dataset prefix (tools/preprocess_data.py output, without .bin/.idx)",
                "$TOKENIZER_MODEL": "the model's Hugging Face tokenizer (folder or hub name)"}
_ROPE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The Llama 3.x RoPE scaling constants Megatron hard-codes (``RotaryEmbedding._apply_scaling`` defaults)."""
_RECOMPUTE = {"none": [], "selective": ["--recompute-granularity", "selective"],
              "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]}
_EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")


def _num(value) -> str:
    """A number as Megatron's parser reads it (ints without a decimal point)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _refuse(what: str) -> None:
    raise PlannerError(f"export megatron: {what}")


def _rope_arguments(config: dict, spec) -> list[str]:
    """Position embeddings: learned (GPT-2 style) or RoPE with its base, fraction and Llama 3.x scaling."""
    if spec.position_embeddings:
        return ["--position-embedding-type", "learned_absolute"]
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if not float(theta).is_integer():
        _refuse(f"rope_theta {theta} is not an integer, and Megatron's --rotary-base is one")
    out = ["--position-embedding-type", "rope", "--rotary-base", str(int(theta))]
    fraction = config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if fraction != 1.0:
        out += ["--rotary-percent", _num(fraction)]
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        kind = scaling.get("rope_type", scaling.get("type"))
        off = {k: scaling.get(k) for k, v in _ROPE_LLAMA3.items() if float(scaling.get(k, v)) != v}
        if kind != "llama3" or off:
            _refuse(f"RoPE scaling {kind} {off or ''} has no Megatron flag (--use-rope-scaling is Llama 3.x's with "
                    "factors 1/4 and context 8192): use a model without it")
        out += ["--use-rope-scaling", "--rope-scaling-factor", _num(scaling["factor"])]
    return out


def _bias_arguments(layer, spec) -> list[str]:
    """Megatron's two bias switches: every linear biased (its default), none (``--disable-bias-linear``),
    or only the fused QKV (``--add-qkv-bias`` on top, Qwen2's layout)."""
    qkv = {lin.bias for lin in layer.attention[:-1]}
    rest = {layer.attention[-1].bias} | {lin.bias for lin in layer.mlp}
    if spec.lm_head_bias:
        _refuse("the output layer has a bias, which Megatron's GPT model does not build")
    if qkv == rest == {True}:
        return []
    if rest == {False}:
        return ["--disable-bias-linear"] + (["--add-qkv-bias"] if qkv == {True} else [])
    return _refuse(f"the model's biases (QKV {sorted(qkv)}, others {sorted(rest)}) are not a Megatron layout")


def _activation_arguments(layer) -> list[str]:
    act = layer.hidden_act
    if layer.gated_mlp and act in ("silu", "swish"):
        return ["--swiglu"]
    if not layer.gated_mlp and act == "gelu":
        return []  # Megatron's default activation: torch's exact GELU
    if not layer.gated_mlp and act in ("gelu_new", "gelu_pytorch_tanh"):
        return ["--openai-gelu"]  # the tanh approximation
    return _refuse(f"the {'gated ' if layer.gated_mlp else ''}{act} MLP has no Megatron flag (it has --swiglu and GELU)")


def model_arguments(spec, setup) -> list[str]:
    """The shape of ``spec`` as Megatron's arguments (GPTModel with Transformer Engine layers)."""
    from planner.cost.memory.megatron_tensors import padded_vocab_size, unpriced_reason

    reason = unpriced_reason(spec)
    if reason:
        _refuse(reason.split(":")[0])
    layer = spec.layers[0]
    if any(other != layer for other in spec.layers[1:]):
        _refuse("the model's layers differ, and Megatron's --num-layers builds identical ones")
    config = spec.config
    eps = next((config[k] for k in _EPS_KEYS if config.get(k) is not None), None)
    if eps is None:
        _refuse(f"the config names no norm epsilon ({', '.join(_EPS_KEYS)})")
    if config.get("sliding_window") and config.get("use_sliding_window", True) and config["sliding_window"] < setup.seq_len:
        _refuse(f"sliding-window attention ({config['sliding_window']} tokens) is not priced for Megatron")
    hidden_dropout = spec.hidden_dropout if setup.dropout is None else setup.dropout
    attention_dropout = spec.attention_dropout if setup.dropout is None else setup.dropout
    if spec.embedding_dropout != spec.hidden_dropout and setup.dropout is None:
        _refuse("the embedding dropout differs from the hidden dropout; Megatron uses one for both")
    out = ["--num-layers", str(len(spec.layers)), "--hidden-size", str(spec.hidden_size),
           "--ffn-hidden-size", str(layer.intermediate_size), "--num-attention-heads", str(layer.num_heads)]
    if layer.num_kv_heads != layer.num_heads:
        out += ["--group-query-attention", "--num-query-groups", str(layer.num_kv_heads)]
    if layer.head_dim * layer.num_heads != spec.hidden_size:
        out += ["--kv-channels", str(layer.head_dim)]
    out += _activation_arguments(layer)
    out += ["--normalization", "RMSNorm" if layer.norm_kind == "rms" else "LayerNorm", "--norm-epsilon", _num(eps)]
    out += _rope_arguments(config, spec)
    out += [] if spec.tied_embeddings else ["--untie-embeddings-and-output-weights"]
    out += _bias_arguments(layer, spec)
    out += ["--max-position-embeddings", str(max(spec.max_position_embeddings or 0, setup.seq_len)),
            "--padded-vocab-size", str(padded_vocab_size(spec.vocab_size, setup.tensor_parallel)),
            "--hidden-dropout", _num(hidden_dropout), "--attention-dropout", _num(attention_dropout)]
    return out


def _pipeline_arguments(num_layers: int, setup) -> list[str]:
    """PP, and the planner's chunks (``parallel.stage_layers``): an even split as Megatron's default
    or ``--num-layers-per-virtual-pipeline-stage``, an uneven one as ``--pipeline-model-parallel-layout``
    (stage c of the string is chunk c, on rank c % pp, as the planner assigns it)."""
    pp, v = setup.pipeline_parallel, setup.virtual_stages
    out = ["--pipeline-model-parallel-size", str(pp)]
    if pp == 1:
        return out
    if setup.pipeline_schedule == "gpipe":
        _refuse("Megatron runs 1F1B (interleaved or not), not GPipe: re-plan with the 1f1b schedule")
    chunks = pp * v
    if chunks > num_layers:
        _refuse(f"{chunks} pipeline chunks for {num_layers} layers: use at most {num_layers}")
    if num_layers % chunks == 0:
        return out + (["--num-layers-per-virtual-pipeline-stage", str(num_layers // chunks)] if v > 1 else [])
    sizes = [num_layers // chunks + (1 if c < num_layers % chunks else 0) for c in range(chunks)]
    stages = [("E" if c == 0 else "") + f"t*{n}" + ("L" if c == chunks - 1 else "") for c, n in enumerate(sizes)]
    return out + ["--pipeline-model-parallel-layout", "|".join(stages)]


def layout_arguments(num_layers: int, setup) -> list[str]:
    """Tensor, pipeline, sequence and context parallelism, and the distributed optimizer."""
    if setup.zero not in (0, 1):
        _refuse(f"ZeRO-{setup.zero} is not Megatron's: its distributed optimizer is ZeRO-1 (re-plan with --zero 0,1)")
    if setup.expert_parallel > 1:
        _refuse("expert parallelism is not priced for Megatron")
    out = ["--tensor-model-parallel-size", str(setup.tensor_parallel)] + _pipeline_arguments(num_layers, setup)
    out += ["--sequence-parallel"] if setup.sequence_parallel else []
    out += ["--context-parallel-size", str(setup.context_parallel)]
    return out + (["--use-distributed-optimizer"] if setup.zero == 1 else [])


def _check_setup(setup) -> None:
    if setup.stack != "megatron":
        _refuse(f"it needs a megatron set-up (--stacks megatron), not {setup.stack!r}")
    if setup.method != "full":
        _refuse(f"Megatron pre-trains every parameter: it needs method full, not {setup.method}")
    if setup.precision not in ("bf16-mixed", "fp32"):
        _refuse(f"Megatron trains in bf16 mixed precision (--bf16) or fp32, not {setup.precision}")
    if setup.optimizer != "adamw":
        _refuse(f"the plan's optimizer {setup.optimizer!r} is not Megatron's Adam: re-plan with --optimizers adamw")
    for field, words in (("compile", "torch.compile"), ("float8", "float8 training"),
                         ("activation_offload", "activation offloading"), ("offload_optimizer", "optimizer offload"),
                         ("optimizer_in_backward", "the optimizer step in backward")):
        if getattr(setup, field):
            _refuse(f"{words} is not priced for Megatron")
    if setup.attention != "sdpa":
        _refuse(f"attention {setup.attention!r}: Megatron is priced with its fused (flash) attention")
    if setup.checkpointing not in _RECOMPUTE:
        _refuse(f"checkpointing {setup.checkpointing!r} has no Megatron recompute mode")


def megatron_arguments(model: str, setup, steps: int) -> list[str]:
    """``pretrain_gpt.py``'s arguments for ``setup`` (shell variables ``$DATA_PATH`` and
    ``$TOKENIZER_MODEL`` stand for the paths, ``PLACEHOLDERS``)."""
    from planner.specs.catalog import load_spec

    _check_setup(setup)
    spec = load_spec(model)
    global_batch = setup.micro_batch * setup.grad_accum * setup.data_parallel
    warmup = max(1, min(2000, steps // 100))
    return [
        *model_arguments(spec, setup), *layout_arguments(len(spec.layers), setup), *_RECOMPUTE[setup.checkpointing],
        "--micro-batch-size", str(setup.micro_batch), "--global-batch-size", str(global_batch),
        "--seq-length", str(setup.seq_len), *(["--bf16"] if setup.precision == "bf16-mixed" else []),
        "--optimizer", "adam", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--train-iters", str(int(steps)), "--lr", "0.0003", "--min-lr", "3e-05",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(warmup),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "$TOKENIZER_MODEL",
        "--data-path", "$DATA_PATH", "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "10",
    ]


def nodes_of(num_gpus: int) -> tuple[int, int]:
    """(GPUs per node, nodes): ``min(gpus, 8)`` processes on each of ``ceil(gpus / 8)`` nodes."""
    per_node = min(num_gpus, GPUS_PER_NODE)
    if num_gpus % per_node:
        _refuse(f"{num_gpus} GPUs do not fill nodes of {GPUS_PER_NODE}: use a multiple of {GPUS_PER_NODE}")
    return per_node, num_gpus // per_node


def _shell_word(arg: str) -> str:
    return f'"{arg}"' if arg in PLACEHOLDERS else shlex.quote(arg)


def launch_script(model: str, setup, steps: int) -> str:
    """The bash script: the placeholders to set, then ``torchrun ... pretrain_gpt.py <arguments>``."""
    args = megatron_arguments(model, setup, steps)
    per_node, nodes = nodes_of(setup.num_gpus)
    master = "${MASTER_ADDR:-localhost}" if nodes == 1 else "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
    rank = "${NODE_RANK:-0}" if nodes == 1 else "${NODE_RANK:?set NODE_RANK to this node's index}"
    lines = ["#!/bin/bash",
             f"# Megatron-LM (commit {MEGATRON_COMMIT[:7]}) pretrain_gpt.py run planned by `planner plan`: {model},",
             f"# {setup.num_gpus} GPUs = TP {setup.tensor_parallel} x PP {setup.pipeline_parallel} x CP "
             f"{setup.context_parallel} x DP {setup.data_parallel}, {steps} steps. Set before launching, on every node:",
             "#   MASTER_ADDR  address of node 0;  NODE_RANK  this node's index (0 .. nnodes-1);",
             *(f"#   {name[1:]}  {words};" for name, words in PLACEHOLDERS.items()),
             "#   MEGATRON_LM  the Megatron-LM checkout (default: the current folder).",
             "# Not planned: the learning-rate schedule (a cosine starting point); add --save DIR to keep checkpoints.",
             "set -euo pipefail",
             'export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron asserts it under TP/CP before Blackwell',
             ': "${DATA_PATH:?set DATA_PATH}" "${TOKENIZER_MODEL:?set TOKENIZER_MODEL}"',
             f"torchrun --nproc_per_node {per_node} --nnodes {nodes} --node_rank \"{rank}\" "
             f"--master_addr \"{master}\" --master_port \"${{MASTER_PORT:-6000}}\" \\",
             '  "${MEGATRON_LM:-.}/pretrain_gpt.py" \\']
    words = [_shell_word(a) for a in args]
    groups, current = [], []
    for word, arg in zip(words, args, strict=True):
        if arg.startswith("--") and current:
            groups.append(current)
            current = []
        current.append(word)
    groups.append(current)
    lines += ["  " + " ".join(g) + (" \\" if i < len(groups) - 1 else "") for i, g in enumerate(groups)]
    return "\n".join(lines) + "\n"


def megatron_files(c, path) -> list:
    """``<stem>.sh``: the executable launch script of the recommended run (a ``Candidate``)."""
    import os
    from pathlib import Path

    from planner.errors import writable_file
    from planner.search.stacks import candidate_setup

    if c.stack != "megatron":
        _refuse(f"the recommended run is on stack {c.stack}, not megatron: re-plan with --stacks megatron")
    text = launch_script(c.model, candidate_setup(c), int(math.ceil(c.steps)))
    path = Path(path)
    script = writable_file(path if path.suffix == ".sh" else path.with_suffix(".sh"), "export")
    script.write_text(text)
    os.chmod(script, 0o755)
    return [script]
