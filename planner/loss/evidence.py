"""The domain of evidence of the loss models, and the plausibility limits a plan keeps by default.

Every model the planner optimizes over rests on published runs, and an optimizer left alone runs
to wherever a model is most optimistic, which is usually where no run was made. This module reads
the evidence shipped beside the constants (``evidence`` in each scaling law file and in each
method of ``models_catalog/pruning_methods.json``) and turns it into limits:

* a task (``TASKS``) chooses the selection methods whose published results cover its setting
  (``methods_for_task``): LESS (influence with LoRA gradients) is evidence for instruction tuning,
  perplexity filtering and deduplication for pre-training (the survey's point that the best subset
  depends on the task, made mechanical);
* repetition: at most ``PRETRAIN_MAX_EPOCHS`` passes over the kept data in pre-training
  (Muennighoff et al. 2023) and ``FINETUNE_MAX_EPOCHS`` in fine-tuning;
* tokens per parameter in pre-training within the central 90% of the runs the law was fitted on
  (``law.evidence["tokens_per_param_central90"]``);
* kept fractions within the range of the method's results (``evidence["keep_fractions"]``).

Each default is overridable (``PlanRequest.max_epochs``, ``tokens_per_param``, ``keep_fractions``)
and all are lifted together by ``beyond_evidence``; the plan reports which bind and what going
beyond would gain. Sizes beyond a law's fitted N are not limited (extrapolating in scale is what
a scaling law is for; Hoffmann et al. chose Chinchilla 70B that way) but reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import PlannerError

TASKS = ("pretraining", "continued-pretraining", "domain-adaptation", "instruction-tuning", "preference")
TASK_SETTINGS = {
    "pretraining": ("pre-training",),
    "continued-pretraining": ("continued-pre-training",),
    "domain-adaptation": ("continued-pre-training",),
    "instruction-tuning": ("instruction-tuning",),
    "preference": ("preference",),
}
"""The settings of published results that count as evidence for each task."""
DEFAULT_PRETRAIN_TASK = "pretraining"
DEFAULT_FINETUNE_TASK = "instruction-tuning"
"""A fine-tuning plan with no --task is planned as instruction tuning (the commonest fine-tune; reported)."""

PRETRAIN_MAX_EPOCHS = 4.0
PRETRAIN_EPOCHS_SOURCE = ("Muennighoff et al. 2023 (arXiv:2305.16264, abstract): up to 4 epochs of repeated data "
                          "change the loss negligibly against unique data; beyond, returns decay (R_D* = 15.4)")
FINETUNE_MAX_EPOCHS = 5.0
FINETUNE_EPOCHS_SOURCE = ("usual fine-tuning practice, 1-5 epochs: Stanford Alpaca 3 (Taori et al. 2023), Tulu 2 "
                          "(Wang et al. 2023), Hugging Face TrainingArguments' default num_train_epochs = 3")
TOKENS_PER_PARAM_SOURCE = "the central 90% of D/N over the runs {law} was fitted on ({where})"


@dataclass(frozen=True)
class Plausibility:
    """The limits a plan keeps: which methods, how many epochs, how many tokens per parameter."""

    task: str
    beyond_evidence: bool
    max_epochs: float | None  # None: no limit
    max_epochs_source: str
    tokens_per_param: tuple[float, float] | None  # pre-training only; None: no limit
    tokens_per_param_source: str
    methods: tuple[str, ...] | None  # selection methods with evidence for the task; None: every method

    def relaxed(self) -> Plausibility:
        """Every limit lifted: what the models alone would recommend."""
        return Plausibility(self.task, True, None, "beyond the evidence", None, "beyond the evidence", None)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise PlannerError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return task


def method_settings(method) -> tuple[str, ...]:
    """The settings a pruning method's published results cover (``PruningMethod.evidence``)."""
    return tuple((method.evidence or {}).get("settings") or ())


def applies_to(method, task: str) -> bool:
    return any(s in TASK_SETTINGS[check_task(task)] for s in method_settings(method))


def keep_fraction_range(method) -> tuple[float, float] | None:
    """The kept fractions the method's results cover (None: not recorded)."""
    rng = (method.evidence or {}).get("keep_fractions")
    return None if rng is None else (float(rng[0]), float(rng[1]))


def methods_for_task(task: str) -> tuple[str, ...]:
    """Catalog selection methods with evidence in the task's setting."""
    from planner.loss import pruning

    return tuple(m for m in pruning.list_methods() if applies_to(pruning.load_method(m), task))


def law_tokens_per_param(law) -> tuple[tuple[float, float] | None, str]:
    """The law's central-90% tokens-per-parameter range and where it comes from (None: not recorded)."""
    ev = law.evidence or {}
    rng = ev.get("tokens_per_param_central90")
    if rng is None:
        return None, f"{law.name} records no tokens-per-parameter range: not limited"
    return (float(rng[0]), float(rng[1])), TOKENS_PER_PARAM_SOURCE.format(law=law.name, where=ev.get("where", "")[:90] + "...")


def law_params_range(law) -> tuple[float, float] | None:
    rng = (law.evidence or {}).get("params")
    return None if rng is None else (float(rng[0]), float(rng[1]))


def plausibility(law, pretrain: bool, task: str | None = None, max_epochs: float | None = None,
                 tokens_per_param: tuple[float, float] | None = None, beyond_evidence: bool = False) -> Plausibility:
    """The limits of a plan: the task's methods, the epochs and tokens-per-parameter defaults (cited),
    each replaced by the request's value; ``beyond_evidence`` lifts the defaults (not the user's own)."""
    task = check_task(task or (DEFAULT_PRETRAIN_TASK if pretrain else DEFAULT_FINETUNE_TASK))
    if max_epochs is not None:
        epochs, epochs_source = float(max_epochs), "--max-epochs"
    elif beyond_evidence:
        epochs, epochs_source = None, "beyond the evidence"
    elif pretrain:
        epochs, epochs_source = PRETRAIN_MAX_EPOCHS, PRETRAIN_EPOCHS_SOURCE
    else:
        epochs, epochs_source = FINETUNE_MAX_EPOCHS, FINETUNE_EPOCHS_SOURCE
    if not pretrain:
        tpp, tpp_source = None, "fine-tuning: the base model's size is given"
    elif tokens_per_param is not None:
        tpp, tpp_source = (float(tokens_per_param[0]), float(tokens_per_param[1])), "--tokens-per-param"
    elif beyond_evidence:
        tpp, tpp_source = None, "beyond the evidence"
    else:
        tpp, tpp_source = law_tokens_per_param(law)
    methods = None if beyond_evidence else methods_for_task(task)
    return Plausibility(task, beyond_evidence, epochs, epochs_source, tpp, tpp_source, methods)
