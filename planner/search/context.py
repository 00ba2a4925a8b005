"""What a plan request resolves to before any search: the GPU, its price, the scaling law, the
calibration profile, the cluster's network, the memory a GPU may use (``Context``), and the limits the candidates must
respect (``Limits``).

A request that names no GPU gets ``DEFAULT_GPU`` (or the calibration profile's device) and no
price gets the catalog's; each such choice is written into the plan's assumptions. Step times and
peak memory of a calibrated request are the calibrated ones (``planner.cost.timing.step_time.step_time(
profile=)``, ``planner.cost.calibrated.calibrated_peak_bytes``) and its usable memory is the
profile's measured context and allocator reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.errors import PlannerError
from planner.loss import evidence, scaling
from planner.search.plan import PlanRequest

DEFAULT_GPU = "h100-sxm"
"""GPU used when a request names none (reported in the plan's assumptions)."""
RELAX = 0.10
"""Sensitivities: each limit loosened by 10% (the set-up side keeps what fits in 10% more memory)."""


@dataclass(frozen=True)
class Context:
    request: PlanRequest
    law: scaling.ScalingLaw
    gpu: object
    price: float
    usable_bytes: float
    profile: object
    assumptions: tuple[str, ...]
    plausibility: object = None  # planner.loss.evidence.Plausibility: the task's methods, epochs, tokens per parameter
    cluster: object = None  # planner.specs.cluster.ClusterSpec: the network every step time is priced on

    @property
    def gpus_per_node(self) -> int:
        """The cluster's GPUs per node: where a set-up's time interval changes regime."""
        return self.cluster.gpus_per_node if self.cluster is not None else 8

    def time_log_bounds(self, num_gpus, method, precision, micro_batch):
        """(low, high, beyond the profile) of set-ups' 80% time interval in log space
        (``planner.cost.timing.bounds.time_log_bounds``; arrays of one shape)."""
        from planner.cost.timing.bounds import time_log_bounds

        tokens = np.asarray(micro_batch) * self.request.seq_len
        return time_log_bounds(num_gpus, self.gpus_per_node, self.profile, method, precision, tokens)


@dataclass(frozen=True)
class Limits:
    """The budgets a candidate must stay within (None: no such limit) and the memory per GPU."""

    compute_flops: float | None
    budget_usd: float | None
    gpu_hours: float | None
    deadline_s: float | None
    usable_bytes: float

    def scaled(self, name: str, factor: float) -> Limits:
        values = dict(self.__dict__)
        values[name] = values[name] * factor
        return Limits(**values)


def limits_of(ctx: Context) -> Limits:
    r = ctx.request
    return Limits(r.compute_flops, r.budget_usd, r.gpu_hours, r.deadline_s, ctx.usable_bytes)


def _gpu_and_profile(request: PlanRequest, notes: list[str]):
    """The request's GPU and calibration profile (the profile's device when no GPU is named)."""
    from planner.specs.catalog import load_gpu

    profile = None
    if request.calibration:
        from planner.specs.profile import load_profile

        profile = load_profile(request.calibration)
    if request.gpu is not None:
        gpu = load_gpu(request.gpu)
        if profile is not None and not profile.matches(gpu):
            raise PlannerError(f"calibration profile {request.calibration} was measured on {profile.device.name}, not "
                               f"{gpu.name}: calibrate on {gpu.name} or leave out --gpu")
    elif profile is not None:
        gpu = profile.device_spec()
        notes.append(f"GPU: {gpu.name}, the calibration profile's device")
    else:
        gpu = load_gpu(DEFAULT_GPU)
        notes.append(f"GPU: {DEFAULT_GPU} (none given; pass --gpu)")
    return gpu, profile


def _price(request: PlanRequest, gpu, notes: list[str]) -> float:
    from planner.cost.timing.step_time import price_usd_per_gpu_hour

    price = request.price_usd_per_hour or price_usd_per_gpu_hour(gpu)
    if price is None:
        raise PlannerError(f"GPU {gpu.name} has no price in the catalog or throughput defaults; pass --price-usd-per-hour")
    if request.price_usd_per_hour is None:
        source = "catalog" if gpu.price_usd_per_hour is not None else "planner.cost.timing.step_time default"
        notes.append(f"price: ${price}/GPU-hour for {gpu.name} ({source}, indicative; pass --price-usd-per-hour)")
    return float(price)


def make_context(request: PlanRequest) -> Context:
    """The GPU, its price, the law and the calibration profile of a request, and the memory a GPU
    may allocate (the profile's measured context and allocator reserve when calibrated)."""
    from planner.search.fit import usable_allocated_bytes

    notes: list[str] = []
    law = scaling.load_law(request.law)
    gpu, profile = _gpu_and_profile(request, notes)
    price = _price(request, gpu, notes)
    if profile is not None:
        notes.append(f"calibration: {request.calibration} ({profile.device.name}, fitted: "
                     f"{', '.join(profile.corrections.fitted) or 'nothing'}) sets every set-up's peak_bytes, "
                     "usable_bytes, fits and step_time_s (planner.cost.memory.device)")
    usable = usable_allocated_bytes(gpu, profile)
    cluster = _cluster(request, gpu, notes)
    if request.uses_finetune_law:  # an unknown law or task fails before the search
        from planner.search.finetuning import method_law

        for method in request.methods:
            method_law(method, request.finetune_task, request.finetune_law)
    limits = evidence.plausibility(law, request.pretrain, request.task, request.max_epochs, request.tokens_per_param,
                                   request.beyond_evidence)
    return Context(request, law, gpu, price, float(usable), profile, tuple(notes), limits, cluster)


def _cluster(request: PlanRequest, gpu, notes: list[str]):
    """The request's cluster (``--cluster``), or the default one, written into the assumptions."""
    from planner.specs.cluster import other_gpu_note, resolve_cluster

    cluster = resolve_cluster(request.cluster, gpu)
    other = other_gpu_note(cluster, gpu)
    if other:
        notes.append(other)
    if request.cluster:
        notes.append(f"cluster: {cluster.name} ({cluster.gpus_per_node} GPUs per node, {cluster.intra_node_link} "
                     f"inside a node, {cluster.inter_node_link} between nodes): communication and step times")
    else:
        notes.append(f"cluster: none named (--cluster): {cluster.description}")
    return cluster


def beyond(ctx: Context) -> Context:
    """The same context with every plausibility limit lifted (what going beyond the evidence gains)."""
    from dataclasses import replace

    return replace(ctx, plausibility=ctx.plausibility.relaxed())
