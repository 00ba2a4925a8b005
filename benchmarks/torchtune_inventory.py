"""The torchtune oracle's measured inventory: per-phase peaks and per-layer bytes, technique by technique.

    python benchmarks/torchtune_inventory.py            # both models, every case (~6 min on 2 cores)
    python benchmarks/torchtune_inventory.py --quick    # llama-3.2-1b, a few cases

For Llama-3.2-1B- and Qwen2.5-0.5B-shaped models (catalog configs, layers reduced to 2 and 4),
micro-batch 2 x 1024 tokens, bf16: two training steps of torchtune 0.6.1's own model code under
the oracle's phase tracker (``planner.truth.torchtune_step.trace_torchtune_step``) for each
method and recipe technique, and

- the peak of each phase (MiB, 2 and 4 layers);
- per-layer activation bytes per token: ``(A(4) - A(2)) / 2 / tokens`` with ``A`` the
  ``Activation`` category at the forward phase's peak (what the forward keeps for backward);
  with offloading, the host stand-in device's per-layer bytes too;
- per-layer training-state bytes (parameters + gradients + optimizer state at the optimizer
  phase's peak, 4 layers minus 2, / 2);
- the gradients alive in the optimizer phase (4 layers; 0 with optimizer-in-backward, whose
  per-parameter steps free each gradient inside the backward).

The table it prints is the measured part of ``benchmarks/torchtune_inventory.md``.
"""

from __future__ import annotations

import sys
import time

from planner.specs.catalog import load_model_config
from planner.specs.setup import TrainingSetup
from planner.truth.torchtune_step import host_peak_bytes, trace_torchtune_step

MIB = 2**20
B, S = 2, 1024
CASES: tuple[tuple[str, dict, dict], ...] = (
    ("full", {}, {}),
    ("full + chunked CE (8)", {}, {"output_chunks": 8}),
    ("full + AC", {"checkpointing": "full"}, {}),
    ("full + AC + offload", {"checkpointing": "full"}, {"activation_offloading": True}),
    ("full + optimizer in bwd", {}, {"optimizer_in_bwd": True}),
    ("full + packed (4 docs)", {}, {"packed_documents": 4}),
    ("full, AdamW8bit", {"optimizer": "adamw-8bit"}, {}),
    ("full, PagedAdamW8bit", {"optimizer": "adamw-8bit"}, {"paged_optimizer": True}),
    ("full recipe default: paged 8bit + opt-in-bwd + chunked",
     {"optimizer": "adamw-8bit"}, {"paged_optimizer": True, "optimizer_in_bwd": True, "output_chunks": 8}),
    ("lora r16 all-linear", {"method": "lora"}, {}),
    ("lora + chunked CE (8)", {"method": "lora"}, {"output_chunks": 8}),
    ("lora + AC", {"method": "lora", "checkpointing": "full"}, {}),
    ("qlora r16 all-linear", {"method": "qlora"}, {}),
    ("qlora + AC + offload", {"method": "qlora", "checkpointing": "full"}, {"activation_offloading": True}),
)
QUICK = ("full", "full + chunked CE (8)", "lora r16 all-linear", "qlora r16 all-linear")


def measure(model: str, label: str, setup_kw: dict, recipe: dict) -> dict:
    cfg, _ = load_model_config(model)
    setup = TrainingSetup(micro_batch=B, seq_len=S, **setup_kw)
    r2 = trace_torchtune_step(cfg, setup, 2, count_flops=False, **recipe)
    r4 = trace_torchtune_step(cfg, setup, 4, count_flops=False, **recipe)
    tokens = B * S

    def act(r):
        return r.phase_peak_by_category["forward"]["Activation"]

    def state(r):
        c = r.phase_peak_by_category["optimizer"]
        return c["Parameter"] + c["Gradient"] + c["Optstate"]

    return {
        "model": model, "case": label,
        "peaks2": [r2.phase_peak_bytes[p] / MIB for p in ("forward", "backward", "optimizer")],
        "peaks4": [r4.phase_peak_bytes[p] / MIB for p in ("forward", "backward", "optimizer")],
        "act_per_layer_token": (act(r4) - act(r2)) / 2 / tokens,
        "host_per_layer_token": (host_peak_bytes(r4) - host_peak_bytes(r2)) / 2 / tokens,
        "state_per_layer_mib": (state(r4) - state(r2)) / 2 / MIB,
        "grads_4l_mib": r4.phase_peak_by_category["optimizer"]["Gradient"] / MIB,
        "peak_phase4": r4.peak_phase,
    }


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    models = ("llama-3.2-1b",) if quick else ("llama-3.2-1b", "qwen2.5-0.5b")
    print(f"micro-batch {B} x {S} tokens, bf16; MiB; per layer = (4 layers - 2 layers) / 2\n")
    print("| model | case | fwd / bwd / opt peak, 2L | fwd / bwd / opt peak, 4L | act B/token/layer "
          "| offloaded B/token/layer | state MiB/layer | grads at opt, 4L | peak phase |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    t0 = time.perf_counter()
    for model in models:
        for label, setup_kw, recipe in CASES:
            if quick and label not in QUICK:
                continue
            m = measure(model, label, setup_kw, recipe)
            p2 = " / ".join(f"{v:.0f}" for v in m["peaks2"])
            p4 = " / ".join(f"{v:.0f}" for v in m["peaks4"])
            print(f"| {model} | {label} | {p2} | {p4} | {m['act_per_layer_token']:.0f} | "
                  f"{m['host_per_layer_token']:.0f} | {m['state_per_layer_mib']:.1f} | {m['grads_4l_mib']:.0f} | "
                  f"{m['peak_phase4']} |",
                  flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
