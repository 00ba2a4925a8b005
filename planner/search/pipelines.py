"""Pipeline-parallel layouts for the plan search: which to try, and when.

Full training that fits no layout of a GPU count with ZeRO-0/1 (only ZeRO-2/3 or nothing fits:
the model needs its states split, and across nodes Megatron-style training splits the model with
pipeline stages rather than gathering every weight each step, Narayanan et al. 2021 sec. 3.3)
also tries pipeline layouts: the request's checkpointing, its widest tensor-parallel degree, ZeRO-0/1
(Megatron's distributed optimizer; DeepSpeed's pipeline engine runs ZeRO-1 at most), sequence
parallelism wherever tensor parallelism is on (it only removes replicated activations), the 1F1B
schedule, and pipeline degrees in powers of two, fewest stages first: fewer stages mean a smaller
bubble ((pp - 1)/m of the step at m micro-batches, with more data-parallel replicas and so fewer
micro-batches for the same global batch), so the search stops at the first degree that fits at
some micro-batch, and tries more recompute only at fewer stages than the lighter checkpointing
needed (``exhaustive`` tries them all).
"""

from __future__ import annotations

PIPELINE_ZERO = (0, 1)


def pipeline_fields(tensor_parallel: int, pipeline_parallel: int) -> dict:
    """The ``TrainingSetup`` fields of a pipeline layout (1F1B, sequence parallel with TP)."""
    return {"pipeline_parallel": pipeline_parallel, "pipeline_schedule": "1f1b",
            "sequence_parallel": tensor_parallel > 1 and pipeline_parallel > 1}


def wants_pipeline(num_gpus: int, method: str, fits_without_sharded_weights: bool) -> bool:
    """Full training on several GPUs where no ZeRO-0/1 layout fits."""
    return method == "full" and num_gpus > 1 and not fits_without_sharded_weights


def pipeline_combos(combos: list[tuple], num_gpus: int, num_layers: int) -> list[tuple]:
    """(checkpointing rank, checkpointing, ZeRO, TP, pipeline degree) to try: each layout of
    ``combos`` with ZeRO 0 or 1 (none if the request allows no such stage: DeepSpeed's pipeline engine
    refuses ZeRO-2/3, and the memory model prices no pipeline for the FSDP stacks) at pipeline
    degrees in powers of two with ``tp x pp`` dividing the GPU count and a layer per stage; fewest
    stages first, then lightest checkpointing (the order the search's skipping relies on)."""
    low = [c for c in combos if c[2] in PIPELINE_ZERO]
    if not low:
        return []
    # tensor parallelism fills a node before the pipeline splits across nodes: the widest TP only
    widest = max(c[3] for c in low)
    low = [c for c in low if c[3] == widest and c[2] == max(z for _, _, z, t in low if t == widest)]
    out = []
    for ck_rank, ckpt, zero, tp in low:
        pp = 2
        while pp <= num_layers and tp * pp <= num_gpus:
            if num_gpus % (tp * pp) == 0:
                out.append((ck_rank, ckpt, zero, tp, pp))
            pp *= 2
    return sorted(out, key=lambda c: (c[4], c[0], c[2], c[3]))


def fits_states_floor(base, total_params: float, combo: tuple, usable_bytes: float) -> bool:
    """Whether a pipeline layout can fit at all: the worst stage holds at least ``1/pp`` of the
    parameters, each with its unsharded weight and gradient (ZeRO-0/1) split over TP. Degrees
    below it are not evaluated (no memory call)."""
    from planner.cost.memory.states import dtype_layout

    _, _, zero, tp, pp = combo
    layout = dtype_layout(base.model_copy(update={"zero": zero}))
    return total_params * (layout.weight + layout.grad) / (tp * pp) <= usable_bytes
