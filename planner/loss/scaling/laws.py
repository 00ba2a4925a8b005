"""Scaling laws as data and as formulas: L(N, D), with and without repeated data.

A law is a JSON file in ``models_catalog/scaling_laws`` (its constants, the parameter-count
convention, the citation and where in the paper) loaded into a frozen :class:`ScalingLaw`; a path
to a JSON file of the same shape works too. The formulas are the two published forms, Chinchilla's
E + A/N^alpha + B/D^beta and Kaplan's, the data-constrained law of Muennighoff et al. 2023 (effective
tokens and parameters when data repeats), and the inversions between N and the D for which it is
compute-optimal that the data-constrained law needs. Every formula takes scalars or numpy arrays.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.errors import PlannerError, expand_user, read_user_text

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D (Kaplan et al. 2020, section 2.1; Hoffmann et al. 2022, section 3)
DEFAULT_LAW = "besiroglu2024"


class Repetition(BaseModel):
    """Decay constants of repeated tokens (R_D*) and excess parameters (R_N*), Muennighoff et al. 2023."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    r_d_star: float = Field(gt=0)
    r_n_star: float = Field(gt=0)
    source: str


class ScalingLaw(BaseModel):
    """One parametric loss law with its provenance.

    ``form="chinchilla"``: L = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Eq. 2).
    ``form="kaplan"``: L = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020, Eq. 1.5).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    form: Literal["chinchilla", "kaplan"]
    E: float | None = None
    A: float | None = None
    B: float | None = None
    alpha: float | None = None
    beta: float | None = None
    N_c: float | None = None
    D_c: float | None = None
    alpha_N: float | None = None
    alpha_D: float | None = None
    param_count: Literal["total", "non_embedding"]
    repetition: Repetition | None = None
    citation: str = ""
    where: str = ""
    notes: str = ""
    evidence: dict | None = None  # N, D, epochs, tokens per parameter of the runs it was fitted on

    @model_validator(mode="after")
    def _check_form(self):
        needed = ("E", "A", "B", "alpha", "beta") if self.form == "chinchilla" else ("N_c", "D_c", "alpha_N", "alpha_D")
        missing = [k for k in needed if getattr(self, k) is None]
        if missing:
            raise ValueError(f"law {self.name!r} of form {self.form} lacks {', '.join(missing)}")
        bad = [k for k in needed if not (math.isfinite(getattr(self, k)) and getattr(self, k) > 0)]
        if bad:
            raise ValueError(f"law {self.name!r}: {', '.join(bad)} must be positive and finite")
        return self

    def loss(self, params_n, tokens_d, unique_tokens=None):
        """Predicted loss; with ``unique_tokens`` the data-constrained law of Muennighoff et al."""
        return predict_loss(self, params_n, tokens_d, unique_tokens)


# --------------------------------------------------------------------------------------------
# The catalog


def _laws_dir():
    return files("models_catalog").joinpath("scaling_laws")


def list_laws() -> list[str]:
    """Names of the laws shipped in ``models_catalog/scaling_laws``."""
    return sorted(p.name[:-5] for p in _laws_dir().iterdir() if p.name.endswith(".json"))


def load_law(name_or_path: str) -> ScalingLaw:
    """A catalog law by name, or a JSON file of the same shape given by path."""
    from pydantic import ValidationError

    path = expand_user(name_or_path)
    if path.exists() or name_or_path.endswith(".json"):
        text = read_user_text(path, "scaling law")
    else:
        entry = _laws_dir().joinpath(f"{name_or_path}.json")
        if not entry.is_file():
            raise PlannerError(f"unknown scaling law {name_or_path!r}; known: {', '.join(list_laws())} (or a path to a .json)")
        text = entry.read_text()
    try:
        return ScalingLaw.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise PlannerError(f"scaling law {name_or_path!r} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlannerError(f"scaling law {name_or_path!r} is not valid: {where + ': ' if where else ''}"
                           f"{first['msg'].removeprefix('Value error, ')} (see models_catalog/scaling_laws/ for the shape)") from None


# --------------------------------------------------------------------------------------------
# The two published forms


def chinchilla_loss(params_n, tokens_d, E, A, B, alpha, beta):
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Eq. 2 and Eq. 10)."""
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    return E + A * n ** (-alpha) + B * d ** (-beta)


def kaplan_loss(params_n, tokens_d, N_c, D_c, alpha_N, alpha_D):
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020, Eq. 1.5).

    N counts non-embedding parameters only (Kaplan et al. 2020, section 1.2).
    """
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    return ((N_c / n) ** (alpha_N / alpha_D) + D_c / d) ** alpha_D


def predict_loss(law: ScalingLaw, params_n, tokens_d, unique_tokens=None):
    """The law's loss at (N, D); with ``unique_tokens`` (U) the data-constrained form."""
    if unique_tokens is not None:
        return data_constrained_loss(law, params_n, tokens_d, unique_tokens)
    if law.form == "chinchilla":
        return chinchilla_loss(params_n, tokens_d, law.E, law.A, law.B, law.alpha, law.beta)
    return kaplan_loss(params_n, tokens_d, law.N_c, law.D_c, law.alpha_N, law.alpha_D)


def require_chinchilla_form(law: ScalingLaw, what: str) -> None:
    """A PlannerError unless ``law`` is of the form E + A/N^alpha + B/D^beta, which ``what`` needs."""
    if law.form != "chinchilla":
        raise PlannerError(f"{what} needs a law of the form E + A/N^alpha + B/D^beta; {law.name!r} is {law.form}")


# --------------------------------------------------------------------------------------------
# Compute-optimal size for given data (and back), which the data-constrained law needs


def allocation_constant(law: ScalingLaw) -> float:
    """G = (alpha A / (beta B))^(1 / (alpha + beta)) (Hoffmann et al. 2022, Eq. 4)."""
    require_chinchilla_form(law, "the closed-form allocation")
    return (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / (law.alpha + law.beta))


def optimal_params_for_tokens(law: ScalingLaw, tokens_d):
    """N for which D tokens are compute-optimal: N = G (D G)^(beta / alpha).

    Inverts D* = G^-1 (C/6)^(alpha/(alpha+beta)); the `D_to_N` of huggingface/datablations
    (README, 'Parametric Fit'), used there for U_N.
    """
    g = allocation_constant(law)
    return g * (np.asarray(tokens_d, dtype=np.float64) * g) ** (law.beta / law.alpha)


def optimal_tokens_for_params(law: ScalingLaw, params_n):
    """D for which N parameters are compute-optimal: the inverse of :func:`optimal_params_for_tokens`."""
    g = allocation_constant(law)
    return (np.asarray(params_n, dtype=np.float64) / g) ** (law.alpha / law.beta) / g


# --------------------------------------------------------------------------------------------
# Repeated data (Muennighoff et al. 2023)


def effective_tokens(unique_tokens, tokens_d, r_d_star):
    """Effective data D' = U + U R_D* (1 - exp(-R_D / R_D*)), R_D = D / U - 1 repetitions.

    Muennighoff et al. 2023, Eq. (5): the k-th repetition of a token is worth less than a fresh
    one; as R_D grows D' saturates at U (1 + R_D*). With D <= U (no repetition) D' = D.
    """
    u = np.asarray(unique_tokens, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    u_used = np.minimum(u, d)
    r = np.maximum(d / u_used - 1.0, 0.0)
    return u_used + u_used * r_d_star * (1.0 - np.exp(-r / r_d_star))


def effective_params(params_n, unique_params_n, r_n_star):
    """Effective parameters N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)), R_N = N / U_N - 1.

    Muennighoff et al. 2023, Eq. (6): parameters beyond U_N, the compute-optimal size for the
    unique data, decay in value like repeated tokens.
    """
    n = np.asarray(params_n, dtype=np.float64)
    u_n = np.minimum(n, np.asarray(unique_params_n, dtype=np.float64))
    r = np.maximum(n / u_n - 1.0, 0.0)
    return u_n + u_n * r_n_star * (1.0 - np.exp(-r / r_n_star))


def data_constrained_loss(law: ScalingLaw, params_n, tokens_d, unique_tokens):
    """L = E + A / N'^alpha + B / D'^beta with U_D = min(U, D), U_N = min(N, N*(U_D)).

    Muennighoff et al. 2023, Eq. (7), exactly as the `scaling_law(N, D, U)` of the
    huggingface/datablations README: D' from :func:`effective_tokens`, N' from
    :func:`effective_params` with U_N the compute-optimal size for the unique tokens.
    """
    require_chinchilla_form(law, "the data-constrained law")
    if law.repetition is None:
        raise PlannerError(f"law {law.name!r} has no repetition constants (R_D*, R_N*); use one that has, e.g. muennighoff2023")
    rep = law.repetition
    n = np.asarray(params_n, dtype=np.float64)
    d = np.asarray(tokens_d, dtype=np.float64)
    u = np.minimum(np.asarray(unique_tokens, dtype=np.float64), d)
    d_eff = effective_tokens(u, d, rep.r_d_star)
    n_eff = effective_params(n, optimal_params_for_tokens(law, u), rep.r_n_star)
    return law.E + law.A * n_eff ** (-law.alpha) + law.B * d_eff ** (-law.beta)
