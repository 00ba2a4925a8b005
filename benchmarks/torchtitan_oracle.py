"""What torchtitan 0.3.0's own Llama 3 model keeps per token and layer, traced on fake CPU tensors.

    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py [--compile]

torchtitan is not a dependency of the planner (CI cannot install it): unzip the 0.3.0 wheel at
``/tmp/tt_dl/x`` and install its light imports into a scratch folder, never the project venv::

    pip install --no-deps --target /tmp/ttdeps spmd_types==0.2.3 torch_checkpointing tyro einops \
        docstring-parser triton

The model is torchtitan's ``llama3_configs[flavor](attn_backend="sdpa")`` with its layers cut to
``n`` and RoPE resized to the sequence (``Decoder.Config.update_from_config``), built on the meta
device, then every parameter and buffer swapped for a fake tensor: parameters in bf16 (what
FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` hands the forward: bf16 compute, no autocast),
RoPE's complex64 cache as built. Activation checkpointing is torchtitan's own ``FullAC`` /
``SelectiveAC`` wrappers (``distributed/activation_checkpoint.py``), applied per block as
``ActivationCheckpointing.apply`` does; for op-SAC the CPU flash kernel is added to the save set
(``SelectiveAC.get_save_ops`` is meant to be overridden) because torchtitan's list names the CUDA
SDPA kernels only. One step of ``Trainer._forward_backward_body`` with ``CrossEntropyLoss``
(``components/loss.py: cross_entropy_loss``, sum reduction, ``.float()`` logits) runs under
``planner.truth.phase_tracker``; FSDP2's sharding, fp32 master shards and the optimizer are
priced by formula on top (``planner.cost.memory.torchtitan_tensors``), not traced.

Per-layer bytes per token are the difference of two depths (2 and 4 layers); the head's and the
loss's are what remains. ``--compile``: bytes each block saves under ``torch.compile``
(``aot_eager_decomp_partition``, counted with ``saved_tensors_hooks`` as
``benchmarks/torchtune_compile_saved.py`` does), torchtitan's ``apply_compile`` compiling each block.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

FLAVORS = {"8B": {}, "13B-like": {"dim": 5120, "n_heads": 40, "n_kv_heads": None, "hidden_dim": 13824,
                                 "vocab_size": 32000}}
"""Traced shapes: torchtitan's Llama 3 8B (GQA, 128k vocabulary) and a Llama-2-13B-shaped MHA model
built with torchtitan's own ``_build_llama3_layers``."""


def model_config(flavor: str, num_layers: int, seq_len: int):
    import torchtitan.models.llama3 as llama3
    from torchtitan.models.common import Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.rope import ComplexRoPE
    from torchtitan.models.llama3 import _build_llama3_layers, llama3_configs
    from torchtitan.models.llama3.model import Llama3Model

    # 0.3.0 refuses "sdpa" for language models (flex, flex_flash or varlen: CUDA kernels); its
    # ScaledDotProductAttention module stands in for them here: each saves q, k, v, the output and
    # an fp32 log-sum-exp per head and token (see stacks_torchtitan.attention_saved_bytes_per_token)
    llama3.get_attention_config = lambda backend: ScaledDotProductAttention.Config()

    if flavor == "8B":
        cfg = llama3_configs["8B"](attn_backend="sdpa")
        cfg.layers = cfg.layers[:num_layers]
        for layer in cfg.layers:
            layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=seq_len)
        return cfg
    d = FLAVORS[flavor]
    dim, vocab = d["dim"], d["vocab_size"]
    return Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim), lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=_build_llama3_layers(n_layers=num_layers, dim=dim, n_heads=d["n_heads"], n_kv_heads=d["n_kv_heads"],
                                    hidden_dim=d["hidden_dim"], fuse_qkv=True, attn_backend="sdpa",
                                    rope=ComplexRoPE.Config(dim=dim // d["n_heads"], max_seq_len=seq_len)))


def fake_model(fake_mode, flavor: str, num_layers: int, seq_len: int, ac: str):
    """torchtitan's model on fake tensors, bf16 parameters, ``ac`` in none/full/selective."""
    import torch

    with torch.device("meta"):
        model = model_config(flavor, num_layers, seq_len).build()
    replaced: dict[int, torch.Tensor] = {}
    with fake_mode:
        for module in model.modules():
            for store, dtype in ((module._parameters, torch.bfloat16), (module._buffers, None)):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    if id(t) not in replaced:
                        new = torch.empty(t.shape, dtype=dtype or t.dtype)
                        replaced[id(t)] = torch.nn.Parameter(new) if store is module._parameters else new
                    store[name] = replaced[id(t)]
    _apply_ac(model, ac)
    return model


def _apply_ac(model, ac: str) -> None:
    import torch
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    class CpuSelectiveAC(SelectiveAC):
        def get_save_ops(self):  # the CPU twin of the CUDA flash kernel torchtitan saves
            return super().get_save_ops() | {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    if ac == "full":
        FullAC(FullAC.Config()).apply(model)
    elif ac == "selective":
        CpuSelectiveAC(SelectiveAC.Config()).apply(model)


def trace(flavor: str, num_layers: int, b: int, s: int, ac: str) -> dict:
    """Phase peaks (bytes, by category) of one forward + backward of ``Trainer._forward_backward_body``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtitan.components.loss import cross_entropy_loss

    from planner.truth.phase_tracker import phase_tracker_class

    fake_mode = FakeTensorMode()
    model = fake_model(fake_mode, flavor, num_layers, s, ac)
    tracker = phase_tracker_class()(devices=("cpu",))
    with fake_mode:
        vocab = model.config.vocab_size
        tokens, labels = torch.randint(0, vocab, (b, s)), torch.randint(0, vocab, (b, s))
        tracker.track_external(model, tokens, labels)
        with tracker:
            tracker.start_phase("forward")
            pred = model(tokens)
            loss = cross_entropy_loss(pred, labels)
            del pred
            tracker.start_phase("backward")
            loss.backward()
            tracker.start_phase(None)
    return {p: dict(tracker.phase_peaks[p][1]) for p in ("forward", "backward")}


def per_token(flavor: str, b: int = 1, s: int = 512) -> dict:
    """Bytes per token: one layer's saved set per AC mode, and the rest (embedding output, head,
    logits and loss) at the forward's and the backward's peak, from depths 2 and 4."""
    out = {}
    for ac in ("none", "full", "selective"):
        two, four = trace(flavor, 2, b, s, ac), trace(flavor, 4, b, s, ac)
        layer = (four["forward"]["Activation"] - two["forward"]["Activation"]) / 2 / (b * s)
        out[ac] = {
            "layer_saved": layer,
            "forward_rest": (two["forward"]["Activation"] - 2 * layer * b * s) / (b * s),
            "backward_peak_minus_params_grads": {
                n: (t["backward"]["Total"] - t["backward"]["Parameter"] - t["backward"]["Buffer"]
                    - t["backward"]["Gradient"]) / (b * s) for n, t in (("2", two), ("4", four))},
        }
    return out


def compiled_saved(flavor: str, backend: str = "aot_eager_decomp_partition", s: int = 256) -> dict:
    """Bytes per token each block saves for backward, eager vs compiled (``saved_tensors_hooks``)."""
    return {mode: _saved_per_block(flavor, mode, s) for mode in ("none", backend)}


def _saved_per_block(flavor: str, mode: str, s: int) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    model = fake_model(fake_mode, flavor, 2, s, "none")
    current: list = [None]
    for i, block in enumerate(model.layers.values()):
        if mode != "none":
            block.compile(backend=mode, fullgraph=True)
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    seen, saved = set(), Counter()

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            saved[current[0]] += storage.nbytes()
        return t

    with fake_mode:
        for p in [*model.parameters(), *model.buffers()]:
            seen.add(p.untyped_storage()._cdata)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 1000, (1, s)))
    return {("head" if k is None else f"layer {k}"): v / s for k, v in sorted(saved.items(), key=str)}


if __name__ == "__main__":
    import json

    import torch

    print("torch", torch.__version__)
    for name in FLAVORS:
        if "--compile" in sys.argv:
            print(name, json.dumps(compiled_saved(name), indent=1))
        else:
            print(name, json.dumps(per_token(name), indent=1))
