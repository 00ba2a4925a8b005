"""Oracle for ``planner.cost.memory.zero_buffers``: DeepSpeed's own ZeRO code run on the CPU accelerator.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero_oracle_cpu.py STAGE REDUCE_BUCKET '{json zero keys}'
    (LAYERS=12 for the 12-layer model; without torchrun it runs one rank)
    LORA=8 ... : peft LoRA of rank 8 on q,k,v,o,gate,up,down (``peft.get_peft_model`` on the built model,
    before ``deepspeed.initialize``, as a Hugging Face Trainer run does; under ZeRO-3 the base model is
    built inside ``deepspeed.zero.Init`` as ``from_pretrained`` does), DORA=1 for DoRA, ADAPTER_DTYPE=base
    for ``autocast_adapter_dtype=False`` (adapters in the base layer's dtype, not peft's fp32);
    QLORA=1 with LORA: the decoder's linears in bitsandbytes NF4 first (``_quantize_linears``, stage 1/2);
    PRECISION=bf16 (default), fp16 or fp32 (no "bf16"/"fp16" block: DeepSpeed trains in fp32).

A small Llama (hidden 256, intermediate 768, 4 heads, vocabulary 8192, untied, LAYERS layers) trains
three steps (batch 1 x 128 tokens, bf16, torch AdamW) under ``deepspeed.initialize``; PyTorch's
``MemTracker`` (module hooks off: DeepSpeed re-enters modules) records the peak bytes of the CPU tensors
live in each phase of the third step (forward, backward, optimizer), every DeepSpeed buffer included.
The numbers it printed are in ``tests/test_zero_buffers.py`` (ZERO_ORACLE; the LoRA, DoRA, QLoRA and
precision runs in ZERO_ORACLE_LORA). Every phase also holds the previous step's output, still bound to ``out``
(logits, transformers' KV cache, ids: ``tests/test_zero_lora.py`` ``leftover_bytes``). Needs torch,
transformers and deepspeed (peft and bitsandbytes for the adapter modes); the planner's analytic path never
imports this file. fp16 does not run on DeepSpeed's CPU accelerator.
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


def _peft(model, rank: int, dora: bool):
    """peft LoRA on the seven projections of each layer (alpha 2 x rank; peft's defaults otherwise:
    dropout 0, ``autocast_adapter_dtype=True`` unless ADAPTER_DTYPE=base)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import torchao as lora_torchao

    lora_torchao.is_torchao_available = lambda: False  # peft refuses the installed torchao 0.11 (unused here)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=dora)
    return get_peft_model(model, config, autocast_adapter_dtype=os.environ.get("ADAPTER_DTYPE") != "base")


def _quantize_linears(model):
    """What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double
    quantization, compute dtype bf16), dtype=bf16)`` makes of the model: every ``nn.Linear`` but the head a
    ``bitsandbytes.nn.Linear4bit`` (uint8 storage), quantized on the CPU; the rest bf16."""
    import bitsandbytes as bnb

    model = model.to(torch.bfloat16)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                    compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
            new.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True)._quantize("cpu")
            setattr(parent, name, new)
    model.is_loaded_in_4bit = True  # what peft reads to dispatch its bitsandbytes LoRA layer
    return model


def _facts(module) -> dict:
    """What DeepSpeed made of the parameters: dtypes and elements of the trainable and frozen ones, and
    (ZeRO-3) the elements this rank holds of each (``ds_tensor``)."""
    facts = {}
    for kind, trainable in (("trainable", True), ("frozen", False)):
        ps = [p for p in module.parameters() if p.requires_grad == trainable]
        held = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in ps]
        facts[kind] = {"elems": sum(getattr(p, "ds_numel", p.numel()) for p in ps),
                       "held_elems": sum(t.numel() for t in held), "held_bytes": sum(t.numel() * t.element_size()
                                                                                     for t in held),
                       "dtypes": sorted({str(t.dtype) for t in held})}
    return facts


def main() -> None:
    deepspeed.utils.logger.setLevel(logging.ERROR)
    stage, reduce_bucket = int(sys.argv[1]), float(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    model_config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=int(os.environ.get("LAYERS", "4")),
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False,
                               max_position_embeddings=512)
    torch.manual_seed(0)
    precision = os.environ.get("PRECISION", "bf16")
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": reduce_bucket,
            "allgather_bucket_size": reduce_bucket, **extra}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": zero, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True, "adam_w_mode": True}}}
    if precision != "fp32":  # fp16: DeepSpeed's dynamic loss scaler (its defaults)
        config[precision] = {"enabled": True}
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
            # what TrainingArguments does: transformers' and peft's is_deepspeed_zero3_enabled() answer True
            # (peft then gathers a base weight it reads, e.g. DoRA's weight norm)
            from transformers.integrations import HfDeepSpeedConfig

            hf_deepspeed_config = HfDeepSpeedConfig(config)  # noqa: F841 (kept alive: transformers holds a weakref)
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = LlamaForCausalLM(model_config)
        else:
            model = LlamaForCausalLM(model_config)
        if os.environ.get("QLORA"):
            model = _quantize_linears(model)
        if os.environ.get("LORA"):
            model = _peft(model, int(os.environ["LORA"]), bool(os.environ.get("DORA")))
        # the Trainer's optimizer groups hold the parameters that require gradients
        engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                               model_parameters=[p for p in model.parameters() if p.requires_grad])
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(_facts(engine.module)), file=sys.stderr, flush=True)
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
        print(json.dumps({"world": int(os.environ["WORLD_SIZE"]), "stage": stage, "reduce": reduce_bucket,
                          "lora": int(os.environ.get("LORA", "0")), "dora": bool(os.environ.get("DORA")),
                          "qlora": bool(os.environ.get("QLORA")),
                          "precision": precision, **third}))


if __name__ == "__main__":
    main()
