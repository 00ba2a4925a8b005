"""Calibration beyond one device: a training step of N local processes under torchrun (DDP; FSDP
on CUDA), timed, and the communication factor it implies (issue 11).

``planner calibrate --distributed N --base PROFILE --model M --out OUT`` launches
``python -m torch.distributed.run --standalone --nproc_per_node N -m planner.truth.distributed``.
Every rank builds the model of ``training_model.build_model`` (random weights, ``--layers``
layers), wraps it in DistributedDataParallel (gloo on CPU, NCCL on CUDA) or
FullyShardedDataParallel (CUDA only), runs one warm-up and ``--steps`` timed steps, and rank 0
writes the slowest rank's times. The base profile (a single-device calibration of the same
device) prices everything but the collectives; what the measured step says about them is the
communication factor: (measured - predicted without communication) / predicted communication,
written into the profile's corrections. Tested on CPU with gloo (2 processes,
tests/test_time_distributed.py); the CUDA path has not run on a GPU here. torch is imported in
the worker only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from planner.errors import PlannerError
from planner.specs.setup import TrainingSetup

MIN_FACTOR = 0.05
"""Floor of the fitted factor: a measured step below the non-communication prediction says the
collectives were hidden, not that they took negative time."""


def _worker_setup(args, world: int) -> TrainingSetup:
    return TrainingSetup(precision=args.precision, micro_batch=args.micro_batch, seq_len=args.seq_len,
                         num_gpus=world, zero=3 if args.mode == "fsdp" else 0)


def _wrap(model, mode: str, cuda: bool, local: int):
    if mode == "fsdp":
        if not cuda:
            raise PlannerError("--mode fsdp needs CUDA devices (FSDP is not run on CPU here): use --mode ddp")
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=local)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[local] if cuda else None)


def worker(argv=None) -> int:
    """One torchrun rank: build, wrap, time; rank 0 writes ``--out``."""
    import time

    import torch
    import torch.distributed as dist

    from planner.truth.device_facts import synchronize
    from planner.truth.training_model import build_model

    args = _worker_parser().parse_args(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    else:
        torch.set_num_threads(args.threads)
    setup = _worker_setup(args, world)
    torch.manual_seed(0)
    config = json.loads(Path(args.config).read_text(encoding="utf-8"))
    model = _wrap(build_model(config, setup.model_copy(update={"num_gpus": 1, "zero": 0}), args.layers, device),
                  args.mode, cuda, local)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    vocab = int(config["vocab_size"])
    ids = torch.randint(0, vocab, (setup.micro_batch, setup.seq_len), generator=torch.Generator().manual_seed(rank))
    ids = ids.to(device)
    kind = "cuda" if cuda else "cpu"
    times = []
    for i in range(args.steps + 1):
        dist.barrier()
        synchronize(kind)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(kind)
        if i:  # the first step is the warm-up (allocator, NCCL/gloo buffers, autograd graph)
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank's does
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "mode": args.mode, "world_size": world, "backend": dist.get_backend(), "device": kind,
            "layers": args.layers, "setup": setup.model_dump(mode="json"), "step_times_s": slowest.tolist(),
        }), encoding="utf-8")
    dist.destroy_process_group()
    return 0


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m planner.truth.distributed")
    p.add_argument("--config", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p


def launch(config: dict, nproc: int, out: Path, *, mode: str = "ddp", device: str = "cpu", layers: int = 2,
           precision: str = "fp32", micro_batch: int = 1, seq_len: int = 128, steps: int = 3,
           timeout_s: float = 600.0) -> dict:
    """Run ``worker`` on ``nproc`` local processes under torchrun; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(config), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "planner.truth.distributed", "--config", str(cfg), "--layers", str(layers), "--mode", mode,
               "--device", device, "--precision", precision, "--micro-batch", str(micro_batch),
               "--seq-len", str(seq_len), "--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    if done.returncode != 0 or not out.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PlannerError(f"torchrun with {nproc} processes failed (exit {done.returncode}): {last}")
    return json.loads(out.read_text(encoding="utf-8"))


def communication_factor(measured_s: float, spec, setup: TrainingSetup, profile) -> dict:
    """What a measured multi-process step says about the collectives, given a single-device
    ``profile`` of the same device for everything else (the step of ``planner.cost.timing.step_time``
    with the profile's corrections and a communication factor of 1)."""
    import numpy as np

    from planner.cost.timing.step_time import step_time

    neutral = profile.corrections.model_copy(update={"communication_factor": 1.0})
    parts = step_time(spec, setup, profile.device_spec(), profile=neutral)
    predicted, comm = float(np.asarray(parts["step_time_s"])), float(np.asarray(parts["communication_s"]))
    if comm <= 0:
        raise PlannerError("the predicted step has no communication to calibrate: use 2 or more processes")
    factor = max((measured_s - (predicted - comm)) / comm, MIN_FACTOR)
    return {"measured_step_s": measured_s, "predicted_step_s": predicted, "predicted_communication_s": comm,
            "communication_factor": factor}


if __name__ == "__main__":
    sys.exit(worker())


def calibrate_distributed(base, model: str, nproc: int, *, mode: str = "ddp", layers: int = 2, micro_batch: int = 1,
                          seq_len: int = 128, steps: int = 3):
    """(``base`` with its communication factor fitted from an ``nproc``-process run of ``model``
    on the base profile's device, the fit's numbers)."""
    import statistics

    from planner.specs.catalog import load_model_config
    from planner.specs.configs import reduce_layers
    from planner.specs.model import model_spec_from_config

    config = load_model_config(model)[0]
    precision = "bf16-mixed" if base.device.kind == "cuda" else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        result = launch(config, nproc, Path(tmp) / "steps.json", mode=mode, device=base.device.kind, layers=layers,
                        precision=precision, micro_batch=micro_batch, seq_len=seq_len, steps=steps)
    measured = statistics.median(result["step_times_s"])
    spec = model_spec_from_config(reduce_layers(config, layers), model)
    fit = communication_factor(measured, spec, TrainingSetup(**result["setup"]), base)
    fitted = [*(f for f in base.corrections.fitted if f != "communication_factor"), "communication_factor"]
    corrections = base.corrections.model_copy(update={"communication_factor": fit["communication_factor"],
                                                      "fitted": fitted})
    note = (f"communication_factor {fit['communication_factor']:.3g} from {nproc} local processes ({mode}, "
            f"{result['backend']}): measured step {measured:.4g} s vs {fit['predicted_step_s']:.4g} s predicted "
            f"({fit['predicted_communication_s']:.3g} s of it communication)")
    return base.model_copy(update={"corrections": corrections, "notes": [*base.notes, note]}), {**fit, **result}
