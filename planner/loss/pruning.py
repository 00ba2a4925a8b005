"""Returns of data selection: loss against the fraction of the pool kept, and what scoring costs.

The model (assumptions stated; every parameter can be replaced)
---------------------------------------------------------------
Sorscher et al. 2022 ("Beyond neural scaling laws: beating power law scaling via data pruning",
arXiv:2206.14486, section 2) analyse a teacher-student perceptron whose training set is pruned
by the margin along a *probe* direction at angle theta from the teacher. Their theory predicts:
(i) random pruning (theta = 90 deg) keeps power-law scaling; (ii) with abundant data, keeping
the *hard* examples (small margins) lets error fall faster than a power law of the kept data, up
to exponentially for a perfect metric (theta = 0); (iii) with an imperfect metric the gain
saturates, so pruning below some fraction stops paying; (iv) with scarce data, keeping the
*easy* examples is better. We carry these four statements into the Chinchilla law, where the
data term is B / D'^beta with D' Muennighoff et al.'s effective data, as an effective-data
model. It is a model in the spirit of their theory, not their replica calculation:

* Boundary coverage. Keep the fraction f of a Gaussian-margin pool with |probe margin| < kappa,
  f = erf(kappa / sqrt 2). The examples that still teach a nearly trained model lie close to the
  teacher's boundary; along the probe their margin is sin(theta) times a standard normal, so the
  kept band covers the share c(f, theta) = erf(erfinv(f) / sin theta) of them
  (:func:`boundary_coverage`). c = f for theta = 90 deg (random), c = 1 for theta = 0.
* Token value. A kept token is worth m = c / f random tokens (:func:`hard_selection_gain`):
  1 for random pruning, 1/f for a perfect metric (the kept f of the pool carries the whole pool's
  boundary information, so the kept data behaves like the full pool: scaling beats the power
  law in the kept size), and at most 1/sin(theta) for an imperfect one (statement iii).
* Regime. The gain applies when data is abundant for the model and reverses when it is scarce
  (statement iv): with rho = U / D_opt(N) the pool over the tokens for which N is compute-optimal,
  s = (rho - 1) / (rho + 1) in (-1, 1), the hard-kept value is m^s and the easy-kept value m^-s
  (:func:`selection_value`). rho = 1, the crossover, is an assumption (Sorscher et al. find it at
  a pool of order the parameter count in the perceptron; here "enough data for this model" is
  measured by the compute-optimal tokens of the law).
* Repetition. Training D tokens over the kept f U unique tokens repeats them D / (f U) times;
  the effective data is v * D'(f U, D) with D' from Muennighoff et al. 2023 (Eq. 5) and the
  excess-parameter term computed on v f U unique tokens.
* Budget. Scoring the pool costs FLOPs out of the same budget C; training gets C - scoring.

Each method's theta comes from a published measurement ("keeping f0 of the pool reached the
baseline with 1/s0 of the tokens", :func:`theta_from_efficiency` inverts m(f0, theta) = s0) and
the planner does not search below the smallest fraction that measurement covers. erf is the
standard library's (``math.erf``, ``math.erfc``) and its inverse ``erfinv`` is solved in ``planner.loss.special``
(Halley's method), so a plan with a data pool imports no scipy; scipy.optimize is imported inside
:func:`plan_pruning`'s refinement only.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlannerError
from planner.loss.scaling.laws import (
    DEFAULT_LAW,
    FLOPS_PER_PARAM_TOKEN,
    ScalingLaw,
    effective_params,
    effective_tokens,
    load_law,
    optimal_params_for_tokens,
    optimal_tokens_for_params,
)
from planner.loss.special import erf, erfinv

Strategy = Literal["hard", "easy", "auto"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Calibration(_Frozen):
    keep_fraction: float = Field(gt=0, le=1)
    token_efficiency: float = Field(ge=1)
    where: str = ""
    caveat: str = ""


class Scoring(_Frozen):
    flops_per_token: float = Field(0.0, ge=0)
    flops_per_token_per_proxy_param: float = Field(0.0, ge=0)
    proxy_params: float = Field(0.0, ge=0)
    proxy_train_tokens: float = Field(0.0, ge=0)
    note: str = ""


class PruningMethod(_Frozen):
    name: str
    description: str = ""
    theta_deg: float | None = Field(None, ge=0, le=90)
    calibration: Calibration | None = None
    min_keep_fraction: float | None = Field(None, gt=0, le=1)
    scoring: Scoring
    citation: str = ""
    evidence: dict | None = None  # the domain of its published results (planner.loss.evidence)

    @property
    def metric_angle_deg(self) -> float:
        """theta given directly, else derived from the calibration."""
        if self.theta_deg is not None:
            return self.theta_deg
        if self.calibration is None:
            raise PlannerError(f"method {self.name!r} has neither theta_deg nor a calibration; give --theta or --efficiency")
        return theta_from_efficiency(self.calibration.keep_fraction, self.calibration.token_efficiency)


def _catalog() -> dict:
    return json.loads(files("models_catalog").joinpath("pruning_methods.json").read_text())


def list_methods() -> list[str]:
    return list(_catalog()["methods"])


def load_method(name: str) -> PruningMethod:
    methods = _catalog()["methods"]
    if name not in methods:
        raise PlannerError(f"unknown pruning method {name!r}; known: {', '.join(methods)}")
    return PruningMethod.model_validate({"name": name, **methods[name]})


# --------------------------------------------------------------------------------------------
# Formulas


def boundary_coverage(keep_fraction, theta_deg):
    """c(f, theta) = erf(erfinv(f) / sin theta): share of the teacher-boundary examples kept.

    Keeping |probe margin| < kappa with a standard-normal margin keeps f = erf(kappa / sqrt 2);
    near the teacher's boundary the probe margin is sin(theta) * N(0, 1), of which the band keeps
    erf(kappa / (sqrt 2 sin theta)). Geometry of Sorscher et al. 2022 (section 2, the probe at
    angle theta); the coverage reading is this module's modelling assumption.
    """
    f = np.asarray(keep_fraction, dtype=np.float64)
    s = np.sin(np.radians(np.asarray(theta_deg, dtype=np.float64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = erf(erfinv(np.clip(f, 0.0, 1.0)) / s)
    return np.where(s < 1e-12, np.where(f > 0, 1.0, 0.0), np.where(f >= 1.0, 1.0, c))


def hard_selection_gain(keep_fraction, theta_deg):
    """m = c(f, theta) / f: random-token equivalents per kept token when keeping hard examples.

    m = 1 at theta = 90 deg (random), m = 1/f at theta = 0, m <= 1/sin(theta) otherwise.
    """
    f = np.asarray(keep_fraction, dtype=np.float64)
    return boundary_coverage(f, theta_deg) / f


def theta_from_efficiency(keep_fraction: float, token_efficiency: float) -> float:
    """Metric angle (degrees) that makes m(f0, theta) = s0, the measured token efficiency.

    sin theta = erfinv(f0) / erfinv(s0 f0); s0 f0 >= 1 means the kept part carried all of the
    pool's value, a perfect metric (theta = 0); s0 <= 1 means no better than random (90).
    """
    f0, s0 = float(keep_fraction), float(token_efficiency)
    if not (0 < f0 <= 1) or not s0 > 0:
        raise PlannerError(f"need 0 < keep_fraction <= 1 and token_efficiency > 0, got {f0}, {s0}")
    if s0 <= 1.0 or f0 >= 1.0:
        return 90.0
    if s0 * f0 >= 1.0:
        return 0.0
    return math.degrees(math.asin(min(1.0, float(erfinv(f0) / erfinv(s0 * f0)))))


def abundance(law: ScalingLaw, params_n, pool_tokens):
    """rho = U / D_opt(N): the pool over the tokens for which N parameters are compute-optimal."""
    return np.asarray(pool_tokens, dtype=np.float64) / optimal_tokens_for_params(law, params_n)


def selection_value(keep_fraction, theta_deg, rho, strategy: Literal["hard", "easy"]):
    """Value of a kept token in random-token equivalents: m^s (hard) or m^-s (easy), s = (rho-1)/(rho+1)."""
    s = (np.asarray(rho, dtype=np.float64) - 1.0) / (np.asarray(rho, dtype=np.float64) + 1.0)
    log_m = np.log(hard_selection_gain(keep_fraction, theta_deg))
    sign = 1.0 if strategy == "hard" else -1.0
    return np.exp(sign * s * log_m)


def scoring_flops(method: PruningMethod, pool_tokens, proxy_params: float | None = None, proxy_train_tokens: float | None = None):
    """FLOPs to score the pool: U (c0 + c1 N_proxy) + 6 N_proxy T_proxy (the catalog's formula)."""
    sc = method.scoring
    n_p = sc.proxy_params if proxy_params is None else float(proxy_params)
    t_p = sc.proxy_train_tokens if proxy_train_tokens is None else float(proxy_train_tokens)
    if n_p < 0 or t_p < 0:
        raise PlannerError("proxy parameters and proxy training tokens must be >= 0")
    u = np.asarray(pool_tokens, dtype=np.float64)
    return u * (sc.flops_per_token + sc.flops_per_token_per_proxy_param * n_p) + FLOPS_PER_PARAM_TOKEN * n_p * t_p


def pruned_loss(
    law: ScalingLaw,
    params_n,
    tokens_d,
    pool_tokens,
    keep_fraction,
    theta_deg,
    strategy: Literal["hard", "easy"] = "hard",
):
    """Loss of N parameters trained on D tokens drawn (with repetition) from the kept f U tokens.

    L = E + A / N'^alpha + B / (v D'(f U, D))^beta, v = :func:`selection_value`; N' from the
    excess-parameter decay with U_N the compute-optimal size for v f U tokens. With f = 1 (or a
    random metric) this is exactly :func:`planner.loss.scaling.data_constrained_loss`.
    """
    if law.repetition is None:
        raise PlannerError(f"law {law.name!r} has no repetition constants; pruning needs them")
    rep = law.repetition
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    f = np.asarray(keep_fraction, dtype=np.float64)
    kept = f * np.asarray(pool_tokens, dtype=np.float64)
    v = selection_value(f, theta_deg, abundance(law, n, pool_tokens), strategy)
    d_eff = v * effective_tokens(kept, d, rep.r_d_star)
    u_n = optimal_params_for_tokens(law, v * np.minimum(kept, d))
    n_eff = effective_params(n, u_n, rep.r_n_star)
    return law.E + law.A * n_eff ** (-law.alpha) + law.B * d_eff ** (-law.beta)


def effective_data_tokens(law: ScalingLaw, params_n, tokens_d, pool_tokens, keep_fraction, theta_deg,
                          strategy: Literal["hard", "easy"] = "hard"):
    """The data term of :func:`pruned_loss` alone: v D'(f U, D), the fresh-token equivalent of D
    tokens drawn with repetition from the kept f U (Muennighoff et al.'s D', Eq. 5) times the
    selection value v. Without the excess-parameter term, which concerns a model trained from
    scratch (a fine-tune's base model is given)."""
    if law.repetition is None:
        raise PlannerError(f"law {law.name!r} has no repetition constants; pruning needs them")
    f = np.asarray(keep_fraction, dtype=np.float64)
    kept = f * np.asarray(pool_tokens, dtype=np.float64)
    v = selection_value(f, theta_deg, abundance(law, params_n, pool_tokens), strategy)
    return v * effective_tokens(kept, np.asarray(tokens_d, dtype=np.float64), law.repetition.r_d_star)


# --------------------------------------------------------------------------------------------
# Planning


class PruningPlan(_Frozen):
    method: str
    law: str
    strategy: Literal["hard", "easy", "none"]
    theta_deg: float
    compute_flops: float
    pool_tokens: float
    keep_fraction: float
    kept_tokens: float
    params_n: float
    tokens_d: float
    epochs: float
    loss: float
    loss_no_pruning: float
    loss_change: float = Field(description="loss - loss_no_pruning (negative: pruning helps)")
    params_n_no_pruning: float
    tokens_d_no_pruning: float
    scoring_flops: float
    scoring_share: float = Field(description="scoring FLOPs / compute budget")
    training_flops: float
    abundance: float = Field(description="pool / compute-optimal tokens of the chosen N (rho)")
    min_keep_fraction: float
    curve_keep_fraction: list[float]
    curve_loss_hard: list[float]
    curve_loss_easy: list[float]


def _best_over_params(law, compute_flops, pool, f, theta, strategy, num_n=801):
    """For each keep fraction (1-D array), the best loss over a log grid of N, D = C / 6N."""
    center = math.log10(math.sqrt(compute_flops / FLOPS_PER_PARAM_TOKEN))
    n = np.logspace(center - 3.5, center + 3.5, num_n)[None, :]
    d = compute_flops / (FLOPS_PER_PARAM_TOKEN * n)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        loss = pruned_loss(law, n, d, pool, np.asarray(f)[:, None], theta, strategy)
    loss = np.where(np.isfinite(loss), loss, np.inf)
    j = np.argmin(loss, axis=1)
    return loss[np.arange(loss.shape[0]), j], n[0, j]


def _refine_params(law, compute_flops, pool, f, theta, strategy, n0):
    from scipy.optimize import minimize_scalar

    def fun(log_n):
        n = 10.0**log_n
        return float(pruned_loss(law, n, compute_flops / (FLOPS_PER_PARAM_TOKEN * n), pool, f, theta, strategy))

    x0 = math.log10(n0)
    res = minimize_scalar(fun, bounds=(x0 - 0.02, x0 + 0.02), method="bounded", options={"xatol": 1e-9})
    n = 10.0 ** float(res.x) if res.success and res.fun <= fun(x0) else n0
    return n, fun(math.log10(n))


def plan_pruning(
    compute_flops: float,
    pool_tokens: float,
    method: PruningMethod | str = "random",
    law: ScalingLaw | str = DEFAULT_LAW,
    strategy: Strategy = "auto",
    theta_deg: float | None = None,
    min_keep_fraction: float | None = None,
    proxy_params: float | None = None,
    proxy_train_tokens: float | None = None,
    num_fractions: int = 121,
) -> PruningPlan:
    """Best kept fraction, model size and epochs for a budget C and a pool of U unique tokens.

    Searches f on a log grid from the method's smallest measured fraction to 1 and N on a log
    grid (then refined) for each f; training gets C minus the scoring FLOPs. The no-pruning
    baseline (f = 1, no scoring cost) is optimized the same way with the full budget.
    """
    method = load_method(method) if isinstance(method, str) else method
    law = load_law(law) if isinstance(law, str) else law
    c, u, theta, f_min = _check_plan_inputs(method, compute_flops, pool_tokens, theta_deg, min_keep_fraction)
    score, train = _scoring_and_training_flops(method, c, u, proxy_params, proxy_train_tokens)
    fractions = np.unique(np.concatenate([np.geomspace(f_min, 1.0, num_fractions), [1.0]]))
    curves = {s: _best_over_params(law, train, u, fractions, theta, s) for s in ("hard", "easy")}
    f_best, best_strategy, n_best, loss_best = _best_selection(law, train, u, fractions, theta, curves, strategy)
    n_base, loss_base = _no_pruning_baseline(law, c, u)
    if loss_best >= loss_base:
        # Selection does not pay for its scoring: the plan is not to prune (and not to score).
        f_best, n_best, loss_best, score, train, best_strategy = 1.0, n_base, loss_base, 0.0, c, "hard"
    d_best = train / (FLOPS_PER_PARAM_TOKEN * n_best)
    kept = f_best * u
    return PruningPlan(
        method=method.name,
        law=law.name,
        strategy="none" if f_best >= 1.0 else best_strategy,
        theta_deg=theta,
        compute_flops=c,
        pool_tokens=u,
        keep_fraction=f_best,
        kept_tokens=kept,
        params_n=n_best,
        tokens_d=d_best,
        epochs=d_best / kept,
        loss=loss_best,
        loss_no_pruning=loss_base,
        loss_change=loss_best - loss_base,
        params_n_no_pruning=n_base,
        tokens_d_no_pruning=c / (FLOPS_PER_PARAM_TOKEN * n_base),
        scoring_flops=score,
        scoring_share=score / c,
        training_flops=train,
        abundance=float(abundance(law, n_best, u)),
        min_keep_fraction=float(f_min),
        curve_keep_fraction=fractions.tolist(),
        curve_loss_hard=curves["hard"][0].tolist(),
        curve_loss_easy=curves["easy"][0].tolist(),
    )


def _check_plan_inputs(method: PruningMethod, compute_flops, pool_tokens, theta_deg, min_keep_fraction):
    """(C, U, theta, smallest kept fraction) as floats, checked; theta and the fraction default to the method's."""
    c = float(np.asarray(compute_flops))
    u = float(pool_tokens)
    if not (math.isfinite(c) and c > 0):
        raise PlannerError(f"compute must be a positive number of FLOPs, got {compute_flops}")
    if not (math.isfinite(u) and u > 0):
        raise PlannerError(f"the pool must be a positive number of tokens, got {pool_tokens}")
    theta = method.metric_angle_deg if theta_deg is None else float(theta_deg)
    if not 0 <= theta <= 90:
        raise PlannerError(f"theta must be between 0 and 90 degrees, got {theta}")
    f_min = min_keep_fraction if min_keep_fraction is not None else method.min_keep_fraction
    if f_min is None:
        raise PlannerError(f"method {method.name!r} can remove only what the pool holds in duplicates; give --min-keep (the non-duplicate share)")
    if not 0 < f_min <= 1:
        raise PlannerError(f"the smallest kept fraction must be in (0, 1], got {f_min}")
    return c, u, theta, f_min


def _scoring_and_training_flops(method: PruningMethod, compute_flops: float, pool: float, proxy_params, proxy_train_tokens):
    """(FLOPs to score the pool, what is left of the budget for training); scoring must leave some."""
    score = float(scoring_flops(method, pool, proxy_params, proxy_train_tokens))
    train = compute_flops - score
    if train <= 0:
        raise PlannerError(f"scoring the pool with {method.name} costs {score:.3g} FLOPs, more than the {compute_flops:.3g} budget")
    return score, train


def _best_selection(law, train_flops, pool, fractions, theta, curves, strategy: Strategy):
    """(f, strategy, N, loss) of the best kept fraction over the allowed strategies, N refined."""
    candidates = []
    for s in ("hard", "easy") if strategy == "auto" else (strategy,):
        losses, ns = curves[s]
        # On ties (a random metric without repetition is flat in f) keep the most data: no pruning.
        i = int(np.flatnonzero(losses <= losses.min() * (1 + 1e-12))[-1])
        candidates.append((float(losses[i]), -float(fractions[i]), s, float(ns[i])))
    _, neg_f, best_strategy, n_grid = min(candidates)
    n_best, loss_best = _refine_params(law, train_flops, pool, -neg_f, theta, best_strategy, n_grid)
    return -neg_f, best_strategy, n_best, loss_best


def _no_pruning_baseline(law, compute_flops, pool):
    """(N, loss) with no selection and no scoring cost: the whole budget for training."""
    _, base_n = _best_over_params(law, compute_flops, pool, np.array([1.0]), 90.0, "hard")
    return _refine_params(law, compute_flops, pool, 1.0, 90.0, "hard", float(base_n[0]))
