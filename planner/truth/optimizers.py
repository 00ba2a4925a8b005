"""The optimizers a traced or profiled training step runs.

Owns ``make_optimizer``: the set-up's optimizer over the trainable parameters, with fixed
hyper-parameters (they do not change memory or FLOPs): ``torch.optim.AdamW(foreach=True |
fused=True | foreach=False)``, ``SGD(momentum=0.9, same switch)``, ``torch.optim.Adafactor(foreach=...)``,
Lion from ``lion-pytorch`` (or the same update in ``Lion`` here when the package is absent), and
``adamw-8bit`` = bitsandbytes' ``AdamW8bit`` (uint8 moments and one fp32 absmax per 256 values
for tensors of >= 4096 elements, fp32 moments for smaller ones, two shared 256-entry code tables,
no scratch); ``galore-adamw`` = ``galore_torch.GaLoreAdamW`` (galore-torch 1.0) with the GaLore README's
two parameter groups (``galore_param_groups``: the weights of the ``nn.Linear`` modules whose names
contain "attn" or "mlp" projected at ``rank=galore_rank``, ``scale=0.25``, ``proj_type="std"``; the
rest plain AdamW). The oracle sets ``update_proj_gap=1`` instead of the README's 200 so that the
traced second step recomputes the projections with every state present: the memory of step 200,
400, ... of a real run (the projections are the same size at every update). torch, lion-pytorch,
bitsandbytes and galore_torch are imported inside functions only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup


ORACLE_UPDATE_PROJ_GAP = 1
"""GaLore's projection-update period in the oracle (see the module docstring)."""


def make_optimizer(params, setup: TrainingSetup, notes: list[str], model=None):
    """The set-up's optimizer over ``params`` (see the module docstring); substitutions are added to ``notes``.
    ``model``: the module that owns ``params`` (galore-adamw chooses its projected weights by module name)."""
    import torch

    if setup.optimizer == "galore-adamw":
        return make_galore(params, setup, notes, model)
    impl = setup.optimizer_impl
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[impl]
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **flags)
    if setup.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2, foreach=(impl == "foreach"))
    if setup.optimizer == "adamw-8bit":
        import bitsandbytes as bnb

        notes.append("adamw-8bit: bitsandbytes AdamW8bit (blockwise 8-bit moments for tensors of >= 4096 "
                     "elements, fp32 moments below; optimizer_impl ignored)")
        return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01)
    if setup.optimizer == "lion":
        try:
            from lion_pytorch import Lion as LionPytorch

            notes.append("lion: lion-pytorch's Lion (per-parameter loop; optimizer_impl ignored)")
            return LionPytorch(params, lr=1e-4, weight_decay=0.01)
        except ImportError:
            notes.append("lion: lion-pytorch not installed; planner.truth.optimizers.Lion (same per-parameter update)")
            return Lion(params, lr=1e-4, weight_decay=0.01)
    raise NotImplementedError(f"optimizer {setup.optimizer!r} cannot be traced")


def galore_param_groups(params, model, rank: int, update_proj_gap: int) -> list[dict]:
    """The GaLore README's groups: ``params`` outside the projected weights first, plain; then the
    weights of every ``nn.Linear`` whose module name contains "attn" or "mlp", projected."""
    import torch

    keys = ("attn", "mlp")
    trainable = {id(p) for p in params}
    projected = [m.weight for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and any(k in name for k in keys) and id(m.weight) in trainable]
    chosen = {id(p) for p in projected}
    plain = [p for p in params if id(p) not in chosen]
    return [{"params": plain},
            {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": 0.25, "proj_type": "std"}]


def make_galore(params, setup: TrainingSetup, notes: list[str], model):
    """galore_torch's GaLoreAdamW over ``galore_param_groups`` (the oracle's update_proj_gap: ``ORACLE_UPDATE_PROJ_GAP``)."""
    if model is None:
        raise NotImplementedError("galore-adamw picks its projected weights by module name: pass model=")
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as err:
        raise NotImplementedError("galore-adamw is traced with galore-torch 1.0: pip install galore-torch==1.0") from err
    groups = galore_param_groups(params, model, setup.galore_rank, ORACLE_UPDATE_PROJ_GAP)
    notes.append(f"galore-adamw: galore_torch GaLoreAdamW, {len(groups[1]['params'])} attn/mlp linear weights projected "
                 f"at rank {setup.galore_rank}, {len(groups[0]['params'])} tensors plain; update_proj_gap=1 so step 2 "
                 "recomputes the projections (optimizer_impl ignored)")
    return GaLoreAdamW(groups, lr=1e-4, weight_decay=0.01, no_deprecation_warning=True)


def Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):  # noqa: N802 - mirrors a class name
    """A minimal Lion optimizer (lion-pytorch's update) for when lion-pytorch is absent."""
    return _lion_class()(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _lion_class():
    import torch

    class _Lion(torch.optim.Optimizer):
        """Lion (Chen et al. 2023, arXiv:2302.06675), the update of lion-pytorch 0.2.5.

        State: one ``exp_avg`` per parameter, at the parameter's dtype. Per parameter::

            p *= 1 - lr * wd
            update = sign(beta1 * exp_avg + (1 - beta1) * grad)     # one param-sized temporary
            p -= lr * update
            exp_avg = beta2 * exp_avg + (1 - beta2) * grad
        """

        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
            super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p)
                    exp_avg = state["exp_avg"]
                    p.mul_(1 - lr * wd)
                    update = exp_avg.clone().mul_(beta1).add(p.grad, alpha=1 - beta1).sgn_()
                    p.add_(update, alpha=-lr)
                    exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
            return None

    return _Lion
