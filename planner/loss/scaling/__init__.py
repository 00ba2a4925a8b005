"""Loss as a function of model size and data: L(N, D), repeated data, compute-optimal allocation, fits.

Conventions: N (``params_n``) in parameters, D (``tokens_d``) in training tokens (repeats
counted), U (``unique_tokens``) in distinct tokens, C (``compute_flops``) in FLOPs with C = 6 N D
(Kaplan et al. 2020, section 2.1: 2 N FLOPs per token forward, 4 N backward). Every formula
takes scalars or numpy arrays and broadcasts. Three modules: ``laws`` (the :class:`ScalingLaw`
files of ``models_catalog/scaling_laws`` and the loss formulas, data-constrained repetition
included), ``allocation`` (closed form, geometric program and grid for N*, D*) and ``fit``
(fitting a law to the user's runs). This package re-exports their public names, so
``from planner.loss import scaling; scaling.compute_optimal(...)`` reaches each where it lives.

This package owns the scaling laws and their fits; it may import ``planner.specs``, ``planner.errors``, numpy,
and scipy or cvxpy inside the functions that solve.
"""

from planner.loss.scaling.allocation import (
    Allocation,
    compute_optimal,
    compute_shadow_price,
    optimal_closed_form,
    optimal_gp,
    optimal_grid,
    optimal_loss,
)
from planner.loss.scaling.fit import ScalingFitResult, ScalingLawFitter, fit_scaling_law, read_runs_csv
from planner.loss.scaling.laws import (
    DEFAULT_LAW,
    FLOPS_PER_PARAM_TOKEN,
    Repetition,
    ScalingLaw,
    allocation_constant,
    chinchilla_loss,
    data_constrained_loss,
    effective_params,
    effective_tokens,
    kaplan_loss,
    list_laws,
    load_law,
    optimal_params_for_tokens,
    optimal_tokens_for_params,
    predict_loss,
)

__all__ = [
    "DEFAULT_LAW",
    "FLOPS_PER_PARAM_TOKEN",
    "Allocation",
    "Repetition",
    "ScalingFitResult",
    "ScalingLaw",
    "ScalingLawFitter",
    "allocation_constant",
    "chinchilla_loss",
    "compute_optimal",
    "compute_shadow_price",
    "data_constrained_loss",
    "effective_params",
    "effective_tokens",
    "fit_scaling_law",
    "kaplan_loss",
    "list_laws",
    "load_law",
    "optimal_closed_form",
    "optimal_gp",
    "optimal_grid",
    "optimal_loss",
    "optimal_params_for_tokens",
    "optimal_tokens_for_params",
    "predict_loss",
    "read_runs_csv",
]
