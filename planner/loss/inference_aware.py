"""Inference-aware allocation: the model size and training tokens that reach a loss at the least
training plus lifetime-inference cost (Sardana, Portes, Doubov, Frankle 2024, "Beyond
Chinchilla-Optimal: Accounting for Inference in Language Model Scaling Laws", arXiv:2401.00448).

Sardana et al. (sec. 2) fix a target loss and the inference demand T (tokens served over the
model's life) and minimise 6 N D (training, Kaplan et al. 2020) + 2 N T (one forward per served
token) subject to L(N, D) = target under a Chinchilla law; their sec. 3 puts real costs on the
two terms (training and inference run at different utilizations and prices), which here is a
cost per FLOP for each. The optimum has no closed form (the paper uses Newton's method); with
u = A / N^alpha and v = target - E - u = B / D^beta the first-order condition is

    a D(v) (alpha u / (beta v) - 1) = c T,    a = 6 x cost per training FLOP, c = 2 x cost per inference FLOP,

whose left side falls monotonically in v, so a vectorized bisection on log v finds it for a
whole grid of targets and demands at once. With T = 0 it is Chinchilla's alpha A / N^alpha =
beta B / D^beta (Hoffmann et al. 2022, Eq. 4).

Trust: the optimum inherits the law's uncertainty, and it trains far beyond the token/parameter
ratios Chinchilla's law was fitted on (up to ~100); Sardana et al. (sec. 4) trained 47 models up
to 10,000 tokens per parameter and found a law fitted at typical ratios overestimates what the
extra tokens buy there, so read a recommendation above ``FITTED_TOKENS_PER_PARAM`` as a direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.loss.scaling import FLOPS_PER_PARAM_TOKEN, ScalingLaw

INFERENCE_FLOPS_PER_PARAM_TOKEN = 2.0
"""One forward pass per served token: 2 N FLOPs (Kaplan et al. 2020, sec. 2.1; Sardana et al. Eq. 2)."""
FITTED_TOKENS_PER_PARAM = 100.0
"""Token/parameter ratios beyond which Chinchilla's runs give no support (Hoffmann et al. 2022,
Figure 3 and Table A9: their runs sit within ~1-100 tokens per parameter)."""
BISECTION_STEPS = 200


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def _check(law: ScalingLaw, target_loss) -> np.ndarray:
    if law.form != "chinchilla":
        raise PlannerError(f"inference-aware allocation needs a Chinchilla-form law (E + A/N^alpha + B/D^beta); {law.name!r} is {law.form}")
    loss = _arr(target_loss)
    if np.any(loss <= law.E):
        raise PlannerError(f"target loss must exceed the law's irreducible loss E = {law.E:.4g}; got {float(np.min(loss)):.4g}")
    return loss


def lifetime_flops(params_n, tokens_d, inference_tokens):
    """6 N D + 2 N T: training plus serving ``inference_tokens`` (Sardana et al. 2024, Eq. 2)."""
    n = _arr(params_n)
    return FLOPS_PER_PARAM_TOKEN * n * _arr(tokens_d) + INFERENCE_FLOPS_PER_PARAM_TOKEN * n * _arr(inference_tokens)


def lifetime_cost(params_n, tokens_d, inference_tokens, training_cost_per_flop=1.0, inference_cost_per_flop=1.0):
    """Training and inference FLOPs each at its own price (Sardana et al. sec. 3: $ per FLOP =
    GPU price / (peak x utilization), which differs between training, prefill and decoding)."""
    n = _arr(params_n)
    return (FLOPS_PER_PARAM_TOKEN * n * _arr(tokens_d) * _arr(training_cost_per_flop)
            + INFERENCE_FLOPS_PER_PARAM_TOKEN * n * _arr(inference_tokens) * _arr(inference_cost_per_flop))


def tokens_for_loss(law: ScalingLaw, params_n, target_loss):
    """Training tokens with which N parameters reach the target: D = (B / (target - E - A/N^alpha))^(1/beta);
    inf where N alone cannot reach it."""
    loss = _check(law, target_loss)
    v = loss - law.E - law.A * _arr(params_n) ** (-law.alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, (law.B / np.where(v > 0, v, 1.0)) ** (1.0 / law.beta), np.inf)


def chinchilla_for_loss(law: ScalingLaw, target_loss) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) that reach the target with the least training compute: alpha u = beta v, so
    u = beta (target - E) / (alpha + beta) (Hoffmann et al. 2022, Eq. 4, read at fixed loss)."""
    loss = _check(law, target_loss)
    u = law.beta * (loss - law.E) / (law.alpha + law.beta)
    v = law.alpha * (loss - law.E) / (law.alpha + law.beta)
    return (law.A / u) ** (1.0 / law.alpha), (law.B / v) ** (1.0 / law.beta)


@dataclass(frozen=True)
class InferenceAwareAllocation:
    """Arrays broadcast over the target losses and inference demands asked for."""

    target_loss: object
    inference_tokens: object
    params_n: object
    tokens_d: object
    training_flops: object
    inference_flops: object
    total_cost: object  # in the units of the costs per FLOP (FLOPs when both are 1)
    chinchilla_params_n: object  # least training compute for the same loss
    chinchilla_tokens_d: object
    chinchilla_total_cost: object  # the Chinchilla model's training plus the same inference
    law: str

    @property
    def savings(self):
        return self.chinchilla_total_cost - self.total_cost

    @property
    def savings_fraction(self):
        return self.savings / self.chinchilla_total_cost

    @property
    def tokens_per_param(self):
        return _arr(self.tokens_d) / _arr(self.params_n)

    @property
    def beyond_fitted_ratios(self):
        """True where the optimum trains beyond the ratios the law was fitted on (module docstring)."""
        return self.tokens_per_param > FITTED_TOKENS_PER_PARAM


def inference_optimal(law: ScalingLaw, target_loss, inference_tokens, *, training_cost_per_flop=1.0,
                      inference_cost_per_flop=1.0) -> InferenceAwareAllocation:
    """The (N, D) reaching ``target_loss`` at the least training + lifetime-inference cost
    (module docstring); arrays of targets, demands and prices broadcast together."""
    loss = _check(law, target_loss)
    demand = _arr(inference_tokens)
    if np.any(demand < 0):
        raise PlannerError("inference tokens must be non-negative")
    a = FLOPS_PER_PARAM_TOKEN * _arr(training_cost_per_flop)
    c = INFERENCE_FLOPS_PER_PARAM_TOKEN * _arr(inference_cost_per_flop)
    if np.any(a <= 0) or np.any(c < 0):
        raise PlannerError("costs per FLOP must be positive (training) and non-negative (inference)")
    loss, demand, a, c = np.broadcast_arrays(loss, demand, a, c)
    gap = loss - law.E
    ratio = law.alpha / law.beta

    def excess(log_v):  # a D (alpha u / (beta v) - 1) - c T, falling in v
        v = np.exp(log_v)
        d = (law.B / v) ** (1.0 / law.beta)
        return a * d * (ratio * (gap - v) / v - 1.0) - c * demand

    hi = np.log(law.alpha * gap / (law.alpha + law.beta))  # Chinchilla's v: excess = -c T <= 0
    lo = hi - 80.0  # v e^-80 smaller: D beyond any demand
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            positive = excess(mid) > 0
            lo, hi = np.where(positive, mid, lo), np.where(positive, hi, mid)
    v = np.exp(hi)
    n = (law.A / (gap - v)) ** (1.0 / law.alpha)
    d = (law.B / v) ** (1.0 / law.beta)
    n_c, d_c = chinchilla_for_loss(law, loss)
    total = a * n * d + c * n * demand
    chinchilla = a * n_c * d_c + c * n_c * demand
    return InferenceAwareAllocation(loss, demand, n, d, FLOPS_PER_PARAM_TOKEN * n * d,
                                    INFERENCE_FLOPS_PER_PARAM_TOKEN * n * demand, total, n_c, d_c, chinchilla, law.name)


def inference_optimal_for_model(law: ScalingLaw, params_n, tokens_d, inference_tokens, **costs) -> InferenceAwareAllocation:
    """Sardana et al.'s question about an existing plan: the model that reaches the loss the law
    predicts for (N, D) at the least lifetime cost, given the inference demand."""
    return inference_optimal(law, law.loss(params_n, tokens_d), inference_tokens, **costs)
