"""The training stacks the plan searches (``PlanRequest.stacks``) and what each turns on.

The Hugging Face stack is the search's historical one (``planner.search.setups``: mixed or pure
bf16, every requested optimizer, checkpointing, ZeRO, tensor parallelism and pipelines). The
other stacks enter with their recipes' defaults that both the memory model
(``planner.cost.support.MEMORY_PRICED_BY_STACK``) and the step-time model (``TIME_PRICED``) price:

- torchtune (fine-tuning only, its 0.6 recipes): one dtype (bf16, fp32 on a GPU without bf16),
  chunked cross-entropy (``CEWithChunkedOutputLoss``), AdamW with ``fused: True`` (or 8-bit AdamW
  when asked), checkpointing none or full (whole layers), one GPU or FSDP2 (ZeRO-3), no tensor
  parallelism or pipeline. Optimizer-in-backward and activation offloading are left out: the
  step-time model does not price them.
- torchtitan (full training only): FSDP2 mixed precision (bf16-mixed), fused AdamW,
  checkpointing none, selective or full, one GPU or FSDP2 (ZeRO-3), eager.

A stack that cannot price a model (``unpriced_reason``) is skipped for that model, silently unless
it is the only stack asked for (``check_stacks``: a one-line refusal).
"""

from __future__ import annotations

from planner.errors import PlannerError

PLAN_STACKS = ("hf", "torchtune", "torchtitan")
_TORCHTUNE_OPTIMIZERS = ("adamw", "adamw-8bit")
_CHECKPOINTING = {"torchtune": ("none", "full"), "torchtitan": ("none", "selective", "full")}


def unpriced_reason(stack: str, spec, pretrain: bool) -> str | None:
    """Why ``stack`` cannot run ``spec`` in this plan (None when it can)."""
    if stack == "hf":
        return None
    if stack == "torchtune":
        if pretrain:
            return "torchtune runs fine-tuning recipes: pre-training plans use --stacks hf or torchtitan"
        from planner.cost.memory.torchtune_tensors import unpriced_reason as reason
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
    if stack == "torchtitan" and "full" not in (request.methods if not request.pretrain else ("full",)):
        raise PlannerError("torchtitan runs full training only: add --methods full or use --stacks hf,torchtune")


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
    return "stacks searched: " + ", ".join(out)


_RECIPES = {"hf": "Trainer defaults",
            "torchtune": "its recipes: one dtype, chunked CE, fused AdamW, checkpointing none/full, FSDP2",
            "torchtitan": "full training: FSDP2 bf16 mixed precision, fused AdamW, eager"}


def stack_fields(stack: str, method: str, optimizer: str) -> dict:
    """The set-up fields a stack's recipes fix beyond the search's axes."""
    if stack == "torchtune":
        return {"stack": stack, "loss_impl": "chunked", **({"optimizer_impl": "fused"} if optimizer == "adamw" else {})}
    if stack == "torchtitan":
        return {"stack": stack, "optimizer_impl": "fused"}
    return {}


def stack_bases(stack: str, method: str, gpu, optimizers: tuple[str, ...]) -> list[tuple[str, str]]:
    """(precision, optimizer) pairs of a non-HF stack for one method ([] when it has none)."""
    if stack == "torchtune":
        dtype = "bf16" if gpu.computes_in("bf16") else "fp32"
        if method == "qlora" and dtype != "bf16":
            return []  # torchao NF4 computes in bf16
        chosen = [o for o in optimizers if o in _TORCHTUNE_OPTIMIZERS] if method == "full" else ["adamw"]
        return [(dtype, o) for o in chosen]
    if stack == "torchtitan":
        if method != "full" or not gpu.computes_in("bf16") or "adamw" not in optimizers:
            return []
        return [("bf16-mixed", "adamw")]
    raise ValueError(f"stack_bases covers torchtune and torchtitan, not {stack!r}")


def layout_allowed(stack: str, num_gpus: int, checkpointing: str, zero: int, tensor_parallel: int,
                   pipeline_parallel: int = 1) -> bool:
    """Whether a stack runs the layout as the plan prices it: one GPU, or FSDP2 (ZeRO-3), no TP or PP."""
    if stack == "hf":
        return True
    return (checkpointing in _CHECKPOINTING[stack] and tensor_parallel == 1 and pipeline_parallel == 1
            and zero == (0 if num_gpus == 1 else 3))


def candidate_setup(c):
    """The ``TrainingSetup`` of a plan's candidate (``planner.search.plan.Candidate``)."""
    from planner.specs.setup import TrainingSetup

    return TrainingSetup(
        method=c.method, precision=c.precision, optimizer=c.optimizer, micro_batch=c.micro_batch, seq_len=c.seq_len,
        checkpointing=c.checkpointing, lora_rank=c.lora_rank or 16, num_gpus=c.num_gpus, zero=c.zero,
        tensor_parallel=c.tensor_parallel, pipeline_parallel=c.pipeline_parallel, sequence_parallel=c.sequence_parallel,
        grad_accum=c.grad_accum, **stack_fields(c.stack, c.method, c.optimizer))
