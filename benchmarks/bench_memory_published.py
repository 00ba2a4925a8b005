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
CUDNN_ATTENTION_RECOMPUTED = {
    "torchao_float8_training_doc-008": "torchtitan 6fc499f (2025-08-14) on B200",
    "torchao_float8_training_doc-009": "torchtitan 6fc499f (2025-08-14) on B200",
    "torchao_float8_training_doc-010": "torchtitan 6fc499f (2025-08-14) on B200",
    "torchao_float8_training_doc-011": "torchtitan 6fc499f (2025-08-14) on B200",
    "torchao_float8_training_doc-012": "torchtitan 6fc499f (2025-08-14) on B200",
}
"""Published torchtitan rows whose per-op SAC recomputed the attention, which torchtitan 0.3.0 (priced)
saves: on compute capability 10.0 torchtitan puts SDPA's cuDNN backend first (PR #1196, 2025-05-14,
``models/attention.py``), and its op-SAC save list held the flash and efficient kernels but not
``_scaled_dot_product_cudnn_attention`` until PR #2095 (2025-12-01, "add all SDPA backends to
op_sac_save_list"). The attention output (b s h in bf16) and its statistics are then recomputed, not
saved: 2.0 GiB less on Llama-3-8B at 8192 tokens; PR #1196's own log reads 46.39 -> 44.59 GiB reserved on
B200. Checked with ``git merge-base --is-ancestor 6fc499f b39377f`` (false) in pytorch/torchtitan."""
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


# ----------------------------------------------------------------------------- megatron rows (issue 10)
MEGATRON_FLAGS = {  # technique -> set-up fields (planner.cost.memory.megatron_stack)
    "distributed-optimizer": {"zero": 1}, "sequence-parallel": {"sequence_parallel": True},
    "attention-unfused": {"attention": "eager"}, "attention-auto": {}, "attention-flash": {},
    "attention-fused": {},
    # what Megatron runs that changes no priced tensor: the overlaps reuse the buckets of the
    # persistent buffers; without gradient-accumulation fusion each weight gradient is a bf16
    # transient added into the fp32 buffer (one GEMM's, not priced); the local transformer spec
    # keeps the same per-layer set with its unfused attention
    "no-grad-accum-fusion": {}, "overlap-grad-reduce": {}, "overlap-param-gather": {},
    "transformer-impl-local": {"attention": "eager"},
    "untied-embeddings": {}, "rope": {}, "no-bias": {},
}


def _megatron_spec(row, names: list[str]):
    """The model a Megatron row ran: a catalog name, or ``hf_config_like`` sizes on GPT-2's layout
    (LayerNorm, GeLU MLP, biases, learned positions unless ``pos=0``) with its key/value groups."""
    import dataclasses

    from planner.specs.catalog import load_model_config
    from planner.specs.model import model_spec_from_config

    like = row["hf_config_like"]
    if not isinstance(like, str):
        return load_spec(str(row["model"]))
    if "swiglu" in names:
        raise Unexpressible("SwiGLU on a LayerNorm GPT with learned positions: no config family of the catalog")
    size = {k: int(v) for k, v in (part.split("=") for part in like.split(";"))}
    cfg = dict(load_model_config(str(row["model"]))[0])
    cfg.update(n_embd=size["h"], n_layer=size["L"], n_head=size["a"], n_inner=size["ffn"], vocab_size=size["V"],
               n_positions=max(size["pos"], 1), n_ctx=max(size["pos"], 1))
    spec = model_spec_from_config(cfg, f"{row['model']}[{like}]")
    layer = spec.layers[0]
    q, kv = layer.q_dim, size["kv"] * layer.head_dim
    bias = "no-bias" not in names
    attention = (dataclasses.replace(layer.attention[0], out_features=q + 2 * kv, bias=bias),
                 dataclasses.replace(layer.attention[1], bias=bias))
    mlp = tuple(dataclasses.replace(lin, bias=bias) for lin in layer.mlp)
    layer = dataclasses.replace(layer, num_kv_heads=size["kv"], attention=attention, mlp=mlp)
    return dataclasses.replace(spec, layers=(layer,) * size["L"], tied_embeddings="untied-embeddings" not in names,
                               position_embeddings=size["pos"])


def _megatron_setup(row) -> tuple[object, TrainingSetup]:
    """A Megatron row's (spec, set-up): its parallel layout, recompute, distributed optimizer and
    attention backend from the row's columns and ``techniques``."""
    names = row["techniques"].split(";") if isinstance(row["techniques"], str) else []
    fields = {"stack": "megatron", "method": "full", "precision": "bf16-mixed", "optimizer": "adamw"}
    for name in names:
        if name.startswith(("vp=", "cp=", "dropout=")):
            key, value = name.split("=")
            if key == "vp":
                fields.update(virtual_stages=int(value), pipeline_schedule="interleaved")
            elif key == "cp":
                fields["context_parallel"] = int(value)
            else:
                fields["dropout"] = float(value)
        elif name in MEGATRON_FLAGS:
            fields.update(MEGATRON_FLAGS[name])
        elif name != "swiglu":
            raise Unexpressible(f"megatron technique {name} not priced")
    spec = _megatron_spec(row, names)
    fields.update(seq_len=int(_stated(row, "seq_len")), micro_batch=int(_stated(row, "micro_batch")),
                  grad_accum=int(_stated(row, "grad_accum")), num_gpus=int(_stated(row, "num_gpus")),
                  tensor_parallel=int(_stated(row, "tp")), pipeline_parallel=int(_stated(row, "pp")),
                  checkpointing=str(_stated(row, "checkpointing")))
    try:
        return spec, TrainingSetup(**fields)
    except (ValueError, PlannerError) as exc:
        raise Unexpressible(f"set-up refused: {str(exc).splitlines()[0][:80]}") from None


def setup_for(row) -> tuple[object, TrainingSetup]:
    """The (spec, set-up) a published row ran, or ``Unexpressible`` with the reason."""
    if row["stack"] == "megatron":
        return _megatron_setup(row)
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
    if row["id"] in CUDNN_ATTENTION_RECOMPUTED:
        raise Unexpressible(f"{CUDNN_ATTENTION_RECOMPUTED[row['id']]}: op-SAC recomputes cuDNN attention (not saved "
                            "before torchtitan PR #2095), which torchtitan 0.3.0 saves")
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


MEGATRON_MEASURED_RANK = {"megatron_functional_tests": "last", "megatron_pr482": "first"}
"""Which pipeline rank a Megatron source's counter reads: the functional tests log memory through the
tensorboard writer, which exists on rank world_size - 1 only (``megatron/training/global_vars.py``), a GPU of
the last pipeline stage; PR #482's table names rank 0. The estimate's peak is the worst rank's."""


def _megatron_rank_peak_gib(spec, setup: TrainingSetup, source_id: str) -> float:
    """Peak allocated of the pipeline rank the source measured (``megatron_stack.rank_phases_and_components``)."""
    from planner.cost.memory import megatron_stack as ms
    from planner.cost.support import require_priced

    require_priced(setup)
    ranks = ms.ranks(spec, setup)
    rank = ranks[-1] if MEGATRON_MEASURED_RANK[source_id] == "last" else ranks[0]
    phases, _ = ms.rank_phases_and_components(spec, setup, rank, setup.micro_batch, setup.seq_len)
    return max(float(v) for v in phases.values()) / GIB


def predicted_gib(spec, setup: TrainingSetup, metric: str, source_id: str = "") -> float:
    if setup.stack == "megatron" and COMPARED[metric] == "peak_bytes" and source_id in MEGATRON_MEASURED_RANK:
        return _megatron_rank_peak_gib(spec, setup, source_id)
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
            predicted = predicted_gib(spec, setup, row["metric"], row["source_id"])
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
