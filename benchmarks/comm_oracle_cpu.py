"""Oracle for ``planner.cost.timing.communication``: the data-parallel collectives of the stacks' own code,
counted on CPU (gloo, 2 ranks) for one optimizer step of a small Llama.

    .venv/bin/python benchmarks/comm_oracle_cpu.py --all [--out tests/data/comm_oracle.json]
        (launches ``torchrun --nproc_per_node 2`` once per case and writes the fixture)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/comm_oracle_cpu.py CASE
        (one case; rank 0 prints one JSON line)

CASE is ``STACK-METHOD-CKPT[-nosync|-noreuse|-reuseN][-L8]``: STACK ``ds1``/``ds2``/``ds3`` (DeepSpeed
0.19.8 ZeRO stage, bf16, the bucket sizes transformers' ``"auto"`` fills, ``overlap_comm`` and ``contiguous_gradients`` on, as
``planner.cost.memory.zero_buffers.hf_auto`` prices them), ``fsdp2`` (``fully_shard`` on every decoder layer
then the root, ``reshard_after_forward=True``, fp32 weights, ``MixedPrecisionPolicy(bf16, fp32)``: torchtitan),
``fsdp2bf16`` (the same over a bf16 model without a policy: torchtune) or ``ddp`` (fp32 weights, bf16 autocast,
``no_sync`` on all but the last micro-batch as HF Trainer/accelerate do, its buckets all-reduced through torch's
``allreduce_hook`` so that Python sees them); METHOD ``full`` or ``lora`` (peft
LoRA r=16 on every linear of the layers); CKPT ``ckpt`` (HF ``gradient_checkpointing_enable``, non-reentrant,
for DeepSpeed and DDP; ``checkpoint_wrapper`` on each layer before ``fully_shard`` for FSDP2, as torchtitan and
torchtune apply it) or ``none``; ``nosync``: FSDP2 ``set_requires_gradient_sync(False)`` on all micro-batches
but the last; ``noreuse``: ZeRO-3 with ``stage3_max_reuse_distance`` 0 instead of HF's 1e9 (the regime of a
model whose weights exceed the window, as a 7B one does; the small model lies inside 1e9); ``reuseN``: a
window of N elements; ``L8``: 8 layers instead of 4. Gradient accumulation 2, batch 1 x 128 tokens, two optimizer steps; the second is reported.

Every call of ``torch.distributed``'s collectives is wrapped before DeepSpeed or FSDP bind them; each call is
recorded with its phase (``forward0``, ``backward0``, ``step0``, ``forward1``, ... per micro-step), its
dtype and the elements of its full buffer (the gathered output of an all-gather, the input of a
reduce-scatter or reduce, the tensor of an all-reduce or broadcast): the ``num_bytes`` that
``ring_gather_s`` / ``ring_all_reduce_s`` take. Needs torch, transformers, peft and deepspeed; the planner's
analytic path never imports this file.
"""

import inspect
import json
import os
import subprocess
import sys
from collections import defaultdict

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, TOKENS, GRAD_ACCUM, STEPS, LORA_RANK = 256, 768, 4, 8192, 128, 2, 2, 16
BUFFER_ARG = {  # collective -> the argument whose elements are the full buffer
    "all_gather_into_tensor": "output_tensor", "_all_gather_base": "output_tensor", "all_gather_single": "output_tensor",
    "all_gather": "tensor_list", "all_gather_coalesced": "output_tensor_lists",
    "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input", "reduce_scatter_single": "input",
    "reduce_scatter": "input_list", "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "reduce": "tensor",
    "broadcast": "tensor", "all_to_all_single": "input", "all_to_all": "input_tensor_list",
    "gather": "tensor", "scatter": "tensor", "send": "tensor", "recv": "tensor", "isend": "tensor", "irecv": "tensor",
    "barrier": None, "all_gather_object": None, "broadcast_object_list": None,
}
CALLS: list = []
STATE = {"phase": "init", "depth": 0}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _wrap(name: str, fn):
    signature = inspect.signature(fn)

    def counted(*args, **kwargs):
        outer = STATE["depth"] == 0
        STATE["depth"] += 1
        try:
            if outer:
                arg = BUFFER_ARG[name]
                bound = signature.bind_partial(*args, **kwargs).arguments
                tensors = _tensors(bound.get(arg)) if arg else []
                dtype = str(tensors[0].dtype).replace("torch.", "") if tensors else "none"
                CALLS.append((STATE["phase"], name, dtype, sum(t.numel() for t in tensors)))
            return fn(*args, **kwargs)
        finally:
            STATE["depth"] -= 1

    return counted


def install_counters() -> None:
    """Wrap every collective in ``torch.distributed`` and ``distributed_c10d`` (one wrapper per function)."""
    for name in BUFFER_ARG:
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        wrapped = _wrap(name, original)
        for module in (dist, c10d):
            if hasattr(module, name):
                setattr(module, name, wrapped)


def build_model(method: str, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    return _lora(model) if method == "lora" else model


def _lora(model):
    import peft.import_utils
    import peft.tuners.lora.torchao as lora_torchao
    from peft import LoraConfig, get_peft_model

    # peft probes torchao for every adapted linear and refuses the installed 0.11 (torchtune's pin): no torchao layers
    peft.import_utils.is_torchao_available = lora_torchao.is_torchao_available = lambda: False
    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))


def _count_module_fetches() -> None:
    """Record every ZeRO-3 ``fetch_sub_module`` (the hook run before a module's forward, recompute or backward)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator as Coordinator,
    )

    fetch = Coordinator.fetch_sub_module

    def counted(self, current_submodule, forward):
        CALLS.append((STATE["phase"], "fetch_sub_module", "forward" if forward else "backward", 1,
                      type(current_submodule).__name__))
        return fetch(self, current_submodule, forward)

    Coordinator.fetch_sub_module = counted


def deepspeed_engine(stage: int, method: str, ckpt: bool, reuse: float):
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": HIDDEN ** 2}
    if stage == 3:  # transformers' "auto" values; max live / max reuse as HF's example config (1e9) or 0
        zero.update(stage3_prefetch_bucket_size=int(0.9 * HIDDEN ** 2), stage3_param_persistence_threshold=10 * HIDDEN,
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=reuse)
        _count_module_fetches()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": GRAD_ACCUM, "bf16": {"enabled": True},
              "zero_optimization": zero, "steps_per_print": 10**9, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "adam_w_mode": True}}}
    deepspeed.init_distributed(dist_backend="gloo")
    import peft  # noqa: F401  (imported before zero.Init patches Parameter.__new__)
    import transformers.models.llama.modeling_llama  # noqa: F401
    if stage == 3:  # transformers' from_pretrained builds under zero.Init; peft wraps the model afterwards
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = build_model("full")
        model = _lora(model) if method == "lora" else model
    else:
        model = build_model(method)
    if ckpt:
        model.gradient_checkpointing_enable()
        if method == "lora":
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=params)
    return engine, model


def run_deepspeed(stage: int, method: str, ckpt: bool, reuse: float, ids) -> dict:
    engine, model = deepspeed_engine(stage, method, ckpt, reuse)
    for step in range(STEPS):
        for mb in range(GRAD_ACCUM):
            STATE["phase"] = f"s{step}/forward{mb}"
            loss = engine(input_ids=ids, labels=ids).loss
            STATE["phase"] = f"s{step}/backward{mb}"
            engine.backward(loss)
            STATE["phase"] = f"s{step}/step{mb}"
            engine.step()
    return _facts(model)


def run_fsdp2(method: str, ckpt: bool, nosync: bool, pure_bf16: bool, ids) -> dict:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    model = build_model(method)
    if pure_bf16:  # torchtune builds the whole model, adapters included, in bf16
        model = model.to(torch.bfloat16)
    facts = _facts(model)
    layers = model.get_base_model().model.layers if method == "lora" else model.model.layers
    policy = MixedPrecisionPolicy() if pure_bf16 else MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                         reduce_dtype=torch.float32)
    for i, layer in enumerate(layers):
        if ckpt:
            layers[i] = layer = checkpoint_wrapper(layer, preserve_rng_state=False)
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    import contextlib

    def micro_batch(mb: int):
        if nosync:
            model.set_requires_gradient_sync(mb == GRAD_ACCUM - 1)
        return contextlib.nullcontext()

    _train(model, model, ids, micro_batch)
    return facts


def run_ddp(method: str, ckpt: bool, ids) -> dict:
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    model = build_model(method)
    if ckpt:
        model.gradient_checkpointing_enable()
        if method == "lora":
            model.enable_input_require_grads()
    facts = _facts(model)
    ddp = DistributedDataParallel(model)
    # DDP's C++ reducer all-reduces its buckets out of Python's sight; torch's allreduce_hook is the same
    # collective (divide by the world, all-reduce each bucket: its docstring) issued through dist.all_reduce
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp.register_comm_hook(None, allreduce_hook)
    _train(model, ddp, ids, lambda mb: contextlib.nullcontext() if mb == GRAD_ACCUM - 1 else ddp.no_sync(),
           autocast=True)
    return facts


def _train(model, forward, ids, micro_batch_context, autocast: bool = False) -> None:
    """``STEPS`` optimizer steps of ``GRAD_ACCUM`` micro-batches through ``forward`` (the wrapped model),
    each micro-batch inside ``micro_batch_context(mb)`` (DDP's no_sync; FSDP2's gradient-sync switch),
    labelling the phases the counters group by; torch AdamW with gradient clipping, as the HF Trainer."""
    import contextlib

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(STEPS):
        for mb in range(GRAD_ACCUM):
            with micro_batch_context(mb):
                STATE["phase"] = f"s{step}/forward{mb}"
                with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                    loss = forward(input_ids=ids, labels=ids).loss / GRAD_ACCUM
                STATE["phase"] = f"s{step}/backward{mb}"
                loss.backward()
        STATE["phase"] = f"s{step}/step{GRAD_ACCUM - 1}"
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def _facts(model) -> dict:
    """Parameter counts of the small model (ZeRO-3's partitioned parameters by their full size)."""
    def numel(p):
        return int(getattr(p, "ds_numel", p.numel()))

    named = list(model.named_parameters())
    root = [p for n, p in named if ".layers." not in n]
    return {"total_params": sum(numel(p) for _, p in named),
            "trainable_params": sum(numel(p) for _, p in named if p.requires_grad),
            "layer_params": sum(numel(p) for n, p in named if ".layers." in n) // LAYERS,
            "root_params": sum(numel(p) for p in root),
            "small_params": sum(numel(p) for _, p in named if numel(p) < 10 * HIDDEN)}


def summarize(calls, step: int) -> dict:
    """{phase: {collective/dtype: [calls, elements]}} of optimizer step ``step`` (its micro-steps' phases)."""
    out: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for phase, name, dtype, numel, *_ in calls:
        if phase.startswith(f"s{step}/"):
            entry = out[phase.split("/", 1)[1]][f"{name}/{dtype}"]
            entry[0] += 1
            entry[1] += numel
    return {phase: dict(v) for phase, v in sorted(out.items())}


def run_case(case: str) -> dict:
    global LAYERS
    stack, method, ckpt, *rest = case.split("-")
    LAYERS = next((int(flag[1:]) for flag in rest if flag.startswith("L")), LAYERS)
    rest = [flag for flag in rest if not flag.startswith("L")]
    ids = torch.randint(0, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    if stack.startswith("ds"):
        reuse = 0.0 if "noreuse" in rest else float(rest[0][5:]) if rest and rest[0].startswith("reuse") else 1e9
        facts = run_deepspeed(int(stack[2]), method, ckpt == "ckpt", reuse, ids)
    elif stack.startswith("fsdp2"):
        facts = run_fsdp2(method, ckpt == "ckpt", "nosync" in rest, stack == "fsdp2bf16", ids)
    else:
        facts = run_ddp(method, ckpt == "ckpt", ids)
    return {"case": case, "world": dist.get_world_size(), "layers": LAYERS, **facts, "phases": summarize(CALLS, STEPS - 1),
            "first_step_phases": summarize(CALLS, 0)}


CASES = ([f"ds{z}-{m}-{c}" for z in (1, 2, 3) for m in ("full", "lora") for c in ("none", "ckpt")]
         + [f"ds3-{m}-{c}-noreuse" for m in ("full", "lora") for c in ("none", "ckpt")]
         + [f"ds3-full-{c}-reuse{w}" for c in ("none", "ckpt") for w in ("2e6", "5e6", "1e7", "2e7")]
         + ["ds3-full-none-noreuse-L8", "ds3-full-ckpt-noreuse-L8", "ds3-lora-ckpt-noreuse-L8", "ds3-full-none-L8"]
         + [f"{s}-{m}-{c}{n}" for s in ("fsdp2", "fsdp2bf16") for m in ("full", "lora") for c in ("none", "ckpt")
            for n in ("", "-nosync")]
         + [f"ddp-{m}-{c}" for m in ("full", "lora") for c in ("none", "ckpt")])


def versions() -> dict:
    import deepspeed
    import peft
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def run_all(out_path: str, cases) -> None:
    """One torchrun per case (a fresh process group and DeepSpeed engine each), the results in one file."""
    results = {}
    if os.path.exists(out_path):  # re-running some cases keeps the others
        with open(out_path, encoding="utf-8") as f:
            results = json.load(f)["cases"]
    for case in cases:
        command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                   "--standalone", __file__, case]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"{case}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results[case] = json.loads(lines[-1])
        print(f"{case}: ok", file=sys.stderr)
    model = {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_layers": LAYERS, "vocab_size": VOCAB,
             "heads": 4, "tied_embeddings": False, "tokens_per_micro_batch": TOKENS, "grad_accum": GRAD_ACCUM,
             "lora_rank": LORA_RANK, "lora_targets": "all-linear"}
    data = {"command": "python benchmarks/comm_oracle_cpu.py --all (torchrun --nproc_per_node 2, gloo, CPU)",
            "versions": versions(), "model": model, "cases": results}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


GATHER = ("all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather")
REDUCE = ("reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter", "reduce")


def _per_unit(phases: dict, names, phase_prefix: str, unit: float) -> tuple[float, str]:
    """Elements of ``names`` in the phases starting with ``phase_prefix`` over ``unit``, and their dtypes."""
    numel, dtypes = 0, set()
    for phase, calls in phases.items():
        if phase.startswith(phase_prefix):
            for key, (_, n) in calls.items():
                name, dtype = key.split("/")
                if name in names and n > 64:  # scalars (loss scale, grad norm) left out
                    numel += n
                    dtypes.add(dtype)
    return numel / unit, ",".join(sorted(dtypes)) or "-"


def print_table(path: str) -> None:
    """Markdown: per case, weight gathers per micro-batch (forward, backward) in units of the gathered
    weights, gradient reductions per step in units of the trainable parameters, with their dtypes."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    ga = data["model"]["grad_accum"]
    print("| case | gathers / micro-batch issued in fwd | issued in bwd | gather dtype | after-step gathers | "
          "reductions / step | reduce dtype | all-reduces / step | ZeRO-3 module fetches / micro-batch (fwd, bwd) |")
    print("|---|---:|---:|---|---:|---:|---|---:|---|")
    for case, r in sorted(data["cases"].items()):
        gathered = r["total_params"]  # every weight is sharded and gathered (LoRA: the frozen base and the adapters)
        p = r["phases"]
        fwd, gdt = _per_unit(p, GATHER, "forward", gathered * ga)
        bwd, gdt2 = _per_unit(p, GATHER, "backward", gathered * ga)
        after, _ = _per_unit(p, GATHER, "step", r["trainable_params"])
        red, rdt = _per_unit(p, REDUCE, "", r["trainable_params"])
        ar, adt = _per_unit(p, ("all_reduce",), "", r["trainable_params"])
        fetch = [sum(c.get(f"fetch_sub_module/{d}", [0])[0] for ph, c in p.items() if ph.startswith(w)) / ga
                 for w, d in (("forward", "forward"), ("backward", "backward"))]
        recompute = sum(c.get("fetch_sub_module/forward", [0])[0] for ph, c in p.items() if ph.startswith("backward")) / ga
        fetches = f"{fetch[0]:.0f}, {fetch[1]:.0f} (+{recompute:.0f} recompute)" if fetch[0] else "-"
        dtypes = ",".join(sorted({d for text in (gdt, gdt2) for d in text.split(",") if d != "-"})) or "-"
        print(f"| {case} | {fwd:.2f} | {bwd:.2f} | {dtypes} | {after:.2f} | {red:.2f} | {rdt} | {ar:.2f} {adt} | {fetches} |")


def main() -> None:
    if sys.argv[1] == "--table":
        print_table(sys.argv[2] if len(sys.argv) > 2 else "tests/data/comm_oracle.json")
        return
    if sys.argv[1] == "--all":
        out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "tests/data/comm_oracle.json"
        only = [a for a in sys.argv[2:] if a in CASES]
        run_all(out, only or CASES)
        return
    install_counters()
    result = run_case(sys.argv[1])
    if dist.get_rank() == 0 and os.environ.get("COMM_ORACLE_DUMP"):
        for call in CALLS:
            if call[0].startswith(f"s{STEPS - 1}/"):
                print(*call, file=sys.stderr)
    if dist.get_rank() == 0:
        print(json.dumps(result, sort_keys=True), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
