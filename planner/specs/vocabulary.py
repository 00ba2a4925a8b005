"""The vocabulary of set-ups: the accepted values of each choice, as ``Literal`` types for the
pydantic models and as tuples for command-line choices.

Kept apart from the models so that parsing a command line (``planner --help``) needs no pydantic.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["full", "lora", "qlora"]
Precision = Literal["fp32", "bf16", "bf16-mixed"]
Optimizer = Literal["adamw", "adamw-8bit", "adafactor", "sgd", "lion"]
OptimizerImpl = Literal["foreach", "fused", "for-loop"]
Checkpointing = Literal["none", "full", "selective"]
Attention = Literal["sdpa", "eager"]

METHODS: tuple[str, ...] = Method.__args__
PRECISIONS: tuple[str, ...] = Precision.__args__
OPTIMIZERS: tuple[str, ...] = Optimizer.__args__
OPTIMIZER_IMPLS: tuple[str, ...] = OptimizerImpl.__args__
CHECKPOINTINGS: tuple[str, ...] = Checkpointing.__args__
ATTENTIONS: tuple[str, ...] = Attention.__args__

# peft's "all-linear" shorthand: every nn.Linear of the decoder layers (not the output head).
ALL_LINEAR = "all-linear"
