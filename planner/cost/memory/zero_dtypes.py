"""The dtypes DeepSpeed ZeRO gives a model's parameters on the Hugging Face stack (HF Trainer + DeepSpeed 0.19.8).

``planner.cost.memory.states`` prices the weights, gradients, fp32 master and optimizer states of LoRA,
DoRA and QLoRA under ZeRO with these bytes per element; ``planner.cost.memory.zero_buffers`` prices the
buckets and copies on top. Read from DeepSpeed 0.19.8's code and checked by running it on the CPU
accelerator (``benchmarks/zero_oracle_cpu.py``, LORA/DORA/QLORA modes; ZERO_ORACLE_LORA in
``tests/test_zero_buffers.py``, compared in ``tests/test_zero_lora.py``):

- ZeRO-1/2: ``DeepSpeedEngine._configure_distributed_model`` (``runtime/engine.py``) casts every floating
  parameter to the engine's dtype (``_cast_module_mixed_precision``: bf16 with ``"bf16": {"enabled":
  true}``, fp16 with ``"fp16"``, fp32 with neither), frozen base weights and peft's fp32 adapters alike
  (bitsandbytes' uint8 NF4 storage is not a castable dtype and stays). The optimizer flattens the
  trainable parameters into 16-bit groups and keeps an fp32 clone of this rank's partition
  (``stage_1_and_2.py``: ``weights_partition = ....clone().to(master dtype)``: a second copy even in fp32).
- ZeRO-3: the HF Trainer builds the model inside ``deepspeed.zero.Init`` (``from_pretrained`` under
  ``is_deepspeed_zero3_enabled``), which partitions every parameter at the engine's dtype; peft adds the
  adapters afterwards in fp32 (``autocast_adapter_dtype=True``) and the engine skips its cast for a
  zero-init model, so ``DeepSpeedZeRoOffload._convert_to_zero_parameters`` partitions them as fp32:
  the optimizer's "fp16" groups are then fp32 and it keeps no second copy (``stage3.py``: the flat
  group is reused when its dtype is the master dtype). Frozen weights are partitioned too (all of them).
- the inner optimizer steps the fp32 partition: its states are fp32 at every precision.
"""

from __future__ import annotations

FP32_BYTES = 4.0


def launched_by_deepspeed(setup) -> bool:
    """DeepSpeed ZeRO runs the Hugging Face stack's ZeRO set-ups (``hf_trainer_kwargs`` and
    ``accelerate_config`` launch them through DeepSpeed); torchtitan's ``zero`` is FSDP2 and Megatron's
    its distributed optimizer, priced elsewhere. Pipeline stages are not DeepSpeed-launched here."""
    return setup.stack == "hf" and setup.zero > 0 and setup.pipeline_parallel == 1


def engine_dtype_bytes(setup) -> float:
    """Bytes of DeepSpeed's model dtype: 2 with its bf16 or fp16 block (the HF Trainer's ``bf16``/``fp16``
    fill them: precisions bf16, bf16-mixed, fp16, fp16-mixed), 4 in fp32."""
    return FP32_BYTES if setup.precision == "fp32" else 2.0


def adapter_param_bytes(setup) -> float:
    """Bytes per adapter element (LoRA A/B, DoRA magnitudes) under DeepSpeed: the engine's dtype at ZeRO-1/2
    (it casts every parameter); at ZeRO-3 peft's own dtype, fp32 (``autocast_adapter_dtype=True``: adapter
    dtype auto or fp32) or the base layer's, which zero.Init made the engine's dtype (adapter dtype base)."""
    if setup.zero < 3 or setup.adapter_dtype == "base":
        return engine_dtype_bytes(setup)
    return FP32_BYTES


def master_copy_bytes(setup, param_bytes: float) -> float:
    """Bytes per trainable element of DeepSpeed's fp32 partition beside the parameters of ``param_bytes``:
    ZeRO-1/2 always clone it (``single_partition_of_fp32_groups``, fp32 included); ZeRO-3 only when the
    parameters are not fp32 already (``fp32_partitioned_groups_flat``)."""
    return FP32_BYTES if setup.zero < 3 or param_bytes != FP32_BYTES else 0.0


def frozen_weight_bytes(setup) -> float:
    """Bytes per frozen floating element (LoRA's whole base; QLoRA's embeddings, norms and head): the engine's
    dtype. ZeRO-1/2 cast peft's k-bit preparation's fp32 back to it; ZeRO-3 created them at it (zero.Init)."""
    return engine_dtype_bytes(setup)


def unpriced_reason(setup) -> str | None:
    """What DeepSpeed launches but this module does not price, in one line (None when priced).

    DoRA under ZeRO-3: peft's DoRA reads each adapted base weight outside DeepSpeed's fetch hooks (its
    weight norm), and those weights stay gathered; run on DeepSpeed 0.19.8 (``benchmarks/zero_oracle_cpu.py``
    DORA=1 at stage 3, 2 ranks) every phase held 16-33% more than LoRA's pricing gives, more than a known
    term accounts for."""
    if setup.dora and setup.zero == 3 and launched_by_deepspeed(setup):
        return ("dora with zero 3 on stack hf: not priced (peft's DoRA keeps DeepSpeed ZeRO-3's gathered base "
                "weights live; measured 16-33% above that price): use --zero 1 or 2, or LoRA without --dora")
    return None


def stage1_gradients_partitioned(setup) -> bool:
    """Whether DeepSpeed's ZeRO-1 leaves only this rank's gradient partition, as ZeRO-2 does. With
    ``overlap_comm`` (the exported configuration, ``zero_buffers.exported_config``) its gradient hooks run
    ``reduce_ready_partitions_and_remove_grads`` at every accumulation boundary (``stage_1_and_2.py``:
    ``if self.partition_gradients or self.overlap_comm``), reducing each bucket into the partition and
    freeing the gradients; with one micro-batch per step every backward is a boundary. With accumulation the
    other micro-batches keep whole gradients. Measured: full training on 2 ranks, ZeRO-1 and ZeRO-2 held the
    same optimizer-phase peak (ZERO_ORACLE_LORA)."""
    return setup.zero == 1 and launched_by_deepspeed(setup) and setup.grad_accum == 1
