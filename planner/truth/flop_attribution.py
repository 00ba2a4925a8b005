"""FLOPs of one micro-batch, counted by PyTorch's ``FlopCounterMode`` and booked per model component.

Owns ``count_training_flops`` (one forward and one backward of the set-up's model on fake
tensors, with eager attention and, for mixture-of-experts models, transformers' ``batched_mm``
experts kernel, since FlopCounterMode counts 0 for CPU flash SDPA and for ``grouped_mm``) and
the attribution of each counted op to a component (``model.embed_tokens``,
``model.layers.0.self_attn``, ``model.layers.0.mlp``, ``lm_head``, ...; ``other`` for what runs
outside them): forward ops by module hooks, backward ops by the autograd node that runs them.
The backward count includes the recompute of activation checkpointing and, for LoRA, no weight
gradients of frozen weights. torch is imported inside functions only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planner.io.progress import NULL_BAR
from planner.truth.fake_tensors import fake_model
from planner.truth.training_model import check_setup, cpu_autocast, has_experts

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

_COMPONENT_KEY = "planner_component"


def count_training_flops(config: dict, setup: TrainingSetup, num_layers: int | None,
                         bar=NULL_BAR) -> tuple[int, int, dict[str, int], list[str]]:
    """(forward FLOPs, backward FLOPs, forward+backward FLOPs per component, notes) of one
    micro-batch of ``setup`` on the model of ``config`` (see the module docstring). ``bar`` (a
    ``planner.io.progress`` bar) advances once after the forward and once after the backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    check_setup(setup)
    notes: list[str] = []
    setup = _setup_counted(setup, notes)
    fake_mode = FakeTensorMode()
    model = fake_model(fake_mode, config, setup, num_layers, attention="eager", experts="batched_mm", notes=notes)
    if has_experts(model):
        notes.append("MoE: FLOPs counted with experts_implementation='batched_mm' (bmm over the "
                     "top-k experts of each token); memory traced with transformers' default grouped_mm")
    by_component, total = _count_forward_backward(model, fake_mode, setup, bar)
    fwd = sum(v for (phase, _), v in by_component.items() if phase == "forward")
    by_module: dict[str, int] = {}
    for (_, comp), v in by_component.items():
        if v:
            by_module[_short(comp)] = by_module.get(_short(comp), 0) + v
    by_module.setdefault("other", 0)
    return fwd, total - fwd, by_module, notes


def _setup_counted(setup: TrainingSetup, notes: list[str]) -> TrainingSetup:
    """The set-up whose model is counted: QLoRA as LoRA (FlopCounterMode cannot see the 4-bit
    matmul), 8-bit AdamW as AdamW (the optimizer does not change FLOPs)."""
    if setup.method == "qlora":
        notes.append("qlora: FLOPs counted on the same model with bf16 LoRA layers (FlopCounterMode does not "
                     "count bitsandbytes' gemm_4bit; the matmul shapes are those of LoRA)")
        setup = setup.model_copy(update={"method": "lora"})
    if setup.optimizer == "adamw-8bit":
        setup = setup.model_copy(update={"optimizer": "adamw"})  # the optimizer does not change FLOPs
    return setup


def _count_forward_backward(model, fake_mode, setup: TrainingSetup, bar) -> tuple[dict[tuple[str, str], int], int]:
    """One forward (loss included) and backward under the attributing counter: its FLOPs per
    (phase, component) and in total."""
    import torch

    def forward():
        b, s = setup.micro_batch, setup.seq_len
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (b, s), dtype=torch.int64)
        with cpu_autocast(setup):
            loss = model(input_ids=ids, labels=ids).loss
        bar.update()
        return loss

    def backward(loss):
        loss.backward()
        bar.update()

    components = {fqn: model.get_submodule(fqn) for fqn in _components(model)}
    return count_step_flops(fake_mode, components, forward, backward)


def count_step_flops(fake_mode, components: dict, forward, backward) -> tuple[dict[tuple[str, str], int], int]:
    """FLOPs per (phase, component) and in total of ``backward(forward())`` run inside ``fake_mode``
    under the attributing counter (``components``: name -> module; see ``_attributing_counter``).
    ``forward`` takes no argument and returns what ``backward`` takes; it runs under the tagging
    mode that books backward ops to components."""
    counter_cls, tag_mode_cls, stack = _attributing_counter(components)
    handles = []
    for name, module in components.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: _pop(stack, name)))
    try:
        with fake_mode:
            counter = counter_cls(display=False)
            with counter:
                with tag_mode_cls():
                    out = forward()
                backward(out)
    finally:
        for h in handles:
            h.remove()
    return counter.by_component, counter.get_total_flops()


def _pop(stack: list[str], fqn: str) -> None:
    while stack and stack.pop() != fqn:
        pass


def _attributing_counter(components):
    """A FlopCounterMode that also books each op's FLOPs to (phase, component).

    Forward ops (no autograd node running) go to the innermost component module being called
    (forward hooks keep a stack). A TorchFunctionMode, active in the forward, tags every autograd
    node created inside a component with that component's name (``node.metadata``); a backward op
    goes to the component of the autograd node that runs it. Recomputed ops of activation
    checkpointing run inside the backward of the node whose saved tensor they rebuild and go to
    that node's component (the same decoder layer).
    """
    from collections import defaultdict

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    stack: list[str] = []

    class _Counter(FlopCounterMode):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.by_component: dict[tuple[str, str], int] = defaultdict(int)

        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                node = torch._C._current_autograd_node()
                if node is None:
                    key = ("forward", stack[-1] if stack else "other")
                else:
                    key = ("backward", node.metadata.get(_COMPONENT_KEY, "other"))
                self.by_component[key] += flops
                for par in set(self.mod_tracker.parents):
                    self.flop_counts[par][func_packet] += flops
            return out

    class _Tag(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch._C._current_autograd_node() is None:
                name = stack[-1] if stack else "other"
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        _tag_new_nodes(t.grad_fn, name)
            return out

    return _Counter, _Tag, stack


def _tag_new_nodes(node, name: str) -> None:
    """Tag ``node`` and its untagged ancestors: exactly the nodes the last call created."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n is None or _COMPONENT_KEY in n.metadata:
            continue
        n.metadata[_COMPONENT_KEY] = name
        todo.extend(nxt for nxt, _ in n.next_functions)


def _components(model) -> list[str]:
    """The model's components for ``flops_by_module``.

    The direct children of each decoder layer (``model.layers.0.self_attn``, ...) and, on the path
    from the root to the decoder-layer list (the ModuleList with the most parameters), every
    sibling module (``model.embed_tokens``, ``model.norm``, ``lm_head``).
    """
    import torch

    layers_fqn, best = None, -1
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0:
            size = sum(p.numel() for p in m.parameters())
            if size > best:
                layers_fqn, best = fqn, size
    components: list[str] = []
    if layers_fqn is None:
        return components
    layers = model.get_submodule(layers_fqn)
    for i, layer in enumerate(layers):
        components += [f"{layers_fqn}.{i}.{name}" for name, _ in layer.named_children()]
    parts = layers_fqn.split(".")
    for depth in range(len(parts)):
        parent_fqn = ".".join(parts[:depth])
        parent = model.get_submodule(parent_fqn) if parent_fqn else model
        for name, _ in parent.named_children():
            if name != parts[depth]:
                components.append(f"{parent_fqn}.{name}" if parent_fqn else name)
    return components


def _short(fqn: str) -> str:
    for prefix in ("base_model.model.",):
        if fqn.startswith(prefix):
            return fqn[len(prefix):]
    return fqn
