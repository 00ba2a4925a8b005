"""Host seconds per DeepSpeed ZeRO-3 module fetch, measured on this machine: the prior of the time
model's ``zero3_s_per_module_visit.hf`` (``planner.cost.timing.grounding``).

    DS_ACCELERATOR=cpu .venv/bin/torchrun --nproc_per_node 1 benchmarks/zero3_hook_cpu.py [--layers 32] [--lora]
    DS_ACCELERATOR=cuda torchrun --nproc_per_node 1 benchmarks/zero3_hook_cpu.py --layers 32   (a GPU host)

One process (no collective crosses a wire), a small HF Llama (hidden 64: its matmuls take microseconds),
bf16, HF's gradient checkpointing, the bucket sizes transformers' ``"auto"`` fills; ``--lora``: peft LoRA
r=16 on every linear. The same optimizer steps are timed under ZeRO-3 and under ZeRO-2, whose engine has
no per-module hooks, each on two fresh engines after two warm-up steps. The difference over the number of
``fetch_sub_module`` calls (counted in a separate step) is ZeRO-3's extra host cost per counted fetch: the
coordinator's gather, prefetch and release bookkeeping, its per-module autograd functions, its gradient
partitioning and partitioned optimizer step, the quantity the time model prices per fetch. A faster or
slower host core scales it; on a GPU host the same calls also record and wait on CUDA events
(``DS_ACCELERATOR=cuda``, NCCL, one GPU, measures that host's own cost). Prints one JSON line. Needs
torch, transformers, peft and deepspeed; the planner's analytic path never imports this file.
"""

import argparse
import json
import logging
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, TOKENS, GRAD_ACCUM, WARMUP_STEPS = 64, 192, 512, 16, 4, 2


def engine(stage: int, layers: int, lora: bool):
    import deepspeed
    import peft  # noqa: F401  (imported before zero.Init patches Parameter.__new__)
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
    if stage == 3:  # transformers builds under zero.Init; peft wraps the model afterwards
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = LlamaForCausalLM(llama)
    else:
        model = LlamaForCausalLM(llama)
    if lora:
        from comm_oracle_cpu import _lora  # the oracle's peft wrapper (benchmarks/ is on the script's path)

        model = _lora(model)
    model.gradient_checkpointing_enable()
    if lora:
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    eng, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=params)
    return eng


def run_steps(eng, steps: int) -> float:
    """Seconds of ``steps`` optimizer steps of ``GRAD_ACCUM`` micro-batches each."""
    ids = torch.randint(0, VOCAB, (1, TOKENS), device=eng.device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(GRAD_ACCUM):
            eng.backward(eng(input_ids=ids, labels=ids).loss)
            eng.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def step_seconds(stage: int, layers: int, lora: bool, steps: int) -> float:
    """The faster of two fresh engines' seconds per step, each timed after ``WARMUP_STEPS`` steps."""
    best = float("inf")
    for _ in range(2):
        eng = engine(stage, layers, lora)
        run_steps(eng, WARMUP_STEPS)
        best = min(best, run_steps(eng, steps) / steps)
    return best


def fetches_per_step(layers: int, lora: bool) -> int:
    """``fetch_sub_module`` calls of one step (after a warm-up step), counted by wrapping the coordinator's
    method for that step only."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator as Coordinator,
    )

    eng = engine(3, layers, lora)
    run_steps(eng, 1)
    calls: list = []
    fetch = Coordinator.fetch_sub_module

    def counted(self, *args, **kwargs):
        calls.append(1)
        return fetch(self, *args, **kwargs)

    Coordinator.fetch_sub_module = counted
    try:
        run_steps(eng, 1)
    finally:
        Coordinator.fetch_sub_module = fetch
    return len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lora", action="store_true", help="peft LoRA r=16 on every linear")
    args = parser.parse_args()
    torch.set_num_threads(1)
    zero2 = step_seconds(2, args.layers, args.lora, args.steps)
    zero3 = step_seconds(3, args.layers, args.lora, args.steps)
    fetches = fetches_per_step(args.layers, args.lora)
    import deepspeed
    import peft
    import transformers

    print(json.dumps({
        "accelerator": os.environ["DS_ACCELERATOR"], "layers": args.layers, "lora": args.lora,
        "fetches_per_step": fetches, "zero2_step_s": zero2, "zero3_step_s": zero3,
        "host_s_per_fetch": (zero3 - zero2) / fetches,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
