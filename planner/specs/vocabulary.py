"""The vocabulary of set-ups: the accepted values of each choice, as ``Literal`` types for the
pydantic models and as tuples for command-line choices.

Kept apart from the models so that parsing a command line (``planner --help``) needs no pydantic.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["full", "lora", "qlora"]
Precision = Literal["fp32", "bf16", "bf16-mixed", "fp16", "fp16-mixed"]
"""``bf16``/``fp16``: weights, gradients and states in the 16-bit type; ``*-mixed``: fp32 weights
with autocast (fp16-mixed adds a GradScaler's loss scaling, for GPUs without bf16: T4, V100)."""
Optimizer = Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw", "galore-adamw", "adafactor", "sgd", "lion"]
OptimizerImpl = Literal["foreach", "fused", "for-loop"]
Checkpointing = Literal["none", "full", "selective"]
"""``selective``: the stack's own selective mode (op-level SAC in HF and torchtitan: keep matmul and
attention outputs; Megatron: recompute the attention core, Korthikanti et al. 2022)."""
Attention = Literal["sdpa", "eager"]
Stack = Literal["hf", "torchtune", "torchtitan", "megatron"]
"""The training stack whose model code and recipes run: Hugging Face transformers + peft (+ Trainer,
accelerate or DeepSpeed), torchtune, torchtitan, Megatron-style (Megatron-LM, NeMo)."""
LossImpl = Literal["standard", "chunked", "fused-linear", "compiled"]
"""The cross-entropy: logits materialised whole (``standard``), in chunks (torchtune's
CEWithChunkedOutputLoss), fused with the output projection (Liger, Unsloth, Megatron), or whole but
under ``torch.compile`` (``compiled``: torchtitan's loss when ``compile.components`` holds "loss")."""
PipelineSchedule = Literal["1f1b", "interleaved", "gpipe"]
AdapterDtype = Literal["auto", "fp32", "base"]
"""LoRA adapter weights as the stack keeps them (``auto``: peft fp32, torchtune the model dtype), in
fp32 (peft's default ``autocast_adapter_dtype=True``) or in the base model's dtype (peft
``autocast_adapter_dtype=False``, torchtune)."""

METHODS: tuple[str, ...] = Method.__args__
PRECISIONS: tuple[str, ...] = Precision.__args__
OPTIMIZERS: tuple[str, ...] = Optimizer.__args__
OPTIMIZER_IMPLS: tuple[str, ...] = OptimizerImpl.__args__
CHECKPOINTINGS: tuple[str, ...] = Checkpointing.__args__
ATTENTIONS: tuple[str, ...] = Attention.__args__
STACKS: tuple[str, ...] = Stack.__args__
LOSS_IMPLS: tuple[str, ...] = LossImpl.__args__
PIPELINE_SCHEDULES: tuple[str, ...] = PipelineSchedule.__args__
ADAPTER_DTYPES: tuple[str, ...] = AdapterDtype.__args__

# peft's "all-linear" shorthand: every nn.Linear of the decoder layers (not the output head).
ALL_LINEAR = "all-linear"

# Bounds of a set-up's counts, checked where they are parsed (``planner.cli.train``) and by the
# pydantic models (``planner.specs.setup``).
MAX_COUNT = 2**24
"""Largest sequence length, micro-batch, rank or accumulation accepted (16,777,216): beyond any
real run, and small enough that products such as batch x sequence^2 stay exact in int64 and float64."""
MAX_NUM_GPUS = 2**18
"""Largest GPU count accepted (262,144): the largest training clusters built hold a few hundred
thousand GPUs at most; a million GPUs is a typo, not a plan."""
