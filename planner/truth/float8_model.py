"""torchao float8 training on the oracle's Hugging Face model: ``convert_to_float8_training`` as users call it.

Owns ``apply_float8`` (called by ``planner.truth.training_model.build_training_model`` when
``setup.float8``) and ``check_float8_setup`` (what the fake-tensor oracle traces of it). torch and
torchao are imported inside functions only.

What is applied: ``torchao.float8.convert_to_float8_training(model, config=Float8LinearConfig(),
module_filter_fn=...)`` (torchao 0.11.0; the default config is the ``tensorwise`` recipe with dynamic
scaling), every ``nn.Linear`` whose dimensions are multiples of 16 swapped for ``Float8Linear``, the
output head kept in high precision (``lm_head`` filtered, as torchtitan's float8 configs
(``filter_fqns = ["output"]``) and accelerate's torchao backend (``filter_first_and_last_linear_layers``)
do). On fake CPU tensors ``torch._scaled_mm`` runs its meta kernel; the traced step is the CUDA one
because Float8Linear's own code path does not depend on the device. Traced at precision ``bf16``
only: under ``bf16-mixed`` ``Float8Linear.forward`` casts its input to the *GPU* autocast dtype
(``torch.is_autocast_enabled()`` reads CUDA's state), which a CPU trace does not reproduce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from planner.specs.setup import TrainingSetup

HEAD_NAMES = ("lm_head",)
"""Module names kept in high precision (the output projection)."""


TRACED_PRECISIONS = ("bf16", "bf16-mixed")


def check_float8_setup(setup: TrainingSetup) -> None:
    """NotImplementedError, before torch is imported, for float8 set-ups this oracle does not trace."""
    if setup.method != "full" or setup.precision not in TRACED_PRECISIONS:
        raise NotImplementedError(
            "float8 is traced for full training at precision bf16 (torchao's Float8Linear follows CUDA "
            f"autocast, not CPU's; peft adapters are not converted), not {setup.method} {setup.precision}"
        )


def _keep(module, fqn: str) -> bool:
    """``module_filter_fn``: convert every linear with dims divisible by 16, not the head."""
    if fqn.split(".")[-1] in HEAD_NAMES:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model, setup: TrainingSetup):
    """Swap the model's linears for torchao ``Float8Linear`` (tensorwise, dynamic scaling) in place."""
    check_float8_setup(setup)
    import torch

    with torch.device("cpu"):  # torchao builds lookup tensors at import: never under the meta device
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=_keep)
    if setup.precision == "bf16-mixed":
        _follow_cpu_autocast(model)
    return model


def _follow_cpu_autocast(model) -> None:
    """The CPU twin of ``Float8Linear.forward``'s first lines: under CUDA autocast it casts its input to
    the autocast dtype (``torch.is_autocast_enabled()`` reads CUDA's state); on the oracle's CPU
    autocast the same cast is made here, so the traced step saves what the CUDA step saves. A no-op
    whenever CUDA autocast is on (real runs)."""
    import torch
    from torchao.float8.float8_linear import Float8Linear

    for module in model.modules():
        if isinstance(module, Float8Linear):
            original = module.forward

            def forward(x, original=original):
                if torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda"):
                    x = x.to(torch.get_autocast_dtype("cpu"))
                return original(x)

            module.forward = forward
