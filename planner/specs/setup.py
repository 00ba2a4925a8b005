"""Set-ups: frozen pydantic models of what a user asks to run (a training or a serving set-up).

Field names carry units (``_bytes``, ``_flops``, ``_s``) and are SI. The model architecture is
``planner.specs.model.ModelSpec``; the hardware ``planner.specs.hardware.GpuSpec``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planner.errors import PlannerError
from planner.specs.vocabulary import (
    ALL_LINEAR,
    ATTENTIONS,
    CHECKPOINTINGS,
    MAX_COUNT,
    MAX_NUM_GPUS,
    METHODS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
    AdapterDtype,
    Attention,
    Checkpointing,
    LossImpl,
    Method,
    Optimizer,
    OptimizerImpl,
    PipelineSchedule,
    Precision,
    Stack,
)

if TYPE_CHECKING:
    from planner.specs.architecture import ModelSpec

__all__ = ["ALL_LINEAR", "ATTENTIONS", "CHECKPOINTINGS", "METHODS", "OPTIMIZERS", "OPTIMIZER_IMPLS", "PRECISIONS",
           "STACK_FIELDS", "InferenceSetup", "TrainingSetup", "check_setup"]

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


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
    micro_batch: int = Field(1, gt=0, le=MAX_COUNT, description="sequences per micro-batch per GPU")
    seq_len: int = Field(2048, gt=0, le=MAX_COUNT, description="tokens per sequence")
    checkpointing: Checkpointing = "none"
    attention: Attention = "sdpa"
    lora_rank: int = Field(16, gt=0, le=MAX_COUNT)
    lora_targets: tuple[str, ...] = Field(
        (ALL_LINEAR,), description="'all-linear' or module names such as q_proj, v_proj"
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="peft LoraConfig.lora_dropout")
    qlora_block_size: int = Field(64, gt=0, le=MAX_COUNT, description="NF4 quantization block (bitsandbytes: 64)")
    qlora_double_quant: bool = Field(True, description="quantize the absmax constants (QLoRA paper)")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="override every dropout of the config; None: as the config says"
    )
    num_gpus: int = Field(1, gt=0, le=MAX_NUM_GPUS)
    zero: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage: DeepSpeed ZeRO-1/2/3 on stack hf (what the exports launch, its buffers "
        "priced by planner.cost.memory.zero_buffers); FSDP2 full shard (3) on torchtitan and torchtune; on megatron 1 is "
        "Megatron's distributed optimizer (--use-distributed-optimizer: fp32 master weights and Adam moments "
        "sharded over data x context parallel, the fp32 gradient buffer whole)")
    tensor_parallel: int = Field(1, gt=0, le=MAX_NUM_GPUS)
    offload_optimizer: bool = Field(False, description="optimizer states (and fp32 master) in CPU memory")
    grad_accum: int = Field(1, gt=0, le=MAX_COUNT, description="micro-batches per optimizer step")
    # --- the stack and its recipe techniques (issue 10); each is priced by planner.cost or refused
    stack: Stack = "hf"
    loss_impl: LossImpl = "standard"
    loss_chunks: int = Field(8, gt=0, le=4096, description="chunks of the chunked cross-entropy")
    optimizer_in_backward: bool = Field(False, description="step each parameter in its gradient hook, free the gradient")
    activation_offload: bool = Field(False, description="saved activations of checkpointed layers kept in CPU memory")
    packed: bool = Field(False, description="sequences packed into micro_batch x seq_len tokens, no padding")
    compile: bool = Field(False, description="torch.compile: fused elementwise kernels save fewer tensors")
    float8: bool = Field(False, description="torchao float8 training: linears in fp8 with dynamic scaling")
    float8_all_gather: bool = Field(
        False, description="torchao float8: FSDP2 all-gathers the fp8 linears' weights in fp8 (enable_fsdp_float8_all_gather)"
    )
    dora: bool = Field(False, description="DoRA: LoRA with a learned magnitude per output (peft use_dora)")
    galore_rank: int = Field(128, gt=0, le=MAX_COUNT, description="GaLore projection rank (optimizer galore-adamw)")
    kbit_preparation: bool = Field(
        False, description="peft prepare_model_for_kbit_training: fp32 embeddings, norms and head (QLoRA recipes)"
    )
    adapter_dtype: AdapterDtype = "auto"
    modules_to_save: tuple[str, ...] = Field((), description="peft modules_to_save: fully trained, e.g. embed_tokens, lm_head")
    checkpoint_early_stop: bool | None = Field(
        None, description="activation checkpointing stops recomputing once backward has what it needs (torch's "
        "non-reentrant default); None: the stack's (torchtitan 0.3.0 passes early_stop=False; priced in FLOPs and time)")
    # --- parallel layout beyond data parallel, ZeRO and tensor parallel (issue 10)
    pipeline_parallel: int = Field(1, gt=0, le=MAX_NUM_GPUS, description="pipeline stages")
    pipeline_schedule: PipelineSchedule = "1f1b"
    virtual_stages: int = Field(1, gt=0, le=1024, description="model chunks per pipeline rank (interleaved)")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism within the tensor-parallel group")
    context_parallel: int = Field(1, gt=0, le=MAX_NUM_GPUS, description="ring-attention context-parallel degree")
    expert_parallel: int = Field(1, gt=0, le=MAX_NUM_GPUS, description="experts sharded over this many GPUs")

    @field_validator("lora_targets", "modules_to_save", mode="before")
    @classmethod
    def _split_targets(cls, value):
        if isinstance(value, str):
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        return tuple(value)

    @model_validator(mode="after")
    def _check_consistency(self):
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if self.num_gpus % model_parallel:
            raise ValueError(
                f"num_gpus={self.num_gpus} is not a multiple of tensor_parallel x pipeline_parallel x "
                f"context_parallel = {model_parallel}: use a GPU count that is a multiple of {model_parallel} "
                f"(num_gpus / --num-gpus {model_parallel * max(1, -(-self.num_gpus // model_parallel))}), or smaller degrees"
            )
        _check_layout_flags(self)
        if not self.lora_targets:
            raise ValueError("lora_targets is empty: use 'all-linear' or names such as q_proj,v_proj")
        if self.method == "qlora" and self.precision == "fp32":
            raise ValueError(
                "QLoRA computes in bf16 (NF4 weights dequantized to bf16, bf16 head and embeddings, as published); "
                "precision fp32 is not QLoRA: use precision bf16 with qlora, or method lora for fp32"
            )
        return self

    @property
    def data_parallel(self) -> int:
        """GPUs that hold the same model shard and see different data."""
        return self.num_gpus // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    @property
    def is_hf_baseline(self) -> bool:
        """Whether every field added for real stacks and layouts keeps its default (the Hugging Face
        eager stack on data, ZeRO and tensor parallelism that the first memory model described)."""
        defaults = TrainingSetup.model_fields
        return all(getattr(self, name) == defaults[name].default for name in STACK_FIELDS)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len


STACK_FIELDS: tuple[str, ...] = (
    "stack", "loss_impl", "optimizer_in_backward", "activation_offload", "packed", "compile", "float8",
    "float8_all_gather", "dora",
    "kbit_preparation", "adapter_dtype", "modules_to_save", "checkpoint_early_stop", "pipeline_parallel", "virtual_stages",
    "sequence_parallel", "context_parallel", "expert_parallel",
)
"""Fields of ``TrainingSetup`` beyond the Hugging Face eager baseline (``is_hf_baseline``)."""


def _check_layout_flags(setup: TrainingSetup) -> None:
    """Flags that mean nothing alone: a one-line error that says what they need."""
    if setup.sequence_parallel and setup.tensor_parallel == 1:
        raise ValueError("sequence_parallel splits the tensor-parallel group's activations: it needs tensor_parallel > 1")
    if setup.virtual_stages > 1 and setup.pipeline_schedule != "interleaved":
        raise ValueError("virtual_stages > 1 is the interleaved 1F1B schedule: set pipeline_schedule interleaved")
    if setup.virtual_stages > 1 and setup.pipeline_parallel == 1:
        raise ValueError("virtual_stages > 1 needs pipeline_parallel > 1")
    replicas = setup.data_parallel * setup.context_parallel
    if replicas % setup.expert_parallel:
        raise ValueError(
            f"expert_parallel={setup.expert_parallel} must divide the {replicas} data-parallel x context-parallel GPUs "
            f"(num_gpus / (tensor_parallel x pipeline_parallel)): use a divisor of {replicas}"
        )
    if setup.context_parallel > 1 and setup.attention == "eager":
        raise ValueError("context_parallel runs ring attention, a blockwise (flash) kernel: use attention sdpa")
    if setup.dora and setup.method == "full":
        raise ValueError("DoRA adapts a frozen model: use method lora or qlora with dora")
    if setup.optimizer_in_backward and setup.grad_accum > 1:
        raise ValueError(
            "optimizer_in_backward steps during each backward, so gradients cannot accumulate: use grad_accum 1"
        )
    if setup.galore_rank != 128 and setup.optimizer != "galore-adamw":
        raise ValueError("galore_rank applies to optimizer galore-adamw")


class InferenceSetup(_Frozen):
    """Serving: weights, KV cache of ``batch`` sequences of ``context_len`` tokens, prefill."""

    batch: int = Field(1, gt=0, le=MAX_COUNT)
    context_len: int = Field(4096, gt=0, le=MAX_COUNT)
    weight_dtype: Literal["bf16", "fp16", "fp32", "int8", "nf4"] = "bf16"
    kv_dtype: Literal["bf16", "fp16", "fp32", "fp8", "int8"] = "bf16"
    prefill_chunk: int | None = Field(None, gt=0, le=MAX_COUNT, description="tokens per prefill chunk; None: whole prompt")
    num_gpus: int = Field(1, gt=0, le=MAX_NUM_GPUS)
    tensor_parallel: int = Field(1, gt=0, le=MAX_NUM_GPUS)


# ------------------------------------------------------------------------------ set-up x model


def check_setup(spec: ModelSpec, setup: TrainingSetup) -> None:
    """What a set-up asks of this model, checked before anything is estimated: a one-line error
    that says what would work for a sequence past the model's context, a tensor-parallel degree
    that splits heads, a LoRA rank above the adapted matrices' smaller side, or ZeRO with one
    data-parallel GPU (it would shard over one GPU and change nothing)."""
    context = spec.max_position_embeddings
    if context and setup.seq_len > context:
        raise PlannerError(
            f"sequence length {setup.seq_len} is longer than {spec.name}'s context of {context} tokens "
            f"(max_position_embeddings in its config.json): use --seq-len {context} or less, or a model with a longer context"
        )
    _check_tensor_parallel(spec, setup.tensor_parallel)
    if setup.method != "full":
        _check_lora_rank(spec, setup)
    _check_parallel_layout(spec, setup)
    if setup.zero and setup.data_parallel * setup.context_parallel == 1 and not setup.offload_optimizer:
        raise PlannerError(
            f"ZeRO-{setup.zero} shards model states over the data-parallel GPUs and this set-up has one "
            f"({setup.num_gpus} GPU(s), tensor parallel {setup.tensor_parallel}), so it would change nothing: "
            "use --zero 0, more GPUs (--num-gpus), or --offload-optimizer (ZeRO-Offload)"
        )


def _check_parallel_layout(spec: ModelSpec, setup: TrainingSetup) -> None:
    """Pipeline stages need a layer each (and, under DeepSpeed, ZeRO-0/1); context parallelism
    splits each sequence into 2 x cp chunks (the load-balanced causal split of Megatron-LM and
    torchtitan); expert parallelism needs experts to spread."""
    if setup.stack == "hf" and setup.pipeline_parallel > 1 and setup.zero >= 2:
        # deepspeed/runtime/pipe/engine.py asserts it: "ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism"
        raise PlannerError(
            f"pipeline parallel {setup.pipeline_parallel} with ZeRO-{setup.zero}: DeepSpeed's pipeline engine runs "
            "ZeRO-0/1 only: use --zero 1 with pipeline stages, or --pipeline-parallel 1 with ZeRO-2/3"
        )
    chunks = setup.pipeline_parallel * setup.virtual_stages
    if chunks > spec.num_layers:
        raise PlannerError(
            f"pipeline parallel {setup.pipeline_parallel} x virtual stages {setup.virtual_stages} = {chunks} chunks for "
            f"{spec.name}'s {spec.num_layers} layers: use at most {spec.num_layers} (each chunk needs a layer)"
        )
    cp = setup.context_parallel
    if cp > 1 and setup.seq_len % (2 * cp):
        raise PlannerError(
            f"context parallel {cp} splits each sequence into {2 * cp} chunks and --seq-len {setup.seq_len} does not "
            f"divide: use a multiple of {2 * cp}"
        )
    experts = {layer.num_experts for layer in spec.layers if layer.num_experts}
    ep = setup.expert_parallel
    if ep > 1 and not experts:
        raise PlannerError(f"expert parallel {ep} needs a mixture-of-experts model; {spec.name} is dense: use 1")
    if ep > 1 and any(n % ep for n in experts):
        raise PlannerError(
            f"expert parallel {ep} does not divide {spec.name}'s {min(experts)} experts: use a divisor of {min(experts)}"
        )


def _check_tensor_parallel(spec: ModelSpec, tp: int) -> None:
    """Megatron-style tensor parallelism gives each GPU whole query heads and whole key/value heads."""
    heads = sorted({(layer.num_heads, layer.num_kv_heads) for layer in spec.layers})
    if tp == 1 or all(q % tp == 0 and kv % tp == 0 for q, kv in heads):
        return
    common = math.gcd(*(n for pair in heads for n in pair))
    degrees = [d for d in range(1, common + 1) if common % d == 0]
    q, kv = heads[0]
    raise PlannerError(
        f"tensor parallel {tp} does not divide {spec.name}'s {q} attention heads and {kv} key/value heads "
        f"(each GPU holds whole heads): use a tensor-parallel degree of {', '.join(map(str, degrees))}"
    )


def _check_lora_rank(spec: ModelSpec, setup: TrainingSetup) -> None:
    """A rank above min(in, out) of an adapted projection gives the adapter more parameters than
    the matrix and no more expressiveness (Hu et al. 2021 use ranks 1 to 64). Routers and scalar
    gates (a mixture of experts' few outputs) are left out: all-linear adapts them at any rank."""
    from planner.specs.architecture import lora_targets

    routers = {layer.router for layer in spec.layers if layer.router is not None}
    adapted = [pair for pair in lora_targets(spec, setup.lora_targets)
               if pair[1] not in routers and pair[1].out_features > 1]
    if not adapted:  # routers and scalar gates alone: peft adapts them at whatever rank it is given
        return
    _, small = min(adapted, key=lambda pair: min(pair[1].in_features, pair[1].out_features))
    side = min(small.in_features, small.out_features)
    if setup.lora_rank > side:
        raise PlannerError(
            f"LoRA rank {setup.lora_rank} is larger than the smallest adapted matrix of {spec.name} ({small.name}: "
            f"{small.in_features} -> {small.out_features}): use --lora-rank {side} or less (typically 8 to 64)"
        )
