"""`planner compare`: named allocations planned side by side under the same limits.

Each allocation narrows the base request (a model, a method, a GPU count, a layout, a training stack
and its techniques, the data) and
is planned on its own (``planner.search.planning.make_plan``, without the continuous check its
rows do not report); the set-up side's memo makes the allocations that share set-ups cheap.
"""

from __future__ import annotations

from planner.errors import PlannerError
from planner.search.plan import PlanRequest
from planner.search.planning import make_plan

_PINNED = (("checkpointing", "checkpointing"), ("zero", "zero"), ("tensor_parallel", "tensor_parallel"),
           ("micro_batch", "micro_batches"), ("optimizer", "optimizers"), ("strategy", "strategies"),
           ("stack", "stacks"))
"""Allocation field -> the request's search axis it pins to one value."""
_SCALARS = ("compile", "packed")
"""Allocation fields that set the request's field of the same name (stack techniques)."""


def _model_update(base: PlanRequest, alloc) -> dict:
    """The model, method, rank and GPU count an allocation pins."""
    update: dict = {}
    if alloc.model is not None:
        update["models"] = (alloc.model,)
    if alloc.method is not None:
        update["methods"] = (alloc.method,)
        if alloc.method != "full" and not (alloc.model or base.models):
            raise PlannerError(f"allocation {alloc.name!r}: {alloc.method} needs a model to adapt (model=NAME)")
    if alloc.lora_rank is not None:
        update["lora_ranks"] = (alloc.lora_rank,)
    if alloc.num_gpus is not None:
        if base.num_gpus is not None and alloc.num_gpus > base.num_gpus:
            raise PlannerError(f"allocation {alloc.name!r} uses {alloc.num_gpus} GPUs; only {base.num_gpus} are available")
        update["gpu_counts"] = (alloc.num_gpus,)
    return update


def allocation_request(base: PlanRequest, alloc) -> PlanRequest:
    """The base request narrowed to one named allocation (``planner.search.plan.Allocation``)."""
    update = _model_update(base, alloc)
    for field, target in _PINNED:
        value = getattr(alloc, field)
        if value is not None:
            update[target] = (value,)
    for field in _SCALARS:
        if getattr(alloc, field) is not None:
            update[field] = getattr(alloc, field)
    selection = alloc.selection
    if alloc.keep_fraction is not None:
        if selection in (None, "all"):
            selection = "random" if alloc.keep_fraction < 1 else "all"
        update["keep_fractions"] = (alloc.keep_fraction,)
    if selection is not None:
        update["selection"] = (selection,)
    if alloc.tokens is not None:
        update["tokens"] = alloc.tokens
    if alloc.epochs is not None:
        update["epochs"] = alloc.epochs
    data = base.model_dump()
    data.update(update)
    return PlanRequest.model_validate(data)


def compare(request) -> list[dict]:
    """Each allocation planned under the shared limits: its best run for the objective, or why none.

    Returns one row per allocation: name, feasible, reason, and the recommended run's fields
    (``planner.search.plan.Candidate``) with the binding constraints."""
    from planner.specs.catalog import load_spec

    # an unknown model is bad input (exit 2), not an infeasible allocation
    for name in dict.fromkeys([*request.base.models, *(a.model for a in request.allocations if a.model)]):
        load_spec(name)
    if request.base.cluster:  # so is an unknown cluster
        from planner.specs.cluster import load_cluster

        load_cluster(request.base.cluster)
    rows = []
    for alloc in request.allocations:
        try:
            plan = make_plan(allocation_request(request.base, alloc), continuous_check=False)
        except PlannerError as exc:
            rows.append({"name": alloc.name, "feasible": False, "reason": str(exc)})
            continue
        row = {"name": alloc.name, "feasible": True, "reason": ""}
        row.update(plan.recommended.model_dump())
        row["binding"] = [c.name for c in plan.constraints if c.binding]
        row["stop_step"] = plan.stopping.stop_step
        # the expected loss curve (tokens, loss) of the allocation's run, for compare --plot
        row["curve_tokens"] = [t * plan.recommended.global_batch_tokens for t in plan.stopping.curve_step]
        row["curve_loss"] = plan.stopping.curve_loss
        rows.append(row)
    return rows
