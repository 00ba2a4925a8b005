"""The Pareto front over (loss, cost, time) and the choice of the recommended candidate.

``pareto_mask`` is the exact non-dominated set of any objective matrix; ``grouped_front`` uses the
structure of the plan's candidates (within one GPU count cost is proportional to time) to shrink
the set first; ``choose`` picks the least loss, or the cheapest / fastest run within a loss target.
"""

from __future__ import annotations

import numpy as np

from planner.errors import PlannerError


def pareto_mask(objectives) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``objectives`` (n x k, every column minimized).

    A row is dominated when another is <= in every column and < in one. Rows with identical
    objective vectors: the first is kept. Sort by the columns lexicographically; a row can only be
    dominated by an earlier one, so each block of rows is checked against the front found so far
    and against the earlier rows of its own block (vectorized; O(n x front)).
    """
    f = np.asarray(objectives, dtype=np.float64)
    if f.ndim != 2:
        raise PlannerError("objectives must be a 2-D array (candidates x objectives)")
    n = f.shape[0]
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    order = np.lexsort(f.T[::-1])
    s = f[order]
    front = np.empty((0, f.shape[1]))
    kept = []
    block = 512
    for start in range(0, n, block):
        chunk = s[start : start + block]
        dominated = np.zeros(chunk.shape[0], dtype=bool)
        for fs in range(0, front.shape[0], 2048):
            fr = front[fs : fs + 2048]
            dominated |= np.all(fr[None, :, :] <= chunk[:, None, :], axis=2).any(axis=1)
        # an earlier row of the same block that is <= everywhere (a dominator or a duplicate); by
        # transitivity a row dominated by a non-front row is also dominated by a front row
        le = np.all(chunk[None, :, :] <= chunk[:, None, :], axis=2) & np.tri(chunk.shape[0], k=-1, dtype=bool)
        dominated |= le.any(axis=1)
        keep = start + np.flatnonzero(~dominated)
        kept.append(keep)
        front = np.vstack([front, s[keep]])
    mask[order[np.concatenate(kept)]] = True
    return mask


def grouped_front(scored: dict[str, np.ndarray], rows) -> np.ndarray:
    """Indices (into ``scored``) of the Pareto front over (loss, cost, time) of the feasible candidates.

    Within one GPU count cost is proportional to time, so a 2-D (loss, cost) front per count
    (sort, running minimum) leaves few points; the 3-D front of their union is exact.
    """
    feasible = np.flatnonzero(scored["feasible"])
    if feasible.size == 0:
        return feasible
    g = np.asarray(rows["num_gpus"])[scored["row"][feasible]]
    keep = []
    for count in sorted(set(g.tolist())):
        idx = feasible[g == count]
        order = idx[np.lexsort((scored["time_s"][idx], scored["cost_usd"][idx], scored["loss"][idx]))]
        cost = scored["cost_usd"][order]
        prior = np.minimum.accumulate(np.concatenate([[np.inf], cost[:-1]]))
        keep.append(order[cost < prior])
    cand = np.concatenate(keep)
    objectives = np.column_stack([scored["loss"][cand], scored["cost_usd"][cand], scored["time_s"][cand]])
    return cand[pareto_mask(objectives)]


def choose(scored: dict[str, np.ndarray], objective: str, target_loss: float | None, tolerance: float) -> int | None:
    """The recommended candidate: least loss (ties: cost, time); or the cheapest / fastest reaching
    the target loss (default: the best feasible loss + ``tolerance``)."""
    idx = np.flatnonzero(scored["feasible"])
    if idx.size == 0:
        return None
    loss, cost, t = scored["loss"][idx], scored["cost_usd"][idx], scored["time_s"][idx]
    if objective == "loss":
        return int(idx[np.lexsort((t, cost, loss))[0]])
    target = target_loss if target_loss is not None else float(loss.min()) + tolerance
    ok = loss <= target
    if not ok.any():
        return None
    first, second = (cost, t) if objective == "cost" else (t, cost)
    sub = np.flatnonzero(ok)
    return int(idx[sub[np.lexsort((loss[sub], second[sub], first[sub]))[0]]])
