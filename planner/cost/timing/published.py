"""Published measured throughput (``models_catalog/measurements/throughput.csv``) as set-ups the
planner prices: each run mapped to a (ModelSpec, TrainingSetup, GpuSpec, ClusterSpec) and its
measured tokens per second per GPU, or listed as unexpressible with the reason.

The mapping is explicit and conservative: a run whose set-up the planner cannot state (a stack
with no counterpart, a float8 recipe other than tensorwise scaling, TPU hardware, an unstated
sequence length, checkpointing mode or micro-batch where it matters) is left out by name, never
forced onto a nearby set-up; so is a run whose executed FLOPs exceed what the best GEMMs of its
GPU reach. The decisions that map a run onto a nearby vocabulary are listed in ``STACKS``,
``GPUS`` and ``FLOAT8_STACKS``.
"""

from __future__ import annotations

import csv
import math
import re
from functools import lru_cache
from typing import NamedTuple

from planner.errors import PlannerError

STACKS: dict[str, str] = {
    "megatron": "megatron", "nemo": "megatron", "megatron-deepspeed": "megatron",
    "torchtitan": "torchtitan", "torchtune": "torchtune",
    "hf-trainer": "hf", "llama-factory": "hf", "other:qwen-finetune-hf-trainer": "hf",
    "other:ms-swift-hf-trainer": "hf", "other:megatron-swift": "megatron",
    # PyTorch-native FSDP trainers with their own model code and flash attention, no HF Trainer:
    # priced as torchtitan (FSDP, native model code)
    "llm-foundry": "torchtitan", "other:fms-fsdp": "torchtitan", "other:olmo-core": "torchtitan",
}
"""Stack of the CSV -> the planner's stack. Any other (Unsloth's kernels, NeMo AutoModel, Meta's
internal stack, JAX, lit-gpt, DeepSpeed ZeRO-3 with Megatron model code...) is unexpressible."""
GPUS: dict[str, str] = {
    "a100-80gb": "a100-80gb", "a100-40gb": "a100-40gb", "a100": "a100-80gb", "h100-sxm": "h100-sxm",
    "h100": "h100-sxm", "h100-80gb": "h100-sxm", "h200": "h200", "b200": "b200", "mi300x": "mi300x",
    "rtx-4090": "rtx-4090", "rtx-a6000": "rtx-a6000",
    "a800-80gb": "a100-80gb",  # the A100's silicon, memory and clocks; its capped NVLink is the a800-8gpu cluster's
}
"""GPU of the CSV -> catalog GPU. Left out: V100 16GB and TPUs are not in the catalog (the V100
16GB rows are BERT sequence-classification runs, which the notes exclusions would refuse too)."""
POWER_CAPPED_GPUS: dict[str, str] = {"h100-96gb-hbm2e-500w": "h100-500w-grand-teton",
                                     "h100-95gb-hbm2e-lowtdp": "h100-500w-grand-teton"}
"""GPU of the CSV -> a part of ``ceiling.POWER_CAPPED``: Meta's Grand Teton H100s (HBM2e, 500 W
limit), on which torchtitan's own H100 benchmarks ran. Priced as their chip (the catalog's H100
SXM) times the fitted ``power_cap.h100-500w``; outside the catalog because their clock, memory
bandwidth and price are not published."""
CLUSTERS: dict[str, str] = {
    "RoCE 1600 Gbps per node": "mosaicml-a100-roce", "Omni-Path (4 links per node)": "jean-zay-a100",
    "RDMA 400 Gb/s per GPU (Grand Teton backend network)": "roce-400g-h100", "IB 8x200G HDR (Selene)": "dgx-a100",
    "IB HDR (Selene, full fat tree)": "dgx-a100", "IB 8x200G HDR": "dgx-a100", "RoCE 400 Gbps per GPU": "roce-400g-h100",
    "RDMA 400 Gb/s per GPU (Mellanox CX-7)": "roce-400g-h100", "NVLink 400 GB/s (A800), one node": "a800-8gpu",
}
"""Network column -> catalog cluster; an unstated network takes the GPU's default cluster."""
ATTENTIONS: dict[str, str] = {"unfused (materialized scores, fused softmax; before FlashAttention)": "eager"}
"""Attention column -> the set-up's attention; any other (flash-attn-2, triton-flash, SDPA, blank) is
``sdpa``: a flash kernel. The Megatron papers' and BLOOM's runs predate FlashAttention in Megatron
(d693034, 2022-12-08): their scores were materialised."""
EXTRA_ARCHITECTURES: dict[str, str] = {
    # Qwen (v1) configs, Hugging Face Qwen/Qwen-*/config.json (intermediate_size there is 2 x ffn)
    "qwen-1.8b": "L=24;h=2048;a=16;kv=16;ffn=5504;V=151936",
    "qwen-7b": "L=32;h=4096;a=32;kv=32;ffn=11008;V=151936",
    "qwen-14b": "L=40;h=5120;a=40;kv=40;ffn=13696;V=152064",
    "qwen-72b": "L=80;h=8192;a=64;kv=64;ffn=24576;V=152064",
}
"""Architectures of CSV models that are neither in the catalog nor given in ``hf_config_like``."""
NOTE_EXCLUSIONS: tuple[tuple[str, str], ...] = (
    ("GPTQ Int4", "QLoRA on a GPTQ int4 checkpoint: the planner's QLoRA is bitsandbytes NF4"),
    ("settings not stated", "optimizer / DeepSpeed offload settings not stated"),
    ("Unpacked rows use alpaca", "unpacked short samples padded per batch: the tokens per step are not stated"),
    ("limit not stated", "GPU power limit not stated"),
    ("NOT THE PUBLISHED CODE", "measured with code that was not published (the source's script at the row's commit "
     "cannot run distributed): its set-up is not stated"),
    ("CPU offload", "FSDP CPU offload of parameters: not priced by the time model"),
    ("Encoder-only model", "encoder-only sequence classification (BERT): the time model prices causal LMs with their "
     "output head over the vocabulary"),
    ("MOE DEEPSPEED COMMAND NOT PUBLISHED", "the DeepSpeed command of these MoE runs is not published: their "
     "micro-batch, accumulation and model are assumed"),
    ("DOCUMENT LENGTHS NOT STATED", "packed bins attended per document, whose lengths are not stated: the attention "
     "work and the tokens per bin are not known"),
    ("a single iteration (the 2nd)", "one early iteration (the 2nd) of a topology search, not a steady-state step "
     "(and the candidates' vocabulary is not stated)"),
)
"""(phrase in a row's notes, reason): runs whose notes say the set-up differs from what the
columns alone state. A phrase only excludes rows of the source whose notes use it for that."""
_OFFLOAD, _IN_BWD, _PAGED = (dict(activation_offload=True), dict(optimizer_in_backward=True),
                              dict(optimizer="paged-adamw-8bit"))
ROW_TECHNIQUES: dict[str, dict] = {
    # torchtune README 'Optimization flags' (PR #2003): techniques cumulative top to bottom, the
    # LoRA/QLoRA rows without optimizer-in-backward and 8-bit AdamW; the 8-bit optimizer is the
    # 3B_full_single_device config's bitsandbytes.optim.PagedAdamW8bit
    "torchtune_readme_2024_11-006": _IN_BWD,
    "torchtune_readme_2024_11-007": {**_IN_BWD, **_OFFLOAD},
    "torchtune_readme_2024_11-008": {**_IN_BWD, **_OFFLOAD, **_PAGED},
    "torchtune_readme_2024_11-009": _OFFLOAD,
    "torchtune_readme_2024_11-010": _OFFLOAD,
    # README of PR #1664, 8B_full_single_device: PagedAdamW8bit stepped in backward (from its config)
    "torchtune_readme_2024_09-001": {**_IN_BWD, **_PAGED},
    "torchtune_readme_2024_09-002": {**_IN_BWD, **_PAGED},  # 'same recipe as the 4090 row' (its notes)
}
"""Run -> the techniques its source states in prose (the CSV has no column for them)."""
_GATED = ("llama", "qwen", "mistral")
_METRIC_ORDER = ("tokens_per_s_per_gpu", "tokens_per_s_total", "samples_per_s_total", "step_time_s", "tflops_per_gpu")


class Run(NamedTuple):
    """One published run the planner can state, with its measured throughput."""

    id: str
    source_id: str
    spec: object
    setup: object
    gpu: object
    cluster: object
    regime: str
    tokens_per_s_per_gpu: float
    metric: str


def _float(row: dict, key: str) -> float | None:
    text = (row.get(key) or "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _config(row: dict, seq_len: int) -> dict | None:
    """An HF-style config from ``hf_config_like`` (llama-like when the MLP is gated, GPT-2-like
    with learned positions otherwise: MPT, Megatron GPT, BLOOM, OPT)."""
    text = row.get("hf_config_like") or EXTRA_ARCHITECTURES.get(row["model"], "")
    fields = dict(part.split("=") for part in text.split(";") if "=" in part)
    if not {"L", "h", "a"} <= set(fields):
        return None
    L, h, a = int(fields["L"]), int(fields["h"]), int(fields["a"])
    ffn = int(fields.get("ffn", 4 * h))
    vocab = int(fields.get("V", 51200))  # Megatron's padded GPT-2 vocabulary when unstated
    if any(word in row["model"] for word in _GATED):
        return {"model_type": "llama", "num_hidden_layers": L, "hidden_size": h, "num_attention_heads": a,
                "num_key_value_heads": int(fields.get("kv", a)), "intermediate_size": ffn, "vocab_size": vocab,
                "max_position_embeddings": max(seq_len, 2048), "tie_word_embeddings": False}
    return {"model_type": "gpt2", "n_layer": L, "n_embd": h, "n_head": a, "n_inner": ffn, "vocab_size": vocab,
            "n_positions": max(seq_len, 2048), "tie_word_embeddings": True}


def _spec(row: dict, seq_len: int):
    from planner.specs.catalog import list_models, load_spec
    from planner.specs.model import model_spec_from_config

    if row["model"] in list_models() and not row.get("hf_config_like"):
        return load_spec(row["model"])
    cfg = _config(row, seq_len)
    return None if cfg is None else model_spec_from_config(cfg, row["model"])


def _tokens_per_s_per_gpu(row: dict, spec, seq_len: int, num_gpus: int) -> float | None:
    """The measurement as tokens per second per GPU; Megatron-style hardware TFLOP/s are inverted
    with the source's own FLOP count (Narayanan et al. 2021 eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh)
    per B sequences, full recompute; BLOOM's Megatron-DeepSpeed: 8 x params per token)."""
    value, metric = float(row["value"]), row["metric"]
    if metric == "tokens_per_s_per_gpu":
        return value
    if metric == "tokens_per_s_total":
        return value / num_gpus
    if metric == "samples_per_s_total":
        return value * seq_len / num_gpus
    if metric == "step_time_s":
        batch = _float(row, "global_batch_seqs")
        return None if batch is None else batch * seq_len / num_gpus / value
    if metric == "tflops_per_gpu" and row["source_id"] == "megatron2021":
        L, h, V = spec.num_layers, spec.hidden_size, spec.vocab_size
        per_token = 96 * L * h * h * (1 + seq_len / (6 * h) + V / (16 * L * h))
        return value * 1e12 / per_token
    if metric == "tflops_per_gpu" and row["source_id"] == "bloom_tr11":
        from planner.cost.spec_facts import param_counts

        return value * 1e12 / (8.0 * param_counts(spec).total)
    return None


def _layout(row: dict) -> dict | str:
    """The parallel layout and batch of a row, or why it cannot be stated."""
    num_gpus = _float(row, "num_gpus")
    seq = _float(row, "seq_len")
    if num_gpus is None or seq is None:
        return "GPU count or sequence length not stated"
    tp, pp, cp = (int(_float(row, k) or 1) for k in ("tp", "pp", "cp"))
    vpp = int(_float(row, "vpp") or 1)
    micro = _float(row, "micro_batch")
    batch = _float(row, "global_batch_seqs")
    dp = int(num_gpus) // (tp * pp * cp)
    if micro is None or batch is None:
        return "micro-batch or global batch not stated"
    accum = batch / (micro * dp)
    if accum < 1 or abs(accum - round(accum)) > 1e-6:
        return f"global batch {batch:g} is not a whole number of micro-batches of {micro:g} over {dp} replicas"
    layout = dict(num_gpus=int(num_gpus), seq_len=int(seq), tensor_parallel=tp, pipeline_parallel=pp,
                  context_parallel=cp, micro_batch=int(micro), grad_accum=int(round(accum)))
    if vpp > 1:
        layout.update(virtual_stages=vpp, pipeline_schedule="interleaved")
    return layout


FLOAT8_STACKS = ("torchtitan", "other:olmo-core", "llm-foundry")
"""Stacks whose fp8 rows are priced as ``float8=True`` (``planner.cost.timing.float8``, torchao's
tensorwise dynamic scaling): torchtitan and OLMo-core run torchao float8 linears; llm-foundry's
``amp_fp8`` runs TransformerEngine's fp8 linears (the same fp8 GEMMs of every decoder linear;
its delayed scaling skips the amax pass, so the casts are priced a little high for it). NeMo /
Megatron-Bridge fp8 rows state no checkpointing and stay out on that ground."""


def _float8_refusal(row: dict) -> str | None:
    """Why an fp8 row is not torchao's tensorwise float8 as the time model prices it, or None."""
    recipe = f"{row.get('location', '')} {row.get('notes', '')}".lower()
    if row["stack"] not in FLOAT8_STACKS:
        return f"precision fp8 on stack {row['stack']!r}: float8 is priced for torchao (torchtitan) and TransformerEngine"
    if "rowwise" in recipe or "mxfp8" in recipe:
        return "float8 rowwise or MX block scaling: the time model prices tensorwise dynamic scaling"
    return None


def _setup_fields(row: dict) -> dict | str:
    """Method, precision, stack and techniques of a row, or why they cannot be stated."""
    stack = STACKS.get(row["stack"])
    for phrase, reason in NOTE_EXCLUSIONS:
        if phrase in (row.get("notes") or "") and not (phrase == "Unpacked rows use alpaca" and row["packed"] == "true"):
            return reason
    if stack is None:
        return f"stack {row['stack']!r} has no counterpart among the planner's stacks"
    precision = (row.get("precision") or "").strip()
    if precision == "fp32":
        return "fp32 training is not in the published set-ups the time model was fitted on"
    float8 = precision == "fp8"
    if float8:
        refused = _float8_refusal(row)
        if refused:
            return refused
        precision = "bf16-mixed" if row["stack"] == "llm-foundry" else "bf16"  # Composer's amp_fp8 is autocast
    # 16-bit type not stated (Megatron papers) or fp16: the same tensor-core peak as bf16 on these GPUs
    # HF Trainer's --bf16 is torch.autocast over fp32 master weights
    precision = "bf16" if precision == "bf16" and stack != "hf" else "bf16-mixed"
    ckpt = {"full": "full", "none": "none", "op-sac": "selective", "selective": "selective"}.get(row["checkpointing"])
    if ckpt is None:
        return f"activation checkpointing {row['checkpointing'] or 'not stated'!r}: its recompute cannot be priced"
    fields = dict(stack=stack, precision=precision, checkpointing=ckpt, method=row["method"],
                  attention=ATTENTIONS.get((row.get("attention") or "").strip(), "sdpa"),
                  compile=row.get("compile", "").strip().lower() == "true", float8=float8)
    recipe = f"{row.get('location', '')} {row.get('notes', '')}".lower()
    if float8 and ("float8 all-gather" in recipe or "f8 all-gather" in recipe):
        fields["float8_all_gather"] = True
    zero = _float(row, "zero")
    if zero is None and stack == "hf" and (_float(row, "num_gpus") or 1) > 1:
        return "ZeRO stage of a multi-GPU HF Trainer run not recorded"
    fields["zero"] = int(zero) if zero else 0
    if row["method"] != "full":
        fields["lora_rank"] = int(_float(row, "lora_rank") or 16)
    if _float(row, "ep") not in (None, 1.0):
        return "expert parallelism is not priced by the time model"
    if row.get("sequence_parallel", "").strip().lower() == "true":
        fields["sequence_parallel"] = True
    if stack == "torchtitan":  # every FSDP run here predates torchtitan's early_stop=False (PR #1580, 2025-08-29)
        fields["checkpoint_early_stop"] = True
    return {**fields, **ROW_TECHNIQUES.get(row["id"], {})}


def map_row(row: dict) -> Run | str:
    """A ``Run`` for one CSV row, or the reason it cannot be stated."""
    from planner.cost.timing.grounding import regime
    from planner.specs.cluster import load_cluster, resolve_cluster
    from planner.specs.setup import TrainingSetup

    gpu_name = GPUS.get(row.get("gpu") or "") or POWER_CAPPED_GPUS.get(row.get("gpu") or "")
    if gpu_name is None:
        return f"GPU {row.get('gpu') or 'not stated'!r} is not in the catalog"
    fields = _setup_fields(row)
    if isinstance(fields, str):
        return fields
    layout = _layout(row)
    if isinstance(layout, str):
        return layout
    try:
        spec = _spec(row, layout["seq_len"])
        if spec is None:
            return f"architecture of {row['model']!r} not stated"
        setup = TrainingSetup(**fields, **layout)
    except (PlannerError, ValueError) as exc:
        return f"set-up not expressible: {str(exc).splitlines()[0]}"
    gpu = _gpu(gpu_name)
    network = row.get("network") or ""
    cluster = load_cluster(CLUSTERS[network]) if network in CLUSTERS else resolve_cluster(None, gpu)
    per_node = _float(row, "gpus_per_node")
    if per_node and int(per_node) != cluster.gpus_per_node:  # a stated node size beats the assumed one
        cluster = cluster.model_copy(update={"gpus_per_node": int(per_node)})
    tokens = _tokens_per_s_per_gpu(row, spec, setup.seq_len, setup.num_gpus)
    if tokens is None:
        return f"metric {row['metric']} cannot be turned into tokens per second per GPU"
    hfu, bound = _implied_hfu(spec, setup, gpu, tokens), _plausible_share(gpu, setup)
    if hfu > bound:
        return (f"implausible: the measurement implies {hfu:.0%} of the GPU's peak in executed FLOPs (recompute "
                f"included), above the {bound:.0%} its best GEMMs reach (a job total read as per GPU, or a recipe "
                "other than the one stated?)")
    return Run(row["id"], row["source_id"], spec, setup, gpu, cluster, regime(setup.num_gpus, cluster.gpus_per_node),
               tokens, row["metric"])


def _gpu(name: str):
    """The catalog GPU, or a power-capped part as its chip under its own name, with its own memory:
    96 GB of HBM2e at 2.4 TB/s (torchtitan ``benchmarks/llama3_h100_202412_torchtitan.md``,
    'Hardware'); its price is not published."""
    from planner.cost.timing.ceiling import POWER_CAPPED
    from planner.specs.catalog import load_gpu

    if name not in POWER_CAPPED:
        return load_gpu(name)
    chip = load_gpu(POWER_CAPPED[name])
    source = ("pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, 'Hardware': H100 with 96 GB HBM2e "
              "at 2.4 TB/s, 500 W power limit (the chip's peaks and links: the H100 SXM's, catalog sources)")
    return chip.model_copy(update={"name": name, "aliases": (), "memory_bytes": 96 * 10**9,
                                   "memory_bandwidth_bytes_per_s": 2.4e12, "price_usd_per_hour": None,
                                   "sources": {**chip.sources, "memory_bytes": source,
                                               "memory_bandwidth_bytes_per_s": source,
                                               "price_usd_per_hour": "not published"}})


def _plausible_share(gpu, setup) -> float:
    """The most of its peak a GPU's executed FLOPs can reach: its measured matmul ceiling
    (``planner.cost.timing.ceiling``; a whole step also runs slower kernels), or for a GPU
    without a measurement the highest ceiling any GPU of the table reached."""
    from planner.cost.timing.ceiling import ceiling_rows, matmul_ceiling

    dtype = "fp8" if setup.float8 else "bf16"
    share, origin = matmul_ceiling(gpu, dtype)
    if origin == "measured":
        return share
    return max(r["fraction"] for r in ceiling_rows() if r["dtype"] == dtype)


def _implied_hfu(spec, setup, gpu, tokens_per_s_per_gpu: float) -> float:
    """Executed FLOPs per token (``planner.cost.estimate.training_flops``: forward, backward and
    the recompute of the run's checkpointing) x tokens/s over the dense peak (the fp8 peak for
    float8 runs): above 1 no GPU can have run it."""
    from planner.cost.estimate import training_flops

    one = setup.model_copy(update={"micro_batch": 1})
    per_token = float(training_flops(spec, one).executed) / setup.seq_len
    return per_token * tokens_per_s_per_gpu / gpu.peak_flops_for("fp8" if setup.float8 else setup.precision)


def _run_key(row_id: str) -> str:
    """Rows ``x-001a``, ``x-001b`` are one run reported in several metrics."""
    return re.sub(r"(?<=\d)[a-z]$", "", row_id)


@lru_cache(maxsize=1)
def published_runs() -> tuple[tuple[Run, ...], tuple[tuple[str, str, str], ...]]:
    """(runs, unexpressible): one ``Run`` per published run, its metric the first of
    ``_METRIC_ORDER`` it reports; ``unexpressible`` lists (id, source_id, reason)."""
    from planner.specs.catalog import catalog_root

    text = catalog_root().joinpath("measurements", "throughput.csv").read_text(encoding="utf-8")
    groups: dict[str, list[dict]] = {}
    for row in csv.DictReader(text.splitlines()):
        groups.setdefault(_run_key(row["id"]), []).append(row)
    runs, left_out = [], []
    for key, rows in groups.items():
        usable = sorted((r for r in rows if r["metric"] in _METRIC_ORDER), key=lambda r: _METRIC_ORDER.index(r["metric"]))
        if not usable:
            left_out.append((key, rows[0]["source_id"], f"only {rows[0]['metric']} reported (its FLOP count differs by source)"))
            continue
        mapped = map_row(usable[0])
        if isinstance(mapped, str):
            left_out.append((key, rows[0]["source_id"], mapped))
        else:
            runs.append(mapped)
    return tuple(runs), tuple(left_out)
