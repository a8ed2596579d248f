"""Budgeted schedule solver: which (unit, step) pairs to compute under a FLOP budget.

See docs/planner.md ("Solver and schedule families"). Units couple only through the budget. For every unit a
dynamic programme over steps (state: last computed step p and its distance d to the previous computed
step, i.e. the last two computed steps; at most ``max_staleness`` consecutive skipped steps) gives the
least coherent error with exactly n computed steps, for every n at once (the unit's frontier). The
Lagrangian step (minimise error + lambda * FLOPs per unit, bisection on lambda) then picks one frontier
point per unit, and a repair pass (greedy moves by marginal error per FLOP, pairwise exchanges) fills the
budget without exceeding it. Small problems are allocated exactly by enumeration.

The step-synchronous family (``family="step"``) shares one compute mask among all units: the same DP
runs once on the unit-summed segment costs and the budget fixes the number of computed steps directly.
The block-group family (``family="group"``) sits between the two: the blocks are split into ``groups``
contiguous groups, every unit of a group shares one mask (attention and FFN of a block stay in sync), and
the groups are allocated like free units. It exists because closed-loop errors of desynchronised schedules
are larger than the additive error model predicts (cross-unit terms are not in the statistics), while
the step family's granularity (one step = 1/S of the FLOPs) cannot meet a budget closely.

Budget fill (``fill=True``, the default for the step and group families): the shared masks leave up to a
step's (or a group-step's) FLOPs unspent; :func:`~cachec.planner.segment_moves.fill_segments` then adds single (unit, step) computes into
that slack, largest predicted error decrease per FLOP first, so the plan realises its budget to within one
unit call (docs/planner.md, "Budget fill").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .error_model import EOC, SegmentTable
from .schedule import Schedule, minimum_computes, round_sig
from .nesting import folded_flops, nest, nested_coefficients, segments_of
from .segment_moves import fill_segments, trim_segments

FAMILIES = ("free", "step", "group")
#: default number of block groups of the ``group`` family
DEFAULT_GROUPS = 4
#: enumerate all allocations exactly when the number of combinations is at most this
EXACT_LIMIT = 200_000
#: FLOP grid of the knapsack DP allocation (costs rounded up to it; the greedy fill uses the exact slack)
KNAPSACK_BINS = 4096
#: the knapsack DP searches each unit's count within this distance of the Lagrangian allocation
KNAPSACK_RADIUS = 4


@dataclass
class Frontier:
    """Per-unit (or, for the step family, per-mask) least error for each number of computed steps.

    Attributes:
        err: (V, S+1) float64, ``err[v, n]`` = least error with exactly n computed steps (inf: infeasible).
        arg: (V, S, K+2, S) int8: the run length r chosen at state (p, d) with k computes left.
    """

    err: np.ndarray
    arg: np.ndarray


def frontier(cost: np.ndarray, keep_last: int = 0) -> Frontier:
    """Solve the per-unit DP over steps for every compute count at once.

    ``W[p, d, k]`` = least cost of the rest of the schedule given a computed step p whose previous
    computed step is p - d, with exactly k computed steps after p. A transition skips r = 0..K steps and
    computes p + r + 1 (or ends the run at S - 1).

    Args:
        cost: (V, S, K+2, K+1) segment costs (see :class:`cachec.planner.error_model.SegmentTable`).
        keep_last: the last ``keep_last`` steps must be computed.
    Returns:
        A :class:`Frontier`.
    """
    V, S, Q, R = cost.shape
    K = R - 1
    W = np.full((V, S, Q, S), np.inf)
    A = np.full((V, S, Q, S), -1, dtype=np.int8)
    end = np.full(S, np.inf)
    end[0] = 0.0
    for p in range(S - 1, -1, -1):
        best = np.full((V, Q, S), np.inf)
        arg = np.full((V, Q, S), -1, dtype=np.int8)
        for r in range(0, K + 1):
            nxt = p + r + 1
            if nxt > S:
                break
            if r > 0 and p + r >= S - keep_last:
                break
            c = cost[:, p, :, r][..., None]  # (V, Q, 1)
            if nxt == S:
                cand = c + end
            else:
                cont = np.empty((V, S))
                cont[:, 0] = np.inf
                cont[:, 1:] = W[:, nxt, r + 1, :-1]
                cand = c + cont[:, None, :]
            better = cand < best
            best = np.where(better, cand, best)
            arg = np.where(better, np.int8(r), arg)
        W[:, p] = best
        A[:, p] = arg
    err = np.full((V, S + 1), np.inf)
    err[:, 1:] = W[:, 0, 0, :]
    return Frontier(err=err, arg=A)


def trace(front: Frontier, v: int, n: int) -> list[tuple[int, int, int]]:
    """The segments ``(p, d, r)`` of the optimal schedule of row v with exactly n computed steps.

    Raises:
        ValueError: n computed steps are infeasible for row v.
    """
    if not np.isfinite(front.err[v, n]):
        raise ValueError(f"{n} computed steps are infeasible")
    S = front.arg.shape[1]
    p, d, k = 0, 0, n - 1
    segs = []
    while True:
        r = int(front.arg[v, p, d, k])
        segs.append((p, d, r))
        nxt = p + r + 1
        if nxt >= S:
            return segs
        p, d, k = nxt, r + 1, k - 1


def _allocate_exact(err, cost, cap):
    opts = [np.flatnonzero(np.isfinite(e)) for e in err]
    tot_e = np.zeros(1)
    tot_c = np.zeros(1)
    pick = np.zeros((1, 0), dtype=np.int64)
    for u, o in enumerate(opts):
        tot_e = (tot_e[:, None] + err[u, o][None, :]).ravel()
        tot_c = (tot_c[:, None] + (o * cost[u])[None, :]).ravel()
        pick = np.concatenate([np.repeat(pick, len(o), axis=0), np.tile(o, len(pick))[:, None]], axis=1)
        keep = tot_c <= cap
        tot_e, tot_c, pick = tot_e[keep], tot_c[keep], pick[keep]
    order = np.lexsort((-tot_c, tot_e))  # least error, then most FLOPs spent
    return pick[order[0]]


def _fill(err, cost, cap, n):
    """Greedy add moves (largest error decrease per FLOP; zero-gain moves last) while they fit."""
    U, N = err.shape
    nn = np.arange(N)[None, :]
    while True:
        spent = float((n * cost).sum())
        cur = err[np.arange(U), n][:, None]
        dc = (nn - n[:, None]) * cost[:, None]
        gain = cur - err
        ok = (nn > n[:, None]) & np.isfinite(err) & (spent + dc <= cap) & (gain >= 0)
        if not ok.any():
            return n
        ratio = np.where(ok, gain / np.where(dc > 0, dc, 1.0), -np.inf)
        ratio = np.where(ok & (dc <= 0), np.inf, ratio)
        u, m = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        n = n.copy()
        n[u] = m


def _exchange(err, cost, cap, n, max_iter=200):
    """Pairwise exchanges: lower unit u by 1-2 computes and raise unit v, when the error drops."""
    U, N = err.shape
    nn = np.arange(N)
    for _ in range(max_iter):
        spent = float((n * cost).sum())
        cur = err[np.arange(U), n]
        up_gain = cur[:, None] - err  # (U, N)
        up_dc = (nn[None, :] - n[:, None]) * cost[:, None]
        up_ok = (nn[None, :] > n[:, None]) & np.isfinite(err)
        best = (0.0, None)
        for step in (1, 2):
            lo = n - step
            valid = lo >= 1
            lo_c = np.where(valid, lo, 1)
            loss = np.where(valid, err[np.arange(U), lo_c] - cur, np.inf)  # (U,)
            freed = step * cost
            # net change for (u down, v up): loss[u] - up_gain[v, m]; budget: spent - freed[u] + up_dc[v, m] <= cap
            net = loss[:, None, None] - up_gain[None, :, :]
            fits = spent - freed[:, None, None] + up_dc[None, :, :] <= cap
            ok = up_ok[None] & fits & np.isfinite(net) & (np.arange(U)[:, None, None] != np.arange(U)[None, :, None])
            net = np.where(ok, net, np.inf)
            i = int(np.argmin(net))
            if net.flat[i] < best[0] - 1e-15 * max(1.0, abs(float(cur.sum()))):
                u, v, m = np.unravel_index(i, net.shape)
                best = (float(net.flat[i]), (u, int(lo_c[u]), v, m))
        if best[1] is None:
            return n
        u, lo, v, m = best[1]
        n = n.copy()
        n[u], n[v] = lo, m
    return n


def _allocate_knapsack(err, cost, cap, bins=KNAPSACK_BINS, around=None, radius=KNAPSACK_RADIUS):
    """Multiple-choice knapsack DP on a grid of ``bins`` FLOP bins (costs rounded up, so always feasible).

    With ``around`` (U,) counts, each unit's options are restricted to ``around +- radius``.
    """
    U, N = err.shape
    if around is not None:
        nn = np.arange(N)[None, :]
        err = np.where(np.abs(nn - np.asarray(around)[:, None]) <= radius, err, np.inf)
    qsize = cap / bins
    best = np.zeros(bins + 1)  # least error of the units so far within j bins
    args = np.zeros((U, bins + 1), dtype=np.int16)
    weights = []
    j = np.arange(bins + 1)
    for u in range(U):
        w = np.ceil(np.arange(N) * cost[u] / qsize - 1e-9).astype(np.int64) if qsize > 0 else np.zeros(N, np.int64)
        weights.append(w)
        opts = np.flatnonzero(np.isfinite(err[u]) & (w <= bins))
        idx = j[None, :] - w[opts][:, None]  # (n_opts, bins+1)
        cand = np.where(idx >= 0, best[np.maximum(idx, 0)], np.inf) + err[u, opts][:, None]
        a = np.argmin(cand, axis=0)
        best = cand[a, j]
        args[u] = opts[a]
    if not np.isfinite(best[bins]):
        return None
    n = np.zeros(U, dtype=np.int64)
    b = bins
    for u in range(U - 1, -1, -1):
        n[u] = args[u, b]
        b -= int(weights[u][n[u]])
    return n


def allocate(err: np.ndarray, cost: np.ndarray, cap: float, exact_limit: int = EXACT_LIMIT) -> np.ndarray:
    """Choose a number of computed steps per unit: least summed error with summed cost <= cap.

    Exact enumeration when the number of combinations is at most ``exact_limit``. Otherwise the better
    of two: bisection on the Lagrange multiplier lambda (each unit minimises ``err + lambda * n * cost``)
    followed by greedy fill and pairwise exchanges; and a multiple-choice knapsack DP on a grid of
    ``KNAPSACK_BINS`` FLOP bins (costs rounded up), each unit's count within ``KNAPSACK_RADIUS`` of the
    first allocation, followed by greedy fill with the exact slack.

    Args:
        err: (U, N) float64 frontier errors (inf: infeasible), index = number of computed steps.
        cost: (U,) FLOPs of one computed step of each unit.
        cap: FLOPs available to the units.
    Returns:
        (U,) int64 counts.
    Raises:
        ValueError: even the fewest feasible computes exceed ``cap``.
    """
    U, N = err.shape
    finite = np.isfinite(err)
    nmin = np.argmax(finite, axis=1)
    if float((nmin * cost).sum()) > cap:
        raise ValueError("infeasible")
    sizes = finite.sum(axis=1).astype(float)
    if np.prod(sizes) <= exact_limit:
        return _allocate_exact(err, cost, cap)
    nn = np.arange(N)[None, :]

    def pick(lam):
        return np.argmin(err + lam * nn * cost[:, None], axis=1)

    def spend(n):
        return float((n * cost).sum())

    n = pick(0.0)
    if spend(n) > cap:
        lo, hi = 0.0, 1.0
        scale = np.nanmax(np.where(finite, err, np.nan)) / max(float(cost[cost > 0].min()) if (cost > 0).any() else 1.0, 1e-300)
        hi = max(hi, float(scale) * 1e-6)
        while spend(pick(hi)) > cap:
            hi *= 4.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if spend(pick(mid)) > cap:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-14 * hi:
                break
        n = pick(hi)
    n = _fill(err, cost, cap, n)
    n = _exchange(err, cost, cap, n)
    n = _fill(err, cost, cap, n)
    rows = np.arange(U)
    k = _allocate_knapsack(err, cost, cap, around=n)
    if k is not None:
        k = _fill(err, cost, cap, k)
        if err[rows, k].sum() < err[rows, n].sum():
            n = k
    return n


def group_costs(cost: np.ndarray, unit_flops: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment costs and FLOPs summed over the units of each group: ((G, ...), (G,))."""
    G = int(groups.max()) + 1
    return (np.stack([cost[groups == g].sum(axis=0) for g in range(G)]),
            np.array([float(np.asarray(unit_flops)[groups == g].sum()) for g in range(G)]))


def minimum_budget(unit_flops, full_step: float, fixed_step: float, steps: int, max_staleness: int, keep_last: int = 0) -> float:
    """Fewest FLOPs any schedule under the constraints can spend, as a fraction of a full run.

    Fixed FLOPs at every step plus every unit computed at step 0, at the last ``keep_last`` steps and at
    least every ``max_staleness + 1`` steps.
    """
    n = minimum_computes(steps, max_staleness, keep_last)
    return (steps * fixed_step + n * float(np.sum(unit_flops))) / (steps * full_step)


def mask_segments(computed, steps: int, max_staleness: int, keep_last: int = 0) -> list[tuple[int, int, int]]:
    """The segments ``(p, d, r)`` of a step-synchronous schedule that computes exactly the steps ``computed``.

    Args:
        computed: step indices (0-based, step 0 among them) of the computed steps, e.g. a FORA interval
            pattern or the steps an adaptive peer computed on the calibration set.
        steps: S.
        max_staleness: K, the longest allowed run of skipped steps.
        keep_last: the last ``keep_last`` steps must be computed.
    Returns:
        The segments in step order (as :func:`trace` returns them).
    Raises:
        ValueError: a step outside 0..S-1, step 0 missing, a run of more than K skipped steps, or one of the
            last ``keep_last`` steps skipped.
    """
    c = sorted({int(x) for x in computed})
    if not c or c[0] != 0 or c[-1] >= steps:
        raise ValueError(f"computed steps must include step 0 and lie in 0..{steps - 1}, got {c}")
    missing = [s for s in range(steps - keep_last, steps) if s not in c]
    if missing:
        raise ValueError(f"keep_last={keep_last} needs steps {missing} computed")
    ends = c[1:] + [steps]
    segs = []
    prev = None
    for p, nxt in zip(c, ends):
        r = nxt - p - 1
        if r > max_staleness:
            raise ValueError(f"steps {p + 1}..{nxt - 1} skipped: {r} > max_staleness={max_staleness}")
        segs.append((p, 0 if prev is None else p - prev, r))
        prev = p
    return segs


def _schedule_from_segments(table: SegmentTable, segs_per_unit, S: int, options: dict) -> Schedule:
    U = len(segs_per_unit)
    compute = np.zeros((U, S), dtype=bool)
    coeffs = [{} for _ in range(U)]
    alphas = [{} for _ in range(U)]
    refs = [{} for _ in range(U)]
    for u, segs in enumerate(segs_per_unit):
        for p, d, r in segs:
            compute[u, p] = True
            for i, (k, a, al) in enumerate(table.run(u, p, d, r), start=1):
                s = p + i
                coeffs[u][s] = tuple(round_sig(x) for x in a)
                if k == EOC and round_sig(al) != 0.0:
                    alphas[u][s] = round_sig(al)
                    refs[u][s] = p
    return Schedule(compute=compute, coeffs=coeffs, eoc_alpha=alphas, eoc_ref=refs, history="computed", options=options)


def solve(
    table: SegmentTable,
    unit_flops: np.ndarray,
    full_step: float,
    fixed_step: float,
    budget: float,
    family: str = "free",
    keep_last: int = 0,
    front: Frontier | None = None,
    groups: np.ndarray | None = None,
    fill: bool = True,
    mask=None,
    always: np.ndarray | None = None,
    parents=None,
    map_reuse: bool = True,
) -> Schedule:
    """Least-error schedule spending at most ``budget`` of a full run's FLOPs.

    Args:
        table: segment costs (:func:`cachec.planner.error_model.segment_table`), which fix ``max_staleness``.
        unit_flops: (U,) FLOPs of one call of each unit (one sample, one branch).
        full_step, fixed_step: FLOPs of one full forward and of its never-cached part.
        budget: fraction (0, 1] of a full run's FLOPs (fixed FLOPs included).
        family: ``"free"`` (per-unit masks), ``"step"`` (one mask shared by all units of a step) or
            ``"group"`` (one mask per group of units, see :func:`cachec.planner.blocks.block_groups`).
        keep_last: number of final steps always computed.
        front: a precomputed :func:`frontier` of this table and family (reused across budgets).
        groups: (U,) int group ids, required for ``family="group"``.
        fill: for the step and group families, add single (unit, step) computes into the FLOPs the
            shared masks leave unspent (:func:`fill_segments`; recorded as ``options.fill``). Ignored
            by the free family, whose allocation already fills the budget per unit.
        mask: for the step family only: the computed steps (indices) instead of the DP's choice
            (:func:`mask_segments`; recorded as ``options.mask``). A mask that costs more than the budget
            is trimmed (:func:`~cachec.planner.segment_moves.trim_segments`: its least useful (unit, step)
            computes skipped, recorded as ``options.trimmed``) instead of filled.
        always: for the step family only: (U,) bool, units computed at every step (the Fn/Bn blocks of
            FBCache/DBCache, :func:`edge_blocks`); the shared mask and its DP cover the other units.
        parents: (U,) per unit the index of the unit it is nested in (attention maps), or None. With nested
            units the family solves the other units (``front``, ``groups`` and ``always`` are of those, in
            order), and :func:`cachec.planner.nesting.nest` trades map reuse against more computes (recorded
            as ``options.map_skips``). ``map_reuse=False`` skips that exchange: every nested unit computes
            wherever its parent does (the planner passes False without a measured sensitivity or a fill).
    Returns:
        A :class:`Schedule` (history ``computed``) whose realised fraction is <= budget, and within one
        unit call below it when ``fill`` (or the family) allows.
    Raises:
        ValueError: unknown family, budget outside (0, 1], or below the minimum for the constraints (the
            message names the minimum); ``family="group"`` without ``groups``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if parents is not None and any(p is not None for p in parents):
        return _solve_nested(table, unit_flops, full_step, fixed_step, budget, family, keep_last, front, groups,
                             fill, mask, always, list(parents), map_reuse)
    if not (0.0 < budget <= 1.0):
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    U, S = table.cost.shape[:2]
    K = table.max_staleness
    unit_flops = np.asarray(unit_flops, dtype=np.float64)
    minb = minimum_budget(unit_flops, full_step, fixed_step, S, K, keep_last)
    if budget < minb * (1 - 1e-12):
        raise ValueError(
            f"budget {budget:.6g} is below the minimum {minb:.6g} for max_staleness={K}, keep_last={keep_last} "
            f"(fixed FLOPs {fixed_step / full_step:.4g} of a step, step 0 computed); raise the budget or max_staleness"
        )
    cap = budget * S * full_step * (1 + 1e-12) - S * fixed_step
    options = {"family": family, "max_staleness": int(K), "keep_last": int(keep_last)}
    if (mask is not None or always is not None) and family != "step":
        what = "a computed-step mask" if mask is not None else "always-computed units (fn_bn)"
        raise ValueError(f"{what} is only used by family 'step', not {family!r}")
    if family == "step":
        return _solve_step(table, unit_flops, full_step, fixed_step, budget, cap, minb, options, keep_last, front,
                           fill, mask, always)
    if family == "group":
        if groups is None or len(groups) != U:
            raise ValueError("family 'group' needs groups: one group id per unit")
        groups = np.asarray(groups, dtype=np.int64)
        cost, flops = group_costs(table.cost, unit_flops, groups)
        options["groups"] = int(groups.max()) + 1
    else:
        cost, flops = table.cost, unit_flops
    if front is None:
        front = frontier(cost, keep_last)
    try:
        n = allocate(front.err, flops, cap)
    except ValueError:
        raise ValueError(f"budget {budget:.6g} is below the minimum {minb:.6g}") from None
    segs = [trace(front, v, int(n[v])) for v in range(len(flops))]
    if family == "group":
        segs = [segs[g] for g in groups]
        return _finish(table, segs, unit_flops, cap, S, options, fill)
    return _schedule_from_segments(table, segs, S, options)


def _solve_step(table, unit_flops, full_step, fixed_step, budget, cap, minb, options, keep_last, front, fill, mask,
                always) -> Schedule:
    """The step family of :func:`solve`: one shared mask (the DP's, or ``mask``) for every unit not in
    ``always``; the ``always`` units compute at every step; then the budget fill."""
    U, S = table.cost.shape[:2]
    K = table.max_staleness
    on = np.zeros(U, dtype=bool) if always is None else np.asarray(always, dtype=bool)
    if on.shape != (U,) or on.all():
        raise ValueError(f"always must be (U,) = ({U},) bools with at least one unit left to cache")
    full = mask_segments(range(S), S, K, keep_last)  # the always-computed units' segments
    cap_rest = cap - S * float(unit_flops[on].sum())  # what the shared mask of the other units may spend
    total = float(unit_flops[~on].sum())
    if mask is not None:
        segs = mask_segments(mask, S, K, keep_last)
        options["mask"] = [p for p, _, _ in segs]
        per_unit = [full if on[u] else segs for u in range(U)]
        excess = len(segs) * total - cap_rest
        if excess > 0:  # the mask costs more than the budget: skip its least useful (unit, step) computes
            if on.any():
                raise ValueError(f"the mask computes {len(segs)} of {S} steps, over the budget {budget:.6g} "
                                 "with the always-computed (fn_bn) blocks; give fewer steps")
            try:
                per_unit, removed = trim_segments(table, per_unit, unit_flops, excess, keep_last)
            except ValueError as exc:
                raise ValueError(f"the mask computes {len(segs)} of {S} steps, over the budget {budget:.6g}, "
                                 f"and {exc}; give a mask with fewer steps") from None
            options["trimmed"] = int(removed)
            return _schedule_from_segments(table, per_unit, S, options)
        return _finish(table, per_unit, unit_flops, cap, S, options, fill)
    if front is None or on.any():
        front = frontier(table.cost[~on].sum(axis=0, keepdims=True), keep_last)
    nmax = S if total <= 0 else int(min(S, np.floor(max(cap_rest, 0.0) / total + 1e-9)))
    while nmax > 0 and nmax * total > cap_rest:
        nmax -= 1
    e = front.err[0, : nmax + 1]
    if not np.isfinite(e).any():
        least = minb if not on.any() else (
            (S * fixed_step + S * float(unit_flops[on].sum())
             + minimum_computes(S, K, keep_last) * total) / (S * full_step))
        raise ValueError(f"budget {budget:.6g} is below the minimum {least:.6g}"
                         + (" with the always-computed (fn_bn) blocks" if on.any() else ""))
    best = np.flatnonzero(e == np.min(e))[-1]  # least error, most computes on ties
    seg = trace(front, 0, int(best))
    return _finish(table, [full if on[u] else seg for u in range(U)], unit_flops, cap, S, options, fill)


def _solve_nested(table, unit_flops, full_step, fixed_step, budget, family, keep_last, front, groups, fill, mask,
                  always, parents, map_reuse) -> Schedule:
    """:func:`solve` with nested units (the two stages of :mod:`cachec.planner.nesting`)."""
    U, S = table.cost.shape[:2]
    flops = np.asarray(unit_flops, dtype=np.float64)
    prim = [u for u in range(U) if parents[u] is None]
    first = solve(table.rows(prim), folded_flops(flops, parents)[prim], full_step, fixed_step, budget, family, keep_last, front, groups,
                  fill, mask, always)
    primary = [[] for _ in range(U)]
    for i, u in enumerate(prim):
        primary[u] = segments_of(first.compute[i])
    cap = budget * S * full_step * (1 + 1e-12) - S * fixed_step
    segs, maps, skipped = nest(table, primary, parents, flops, cap, keep_last, exchange=map_reuse)
    for n, p in enumerate(parents):
        if p is not None:
            segs[n] = segments_of(np.isin(np.arange(S), maps[n]))
    opts = dict(first.options, map_skips=int(skipped), **({} if map_reuse else {"map_reuse": False}))
    sched = _schedule_from_segments(table, segs, S, opts)
    for n, p in enumerate(parents):
        if p is not None:
            sched.coeffs[n] = nested_coefficients(sched.compute[p], maps[n])
            sched.eoc_alpha[n], sched.eoc_ref[n] = {}, {}
    sched.parents = parents
    return sched


def _finish(table, segs, unit_flops, cap, S, options, fill):
    if fill:
        spent = sum(len(x) * float(f) for x, f in zip(segs, unit_flops))
        segs, added = fill_segments(table, segs, unit_flops, cap - spent)
        options["fill"] = True
        options["filled"] = int(added)
    return _schedule_from_segments(table, segs, S, options)
