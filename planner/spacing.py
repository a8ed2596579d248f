"""Spaced step masks: the computed steps of a step-synchronous plan laid out like a coarser sampler's steps.

A step mask with n computed steps out of S is a coarser sampler whose skipped steps are predicted. The
classic coarse time grids space their steps by a power law: DDIM's ``quadratic`` skip (γ = 2) and EDM's ρ
schedule put more steps where the sample changes fastest. Here step k of n sits at ``round(S·(k/n)^γ)``:
γ = 1 is a uniform interval (FORA's shape), γ > 1 computes densely early, where the noise is high, and sparsely
late, the shape the adaptive peers realise (SeaCache's and TaylorSeer's warm-up; docs/planner.md, "Peer-shaped
family"). The masks of a range of γ are starting points of the closed-loop mask search
(:func:`cachec.mask_search.search_mask`); the error model ranks such masks poorly (docs/planner.md, "How well
the error model ranks the candidates"), so they are scored by sampling, not priced.
"""

from __future__ import annotations

import numpy as np

from .calibration import Calibration

#: exponents γ of the spaced masks the plan search scores (1 = uniform, 2 = DDIM's quadratic spacing)
SPACING_GAMMAS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)


def spaced_mask(steps: int, n: int, gamma: float, keep_last: int = 0) -> list[int]:
    """The computed steps ``round(steps·(k/n)^gamma)``, k = 0..n−1 (collisions pushed one step later), plus
    the last ``keep_last`` steps.

    Args:
        steps: S, the sampling steps (>= 1).
        n: computed steps, 1..S.
        gamma: the spacing exponent, >= 1 (1: uniform; larger: denser early).
        keep_last: 0..S.
    Returns:
        Sorted distinct step indices starting with 0.
    Raises:
        ValueError: n outside 1..S, gamma < 1 or keep_last outside 0..S.
    """
    if not 1 <= n <= steps or not gamma >= 1 or not 0 <= keep_last <= steps:
        raise ValueError(f"spaced mask needs 1 <= n <= steps ({steps}), gamma >= 1 and 0 <= keep_last <= steps, "
                         f"got n={n}, gamma={gamma}, keep_last={keep_last}")
    out: list[int] = []
    for k in range(n):
        s = int(np.floor(steps * (k / n) ** gamma + 0.5))
        s = max(s, out[-1] + 1) if out else 0
        out.append(min(s, steps - 1))
    return sorted(set(out) | set(range(steps - keep_last, steps)))


def spaced_masks(cal: Calibration, budget: float, keep_last: int = 0, gammas=SPACING_GAMMAS) -> list[list[int]]:
    """The distinct spaced masks at ``budget``: n is the count of whole computed steps nearest what the
    budget pays for (step-synchronous FLOPs: the planner's fill spends the rest, or its trim skips the excess),
    the last ``keep_last`` of them at the end and the other n − keep_last spaced.

    Args:
        cal: the calibration (steps, unit and fixed FLOPs).
        budget: FLOPs fraction (0, 1].
        keep_last: steps at the end computed in every mask.
        gammas: the exponents, in order.
    Returns:
        The masks in ``gammas`` order, duplicates dropped (the planner may still refuse one whose runs exceed
        its ``max_staleness``).
    """
    S, total = cal.steps, float(np.sum(cal.unit_flops))
    paid = (budget * S * cal.full_step_flops - S * cal.fixed_step_flops) / total
    n = int(min(max(round(paid), 1), S))
    spaced = max(n - keep_last, 1)
    out, seen = [], set()
    for g in gammas:
        m = spaced_mask(S, spaced, float(g), keep_last)
        if tuple(m) not in seen:
            seen.add(tuple(m))
            out.append(m)
    return out
