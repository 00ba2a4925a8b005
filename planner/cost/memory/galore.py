"""GaLore's optimizer memory: projected Adam states, projection matrices and the step's transients.

What ``optimizer="galore-adamw"`` means here (GaLore, Zhao et al. 2024, arXiv:2403.03507, as its
own package runs it: ``galore_torch==1.0``, ``GaLoreAdamW`` + ``GaLoreProjector``, set up as the
README at https://github.com/jiaweizzhao/GaLore and the HF Trainer's ``optim="galore_adamw"`` do):

- projected: the weight of every ``nn.Linear`` whose module name contains ``"attn"`` or ``"mlp"``
  (``TARGET_KEYS``: the README's ``target_modules_list``; Trainer's usual ``optim_target_modules``),
  i.e. the attention and MLP projections of each decoder layer; a second parameter group with
  ``rank=galore_rank``, ``update_proj_gap=200``, ``scale=0.25``, ``proj_type="std"`` (the README's
  and Trainer's defaults). Every other parameter (embeddings, head, norms, biases, stacked expert
  weights, routers) is in a first group and gets plain (transformers-style) AdamW.
- ``proj_type="std"`` projects the smaller side: for a gradient G of shape (m, n), m >= n,
  ``G @ P.T`` with P = the first r rows of V^T (r x n); m < n: ``P.T @ G`` with P = the first r
  columns of U (m x r). Adam's two states have the projected shape: r x max(m, n) each, in the
  gradient's dtype (``torch.zeros_like``); r is capped at min(m, n) by the slicing.
- the projection matrix is recomputed every 200 steps (and at the first) from
  ``torch.linalg.svd(G.float(), full_matrices=False)``; with bf16/fp16 gradients it is cast back to
  their dtype (a compact r x min(m, n) copy); with fp32 gradients it is a *view* of V^T or U, so
  the whole min(m, n) x min(m, n) fp32 factor stays alive (``projection_bytes``).
- full gradients still exist (GaLore projects them in the optimizer step; the layer-wise variant,
  which steps in backward hooks, is not priced: ``optimizer_in_backward`` is refused).

The step is a per-parameter Python loop (``optimizer_impl`` is ignored): its transients are one
parameter's at a time plus the previous parameter's ``denom`` and update, which Python keeps
alive until their names are rebound (``step_transient_bytes``). The peak is priced at a
projection-update step (every 200th), the highest one a run reaches. Not priced: cuSOLVER's
workspace and the column-major input copy ``torch.linalg.svd`` makes on a real GPU (the fake-tensor
oracle sees only the factors; at most about one m x n fp32 matrix of the largest projected layer).
"""

from __future__ import annotations

from typing import NamedTuple

from planner.cost import spec_facts
from planner.errors import PlannerError
from planner.specs.model import ModelSpec
from planner.specs.setup import TrainingSetup

TARGET_KEYS = ("attn", "mlp")
"""Module-name substrings of the projected ``nn.Linear`` weights (GaLore README, ``torchrun_main.py``
``target_modules_list = ["attn", "mlp"]``; transformers ``optim_target_modules``)."""
UPDATE_PROJ_GAP = 200
"""Steps between projection updates (GaLore README; transformers ``Trainer`` default for galore)."""
SCALE = 0.25
"""GaLore's scale of the projected-back update (README, Trainer default): no effect on memory."""
PROJ_TYPE = "std"

UNMATCHED_MODEL_TYPES = {
    "gpt2": "GPT-2's projections are Conv1D modules, which the attn/mlp nn.Linear rule does not select",
    "gpt_neox": "GPT-NeoX's attention module is named 'attention', which the 'attn' key does not match",
    "falcon": "Falcon's attention module is named 'self_attention', which the 'attn' key does not match",
}
"""Model types whose module names the README's ``TARGET_KEYS`` rule would select differently."""


class OptimizerTensor(NamedTuple):
    """One parameter as GaLoreAdamW steps it: (rows, cols) (cols 0 for vectors) and whether projected."""

    rows: int
    cols: int
    projected: bool


def unpriced_reason(spec: ModelSpec, setup: TrainingSetup) -> str | None:
    """Why galore-adamw is not priced for ``spec`` and ``setup`` (None when it is)."""
    if setup.method != "full":
        return "galore-adamw projects full weight gradients: use --method full, or adamw for LoRA"
    if setup.zero or setup.tensor_parallel > 1 or setup.pipeline_parallel > 1 or setup.context_parallel > 1 \
            or setup.expert_parallel > 1:
        return ("galore-adamw needs each full weight gradient on one GPU (galore_torch 1.0 has no sharded "
                "SVD): use zero 0 with data parallelism only")
    if setup.offload_optimizer:
        return "galore-adamw runs its SVD on the GPU: offload_optimizer is not priced with it"
    if spec.model_type in UNMATCHED_MODEL_TYPES:
        return f"galore-adamw on {spec.model_type}: {UNMATCHED_MODEL_TYPES[spec.model_type]}; not priced"
    return None


def require_priced(spec: ModelSpec, setup: TrainingSetup) -> None:
    reason = unpriced_reason(spec, setup)
    if reason:
        raise PlannerError(reason)


def _projected(lin) -> bool:
    """An attention or MLP ``nn.Linear`` weight (stacked experts and bare routers are not nn.Linear)."""
    return lin.is_module and lin.count == 1


EXPERTS_BEFORE_ROUTER = frozenset({"qwen3_moe"})
"""MoE blocks that register their stacked experts before the router (``Qwen3MoeSparseMoeBlock``);
Mixtral, OLMoE and Qwen2-MoE register the router first (transformers 5.24 modeling files)."""

OUTPUT_PROJECTION_FIRST = frozenset({"phi3"})
"""Attention modules that register ``o_proj`` before ``qkv_proj`` (``Phi3Attention``)."""


def _layer_order(spec: ModelSpec, layer) -> tuple[list, list]:
    """(plain, projected) tensors of one decoder layer in ``named_parameters`` order: the
    attention's linears and biases, its q/k norms, the MLP block (router and stacked experts in the
    model's order, then the dense or shared-expert linears), then the layer's own norms."""
    plain, projected = [], []

    def add(lin, is_proj: bool) -> None:
        (projected if is_proj else plain).append(OptimizerTensor(lin.out_features * lin.count, lin.in_features, is_proj))
        if lin.bias:
            plain.append(OptimizerTensor(lin.out_features * lin.count, 0, False))

    def norms(entries) -> list:
        return [OptimizerTensor(dim, 0, False) for dim, bias in entries for _ in range(2 if bias else 1)]

    qk = 2 if layer.qk_norm != "none" else 0
    attention = layer.attention
    if spec.model_type in OUTPUT_PROJECTION_FIRST:
        attention = attention[-1:] + attention[:-1]
    for lin in attention:
        add(lin, _projected(lin))
    plain += norms(layer.norms[len(layer.norms) - qk:] if qk else ())
    routed = list(layer.experts) + ([layer.router] if layer.router else [])
    if spec.model_type not in EXPERTS_BEFORE_ROUTER:
        routed = routed[-1:] + routed[:-1] if layer.router else routed
    for lin in routed:
        add(lin, False)
    for lin in layer.mlp:
        add(lin, _projected(lin))
    plain += norms(layer.norms[:len(layer.norms) - qk])
    return plain, projected


def optimizer_order(spec: ModelSpec) -> tuple[OptimizerTensor, ...]:
    """The tensors in the order GaLoreAdamW steps them: the plain group first (embeddings, then
    per layer whatever is not projected, the final norm, the untied head) in ``model.parameters()``
    order, then the projected attention and MLP weights layer by layer (``_layer_order``)."""

    def order() -> tuple[OptimizerTensor, ...]:
        plain = [OptimizerTensor(spec.vocab_size, spec.hidden_size, False)]
        if spec.position_embeddings:
            plain.append(OptimizerTensor(spec.position_embeddings, spec.hidden_size, False))
        projected = []
        for layer in spec.layers:
            layer_plain, layer_projected = _layer_order(spec, layer)
            plain += layer_plain
            projected += layer_projected
        dim, bias = spec.final_norm
        if dim:
            plain += [OptimizerTensor(dim, 0, False)] * (2 if bias else 1)
        if not spec.tied_embeddings:
            plain.append(OptimizerTensor(spec.vocab_size, spec.hidden_size, False))
            if spec.lm_head_bias:
                plain.append(OptimizerTensor(spec.vocab_size, 0, False))
        return tuple(plain + projected)

    return spec_facts.cached(spec, ("galore_order",), order)


def effective_rank(rows: int, cols: int, rank: int) -> int:
    """``U[:, :rank]`` / ``Vh[:rank]`` of a thin SVD keep at most min(m, n) vectors."""
    return min(rank, rows, cols)


def adam_state_bytes(rows: int, cols: int, rank: int, grad_bytes: float) -> float:
    """exp_avg + exp_avg_sq of one projected weight: 2 x r x max(m, n) at the gradient's width
    (``GaLoreAdamW.step``: ``torch.zeros_like`` of the projected gradient)."""
    return 2.0 * effective_rank(rows, cols, rank) * max(rows, cols) * grad_bytes


def projection_bytes(rows: int, cols: int, rank: int, grad_bytes: float) -> float:
    """The stored projection matrix (``GaLoreProjector.ortho_matrix``, ``get_orthogonal_matrix``):
    bf16/fp16 gradients: ``.type(original_type)`` copies r x min(m, n); fp32 gradients: the slice
    ``Vh[:rank, :]`` / ``U[:, :rank]`` is returned as is, a view that keeps the whole fp32
    min(m, n) x min(m, n) factor of the SVD alive."""
    k = min(rows, cols)
    if grad_bytes == 4:
        return 4.0 * k * k
    return effective_rank(rows, cols, rank) * k * grad_bytes


def svd_peak_bytes(rows: int, cols: int, rank: int, grad_bytes: float) -> float:
    """Highest bytes ``get_orthogonal_matrix`` holds for one (m, n) gradient, the new projection
    included: the fp32 copy ``matrix = G.float()`` (none when G is fp32), the thin SVD's U (m x k),
    S (k) and Vh (k x n), ``torch.diag(s[:r])`` (r x r) with the product it feeds (m >= n:
    ``U[:, :r] @ diag`` m x r; m < n: ``diag @ Vh[:r]`` r x n), then the cast of the kept factor."""
    m, n, k = rows, cols, min(rows, cols)
    r = effective_rank(rows, cols, rank)
    copy = 0.0 if grad_bytes == 4 else 4.0 * m * n
    factors = copy + 4.0 * (m * k + k + k * n)
    product = m * r if m >= n else r * n
    with_diag = factors + 4.0 * (r * r + product)
    if grad_bytes == 4:  # the kept factor is a view: no cast
        return with_diag
    cast = r * n if m >= n else m * r
    return max(with_diag, factors + 4.0 * product + grad_bytes * cast)


def step_transient_bytes(order, rank: int, grad_bytes: float, svd: bool = True) -> float:
    """Highest transient of one GaLoreAdamW step over its per-parameter loop (``order``), priced
    event by event from ``galore_torch/adamw.py``: ``denom = exp_avg_sq.sqrt()``, ``norm_grad =
    exp_avg / denom``, for a projected weight the projected gradient (r x max(m, n)) and
    ``project_back``'s two full m x n tensors (the product and its ``* scale``); the previous
    parameter's ``denom`` and ``norm_grad`` stay alive until rebound. ``svd``: a projection-update
    step (``svd_peak_bytes`` on top of the previous parameter's leftovers)."""
    d = grad_bytes
    trail_norm = trail_denom = peak = 0.0
    for t in order:
        if not t.projected:
            n = t.rows * max(t.cols, 1) * d
            peak = max(peak, trail_norm + max(trail_denom, n) + n)
            trail_norm = trail_denom = n
            continue
        low = effective_rank(t.rows, t.cols, rank) * max(t.rows, t.cols) * d
        full = t.rows * t.cols * d
        if svd:
            peak = max(peak, trail_norm + trail_denom + svd_peak_bytes(t.rows, t.cols, rank, d))
        peak = max(peak, trail_norm + trail_denom + 2 * low, trail_norm + 3 * low, 3 * low + 2 * full)
        trail_norm, trail_denom = full, low
    return peak


def state_bytes(spec: ModelSpec, setup: TrainingSetup, grad_bytes: float) -> float:
    """Persistent optimizer memory: projected Adam states and projection matrices of the projected
    weights, plain AdamW's two states (at the gradient's width) for every other parameter."""
    require_priced(spec, setup)
    total = 0.0
    for t in optimizer_order(spec):
        if t.projected:
            total += adam_state_bytes(t.rows, t.cols, setup.galore_rank, grad_bytes)
            total += projection_bytes(t.rows, t.cols, setup.galore_rank, grad_bytes)
        else:
            total += 2.0 * t.rows * max(t.cols, 1) * grad_bytes
    return total


def temporary_bytes(spec: ModelSpec, setup: TrainingSetup, grad_bytes: float) -> float:
    """The optimizer step's transient at a projection-update step (``step_transient_bytes``)."""
    require_priced(spec, setup)
    return step_transient_bytes(optimizer_order(spec), setup.galore_rank, grad_bytes, svd=True)


def projected_shapes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(m, n) of every projected weight (the time model's projection matmuls and SVDs)."""
    return tuple((t.rows, t.cols) for t in optimizer_order(spec) if t.projected)
