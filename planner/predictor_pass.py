"""The predictor pass: re-choose each skipped (unit, step)'s predictor under the trajectory-coherent price.

The solver chooses a predictor per skipped step inside each run of skipped steps (run-coherent segment
prices, :class:`~cachec.planner.error_model.SegmentTable`): the errors of one run add up before they are
squared, those of different runs do not. Along a sampled trajectory they do: a unit's prediction errors in
every run re-enter the same latent, and a lagging reuse errs the same way in each run, while forecast errors
of different runs partly cancel. The trajectory-coherent price ``||Σ_s sqrt(w_s) (F_s − F̂_s)||²`` over all of
a unit's skipped steps (:func:`~cachec.planner.error_model.schedule_error` with ``coherence="trajectory"``)
ranks predictor rules on a fixed mask far better (docs/planner.md, "How well the error model ranks the
candidates"), but its cross-run terms do not split into the DP's segments. So the pass runs after the
solver, with the schedule's computed steps fixed: per unit, coordinate descent over its skipped steps, each
step taking the candidate predictor (the error model's enabled ones, from the same anchors p and q) that
lowers the unit's trajectory price most, until a sweep changes nothing. The FLOPs do not change.

Measured in docs/planner.md, "The predictor pass". Source: this repo's error model (docs/planner.md).
"""

from __future__ import annotations

import numpy as np

from .error_model import EOC, REUSE, SCALE, ErrorModel
from .schedule import Schedule, round_sig

#: names of the planner option ``predictor_pass``: ``trajectory`` (this pass) or ``none``
PASSES = ("trajectory", "none")
#: a sweep ends the descent when no step changes; at most this many sweeps per unit
MAX_SWEEPS = 8
_REL_TOL = 1e-12


def _anchors(compute: np.ndarray, idle: np.ndarray) -> dict[int, tuple[int, int]]:
    """``{skipped step s: (p, q)}``: the last computed step before s and the one before it (q = -1: none)."""
    out, p, q = {}, -1, -1
    for s in range(len(compute)):
        if compute[s]:
            p, q = s, p
        elif not idle[s] and p >= 0:
            out[s] = (p, q)
    return out


def _vector(S: int, s: int, p: int, q: int, coeffs) -> np.ndarray:
    """The error direction ``e_s − Σ_j a_j e_{anchor j}`` of one linear prediction."""
    v = np.zeros(S)
    v[s] = 1.0
    v[p] -= coeffs[0]
    if len(coeffs) > 1:
        v[q] -= coeffs[1]
    return v


def _eoc_diag(model: ErrorModel, u: int, s: int, p: int, alpha: float) -> float:
    """An EOC correction's diagonal price change (as :func:`schedule_error` prices it; 0 outside the lags)."""
    j = s - p
    if not alpha or not model.eoc_ok or not 1 <= j <= model.eoc_lags:
        return 0.0
    return float(model.w[u, s] * (-2 * alpha * model.lin_judge[u, s, j - 1] + alpha * alpha * model.quad_judge[u, s, j - 1]))


def choose_predictors(model: ErrorModel, schedule: Schedule) -> Schedule:
    """The schedule with each skipped step's predictor re-chosen under the trajectory-coherent price.

    Args:
        model: the error model the schedule was solved with (its enabled predictors are the candidates;
            the fitted ones are fitted on its fit split, prices on its judging split).
        schedule: a ``history: computed`` schedule over the model's units and steps. Nested units
            (attention maps) and the units they are nested in keep their predictors: a parent's coefficients
            set its maps' propagation factors (:func:`~cachec.planner.nesting.propagation_factors`), which
            the map exchange priced. ``history: used`` schedules are returned unchanged.
    Returns:
        A new :class:`Schedule` with the same computed steps (so the same FLOPs), coefficients and EOC
        corrections re-chosen, and ``options["repredicted"]`` = the number of (unit, step) predictors that
        changed. Each unit's trajectory price never rises (the current predictor is always a candidate).
    Raises:
        ValueError: an inconsistent schedule (:meth:`Schedule.validate`).
    """
    schedule.validate()
    coeffs = [dict(c) for c in schedule.coeffs]
    alphas = [dict(a) for a in schedule.eoc_alpha]
    refs = [dict(r) for r in schedule.eoc_ref]
    out = Schedule(schedule.compute.copy(), coeffs, alphas, refs, schedule.history, dict(schedule.options),
                   list(schedule.parents))
    if schedule.history != "computed":
        return out
    S, changed = model.S, 0
    hosts = {p for p in schedule.parents if p is not None}
    for u in range(model.U):
        if schedule.parents[u] is not None or u in hosts:
            continue
        steps = _anchors(schedule.compute[u], schedule.idle(u))
        if not steps:
            continue
        changed += _descend(model, u, steps, coeffs[u], alphas[u], refs[u], S)
    out.options["repredicted"] = int(changed)
    return out


def _descend(model: ErrorModel, u: int, steps: dict, coeffs: dict, alphas: dict, refs: dict, S: int) -> int:
    """Coordinate descent of one unit's trajectory price; edits ``coeffs``/``alphas``/``refs`` in place and
    returns how many steps changed predictor."""
    ss = np.array(sorted(steps))
    p = np.array([steps[s][0] for s in ss])
    q = np.array([steps[s][1] for s in ss])
    has_q = q >= 0
    a1, a2, _, valid = model.fit_candidates(u, ss, p, np.where(has_q, q, 0), has_q)
    sw, G = model.sw[u], model.G_judge[u]
    options = []  # per step: [(coeffs, alpha, vector, diag)], the current choice first
    for i, s in enumerate(ss):
        cur = tuple(coeffs[s])
        al = float(alphas.get(s, 0.0))
        opts = [(cur, al, _vector(S, s, p[i], q[i], cur), _eoc_diag(model, u, s, p[i], al))]
        for k in np.flatnonzero(valid[:, i]):
            if k == EOC:  # an EOC correction needs its sidecar tensor: kept only where the solver chose it
                continue
            c = (1.0,) if k == REUSE else (float(a1[k, i]),) if k == SCALE else (float(a1[k, i]), float(a2[k, i]))
            c = tuple(round_sig(x) for x in c)  # as the solver stores coefficients: the same predictor compares equal
            if (c != cur or al) and all(c != o[0] or o[1] for o in opts[1:]):
                opts.append((c, 0.0, _vector(S, s, p[i], q[i], c), 0.0))
        options.append(opts)
    choice = [0] * len(ss)
    V = sum(sw[s] * options[i][0][2] for i, s in enumerate(ss))
    for _ in range(MAX_SWEEPS):
        moved = False
        for i, s in enumerate(ss):
            opts = options[i]
            if len(opts) < 2:
                continue
            GV = G @ V
            base = float(V @ GV)
            now = opts[choice[i]]
            best, best_gain = choice[i], 0.0
            for j, o in enumerate(opts):
                if j == choice[i]:
                    continue
                d = sw[s] * (o[2] - now[2])
                gain = -(2 * float(d @ GV) + float(d @ G @ d)) - (o[3] - now[3])
                if gain > best_gain + _REL_TOL * max(abs(base), 1e-300):
                    best, best_gain = j, gain
            if best != choice[i]:
                V = V + sw[s] * (opts[best][2] - now[2])
                choice[i] = best
                moved = True
        if not moved:
            break
    changed = 0
    for i, s in enumerate(ss):
        if choice[i] == 0:
            continue
        c, al = options[i][choice[i]][:2]
        coeffs[s] = c
        changed += 1
        if not al:
            alphas.pop(s, None)
            refs.pop(s, None)
    return changed
