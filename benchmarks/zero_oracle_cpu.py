"""Oracle for ``planner.cost.memory.zero_buffers``: DeepSpeed's own ZeRO code run on the CPU accelerator.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero_oracle_cpu.py STAGE REDUCE_BUCKET '{json zero keys}'
    (LAYERS=12 for the 12-layer model; without torchrun it runs one rank)

A small Llama (hidden 256, intermediate 768, 4 heads, vocabulary 8192, untied, LAYERS layers) trains
three steps (batch 1 x 128 tokens, bf16, torch AdamW) under ``deepspeed.initialize``; PyTorch's
``MemTracker`` (module hooks off: DeepSpeed re-enters modules) records the peak bytes of the CPU tensors
live in each phase of the third step (forward, backward, optimizer), every DeepSpeed buffer included.
The numbers it printed are in ``tests/test_zero_buffers.py`` (ZERO_ORACLE). Needs torch, transformers
and deepspeed; the planner's analytic path never imports this file.
"""

import copy
import json
import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if "RANK" not in os.environ:  # one rank without torchrun
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29534"), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


class Tracker(MemTracker):
    """MemTracker without its module hooks (DeepSpeed's engine re-enters modules, which they refuse)."""

    def _pre_fw_hook(self, *args, **kwargs):
        pass

    def _post_fw_hook(self, *args, **kwargs):
        pass

    def _pre_bw_hook(self, *args, **kwargs):
        pass

    def _post_bw_hook(self, *args, **kwargs):
        pass


def _cpu_bytes(snapshot) -> int:
    return sum(v["Total"] for k, v in snapshot.items() if str(k) == "cpu")


def main() -> None:
    deepspeed.utils.logger.setLevel(logging.ERROR)
    stage, reduce_bucket = int(sys.argv[1]), float(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    model_config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=int(os.environ.get("LAYERS", "4")),
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False,
                               max_position_embeddings=512)
    torch.manual_seed(0)
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": reduce_bucket,
            "allgather_bucket_size": reduce_bucket, **extra}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": zero, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "adam_w_mode": True}}}
    tracker, phases = Tracker(), {}

    def mark(name: str) -> None:
        """The peak since the previous mark, then restart the peak from what is live now."""
        phases[name] = _cpu_bytes(tracker.get_tracker_snapshot("peak"))
        tracker._peak_mem_snap = copy.deepcopy(tracker._curr_mem_snap)
        tracker._peak_mem = {d: v["Total"] for d, v in tracker._curr_mem_snap.items()}

    if os.environ.get("STEP_PROBE"):  # stage 1/2: live and peak bytes when the inner optimizer step starts
        from deepspeed.runtime.zero import stage_1_and_2 as s12

        inner = s12.DeepSpeedZeroOptimizer._optimizer_step

        def probed(self, i):
            peak = max(v for k, v in tracker._peak_mem.items() if str(k) == "cpu")
            live = _cpu_bytes(tracker.get_tracker_snapshot("current"))
            print(f"inner step: live {live / 1e6:.2f} MB, phase peak so far {peak / 1e6:.2f} MB", flush=True)
            return inner(self, i)

        s12.DeepSpeedZeroOptimizer._optimizer_step = probed
    with tracker:
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = LlamaForCausalLM(model_config)
        else:
            model = LlamaForCausalLM(model_config)
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        ids = torch.randint(0, 8192, (1, 128))
        for step in range(3):
            mark(f"before{step}")
            if step == 2 and os.environ.get("STEP_PROBE"):
                print(f"step start: live {_cpu_bytes(tracker.get_tracker_snapshot('current')) / 1e6:.2f} MB")
            out = engine(input_ids=ids, labels=ids)
            mark(f"forward{step}")
            engine.backward(out.loss)
            mark(f"backward{step}")
            engine.step()
            mark(f"optimizer{step}")
    if int(os.environ["RANK"]) == 0:
        third = {k[:-1]: v for k, v in phases.items() if k.endswith("2")}
        print(json.dumps({"world": int(os.environ["WORLD_SIZE"]), "stage": stage, "reduce": reduce_bucket, **third}))


if __name__ == "__main__":
    main()
