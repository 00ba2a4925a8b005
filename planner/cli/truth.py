"""Verbs of ground truth: `planner simulate` (the fake-tensor oracle beside the analytic
estimate) and `planner calibrate` (short real runs, or a run the user already profiled, fitted
into a calibration profile that `planner estimate|fit --calibration` apply)."""

from __future__ import annotations

import json
import sys

from planner.errors import PlannerError


def register(subparsers) -> None:
    from planner.cli.train import _add_setup_arguments, positive_int

    sim = subparsers.add_parser(
        "simulate", help="PyTorch's own account of a training step (fake tensors) beside the analytic estimate"
    )
    sim.add_argument("--model", required=True, help="catalog name, HF repo id, or path to a config.json")
    _add_setup_arguments(sim)
    sim.add_argument("--layers", type=positive_int, default=None,
                     help="trace only the first N decoder layers (memory is linear in layers); default: all")
    sim.add_argument("--json", action="store_true", help="one JSON object, SI units")
    sim.set_defaults(handler=run_simulate)

    cal = subparsers.add_parser(
        "calibrate",
        help="short real runs on this device (or --from a profiled run) -> a calibration profile JSON",
        description="Measure peak memory and step time of short real runs (random weights, synthetic tokens), "
        "fit corrections on some points, report held-out accuracy, and write the profile. With --from FILE, "
        "learn from a run already profiled: a torch.cuda.memory._snapshot() pickle, a torch.profiler Chrome "
        "trace, an HF Trainer trainer_state.json, or a CSV.",
    )
    cal.add_argument("--model", help="catalog name, HF repo id, or path to a config.json")
    cal.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    cal.add_argument("--out", help="where to write the profile JSON")
    cal.add_argument("--layers", type=positive_int, default=None,
                     help="decoder layers of the runs (default: 2 on CPU, 4 on CUDA; a depth family uses 3x); "
                     "with --from: the layers the profiled run had, when fewer than the config's")
    cal.add_argument("--steps", type=positive_int, default=None, help="timed steps per point (default: 3 CPU, 5 CUDA)")
    cal.add_argument("--quick", action="store_true", help="a smaller grid (tests, smoke checks)")
    cal.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads (default 1, timed by process CPU time; more threads are timed by wall clock)")
    cal.add_argument("--budget", type=float, default=None,
                     help="seconds after which no new point is started (default: 200 on CPU, none on CUDA)")
    src = cal.add_argument_group("learning from a profiled run (--from)")
    src.add_argument("--from", dest="from_file", help="memory snapshot pickle, Chrome trace JSON, trainer_state.json or CSV")
    src.add_argument("--format", choices=("auto", "snapshot", "chrome-trace", "trainer-state", "csv"), default="auto")
    src.add_argument("--gpu", help="catalog GPU the run was on (default: read from the file, or --base's device)")
    src.add_argument("--base", help="an existing profile to add these measurements to (and refit)")
    # the set-up of the profiled run (the same flags as `planner estimate`); --precision also
    # sets the precision of the short runs (default there: fp32 on CPU, bf16-mixed on CUDA)
    _add_setup_arguments(src)
    cal.set_defaults(**dict.fromkeys(ASSUMED, None))  # filled, and said, when the file does not tell
    dist = cal.add_argument_group("communication (--distributed, issue 11)")
    dist.add_argument("--distributed", type=positive_int, metavar="N", default=None,
                      help="fit --base's communication factor from torchrun on N local processes (DDP; "
                      "FSDP with --mode fsdp on CUDA); needs --base and --model")
    dist.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp", help="with --distributed")
    cal.add_argument("--json", action="store_true", help="print the profile as JSON instead of the table")
    cal.set_defaults(handler=run_calibrate)


ASSUMED = {"seq_len": ("sequence length", "--seq-len", 2048), "micro_batch": ("micro-batch", "--micro-batch", 1),
           "method": ("method", "--method", "full"), "precision": ("precision", "--precision", "bf16"),
           "optimizer": ("optimizer", "--optimizer", "adamw"), "checkpointing": ("checkpointing", "--checkpointing", "none")}
"""The set-up of a profiled run that ``calibrate --from`` takes from the flags, else assumes:
(what, flag, assumed value). What it assumed is said, never silent."""


def _progress(text: str) -> None:
    """A progress line on stderr (above a progress bar, when one is drawn)."""
    from planner.io.progress import print_line

    print_line(text)


def run_simulate(args) -> int:
    from planner.cli.train import setup_from_args
    from planner.io.report import to_json
    from planner.specs.catalog import load_model_config
    from planner.truth.profile import model_name
    from planner.truth.simulate import simulate, simulate_text

    config, source = load_model_config(args.model)
    _check_simulated(args, config, source)
    setup = setup_from_args(args)
    result = simulate(config, model_name(args.model, source), setup, args.layers, show_progress=not args.json)
    print(to_json(result) if args.json else simulate_text(result))
    return 0


def _check_simulated(args, config: dict, source: dict) -> None:
    """The sequence against the config's context, then, for a single-device set-up of a modelled
    architecture, the checks of `planner estimate` (sharding is refused by the trace itself)."""
    from planner.cli.train import resolve_seq_len, setup_from_args
    from planner.specs.model import SUPPORTED_MODEL_TYPES, context_length, model_spec_from_config, text_config
    from planner.specs.setup import check_setup

    context = context_length(config, args.model)
    resolve_seq_len(args, context)
    setup = setup_from_args(args)
    if context and setup.seq_len > context:
        raise PlannerError(f"sequence length {setup.seq_len} is longer than the model's context of {context} tokens "
                           f"(max_position_embeddings): use --seq-len {context} or less")
    sharded = setup.num_gpus > 1 or setup.zero or setup.tensor_parallel > 1
    if not sharded and text_config(config, args.model).get("model_type") in SUPPORTED_MODEL_TYPES:
        check_setup(model_spec_from_config(config, source.get("name") or args.model), setup)


def _checked_out(args) -> None:
    """``--out`` names a file to write (its folder is created), not a directory."""
    from pathlib import Path

    from planner.errors import expand_user

    if args.out and expand_user(args.out).is_dir():
        raise PlannerError(f"--out {args.out} is a directory: give a file name such as {Path(args.out) / 'profile.json'}")


def run_calibrate(args) -> int:
    _checked_out(args)
    if args.distributed:
        return _calibrate_distributed(args)
    if args.from_file:
        return _calibrate_from_file(args)
    if not args.model:
        raise PlannerError("calibrate needs --model NAME (short real runs) or --from FILE (a profiled run)")
    if not args.out:
        raise PlannerError("calibrate needs --out PROFILE.json")
    try:
        import torch
    except ImportError:
        raise PlannerError("calibrate runs the real model: install torch and transformers "
                           "(pip install -e '.[oracle]')") from None
    from planner.specs.profile import save_profile
    from planner.truth.profile import calibrate_device

    if args.budget is not None and not args.budget > 0:
        raise PlannerError(f"--budget is seconds after which no new point starts: a positive number, got {args.budget}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.budget if args.budget is not None else (200.0 if device == "cpu" else None)
    profile = calibrate_device(args.model, device, num_layers=args.layers, precision=args.precision, quick=args.quick,
                               timed_steps=args.steps, budget_s=budget, threads=args.threads, progress=_progress,
                               show_progress=not args.json)
    save_profile(profile, args.out)
    _print_profile(profile, args)
    print(f"profile written to {args.out}", file=sys.stderr)
    return 0


def _calibrate_distributed(args) -> int:
    """``calibrate --distributed N``: the base profile with its communication factor fitted."""
    if not (args.base and args.model and args.out):
        raise PlannerError("calibrate --distributed N needs --base PROFILE.json (a single-device calibration of this "
                           "device), --model NAME and --out PROFILE.json")
    from planner.specs.profile import load_profile, save_profile
    from planner.truth.distributed import calibrate_distributed

    profile, fit = calibrate_distributed(load_profile(args.base), args.model, args.distributed, mode=args.mode,
                                         layers=args.layers or 2, micro_batch=args.micro_batch or 1,
                                         seq_len=args.seq_len or 128, steps=args.steps or 3)
    save_profile(profile, args.out)
    print(json.dumps(fit) if args.json else profile.notes[-1])
    print(f"profile written to {args.out}", file=sys.stderr)
    return 0


def _print_profile(profile, args) -> None:
    from planner.truth.calibrate import accuracy_table

    if args.json:
        print(profile.model_dump_json(indent=2))
        return
    print(f"device: {profile.device.name} ({profile.device.kind}; roofline from {profile.device.spec_source})")
    print(accuracy_table(profile))


def _calibrate_from_file(args) -> int:
    """`planner calibrate --from FILE`: the measurements of a run the user profiled, added to
    ``--base`` when given, fitted, saved and reported."""
    from planner.specs.profile import load_profile, save_profile
    from planner.truth.calibrate import fit_profile
    from planner.truth.ingest import detect_format, measurements_from_file

    path = _checked_from_file(args)
    fmt = detect_format(path) if args.format == "auto" else args.format
    missing = [key for key in ASSUMED if getattr(args, key) is None]
    name, config, setup = _model_and_setup(args, missing)
    base = load_profile(args.base) if args.base else None
    device = _device_of_profiled_run(args, path, fmt, base)
    new, facts = measurements_from_file(path, fmt, name, setup, args.layers)
    assumed = _assumptions(args, path, [key for key in missing if key not in facts.get("setup_from_file", ())])
    if assumed:
        print(f"note: {assumed}", file=sys.stderr)
    note = f"ingested {path.name} ({fmt}): {facts}" + (f"; {assumed}" if assumed else "")
    profile = _profile_with(new, note, name, config, device, base)
    profile = fit_profile(profile, progress=_progress)
    save_profile(profile, args.out)
    if len(new) < 6 and not base:
        print("note: fewer than 6 points, none held out: the errors below are in-sample", file=sys.stderr)
    _print_profile(profile, args)
    print(f"profile written to {args.out}", file=sys.stderr)
    return 0


def _assumptions(args, path, keys: list[str]) -> str:
    """What the set-up of the profiled run was taken to be, in words ('' when nothing was assumed)."""
    if not keys:
        return ""
    said = ", ".join(f"{ASSUMED[k][0]} {getattr(args, k)} ({ASSUMED[k][1]})" for k in keys)
    return f"{path.name} does not say, so assumed: {said}; pass the flags the run used if they differ"


def _checked_from_file(args):
    """The ``--from`` path, once it and ``--model`` and ``--out`` are known to be there."""
    from planner.errors import user_file

    path = user_file(args.from_file, "--from")
    if not args.model:
        raise PlannerError("--from needs --model NAME: the model the profiled run trained (and its set-up flags)")
    if not args.out:
        raise PlannerError("calibrate needs --out PROFILE.json")
    return path


def _model_and_setup(args, missing: list[str]):
    """(name, HF config, TrainingSetup) of the profiled run, from ``--model`` and the set-up flags;
    the ``missing`` flags take their assumed values (the sequence no longer than the model's context)
    and the set-up gets the checks of `planner estimate` where the architecture is modelled."""
    from planner.cli.train import resolve_seq_len, setup_from_args
    from planner.specs.catalog import load_model_config
    from planner.specs.model import SUPPORTED_MODEL_TYPES, context_length, model_spec_from_config, text_config
    from planner.specs.setup import check_setup
    from planner.truth.profile import model_name

    config, source = load_model_config(args.model)
    resolve_seq_len(args, context_length(config, args.model))
    for key in missing:
        if getattr(args, key) is None:
            setattr(args, key, ASSUMED[key][2])
    setup = setup_from_args(args)
    name = model_name(args.model, source)
    if text_config(config, name).get("model_type") in SUPPORTED_MODEL_TYPES:
        check_setup(model_spec_from_config(config, name), setup)
    return name, config, setup


def _device_of_profiled_run(args, path, fmt: str, base):
    """The GPU the run was on: ``--gpu``, the Chrome trace's device name, or ``--base``'s device."""
    from planner.specs.catalog import load_gpu
    from planner.specs.profile import DeviceInfo
    from planner.truth.ingest import read_chrome_trace

    gpu_name = args.gpu
    if gpu_name is None and fmt == "chrome-trace":
        gpu_name = read_chrome_trace(path)["device_name"]
    if gpu_name is not None:
        gpu = load_gpu(gpu_name)
        device = DeviceInfo(kind="cuda", name=gpu.name, memory_bytes=gpu.memory_bytes, spec=gpu, spec_source="catalog")
        if base is not None and not base.matches(gpu):
            raise PlannerError(f"--base was measured on {base.device.name}, the file's run on {gpu.name}")
        return device
    if base is not None:
        return base.device
    raise PlannerError("say which GPU the run was on: --gpu NAME (see `planner catalog gpus`), or --base PROFILE")


def _profile_with(new: list, note: str, name: str, config: dict, device, base):
    """A profile (not yet fitted) of ``base``'s measurements and configs, if any, plus ``new``
    (held-out splits assigned when there are 6 or more) and the configs of their models."""
    import datetime as dt

    from planner import __version__
    from planner.specs.catalog import load_model_config
    from planner.specs.profile import Profile, default_corrections
    from planner.truth.calibrate import assign_splits

    measurements = list(base.measurements) if base else []
    configs = dict(base.configs) if base else {}
    configs.setdefault(name, config)
    for m in new:
        if m.model not in configs:
            extra, extra_source = load_model_config(m.model)
            configs[m.model] = extra
    measurements += assign_splits(new) if len(new) >= 6 else new
    return Profile(
        created=dt.datetime.now(dt.timezone.utc), planner_version=__version__, device=device, configs=configs,
        measurements=measurements, corrections=default_corrections(device.kind),
        notes=(list(base.notes) if base else []) + [note],
    )
