"""A training step run for real on this machine's device (CUDA or CPU), for calibration.

Owns ``FamilyModel`` (the model of ``planner.truth.training_model.build_model`` with random
weights and its optimizer, shared by the points of one family of the grid, which differ only in
their inputs; one step is the step of ``planner.truth.trace``), ``timed_step`` (one step timed by
``planner.truth.device_facts.step_clock``, synchronised, garbage collector paused),
``cpu_peak_bytes`` (the oracle's MemTracker over one step on real CPU tensors) and
``is_out_of_memory``. torch is imported inside functions only.
"""

from __future__ import annotations

from planner.specs.setup import TrainingSetup
from planner.truth.calibration_grid import GridPoint
from planner.truth.device_facts import step_clock, synchronize
from planner.truth.optimizers import make_optimizer
from planner.truth.phase_tracker import phase_tracker_class
from planner.truth.training_model import build_model


class FamilyModel:
    """A model and its optimizer, shared by the points of one family (only inputs change)."""

    def __init__(self, config: dict, point: GridPoint, device: str, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.device = device
        self.model = build_model(config, point.setup, point.num_layers, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, point.setup, notes=[], model=self.model)
        self.vocab = self.model.get_input_embeddings().num_embeddings

    def inputs(self, setup: TrainingSetup):
        import torch

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, self.vocab, (setup.micro_batch, setup.seq_len), generator=g).to(self.device)
        return ids, ids.clone()

    def step(self, setup: TrainingSetup, ids, labels) -> None:
        import contextlib

        import torch

        autocast = (torch.autocast(self.device, dtype=torch.bfloat16) if setup.precision == "bf16-mixed"
                    else contextlib.nullcontext())
        for _ in range(setup.grad_accum):
            with autocast:
                loss = self.model(input_ids=ids, labels=labels).loss
            if setup.grad_accum > 1:
                loss = loss / setup.grad_accum
            loss.backward()
            del loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.model, self.optimizer, self.params


def timed_step(family: FamilyModel, setup: TrainingSetup, inputs, device: str) -> float:
    """Seconds of one step, synchronised, with Python's cyclic garbage collector collected
    before and paused during the step (as ``timeit`` does): a collection of the model's and
    autograd's object graph would otherwise land in a random step."""
    import gc

    clock = step_clock(device)
    gc.collect()
    gc.disable()
    try:
        synchronize(device)
        t0 = clock()
        family.step(setup, *inputs)
        synchronize(device)
        return clock() - t0
    finally:
        gc.enable()


def cpu_peak_bytes(family: FamilyModel, setup: TrainingSetup, ids, labels) -> float:
    """MemTracker's peak over one steady-state step on real CPU tensors (the oracle's tracker:
    gradient hooks only on parameters that require grad, which LoRA's frozen base weights need)."""
    import warnings

    tracker = phase_tracker_class()()
    tracker.track_external(family.model, family.optimizer, ids, labels)
    with tracker, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        family.step(setup, ids, labels)
    peak = tracker.get_tracker_snapshot("peak")
    return float(sum(snap["Total"] for snap in peak.values()))


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
