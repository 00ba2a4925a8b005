"""The training stacks the plan searches (``PlanRequest.stacks``) and what each turns on.

The Hugging Face stack is the search's historical one (``planner.search.setups``: mixed or pure
bf16, every requested optimizer the memory model prices, checkpointing, ZeRO, tensor parallelism
and pipelines). The other stacks enter as variants (``stack_variants``) of their recipes' knobs
that both the memory model (``planner.cost.support.MEMORY_PRICED_BY_STACK``) and the step-time
model (``TIME_PRICED``) price, read from those tables:

- torchtune (fine-tuning only, its 0.6 recipes): one dtype (bf16, fp32 on a GPU without bf16),
  chunked cross-entropy (``CEWithChunkedOutputLoss``), AdamW with ``fused: True``; with 8-bit
  optimizers asked for, bitsandbytes' AdamW8bit and the single-device recipe's PagedAdamW8bit
  stepped in backward (``optimizer_in_bwd: True``: only where one micro-batch fills the step);
  ``compile`` on and off; ``dataset.packed`` as the request says; checkpointing none or full
  (whole layers), the latter also with activation offloading (``enable_activation_offloading``);
  one GPU or FSDP2 (ZeRO-3), no tensor parallelism or pipeline.
- torchtitan (full training only): FSDP2 mixed precision (bf16-mixed), fused AdamW,
  checkpointing none, selective (per-op) or full, ``compile.enable`` on and off, one GPU or FSDP2;
  the compiled variant with the compiled cross-entropy (``titan_loss_impl``: 0.3 compiles the loss).

Twins: the step-time model never makes an eager variant faster than its compiled twin (fused
memory-bound work, fewer host ops), nor an offloading one faster than its twin that keeps the
activations on the GPU, so the search evaluates the twins first and keeps a variant only where it
fits and its twins do not (QLoRA compiled keeps its dequantized weights,
``planner.cost.memory.torchtune_tensors``); ``twins_of`` names them.

A stack that cannot price a model (``unpriced_reason``) is skipped for that model, silently unless
it is the only stack asked for (``check_stacks``: a one-line refusal).
"""

from __future__ import annotations

from planner.errors import PlannerError

PLAN_STACKS = ("hf", "torchtune", "torchtitan", "megatron")
_CHECKPOINTING = {"torchtune": ("none", "full"), "torchtitan": ("none", "selective", "full"),
                  "megatron": ("none", "selective", "full")}
_ZERO = {"torchtune": (3,), "torchtitan": (0, 3), "megatron": (0, 1)}
"""Data-parallel sharding each stack runs on several GPUs: FSDP2 (3; torchtitan also replicates its FSDP2
module over the GPUs, data_parallel_replicate_degree: 0), or Megatron's distributed optimizer (1)."""


def unpriced_reason(stack: str, spec, pretrain: bool) -> str | None:
    """Why ``stack`` cannot run ``spec`` in this plan (None when it can)."""
    if stack == "hf":
        return None
    if stack == "torchtune":
        if pretrain:
            return "torchtune runs fine-tuning recipes: pre-training plans use --stacks hf or torchtitan"
        from planner.cost.memory.torchtune_tensors import unpriced_reason as reason
    elif stack == "megatron":
        from planner.cost.memory.megatron_tensors import unpriced_reason as reason
    else:
        from planner.cost.memory.torchtitan_tensors import unpriced_reason as reason
    return reason(spec)


def check_stacks(request, models: list) -> None:
    """A one-line refusal when the only stack asked for cannot run any of the models."""
    if len(request.stacks) != 1 or request.stacks[0] == "hf":
        return
    stack = request.stacks[0]
    reasons = [unpriced_reason(stack, m.spec, request.pretrain) for m in models]
    if models and all(reasons):
        raise PlannerError(reasons[0].replace("use --stack hf", "use --stacks hf"))
    if stack in ("torchtitan", "megatron") and "full" not in (request.methods if not request.pretrain else ("full",)):
        raise PlannerError(f"{stack} runs full training only: add --methods full or use --stacks hf,torchtune")


def check_compile(request) -> None:
    """--compile, or only optimizers, that none of the stacks asked for prices: one line."""
    if request.compile and not any(priced(s, "compile", True) for s in request.stacks):
        raise PlannerError("--compile: the memory of the hf stack is priced eager only; compiled runs are priced for "
                           "--stacks torchtune or torchtitan (or leave --compile out)")
    if request.stacks == ("hf",) and not any(priced("hf", "optimizer", o) for o in request.optimizers):
        from planner.cost.support import MEMORY_PRICED_BY_STACK

        options = ", ".join(o for o in MEMORY_PRICED_BY_STACK["hf"]["optimizer"] if priced("hf", "optimizer", o))
        raise PlannerError(f"--optimizers {','.join(request.optimizers)}: not priced for the hf stack (its optimizers: "
                           f"{options}); paged 8-bit AdamW is torchtune's (--stacks torchtune)")


def stacks_note(request, gpu) -> str:
    """The assumption line of a plan that searched other stacks than Hugging Face's."""
    from planner.specs.catalog import load_spec

    out = []
    for stack in request.stacks:
        if request.pretrain:
            skipped = ["pre-training"] if stack == "torchtune" else []
        else:
            skipped = [m for m in request.models if unpriced_reason(stack, load_spec(m), False)]
        recipe = _RECIPES[stack] + (f"; not run for {', '.join(skipped)}" if skipped else "")
        out.append(f"{stack} ({recipe})")
    compile_mode = {None: "searched, compiled twin first", True: "on (--compile)", False: "off (--no-compile)"}
    extra = f"; torch.compile {compile_mode[request.compile]}" + ("; packed data (torchtune)" if request.packed else "")
    return "stacks searched: " + ", ".join(out) + extra


_RECIPES = {"hf": "Trainer defaults",
            "torchtune": "its recipes: one dtype, chunked CE, fused AdamW (8-bit and paged 8-bit in backward when "
                         "asked), checkpointing none/full, FSDP2",
            "torchtitan": "full training: FSDP2 bf16 mixed precision, fused AdamW, AC none/selective/full",
            "megatron": "full training: bf16 mixed precision, fused Adam, the distributed optimizer, TP with sequence "
                        "parallelism, 1F1B pipelines, recompute none/selective/full"}
_TECHNIQUE_KEYS = ("loss_impl", "optimizer_impl", "optimizer_in_backward", "activation_offload", "packed", "compile")
"""The set-up fields a stack variant may set beyond precision and optimizer (``Candidate.setup_fields``)."""


def stack_fields(stack: str, method: str, optimizer: str) -> dict:
    """The set-up fields a stack's recipes fix beyond the search's axes (plans saved before
    ``Candidate.setup_fields`` existed are read back with these)."""
    if stack == "torchtune":
        return {"stack": stack, "loss_impl": "chunked", **({"optimizer_impl": "fused"} if optimizer == "adamw" else {})}
    if stack in ("torchtitan", "megatron"):
        return {"stack": stack, "optimizer_impl": "fused"}
    return {}


def priced(stack: str, field: str, value) -> bool:
    """Whether both the memory model (for ``stack``) and the time model price ``field=value``."""
    from planner.cost.support import MEMORY_PRICED_BY_STACK, TIME_PRICED

    memory = MEMORY_PRICED_BY_STACK.get(stack, {})
    return value in memory.get(field, (value,)) and value in TIME_PRICED.get(field, (value,))


def _compile_modes(stack: str, request) -> list[bool]:
    """Compiled first (``twins_of``), then eager, as the request and the cost models allow."""
    wanted = (True, False) if request.compile is None else (request.compile,)
    return [c for c in wanted if priced(stack, "compile", c)]


def _torchtune_optimizers(method: str, optimizers) -> list[dict]:
    """The optimizer fields of torchtune's recipes among those asked for (LoRA recipes: AdamW)."""
    if method != "full":
        return [{"optimizer": "adamw", "optimizer_impl": "fused"}]
    out = [{"optimizer": "adamw", "optimizer_impl": "fused"}] if "adamw" in optimizers else []
    if "adamw-8bit" in optimizers:
        out.append({"optimizer": "adamw-8bit"})
    if "paged-adamw-8bit" in optimizers:
        out.append({"optimizer": "paged-adamw-8bit"})
    if {"adamw-8bit", "paged-adamw-8bit"} & set(optimizers):  # full_finetune_single_device's 8B recipe
        out.append({"optimizer": "paged-adamw-8bit", "optimizer_in_backward": True})
    return [o for o in out if priced("torchtune", "optimizer", o["optimizer"])
            and priced("torchtune", "optimizer_in_backward", o.get("optimizer_in_backward", False))]


def stack_variants(stack: str, method: str, gpu, request) -> list[dict]:
    """The ``TrainingSetup`` fields (stack, precision, optimizer, techniques) of each variant of a
    non-HF stack for one method, compiled twins before their eager ones ([] when it has none)."""
    if stack == "torchtune":
        dtype = "bf16" if gpu.computes_in("bf16") else "fp32"
        if method == "qlora" and dtype != "bf16":
            return []  # torchao NF4 computes in bf16
        packed = bool(request.packed) and priced(stack, "packed", True)
        kept = [{"stack": stack, "precision": dtype, "loss_impl": "chunked", "packed": packed, "compile": c, **o}
                for o in _torchtune_optimizers(method, request.optimizers) for c in _compile_modes(stack, request)]
        offload = [{**v, "activation_offload": True} for v in kept if priced(stack, "activation_offload", True)]
        return kept + offload  # after their twins (twins_of)
    if stack == "torchtitan":
        if method != "full" or not gpu.computes_in("bf16") or "adamw" not in request.optimizers:
            return []
        return [{"stack": stack, "precision": "bf16-mixed", "optimizer": "adamw", "optimizer_impl": "fused", "compile": c,
                 "loss_impl": titan_loss_impl(c)} for c in _compile_modes(stack, request)]
    if stack == "megatron":
        if method != "full" or not gpu.computes_in("bf16") or "adamw" not in request.optimizers or request.compile:
            return []  # Megatron-LM trains eagerly with its fused kernels (torch.compile not priced)
        return [{"stack": stack, "precision": "bf16-mixed", "optimizer": "adamw", "optimizer_impl": "fused"}]
    raise ValueError(f"stack_variants covers torchtune, torchtitan and megatron, not {stack!r}")


def titan_loss_impl(compiled: bool) -> str:
    """torchtitan 0.3 compiles the loss with ``compile.enable`` (``compile.components`` holds "loss" by
    default; torchtitan PR #1033): "compiled" where both cost models price it, else the eager loss."""
    return "compiled" if compiled and priced("torchtitan", "loss_impl", "compiled") else "standard"


def twins_of(fields: dict) -> list[dict]:
    """The variants that are never slower than ``fields`` at the same layout and micro-batch: its
    compiled twin when it runs eager, its twin without activation offloading when it offloads
    (the PCIe copies only add time). Where a twin fits, the variant cannot be on the front."""
    if fields.get("stack", "hf") == "hf":
        return []
    compiled = {"compile": True}
    if fields.get("stack") == "torchtitan":
        compiled["loss_impl"] = titan_loss_impl(True)
    out = [{**fields, **compiled}] if fields.get("compile") is False else []
    if fields.get("activation_offload"):
        out.append({k: v for k, v in fields.items() if k != "activation_offload"})
    return out


def technique_fields(setup) -> dict:
    """The fields of ``setup`` a stack variant sets (``Candidate.setup_fields``)."""
    if setup.stack == "hf":
        return {}
    return {k: getattr(setup, k) for k in _TECHNIQUE_KEYS}


def layout_allowed(stack: str, num_gpus: int, checkpointing: str, zero: int, tensor_parallel: int,
                   pipeline_parallel: int = 1) -> bool:
    """Whether a stack runs the layout as the plan prices it: one GPU, or FSDP2 (ZeRO-3; torchtitan also
    replicated, ZeRO-0) without TP or PP; Megatron any TP and PP, with or without its distributed
    optimizer (ZeRO-1)."""
    if stack == "hf":
        return True
    if checkpointing not in _CHECKPOINTING[stack]:
        return False
    if num_gpus == 1:
        return zero == 0
    if stack == "megatron":
        return zero in _ZERO[stack]
    return tensor_parallel == 1 and pipeline_parallel == 1 and zero in _ZERO[stack]


def layout_fields(stack: str, tensor_parallel: int, pipeline_parallel: int) -> dict:
    """The layout's ``TrainingSetup`` fields beyond the degrees: the pipeline's
    (``planner.search.pipelines``), and on Megatron sequence parallelism wherever tensor
    parallelism is on (``--sequence-parallel``: it only removes replicated activations)."""
    from planner.search.pipelines import pipeline_fields

    fields = pipeline_fields(tensor_parallel, pipeline_parallel)
    if stack == "megatron":
        fields["sequence_parallel"] = tensor_parallel > 1
    return fields


def candidate_setup(c):
    """The ``TrainingSetup`` of a plan's candidate (``planner.search.plan.Candidate``)."""
    from planner.specs.setup import TrainingSetup

    return TrainingSetup(
        method=c.method, precision=c.precision, optimizer=c.optimizer, micro_batch=c.micro_batch, seq_len=c.seq_len,
        checkpointing=c.checkpointing, lora_rank=c.lora_rank or 16, num_gpus=c.num_gpus, zero=c.zero,
        tensor_parallel=c.tensor_parallel, pipeline_parallel=c.pipeline_parallel, sequence_parallel=c.sequence_parallel,
        grad_accum=c.grad_accum, **{**stack_fields(c.stack, c.method, c.optimizer), **c.setup_fields})
