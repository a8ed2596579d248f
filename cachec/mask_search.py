"""Closed-loop local search over the computed steps of a step-synchronous plan (docs/planner.md, "Mask search").

The step family's DP chooses its mask under the additive error model, which misprices masks against each
other (docs/planner.md, "How well the error model ranks the candidates"): on digits-mmdit at 40 % a
10-step mask 2.6 dB better than the DP's lay inside cachec's own space. This search first scores given
starting masks (the plan search passes the spaced masks of :func:`cachec.planner.spacing.spaced_masks`)
and goes on from the best of them and the start, then moves the mask one step at a time and lets
closed-loop sampling on the validation seeds decide:

- a neighbour of a mask shifts one computed step (not step 0) by ±1, drops one (the budget fill spends the
  freed FLOPs) or adds one (a mask over the budget is trimmed: its least useful (unit, step) computes are
  skipped, :func:`cachec.planner.segment_moves.trim_segments`);
- the neighbours are tried in the order of their trajectory-coherent price
  (:func:`cachec.planner.schedule_error`, ``coherence="trajectory"``, which ranks masks of one predictor set
  far better than the solver's run-coherent price), ``width`` at a time;
- the best of a batch replaces the current mask when it scores more than ``min_gain`` dB above it; when no
  batch does, the next batch of the same ranking is tried, until ``max_runs`` validation runs are spent or
  no untried neighbour is left.

Every step is computed by the same planner, so the result is an ordinary step-family plan with options
``mask`` (and ``fill`` or ``trimmed``) that :func:`cachec.refine.replan` rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .planner import schedule_error
from .planner.solver import mask_segments

#: validation runs of the mask search per budget in ``cachec compile`` and the benchmark
MASK_RUNS = 16
#: neighbours scored per batch
MASK_WIDTH = 4
#: least validation gain (dB) for a move to be taken
MASK_MIN_GAIN = 0.05


def neighbours(mask, steps: int, max_staleness: int, keep_last: int = 0) -> list[list[int]]:
    """Masks one move away from ``mask`` (sorted step indices with step 0): one computed step other than 0
    shifted by ±1, dropped, or one skipped step added; only masks that :func:`mask_segments` accepts
    (no run longer than ``max_staleness``, the last ``keep_last`` steps computed), without duplicates."""
    cur = sorted(int(s) for s in mask)
    have = set(cur)
    out, seen = [], {tuple(cur)}

    def keep(m):
        m = sorted(m)
        if tuple(m) in seen:
            return
        try:
            mask_segments(m, steps, max_staleness, keep_last)
        except ValueError:
            return
        seen.add(tuple(m))
        out.append(m)

    for s in cur[1:]:
        for d in (-1, 1):
            t = s + d
            if 1 <= t < steps and t not in have:
                keep([x for x in cur if x != s] + [t])
        keep([x for x in cur if x != s])
    for t in range(1, steps):
        if t not in have:
            keep(cur + [t])
    return out


@dataclass
class MaskSearch:
    """Outcome of :func:`search_mask`.

    Attributes:
        mask: the best mask found (the start when no move scored above it by ``min_gain``).
        psnr: its validation PSNR, dB.
        runs: validation runs spent.
        tried: ``(mask, psnr)`` of every scored starting mask and neighbour, in order.
        moves: the masks taken, in order (not including the start).
        start_runs: validation runs spent on the given starting masks (included in ``runs``).
    """

    mask: list[int]
    psnr: float
    runs: int
    tried: list[tuple[list[int], float]] = field(default_factory=list)
    moves: list[list[int]] = field(default_factory=list)
    start_runs: int = 0


def search_mask(planner, budget: float, start: list[int], start_psnr: float, score: Callable[[list[int]], float], *,
                predictors: str = "fitted", max_runs: int = MASK_RUNS, width: int = MASK_WIDTH,
                min_gain: float = MASK_MIN_GAIN, log: Callable[[str], None] | None = None,
                rank: Callable[[list[int]], float] | None = None, starts=()) -> MaskSearch:
    """Closed-loop local search from the step mask ``start`` (module docstring).

    Args:
        planner: the :class:`cachec.planner.Planner` of the uncached calibration.
        budget: FLOPs fraction (0, 1].
        start: the starting mask (computed step indices); ``start_psnr`` its validation PSNR in dB.
        score: validation PSNR (dB) of the step-family plan on a mask (``planner.plan(budget, "cachec",
            family="step", mask=m, predictors=predictors)``): one validation run per call.
        predictors: the predictor set of every plan (a key of :data:`cachec.planner.error_model.PREDICTOR_SETS`).
        max_runs: most calls of ``score`` (>= 0).
        width: neighbours scored per batch (>= 1).
        min_gain: a move is taken when it scores more than this many dB above the current mask.
        log: progress printer.
        rank: the order in which neighbours are scored, lowest first (default: the trajectory-coherent
            price of the neighbour's plan); it runs after the planner accepted the neighbour.
        starts: further starting masks, each scored once before the local search (one validation run each,
            not counted against ``max_runs``; masks the planner refuses are skipped); the best of them
            replaces ``start`` when it scores more than ``min_gain`` above it (a move).
    Returns:
        :class:`MaskSearch`.
    Raises:
        ValueError: ``max_runs`` < 0 or ``width`` < 1, or as the planner raises on ``start``.
    """
    if int(max_runs) != max_runs or max_runs < 0 or int(width) != width or width < 1:
        raise ValueError(f"max_runs must be an int >= 0 and width an int >= 1, got {max_runs!r}, {width!r}")
    S = planner.cal.steps
    probe = planner.schedule(budget, "cachec", family="step", mask=start, predictors=predictors)
    K, keep_last = probe.options["max_staleness"], probe.options["keep_last"]
    model = planner.error_model(predictors)

    def price(m):
        sched = planner.schedule(budget, "cachec", family="step", mask=m, predictors=predictors)
        return schedule_error(model, sched, coherence="trajectory")

    out = MaskSearch(sorted(start), float(start_psnr), 0)
    tried = {tuple(out.mask)}
    scored = []
    for m in starts:
        m = sorted(int(s) for s in m)
        if tuple(m) in tried:
            continue
        tried.add(tuple(m))
        try:
            price(m)  # the planner accepts it (fits the budget, runs within max_staleness)
        except ValueError:
            continue
        p = float(score(m))
        out.runs += 1
        out.start_runs += 1
        out.tried.append((m, p))
        scored.append((p, m))
    if scored:
        p, m = max(scored, key=lambda x: x[0])
        if log:
            log(f"    mask search at {100 * budget:.0f}%: best of {len(scored)} starting masks {p:.2f} dB "
                f"vs {out.psnr:.2f} dB")
        if p > out.psnr + min_gain:
            out.mask, out.psnr = m, p
            out.moves.append(m)
    max_runs = max_runs + out.start_runs
    while out.runs < max_runs:
        priced = []
        for m in neighbours(out.mask, S, K, keep_last):
            if tuple(m) in tried:
                continue
            try:
                p = price(m)
                priced.append((p if rank is None else rank(m), m))
            except ValueError:  # a mask the planner cannot fit into the budget (the trim refuses it): not a move
                tried.add(tuple(m))
        ranked = [m for _, m in sorted(priced, key=lambda x: x[0])]
        moved = False
        while ranked and out.runs < max_runs and not moved:
            batch, ranked = ranked[:min(width, max_runs - out.runs)], ranked[width:]
            scored = []
            for m in batch:
                tried.add(tuple(m))
                p = float(score(m))
                out.runs += 1
                out.tried.append((m, p))
                scored.append((p, m))
            p, m = max(scored, key=lambda x: x[0])
            if log:
                log(f"    mask search at {100 * budget:.0f}%: best of {len(batch)} neighbours {p:.2f} dB "
                    f"vs {out.psnr:.2f} dB ({out.runs}/{max_runs} runs)")
            if p > out.psnr + min_gain:
                out.mask, out.psnr, moved = m, p, True
                out.moves.append(m)
        if not moved:
            break
    return out
