"""Megatron-LM's own memory accounting, evaluated for a panel of configurations (the megatron stack's oracle).

    python benchmarks/megatron_theoretical_oracle.py [--repo /work/.mirror/NVIDIA+Megatron-LM/repo]

Megatron-LM ships ``megatron/training/theoretical_memory_usage.py`` (``compute_weight_and_optimizer_memory``,
``compute_activation_memory``, ``compute_activation_memory_without_sp``, ``report_theoretical_memory``):
the stack's own estimate of the weight + optimizer bytes and the first pipeline stage's activation bytes.
This script reads THAT file from a fetched Megatron-LM git repository at ``COMMIT`` (``git show``), writes it
to a temporary package beside a stub of the one module it imports (``.utils``: ``is_hybrid_model``,
``print_rank_0``), imports it and evaluates it for ``PANEL``. The outputs go, with the commit, to
``tests/data/megatron_theoretical.json``, which ``tests/test_megatron_memory.py`` compares the planner's
components to. Not run in CI (it needs the fetched repository); the fixture is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"  # NVIDIA/Megatron-LM main, 2026-08-22
FILE = "megatron/training/theoretical_memory_usage.py"
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "megatron_theoretical.json"
VOCAB_DIVISIBLE_BY = 128

GPT3_175B_CONFIG = {
    # GPT-3 175B's shapes (Brown et al. 2020 Table 2.1; Korthikanti et al. 2022 Table 3) on the GPT-2 config
    # layout: 96 layers, h 12288, 96 heads, 2048 positions, GPT-2 vocabulary, dropout 0.1, tied embeddings
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
    "n_embd": 12288, "n_layer": 96, "n_head": 96, "n_positions": 2048, "n_ctx": 2048, "vocab_size": 50257,
    "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1, "layer_norm_epsilon": 1e-05,
}

SHAPES = {
    # planner model -> the Megatron arguments describing it (the HF config's sizes)
    "llama-2-7b": dict(hidden_size=4096, ffn_hidden_size=11008, num_layers=32, num_attention_heads=32,
                       num_query_groups=32, vocab=32000, swiglu=True, normalization="RMSNorm", untie=True),
    "llama-3.1-8b": dict(hidden_size=4096, ffn_hidden_size=14336, num_layers=32, num_attention_heads=32,
                         num_query_groups=8, vocab=128256, swiglu=True, normalization="RMSNorm", untie=True),
    "llama-3.1-70b": dict(hidden_size=8192, ffn_hidden_size=28672, num_layers=80, num_attention_heads=64,
                          num_query_groups=8, vocab=128256, swiglu=True, normalization="RMSNorm", untie=True),
    "gpt3-175b-like": dict(hidden_size=12288, ffn_hidden_size=49152, num_layers=96, num_attention_heads=96,
                           num_query_groups=96, vocab=50257, swiglu=False, normalization="LayerNorm", untie=False),
}

PANEL = [
    # name, model, tp, pp, v, dp, sp, recompute, distributed optimizer, seq, micro-batch, micro-batches
    ("llama2-7b tp1 pp1 dp8 distopt", "llama-2-7b", 1, 1, 1, 8, False, "selective", True, 4096, 1, 8),
    ("llama2-7b tp2 sp dp4 distopt", "llama-2-7b", 2, 1, 1, 4, True, "selective", True, 4096, 1, 8),
    ("llama2-7b tp2 no-sp dp4 no-recompute", "llama-2-7b", 2, 1, 1, 4, False, "none", False, 4096, 1, 8),
    ("llama3.1-8b tp2 pp2 sp selective", "llama-3.1-8b", 2, 2, 1, 2, True, "selective", False, 4096, 1, 8),
    ("llama3.1-8b tp4 sp full dp2 distopt", "llama-3.1-8b", 4, 1, 1, 2, True, "full", True, 8192, 1, 4),
    ("llama3.1-8b tp1 pp4 m2 distopt", "llama-3.1-8b", 1, 4, 1, 2, False, "none", True, 4096, 1, 2),
    ("llama3.1-70b tp8 pp4 sp distopt", "llama-3.1-70b", 8, 4, 1, 2, True, "selective", True, 4096, 1, 32),
    ("llama3.1-70b tp8 pp4 vpp5 sp distopt", "llama-3.1-70b", 8, 4, 5, 4, True, "selective", True, 4096, 1, 64),
    ("gpt3-175b tp8 pp8 sp selective", "gpt3-175b-like", 8, 8, 1, 1, True, "selective", False, 2048, 1, 64),
    ("gpt3-175b tp8 pp8 vpp3 sp distopt", "gpt3-175b-like", 8, 8, 3, 2, True, "selective", True, 2048, 1, 64),
    ("gpt3-175b tp8 pp8 sp full", "gpt3-175b-like", 8, 8, 1, 1, True, "full", False, 2048, 1, 64),
]


def padded_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


def load_theoretical(repo: Path):
    """Import ``FILE`` at ``COMMIT`` from ``repo`` (a git directory) with its one relative import stubbed."""
    source = subprocess.run(["git", "--git-dir", str(repo), "show", f"{COMMIT}:{FILE}"], check=True,
                            capture_output=True, text=True).stdout
    package = Path(tempfile.mkdtemp()) / "megatron_theoretical"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text(
        "def is_hybrid_model(args):\n    return False\n\n\ndef print_rank_0(*args, **kwargs):\n    pass\n")
    (package / "theoretical_memory_usage.py").write_text(source)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("megatron_theoretical.theoretical_memory_usage")


def megatron_args(model: str, tp: int, pp: int, v: int, dp: int, sp: bool, recompute: str, distopt: bool,
                  seq: int, micro_batch: int) -> SimpleNamespace:
    shape = SHAPES[model]
    return SimpleNamespace(
        hidden_size=shape["hidden_size"], ffn_hidden_size=shape["ffn_hidden_size"], num_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"], kv_channels=shape["hidden_size"] // shape["num_attention_heads"],
        group_query_attention=shape["num_query_groups"] != shape["num_attention_heads"],
        num_query_groups=shape["num_query_groups"], padded_vocab_size=padded_vocab(shape["vocab"], tp),
        swiglu=shape["swiglu"], normalization=shape["normalization"],
        untie_embeddings_and_output_weights=shape["untie"], add_bias_linear=not shape["swiglu"],
        num_experts=None, moe_shared_expert_intermediate_size=None, moe_layer_freq=1, moe_ffn_hidden_size=None,
        moe_latent_size=None, moe_router_topk=2, mtp_num_layers=None, multi_latent_attention=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=v if v > 1 else None, data_parallel_size=dp,
        world_size=tp * pp * dp, expert_tensor_parallel_size=1, expert_model_parallel_size=1,
        use_distributed_optimizer=distopt, sequence_parallel=sp,
        recompute_granularity=None if recompute == "none" else recompute,
        seq_length=seq, micro_batch_size=micro_batch,
    )


def evaluate(module) -> list[dict]:
    rows = []
    for name, model, tp, pp, v, dp, sp, recompute, distopt, seq, mb, m in PANEL:
        fields = (model, tp, pp, v, dp, sp, recompute, distopt, seq, mb)
        # a fresh namespace per call: the functions set fields on it (num_query_groups)
        weights = module.compute_weight_and_optimizer_memory(megatron_args(*fields))
        with_sp = module.compute_activation_memory(megatron_args(*fields), num_microbatches=m)
        without_sp = module.compute_activation_memory_without_sp(megatron_args(*fields), num_microbatches=m)
        report = module.report_theoretical_memory(megatron_args(*fields), num_microbatches=m)
        rows.append({
            "name": name,
            "setup": {"model": model, "num_gpus": tp * pp * dp, "tensor_parallel": tp, "pipeline_parallel": pp,
                      "virtual_stages": v, "sequence_parallel": sp, "checkpointing": recompute,
                      "zero": 1 if distopt else 0, "seq_len": seq, "micro_batch": mb, "grad_accum": m},
            "padded_vocab_size": padded_vocab(SHAPES[model]["vocab"], tp),
            "weight_and_optimizer_bytes": weights,
            "activation_bytes_with_sp": with_sp,
            "activation_bytes_without_sp": without_sp,
            "report_branch": "with_sp" if (sp and recompute == "selective") else "without_sp",
            "report_mb": {"weight_and_optimizer": report[0], "activation": report[1], "total": report[2]},
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("/work/.mirror/NVIDIA+Megatron-LM/repo"))
    args = parser.parse_args()
    module = load_theoretical(args.repo)
    payload = {
        "source": f"NVIDIA/Megatron-LM {FILE} at {COMMIT}, loaded from git objects and evaluated by "
                  "benchmarks/megatron_theoretical_oracle.py",
        "commit": COMMIT, "file": FILE, "vocab_divisible_by": VOCAB_DIVISIBLE_BY,
        "gpt3_175b_like_config": GPT3_175B_CONFIG, "shapes": SHAPES, "rows": evaluate(module),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=1) + "\n")
    gib = 1024**3
    print("| config | weights+optimizer GiB | activations GiB (report's branch) |\n|---|---|---|")
    for row in payload["rows"]:
        act = row["activation_bytes_with_sp"] if row["report_branch"] == "with_sp" else row["activation_bytes_without_sp"]
        print(f"| {row['name']} | {row['weight_and_optimizer_bytes'] / gib:.2f} | {act / gib:.2f} ({row['report_branch']}) |")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
