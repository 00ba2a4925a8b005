"""Published HF Trainer + DeepSpeed ZeRO runs against the planner, before and after ZeRO's buffers.

    python benchmarks/bench_zero_published.py

Reads the ZeRO rows of ``models_catalog/measurements/memory.csv`` (``zero`` stated, or the stack
``hf-trainer+deepspeed`` on more than one GPU) and prices each as it ran, with the DeepSpeed
configuration its source used (``ROW_RUNS``: the config file of the repository at the commit the
source points to). "before" is ideal sharding (``zero_buffers.applies`` off), "after" adds
``planner.cost.memory.zero_buffers`` with the row's configuration; "exported" prices the same set-up
with the configuration ``plan --export deepspeed`` writes (DeepSpeed's default buckets), which is what
``planner estimate`` answers. Rows the planner cannot express are listed with the reason.
Nothing is fitted on these rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from planner.cost.memory import phases as mem_phases
from planner.cost.memory import zero_buffers as zb
from planner.cost.memory.states import model_states
from planner.specs.catalog import load_spec
from planner.specs.model import model_spec_from_config
from planner.specs.setup import TrainingSetup

CSV = mem_phases.__file__.rsplit("/planner/", 1)[0] + "/models_catalog/measurements/memory.csv"
GIB = 1024**3

# Qwen-1 (QwenLM/Qwen, custom "qwen" modelling code) as its Qwen2-architecture equivalent: MHA with a
# biased fused qkv (c_attn), no other biases, SwiGLU of intermediate_size / 2 (the config's 22016 and
# 49152 count both halves), RMSNorm, untied head. Figures from the Hub configs Qwen/Qwen-7B and
# Qwen/Qwen-72B (hidden, layers, heads, vocabulary).
QWEN1 = {
    "qwen-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=151936),
    "qwen-72b": dict(hidden_size=8192, intermediate_size=24576, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=64, vocab_size=152064),
}


def qwen1_spec(name: str):
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "attention_dropout": 0.0, **QWEN1[name]}
    return model_spec_from_config(cfg, name=name)


@dataclass(frozen=True)
class RowRun:
    """How rows ran: ZeRO stage, the DeepSpeed config's buckets, the optimizer step, the source of both."""

    zero: int
    config: object  # a function of the spec giving its ZeroConfig
    optimizer_impl: str
    why: str


def _qwen_zero3(spec) -> zb.ZeroConfig:
    """finetune/ds_config_zero3.json (QwenLM/Qwen 2df8e8a): overlap_comm and contiguous_gradients true,
    reduce_bucket_size / stage3_prefetch_bucket_size / stage3_param_persistence_threshold "auto",
    stage3_max_live_parameters, stage3_max_reuse_distance and sub_group_size 1e9."""
    return zb.hf_auto(zb.exported_config(3), spec.hidden_size)


def _qwen_zero2(spec) -> zb.ZeroConfig:
    """finetune/ds_config_zero2.json (QwenLM/Qwen 2df8e8a): allgather and reduce buckets 2e8,
    overlap_comm, reduce_scatter and contiguous_gradients true."""
    from dataclasses import replace

    return replace(zb.exported_config(2), reduce_bucket_elems=2e8, allgather_bucket_elems=2e8)


# keyed by (source_id, model, method, GPUs); the "optimizer" AdamW of both Qwen configs is DeepSpeed's
# FusedAdam (no step temporaries)
ROW_RUNS = {
    # README: "we use DeepSpeed ZeRO 3 in this script" (finetune_ds.sh, full parameters, 2 GPUs)
    ("qwen1_readme_profiling", "qwen-7b", "full", 2): RowRun(3, _qwen_zero3, "fused", "finetune_ds.sh -> ds_config_zero3.json"),
    # "LoRA (multinode)", 2 nodes x 2 GPUs: finetune_lora_ds.sh's default DS_CONFIG_PATH is ds_config_zero2.json
    # and the README advises against ZeRO-3 across nodes
    ("qwen1_readme_profiling", "qwen-7b", "lora", 4): RowRun(2, _qwen_zero2, "fused", "finetune_lora_ds.sh -> ds_config_zero2.json"),
    # README: "Lora fintuning + DeepSpeed ZeRO 3 on 4 A100-SXM4-80G GPUs" (--deepspeed ds_config_zero3.json)
    ("qwen1_readme_profiling", "qwen-72b", "lora", 4): RowRun(3, _qwen_zero3, "fused", "--deepspeed ds_config_zero3.json"),
}


def _stated(value) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value)))


def zero_rows(table: pd.DataFrame) -> pd.DataFrame:
    multi = (table["stack"] == "hf-trainer+deepspeed") & (table["num_gpus"] > 1)
    # Megatron's rows state zero=1 for its distributed optimizer: compared by bench_memory_published
    return table[(table["zero"].notna() | multi) & (table["stack"] != "megatron")]


def row_setup(row) -> tuple[object, TrainingSetup, zb.ZeroConfig, float]:
    """(spec, set-up, DeepSpeed config, measured GiB per GPU) of a row, or ValueError with the reason."""
    if "NOT THE PUBLISHED CODE" in str(row["notes"]):
        raise ValueError("measured with code that was not published (the source's script at the row's commit cannot "
                         "run it): its set-up is not stated")
    if _stated(row["offload"]) and row["offload"] != "none":
        raise ValueError(f"ZeRO-3 with {row['offload']} offloaded to the CPU: parameter offload is not priced")
    run = ROW_RUNS.get((row["source_id"], row["model"], row["method"], int(row["num_gpus"])))
    if run is None:
        raise ValueError(f"source {row['source_id']}: the DeepSpeed configuration it ran is not recorded in ROW_RUNS")
    name = str(row["model"])
    spec = qwen1_spec(name) if name in QWEN1 else load_spec(name)
    fields = dict(method=row["method"], precision=str(row["precision"]), optimizer=str(row["optimizer"]),
                  optimizer_impl=run.optimizer_impl, seq_len=int(row["seq_len"]), micro_batch=int(row["micro_batch"]),
                  grad_accum=int(row["grad_accum"]), checkpointing=str(row["checkpointing"]),
                  num_gpus=int(row["num_gpus"]), zero=run.zero)
    if row["method"] != "full":
        fields.update(lora_rank=int(row["lora_rank"]), lora_targets="all-linear")
    setup = TrainingSetup(**fields)
    config = run.config(spec)
    # Qwen-1's multi-GPU figures are totals over the GPUs (MEMORY_SOURCES.md)
    return spec, setup, config, float(row["value_gib"]) / int(row["num_gpus"])


def peak_gib(spec, setup: TrainingSetup, config: zb.ZeroConfig | None) -> float:
    """Peak bytes (GiB) of ``setup``: ideal sharding when ``config`` is None, else with ZeRO's buffers
    for ``config`` added phase by phase (as ``phases._phases`` does with the exported configuration)."""
    applies = zb.applies
    zb.applies = lambda s: False
    try:
        base = mem_phases.training_memory(spec, setup).phases
    finally:
        zb.applies = applies
    if config is None:
        return max(float(v) for v in base.values()) / GIB
    bytes_setup = mem_phases._bytes_setup(setup)
    states = model_states(spec, bytes_setup, np.float64(setup.lora_rank))
    extra = zb.zero_buffer_bytes(spec, bytes_setup, states, config)
    return max(float(base[k] + extra[k]) for k in base) / GIB


def compare(table: pd.DataFrame):
    rows, skipped = [], []
    for _, row in zero_rows(table).iterrows():
        try:
            spec, setup, config, measured = row_setup(row)
        except (ValueError, KeyError) as why:
            skipped.append((row["id"], str(why).splitlines()[0]))
            continue
        except Exception as why:  # noqa: BLE001 - a model without a config is a reason, listed
            skipped.append((row["id"], str(why).splitlines()[0][:90]))
            continue
        rows.append(dict(row=row["id"], setup=f"{row['model']} {setup.method} ZeRO-{setup.zero} x{setup.num_gpus} "
                                              f"b{setup.micro_batch}x{setup.seq_len} ga{setup.grad_accum}",
                         measured=measured, before=peak_gib(spec, setup, None), after=peak_gib(spec, setup, config),
                         exported=peak_gib(spec, setup, zb.exported_config(setup.zero))))
    return rows, skipped


def main() -> None:
    rows, skipped = compare(pd.read_csv(CSV))
    print("| row | set-up | measured GiB/GPU | before | error | after (row's config) | error | exported config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['setup']} | {r['measured']:.2f} | {r['before']:.2f} | {r['before'] / r['measured'] - 1:+.1%} "
              f"| {r['after']:.2f} | {r['after'] / r['measured'] - 1:+.1%} | {r['exported']:.2f} |")
    for name, key in (("before", "before"), ("after", "after")):
        errors = [abs(r[key] / r["measured"] - 1) for r in rows]
        if errors:
            print(f"\n{name}: {len(errors)} rows, median |error| {np.median(errors):.1%}, max {max(errors):.1%}")
    print("\nNot expressible:")
    for row_id, why in skipped:
        print(f"- {row_id}: {why}")


if __name__ == "__main__":
    main()
