"""What torch.compile keeps for backward in torchtune's layers, eager vs compiled (bytes per token and layer).

    python benchmarks/torchtune_compile_saved.py [model] [method] [backend]
    # defaults: llama-3.2-1b full aot_eager_decomp_partition; backend "none" = eager

MemTracker cannot measure a compiled model (Dynamo runs frames eagerly while a TorchDispatchMode
is active) and Inductor segfaults on fake tensors here, so this counts the storages saved for
backward with ``torch.autograd.graph.saved_tensors_hooks`` alone, on torchtune's fake-tensor model
(3 layers, 1 x 256 tokens), each layer compiled as ``training.compile_model`` does (per layer),
with ``aot_eager_decomp_partition``: Inductor's decompositions and min-cut partitioner without its
code generation. Parameters and buffers are not counted. See ``benchmarks/torchtune_inventory.md``.
"""

from __future__ import annotations

import sys
from collections import Counter


def saved_bytes_per_layer(model_name: str, method: str, backend: str, tokens: int = 256) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from planner.specs.catalog import load_model_config
    from planner.specs.setup import TrainingSetup
    from planner.truth.torchtune_model import torchtune_fake_model

    fake_mode = FakeTensorMode()
    model = torchtune_fake_model(fake_mode, load_model_config(model_name)[0],
                                 TrainingSetup(micro_batch=1, seq_len=tokens, method=method), 3, [])
    current: list = [None]
    for i, layer in enumerate(model.layers):
        if backend != "none":
            layer.compile(backend=backend)
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    seen: set[int] = set()
    per_layer: Counter = Counter()

    def pack(t):
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # NF4 weights (a tensor subclass): parameters
            return t
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            per_layer[current[0]] += storage.nbytes()
        return t

    with fake_mode:
        for p in [*model.parameters(), *model.buffers()]:
            try:
                seen.add(p.untyped_storage()._cdata)
            except (NotImplementedError, RuntimeError):
                pass
        ids = torch.randint(0, 1000, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids)
    return {("head" if k is None else f"layer {k}"): v / tokens for k, v in sorted(per_layer.items(), key=str)}


if __name__ == "__main__":
    args = sys.argv[1:] + ["llama-3.2-1b", "full", "aot_eager_decomp_partition"][len(sys.argv) - 1:]
    print(args, saved_bytes_per_layer(*args[:3]))
