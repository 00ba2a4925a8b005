"""What torchtitan 0.3.0's own Llama 3 model keeps per token and layer, traced on fake CPU tensors.

    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py [--compile [--sac]] [--float8 RECIPE]
    PYTHONPATH=/tmp/ttdeps:/tmp/tt_dl/x python benchmarks/torchtitan_oracle.py --loss

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

``--float8 RECIPE`` (tensorwise, rowwise, rowwise_with_gw_hp): every block linear becomes torchtitan's
``Float8Linear`` with torchao 0.11's ``Float8LinearConfig.from_recipe_name(RECIPE)``, as
``Float8LinearConverter.convert`` does with ``filter_fqns=["lm_head"]`` (torchtitan's configs keep the
head in bf16; the converter itself only checks the GPU, which is bypassed here: on fake CPU tensors
``torch._scaled_mm`` runs its meta kernel). Per AC mode it prints the per-token bytes and the bytes
that do not grow with the tokens (the slope and intercept of 512 and 1024 tokens); with
``--compile`` the compiled block's saved set. ``--loss``: bytes per token the cross-entropy saves,
eager and compiled (``torch.compile``, as torchtitan's ``BaseLoss._maybe_compile``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

FLAVORS = {"8B": {}, "13B-like": {"dim": 5120, "n_heads": 40, "n_kv_heads": None, "hidden_dim": 13824,
                                 "vocab_size": 32000}}
"""Traced shapes: torchtitan's Llama 3 8B (GQA, 128k vocabulary) and a Llama-2-13B-shaped MHA model
built with torchtitan's own ``_build_llama3_layers``."""


def model_config(flavor: str, num_layers: int, seq_len: int, recipe: str | None = None):
    """torchtitan's Llama 3 config, cut to ``num_layers``; ``recipe``: its block linears in float8."""
    cfg = _model_config(flavor, num_layers, seq_len)
    return cfg if recipe is None else convert_float8(cfg, recipe)


def convert_float8(cfg, recipe: str, filter_fqns: tuple[str, ...] = ("lm_head",)):
    """``Float8LinearConverter.convert`` (torchtitan 0.3.0) with any torchao recipe."""
    from torchao.float8 import Float8LinearConfig
    from torchtitan.components.quantization.float8 import Float8Linear
    from torchtitan.components.quantization.utils import module_filter_fn
    from torchtitan.models.common.linear import Linear

    torchao_config = Float8LinearConfig.from_recipe_name(recipe)
    for fqn, linear, parent, attr in cfg.traverse(Linear.Config):
        if module_filter_fn(linear, fqn, list(filter_fqns)):
            new = Float8Linear.Config(in_features=linear.in_features, out_features=linear.out_features,
                                      bias=linear.bias, param_init=linear.param_init, _torchao_config=torchao_config)
            if isinstance(parent, list):
                parent[attr] = new
            else:
                setattr(parent, attr, new)
    return cfg


def _model_config(flavor: str, num_layers: int, seq_len: int):
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


def fake_model(fake_mode, flavor: str, num_layers: int, seq_len: int, ac: str, recipe: str | None = None):
    """torchtitan's model on fake tensors, bf16 parameters, ``ac`` in none/full/selective."""
    import torch

    if recipe is not None:
        import torchao.float8  # noqa: F401  (torchao builds tensors at import: never under the meta device)
    with torch.device("meta"):
        model = model_config(flavor, num_layers, seq_len, recipe).build()
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


def trace(flavor: str, num_layers: int, b: int, s: int, ac: str, recipe: str | None = None) -> dict:
    """Phase peaks (bytes, by category) of one forward + backward of ``Trainer._forward_backward_body``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtitan.components.loss import cross_entropy_loss

    from planner.truth.phase_tracker import phase_tracker_class

    fake_mode = FakeTensorMode()
    model = fake_model(fake_mode, flavor, num_layers, s, ac, recipe)
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


def float8_saved(flavor: str, recipe: str) -> dict:
    """Per AC mode: one block's saved bytes per token and its token-independent bytes (fp8 weights)."""
    out = {}
    for ac in ("none", "full", "selective"):
        layer = {}
        for s in (512, 1024):
            two, four = trace(flavor, 2, 1, s, ac, recipe), trace(flavor, 4, 1, s, ac, recipe)
            layer[s] = (four["forward"]["Activation"] - two["forward"]["Activation"]) / 2
        slope = (layer[1024] - layer[512]) / 512
        out[ac] = {"per_token": slope, "fixed": layer[512] - 512 * slope}
    return out


def compiled_saved(flavor: str, backend: str = "aot_eager_decomp_partition", s: int = 256,
                   recipe: str | None = None, ac: str = "none") -> dict:
    """Bytes per token each block saves for backward, eager vs compiled (``saved_tensors_hooks``; a
    float8 subclass is counted at its wrapper's size in eager mode, so read float8 from the compiled
    column, where the partitioner has desugared it into plain tensors; with ``ac`` the eager column
    shows only the checkpoint's input, SAC's own cache is not seen by the hooks)."""
    return {mode: _saved_per_block(flavor, mode, s, recipe, ac) for mode in ("none", backend)}


def loss_saved(vocab: int = 128256, s: int = 256) -> dict:
    """Bytes per token ``cross_entropy_loss`` saves for backward on bf16 logits, eager and compiled."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtitan.components.loss import cross_entropy_loss

    out = {}
    for mode in ("eager", "aot_eager_decomp_partition"):
        fn = cross_entropy_loss if mode == "eager" else torch.compile(cross_entropy_loss, backend=mode, fullgraph=True)
        seen, saved = set(), [0]

        def pack(t, seen=seen, saved=saved):
            if t.untyped_storage()._cdata not in seen:
                seen.add(t.untyped_storage()._cdata)
                saved[0] += t.untyped_storage().nbytes()
            return t

        with FakeTensorMode():
            pred = torch.empty(1, s, vocab, dtype=torch.bfloat16, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(pred, torch.randint(0, vocab, (1, s)))
        out[mode] = saved[0] / s
    return out


def recompute_flops(flavor: str, s: int = 256) -> dict:
    """Per AC mode: one block's FLOPs of forward + backward (``FlopCounterMode`` over one step of the model at
    depths 2 and 4, the difference over 2) and, beside none, what the mode reruns; ``sac_matmuls``: the
    forward FLOPs of the block's even-numbered matmuls, ``wo`` and ``w3`` of ``wqkv, wo, w1, w3, w2``, which
    ``SelectiveAC`` recomputes (``_get_custom_policy``: every second mm)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from torchtitan.components.loss import cross_entropy_loss

    def step(ac: str, layers: int) -> float:
        fake_mode = FakeTensorMode()
        model = fake_model(fake_mode, flavor, layers, s, ac)
        with fake_mode, FlopCounterMode(display=False) as counter:
            tokens, labels = torch.randint(0, 1000, (1, s)), torch.randint(0, 1000, (1, s))
            cross_entropy_loss(model(tokens), labels).backward()
        return float(counter.get_total_flops())

    block = {ac: (step(ac, 4) - step(ac, 2)) / 2 for ac in ("none", "selective", "full")}
    dim, hidden = SHAPES[flavor]
    out = {ac: {"block_flops": v, "recompute_flops": v - block["none"]} for ac, v in block.items()}
    out["sac_matmuls"] = 2.0 * s * (dim * dim + dim * hidden)  # wo (dim x dim) and w3 (dim x hidden)
    return out


SHAPES = {"8B": (4096, 14336), "13B-like": (5120, 13824)}
"""(dim, FFN hidden) of the traced flavours."""


def _saved_per_block(flavor: str, mode: str, s: int, recipe: str | None = None, ac: str = "none") -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    model = fake_model(fake_mode, flavor, 2, s, ac, recipe)
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
    recipe = sys.argv[sys.argv.index("--float8") + 1] if "--float8" in sys.argv else None
    if "--loss" in sys.argv:
        print("loss", json.dumps(loss_saved(), indent=1))
        sys.exit(0)
    if "--flops" in sys.argv:
        for name in FLAVORS:
            print(name, json.dumps(recompute_flops(name), indent=1))
        sys.exit(0)
    for name in FLAVORS:
        if "--compile" in sys.argv:
            ac = "selective" if "--sac" in sys.argv else "none"
            print(name, json.dumps(compiled_saved(name, recipe=recipe, ac=ac), indent=1))
        elif recipe:
            print(name, json.dumps(float8_saved(name, recipe), indent=1))
        else:
            print(name, json.dumps(per_token(name), indent=1))
