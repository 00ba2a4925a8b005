"""Fine-tuning loss: the multiplicative joint law of Zhang, Liu, Cherry, Firat 2024 ("When Scaling
Meets LLM Finetuning", ICLR 2024, arXiv:2402.17193, Eq. 1):

    L(X, D_f) = A / (X^alpha D_f^beta) + E,

X the base model's size (or its pretraining tokens, or the PEFT parameter size), D_f the number
of fine-tuning examples. Constants per task and method are data:
``models_catalog/finetune_laws/zhang2024.json`` (Table 4, with the ranges they were fitted on
and the held-out errors of Table 6). Methods: ``full`` is the paper's FMT, ``lora`` its LoRA
(rank 4 on attention and FFN), ``prompt`` its prompt tuning; ``qlora`` uses LoRA's law (the
file's ``qlora_assumption``: Dettmers et al. 2023 find NF4 QLoRA matches 16-bit LoRA).

Every prediction says which law produced it and how far it can be trusted: inside the fitted
ranges of X and D_f, inside the range the paper held out and measured its error on, or an
extrapolation (by how many times the largest value it rests on). The paper's base models are
1B-16B bilingual LLMs fine-tuned on translation and summarization, and its L is the test
perplexity the paper reports (log scale); transferring a law to another task or model family
is itself an extrapolation, which :func:`fit_finetune_law` on the user's own runs removes.
Vectorized over X and D_f.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib.resources import files

import numpy as np

from planner.errors import PlannerError
from planner.loss import fitting

METHOD_TO_PAPER = {"full": "fmt", "lora": "lora", "qlora": "lora", "prompt": "prompt"}
TRUST = ("fitted", "held-out", "extrapolated")
DEFAULT_TASK = "wmt14-en-de"


def _arr(x):
    return np.asarray(x, dtype=np.float64)


def multiplicative_law(x, d_f, A, alpha, beta, E):
    """L = A / (X^alpha D_f^beta) + E (Zhang et al. 2024, Eq. 1)."""
    return A * _arr(x) ** (-alpha) * _arr(d_f) ** (-beta) + E


@dataclass(frozen=True)
class FinetuneLaw:
    """One fitted law with the ranges it rests on."""

    name: str
    A: float
    alpha: float
    beta: float
    E: float
    factor: str = "model_size"  # what X is: model_size | pretraining_tokens | pet_size
    task: str = ""
    method: str = ""
    x_fitted: tuple[float, float] = (0.0, math.inf)
    x_heldout_max: float = math.inf
    d_f_fitted: tuple[float, float] = (0.0, math.inf)
    d_f_heldout_max: float = math.inf
    heldout_mad: float = math.nan  # mean absolute deviation of L on held-out points
    source: str = ""

    def loss(self, x, d_f):
        return multiplicative_law(x, d_f, self.A, self.alpha, self.beta, self.E)

    def trust(self, x, d_f):
        """Per point: 'fitted' (both inside the fitted ranges), 'held-out' (within the range the
        source measured its held-out error on) or 'extrapolated'."""
        x, d = np.broadcast_arrays(_arr(x), _arr(d_f))
        inside = (x >= self.x_fitted[0]) & (x <= self.x_fitted[1]) & (d >= self.d_f_fitted[0]) & (d <= self.d_f_fitted[1])
        held = (x >= self.x_fitted[0]) & (x <= self.x_heldout_max) & (d >= self.d_f_fitted[0]) & (d <= self.d_f_heldout_max)
        return np.where(inside, "fitted", np.where(held, "held-out", "extrapolated"))

    def extrapolation_factor(self, x, d_f):
        """How many times beyond (or below) the fitted ranges, the larger of X's and D_f's; 1 inside."""
        def factor(v, lo, hi):
            v = _arr(v)
            return np.maximum(np.maximum(v / hi, lo / np.maximum(v, 1e-300)), 1.0)
        return np.maximum(factor(x, *self.x_fitted), factor(d_f, *self.d_f_fitted))


def _laws_file(name: str):
    return files("models_catalog").joinpath("finetune_laws", f"{name}.json")


def load_finetune_laws(name: str = "zhang2024") -> dict:
    """The catalog file as a dict: ``laws`` become :class:`FinetuneLaw` objects (by name)."""
    entry = _laws_file(name)
    if not entry.is_file():
        raise PlannerError(f"unknown fine-tuning law file {name!r}; known: zhang2024")
    raw = json.loads(entry.read_text())
    raw["laws"] = {law["name"]: FinetuneLaw(
        law["name"], law["A"], law["alpha"], law["beta"], law["E"], law["factor"], law["task"], law["method"],
        tuple(law["x_fitted"]), law["x_heldout_max"], tuple(law["d_f_fitted"]), law["d_f_heldout_max"],
        law["heldout_mad"] if law["heldout_mad"] is not None else math.nan, raw["citation"]) for law in raw["laws"]}
    return raw


def finetune_law(method: str, task: str = DEFAULT_TASK, factor: str = "model_size", name: str = "zhang2024") -> FinetuneLaw:
    """The catalog law for a planner method (full, lora, qlora, prompt) on a task."""
    if method not in METHOD_TO_PAPER:
        raise PlannerError(f"unknown fine-tuning method {method!r}; known: {', '.join(METHOD_TO_PAPER)}")
    laws = load_finetune_laws(name)
    key = f"{name}-{task}-{METHOD_TO_PAPER[method]}-{ {'model_size': 'model', 'pretraining_tokens': 'pretraining', 'pet_size': 'pet'}.get(factor, factor)}"
    if key not in laws["laws"]:
        tasks = sorted({law.task for law in laws["laws"].values()})
        raise PlannerError(f"no {name} law for method {method!r}, task {task!r}, factor {factor!r}; tasks: {', '.join(tasks)}")
    return laws["laws"][key]


@dataclass(frozen=True)
class FinetuneLoss:
    """A predicted fine-tuning loss with its provenance (arrays broadcast over N and D_f)."""

    loss: object
    law: str  # which law produced it
    method: str
    trust: object  # 'fitted' | 'held-out' | 'extrapolated' per point
    extrapolation_factor: object  # 1 inside the fitted ranges
    heldout_mad: float  # the source's held-out error where trust is 'fitted' or 'held-out'
    notes: tuple[str, ...]


def predict_finetune_loss(params_n, finetune_examples, method: str = "lora", *, task: str = DEFAULT_TASK,
                          law: FinetuneLaw | None = None) -> FinetuneLoss:
    """Fine-tuning loss of a base model of ``params_n`` parameters fine-tuned on
    ``finetune_examples`` examples with ``method`` (full, lora, qlora, prompt); ``law`` replaces
    the catalog's (e.g. one fitted to the user's runs). Arrays broadcast."""
    law = law or finetune_law(method, task)
    n = fitting.require_finite_positive("base model parameters", np.atleast_1d(params_n)).reshape(np.shape(params_n))
    d = fitting.require_finite_positive("fine-tuning examples", np.atleast_1d(finetune_examples)).reshape(np.shape(finetune_examples))
    notes = [f"law {law.name}: {law.source or 'user fit'}"]
    if method == "qlora":
        notes.append("qlora: LoRA's law (NF4 QLoRA matches 16-bit LoRA, Dettmers et al. 2023); not measured by Zhang et al.")
    if law.task and law.source:
        notes.append(f"fitted on task {law.task} (bilingual 1B-16B LLMs, test perplexity); another task or model family is an extrapolation")
    return FinetuneLoss(law.loss(n, d), law.name, method, law.trust(n, d), law.extrapolation_factor(n, d), law.heldout_mad, tuple(notes))


def predict_finetune_loss_tokens(params_n, finetune_tokens, tokens_per_example, method: str = "lora", **kwargs) -> FinetuneLoss:
    """The same from fine-tuning tokens: Zhang et al. count D_f in examples, so the tokens are
    divided by the dataset's mean tokens per example (no default: it is the user's data)."""
    per = fitting.require_finite_positive("tokens per example", np.atleast_1d(tokens_per_example))
    return predict_finetune_loss(params_n, _arr(finetune_tokens) / per.reshape(np.shape(tokens_per_example)), method, **kwargs)


def critical_examples_equal_gap(law_1: FinetuneLaw, law_2: FinetuneLaw, x):
    """D_f at which method 1 and 2 differ by exactly E_1 - E_2 (Zhang et al. Eq. 3): H X^gamma,
    H = (A_1 / A_2)^(1 / (beta_1 - beta_2)), gamma = (alpha_2 - alpha_1) / (beta_1 - beta_2)."""
    if law_1.beta == law_2.beta:
        raise PlannerError("equal data exponents: the two laws never cross in D_f")
    h = (law_1.A / law_2.A) ** (1.0 / (law_1.beta - law_2.beta))
    gamma = (law_2.alpha - law_1.alpha) / (law_1.beta - law_2.beta)
    return h * _arr(x) ** gamma


def crossover_examples(law_1: FinetuneLaw, law_2: FinetuneLaw, x, lo: float = 1.0, hi: float = 1e12):
    """D_f where the two laws predict the same loss (the paper's Figure 5, found there with
    scipy's fsolve), by bisection on log D_f; nan where they do not cross in [lo, hi]."""
    x = _arr(x)
    def gap(log_d):
        return law_1.loss(x, np.exp(log_d)) - law_2.loss(x, np.exp(log_d))
    a, b = np.full_like(x, math.log(lo)), np.full_like(x, math.log(hi))
    ga = gap(a)
    crosses = np.sign(ga) != np.sign(gap(b))
    for _ in range(100):
        mid = 0.5 * (a + b)
        same = np.sign(gap(mid)) == np.sign(ga)
        a, b = np.where(same, mid, a), np.where(same, b, mid)
    return np.where(crosses, np.exp(0.5 * (a + b)), np.nan)


def _objective(theta, log_x, log_d, loss, delta):
    """Huber(L_pred - L) summed, with its gradient in (a, e, alpha, beta); A = e^a, E = e^e."""
    a, e, alpha, beta = theta
    term = np.exp(a - alpha * log_x - beta * log_d)
    r = term + math.exp(e) - loss
    g = fitting.huber_grad(r, delta)
    grad = np.array([np.dot(g, term), math.exp(e) * g.sum(), -np.dot(g, term * log_x), -np.dot(g, term * log_d)])
    return float(np.sum(fitting.huber(r, delta))), grad


BOUNDS = [(-20.0, 40.0), (-10.0, 5.0), (-1.0, 3.0), (-1.0, 3.0)]


def _fit(log_x, log_d, loss, delta, starts=None):
    """Best L-BFGS optimum from the starts; by default a grid over (log A, log E, alpha, beta)
    screened by its objective, the 6 best polished (the grid of Hoffmann et al. appendix D.2, coarser)."""
    def objective(t):
        return _objective(t, log_x, log_d, loss, delta)
    if starts is None:
        grid = np.array([(a0, e0, al, be) for a0 in (0.0, 5.0, 10.0, 15.0) for e0 in (-2.0, -1.0, 0.0, 0.5)
                         for al in (0.0, 0.2, 0.5) for be in (0.0, 0.1, 0.3)])
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.array([objective(g)[0] for g in grid])
        starts = grid[np.argsort(np.where(np.isfinite(values), values, np.inf))[:6]]
    best, best_f = None, math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        for x0 in starts:
            x, f, ok = fitting.lbfgs(objective, x0, bounds=BOUNDS)
            if ok and np.isfinite(f) and f < best_f:
                best, best_f = x, f
    if best is None:
        raise PlannerError("the fine-tuning law fit did not converge from any starting point")
    return best


def fit_finetune_law(x, finetune_examples, loss, *, name: str = "user-fit", factor: str = "model_size",
                     delta: float = 1e-3) -> tuple[FinetuneLaw, dict]:
    """Fit A, alpha, beta, E to the user's runs as Zhang et al. do (Huber, delta 1e-3, L-BFGS from
    a grid of starts). Returns the law (its held-out error from leave-one-run-out) and a report:
    in-sample and leave-one-out mean absolute deviations of L."""
    x = fitting.require_finite_positive("x (base model size)", x)
    d = fitting.require_finite_positive("fine-tuning examples", finetune_examples)
    y = fitting.require_finite_positive("loss", loss)
    if not len(x) == len(d) == len(y):
        raise PlannerError("x, examples and loss need the same number of runs")
    if len(y) < 5:
        raise PlannerError(f"fitting A, alpha, beta and E needs at least 5 runs; got {len(y)}")
    if len(np.unique(x)) < 2 or len(np.unique(d)) < 2:
        raise PlannerError("the runs must vary both the base model size and the number of fine-tuning examples")
    lx, ld = np.log(x), np.log(d)
    with fitting.single_threaded_blas():
        theta = _fit(lx, ld, y, delta)
        loo = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            ti = _fit(lx[keep], ld[keep], y[keep], delta, starts=[theta])
            loo.append(abs(multiplicative_law(x[i], d[i], math.exp(ti[0]), ti[2], ti[3], math.exp(ti[1])) - y[i]))
    a, e, alpha, beta = (float(t) for t in theta)
    pred = multiplicative_law(x, d, math.exp(a), alpha, beta, math.exp(e))
    mad_in, mad_loo = float(np.mean(np.abs(pred - y))), float(np.mean(loo))
    law = FinetuneLaw(name, math.exp(a), alpha, beta, math.exp(e), factor, "", "", (float(x.min()), float(x.max())), float(x.max()),
                      (float(d.min()), float(d.max())), float(d.max()), mad_loo, "")
    return law, {"mad_in_sample": mad_in, "mad_leave_one_out": mad_loo, "runs": len(y)}
