"""The loss of a fine-tuning candidate: a fine-tuning law in place of the pre-training law.

A fine-tune does not start from scratch, so the pre-training law L(N, D) read as a fine-tuning
loss, with LoRA's data efficiency a fixed placeholder, ranks allocations only qualitatively. Under
a fine-tuning law (``PlanRequest.finetune_law``, default Zhang et al. 2024, ``planner.loss.finetune``)
each method has its own law L_m(X, D_f) = A_m / (X^alpha_m D_f^beta_m) + E_m (full fine-tuning,
LoRA; QLoRA takes LoRA's), so the method's price in loss comes from measurements, not from a
token-efficiency guess.

What the data side contributes (repetition, selection, the kept fraction) is carried as effective
tokens: the data term of ``planner.search.scoring``'s data model, D_eff = v D'(f U, D) (Muennighoff
et al.'s repeated-data equivalent times the selection value of ``planner.loss.pruning``; one epoch
of unselected data gives D_eff = D), without its excess-parameter term, which concerns training
from scratch. The law counts examples, so D_f = D_eff / ``tokens_per_example``. That composition is this module's assumption,
reported with every plan; the law's trust (fitted, held-out, extrapolated) is reported per plan.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def method_law(method: str, task: str, name: str):
    """The fine-tuning law of a planner method (cached: a plan asks for it per scoring)."""
    from planner.loss.finetune import finetune_law

    return finetune_law(method, task, name=name)


def data_tokens(ctx, params_n, tokens_d, keep_fraction=1.0, theta_deg=90.0, strategy: str = "hard", efficiency=1.0):
    """Fresh-token equivalents of the candidates' data: eta D without a pool, else the data term of
    the pruning model (``planner.loss.pruning.effective_data_tokens``: repetition and selection)."""
    req = ctx.request
    eta = np.asarray(efficiency, dtype=np.float64)
    d = eta * np.asarray(tokens_d, dtype=np.float64)
    if req.data_pool_tokens is None or ctx.law.repetition is None:
        return d
    from planner.loss.pruning import effective_data_tokens

    return effective_data_tokens(ctx.law, params_n, d, eta * req.data_pool_tokens, keep_fraction, theta_deg, strategy)


def finetune_losses(ctx, params_n, methods, tokens_eff):
    """Loss of every candidate under the request's fine-tuning law: ``params_n`` and ``methods`` per
    set-up row (R x 1 and R), ``tokens_eff`` the fresh-token equivalents (R x ...)."""
    req = ctx.request
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_eff, dtype=np.float64)
    n = n.reshape(n.shape + (1,) * (d.ndim - n.ndim))
    examples = np.clip(d / req.tokens_per_example, 1.0, 1e18)
    out = np.empty(np.broadcast_shapes(n.shape, d.shape))
    for method in np.unique(methods):
        law = method_law(str(method), req.finetune_task, req.finetune_law)
        rows = np.asarray(methods) == method
        out[rows] = law.loss(n[rows], examples[rows])
    return out


def finetune_provenance(ctx, params_n: float, method: str, tokens_eff: float) -> tuple[str, str, float]:
    """(law name, trust, extrapolation factor) of one candidate under the fine-tuning law."""
    req = ctx.request
    law = method_law(method, req.finetune_task, req.finetune_law)
    examples = max(float(tokens_eff) / req.tokens_per_example, 1.0)
    return law.name, str(law.trust(params_n, examples)), float(law.extrapolation_factor(params_n, examples))


def pretraining_provenance(law, params_n: float, tokens: float) -> tuple[str, str, float]:
    """(law name, trust, extrapolation factor) of a pre-training candidate against the N and D
    ranges of the runs the law was fitted on (``law.evidence``)."""
    ev = law.evidence or {}
    factor = 1.0
    for value, key in ((params_n, "params"), (tokens, "tokens")):
        rng = ev.get(key)
        if rng:
            factor = max(factor, value / rng[1], rng[0] / value)
    if not ev:
        return law.name, "unknown", 1.0
    return law.name, "fitted" if factor <= 1.0 else "extrapolated", factor


def finetune_notes(req) -> list[str]:
    """What the fine-tuning loss rests on, for the plan's assumptions."""
    if not req.uses_finetune_law:
        return []
    law = method_law("full", req.finetune_task, req.finetune_law)
    return [f"loss: fine-tuning law {req.finetune_law} ({law.source.split(',')[0]}), task {req.finetune_task}, one law per "
            f"method (qlora takes LoRA's); D_f = effective tokens / {req.tokens_per_example:g} tokens per example "
            "(--tokens-per-example); the data side (repetition, selection) enters as fresh-token equivalents ("
            f"Muennighoff et al.'s D' and the pruning model); its base models are 1B-16B bilingual LLMs, so another model family or "
            "task is an extrapolation: compare plans with it, fit your own runs (planner.loss.finetune.fit_finetune_law)"]
