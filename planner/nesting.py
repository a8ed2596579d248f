"""Nested units: schedules for attention-map units inside units that are skipped whole (docs/hgc.md,
docs/planner.md "Nested units").

An attention-map unit runs only when its parent (the block or attention holding it) computes. The solver
therefore plans in two stages, under one budget:

1. the *primary* problem: every non-nested unit, with each parent's FLOPs counting its nested units too (a
   parent computed with its maps computed is exactly what an uncached step does), solved by any family of
   :func:`cachec.planner.solver.solve`; nested units then compute wherever their parent does;
2. the *exchange*: a nested unit may reuse its map at some of its parent's computed steps (plain reuse of its
   last computed map, HGC's fine grain), saving its FLOPs; the budget fill
   (:func:`~cachec.planner.segment_moves.fill_segments`) spends what the skipped maps free on more primary
   computes. Map skips are taken in order of least predicted error per FLOP (re-priced after each), and the
   prefix of that sequence with the largest predicted net gain (fill gain − map error) is kept, none if no
   prefix gains.

A nested unit's error is the coherent reuse error over the steps it runs at:
``‖Σ_{s} k_s sw_s (F_s − F_p)‖² / norm`` over the skipped steps s (parent computed, map reused) after each
computed map p, from the unit's own judging Gram (:attr:`~cachec.planner.error_model.SegmentTable.gram`); steps
its parent skips add nothing (the parent's prediction stands in there). Map runs keep ``max_staleness`` in
steps.

``k_s`` (:func:`propagation_factors`) carries what the additive model would miss: the parent's output at s,
computed with a reused map, enters the parent's history, and every later step that predicts the parent from
it repeats the error, times its coefficient: ``k_s = 1 + Σ_{s'} |a_{s'}(s)|·sw_parent[s'] / sw_parent[s]``.
Absolute values admit no cancellation (first-order forecasts read an output with +2 and −1). Without the factor
a 40 % plan on digits-mmdit-control takes 33 map skips and loses 3.04 dB; with signed coefficients 17 skips and
1.30 dB; with it 2 skips and +0.03 dB (``bench/bench_map_pricing.py``; docs/planner.md "Nested units").
"""

from __future__ import annotations

import numpy as np

from .segment_moves import fill_segments

#: candidates of the exchange are re-priced per move; it stops after this many moves without a better prefix
PATIENCE = 24


def folded_flops(unit_flops, parents) -> np.ndarray:
    """(U,) FLOPs per call with each nested unit's added to its parent's (what a parent computed with its maps
    computed costs, the primary stage's price); nested units keep their own."""
    folded = np.asarray(unit_flops, dtype=np.float64).copy()
    for u, p in enumerate(parents):
        if p is not None:
            folded[p] += folded[u]
    return folded


def reuse_cost(table, u: int, p: int, steps, k: np.ndarray | None = None) -> float:
    """Coherent plain-reuse error of unit ``u`` predicting ``steps`` from its output at step ``p``, each step's
    term scaled by its propagation factor ``k`` ((S,), default ones; module docstring); 0 for no steps."""
    steps = list(steps)
    if not steps:
        return 0.0
    c = np.zeros(table.gram.shape[1])
    w = table.sw[u, steps] * (1.0 if k is None else k[steps])
    c[steps] += w
    c[p] -= w.sum()
    return float(c @ table.gram[u] @ c) / table.norm


def propagation_factors(compute: np.ndarray, coeffs: dict, sw: np.ndarray, signed: bool = False) -> np.ndarray:
    """(S,) factor ``k_s`` per computed step of a parent unit (module docstring): 1 plus the absolute
    coefficients with which its later predictions read the output of step s (``history: computed``: coefficient j reads
    the j-th most recent computed output), each weighted by the sensitivity ratio ``sw[s'] / sw[s]``.

    Args:
        compute: (S,) bool, the parent's computed steps; coeffs: ``{skipped step: coefficients}``;
        sw: (S,) square-root sensitivities of the parent.
        signed: the coefficients with their signs (they can cancel; what ``bench/bench_map_pricing.py``
            compares against, never the planner's choice).
    """
    k = np.ones(len(compute))
    computed: list[int] = []
    for s in range(len(compute)):
        if compute[s]:
            computed.insert(0, s)
            continue
        for j, a in enumerate(coeffs.get(s, ())):
            if j < len(computed):
                t = computed[j]
                k[t] += (a if signed else abs(a)) * sw[s] / max(sw[t], 1e-30)
    return k


def segment_factors(table, u: int, segs) -> np.ndarray:
    """:func:`propagation_factors` of unit ``u`` scheduled as ``segs`` (its predictors from ``table``)."""
    S = table.cost.shape[1]
    compute, coeffs = np.zeros(S, dtype=bool), {}
    for p, d, r in segs:
        compute[p] = True
        for i, (_, a, _) in enumerate(table.run(u, p, d, r), start=1):
            coeffs[p + i] = a
    return propagation_factors(compute, coeffs, table.sw[u])


def segments_of(computed: np.ndarray) -> list[tuple[int, int, int]]:
    """The segments ``(p, d, r)`` of one unit computing the steps where ``computed`` ((S,) bool) is True."""
    c = np.flatnonzero(computed).tolist()
    ends = c[1:] + [len(computed)]
    return [(p, 0 if i == 0 else p - c[i - 1], nxt - p - 1) for i, (p, nxt) in enumerate(zip(c, ends))]


class _Maps:
    """Computed steps of the nested units and their reuse errors."""

    def __init__(self, table, nested: list[int], parents, parent_compute: dict[int, np.ndarray], keep_last: int,
                 factors: dict[int, np.ndarray]):
        self.table, self.nested, self.parents = table, nested, parents
        S = table.cost.shape[1]
        self.S, self.K, self.keep_last = S, table.max_staleness, keep_last
        self.active = {n: parent_compute[parents[n]].copy() for n in nested}
        self.comp = {n: np.flatnonzero(self.active[n]).tolist() for n in nested}
        self.k = {n: factors[parents[n]] for n in nested}

    def run_cost(self, n: int, p: int, nxt: int) -> float:
        """Error of the skipped steps after the computed map ``p`` up to (without) ``nxt``."""
        act = self.active[n]
        return reuse_cost(self.table, n, p, [s for s in range(p + 1, nxt) if act[s]], self.k[n])

    def error(self) -> float:
        total = 0.0
        for n in self.nested:
            c = self.comp[n] + [self.S]
            total += sum(self.run_cost(n, p, nxt) for p, nxt in zip(c, c[1:]))
        return total

    def best_move(self, flops: np.ndarray):
        """``(rate, Δerror, unit, step)`` of the map skip with least error per FLOP, or None."""
        best = None
        for n in self.nested:
            if flops[n] <= 0:
                continue
            c = self.comp[n] + [self.S]
            for i in range(1, len(c) - 1):
                prev, t, nxt = c[i - 1], c[i], c[i + 1]
                if t >= self.S - self.keep_last or nxt - prev - 1 > self.K:
                    continue
                delta = self.run_cost(n, prev, nxt) - self.run_cost(n, prev, t) - self.run_cost(n, t, nxt)
                rate = delta / flops[n]
                if best is None or rate < best[0]:
                    best = (rate, delta, n, t)
        return best


def nest(table, primary_segs: list, parents, unit_flops: np.ndarray, cap: float, keep_last: int = 0,
         exchange: bool = True) -> tuple[list, dict[int, list[int]], int]:
    """Stage 2 of the module docstring: trade map skips against primary computes.

    Args:
        table: the full :class:`~cachec.planner.error_model.SegmentTable` (all units, nested ones included).
        primary_segs: per unit (all U; nested entries ignored) the solved segments of the primary units.
        parents: (U,) parent index per unit, None for primary units.
        unit_flops: (U,) FLOPs per call, each unit without its nested units.
        cap: FLOPs the units may spend over the run (budget minus the fixed FLOPs).
        keep_last: the last ``keep_last`` steps stay computed.
        exchange: False: no map skip (every nested unit computes wherever its parent does).
    Returns:
        ``(segments of the primary units (all U entries, nested ones empty), {nested unit: computed steps},
        number of map skips)``.
    """
    U = len(parents)
    S = table.cost.shape[1]
    flops = np.asarray(unit_flops, dtype=np.float64)
    nested = [u for u in range(U) if parents[u] is not None]
    prim = [u for u in range(U) if parents[u] is None]
    folded = folded_flops(flops, parents)
    sub = table.rows(prim)
    cost = lambda segs: sum(float(sub.cost[i, p, d, r]) for i, x in enumerate(segs) for p, d, r in x)

    def parent_compute(segs) -> dict[int, np.ndarray]:
        out = {}
        for i, u in enumerate(prim):
            c = np.zeros(S, dtype=bool)
            c[[p for p, _, _ in segs[i]]] = True
            out[u] = c
        return out

    holders = sorted({parents[n] for n in nested})
    factors = lambda segs: {u: segment_factors(table, u, segs[prim.index(u)]) for u in holders}
    base = [list(primary_segs[u]) for u in prim]
    maps = _Maps(table, nested, parents, parent_compute(base), keep_last, factors(base))
    base_err = cost(base) + maps.error()
    spent0 = sum(len(x) * folded[u] for u, x in zip(prim, base))
    best = (0.0, base, {n: list(c) for n, c in maps.comp.items()})
    freed, since = 0.0, 0
    while exchange and since < PATIENCE:
        move = maps.best_move(flops)
        if move is None:
            break
        _, _, n, t = move
        maps.comp[n].remove(t)
        freed += flops[n]
        segs, _ = fill_segments(sub, base, folded[prim], max(cap - spent0 + freed, 0.0))
        # the fill's new parent computes run their maps computed: their cost is in `folded`
        trial = _Maps(table, nested, parents, parent_compute(segs), keep_last, factors(segs))
        for m in nested:
            trial.comp[m] = sorted(set(maps.comp[m]) | set(np.flatnonzero(trial.active[m] & ~maps.active[m]).tolist()))
        net = cost(segs) + trial.error() - base_err
        if net < best[0] - 1e-15:
            best, since = (net, segs, {m: list(c) for m, c in trial.comp.items()}), 0
        else:
            since += 1
    _, segs, comp = best
    out = [[] for _ in range(U)]
    for i, u in enumerate(prim):
        out[u] = segs[i]
    pc = parent_compute(segs)
    skipped = sum(int(pc[parents[n]].sum()) - len(comp[n]) for n in nested)
    return out, comp, skipped


def nested_coefficients(parent_computed: np.ndarray, computed: list[int]) -> dict[int, tuple[float, ...]]:
    """Plain-reuse coefficients of a nested unit at the steps it runs but does not compute."""
    c = set(computed)
    return {s: (1.0,) for s in np.flatnonzero(parent_computed).tolist() if s not in c}
