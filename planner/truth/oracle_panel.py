"""The oracle panel: configurations on which the analytic model is checked against PyTorch's
own accounting (``planner.truth.trace``) in ``tests/test_oracle.py`` and ``benchmarks/bench_accuracy.py``.

Real catalog configs with layers reduced (memory is linear in layers beyond the embeddings and
the head), covering multi-head, grouped- and multi-query attention, gated and plain MLPs, tied
and untied embeddings, mixtures of experts, decoupled head_dim, parallel residual, every
precision, full / LoRA fine-tuning, the optimizers and the checkpointing modes PyTorch can run
on fake tensors, QLoRA and 8-bit AdamW included (bitsandbytes >= 0.49 has fake-tensor kernels).
Dropout is off but in one eager case: with dropout CPU's SDPA falls back to the math path (CUDA's
flash kernel keeps no mask), and CPU keeps masks in the compute dtype (CUDA: bool), which the
analytic model reproduces with device="cpu".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PanelCase:
    model: str
    num_layers: int
    setup: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        s = self.setup
        parts = [s.get("method", "full"), s.get("precision", "bf16"), s.get("optimizer", "adamw")]
        if s.get("optimizer_impl"):
            parts.append(s["optimizer_impl"])
        if s.get("checkpointing", "none") != "none":
            parts.append(f"ckpt-{s['checkpointing']}")
        if s.get("attention") == "eager":
            parts.append("eager")
        if s.get("dropout"):
            parts.append(f"dropout{s['dropout']}")
        if s.get("lora_targets"):
            parts.append("+".join(s["lora_targets"]))
        parts.append(f"b{s.get('micro_batch', 1)}s{s.get('seq_len', 2048)}")
        if s.get("modules_to_save"):
            parts.append("save-" + "+".join(s["modules_to_save"]))
        if s.get("adapter_dtype") == "base":
            parts.append("adapters-base-dtype")
        if s.get("dora"):
            parts.append("dora")
        if s.get("kbit_preparation"):
            parts.append("kbit-prep")
        if s.get("float8"):
            parts.append("float8")
        for key, word in (("stack", None), ("loss_impl", "loss"), ("optimizer_in_backward", "opt-in-bwd"),
                          ("activation_offload", "offload"), ("packed", "packed"), ("grad_accum", "ga")):
            value = s.get(key)
            if value is True or (value and value not in ("hf", "standard", 1)):  # True == 1 in a tuple test
                parts.append(str(value) if word is None else (word if value is True else f"{word}-{value}"))
        return f"{self.model}/{self.num_layers}L " + " ".join(parts)


def _case(model: str, layers: int, **setup) -> PanelCase:
    return PanelCase(model, layers, {"dropout": 0.0, **setup})


PANEL: tuple[PanelCase, ...] = (
    # multi-head attention, plain GELU MLP, learned positions, tied head (GPT-2)
    _case("gpt2", 4, micro_batch=4, seq_len=512),
    _case("gpt2", 4, precision="fp32", micro_batch=4, seq_len=512),
    _case("gpt2", 4, precision="bf16-mixed", micro_batch=2, seq_len=512, checkpointing="full"),
    # grouped-query, gated MLP, tied embeddings (Llama-3.2-1B)
    _case("llama-3.2-1b", 2, precision="bf16-mixed", micro_batch=2, seq_len=1024),
    _case("llama-3.2-1b", 2, method="lora", micro_batch=2, seq_len=1024),
    _case("llama-3.2-1b", 2, micro_batch=2, seq_len=1024, checkpointing="selective"),
    # gradient accumulation: the tied table's .grad of the first micro-batch beside the second's three (end of backward)
    _case("llama-3.2-1b", 2, micro_batch=1, seq_len=256, grad_accum=2),
    _case("llama-3.2-1b", 2, micro_batch=1, seq_len=512, attention="eager"),
    # attention dropout in eager attention (CPU keeps the mask in the compute dtype: device="cpu")
    _case("llama-3.2-1b", 2, micro_batch=2, seq_len=1024, attention="eager", dropout=0.1),
    # Qwen2.5: q/k/v biases, 151k vocabulary (logits dominate)
    _case("qwen2.5-0.5b", 2, micro_batch=2, seq_len=512, checkpointing="full"),
    _case("qwen2.5-0.5b", 2, method="lora", lora_targets=("q_proj", "v_proj"), micro_batch=2, seq_len=512),
    _case("qwen2.5-0.5b", 2, optimizer="adamw", optimizer_impl="fused", micro_batch=1, seq_len=256),
    # Qwen3: per-head q/k norms, head_dim decoupled from hidden/heads
    _case("qwen3-0.6b", 2, micro_batch=2, seq_len=1024),
    _case("qwen3-0.6b", 2, optimizer="adafactor", micro_batch=1, seq_len=512),
    # Gemma-2: 4 norms per layer, soft-capping, eager attention (transformers refuses SDPA)
    _case("gemma-2-2b", 2, attention="eager", micro_batch=1, seq_len=512),
    # Gemma (multi-query attention, head_dim 256), SGD with momentum
    _case("gemma-2b", 2, optimizer="sgd", micro_batch=2, seq_len=512),
    _case("gemma-3-1b-it", 2, method="lora", micro_batch=2, seq_len=1024),
    # Phi-2: parallel residual, one LayerNorm, biased projections, Python GELU
    _case("phi-2", 2, micro_batch=2, seq_len=1024),
    _case("phi-2", 2, precision="fp32", optimizer="lion", micro_batch=1, seq_len=512),
    # Phi-3: fused qkv and gate_up projections
    _case("phi-3-mini-4k-instruct", 2, method="lora", micro_batch=2, seq_len=1024),
    # Mistral / Llama-2: a 7B layer at long sequence
    _case("mistral-7b-v0.3", 2, method="lora", micro_batch=1, seq_len=4096),
    _case("llama-2-7b", 2, precision="fp32", optimizer_impl="for-loop", micro_batch=1, seq_len=1024),
    # mixtures of experts
    # attention-only LoRA (frozen experts keep no down-projection input); expert LoRA below
    _case("mixtral-8x7b", 2, method="lora", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
          micro_batch=1, seq_len=1024),
    _case("qwen3-30b-a3b", 2, micro_batch=1, seq_len=1024),
    _case("qwen1.5-moe-a2.7b-chat", 2, micro_batch=1, seq_len=1024),
    # bitsandbytes (fake-tensor kernels): QLoRA (NF4, double quantization) and 8-bit AdamW
    _case("llama-3.2-1b", 2, method="qlora", micro_batch=2, seq_len=1024),
    _case("qwen3-8b", 2, method="qlora", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), micro_batch=1, seq_len=2048),
    _case("qwen3-0.6b", 2, optimizer="adamw-8bit", micro_batch=1, seq_len=512),
    _case("llama-3.1-8b", 2, precision="bf16-mixed", optimizer="adamw-8bit", micro_batch=1, seq_len=1024),
    # a whole small model, every layer
    _case("smollm2-135m-instruct", 30, precision="bf16-mixed", micro_batch=2, seq_len=1024),
    # adapters in the base dtype (peft autocast_adapter_dtype=False), issue 10
    _case("llama-3.2-1b", 2, method="lora", adapter_dtype="base", micro_batch=2, seq_len=1024),
    _case("qwen2.5-0.5b", 2, method="lora", adapter_dtype="base", lora_targets=("q_proj", "v_proj", "down_proj"),
          lora_dropout=0.05, micro_batch=2, seq_len=1024),
    # peft modules_to_save: trained copies of the head and the embedding beside LoRA, issue 10
    _case("llama-3.1-8b", 2, method="lora", modules_to_save=("lm_head",), micro_batch=2, seq_len=512),
    _case("qwen2.5-0.5b", 2, method="lora", modules_to_save=("embed_tokens", "lm_head"), micro_batch=2, seq_len=512),
    # peft DoRA (use_dora): magnitude vectors, saved base and LoRA outputs (planner.cost.memory.dora), issue 10
    _case("llama-3.2-1b", 2, method="lora", dora=True, lora_targets=("q_proj", "v_proj"), micro_batch=2, seq_len=512),
    _case("qwen2.5-0.5b", 2, method="lora", dora=True, lora_targets=("all-linear",), micro_batch=2, seq_len=512),
    # peft prepare_model_for_kbit_training before QLoRA: fp32 embeddings, norms and head; under bf16 autocast
    # (HF Trainer bf16=True) and without it (fp32 activations end to end), issue 10
    _case("llama-3.2-1b", 2, method="qlora", kbit_preparation=True, precision="bf16-mixed", micro_batch=2, seq_len=512),
    # with checkpointing and down_proj adapted the non-reentrant recompute runs the down projection (its adapter saves
    # after it), and transformers' checkpointing makes the first layer's input need a gradient (planner.cost.flops)
    _case("llama-3.2-1b", 2, method="qlora", kbit_preparation=True, precision="bf16-mixed", checkpointing="full",
          micro_batch=2, seq_len=1024),
    _case("qwen2.5-0.5b", 2, method="qlora", kbit_preparation=True, checkpointing="full", micro_batch=2, seq_len=1024),
    _case("qwen3-0.6b", 2, method="qlora", kbit_preparation=True, micro_batch=2, seq_len=512),
    # GaLore (galore_torch GaLoreAdamW, attn/mlp linears projected; planner.cost.memory.galore), issue 10: fp32 keeps
    # the SVD factor behind the projection (a view), bf16 a compact copy; a projection-update step's SVD is the peak
    _case("llama-2-7b", 2, precision="fp32", optimizer="galore-adamw", micro_batch=1, seq_len=512),
    _case("phi-3-mini-4k-instruct", 2, optimizer="galore-adamw", galore_rank=64, micro_batch=1, seq_len=512),
    _case("qwen2.5-0.5b", 2, precision="bf16-mixed", optimizer="galore-adamw", micro_batch=2, seq_len=512),
    # torchao float8 (convert_to_float8_training, tensorwise, head in bf16; planner.truth.float8_model and
    # planner.cost.memory.float8), issue 10: each linear's fp8 weight copy is kept for backward; op-SAC recomputes it
    _case("llama-3.2-1b", 2, precision="bf16", float8=True, micro_batch=2, seq_len=1024),
    _case("qwen2.5-0.5b", 2, precision="bf16", float8=True, checkpointing="selective", micro_batch=2, seq_len=512),
    # under bf16 autocast the fp8 copy replaces autocast's bf16 weight copy
    _case("llama-3.2-1b", 2, precision="bf16-mixed", float8=True, micro_batch=2, seq_len=1024),
    # full checkpointing: the recompute also runs the last linear's fp8 matmul (its tensors are saved when made)
    _case("llama-3.2-1b", 2, precision="bf16", float8=True, checkpointing="full", micro_batch=2, seq_len=1024),
    # peft 0.21 LoRA on stacked experts (lora.ParamWrapper: merged W' kept, baddbmm fold and its gradient;
    # planner.cost.memory.moe_lora, planner.cost.flops.expert_lora_flops), issue 10
    _case("mixtral-8x7b", 2, method="lora", lora_targets=("all-linear",), micro_batch=1, seq_len=512),
    _case("qwen3-30b-a3b", 2, method="qlora", lora_targets=("all-linear",), micro_batch=1, seq_len=512),
    _case("qwen1.5-moe-a2.7b-chat", 2, method="lora", micro_batch=1, seq_len=512,
          lora_targets=("q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj")),
)


TORCHTUNE_PANEL: list[PanelCase] = [
    # torchtune 0.6.1's own model code (planner.truth.torchtune_step) against planner.cost.memory.torchtune_stack;
    # the set-ups of its single-device recipes, each technique on and off
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=2, seq_len=1024)),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=2, seq_len=1024, loss_impl="chunked")),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=2, seq_len=1024, checkpointing="full",
                                      activation_offload=True)),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=2, seq_len=1024, optimizer="paged-adamw-8bit",
                                      optimizer_in_backward=True, loss_impl="chunked")),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=2, seq_len=1024, packed=True)),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=1, seq_len=512, precision="fp32")),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", micro_batch=1, seq_len=1024, grad_accum=2)),
    PanelCase("llama-3.2-1b", 2, dict(stack="torchtune", method="lora", micro_batch=2, seq_len=512, grad_accum=4,
                                      loss_impl="chunked")),
    PanelCase("qwen2.5-0.5b", 2, dict(stack="torchtune", method="lora", micro_batch=2, seq_len=1024)),
    PanelCase("qwen2.5-1.5b", 3, dict(stack="torchtune", micro_batch=3, seq_len=768, optimizer="adamw-8bit",
                                      loss_impl="chunked", loss_chunks=4, packed=True)),
    PanelCase("llama-3-8b", 2, dict(stack="torchtune", method="lora", micro_batch=1, seq_len=4096, lora_rank=64)),
    PanelCase("llama-3.1-8b", 2, dict(stack="torchtune", method="qlora", micro_batch=1, seq_len=2048,
                                      checkpointing="full", loss_impl="chunked")),
    PanelCase("llama-2-7b", 2, dict(stack="torchtune", method="qlora", micro_batch=4, seq_len=512, checkpointing="full")),
    PanelCase("mistral-7b-v0.3", 2, dict(stack="torchtune", method="qlora", micro_batch=1, seq_len=4096,
                                         checkpointing="full", activation_offload=True, loss_impl="chunked")),
    PanelCase("qwen2.5-7b", 2, dict(stack="torchtune", method="lora", micro_batch=1, seq_len=2048,
                                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), loss_impl="chunked",
                                    loss_chunks=16)),
]
"""The torchtune stack's panel (``tests/test_torchtune_panel.py``); cases below the first seven were
held out while the formulas were written (see benchmarks/README.md)."""
