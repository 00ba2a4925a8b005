"""`planner simulate`: PyTorch's own account of one training step (the fake-tensor oracle of
``planner.truth.trace``) beside the analytic estimate, with the difference per phase, per memory
category and per FLOP component.

The oracle runs CPU kernels on fake tensors, so the analytic side is computed with
``device="cpu"`` (CPU's embedding backward keeps an fp32 buffer; on CUDA it does not): the two
sides then answer the same question. Any HF config the installed transformers can build is
simulated; where ``planner.specs.model`` cannot represent it, the analytic side is absent and
the reason is given.

Categories. MemTracker's categories at the peak are grouped as ``parameters`` (Parameter +
Buffer), ``gradients``, ``optimizer`` (Optstate: states and the step's scratch) and
``activations_and_temporaries`` (Activation + Temp + Other). The analytic model keeps no
category split of a phase, so its split at its peak phase is reconstructed from its components
(weights and adapters; gradients when live in that phase; states, master weights and, in the
optimizer phase, its temporaries; the rest of the phase total) and is approximate.
"""

from __future__ import annotations

from planner.specs.setup import TrainingSetup

GROUPS = {
    "parameters": ("Parameter", "Buffer"),
    "gradients": ("Gradient",),
    "optimizer": ("Optstate",),
    "activations_and_temporaries": ("Activation", "Temp", "Other"),
}
PANEL_MAX_ERROR = 0.10
"""Issue 2's tolerance of the analytic peak against the oracle (tests/test_oracle.py)."""


def _diff(oracle: float, analytic: float | None) -> dict:
    if analytic is None:
        return {"oracle": oracle, "analytic": None, "difference": None, "relative": None}
    return {"oracle": oracle, "analytic": analytic, "difference": analytic - oracle,
            "relative": (analytic / oracle - 1) if oracle else None}


def _analytic_categories(result: dict, setup: TrainingSetup) -> dict:
    c = result["components"]
    phase = result["peak_phase"]
    total = result["phases"][phase]
    params = c["weights"] + c["lora_adapters"]
    optimizer = c["optimizer_states"] + c["master_weights"] + (c["optimizer_temporaries"] if phase == "optimizer" else 0)
    grads_live = phase == "optimizer" or setup.grad_accum > 1
    if phase == "backward" and not grads_live:
        # memory.py: the backward peak is its start (activations, no gradients) or its end
        # (every gradient, activations released)
        grads_live = _backward_end_dominates(result)
    gradients = c["gradients"] if grads_live else 0.0
    rest = total - params - optimizer - gradients
    return {"parameters": params, "gradients": gradients, "optimizer": optimizer, "activations_and_temporaries": rest}


def _backward_end_dominates(result: dict) -> bool:
    """Whether the analytic backward peak is at its end (all gradients live, activations gone):
    true when the saved activations are smaller than the gradients."""
    c = result["components"]
    return c["saved_activations_with_checkpointing"] + c["loss_temporaries"] < c["gradients"]


def _flop_components(by_module: dict[str, int]) -> dict[str, float]:
    """The oracle's per-module FLOPs grouped like ``planner.cost.flops`` components."""
    out = {"attention": 0.0, "mlp": 0.0, "lm_head": 0.0, "other": 0.0}
    for name, value in by_module.items():
        low = name.lower()
        if "attn" in low or "attention" in low:
            out["attention"] += value
        elif "mlp" in low or "expert" in low or "moe" in low or "feed_forward" in low:
            out["mlp"] += value
        elif "lm_head" in low or "output" in low:
            out["lm_head"] += value
        else:
            out["other"] += value
    return out


def simulate(config: dict, name: str, setup: TrainingSetup, num_layers: int | None = None,
             *, show_progress: bool = False) -> dict:
    """Trace ``setup`` on the model of ``config`` (``num_layers`` decoder layers; None: all) and
    compare with the analytic estimate of the same (reduced) model. ``show_progress``: a bar on
    stderr (when it is a terminal) over the phases the trace runs."""
    from planner.errors import PlannerError
    from planner.specs.configs import num_layers_of, reduce_layers
    from planner.truth.trace import trace_training_step

    total_layers = num_layers_of(config)
    if num_layers is not None and not 1 <= num_layers <= total_layers:
        raise PlannerError(f"--layers {num_layers}: the model has {total_layers} decoder layers")
    layers = num_layers or total_layers
    reduced = reduce_layers(config, layers) if num_layers else config
    try:
        oracle = trace_training_step(config, setup, num_layers, show_progress=show_progress)
    except NotImplementedError as exc:
        raise PlannerError(f"simulate: {exc}") from None
    analytic, analytic_error, spec = _analytic_estimate(reduced, name, setup)
    out = {
        "model": name,
        "num_layers": layers,
        "setup": setup.model_dump(mode="json"),
        "oracle": _oracle_summary(oracle),
        "analytic": analytic,
        "analytic_error": analytic_error,
        "differences": _differences(oracle, analytic, spec, setup),
    }
    rel = out["differences"]["peak_bytes"]["relative"]
    out["within_panel_tolerance"] = None if rel is None else bool(abs(rel) <= PANEL_MAX_ERROR)
    return out


def _analytic_estimate(reduced: dict, name: str, setup: TrainingSetup) -> tuple[dict | None, str | None, object]:
    """(estimate, None, spec) of the analytic model on ``device="cpu"``, or (None, why, None) when
    ``planner.specs.model`` cannot represent the architecture."""
    from planner.errors import PlannerError

    try:
        from planner.cost.estimate import estimate
        from planner.specs.model import model_spec_from_config

        spec = model_spec_from_config(reduced, name=name)
        return estimate(spec, setup, device="cpu"), None, spec
    except PlannerError as exc:
        return None, str(exc), None


def _oracle_summary(oracle) -> dict:
    """The oracle's ``TraceResult`` as the JSON of ``planner simulate`` (SI units, floats)."""
    return {
        "peak_bytes": float(oracle.peak_bytes),
        "peak_phase": oracle.peak_phase,
        "phases": {p: float(v) for p, v in oracle.phase_peak_bytes.items()},
        "peak_by_category": {k: float(v) for k, v in oracle.peak_by_category.items()},
        "peak_at": oracle.phase_peak_at,
        "optimizer_state_bytes": float(oracle.optimizer_state_bytes),
        "flops_forward": float(oracle.flops_forward),
        "flops_backward": float(oracle.flops_backward),
        "flops_by_module": {k: float(v) for k, v in oracle.flops_by_module.items()},
        "trainable_params": oracle.trainable_params,
        "total_params": oracle.total_params,
        "wall_s": oracle.wall_s + oracle.flops_wall_s,
        "notes": list(oracle.notes),
    }


def _differences(oracle, a: dict | None, spec, setup: TrainingSetup) -> dict:
    """Analytic against oracle: the peak, each phase, each category group at the peak, FLOPs in
    total and per component, trainable parameters (analytic sides None without an estimate)."""
    oracle_groups = {g: float(sum(oracle.peak_by_category[c] for c in cats)) for g, cats in GROUPS.items()}
    oracle_flops = float(oracle.flops_forward + oracle.flops_backward)
    return {
        "peak_bytes": _diff(float(oracle.peak_bytes), a["peak_bytes"] if a else None),
        "phases": {p: _diff(float(v), a["phases"][p] if a else None) for p, v in oracle.phase_peak_bytes.items()},
        "categories": {g: _diff(v, _analytic_categories(a, setup)[g] if a else None) for g, v in oracle_groups.items()},
        "flops": _diff(oracle_flops, a["flops"]["executed"] if a else None),
        "flops_by_component": _flop_diffs(oracle.flops_by_module, a, spec, setup),
        "trainable_params": _diff(float(oracle.trainable_params), a["params"]["trainable"] if a else None),
    }


def _lora_share(spec, setup: TrainingSetup) -> float:
    """Share of the LoRA FLOPs in attention modules (the rest in MLPs): adapters cost r x (in +
    out) per token, and live inside the module of the linear they adapt."""
    from planner.cost.params import lora_targets

    attention = mlp = 0.0
    for index, lin in lora_targets(spec, setup.lora_targets):
        if lin in spec.layers[index].attention:
            attention += lin.in_features + lin.out_features
        else:
            mlp += lin.in_features + lin.out_features
    return attention / (attention + mlp) if attention + mlp else 0.0


def _flop_diffs(by_module: dict, analytic: dict | None, spec=None, setup: TrainingSetup | None = None) -> dict:
    oracle = _flop_components(by_module)
    if analytic is None:
        return {k: _diff(v, None) for k, v in oracle.items()}
    comp = analytic["flops"]["by_component"]
    lora = comp.get("lora", 0.0)
    share = _lora_share(spec, setup) if lora and spec is not None else 0.0
    ours = {
        "attention": comp.get("attention", 0.0) + comp.get("attention_core", 0.0) + lora * share,
        "mlp": comp.get("mlp", 0.0) + comp.get("experts", 0.0) + lora * (1 - share),
        "lm_head": comp.get("lm_head", 0.0),
        "other": 0.0,
    }
    recompute = analytic["flops"]["recompute"]
    if recompute:
        # the oracle's module counts include checkpointing's recompute inside the layers
        layer_total = ours["attention"] + ours["mlp"]
        if layer_total:
            ours["attention"] += recompute * (ours["attention"] / layer_total)
            ours["mlp"] += recompute * (ours["mlp"] / layer_total)
    return {k: _diff(v, ours.get(k)) for k, v in oracle.items()}


def simulate_text(result: dict) -> str:
    """`planner simulate` for people."""
    from planner.io.report import render_table
    from planner.units import fmt_bytes, fmt_flops, fmt_percent

    s = result["setup"]
    lines = [
        f"{result['model']} ({result['num_layers']} layers): {s['method']}, {s['precision']}, {s['optimizer']}, "
        f"micro-batch {s['micro_batch']} x {s['seq_len']}, checkpointing {s['checkpointing']}, attention {s['attention']}",
        "oracle: the real transformers model on fake CPU tensors under PyTorch's MemTracker and FlopCounterMode",
    ]
    if result["analytic"] is None:
        lines.append(f"analytic model: cannot represent this architecture ({result['analytic_error']}); oracle only")
    d = result["differences"]

    def row(name, item, fmt):
        return {
            "": name,
            "oracle": fmt(item["oracle"]),
            "analytic": fmt(item["analytic"]) if item["analytic"] is not None else "-",
            "difference": fmt(item["difference"]) if item["difference"] is not None else "-",
            "relative": fmt_percent(item["relative"]) if item["relative"] is not None else "-",
        }

    rows = [row("peak", d["peak_bytes"], fmt_bytes)]
    rows += [row(f"phase {p}", v, fmt_bytes) for p, v in d["phases"].items()]
    rows += [row(f"at peak: {g}", v, fmt_bytes) for g, v in d["categories"].items()]
    lines += ["", "memory (bytes):", render_table(rows)]
    rows = [row("forward + backward", d["flops"], fmt_flops)]
    rows += [row(k, v, fmt_flops) for k, v in d["flops_by_component"].items() if v["oracle"] or v["analytic"]]
    lines += ["", "FLOPs per micro-batch:", render_table(rows)]
    o = result["oracle"]
    lines += ["", f"oracle peak phase: {o['peak_phase']} (at {o['peak_at'].get(o['peak_phase'], '?')})"]
    if result["within_panel_tolerance"] is not None:
        verdict = "within" if result["within_panel_tolerance"] else "OUTSIDE"
        lines.append(f"analytic peak {verdict} the oracle panel's {PANEL_MAX_ERROR:.0%} tolerance")
    for note in o["notes"]:
        lines.append(f"note: {note}")
    if result["analytic"] is not None and result["analytic"].get("notes"):
        lines += [f"note (analytic): {n}" for n in result["analytic"]["notes"]]
    lines.append(f"traced in {o['wall_s']:.1f} s; the analytic side uses device=cpu like the oracle")
    return "\n".join(lines)
