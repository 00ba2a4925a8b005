"""Plans as data: the request and the answer, frozen pydantic models.

``PlanRequest`` is what the user asks (`planner plan` flags, or a plan file); ``Plan`` is what
``planner.search.planning.make_plan`` answers (the recommended run, the Pareto front, the binding
constraints, the stopping threshold). ``CompareRequest`` holds named allocations for
`planner compare`. Files are read and written by ``planner.io.planfiles``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planner.loss.evidence import TASKS
from planner.specs.vocabulary import MAX_COUNT, MAX_NUM_GPUS

Objective = Literal["loss", "cost", "time"]
ExportFormat = Literal["hf-trainer", "accelerate", "deepspeed", "torchtune", "torchtitan", "megatron"]
EXPORT_FORMATS: tuple[str, ...] = ExportFormat.__args__
METHODS_ALL = ("full", "lora", "qlora")

DEFAULT_PEFT_TOKEN_EFFICIENCY = {"full": 1.0, "lora": 0.5, "qlora": 0.5}
"""Used only when a fine-tuning plan is priced with the pre-training law (``finetune_law=None``,
`--finetune-law none`); by default each method has its own fine-tuning law (Zhang et al. 2024,
``planner.search.finetuning``) and eta is 1 unless the user gives a measured one.
Token efficiency eta of each method: a run with method m on D tokens is predicted to reach the
loss the law gives for eta * D tokens (and eta * the pool). Full fine-tuning is the law itself (1).
LoRA: Biderman et al. 2024 ("LoRA Learns Less and Forgets Less", arXiv:2405.09673, section 4.1)
find LoRA substantially below full fine-tuning in continued pretraining (20B tokens of code and
math) and closer in instruction tuning; they publish no token-equivalence, so 0.5 is an
ASSUMPTION, a placeholder to be replaced by a measurement (``--peft-efficiency``). QLoRA: Dettmers
et al. 2023 (arXiv:2305.14314, section 4, Table 3) find NF4 with double quantization matches
16-bit LoRA, so it takes LoRA's value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanRequest(_Frozen):
    """What to plan. Budgets are SI: FLOPs, US dollars, GPU-hours, seconds, tokens.

    ``models`` empty: pre-train from scratch and choose the size (a ladder of Llama-shaped
    models, see ``planner.search.candidates.synthetic_llama_config``); otherwise fine-tune one of them.
    ``num_gpus`` is the most GPUs available (the search also tries fewer); None leaves it free.
    The search axes (methods ... micro_batches) have documented defaults; narrowing them is
    how `planner compare` pins an allocation.
    """

    models: tuple[str, ...] = ()
    gpu: str | None = Field(None, description="catalog GPU; None: the default GPU (reported)")
    num_gpus: int | None = Field(None, gt=0, le=MAX_NUM_GPUS, description="GPUs available; None: free")
    price_usd_per_hour: float | None = Field(None, gt=0, description="per GPU-hour; None: the catalog's")
    compute_flops: float | None = Field(None, gt=0, description="training FLOP budget (6 N D convention)")
    budget_usd: float | None = Field(None, gt=0)
    gpu_hours: float | None = Field(None, gt=0)
    deadline_s: float | None = Field(None, gt=0, description="wall-clock limit of the run")
    data_pool_tokens: float | None = Field(None, gt=0, description="unique tokens available")
    max_epochs: float | None = Field(None, gt=0, description="passes over the kept data; None: as the law says")
    repeat: bool = Field(True, description="allow repeating data (Muennighoff et al. 2023)")
    objective: Objective = "loss"
    target_loss: float | None = Field(None, gt=0, description="objective cost/time: cheapest/fastest reaching this")
    loss_tolerance: float = Field(0.01, ge=0, description="objective cost/time without target: best loss + this")
    law: str = "besiroglu2024"
    calibration: str | None = Field(None, description="calibration profile JSON (planner calibrate)")
    confidence: float | None = Field(None, ge=0.5, lt=1, description="hold deadline/dollar/GPU-hour budgets at this "
                                     "quantile of the step time (planner.cost.timing.grounding), 0.5 (the median) to "
                                     "below 1; None: the median")
    seq_len: int = Field(2048, gt=0)
    global_batch_tokens: int = Field(2**19, gt=0, description="tokens per optimizer step (grad accumulation fills it)")
    methods: tuple[Literal["full", "lora", "qlora"], ...] = METHODS_ALL
    lora_ranks: tuple[int, ...] = (16,)
    peft_efficiency: dict[str, float] | None = Field(None, description="token efficiency per method; None: 1 under "
                                                     "the fine-tuning law (it prices the method), else the placeholders")
    optimizers: tuple[Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd", "lion"], ...] = ("adamw",)
    checkpointing: tuple[Literal["none", "selective", "full"], ...] = ("none", "selective", "full")
    zero: tuple[Literal[0, 1, 2, 3], ...] = (0, 1, 2, 3)
    tensor_parallel: tuple[int, ...] = (1, 2, 4, 8)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    gpu_counts: tuple[int, ...] | None = Field(None, description="GPU counts to try; None: powers of two up to num_gpus")
    selection: tuple[str, ...] | None = Field(None, description="data-selection methods; None: every catalog method that applies")
    keep_fractions: tuple[float, ...] | None = Field(None, description="fractions of the pool kept; None: a grid per method")
    strategies: tuple[Literal["hard", "easy"], ...] = ("hard", "easy")
    tokens: float | None = Field(None, gt=0, description="fix the training tokens (repeats counted)")
    epochs: float | None = Field(None, gt=0, description="fix the passes over the kept data (needs a pool)")
    token_grid: int = Field(12, ge=0, description="token counts tried below the budget's: a sqrt(2) lattice down to 1/2^(n/2) of it")
    task: Literal[TASKS] | None = Field(None, description="what the run is for; chooses the selection methods with "
                                        "evidence (None: pretraining, or instruction-tuning when fine-tuning)")
    beyond_evidence: bool = Field(False, description="lift the plausibility defaults and use every selection method")
    tokens_per_param: tuple[float, float] | None = Field(None, description="pre-training: allowed D/N range; None: the law's evidence")
    inference_tokens: float | None = Field(None, ge=0, description="tokens served over the model's life (Sardana et al. 2024)")
    inference_cost_ratio: float = Field(1.0, gt=0, description="cost of an inference FLOP over a training FLOP (1: compute framing)")
    finetune_law: str | None = Field("zhang2024", description="fine-tuning loss law file; None: the pre-training law")
    finetune_task: str = Field("wmt14-en-de", description="task of the fine-tuning law's constants")
    tokens_per_example: float = Field(512.0, gt=0, description="mean tokens of one fine-tuning example (the law counts examples)")
    stacks: tuple[Literal["hf", "torchtune", "torchtitan", "megatron"], ...] = Field(
        ("hf",), description="training stacks to search (planner.search.stacks); 'any': every priced stack")
    compile: bool | None = Field(None, description="torch.compile on the stacks that price it (torchtune, torchtitan); "
                                 "None: searched (the compiled twin first, planner.search.stacks)")
    packed: bool = Field(False, description="the data is packed (torchtune's dataset.packed: its block-causal mask "
                         "priced); stacks that do not price packing run unpacked")
    cluster: str | None = Field(None, description="catalog cluster for the network (models_catalog/clusters.json); "
                                "None: 8 GPUs per node, 400 Gb/s per GPU between nodes")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value):
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError("models must be a model name, a comma-separated string or a list of names")
        return tuple(value)

    @field_validator("stacks", mode="before")
    @classmethod
    def _split_stacks(cls, value):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and "any" in value:
            value = ("hf", "torchtune", "torchtitan", "megatron")
        if not value:
            raise ValueError("stacks is empty: use hf, torchtune, torchtitan, megatron or any")
        return tuple(dict.fromkeys(value))

    @field_validator("lora_ranks", "micro_batches", "tensor_parallel")
    @classmethod
    def _positive(cls, value):
        if not value or any(not 0 < int(v) <= MAX_COUNT for v in value):
            raise ValueError(f"must be a non-empty list of positive integers of at most {MAX_COUNT:,}")
        return tuple(int(v) for v in value)

    @field_validator("keep_fractions")
    @classmethod
    def _fractions(cls, value):
        if value is not None and (not value or any(not 0 < f <= 1 for f in value)):
            raise ValueError("keep fractions must be in (0, 1]")
        return value

    @model_validator(mode="after")
    def _check(self):
        if not self.methods:
            raise ValueError("methods is empty: use full, lora and/or qlora")
        for method in self.methods:
            eta = self.efficiency(method)
            if eta is None or not 0 < eta <= 1:
                raise ValueError(f"peft_efficiency[{method!r}] must be in (0, 1], got {eta}")
        if self.tokens_per_param is not None and not 0 < self.tokens_per_param[0] <= self.tokens_per_param[1]:
            raise ValueError("tokens_per_param must be (low, high) with 0 < low <= high")
        if self.epochs is not None and self.data_pool_tokens is None:
            raise ValueError("epochs needs a data pool (data_pool_tokens / --data-pool)")
        if self.tokens is not None and self.epochs is not None:
            raise ValueError("give tokens or epochs, not both")
        if self.gpu_counts is not None and (not self.gpu_counts or any(not 0 < g <= MAX_NUM_GPUS for g in self.gpu_counts)):
            raise ValueError(f"gpu_counts must be positive integers of at most {MAX_NUM_GPUS}")
        return self

    @property
    def pretrain(self) -> bool:
        return not self.models

    @property
    def uses_finetune_law(self) -> bool:
        return not self.pretrain and self.finetune_law is not None

    def efficiency(self, method: str) -> float | None:
        """Token efficiency of a method: the request's, else 1 where the fine-tuning law prices the
        method, else ``DEFAULT_PEFT_TOKEN_EFFICIENCY`` (the placeholder of the pre-training law)."""
        if self.peft_efficiency is not None:
            return self.peft_efficiency.get(method, 1.0 if method == "full" else None)
        return 1.0 if self.uses_finetune_law else DEFAULT_PEFT_TOKEN_EFFICIENCY[method]


class Allocation(_Frozen):
    """One named allocation of `planner compare`: every field left None is chosen by the planner."""

    name: str
    model: str | None = None
    method: Literal["full", "lora", "qlora"] | None = None
    lora_rank: int | None = Field(None, gt=0)
    num_gpus: int | None = Field(None, gt=0)
    checkpointing: Literal["none", "selective", "full"] | None = None
    zero: Literal[0, 1, 2, 3] | None = None
    tensor_parallel: int | None = Field(None, gt=0)
    micro_batch: int | None = Field(None, gt=0)
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd", "lion"] | None = None
    stack: Literal["hf", "torchtune", "torchtitan", "megatron"] | None = None
    compile: bool | None = None
    packed: bool | None = None
    selection: str | None = None
    keep_fraction: float | None = Field(None, gt=0, le=1)
    strategy: Literal["hard", "easy"] | None = None
    tokens: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)


class CompareRequest(_Frozen):
    """`planner compare`: shared limits and hardware (a PlanRequest) and the allocations."""

    base: PlanRequest = Field(default_factory=PlanRequest)
    allocations: tuple[Allocation, ...]

    @model_validator(mode="after")
    def _names(self):
        if not self.allocations:
            raise ValueError("no allocations to compare")
        names = [a.name for a in self.allocations]
        if len(set(names)) != len(names):
            raise ValueError(f"allocation names repeat: {', '.join(names)}")
        return self


class Candidate(_Frozen):
    """One evaluated run: the set-up, the data, and what it predicts (SI units)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str
    params: float = Field(description="N as the law counts it")
    tokens: float = Field(description="D, training tokens, repeats counted")
    loss: float
    cost_usd: float
    time_s: float
    gpu_hours: float
    compute_flops: float = Field(description="budget FLOPs: training (6 N D scaled by the method's work) + scoring")
    method: str
    lora_rank: int | None = None
    precision: str
    optimizer: str
    checkpointing: str
    num_gpus: int
    zero: int
    tensor_parallel: int
    pipeline_parallel: int = 1  # 1F1B stages (planner.search.pipelines)
    sequence_parallel: bool = False
    micro_batch: int
    grad_accum: int
    seq_len: int
    global_batch_tokens: int
    steps: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    time_s_low: float | None = Field(None, description="80% interval of time_s (planner.cost.timing.intervals)")
    time_s_high: float | None = None
    cost_usd_low: float | None = Field(None, description="80% interval of cost_usd (the same factors)")
    cost_usd_high: float | None = None
    step_time_s_low: float | None = None
    step_time_s_high: float | None = None
    tokens_per_s_low: float | None = None
    tokens_per_s_high: float | None = None
    mfu_low: float | None = None
    mfu_high: float | None = None
    interval_basis: str = Field("", description="what the 80% interval comes from")
    confidence: float | None = Field(None, description="the request's --confidence: budgets of time, dollars and "
                                     "GPU-hours are held at this quantile of the run's time")
    held_factor: float = Field(1.0, description="the run's time (and dollars, GPU-hours) at ``confidence`` over "
                               "the predicted (median) one; 1 without a confidence")
    peak_bytes: float
    usable_bytes: float
    selection: str
    keep_fraction: float
    strategy: str
    unique_tokens: float | None = None
    epochs: float | None = None
    scoring_flops: float = 0.0
    loss_law: str = ""
    loss_trust: str = Field("", description="fitted | held-out | extrapolated: where the point sits in the law's evidence")
    loss_extrapolation: float = Field(1.0, description="how many times beyond the law's fitted ranges (1: inside)")
    inference_flops: float = 0.0
    inference_cost_usd: float = 0.0
    stack: str = Field("hf", description="training stack (planner.search.stacks)")
    techniques: list[str] = Field(default_factory=list, description="techniques beyond the stack's defaults, in words")
    setup_fields: dict[str, bool | str] = Field(default_factory=dict, description="the TrainingSetup fields of the "
                                                "stack's techniques (loss_impl, optimizer_impl, compile, packed, ...)")


class ConstraintReport(_Frozen):
    name: str
    limit: float
    used: float
    unit: str
    binding: bool
    slack_fraction: float = Field(description="1 - used / limit")
    loss_change_if_relaxed: float | None = Field(
        None, description="best loss with this limit 10% looser minus the best loss now (negative: relaxing helps)"
    )
    kind: Literal["budget", "hardware", "data", "plausibility"] = "budget"
    source: str = Field("", description="where a plausibility default comes from, or what the limit excluded")
    quantile: float | None = Field(None, description="a time, dollar or GPU-hour budget held at this quantile of the "
                                   "run's time (--confidence): ``used`` is the run's use at it")


class Stopping(_Frozen):
    threshold: float | None = Field(description="lambda: loss per unit of the binding budget; None when no budget binds")
    threshold_unit: str
    cost_per_step: float | None
    planned_steps: int
    stop_step: int
    loss_at_stop: float
    curve_step: list[float]
    curve_loss: list[float]
    note: str


class ContinuousCheck(_Frozen):
    """The geometric program over (N, D) and its agreement with the grid's recommendation."""

    params: float
    tokens: float
    loss: float
    duals: dict[str, float] = Field(description="constraint -> dual value (d log objective / d log limit)")
    binding: list[str]
    grid_params: float
    grid_tokens: float
    grid_loss: float
    params_rel_diff: float
    tokens_rel_diff: float
    loss_rel_diff: float
    note: str


class SearchStats(_Frozen):
    setups_evaluated: int = Field(description="categorical set-ups whose memory was computed")
    rows_feasible: int = Field(description="set-up x micro-batch x rank rows that fit in memory")
    candidates: int = Field(description="set-up x data candidates covered by the search")
    candidates_scored: int = Field(description="candidates whose loss, cost and time were computed")
    wall_s: float


class Evidence(_Frozen):
    """Where the plan stands against the evidence of its models, and what going beyond would gain."""

    task: str
    beyond_evidence: bool
    methods: list[str] = Field(description="selection methods with evidence for the task")
    max_epochs: float | None
    tokens_per_param: tuple[float, float] | None
    notes: list[str]
    beyond_loss: float | None = Field(None, description="best loss with every plausibility limit lifted")
    beyond_gain: float | None = Field(None, description="beyond_loss - recommended loss (negative: what beyond would gain)")
    beyond_plan: str = ""


class InferenceAware(_Frozen):
    """Training plus lifetime inference (Sardana et al. 2024): the plan that reaches the same loss cheapest."""

    inference_tokens: float
    target_loss: float
    unit: Literal["FLOP", "USD"]
    training_only: Candidate = Field(description="the best plan counting training alone")
    training_only_total: float
    recommended_total: float
    savings_fraction: float
    analytic_params: float | None = Field(None, description="Sardana et al.'s continuous optimum N for the target "
                                          "(planner.loss.inference_aware; pre-training only)")
    analytic_tokens: float | None = None
    note: str


class Plan(_Frozen):
    request: PlanRequest
    mode: Literal["pretrain", "finetune"]
    gpu: str
    price_usd_per_hour: float
    law: str
    recommended: Candidate
    pareto: list[Candidate]
    constraints: list[ConstraintReport]
    stopping: Stopping
    continuous: ContinuousCheck | None = None
    assumptions: list[str]
    search: SearchStats
    evidence: Evidence | None = None
    inference: InferenceAware | None = None


class Comparison(_Frozen):
    request: CompareRequest
    rows: list[dict]
