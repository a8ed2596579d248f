"""Single (unit, step) moves on solved segments: the budget fill and the budget trim.

A unit's schedule is a list of segments ``(p, d, r)``: step p computed, d steps after the previous computed
step, then steps p+1..p+r skipped (:func:`cachec.planner.solver.trace`). Both moves are priced exactly
with the unit's segment costs ``cost[p, d, r]`` ((S, K+2, K+1), :class:`cachec.planner.error_model.SegmentTable`),
the re-anchored next segment included, so they stay within the solver's error model:

- :func:`fill_segments` computes one more skipped step (splits a run) where a shared mask left FLOPs unspent;
- :func:`trim_segments` skips one more computed step (merges two runs) where a given mask costs more than
  the budget, e.g. a 10-step mask at a budget that pays for 9.6 steps (docs/planner.md, "Budget fill").
"""

from __future__ import annotations

import numpy as np


def _reanchored(cost: np.ndarray, segs: list[tuple[int, int, int]], k: int, prev: int) -> tuple[float, float, list]:
    """Segment k = (p', d', r') when its previous computed step becomes ``prev``: ``(old cost, new cost,
    [(p', p' - prev, r')])``, or ``(0.0, 0.0, [])`` when there is no segment k (a move in the last run)."""
    if k >= len(segs):
        return 0.0, 0.0, []
    p2, d2, r2 = segs[k]
    return cost[p2, d2, r2], cost[p2, p2 - prev, r2], [(p2, p2 - prev, r2)]


def _split_gain(cost: np.ndarray, segs: list[tuple[int, int, int]], j: int, s: int, S: int) -> tuple[float, list]:
    """Error decrease of computing step s inside segment j of one unit, and the segments after it.

    Segment j = (p, d, r) skips p+1..p+r; computing s in that range splits it into (p, d, s-p-1) and
    (s, s-p, p+r-s), and the next segment (p', r+1, r') becomes (p', p'-s, r') (its previous computed step
    is now s). ``cost``: (S, K+2, K+1) segment costs of the unit.
    """
    p, d, r = segs[j]
    new = [(p, d, s - p - 1), (s, s - p, p + r - s)]
    old_next, new_next, tail = _reanchored(cost, segs, j + 1, s)
    old_e = cost[p, d, r] + old_next
    new_e = cost[p, d, s - p - 1] + cost[s, s - p, p + r - s] + new_next
    return float(old_e - new_e), segs[:j] + new + tail + segs[j + 1 + len(tail):]


def fill_segments(table, segs_per_unit: list, unit_flops: np.ndarray, slack: float) -> tuple[list, int]:
    """Add single (unit, step) computes into ``slack`` FLOPs, greedily by predicted error decrease per FLOP.

    Each move computes one skipped step of one unit (:func:`_split_gain` prices it exactly with the
    segment table: the split run and the re-anchored next run); only moves that lower the predicted
    error and fit the remaining slack are taken. Run lengths only shrink, so ``max_staleness`` and
    ``keep_last`` stay satisfied.

    Args:
        table: the :class:`~cachec.planner.error_model.SegmentTable` the segments were solved on.
        segs_per_unit: U lists of segments ``(p, d, r)`` (as :func:`cachec.planner.solver.trace` returns them).
        unit_flops: (U,) FLOPs of one call of each unit.
        slack: FLOPs available for extra computes (>= 0).
    Returns:
        ``(segments, added)``: the new per-unit segment lists and the number of computes added.
    """
    S = table.cost.shape[1]
    segs = [list(x) for x in segs_per_unit]
    flops = np.asarray(unit_flops, dtype=np.float64)

    def best_move(u):
        out = (0.0, None)
        for j, (p, _d, r) in enumerate(segs[u]):
            for s in range(p + 1, p + r + 1):
                g, new = _split_gain(table.cost[u], segs[u], j, s, S)
                if np.isfinite(g) and g > out[0]:
                    out = (g, new)
        return out

    moves = [best_move(u) for u in range(len(segs))]
    added = 0
    while True:
        ratio = [g / flops[u] if new is not None and flops[u] <= slack and flops[u] > 0 else -np.inf
                 for u, (g, new) in enumerate(moves)]
        u = int(np.argmax(ratio))
        if not np.isfinite(ratio[u]):
            return segs, added
        segs[u] = moves[u][1]
        slack -= flops[u]
        added += 1
        moves[u] = best_move(u)


def _merge_loss(cost: np.ndarray, segs: list[tuple[int, int, int]], j: int, K: int) -> tuple[float, list | None]:
    """Error increase of skipping the computed step of segment j >= 1 (merging it into segment j-1), and the
    new segments; ``(inf, None)`` where the merged run would exceed ``K`` skipped steps."""
    p0, d0, r0 = segs[j - 1]
    _p, _d, r = segs[j]
    merged = r0 + 1 + r
    if merged > K:
        return np.inf, None
    old_next, new_next, tail = _reanchored(cost, segs, j + 1, p0)
    old_e = cost[p0, d0, r0] + cost[segs[j][0], segs[j][1], r] + old_next
    new_e = cost[p0, d0, merged] + new_next
    return float(new_e - old_e), segs[:j - 1] + [(p0, d0, merged)] + tail + segs[j + 1 + len(tail):]


def trim_segments(table, segs_per_unit: list, unit_flops: np.ndarray, excess: float,
                  keep_last: int = 0) -> tuple[list, int]:
    """Skip single computed (unit, step) pairs until ``excess`` FLOPs are saved, greedily by least predicted
    error increase per FLOP saved (the mirror of :func:`fill_segments`).

    Step 0 and the last ``keep_last`` steps stay computed and no run grows past ``max_staleness``.

    Args:
        table: the :class:`~cachec.planner.error_model.SegmentTable` the segments were made on.
        segs_per_unit: U lists of segments ``(p, d, r)``.
        unit_flops: (U,) FLOPs of one call of each unit.
        excess: FLOPs to save (> 0 to do anything).
        keep_last: number of final steps that must stay computed.
    Returns:
        ``(segments, removed)``: the new per-unit segment lists and the number of computes skipped.
    Raises:
        ValueError: the greedy skips reach a schedule where skipping any further compute would make a run
            longer than ``max_staleness`` (or touch step 0 / the last ``keep_last`` steps) before ``excess``
            is saved. A schedule with fewer computes may still exist (e.g. ``C..C.C..C.C.`` at
            ``max_staleness=2`` holds 5 computes where ``C..C..C..C..`` needs 4): the trim does not
            rearrange computes, so give a mask with fewer steps.
    """
    S = table.cost.shape[1]
    K = table.max_staleness
    segs = [list(x) for x in segs_per_unit]
    flops = np.asarray(unit_flops, dtype=np.float64)

    def best_move(u):
        out = (np.inf, None)
        for j in range(1, len(segs[u])):
            if segs[u][j][0] >= S - keep_last:
                continue
            loss, new = _merge_loss(table.cost[u], segs[u], j, K)
            if new is not None and loss < out[0]:
                out = (loss, new)
        return out

    moves = [best_move(u) for u in range(len(segs))]
    removed = 0
    while excess > 0:
        ratio = [loss / flops[u] if new is not None and flops[u] > 0 else np.inf for u, (loss, new) in enumerate(moves)]
        u = int(np.argmin(ratio))
        if moves[u][1] is None:
            raise ValueError(f"the trim cannot skip {excess:.6g} more FLOPs without a run of more than "
                             f"max_staleness={K} skipped steps")
        segs[u] = moves[u][1]
        excess -= flops[u]
        removed += 1
        moves[u] = best_move(u)
    return segs, removed
