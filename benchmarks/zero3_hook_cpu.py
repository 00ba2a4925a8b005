"""Host seconds per DeepSpeed ZeRO-3 module fetch, measured on this machine's CPU: the prior of the
time model's ``zero3_s_per_module_visit.hf`` (``planner.cost.timing.grounding``).

    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node 1 benchmarks/zero3_hook_cpu.py [--layers 32]
    DS_ACCELERATOR=cuda torchrun --nproc_per_node 1 benchmarks/zero3_hook_cpu.py --layers 32   (a GPU host)

One process (no collective crosses a wire), a small HF Llama (hidden 64: its matmuls take microseconds),
bf16, HF's gradient checkpointing, the bucket sizes transformers' ``"auto"`` fills: the same optimizer
steps are timed under ZeRO-3 and under ZeRO-2, whose engine has no per-module hooks. The difference over
the number of ``fetch_sub_module`` calls (counted) is what the coordinator's Python costs per module: its
trace, prefetch and release bookkeeping and the gather's launch. On a GPU the same call also records and
waits on CUDA events, so on CPU this is a floor of the host cost there, and a faster or slower host CPU
scales it; with ``DS_ACCELERATOR=cuda`` (NCCL, one GPU) the same difference is a GPU host's own cost.
Prints one JSON line. Needs torch, transformers and deepspeed; the planner's analytic path never imports
this file.
"""

import argparse
import json
import logging
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, TOKENS, GRAD_ACCUM = 64, 192, 512, 16, 4


def engine(stage: int, layers: int):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.utils.logger.setLevel(logging.ERROR)
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": HIDDEN ** 2}
    if stage == 3:  # transformers' "auto" values and HF's example window
        zero.update(stage3_prefetch_bucket_size=int(0.9 * HIDDEN ** 2), stage3_param_persistence_threshold=10 * HIDDEN,
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": GRAD_ACCUM, "bf16": {"enabled": True},
              "zero_optimization": zero, "steps_per_print": 10**9, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "adam_w_mode": True}}}
    deepspeed.init_distributed(dist_backend="gloo" if os.environ["DS_ACCELERATOR"] == "cpu" else "nccl")
    llama = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = LlamaForCausalLM(llama)
    else:
        model = LlamaForCausalLM(llama)
    model.gradient_checkpointing_enable()
    eng, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return eng


def count_fetches() -> list:
    """Wrap ZeRO-3's ``fetch_sub_module`` with a counter (one list append: negligible next to the call)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator as Coordinator,
    )

    calls: list = []
    fetch = Coordinator.fetch_sub_module

    def counted(self, *args, **kwargs):
        calls.append(1)
        return fetch(self, *args, **kwargs)

    Coordinator.fetch_sub_module = counted
    return calls


def timed_steps(eng, steps: int) -> float:
    """Seconds per optimizer step (``GRAD_ACCUM`` micro-batches and the step), after one warm-up step."""
    ids = torch.randint(0, VOCAB, (1, TOKENS), device=eng.device)
    for step in range(steps + 1):
        if step == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
        for _ in range(GRAD_ACCUM):
            eng.backward(eng(input_ids=ids, labels=ids).loss)
            eng.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = min(timed_steps(engine(2, args.layers), args.steps) for _ in range(2))
    calls = count_fetches()
    eng3 = engine(3, args.layers)
    timed_steps(eng3, 1)
    per_step = len(calls) / 2  # the counted run above: a warm-up step and one timed step
    zero3 = min(timed_steps(eng3, args.steps) for _ in range(2))
    import deepspeed
    import transformers

    print(json.dumps({
        "accelerator": os.environ["DS_ACCELERATOR"], "layers": args.layers, "fetches_per_step": per_step, "zero2_step_s": base, "zero3_step_s": zero3,
        "host_s_per_fetch": (zero3 - base) / per_step,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
