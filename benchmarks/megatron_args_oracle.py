"""Oracle for `planner plan --export megatron`: Megatron-LM's own argument parser (not CI).

Exports a panel of megatron set-ups (``planner.io.exports_megatron.megatron_arguments``), then, in
a child process with Megatron-LM on the path (commit ``MEGATRON_COMMIT``, no GPU), runs
``megatron.training.arguments.parse_args`` and ``validate_args`` on each argument list as the launch
script would (``WORLD_SIZE`` = the plan's GPUs, ``RANK`` 0, ``CUDA_DEVICE_MAX_CONNECTIONS=1``,
``pretrain_gpt.py``'s ``args_defaults``), and ``core_transformer_config_from_args`` (the
``TransformerConfig`` checks, e.g. of a pipeline layout). Stubbed: only
``get_device_arch_version`` (9: Hopper, what validate_args would read from the GPU), and for the
``TransformerConfig`` only, ``apply_rope_fusion`` off (the fused RoPE kernel needs CUDA).

It checks that the parsed values equal what the planner priced (layout, batch, shape, and under
an uneven pipeline the layers of each chunk against ``parallel.stage_layers``) and records in
``tests/data/megatron_args.json``: the commit, every option string of Megatron's parser, and per
case its inputs, the accepted argument list and the parsed key fields.

    PLANNER_MEGATRON_SRC=/tmp/mcore_try/src PLANNER_MEGATRON_DEPS=/tmp/ttdeps \\
        .venv/bin/python benchmarks/megatron_args_oracle.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "megatron_args.json"
PANEL = {
    # name: (model, TrainingSetup fields beyond stack/precision/optimizer_impl, steps)
    "8b one gpu selective": ("llama-3.1-8b", dict(num_gpus=1, micro_batch=1, grad_accum=8, seq_len=4096,
                                                   checkpointing="selective"), 500),
    "8b tp2 sp dist-opt": ("llama-3.1-8b", dict(num_gpus=8, zero=1, tensor_parallel=2, sequence_parallel=True,
                                                micro_batch=2, grad_accum=4, seq_len=8192), 1000),
    "70b tp8 pp4 full": ("llama-3.1-70b", dict(num_gpus=64, zero=1, tensor_parallel=8, sequence_parallel=True,
                                               pipeline_parallel=4, micro_batch=1, grad_accum=16, seq_len=8192,
                                               checkpointing="full"), 2000),
    "70b vpp interleaved": ("llama-3.1-70b", dict(num_gpus=32, zero=1, tensor_parallel=4, sequence_parallel=True,
                                                  pipeline_parallel=4, pipeline_schedule="interleaved", virtual_stages=5,
                                                  micro_batch=1, grad_accum=8, seq_len=4096, checkpointing="selective"), 300),
    "405b uneven pp8 cp2": ("llama-3.1-405b", dict(num_gpus=256, zero=1, tensor_parallel=8, sequence_parallel=True,
                                                   pipeline_parallel=8, context_parallel=2, micro_batch=1, grad_accum=32,
                                                   seq_len=16384, checkpointing="full"), 100),
    "405b uneven vpp": ("llama-3.1-405b", dict(num_gpus=128, zero=1, tensor_parallel=8, sequence_parallel=True,
                                               pipeline_parallel=8, pipeline_schedule="interleaved", virtual_stages=2,
                                               micro_batch=1, grad_accum=16, seq_len=8192, checkpointing="selective"), 100),
    "qwen2.5-7b qkv bias cp2": ("qwen2.5-7b", dict(num_gpus=16, zero=0, tensor_parallel=2, sequence_parallel=True,
                                                   context_parallel=2, micro_batch=1, grad_accum=2, seq_len=32768), 50),
    "qwen2.5-32b pp2 selective": ("qwen2.5-32b", dict(num_gpus=16, zero=1, tensor_parallel=4, sequence_parallel=True,
                                                        pipeline_parallel=2, micro_batch=1, grad_accum=8, seq_len=4096,
                                                        checkpointing="selective"), 400),
    "gpt2 fp32 vpp learned positions": ("gpt2", dict(precision="fp32", num_gpus=8, zero=1, pipeline_parallel=4,
                                                      pipeline_schedule="interleaved", virtual_stages=3, micro_batch=4,
                                                      grad_accum=2, seq_len=1024, checkpointing="full"), 200),
}
BASE = {"stack": "megatron", "precision": "bf16-mixed", "optimizer": "adamw", "optimizer_impl": "fused"}
SUBSTITUTES = {"$DATA_PATH": "/tmp/planner_megatron_data/text_document", "$TOKENIZER_MODEL": "/tmp/planner_tokenizer"}
KEY_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
              "sequence_parallel", "context_parallel_size", "data_parallel_size", "micro_batch_size",
              "global_batch_size", "seq_length", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "group_query_attention", "use_distributed_optimizer",
              "recompute_granularity", "recompute_method", "recompute_num_layers", "bf16", "train_iters", "swiglu",
              "normalization", "norm_epsilon", "rotary_base", "use_rope_scaling", "add_bias_linear", "add_qkv_bias",
              "untie_embeddings_and_output_weights", "hidden_dropout", "attention_dropout", "padded_vocab_size")
CONFIG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "normalization",
                 "layernorm_epsilon", "hidden_dropout", "attention_dropout", "sequence_parallel",
                 "virtual_pipeline_model_parallel_size", "recompute_granularity")
"""What Megatron's ``TransformerConfig`` (the model it builds) holds: without --group-query-attention the
parsed ``num_query_groups`` is 1 but the config's is the head count."""
SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")

_CHILD = r'''
import json, os, sys, typing
typing.override = getattr(typing, "override", lambda f: f)  # Python 3.11
import megatron.training.arguments as MA
MA.get_device_arch_version = lambda: 9  # Hopper: the GPU validate_args would read
cases, fields, CONFIG_FIELDS = json.loads(sys.stdin.read())
out = {"options": None, "cases": {}}
import argparse
parser = MA.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
out["options"] = sorted({o for a in parser._actions for o in a.option_strings})
for name, (world, argv) in cases.items():
    os.environ.update(WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    sys.argv = ["pretrain_gpt.py", *argv]
    args = MA.validate_args(MA.parse_args(), {"tokenizer_type": "GPT2BPETokenizer"})
    row = {k: getattr(args, k, None) for k in fields}
    try:
        import copy
        cpu_args = copy.copy(args)
        cpu_args.apply_rope_fusion = False  # a CUDA kernel's availability, not a layout or shape check
        config = MA.core_transformer_config_from_args(cpu_args)
        layout = getattr(config, "pipeline_model_parallel_layout", None)
        row["transformer_config"] = "ok"
        row["config"] = {k: getattr(config, k, None) for k in CONFIG_FIELDS}
        if layout is not None:
            from megatron.core.transformer.enums import LayerType
            pp = len(layout.layout)  # layout.layout[pp rank][virtual stage]: chunk c = vpp x pp + rank
            chunks = [layout.layout[c % pp][c // pp] for c in range(pp * len(layout.layout[0]))]
            row["layout_decoder_layers"] = [sum(1 for x in chunk if x == LayerType.decoder) for chunk in chunks]
    except Exception as error:  # recorded: the CPU-only environment may lack what the config needs
        row["transformer_config"] = f"{type(error).__name__}: {error}"[:300]
    out["cases"][name] = row
print("@@" + json.dumps(out, default=str))
'''


def exported_cases() -> dict:
    """name -> (model, setup fields, steps, argument list) of the panel."""
    sys.path.insert(0, str(ROOT))
    from planner.io.exports_megatron import megatron_arguments
    from planner.specs.setup import TrainingSetup

    return {name: (model, fields, steps, megatron_arguments(model, TrainingSetup(**{**BASE, **fields}), steps))
            for name, (model, fields, steps) in PANEL.items()}


def priced_values(model: str, fields: dict, steps: int) -> dict:
    """What the planner priced, in Megatron's field names."""
    from planner.cost.memory.megatron_tensors import padded_vocab_size
    from planner.specs.catalog import load_spec
    from planner.specs.setup import TrainingSetup

    setup, spec = TrainingSetup(**{**BASE, **fields}), load_spec(model)
    layer = spec.layers[0]
    v = setup.virtual_stages if setup.pipeline_parallel > 1 else 1
    chunks = [len(c) for c in _chunks(len(spec.layers), setup.pipeline_parallel, v)]
    return {"tensor_model_parallel_size": setup.tensor_parallel, "pipeline_model_parallel_size": setup.pipeline_parallel,
            "virtual_pipeline_model_parallel_size": v if v > 1 else None, "sequence_parallel": setup.sequence_parallel,
            "context_parallel_size": setup.context_parallel, "data_parallel_size": setup.data_parallel,
            "micro_batch_size": setup.micro_batch,
            "global_batch_size": setup.micro_batch * setup.grad_accum * setup.data_parallel,
            "seq_length": setup.seq_len, "num_layers": len(spec.layers), "hidden_size": spec.hidden_size,
            "ffn_hidden_size": layer.intermediate_size, "num_attention_heads": layer.num_heads,
            "num_query_groups": layer.num_kv_heads, "kv_channels": layer.head_dim,
            "use_distributed_optimizer": setup.zero == 1, "train_iters": steps,
            "recompute_granularity": None if setup.checkpointing == "none" else setup.checkpointing,
            "bf16": setup.precision == "bf16-mixed",
            "padded_vocab_size": padded_vocab_size(spec.vocab_size, setup.tensor_parallel), "chunk_layers": chunks}


def _chunks(num_layers: int, pp: int, v: int):
    """The planner's chunks in Megatron's order (chunk c on rank c % pp), from ``stage_layers``."""
    from planner.cost.memory.parallel import stage_layers

    ranks = stage_layers(num_layers, pp, v)
    flat = sorted((min(c), c) for r in ranks for c in _split_runs(r))
    return [c for _, c in flat]


def _split_runs(indices):
    runs, current = [], [indices[0]]
    for i in indices[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    return runs + [current]


def check(name: str, priced: dict, parsed: dict) -> list[str]:
    """Mismatches between what the planner priced and what Megatron parsed."""
    built = {**parsed, **{k: parsed.get("config", {}).get(k) for k in SHAPE}}  # the model's shape: as built
    bad = [f"{name}: {k} priced {v!r}, Megatron {built.get(k)!r}" for k, v in priced.items()
           if k != "chunk_layers" and built.get(k) != v]
    if "layout_decoder_layers" in parsed and parsed["layout_decoder_layers"] != priced["chunk_layers"]:
        bad.append(f"{name}: chunks priced {priced['chunk_layers']}, layout {parsed['layout_decoder_layers']}")
    return bad


def main() -> int:
    from planner.io.exports_megatron import MEGATRON_COMMIT

    src = os.environ.get("PLANNER_MEGATRON_SRC", "/tmp/mcore_try/src")
    deps = os.environ.get("PLANNER_MEGATRON_DEPS", "/tmp/ttdeps")
    cases = exported_cases()
    argv = {n: (_world_size(f), [SUBSTITUTES.get(a, a) for a in args]) for n, (_, f, _, args) in cases.items()}
    env = {**os.environ, "PYTHONPATH": f"{src}:{deps}"}
    done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps([argv, KEY_FIELDS, CONFIG_FIELDS]), capture_output=True,
                          text=True, env=env, cwd=src, timeout=600)
    if done.returncode:
        print(done.stderr[-4000:])
        return 1
    result = json.loads(done.stdout.split("@@", 1)[1])
    failures, rows = [], {}
    for name, (model, fields, steps, args) in cases.items():
        parsed = result["cases"][name]
        failures += check(name, priced_values(model, fields, steps), parsed)
        rows[name] = {"model": model, "setup": fields, "steps": steps, "arguments": args, "parsed": parsed}
    unknown = sorted({a for _, _, _, args in cases.values() for a in args if a.startswith("--")} - set(result["options"]))
    failures += [f"option {u} is not Megatron's" for u in unknown]
    for f in failures:
        print("MISMATCH", f)
    print(f"{'case':30s} tp pp vpp sp cp dp mbs gbs layers hidden ffn heads groups  config")
    for name, row in rows.items():
        p = row["parsed"]
        print(f"{name:30s} {p['tensor_model_parallel_size']:>2} {p['pipeline_model_parallel_size']:>2} "
              f"{str(p['virtual_pipeline_model_parallel_size']):>3} {int(p['sequence_parallel'])} "
              f"{p['context_parallel_size']:>2} {p['data_parallel_size']:>2} {p['micro_batch_size']:>3} "
              f"{p['global_batch_size']:>3} {p['num_layers']:>6} {p['hidden_size']:>6} {p['ffn_hidden_size']:>5} "
              f"{p['num_attention_heads']:>5} {p['config']['num_query_groups']:>6}  {p['transformer_config'][:40]}")
    if failures:
        return 1
    OUT.write_text(json.dumps({"megatron_commit": MEGATRON_COMMIT, "source": "megatron/training/arguments.py "
                               "add_megatron_arguments (option strings); parse_args + validate_args per case",
                               "substitutes": SUBSTITUTES, "options": result["options"], "cases": rows},
                              indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(rows)} cases, {len(result['options'])} options")
    return 0


def _world_size(fields: dict) -> int:
    """The launch's WORLD_SIZE: every GPU of the plan."""
    return int(fields["num_gpus"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
