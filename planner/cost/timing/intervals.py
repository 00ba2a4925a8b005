"""Time and cost of one set-up with an interval: what ``planner estimate``, ``planner fit`` and
the plan search show.

Uncalibrated, the step time is the grounded model (``planner.cost.timing.grounding``) and its 80%
interval comes from the leave-one-source-out errors of the set-up's regime (single GPU, one
node, several nodes). With a calibration profile the step time is the calibrated one and the
interval comes from the profile's own held-out points (``Profile.accuracy``) inside what it timed:
a profile measured on the target GPU narrows it (``planner.cost.timing.bounds``).
"""

from __future__ import annotations

import numpy as np

from planner.cost.support import unpriced
from planner.cost.timing import grounding as time_model
from planner.cost.timing.bounds import interval_factors, profile_scope, scope_gaps
from planner.cost.timing.step_time import price_usd_per_gpu_hour, step_time
from planner.specs.cluster import other_gpu_note, resolve_cluster

INTERVAL = 0.8
"""The central share the ``_low``/``_high`` fields span."""


def profile_range_note(profile, setup) -> str | None:
    """A note when ``setup`` lies beyond what ``profile`` timed (``bounds.scope_gaps``): its interval is then
    the wider of the profile's and the published regime's (a CPU profile of a 2-layer fp32 model at 128
    tokens applied to bf16 at 2048 gave an MFU above 100%)."""
    gaps = scope_gaps(profile_scope(profile), setup)
    if not gaps:
        return None
    return ("time: calibrated beyond what the profile timed: " + "; ".join(gaps)
            + ": the interval is the wider of the profile's and the published one; calibrate on a set-up like this one")


def hf_experts_note(spec, setup) -> str | None:
    """What the time of a mixture of experts under the Hugging Face stack assumes: transformers 5's
    default ``experts_implementation="grouped_mm"`` (a few grouped GEMMs per layer, one module per
    layer's experts; ``modeling_mixtral.MixtralExperts`` in 5.24), not the per-expert modules of releases
    before 4.51 (one module per expert, looped in Python), which ms-swift's benchmark measured 2x (ZeRO-2)
    and 8.7x (ZeRO-3) slower than this model prices (``THROUGHPUT_SOURCES.md``, swift_megatron_benchmark)."""
    if setup.stack != "hf" or not any(layer.num_experts for layer in spec.layers):
        return None
    return ("time: experts priced as transformers 5's grouped_mm kernels; per-expert modules looped in Python "
            "(transformers before 4.51) ran 2x slower under ZeRO-2 and 8.7x under ZeRO-3 in a published benchmark "
            "(ms-swift, Qwen1.5-MoE on 8 A800s)")


def time_fields(spec, setup, gpu, cluster_name: str | None = None, profile=None) -> dict:
    """``step_time_s`` with ``step_time_s_low``/``_high`` (the 80% interval), ``tokens_per_s``
    (the whole job), ``mfu``, ``usd_per_million_tokens`` (where the GPU has a price), each with
    its interval, the parts of the step, the regime and the cluster. A set-up the time model
    does not price gets ``time_not_priced`` instead (the memory answer stands)."""
    missing = unpriced(setup, "time")
    if missing:
        return {"time_not_priced": f"{', '.join(missing)}: not priced by the time model"}
    cluster = resolve_cluster(cluster_name, gpu)
    parts = {k: float(np.asarray(v)) for k, v in step_time(spec, setup, gpu, profile=profile, cluster=cluster).items()}
    regime = time_model.regime(setup.num_gpus, cluster.gpus_per_node)
    step = parts["step_time_s"]
    low_factor, high_factor, basis = interval_factors(setup.num_gpus, cluster.gpus_per_node, profile, setup.method,
                                                      setup.precision, setup.tokens_per_micro_batch)
    low, high = step * low_factor, step * high_factor
    tokens_per_step = step * parts["tokens_per_s"]
    out = {
        "step_time_s": step, "step_time_s_low": low, "step_time_s_high": high,
        "tokens_per_s": parts["tokens_per_s"], "tokens_per_s_low": tokens_per_step / high,
        "tokens_per_s_high": tokens_per_step / low,
        "mfu": parts["mfu"], "mfu_low": parts["mfu"] * step / high, "mfu_high": parts["mfu"] * step / low,
        "achieved_flops_per_s": parts["achieved_flops_per_s"],
        "time": {
            "parts_s": {k: v for k, v in parts.items() if k.endswith("_s") and not k.endswith("_per_s") and k != "step_time_s"},
            "regime": regime, "interval": INTERVAL, "interval_basis": basis,
            "calibrated": profile is not None, "cluster": cluster.name, "cluster_description": cluster.description,
            "cluster_note": other_gpu_note(cluster, gpu),
            "profile_note": None if profile is None else profile_range_note(profile, setup),
            "experts_note": hf_experts_note(spec, setup),
        },
    }
    price = price_usd_per_gpu_hour(gpu)
    if price is not None:
        per_token = setup.num_gpus * price / 3600.0 / parts["tokens_per_s"]
        out.update(usd_per_million_tokens=per_token * 1e6, usd_per_million_tokens_low=per_token * 1e6 * low / step,
                   usd_per_million_tokens_high=per_token * 1e6 * high / step, price_usd_per_gpu_hour=price)
    return out


NEAR_CAPACITY_HEADROOM_SHARE = 0.05
"""Headroom (share of the GPU's memory) below which the time answer warns of allocator retries: when a
``cudaMalloc`` fails, PyTorch's caching allocator frees its cached blocks and tries again, a device
synchronisation each time (``torch.cuda.memory_stats()["num_alloc_retries"]``). 5% is about twice the
memory model's median error against published peaks (2.4%, benchmarks/README.md)."""
NOT_FITTING_WARNING = "priced as if the set-up fit: it does not fit the GPU's memory, so it would not run as stated"
TIME_LEAVES_OUT = ("time leaves out: data loading (assumed hidden behind the step), evaluation, checkpoint saving, "
                   "start-up and torch.compile warm-up, stragglers, failures and restarts")


def near_capacity(headroom_share: float | None) -> bool:
    """Whether a set-up that fits leaves under ``NEAR_CAPACITY_HEADROOM_SHARE`` of the GPU's memory free."""
    return headroom_share is not None and 0.0 <= headroom_share < NEAR_CAPACITY_HEADROOM_SHARE


def near_capacity_warning(headroom_share: float) -> str:
    """The near-capacity warning, in words (the estimate's notes and the table under its time)."""
    return (f"only {headroom_share:.1%} of the GPU's memory is left free; this close to the limit PyTorch's "
            "allocator may free its cache and retry allocations (num_alloc_retries), which slows steps and is not "
            "priced; a smaller micro-batch (or PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which cuts "
            "fragmentation) makes it less likely")


def time_notes(fields: dict, headroom_share: float | None = None, fits: bool = True) -> list[str]:
    """What the time answer assumes and leaves out, in words; ``headroom_share``: the GPU's memory left
    free by the estimate (a warning below ``NEAR_CAPACITY_HEADROOM_SHARE``); ``fits``: False says the time
    is of a set-up that would not run."""
    if "time_not_priced" in fields:
        return [f"time: {fields['time_not_priced']}"]
    t = fields["time"]
    notes = [f"time: {'calibrated' if t['calibrated'] else 'grounded default model'}; "
             f"{t['interval']:.0%} interval from the {t['interval_basis']}", TIME_LEAVES_OUT]
    if not fits:
        notes.append("time: " + NOT_FITTING_WARNING)
    if near_capacity(headroom_share):
        notes.append("time: " + near_capacity_warning(headroom_share))
    notes += [t[key] for key in ("profile_note", "cluster_note", "experts_note") if t.get(key)]
    if t["cluster"] == "default":
        notes.append(f"cluster: none named (--cluster): {t['cluster_description']}")
    return notes


FIT_ROW_KEYS = ("step_time_s", "step_time_s_low", "step_time_s_high", "tokens_per_s", "tokens_per_s_low",
                "tokens_per_s_high", "mfu", "mfu_low", "mfu_high", "usd_per_million_tokens",
                "usd_per_million_tokens_low", "usd_per_million_tokens_high")


def fit_row_times(spec, row: dict, setup, gpu, seq_len: int, cluster_name: str | None = None, profile=None) -> dict:
    """``planner fit``'s time columns of one row at ``seq_len`` (the fit's sequence, which its rows'
    set-ups do not carry): at the largest micro-batch that fits (the fastest the row allows),
    ``time_micro_batch``, with the memory that micro-batch leaves free; nothing for a row that does not fit."""
    if not row.get("fits") or not row.get("max_micro_batch"):
        return {}
    at = setup.model_copy(update={"micro_batch": int(row["max_micro_batch"]), "seq_len": int(seq_len)})
    fields = time_fields(spec, at, gpu, cluster_name, profile)
    if "time_not_priced" in fields:
        return {"time_not_priced": fields["time_not_priced"]}
    from planner.cost.memory.device import memory_verdict

    # the row's peak at that micro-batch, as the fit computed it
    verdict = memory_verdict(float(row["max_micro_batch_peak_bytes"]), gpu, profile, at.stack)["gpu"]
    share = verdict["headroom_bytes"] / gpu.memory_bytes
    notes = [fields["time"][key] for key in ("profile_note", "cluster_note", "experts_note") if fields["time"].get(key)]
    return {"time_micro_batch": at.micro_batch, **{k: fields[k] for k in FIT_ROW_KEYS if k in fields},
            "time_headroom_share": share, "near_capacity": near_capacity(share), "time_notes": notes}
