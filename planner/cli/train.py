"""Verbs of memory and FLOPs: `planner estimate`, `planner fit`, `planner catalog`."""

from __future__ import annotations

import argparse

from planner.errors import PlannerError
from planner.specs.vocabulary import (
    ATTENTIONS,
    CHECKPOINTINGS,
    METHODS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PRECISIONS,
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="full")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="foreach")
    parser.add_argument("--micro-batch", type=positive_int, default=1)
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--checkpointing", choices=CHECKPOINTINGS, default="none")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    parser.add_argument("--lora-rank", type=positive_int, default=16)
    parser.add_argument("--lora-targets", default="all-linear", help="all-linear or q_proj,v_proj,...")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--dropout", type=float, default=None, help="override the config's dropouts")
    parser.add_argument("--num-gpus", type=positive_int, default=1)
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0)
    parser.add_argument("--tensor-parallel", type=positive_int, default=1)
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--grad-accum", type=positive_int, default=1)


def setup_from_args(args) -> object:
    from planner.specs.setup import TrainingSetup

    return TrainingSetup(
        method=args.method,
        precision=args.precision,
        optimizer=args.optimizer,
        optimizer_impl=args.optimizer_impl,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        checkpointing=args.checkpointing,
        attention=args.attention,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        lora_dropout=args.lora_dropout,
        dropout=args.dropout,
        num_gpus=args.num_gpus,
        zero=args.zero,
        tensor_parallel=args.tensor_parallel,
        offload_optimizer=args.offload_optimizer,
        grad_accum=args.grad_accum,
    )


def register(subparsers) -> None:
    est = subparsers.add_parser("estimate", help="memory by component and phase, peak, FLOPs of one set-up")
    est.add_argument("--model", required=True, help="catalog name, HF repo id, or path to a config.json")
    est.add_argument("--gpu", help="catalog GPU name: adds whether it fits and the headroom")
    _add_setup_arguments(est)
    est.add_argument("--calibration", help="calibration profile JSON (planner calibrate)")
    est.add_argument("--json", action="store_true", help="one JSON object, SI units")
    est.set_defaults(handler=run_estimate)

    fit = subparsers.add_parser("fit", help="what fits on a GPU: methods x techniques, max batch and sequence")
    fit.add_argument("model", help="catalog name, HF repo id, or path to a config.json")
    fit.add_argument("--gpu", required=True)
    fit.add_argument("--seq-len", type=positive_int, default=2048)
    fit.add_argument("--num-gpus", type=positive_int, default=1)
    fit.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="default: 3 when --num-gpus > 1")
    fit.add_argument("--all", action="store_true", help="also SGD, Lion and fp32 set-ups")
    fit.add_argument("--inference", action="store_true", help="serving: longest context, largest batch")
    fit.add_argument("--calibration", help="calibration profile JSON (planner calibrate)")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(handler=run_fit)

    cat = subparsers.add_parser("catalog", help="the models and GPUs of the catalog")
    cat.add_argument("what", nargs="?", choices=("models", "gpus", "all"), default="all")
    cat.add_argument("--json", action="store_true")
    cat.set_defaults(handler=run_catalog)


def _load_calibration(path: str | None):
    if not path:
        return None
    try:
        from planner.specs.profile import load_profile
    except ImportError as exc:  # pragma: no cover - calibration lands with issue 3
        raise PlannerError("calibration profiles are not supported by this build") from exc
    return load_profile(path)


def run_estimate(args) -> int:
    from planner.cost.estimate import estimate
    from planner.io.report import estimate_text, to_json
    from planner.specs.catalog import load_gpu, load_spec

    spec = load_spec(args.model)
    setup = setup_from_args(args)
    gpu = load_gpu(args.gpu) if args.gpu else None
    result = estimate(spec, setup, gpu)
    profile = _load_calibration(args.calibration)
    if profile is not None:
        from planner.cost.calibrated import apply_profile

        result = apply_profile(profile, spec, setup, result, gpu)
    if args.json:
        print(to_json(result))
    else:
        print(estimate_text(result))
    return 0


def run_fit(args) -> int:
    from planner.io.report import fit_text, inference_fit_text, to_json
    from planner.search.fit import inference_fits, what_fits
    from planner.specs.catalog import load_gpu, load_spec

    spec = load_spec(args.model)
    gpu = load_gpu(args.gpu)
    if args.inference:
        result = inference_fits(spec, gpu, args.seq_len)
        result.update(model=spec.name, gpu=gpu.name, context_len=args.seq_len)
        print(to_json(result) if args.json else inference_fit_text(result))
        return 0
    profile = _load_calibration(args.calibration)
    result = what_fits(spec, gpu, args.seq_len, args.num_gpus, args.zero, args.all, profile=profile)
    payload = {
        "model": spec.name,
        "gpu": gpu.name,
        "num_gpus": args.num_gpus,
        "seq_len": args.seq_len,
        "usable_bytes": result["usable_bytes"],
        "rows": [row.as_dict() for row in result["rows"]],
        "short_by_bytes": result.get("short_by_bytes"),
        "fixes": result["fixes"],
    }
    print(to_json(payload) if args.json else fit_text(payload))
    return 0


def run_catalog(args) -> int:
    from planner.cost.params import count_params
    from planner.io.report import catalog_text, to_json
    from planner.specs.catalog import list_gpus, list_models, load_model_config, load_spec

    models = []
    if args.what in ("models", "all"):
        for name in list_models():
            config, source = load_model_config(name)
            try:
                params = count_params(load_spec(name)).total
            except PlannerError:
                params = None
            models.append(
                {"name": name, "model_type": config.get("model_type"), "params": params, "hf_repo": source.get("hf_repo")}
            )
    gpus = [g.model_dump(mode="json") for g in list_gpus()] if args.what in ("gpus", "all") else []
    if args.json:
        print(to_json({"models": models, "gpus": gpus}))
    else:
        print(catalog_text(models, gpus))
    return 0
