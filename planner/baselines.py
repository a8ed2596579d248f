"""Published caching schedules as :class:`Schedule` objects, priced by the same error model as cachec.

Sources: FORA (arXiv 2407.01425), EOC (arXiv 2501.19243), GOC (arXiv 2503.05156).

- ``fora``: every unit computed at steps 0, N, 2N, ...; plain reuse in between.
- ``eoc-paper``: the FORA schedule; every cached step corrected multiplicatively with alpha = 0.01 and
  the prior's one-step change ``D = P_s - P_{s-1}``; the corrected value becomes the next cache entry
  (``history: used``).
- ``goc-paper``: the FORA schedule with ``history: used`` (a two-deep queue of used outputs) and the
  gradient step ``F_hat = (1 + lam) Q0 - lam Q1``, lam = 1.2, at cached steps whose class-averaged
  consecutive differences point the same way. The paper derives its (hard-coded) step lists offline from
  class-averaged feature statistics; here the gate is the calibration's ``goc_cos_sum`` averaged over
  units and (sample, branch) outputs: a cached step s >= 2 is corrected iff
  ``mean cos(F_s - F_{s-1}, F_{s-1} - F_{s-2}) >= 0``. Step 1 (a one-deep queue) is never corrected.
- ``uniform``: step 0 computes every unit; every later step computes an equal share of unit FLOPs,
  taken round-robin over the units (a deterministic rotation), with plain reuse.
"""

from __future__ import annotations

import numpy as np

from .calibration import Calibration
from .schedule import Schedule, realised_fraction, round_sig

EOC_PAPER_ALPHA = 0.01
GOC_PAPER_LAMBDA = 1.2


def _realised(cal: Calibration, compute: np.ndarray) -> float:
    return realised_fraction(compute, cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops)


def fora_mask(units: int, steps: int, interval: int) -> np.ndarray:
    """(U, S) bool FORA mask: computed at steps 0, N, 2N, ... (N = ``interval`` >= 1).

    Raises:
        ValueError: interval < 1.
    """
    if int(interval) != interval or interval < 1:
        raise ValueError(f"interval must be an int >= 1, got {interval!r}")
    row = (np.arange(steps) % int(interval)) == 0
    return np.tile(row, (units, 1))


def fora_interval(cal: Calibration, budget: float) -> int:
    """The FORA interval N whose realised FLOPs fraction is <= budget and closest to it.

    Args:
        cal: calibration (unit FLOPs, steps).
        budget: fraction (0, 1].
    Returns:
        N in 1..S.
    Raises:
        ValueError: even N = S (only step 0 computed) exceeds the budget; the message names that minimum.
    """
    S, U = cal.steps, cal.n_units
    best = None
    for N in range(1, S + 1):
        r = _realised(cal, fora_mask(U, S, N))
        if r <= budget * (1 + 1e-12) and (best is None or r > best[1]):
            best = (N, r)
    if best is None:
        raise ValueError(f"budget {budget:.6g} is below FORA's minimum {_realised(cal, fora_mask(U, S, S)):.6g} (only step 0 computed)")
    return best[0]


def _resolve_interval(cal: Calibration, budget, interval) -> int:
    if interval is not None:
        return int(interval)
    if budget is None:
        raise ValueError("give a budget or an explicit interval")
    return fora_interval(cal, float(budget))


def fora(cal: Calibration, budget: float | None = None, interval: int | None = None) -> Schedule:
    """FORA: all units recomputed every N steps, plain reuse in between (arXiv 2407.01425).

    Args:
        cal: calibration.
        budget: FLOPs fraction; picks the N with realised <= budget closest to it (ignored if ``interval``).
        interval: explicit N.
    Returns:
        Schedule (history ``computed``; identical to ``used`` for plain reuse).
    Raises:
        ValueError: neither budget nor interval, or the budget is below FORA's minimum.
    """
    N = _resolve_interval(cal, budget, interval)
    mask = fora_mask(cal.n_units, cal.steps, N)
    coeffs = [{int(s): (1.0,) for s in np.flatnonzero(~row)} for row in mask]
    return Schedule(compute=mask, coeffs=coeffs, history="computed", options={"interval": N})


def eoc_paper(cal: Calibration, budget: float | None = None, interval: int | None = None, alpha: float = EOC_PAPER_ALPHA) -> Schedule:
    """EOC as published: FORA schedule, every cached step ``F_hat = Q0 * (1 + alpha (P_s - P_{s-1}))``.

    ``history: used`` (the corrected value becomes the next cache entry), alpha = 0.01 everywhere.

    Returns:
        Schedule whose ``eoc_ref[u][s] = s - 1`` (sidecar tensor D = P_s - P_{s-1}).
    Raises:
        ValueError: as :func:`fora`; or the calibration has no prior (``prior_count`` 0).
    """
    if int(cal.header["prior_count"]) <= 0:
        raise ValueError("eoc-paper needs the EOC prior, but the calibration's prior_count is 0")
    N = _resolve_interval(cal, budget, interval)
    mask = fora_mask(cal.n_units, cal.steps, N)
    coeffs, alphas, refs = [], [], []
    a = round_sig(alpha)
    for row in mask:
        sk = [int(s) for s in np.flatnonzero(~row)]
        coeffs.append({s: (1.0,) for s in sk})
        alphas.append({s: a for s in sk} if a else {})
        refs.append({s: s - 1 for s in sk} if a else {})
    return Schedule(compute=mask, coeffs=coeffs, eoc_alpha=alphas, eoc_ref=refs, history="used",
                    options={"interval": N, "alpha": a})


def goc_gate(cal: Calibration) -> np.ndarray:
    """(S,) bool: steps where GOC's gradient step is allowed (mean consecutive-difference cosine >= 0).

    The mean is over units and the ``goc_count`` (sample, branch) outputs; steps 0 and 1 are False
    (no two-deep history). With ``goc_count`` 0 every step >= 2 is allowed.
    """
    S = cal.steps
    count = int(cal.header["goc_count"])
    gate = np.arange(S) >= 2
    if count > 0:
        mean_cos = cal.goc_cos_sum.mean(axis=0) / count
        gate &= mean_cos >= 0
    return gate


def goc_paper(cal: Calibration, budget: float | None = None, interval: int | None = None, lam: float = GOC_PAPER_LAMBDA) -> Schedule:
    """GOC as published: FORA schedule, ``history: used``, ``F_hat = (1 + lam) Q0 - lam Q1`` on gated steps.

    Args:
        lam: gradient step (1.2 in the released code for a FORA schedule).
    Returns:
        Schedule; ungated cached steps use plain reuse ``[1]``.
    Raises:
        ValueError: as :func:`fora`.
    """
    N = _resolve_interval(cal, budget, interval)
    mask = fora_mask(cal.n_units, cal.steps, N)
    gate = goc_gate(cal)
    c = (round_sig(1.0 + lam), round_sig(-lam))
    coeffs = [{int(s): (c if gate[s] else (1.0,)) for s in np.flatnonzero(~row)} for row in mask]
    return Schedule(compute=mask, coeffs=coeffs, history="used",
                    options={"interval": N, "lambda": round_sig(lam), "gating": "mean goc_cos >= 0"})


def uniform(cal: Calibration, budget: float) -> Schedule:
    """Same share of unit FLOPs at every step after step 0, units taken round-robin; plain reuse.

    Step 0 computes every unit. Steps 1..S-1 share the remaining budget equally: a cyclic pointer walks
    the units in order and computes the next one while the cumulative spend stays within
    ``s * per_step`` (so the rounding carries over and realised <= budget).

    Raises:
        ValueError: budget below the minimum (fixed FLOPs plus step 0); the message names it.
    """
    S, U = cal.steps, cal.n_units
    flops = cal.unit_flops
    full, fixed = cal.full_step_flops, cal.fixed_step_flops
    minb = (S * fixed + float(flops.sum())) / (S * full)
    if budget < minb * (1 - 1e-12):
        raise ValueError(f"budget {budget:.6g} is below the uniform baseline's minimum {minb:.6g} (fixed FLOPs + step 0)")
    mask = np.zeros((U, S), dtype=bool)
    mask[:, 0] = True
    if S > 1:
        cap = budget * S * full * (1 + 1e-12) - S * fixed - float(flops.sum())
        per_step = cap / (S - 1)
        spent, ptr = 0.0, 0
        for s in range(1, S):
            allowed = per_step * s
            taken = 0
            while taken < U and spent + flops[ptr] <= allowed:
                mask[ptr, s] = True
                spent += float(flops[ptr])
                ptr = (ptr + 1) % U
                taken += 1
    coeffs = [{int(s): (1.0,) for s in np.flatnonzero(~row)} for row in mask]
    return Schedule(compute=mask, coeffs=coeffs, history="computed", options={})
