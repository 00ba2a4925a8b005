"""Text tables and JSON for people and machines: the verbs' tables are laid out here, with
the unit formatting of ``planner.units``. ``--json`` output is SI numbers, never formatted strings.
"""

from __future__ import annotations

import json

from planner.units import fmt_bytes, fmt_count, fmt_flops, fmt_percent, fmt_seconds, fmt_usd


def to_json(obj) -> str:
    """JSON for machines: numpy scalars and arrays become plain numbers and lists."""
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False)


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON")


def _column_text(name: str, values: list) -> list[str]:
    """Header and cells of one column: pandas pads the header of an all-integer or all-boolean
    column with one space (room for a sign)."""
    numeric = all(isinstance(v, bool) for v in values) or not any(isinstance(v, bool | str) for v in values)
    return [f" {name}" if numeric else str(name)] + [str(v) for v in values]


def render_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table from already-formatted rows, laid out as pandas' ``to_string(index=False)``
    does: every column right-justified to its widest cell, one space between columns.

    Rows of text, integers and booleans are laid out here (importing pandas costs a short verb
    more than the rest of its work); anything else (floats, missing cells) goes to pandas itself.
    ``tests/test_report.py`` checks the two layouts agree."""
    names = columns if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    if not rows or not names or any(
            set(row) - set(names) or any(not isinstance(row.get(n), str | int) for n in names) for row in rows):
        import pandas as pd

        return pd.DataFrame(rows, columns=columns).to_string(index=False)
    cells = list(zip(*(_column_text(n, [row[n] for row in rows]) for n in names), strict=True))
    widths = [max(len(line[i]) for line in cells) for i in range(len(names))]
    return "\n".join(" ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells)


# ----------------------------------------------------------------------------- memory verbs


def _stack_words(setup: dict) -> str:
    """The stack and the techniques a set-up turns on, for the header of a table ("" for plain HF)."""
    from planner.specs.techniques import technique_words

    words = [f"stack {setup['stack']}"] if setup.get("stack", "hf") != "hf" else []
    words += technique_words(setup)
    return (", " + ", ".join(words)) if words else ""


_IMPL_OPTIMIZERS = ("adamw", "sgd", "adafactor")
"""torch.optim optimizers whose ``optimizer_impl`` (foreach, fused, for-loop) changes what runs; the
others (8-bit, Lion, GaLore) run their own per-parameter loop whatever it says."""


def _optimizer_words(setup: dict) -> str:
    """"adamw (foreach)", "galore-adamw (rank 128)", "adamw-8bit": the implementation only where it means something."""
    name = setup["optimizer"]
    if name == "galore-adamw":
        return f"{name} (rank {setup.get('galore_rank', 128)})"
    return f"{name} ({setup['optimizer_impl']})" if name in _IMPL_OPTIMIZERS else name


def estimate_text(result: dict) -> str:
    """`planner estimate` for people: components, phases, peak, FLOPs."""
    s = result["setup"]
    lines = [
        f"{result['model']}: {s['method']} fine-tuning, {s['precision']}, {_optimizer_words(s)}, "
        f"micro-batch {s['micro_batch']} x {s['seq_len']} tokens, checkpointing {s['checkpointing']}, "
        f"attention {s['attention']}"
        + (f", {s['num_gpus']} GPUs ZeRO-{s['zero']} TP {s['tensor_parallel']}" if s["num_gpus"] > 1 else "")
        + _stack_words(s),
        f"parameters: {fmt_count(result['params']['total'])} total, {fmt_count(result['params']['trainable'])} trainable",
        "",
        "memory by component (bytes per GPU):",
    ]
    components = dict(result["components"])
    if result["setup"]["checkpointing"] == "none":
        components.pop("saved_activations_with_checkpointing", None)  # the same as activations
    rows = [{"component": k, "size": fmt_bytes(v)} for k, v in components.items() if v]
    lines.append(render_table(rows))
    lines += ["", "live memory at each phase's peak:"]
    rows = [
        {"phase": k, "allocated": fmt_bytes(v), "peak": "<- peak" if k == result["peak_phase"] else ""}
        for k, v in result["phases"].items()
    ]
    lines.append(render_table(rows))
    over = result["overheads"]
    lines += [
        "",
        f"peak allocated: {fmt_bytes(result['peak_bytes'])} ({result['peak_phase']}); "
        f"+ allocator reserve {fmt_bytes(over['allocator_reserve_bytes'])} + CUDA context "
        f"{fmt_bytes(over['cuda_context_bytes'])} = {fmt_bytes(over['estimated_device_bytes'])} on the device"
        + (" (calibrated)" if over.get("calibrated") else ""),
        f"FLOPs per micro-batch: {fmt_flops(result['flops_per_micro_batch'])} "
        f"(forward {fmt_flops(result['flops']['forward'])}, backward {fmt_flops(result['flops']['backward'])}"
        + (f", recompute {fmt_flops(result['flops']['recompute'])}" if result["flops"]["recompute"] else "")
        + ")",
    ]
    if "gpu" in result:
        g = result["gpu"]
        verdict = "fits" if g["fits"] else "does NOT fit"
        lines.append(
            f"{g['name']} ({fmt_bytes(g['memory_bytes'])}): {verdict}, headroom {fmt_bytes(g['headroom_bytes'])}"
            + (" (calibrated)" if g.get("calibrated") else "")
        )
    if "step_time_s" in result:
        lines += _time_lines(result)
    elif "time_not_priced" in result:
        lines.append(f"time: {result['time_not_priced']}")
    return "\n".join(lines)


def _span(low: float, high: float, fmt) -> str:
    return f"[{fmt(low)} - {fmt(high)}]"


def _time_lines(result: dict) -> list[str]:
    """Step time, throughput, MFU and cost with their 80% interval (``planner.cost.timing.intervals``)."""
    r, t = result, result.get("time", {})
    kind = "calibrated" if t.get("calibrated") or "calibrated" in r else "default model"
    lines = [
        f"time ({kind}, {t.get('interval', 0.8):.0%} interval, {t.get('regime', '')}, cluster {t.get('cluster', '-')}):",
        f"  {'calibrated: ' if kind == 'calibrated' else ''}step {fmt_seconds(r['step_time_s'])} "
        + (_span(r["step_time_s_low"], r["step_time_s_high"], fmt_seconds) if "step_time_s_low" in r else ""),
        f"  {fmt_count(r['tokens_per_s'])} tokens/s (whole job) "
        + (_span(r["tokens_per_s_low"], r["tokens_per_s_high"], fmt_count) if "tokens_per_s_low" in r else ""),
        f"  MFU {fmt_percent(r['mfu'])} " + (_span(r["mfu_low"], r["mfu_high"], fmt_percent) if "mfu_low" in r else ""),
    ]
    if "usd_per_million_tokens" in r:
        lines.append(f"  {fmt_usd(r['usd_per_million_tokens'])} per million tokens "
                     f"{_span(r['usd_per_million_tokens_low'], r['usd_per_million_tokens_high'], fmt_usd)} "
                     f"at {fmt_usd(r['price_usd_per_gpu_hour'])} per GPU-hour")
    if "reserved_bytes" in r:
        lines.append(f"  calibrated reserved memory {fmt_bytes(r['reserved_bytes'])}")
    from planner.cost.timing.intervals import NOT_FITTING_WARNING, near_capacity_warning

    if t.get("near_capacity"):  # the time notes a reader of the table needs
        lines.append(f"  warning: {near_capacity_warning(t['headroom_share'])}")
    if not r.get("gpu", {}).get("fits", True):
        lines.append(f"  warning: {NOT_FITTING_WARNING}")
    if t.get("profile_note"):
        lines.append(f"  warning: {t['profile_note'].removeprefix('time: ')}")
    return lines


def _fit_time_cells(r: dict) -> dict:
    """`planner fit`'s time columns: at the row's largest fitting micro-batch, with the 80% interval."""
    if "step_time_s" not in r:
        return {"step (80%)": "-", "tokens/s": "-", "MFU": "-", "$/M tokens": "-"}
    mark = "*" if r.get("near_capacity") else ""
    cells = {
        "step (80%)": f"{fmt_seconds(r['step_time_s'])} {_span(r['step_time_s_low'], r['step_time_s_high'], fmt_seconds)}{mark}",
        "tokens/s": f"{fmt_count(r['tokens_per_s'])} {_span(r['tokens_per_s_low'], r['tokens_per_s_high'], fmt_count)}",
        "MFU": f"{fmt_percent(r['mfu'])}",
    }
    cells["$/M tokens"] = (f"{fmt_usd(r['usd_per_million_tokens'])} "
                           f"{_span(r['usd_per_million_tokens_low'], r['usd_per_million_tokens_high'], fmt_usd)}"
                           if "usd_per_million_tokens" in r else "-")
    return cells


_SHORT = {"optimizer in backward": "opt-in-bwd", "activation offload": "offload", "chunked CE": "chunked-CE",
          "fused linear CE": "fused-CE", "k-bit preparation": "kbit-prep", "sequence parallel": "SP"}
"""Technique words as the `fit` table abbreviates them (the JSON and the summary lines spell them out)."""


def fit_text(payload: dict) -> str:
    """`planner fit` for people: one row per set-up, fitting ones first."""
    rows = []
    for r in payload["rows"]:
        rows.append(
            {
                "method": r["method"],
                "precision": r["precision"],
                "optimizer": r["optimizer"],
                "checkpointing": r["checkpointing"],
                "stack + techniques": "+".join([r.get("stack", "hf"), *(_SHORT.get(t, t) for t in r.get("techniques", []))]),
                "peak @b=1": fmt_bytes(r["peak_bytes"]),
                "fits": "yes" if r["fits"] else "no",
                "max micro-batch": r["max_micro_batch"] or "-",
                "max seq @b=1": r["max_seq_len"] or "-",
                "headroom": fmt_bytes(r["headroom_bytes"]),
                **_fit_time_cells(r),
            }
        )
    head = (
        f"{payload['model']} on {payload['num_gpus']} x {payload['gpu']}"
        + (f" ZeRO-{payload['zero']}" if payload.get("zero") is not None else "")
        + f" at sequence {payload['seq_len']} (usable for tensors: {fmt_bytes(payload['usable_bytes'])} per GPU)"
        + ("; every number calibrated by the profile" if payload.get("calibrated_fields") else "")
    )
    lines = [head, render_table(rows)]
    if any(r.get("near_capacity") for r in payload["rows"]):
        from planner.cost.timing.intervals import NEAR_CAPACITY_HEADROOM_SHARE

        lines.append(f"* timed at a micro-batch that leaves under {NEAR_CAPACITY_HEADROOM_SHARE:.0%} of the GPU's memory "
                     "free: allocator retries may slow it (not priced); one micro-batch less avoids it")
    best = _best_fit_words(payload["rows"])
    if best:
        lines.append(best)
    lines += [f"note: {n.removeprefix('time: ')}" for n in payload.get("notes", [])]
    if payload.get("short_by_bytes") is not None:
        lines.append(f"\nnothing fits: the lightest set-up is short by {fmt_bytes(payload['short_by_bytes'])}")
        for i, fix in enumerate(payload["fixes"], 1):
            lines.append(f"  {i}. {fix['fix']}")
    return "\n".join(lines)


def _best_fit_words(rows: list[dict]) -> str:
    """Which set-up fits best (fastest where priced, else largest micro-batch), per method, one line each;
    and when only another stack makes a method fit, that it does."""
    lines = []
    for method in ("full", "lora", "qlora"):
        fitting = [r for r in rows if r["method"] == method and r["fits"]]
        if not fitting:
            continue
        # the fastest when the time model prices the rows, else the largest micro-batch
        best = max(fitting, key=lambda r: (r.get("tokens_per_s") or 0.0, r["max_micro_batch"], r["headroom_bytes"]))
        speed = f" ({fmt_count(best['tokens_per_s'])} tokens/s)" if best.get("tokens_per_s") else ""
        label = " + ".join([best.get("stack", "hf"), *best.get("techniques", [])])
        only = {r.get("stack", "hf") for r in fitting}
        tried = {r.get("stack", "hf") for r in rows if r["method"] == method}
        alone = f" (only {', '.join(sorted(only))} fits)" if len(tried) > 1 and len(only) == 1 else ""
        lines.append(f"  {method}: fits with {label}, {best['precision']}, {best['optimizer']}, checkpointing "
                     f"{best['checkpointing']} at micro-batch {best.get('time_micro_batch') or best['max_micro_batch']}"
                     f"{speed}{alone}")
    return ("\nfastest fitting set-up per method:\n" + "\n".join(lines)) if lines else ""


def inference_fit_text(result: dict) -> str:
    return "\n".join(
        [
            f"{result['model']} served on {result['gpu']} (bf16 weights and KV cache):",
            f"  weights {fmt_bytes(result['weights_bytes'])}, KV cache at {result['context_len']} tokens "
            f"{fmt_bytes(result['kv_cache_bytes'])}, peak {fmt_bytes(result['peak_bytes'])} of "
            f"{fmt_bytes(result['usable_bytes'])}: {'fits' if result['fits'] else 'does NOT fit'}",
            f"  longest context at batch 1: {result['max_context_len'] or '-'} tokens",
            f"  largest batch at {result['context_len']} tokens: {result['max_batch'] or '-'}",
        ]
    )


def catalog_text(models: list[dict], gpus: list[dict]) -> str:
    parts = []
    if models:
        rows = [
            {"model": m["name"], "type": m["model_type"], "params": fmt_count(m["params"]) if m["params"] else "-",
             "hf repo": m["hf_repo"] or ""}
            for m in models
        ]
        parts.append(render_table(rows))
    if gpus:
        rows = [
            {"gpu": g["name"], "memory": fmt_bytes(g["memory_bytes"]),
             "bandwidth": f"{g['memory_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s",
             "bf16 dense": f"{g['peak_flops'].get('bf16', 0) / 1e12:.0f} TFLOP/s", "interconnect": g["interconnect"]}
            for g in gpus
        ]
        parts.append(render_table(rows))
    return "\n\n".join(parts)


def clusters_text(clusters: list[dict]) -> str:
    """`planner catalog clusters`: the networks a step time can be priced on (``--cluster``)."""
    rows = [{"cluster": c["name"], "GPUs/node": c["gpus_per_node"], "intra-node": c["intra_node_link"],
             "inter-node per GPU": f"{c['inter_node_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s", "link": c["inter_node_link"]}
            for c in clusters]
    return render_table(rows) + "\n(without --cluster: 8 GPUs per node on the GPU's own link, 400 Gb/s per GPU between nodes)"
