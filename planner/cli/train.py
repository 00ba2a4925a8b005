"""Verbs of memory and FLOPs: `planner estimate`, `planner fit`, `planner catalog`."""

from __future__ import annotations

import argparse

from planner.errors import PlannerError
from planner.specs.vocabulary import (
    ADAPTER_DTYPES,
    ATTENTIONS,
    CHECKPOINTINGS,
    LOSS_IMPLS,
    MAX_COUNT,
    MAX_NUM_GPUS,
    METHODS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    PIPELINE_SCHEDULES,
    PRECISIONS,
    STACKS,
)


def positive_int(text: str, maximum: int = MAX_COUNT) -> int:
    """A count: a positive integer no larger than ``maximum`` (a 20-digit sequence length is a typo
    that would overflow every formula's int64 arithmetic)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"{text} is too large: at most {maximum:,}")
    return value


def add_output_flags(parser) -> None:
    """``--json`` and ``--plot``, worded the same for every verb that has both."""
    parser.add_argument("--json", action="store_true", help="print a JSON object (SI units)")
    parser.add_argument("--plot", metavar="FILE.png", help="write a figure")


DEFAULT_SEQ_LEN = 2048
SEQ_LEN_HELP = f"tokens per sequence (default {DEFAULT_SEQ_LEN}, or the model's context when shorter)"


def resolve_seq_len(args, context: int) -> None:
    """``--seq-len`` left out: the default, or the model's context (max_position_embeddings) when shorter."""
    if getattr(args, "seq_len", None) is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN


def gpu_count(text: str) -> int:
    """A GPU count: at most ``MAX_NUM_GPUS`` (more than any cluster holds)."""
    return positive_int(text, MAX_NUM_GPUS)


def _add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="full")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default=None,
                        help="default: the stack's recipes' (fused AdamW for torchtune, torchtitan and megatron, as plan and "
                             "fit price them), else foreach")
    parser.add_argument("--micro-batch", type=positive_int, default=1)
    parser.add_argument("--seq-len", type=positive_int, default=None, help=SEQ_LEN_HELP)
    parser.add_argument("--checkpointing", choices=CHECKPOINTINGS, default="none")
    parser.add_argument("--attention", choices=ATTENTIONS, default="sdpa")
    parser.add_argument("--lora-rank", type=positive_int, default=16)
    parser.add_argument("--lora-targets", default="all-linear", help="all-linear or q_proj,v_proj,...")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--dropout", type=float, default=None, help="override the config's dropouts")
    parser.add_argument("--num-gpus", type=gpu_count, default=1)
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0)
    parser.add_argument("--tensor-parallel", type=gpu_count, default=1)
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--grad-accum", type=positive_int, default=1)
    _add_stack_arguments(parser)


def _add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """The training stack, its recipe techniques and the parallel layout beyond ZeRO and TP."""
    # a group cannot hold groups (argparse deprecates nesting): inside one, add the flags to it
    nested = isinstance(parser, argparse._ArgumentGroup)
    stack = parser if nested else parser.add_argument_group("stack and techniques")
    stack.add_argument("--stack", choices=STACKS, default="hf", help="whose model code and recipe run (default hf)")
    stack.add_argument("--loss", "--loss-impl", dest="loss_impl", choices=LOSS_IMPLS, default="standard",
                       help="cross-entropy (compiled: torchtitan's loss under --compile)")
    stack.add_argument("--loss-chunks", type=positive_int, default=8, help="chunks of --loss chunked")
    stack.add_argument("--optimizer-in-backward", action="store_true", help="step in the gradient hooks")
    stack.add_argument("--activation-offload", action="store_true", help="checkpointed activations in CPU memory")
    stack.add_argument("--packed", action="store_true", help="packed sequences (no padding)")
    stack.add_argument("--compile", action="store_true", help="torch.compile")
    stack.add_argument("--float8", action="store_true", help="torchao float8 linears")
    stack.add_argument("--float8-all-gather", action="store_true",
                       help="with --float8 under FSDP2 (--zero 3): gather the weights in fp8")
    stack.add_argument("--dora", action="store_true", help="DoRA (with --method lora/qlora)")
    stack.add_argument("--galore-rank", type=positive_int, default=128,
                       help="with --optimizer galore-adamw: galore_torch 1.0 GaLoreAdamW projecting the attn/mlp "
                            "nn.Linear weights at this rank (update_proj_gap 200, scale 0.25, proj_type std; "
                            "other parameters plain AdamW; full training, one GPU or data parallel)")
    stack.add_argument("--kbit-preparation", action="store_true", help="peft prepare_model_for_kbit_training")
    stack.add_argument("--adapter-dtype", choices=ADAPTER_DTYPES, default="auto", help="LoRA weights' dtype")
    stack.add_argument("--modules-to-save", default="", help="fully trained modules with LoRA: embed_tokens,lm_head")
    layout = parser if nested else parser.add_argument_group("parallel layout")
    layout.add_argument("--pipeline-parallel", type=gpu_count, default=1, help="pipeline stages")
    layout.add_argument("--pipeline-schedule", choices=PIPELINE_SCHEDULES, default="1f1b")
    layout.add_argument("--virtual-stages", type=positive_int, default=1, help="model chunks per rank (interleaved)")
    layout.add_argument("--sequence-parallel", action="store_true", help="with --tensor-parallel > 1")
    layout.add_argument("--context-parallel", type=gpu_count, default=1, help="ring-attention degree")
    layout.add_argument("--expert-parallel", type=gpu_count, default=1, help="GPUs the experts are sharded over")


def _add_time_arguments(parser: argparse.ArgumentParser) -> None:
    """The time model's inputs beyond the set-up (issue 11)."""
    parser.add_argument("--cluster", help="catalog cluster for the network (models_catalog/clusters.json, e.g. dgx-h100, "
                        "aws-p5); default: 8 GPUs per node on the GPU's link, 400 Gb/s per GPU between nodes")


STACK_ARGUMENTS = ("stack", "loss_impl", "loss_chunks", "optimizer_in_backward", "activation_offload", "packed",
                   "compile", "float8", "float8_all_gather", "dora", "galore_rank", "kbit_preparation", "adapter_dtype", "modules_to_save",
                   "pipeline_parallel", "pipeline_schedule", "virtual_stages", "sequence_parallel",
                   "context_parallel", "expert_parallel")


def _recipe_optimizer_impl(args) -> str:
    """The optimizer implementation of the stack's recipes (``planner.search.stacks.stack_fields``): what a
    `fit` or `plan` row of that stack priced, so that `estimate` of the row's set-up agrees with it."""
    from planner.search.stacks import stack_fields

    return stack_fields(getattr(args, "stack", "hf"), args.method, args.optimizer).get("optimizer_impl", "foreach")


def setup_from_args(args) -> object:
    from planner.specs.setup import TrainingSetup

    return TrainingSetup(
        method=args.method,
        precision=args.precision,
        optimizer=args.optimizer,
        optimizer_impl=args.optimizer_impl or _recipe_optimizer_impl(args),
        micro_batch=args.micro_batch,
        seq_len=args.seq_len or DEFAULT_SEQ_LEN,
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
        **{name: getattr(args, name) for name in STACK_ARGUMENTS if hasattr(args, name)},
    )


def register(subparsers) -> None:
    est = subparsers.add_parser("estimate", help="memory by component and phase, peak, FLOPs of one set-up")
    est.add_argument("--model", required=True, help="catalog name, HF repo id, or path to a config.json")
    est.add_argument("--gpu", help="catalog GPU name: adds whether it fits and the headroom")
    _add_setup_arguments(est)
    est.add_argument("--calibration", help="calibration profile JSON (planner calibrate)")
    _add_time_arguments(est)
    est.add_argument("--json", action="store_true", help="one JSON object, SI units")
    est.add_argument("--export", choices=("torchtune",), help="also write the set-up as the stack's own config")
    est.add_argument("--out", metavar="PATH", help="where --export writes (a .yaml file)")
    est.set_defaults(handler=run_estimate)

    fit = subparsers.add_parser("fit", help="what fits on a GPU: methods x techniques, max batch and sequence")
    fit.add_argument("model", help="catalog name, HF repo id, or path to a config.json")
    fit.add_argument("--gpu", required=True)
    fit.add_argument("--seq-len", type=positive_int, default=None, help=SEQ_LEN_HELP)
    fit.add_argument("--num-gpus", type=gpu_count, default=1)
    fit.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="default: 3 when --num-gpus > 1")
    fit.add_argument("--all", action="store_true", help="also SGD, Lion and fp32 set-ups")
    fit.add_argument("--stack", choices=STACKS, default=None,
                     help="only this stack's set-ups (default: every stack whose memory is priced)")
    fit.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="only this precision and its mixed twin (default: what the GPU computes in)")
    fit.add_argument("--inference", action="store_true", help="serving: longest context, largest batch")
    techniques = fit.add_argument_group("techniques (only the set-ups that can use them, with them on)")
    techniques.add_argument("--kbit-preparation", action="store_true", help="QLoRA with peft prepare_model_for_kbit_training")
    techniques.add_argument("--float8", action="store_true", help="torchao float8 linears (full bf16 training)")
    techniques.add_argument("--float8-all-gather", action="store_true", help="with --float8: FSDP2 gathers in fp8")
    techniques.add_argument("--loss", "--loss-impl", dest="loss_impl", choices=LOSS_IMPLS, default=None,
                            help="cross-entropy implementation (compiled: torchtitan with compile)")
    fit.add_argument("--calibration", help="calibration profile JSON (planner calibrate)")
    _add_time_arguments(fit)
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(handler=run_fit)

    cat = subparsers.add_parser("catalog", help="the models and GPUs of the catalog")
    cat.add_argument("what", nargs="?", choices=("models", "gpus", "clusters", "all"), default="all")
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
    from planner.specs.setup import check_setup

    if getattr(args, "export", None) and not args.out:
        raise PlannerError("--export needs --out PATH.yaml (where to write the recipe config)")
    spec = load_spec(args.model)
    resolve_seq_len(args, spec.max_position_embeddings)
    setup = setup_from_args(args)
    check_setup(spec, setup)
    gpu = load_gpu(args.gpu) if args.gpu is not None else None
    profile = _load_calibration(args.calibration)
    result = estimate(spec, setup, gpu, cluster=args.cluster, profile=profile)
    if profile is not None:
        from planner.cost.calibrated import apply_profile
        from planner.cost.estimate import calibrated_fields, time_keys

        timing = {k: result[k] for k in time_keys(result)}  # estimate() priced them on the cluster, with its notes
        result = {**apply_profile(profile, spec, setup, result, gpu), **timing}
        result["calibrated_fields"] = calibrated_fields(result)
    if args.json:
        print(to_json(result))
    else:
        print(estimate_text(result))
    if args.export:
        _export_setup(spec.name, setup, args.export, args.out)
    return 0


def _export_setup(model: str, setup, fmt: str, out: str | None) -> None:
    """``estimate --export torchtune --out F.yaml``: the recipe config that launches the priced set-up."""
    import sys

    from planner.io.exports_torchtune import recipe_name, torchtune_recipe_config
    from planner.io.planfiles import write_data

    path = write_data(torchtune_recipe_config(model, setup), out)
    print(f"wrote {path}: tune run {recipe_name(setup)} --config {path}", file=sys.stderr)


def _fit_techniques(args) -> dict:
    """The set-up fields `fit` was asked for by flag (``planner.search.fit_setups.FIT_TECHNIQUES``)."""
    from planner.search.fit_setups import FIT_TECHNIQUES

    return {name: getattr(args, name, None) for name in FIT_TECHNIQUES}


def run_fit(args) -> int:
    from planner.cost.timing.intervals import fit_row_times
    from planner.io.report import fit_text, inference_fit_text, to_json
    from planner.search.fit import FIT_CALIBRATED_FIELDS, inference_fits, what_fits
    from planner.specs.catalog import load_gpu, load_spec
    from planner.specs.setup import TrainingSetup, check_setup

    spec = load_spec(args.model)
    gpu = load_gpu(args.gpu)
    resolve_seq_len(args, spec.max_position_embeddings)
    zero = (3 if args.num_gpus > 1 else 0) if args.zero is None else args.zero
    check_setup(spec, TrainingSetup(seq_len=args.seq_len, num_gpus=args.num_gpus, zero=zero))
    if args.inference:
        result = inference_fits(spec, gpu, args.seq_len)
        result.update(model=spec.name, gpu=gpu.name, context_len=args.seq_len)
        print(to_json(result) if args.json else inference_fit_text(result))
        return 0
    profile = _load_calibration(args.calibration)
    # the longest sequence searched is the model's context when its config gives one
    result = what_fits(spec, gpu, args.seq_len, args.num_gpus, zero, args.all,
                       max_seq_len=spec.max_position_embeddings or None, profile=profile, stack=args.stack,
                       precision=args.precision, techniques=_fit_techniques(args))
    payload = {
        "model": spec.name,
        "gpu": gpu.name,
        "num_gpus": args.num_gpus,
        "zero": zero,
        "seq_len": args.seq_len,
        "usable_bytes": result["usable_bytes"],
        "rows": [{**row.as_dict(), **fit_row_times(spec, row.as_dict(), row.setup, gpu, args.seq_len, args.cluster,
                                                    profile)}
                 for row in result["rows"]],
        "short_by_bytes": result.get("short_by_bytes"),
        "fixes": result["fixes"],
        "calibrated_fields": list(FIT_CALIBRATED_FIELDS) if profile is not None else [],
    }
    # the rows' time notes (a cluster of another GPU, a profile beyond its runs) once for the table
    payload["notes"] = list(dict.fromkeys(n for r in payload["rows"] for n in r.pop("time_notes", [])))
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
    if args.what == "clusters":
        from planner.io.report import clusters_text
        from planner.specs.cluster import list_clusters

        clusters = [c.model_dump(mode="json") for c in list_clusters()]
        print(to_json({"clusters": clusters}) if args.json else clusters_text(clusters))
        return 0
    if args.json:
        print(to_json({"models": models, "gpus": gpus}))
    else:
        print(catalog_text(models, gpus))
    return 0
