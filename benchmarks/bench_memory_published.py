"""Predicted peak memory against peak memory published for real runs on real GPUs.

    python benchmarks/bench_memory_published.py [--markdown]

Reads ``models_catalog/measurements/memory.csv`` (every row with its source, exact configuration
and the counter it reports; see ``MEMORY_SOURCES.md``), maps each row to a ``TrainingSetup`` where
the planner can express it, and compares like with like:

- ``allocated-peak`` and ``active-peak`` (torch.cuda.max_memory_allocated / active_bytes.all.peak)
  against the estimate's peak allocated bytes;
- ``reserved-peak`` against the estimated reserved bytes (peak plus the allocator reserve);
- ``nvidia-smi`` against the estimated device bytes (reserved plus the CUDA context);
- ``unknown`` (the source does not say which counter): a separate table against the allocated peak,
  never counted in the targets.

A row the planner cannot express (a stack or technique it does not price, a model it has no config
for, a configuration the source leaves out, unpadded variable-length batches) is listed with the
reason, never forced. Targets (issue 10): median |error| <= 5% and max <= 15% on the expressible
rows with a stated counter.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from planner.cost.estimate import estimate
from planner.errors import PlannerError
from planner.specs.catalog import load_spec
from planner.specs.setup import TrainingSetup

CSV = Path(__file__).resolve().parent.parent / "models_catalog" / "measurements" / "memory.csv"
GIB = 1024**3
STACKS = {"torchtune": "torchtune", "hf-trainer": "hf", "hf-peft": "hf", "hf-trainer+deepspeed": "hf",
          "torchtitan": "torchtitan"}
CHECKPOINTING = {"op-sac": "selective"}  # torchtitan's per-op selective AC
TECHNIQUES = {
    "compile": ("compile", True),
    "chunked-ce": ("loss_impl", "chunked"),
    "optimizer-in-backward": ("optimizer_in_backward", True),
    "activation-offload": ("activation_offload", True),
    "packing": ("packed", True),
    "paged-optimizer": None,  # the optimizer column already names the paged optimizer
    # torchao float8 (planner.cost.memory.float8): every recipe saves a bf16 linear's set under
    # op-SAC and full AC (traced), so the recipe names map to the same set-up; FSDP2's fp8 weight
    # all-gather halves the gathered linears (float8.gathered_block_bytes)
    "fp8": ("float8", True),
    "fp8-tensorwise": None,
    "fp8-rowwise": None,
    "fp8-rowwise-gw-hp": None,
    "fp8-all-gather": ("float8_all_gather", True),
    # torchao's precomputed fp8 weight scales (one fp32 scalar per weight) and the checkpointed fp8 weight
    # cast change nothing under op-SAC or compile, where the cast is recomputed anyway (traced)
    "precompute-fp8-scale": None,
    "force-recompute-fp8-weight-in-bwd": None,
}
FLOAT8_RECIPES_NEED_AC = {"fp8-tensorwise"}
"""tensorwise keeps an fp8 copy of every weight from forward to backward in eager mode without AC
(``float8.saved_weight_bytes``), which torchtitan's rowwise converter (what is priced) does not:
expressible only where AC or compile recompute it."""

LOSS_COMPILED_SOURCES = {
    # torchtitan compiles the cross-entropy under --training.compile since PR #1033 (2025-04-02,
    # components/loss.py build_cross_entropy_loss); the runs below used later torchtitan commits
    "torchao_float8_training_doc-004": "torchtitan 2c8b594 (2025-08-08)",
    "torchao_float8_training_doc-005": "torchtitan 2c8b594 (2025-08-08)",
    "torchao_float8_training_doc-006": "torchtitan 2c8b594 (2025-08-08)",
    "torchao_float8_training_doc-007": "torchtitan 2c8b594 (2025-08-08)",
    "torchao_float8_training_doc-008": "torchtitan 6fc499f (2025-08-14)",
    "torchao_float8_training_doc-009": "torchtitan 6fc499f (2025-08-14)",
    "torchao_float8_training_doc-010": "torchtitan 6fc499f (2025-08-14)",
    "torchao_float8_training_doc-011": "torchtitan 6fc499f (2025-08-14)",
    "torchao_float8_training_doc-012": "torchtitan 6fc499f (2025-08-14)",
    "torchtitan_bench_trainy_h200-001": "torchtitan e7c0cae (2025-06-11)",
    "torchtitan_bench_trainy_h200-002": "torchtitan e7c0cae (2025-06-11)",
}
"""Published torchtitan rows run with a compiled loss (``loss_impl="compiled"``); every other torchtitan
row predates PR #1033 (the H100 rows of the torchao doc were added on 2025-03-12, pytorch/ao #1793;
the torchtitan_bench_2024_12 rows ran torchtitan 9dec370, 2024-12)."""
TORCHTUNE_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
                     "mlp": "gate_proj,up_proj,down_proj", "lm_head": "lm_head"}
COMPARED = {"allocated-peak": "peak_bytes", "active-peak": "peak_bytes", "reserved-peak": "reserved",
            "nvidia-smi": "device", "unknown": "peak_bytes"}


class Unexpressible(Exception):
    """Why a published row cannot be priced as it ran."""


@dataclass(frozen=True)
class Compared:
    row_id: str
    source_id: str
    metric: str
    label: str
    measured_gib: float
    predicted_gib: float

    @property
    def error(self) -> float:
        return self.predicted_gib / self.measured_gib - 1.0


def _stated(row, column: str):
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Unexpressible(f"{column} not stated")
    return value


def _techniques(row) -> dict:
    fields = {}
    text = row["techniques"]
    for name in ([] if not isinstance(text, str) else text.split(";")):
        if name not in TECHNIQUES:
            raise Unexpressible(f"technique {name} not priced")
        if TECHNIQUES[name] is not None:
            fields[TECHNIQUES[name][0]] = TECHNIQUES[name][1]
    return fields


def _lora_fields(row, stack: str) -> dict:
    if row["method"] == "full":
        return {}
    fields = {"lora_rank": int(_stated(row, "lora_rank"))}
    targets = row["lora_targets"]
    if isinstance(targets, str):
        names = targets.split(";")
        if stack == "torchtune":
            names = [TORCHTUNE_TARGETS.get(n, n) for n in names]
        fields["lora_targets"] = ",".join(names)
    return fields


def setup_for(row) -> tuple[object, TrainingSetup]:
    """The (spec, set-up) a published row ran, or ``Unexpressible`` with the reason."""
    stack = STACKS.get(row["stack"])
    if stack is None:
        raise Unexpressible(f"stack {row['stack']} not priced")
    try:
        spec = load_spec(str(row["model"]))
    except PlannerError:
        raise Unexpressible(f"no config for {row['model']}") from None
    if row["method"] not in ("full", "lora", "qlora"):
        raise Unexpressible(f"method {row['method']} not priced")
    if row["techniques"] != row["techniques"] and stack == "torchtune" and row["checkpointing"] != row["checkpointing"]:
        raise Unexpressible("recipe settings not stated")
    packed = (isinstance(row["techniques"], str) and "packing" in row["techniques"]) or str(row["packed"]) == "True"
    if stack == "torchtune" and not packed:
        raise Unexpressible("unpacked: padded to each batch's longest sample, tokens per batch vary")
    precision = str(_stated(row, "precision"))
    if precision == "fp8":  # torchao float8: FSDP2's bf16 mixed precision with fp8 linears
        _techniques(row)  # a technique the planner does not price (mxfp8, ...) is the reason first
        if not (isinstance(row["techniques"], str) and "fp8" in row["techniques"].split(";")):
            raise Unexpressible("fp8 precision without the torchao float8 technique")
        if stack != "torchtitan":
            raise Unexpressible(f"fp8 (torchao float8) priced for torchtitan only, not {stack}")
        precision = "bf16-mixed"
    fields = dict(
        stack=stack,
        method=row["method"],
        precision=precision,
        optimizer=str(_stated(row, "optimizer")),
        seq_len=int(_stated(row, "seq_len")),
        micro_batch=int(_stated(row, "micro_batch")),
        checkpointing=CHECKPOINTING.get(str(_stated(row, "checkpointing")), str(row["checkpointing"])),
        num_gpus=int(row["num_gpus"]) if row["num_gpus"] == row["num_gpus"] else 1,
        # torchtitan's pre-training loader cuts concatenated text to b x s tokens under one causal
        # mask: exactly the unpacked b x s the planner prices
        **{**_techniques(row), **({"packed": True} if packed and stack != "torchtitan" else {})},
        **_lora_fields(row, stack),
    )
    if stack == "torchtitan":  # FSDP2 full shard over every GPU, fused AdamW (its defaults)
        fields.update(zero=3 if fields["num_gpus"] > 1 else 0, optimizer_impl="fused")
        if row["id"] in LOSS_COMPILED_SOURCES and fields.get("compile"):
            fields["loss_impl"] = "compiled"
    elif fields["num_gpus"] > 1:
        raise Unexpressible("multi-GPU row (sharding strategy and per-GPU accounting not stated exactly)")
    names = set(row["techniques"].split(";")) if isinstance(row["techniques"], str) else set()
    if names & FLOAT8_RECIPES_NEED_AC and fields["checkpointing"] == "none" and not fields.get("compile"):
        raise Unexpressible("fp8 tensorwise in eager mode without AC (saves fp8 weights) not priced")
    if stack == "torchtune" and fields["optimizer"] == "adamw" and fields["method"] == "full":
        fields["optimizer_impl"] = "fused"  # full_finetune_single_device's torch AdamW (fused: True)
    try:
        return spec, TrainingSetup(**fields)
    except (ValueError, PlannerError) as exc:
        raise Unexpressible(f"set-up refused: {str(exc).splitlines()[0][:80]}") from None


def predicted_gib(spec, setup: TrainingSetup, metric: str) -> float:
    result = estimate(spec, setup)
    kind = COMPARED[metric]
    if kind == "peak_bytes":
        return result["peak_bytes"] / GIB
    if kind == "reserved":
        return result["overheads"]["estimated_reserved_bytes"] / GIB
    return result["overheads"]["estimated_device_bytes"] / GIB


def compare_all(table: pd.DataFrame) -> tuple[list[Compared], list[tuple[str, str]]]:
    compared, skipped = [], []
    for _, row in table.iterrows():
        try:
            spec, setup = setup_for(row)
            predicted = predicted_gib(spec, setup, row["metric"])
        except Unexpressible as why:
            skipped.append((row["id"], str(why)))
            continue
        except PlannerError as exc:  # a priced-values refusal names the field
            skipped.append((row["id"], f"not priced: {str(exc).split(':')[0]}"))
            continue
        label = (f"{row['model']} {setup.method} {setup.precision} {setup.optimizer} b{setup.micro_batch}x{setup.seq_len} "
                 f"ckpt {setup.checkpointing}" + (f" [{row['techniques']}]" if isinstance(row["techniques"], str) else "")
                 + (f" loss {setup.loss_impl}" if setup.loss_impl == "compiled" else ""))
        compared.append(Compared(row["id"], row["source_id"], row["metric"], label, float(row["value_gib"]), predicted))
    return compared, skipped


def _table(rows: list[Compared]) -> str:
    lines = ["| row | counter | set-up | measured GiB | predicted GiB | error |", "|---|---|---|---|---|---|"]
    for c in rows:
        lines.append(f"| {c.row_id} | {c.metric} | {c.label} | {c.measured_gib:.2f} | {c.predicted_gib:.2f} | {c.error:+.1%} |")
    return "\n".join(lines)


def _summary(rows: list[Compared], title: str) -> str:
    if not rows:
        return f"{title}: no rows"
    errors = sorted(abs(c.error) for c in rows)
    median = errors[len(errors) // 2] if len(errors) % 2 else sum(errors[len(errors) // 2 - 1:len(errors) // 2 + 1]) / 2
    return f"{title}: {len(rows)} rows, median |error| {median:.1%}, max {errors[-1]:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    table = pd.read_csv(CSV)
    compared, skipped = compare_all(table)
    stated = [c for c in compared if c.metric != "unknown"]
    unknown = [c for c in compared if c.metric == "unknown"]
    print(f"{len(table)} published rows from {table['source_id'].nunique()} sources; "
          f"{len(compared)} expressible ({len(stated)} with a stated counter), {len(skipped)} not expressible\n")
    print("### Rows with a stated counter (the targets: median <= 5%, max <= 15%)\n")
    print(_table(stated) + "\n\n" + _summary(stated, "stated counter") + "\n")
    print("### Rows whose source does not say which counter (against the allocated peak; not a target)\n")
    print(_table(unknown) + "\n\n" + _summary(unknown, "counter not stated") + "\n")
    print("### Not expressible, by reason\n")
    reasons = pd.Series([why for _, why in skipped]).value_counts()
    print("| reason | rows |\n|---|---|\n" + "\n".join(f"| {why} | {n} |" for why, n in reasons.items()))


if __name__ == "__main__":
    main()
