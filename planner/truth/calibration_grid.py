"""The grid of short real runs that calibration measures.

Owns ``GridPoint`` (one set-up at a number of decoder layers, with the family it grows in and
its label) and ``default_grid`` (full fine-tuning over micro-batch x sequence at two depths,
LoRA and full checkpointing; small token counts on CPU, 512 to 4096 tokens on CUDA). Pure
Python: the runs themselves are ``planner.truth.profile``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs.setup import TrainingSetup


@dataclass(frozen=True)
class GridPoint:
    """One calibration point: a set-up of ``num_layers`` decoder layers."""

    setup: TrainingSetup
    num_layers: int

    @property
    def family(self) -> tuple:
        s = self.setup
        return (s.method, s.checkpointing, s.precision, s.optimizer, s.optimizer_impl, self.num_layers)

    @property
    def label(self) -> str:
        s = self.setup
        ck = "" if s.checkpointing == "none" else f" ckpt-{s.checkpointing}"
        return f"{s.method} {s.precision}{ck} L{self.num_layers} b{s.micro_batch}s{s.seq_len}"


def default_grid(device: str, num_layers: int, precision: str | None = None, quick: bool = False) -> list[GridPoint]:
    """The default grid. CPU (fp32: a CPU without bf16 instructions emulates bf16 matmuls):
    full fine-tuning over micro-batch x sequence at ``num_layers`` and at 3x the layers (so
    that per-layer and per-token costs separate from the output head's), LoRA, and full
    checkpointing; 32 to 192 tokens per step keep it within a few minutes on one core.
    CUDA (bf16-mixed): the same families with sequences of 512 to 4096 tokens, growing until
    the first out-of-memory error."""
    if device == "cpu":
        precision = precision or "fp32"
        full = [(1, 32), (1, 64), (2, 64), (1, 128), (2, 96)]
        deep = [(1, 32), (1, 64)]
        lora = [(1, 32), (2, 32), (1, 96)]
        ckpt = [(1, 32), (1, 64)]
        if quick:
            full, deep = [(1, 16), (1, 32), (2, 32), (2, 64)], [(1, 32), (2, 32)]
            lora, ckpt = [(1, 32), (2, 16), (2, 32)], [(1, 32)]
    else:
        precision = precision or "bf16-mixed"
        full = [(1, 512), (2, 512), (1, 1024), (2, 1024), (1, 2048), (4, 1024), (2, 2048), (1, 4096), (4, 2048)]
        deep = [(1, 1024), (2, 1024)]
        lora = [(1, 1024), (2, 1024), (1, 2048), (4, 2048)]
        ckpt = [(1, 1024), (2, 2048), (4, 2048)]
        if quick:
            full, deep, lora, ckpt = full[:3], deep[:1], lora[:2], ckpt[:1]
    deep_layers = num_layers * 3
    points = []
    for method, ck, layers, shapes in (("full", "none", num_layers, full), ("full", "none", deep_layers, deep),
                                       ("lora", "none", num_layers, lora), ("full", "full", num_layers, ckpt)):
        for b, s in shapes:
            setup = TrainingSetup(method=method, precision=precision, checkpointing=ck, micro_batch=b, seq_len=s,
                                  dropout=0.0)
            points.append(GridPoint(setup, layers))
    return points
