"""Set-ups: frozen pydantic models of what a user asks to run (a training or a serving set-up).

Field names carry units (``_bytes``, ``_flops``, ``_s``) and are SI. The model architecture is
``planner.specs.model.ModelSpec``; the hardware ``planner.specs.hardware.GpuSpec``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planner.specs.vocabulary import (
    ALL_LINEAR,
    ATTENTIONS,
    CHECKPOINTINGS,
    METHODS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    Attention,
    Checkpointing,
    Method,
    Optimizer,
    OptimizerImpl,
    Precision,
)

__all__ = ["ALL_LINEAR", "ATTENTIONS", "CHECKPOINTINGS", "METHODS", "OPTIMIZERS", "OPTIMIZER_IMPLS", "PRECISIONS",
           "InferenceSetup", "TrainingSetup"]

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainingSetup(_Frozen):
    """One training configuration of one model on one (or N) GPUs.

    Defaults follow the contract of ``planner estimate``: SDPA attention, AdamW with the
    foreach step, no checkpointing, dropout as the model's config says.
    """

    method: Method = "full"
    precision: Precision = "bf16"
    optimizer: Optimizer = "adamw"
    optimizer_impl: OptimizerImpl = Field(
        "foreach", description="AdamW/SGD/Lion step: torch's foreach (default), fused, or for-loop"
    )
    micro_batch: int = Field(1, gt=0, description="sequences per micro-batch per GPU")
    seq_len: int = Field(2048, gt=0, description="tokens per sequence")
    checkpointing: Checkpointing = "none"
    attention: Attention = "sdpa"
    lora_rank: int = Field(16, gt=0)
    lora_targets: tuple[str, ...] = Field(
        (ALL_LINEAR,), description="'all-linear' or module names such as q_proj, v_proj"
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="peft LoraConfig.lora_dropout")
    qlora_block_size: int = Field(64, gt=0, description="NF4 quantization block (bitsandbytes: 64)")
    qlora_double_quant: bool = Field(True, description="quantize the absmax constants (QLoRA paper)")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="override every dropout of the config; None: as the config says"
    )
    num_gpus: int = Field(1, gt=0)
    zero: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage (3 = FSDP full shard)")
    tensor_parallel: int = Field(1, gt=0)
    offload_optimizer: bool = Field(False, description="optimizer states (and fp32 master) in CPU memory")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, value):
        if isinstance(value, str):
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        return tuple(value)

    @model_validator(mode="after")
    def _check_consistency(self):
        if self.num_gpus % self.tensor_parallel:
            raise ValueError(
                f"num_gpus={self.num_gpus} is not a multiple of tensor_parallel={self.tensor_parallel}"
            )
        if not self.lora_targets:
            raise ValueError("lora_targets is empty: use 'all-linear' or names such as q_proj,v_proj")
        return self

    @property
    def data_parallel(self) -> int:
        return self.num_gpus // self.tensor_parallel

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len


class InferenceSetup(_Frozen):
    """Serving: weights, KV cache of ``batch`` sequences of ``context_len`` tokens, prefill."""

    batch: int = Field(1, gt=0)
    context_len: int = Field(4096, gt=0)
    weight_dtype: Literal["bf16", "fp16", "fp32", "int8", "nf4"] = "bf16"
    kv_dtype: Literal["bf16", "fp16", "fp32", "fp8", "int8"] = "bf16"
    prefill_chunk: int | None = Field(None, gt=0, description="tokens per prefill chunk; None: whole prompt")
    num_gpus: int = Field(1, gt=0)
    tensor_parallel: int = Field(1, gt=0)
