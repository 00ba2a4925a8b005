"""Verbs of the decision (issue 5): `planner plan` and `planner compare`.

`planner plan` takes a budget (--compute, --budget-usd, --gpu-hours, --deadline-hours), the
hardware (--gpu, --num-gpus), an optional data pool and model, and answers the recommended run,
the Pareto front over loss, cost and time, the binding constraints and the stopping threshold.
Plans are files: --request reads a JSON/YAML PlanRequest (flags override it), --save writes the
Plan, --from-plan reads one back, --export writes what an engine launches with (hf-trainer,
accelerate, deepspeed, a torchtune recipe, torchtitan 0.3.0's overrides and launch line, Megatron-LM's
pretrain_gpt.py launch script). --cluster prices days and dollars on a catalog cluster's network;
--stacks, --compile/--no-compile and --packed choose the training stacks and their techniques
(``planner.search.stacks``).
`planner compare` plans named allocations side by side under the same limits; an allocation may
pin its own stack and techniques (stack=torchtune, compile=false, packed=true).

Numbers accept plain floats (1e22) and the suffixes K, M, B, T (20B tokens).
"""

from __future__ import annotations

import argparse

from planner.cli.plan_text import compare_text, plan_text  # noqa: F401 - re-exported (notebooks, tests)
from planner.errors import PlannerError

EXPORT_CHOICES = ("hf-trainer", "accelerate", "deepspeed", "torchtune", "torchtitan", "megatron")
"""``planner.search.plan.EXPORT_FORMATS`` (kept here: the parser is built without importing the search;
``tests/test_exports_megatron.py`` checks they agree)."""
_LIST_FIELDS = {
    "methods": str, "lora_ranks": int, "optimizers": str, "checkpointing": str, "zero": int,
    "tensor_parallel": int, "micro_batches": int, "gpu_counts": int, "selection": str, "keep_fractions": float,
    "strategies": str, "stacks": str,
}


def _quantity(what: str):
    def parse(text: str) -> float:
        from planner.cli.loss import parse_quantity

        try:
            return parse_quantity(text, what)
        except PlannerError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_request_arguments(p: argparse.ArgumentParser) -> None:
    from planner.cli.train import gpu_count, positive_int
    from planner.loss.evidence import TASKS

    p.add_argument("--request", metavar="FILE", help="a PlanRequest as JSON or YAML (flags override it)")
    p.add_argument("--model", help="fine-tune this catalog model (comma-separated: choose among them); none: pre-train and choose the size")
    p.add_argument("--gpu", help="catalog GPU (default h100-sxm, reported)")
    p.add_argument("--num-gpus", type=gpu_count, help="GPUs available (default: free)")
    p.add_argument("--price-usd-per-hour", type=_quantity("price"), help="per GPU-hour (default: the catalog's)")
    p.add_argument("--compute", type=_quantity("--compute"), help="training FLOP budget, 6 N D convention (e.g. 1e21)")
    p.add_argument("--budget-usd", type=_quantity("--budget-usd"), help="dollar budget")
    p.add_argument("--gpu-hours", type=_quantity("--gpu-hours"), help="GPU-hour budget")
    p.add_argument("--deadline-hours", type=_quantity("--deadline-hours"), help="wall-clock limit of the run")
    p.add_argument("--data-pool", type=_quantity("--data-pool"), help="unique tokens available (e.g. 20B)")
    p.add_argument("--max-epochs", type=_quantity("--max-epochs"), help="cap on passes over the kept data")
    p.add_argument("--no-repeat", action="store_true", default=None, help="never repeat data (D <= kept pool)")
    p.add_argument("--objective", choices=("loss", "cost", "time"))
    p.add_argument("--target-loss", type=float, help="objective cost/time: cheapest/fastest plan reaching this loss")
    p.add_argument("--law", help="scaling law: catalog name or JSON path (default besiroglu2024)")
    p.add_argument("--calibration", metavar="PROFILE.json", help="calibration profile (planner calibrate)")
    p.add_argument("--confidence", type=confidence_level,
                   help="hold the deadline/budgets at this quantile of the step time, 0.5 (the median) to below 1 (e.g. 0.9)")
    p.add_argument("--seq-len", type=positive_int)
    p.add_argument("--global-batch-tokens", type=_quantity("--global-batch-tokens"))
    p.add_argument("--methods", help="full,lora,qlora")
    p.add_argument("--lora-ranks", help="e.g. 16,64")
    p.add_argument("--peft-efficiency", help="token efficiency of LoRA/QLoRA: one number or lora=0.5,qlora=0.4")
    p.add_argument("--optimizers", help="adamw,adamw-8bit,adafactor,sgd,lion")
    p.add_argument("--checkpointing", help="none,selective,full")
    p.add_argument("--zero", help="ZeRO stages to try, e.g. 0,3")
    p.add_argument("--tensor-parallel", help="tensor-parallel degrees to try, e.g. 1,8")
    p.add_argument("--micro-batches", help="e.g. 1,2,4,8")
    p.add_argument("--stacks", help="training stacks to search: hf (default), torchtune, torchtitan, megatron, "
                                          "comma-separated, or any")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile on the stacks that price it (torchtune, torchtitan); default: searched, "
                        "--no-compile: eager only")
    p.add_argument("--packed", action="store_true", default=None,
                   help="the data is packed (torchtune dataset.packed, its block-causal mask priced)")
    p.add_argument("--cluster", help="catalog cluster for the network (models_catalog/clusters.json, e.g. dgx-h100; "
                   "planner catalog clusters lists them): days and dollars on its links")
    p.add_argument("--gpu-counts", help="GPU counts to try (default: all --num-gpus)")
    p.add_argument("--selection", help="data selection: all and/or methods of models_catalog/pruning_methods.json")
    p.add_argument("--keep", dest="keep_fractions", help="fractions of the pool to keep, e.g. 0.5")
    p.add_argument("--tokens", type=_quantity("--tokens"), help="fix the training tokens")
    p.add_argument("--epochs", type=_quantity("--epochs"), help="fix the passes over the kept data")
    p.add_argument("--task", choices=TASKS, help="what the run is for: chooses the selection methods with evidence "
                   "(default pretraining, or instruction-tuning when fine-tuning)")
    p.add_argument("--beyond-evidence", action="store_true", default=None,
                   help="lift the plausibility defaults (epochs, tokens per parameter, keep fractions, methods)")
    p.add_argument("--tokens-per-param", help="pre-training: allowed tokens per parameter, LOW,HIGH (default: the law's evidence)")
    p.add_argument("--inference-tokens", type=_quantity("--inference-tokens"),
                   help="tokens served over the model's life: minimise training + inference for the same loss")
    p.add_argument("--inference-cost-ratio", type=_quantity("--inference-cost-ratio"),
                   help="cost of an inference FLOP over a training FLOP (default 1)")
    p.add_argument("--finetune-law", help="fine-tuning loss law (default zhang2024; 'none': the pre-training law)")
    p.add_argument("--finetune-task", help="task of the fine-tuning law: wmt14-en-de (default), wmt19-en-zh, mlsum")
    p.add_argument("--tokens-per-example", type=_quantity("--tokens-per-example"), help="mean tokens per fine-tuning example (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object (SI units)")
    p.add_argument("--plot", metavar="FILE.png", help="write a figure")


def register(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="the recommended run, Pareto front, binding constraints and stopping threshold")
    _add_request_arguments(plan)
    plan.add_argument("--from-plan", metavar="PLAN", help="read a saved plan (JSON/YAML) instead of planning")
    plan.add_argument("--save", metavar="PLAN", help="write the plan as JSON or YAML")
    plan.add_argument("--export", choices=EXPORT_CHOICES, help="write a launch configuration (torchtune: the recipe "
                      "config of a torchtune run, --stacks torchtune; torchtitan: torchtitan 0.3.0's overrides as TOML "
                      "and the torchrun line, --stacks torchtitan; megatron: the torchrun script of Megatron-LM's pretrain_gpt.py, "
                      "--stacks megatron)")
    plan.add_argument("--out", metavar="PATH", help="where --export writes")
    plan.add_argument("--exhaustive", action="store_true", help="evaluate every set-up (no dominance pruning)")
    plan.add_argument("--continuous-check", action="store_true",
                      help="pre-training: also solve the geometric program over model size and tokens (cvxpy) and "
                           "compare it with the grid's choice")
    plan.set_defaults(handler=run_plan)

    cmp = subparsers.add_parser("compare", help="named allocations side by side: loss, cost, time, memory")
    cmp.add_argument("file", nargs="?", help="a compare file (JSON/YAML: base + allocations)")
    cmp.add_argument("--alloc", action="append", default=[], metavar="NAME:key=value,...",
                     help="an allocation, e.g. '8B LoRA:model=llama-3.1-8b,method=lora' (repeatable); keys: model, "
                          "method, lora_rank, num_gpus, checkpointing, zero, tensor_parallel, micro_batch, optimizer, "
                          "stack, compile, packed, selection, keep_fraction, strategy, tokens, epochs")
    _add_request_arguments(cmp)
    cmp.set_defaults(handler=run_compare)


# ----------------------------------------------------------------------------- building requests


def confidence_level(text: str) -> float:
    """``--confidence``: the quantile a budget is held at; below 0.5 a plan would more likely overrun it than not."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: use 0.5 (the median) to below 1, e.g. 0.9") from None
    works = "use 0.5 (the median) to below 1, e.g. 0.9"
    if value < 0.5:
        raise argparse.ArgumentTypeError(f"{text} holds the budgets at a time the run more likely exceeds than not: {works}")
    if not value < 1.0:  # 1, above, or nan
        raise argparse.ArgumentTypeError(f"{text} asks for a certainty no estimate has: {works}")
    return value


def _split(text: str, kind, flag: str) -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise PlannerError(f"{flag}: empty list")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise PlannerError(f"{flag}: cannot read {text!r} as a list of {kind.__name__}") from None


def request_overrides(args) -> dict:
    """The request fields the command line sets (flags left out are absent)."""
    out: dict = {}
    if args.model:
        out["models"] = _split(args.model, str, "--model")
    simple = {"gpu": "gpu", "num_gpus": "num_gpus", "price_usd_per_hour": "price_usd_per_hour",
              "compute": "compute_flops", "budget_usd": "budget_usd", "gpu_hours": "gpu_hours",
              "data_pool": "data_pool_tokens", "max_epochs": "max_epochs", "objective": "objective",
              "target_loss": "target_loss", "law": "law", "calibration": "calibration", "seq_len": "seq_len", "confidence": "confidence",
              "tokens": "tokens", "epochs": "epochs", "task": "task", "beyond_evidence": "beyond_evidence",
              "inference_tokens": "inference_tokens", "inference_cost_ratio": "inference_cost_ratio",
              "finetune_task": "finetune_task", "tokens_per_example": "tokens_per_example", "cluster": "cluster",
              "compile": "compile", "packed": "packed"}
    for flag, field in simple.items():
        value = getattr(args, flag)
        if value is not None:
            out[field] = value
    if args.deadline_hours is not None:
        out["deadline_s"] = args.deadline_hours * 3600.0
    if args.global_batch_tokens is not None:
        out["global_batch_tokens"] = int(args.global_batch_tokens)
    if args.no_repeat:
        out["repeat"] = False
    for field, kind in _LIST_FIELDS.items():
        value = getattr(args, field, None)
        if value is not None:
            out[field] = _split(value, kind, "--" + field.replace("_", "-").replace("keep-fractions", "keep"))
    if args.finetune_law is not None:
        out["finetune_law"] = None if args.finetune_law.lower() == "none" else args.finetune_law
    if args.tokens_per_param is not None:
        pair = _split(args.tokens_per_param, float, "--tokens-per-param")
        if len(pair) != 2:
            raise PlannerError(f"--tokens-per-param: expected LOW,HIGH (e.g. 1.8,162), got {args.tokens_per_param!r}")
        out["tokens_per_param"] = pair
    if args.peft_efficiency:
        out["peft_efficiency"] = _peft_efficiency(args.peft_efficiency)
    return out


def _peft_efficiency(text: str) -> dict:
    from planner.search.plan import DEFAULT_PEFT_TOKEN_EFFICIENCY

    eff = dict(DEFAULT_PEFT_TOKEN_EFFICIENCY)
    try:
        if "=" not in text:
            value = float(text)
            eff.update(lora=value, qlora=value)
        else:
            for part in text.split(","):
                key, value = part.split("=")
                if key.strip() not in ("lora", "qlora"):
                    raise ValueError
                eff[key.strip()] = float(value)
    except ValueError:
        raise PlannerError(f"--peft-efficiency: expected a number or lora=X,qlora=Y, got {text!r}") from None
    return eff


def build_request(args):
    from planner.search.plan import PlanRequest

    data = {}
    if args.request:
        from planner.io.planfiles import load_request

        data = load_request(args.request).model_dump(exclude_unset=True)
    data.update(request_overrides(args))
    return PlanRequest.model_validate(data)


# ----------------------------------------------------------------------------- plan


def run_plan(args) -> int:
    from planner.io.report import to_json

    if args.export and not args.out:
        raise PlannerError("--export needs --out PATH (where to write the configuration)")
    if args.out and not args.export:
        raise PlannerError(f"--out is the path of --export; give --export {'|'.join(EXPORT_CHOICES)}")
    if args.from_plan:
        from planner.io.planfiles import load_plan

        result = load_plan(args.from_plan)
    else:
        from planner.search.planning import make_plan

        result = make_plan(build_request(args), exhaustive=args.exhaustive, continuous_check=args.continuous_check)
    written = []
    if args.save:
        from planner.io.planfiles import write_data

        written.append(write_data(result, args.save))
    if args.export:
        from planner.io.exports import export

        written += export(result, args.export, args.out)
    if args.plot:
        from planner.io import plots

        written.append(plots.plot_plan(result, args.plot))
    if args.json:
        print(to_json(result.model_dump(mode="json")))
    else:
        print(plan_text(result))
        for path in written:
            print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- compare


_ALLOC_QUANTITIES = ("tokens", "epochs")


def parse_allocation(text: str) -> dict:
    """'NAME:key=value,key=value' -> Allocation fields."""
    from planner.cli.loss import parse_quantity

    if ":" not in text:
        raise PlannerError(f"--alloc {text!r}: expected NAME:key=value,... (e.g. '8B LoRA:model=llama-3.1-8b,method=lora')")
    name, _, rest = text.partition(":")
    out: dict = {"name": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise PlannerError(f"--alloc {name!r}: {part!r} is not key=value")
        key = key.strip().replace("-", "_")
        if key in _ALLOC_INTEGERS:
            out[key] = _alloc_integer(name, key, value.strip())
        else:
            out[key] = parse_quantity(value, key) if key in _ALLOC_QUANTITIES else value.strip()
    return out


_ALLOC_INTEGERS = ("zero", "lora_rank", "num_gpus", "tensor_parallel", "micro_batch")
"""Allocation fields that are whole numbers (pydantic's Literal[0, 1, 2, 3] refuses the text "3")."""


def _alloc_integer(name: str, key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PlannerError(f"--alloc {name!r}: {key}={text!r} is not a whole number (e.g. {key}=2)") from None


def build_compare(args):
    from pydantic import ValidationError

    from planner.io.planfiles import load_compare
    from planner.search.plan import CompareRequest, PlanRequest

    loaded = load_compare(args.file) if args.file else None  # read once
    base = loaded.base.model_dump(exclude_unset=True) if loaded else {}
    allocations = [a.model_dump(exclude_unset=True) for a in loaded.allocations] if loaded else []
    if args.request:
        from planner.io.planfiles import load_request

        base.update(load_request(args.request).model_dump(exclude_unset=True))
    base.update(request_overrides(args))
    allocations += [parse_allocation(a) for a in args.alloc]
    if not allocations:
        raise PlannerError("nothing to compare: give a compare file or --alloc NAME:key=value,... (at least one)")
    try:
        return CompareRequest(base=PlanRequest.model_validate(base), allocations=allocations)
    except ValidationError as exc:
        from planner.io.planfiles import error_location

        first = exc.errors()[0]
        raise PlannerError(f"{error_location(first['loc'], {'allocations': allocations})}: {first['msg']}") from None


def run_compare(args) -> int:
    from planner.io.report import to_json
    from planner.search.compare import compare

    request = build_compare(args)
    rows = compare(request)
    if args.plot:
        from planner.io import plots

        plots.plot_allocations(rows, args.plot)
    if args.json:
        print(to_json({"request": request.model_dump(mode="json"), "rows": rows}))
    else:
        print(compare_text(rows))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0

