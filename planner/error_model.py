"""Error model: exact squared errors of linear predictors from the Gram statistics, EOC's correction, and
coherent (sensitivity-weighted) pricing of runs of skipped steps.

Sources: the error model of docs/planner.md; FORA (arXiv 2407.01425), EOC (arXiv 2501.19243), GOC
(arXiv 2503.05156), TaylorSeer (arXiv 2503.06923); the EOC error formula of docs/calibration-format.md.

Conventions. G is a unit's Gram summed over guidance branches, (S, S) float64. A linear prediction of
step s from steps t_j with coefficients a_j has squared error ``G[s,s] - 2 sum_j a_j G[s,t_j] +
sum_ij a_i a_j G[t_i,t_j]``, i.e. ``c^T G c`` with ``c = e_s - sum_j a_j e_{t_j}``. Errors are summed
over the samples (and branches) of a split; the model divides by ``n_samples * branches`` so that
predicted errors are per (sample, branch) output. Weights are the calibrated ``sensitivity[u, s]``
(never normalised by ||F_s||^2: the sensitivity already carries the scale). A run of consecutive skipped
steps with per-step errors ``delta_s`` is priced coherently as ``||sum_s sqrt(w_s) delta_s||^2`` (the
errors of one run add up before they are squared).

Fit/judge: coefficients (and EOC alphas) are fitted on split 0 and every predictor is judged on split 1;
a compensation is chosen only where it beats plain reuse on the held-out split. Without held-out
samples (``samples[1] == 0``) both roles fall back to split 0.

EOC inside coherent runs: the cross terms between an EOC correction and the other steps' errors of the
run are not in the statistics; the correction enters the run's price as its own (diagonal) change of
the step's error, ``w_s (-2 alpha lin + alpha^2 quad)``. For single-step runs this is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibration import Calibration
from .nesting import propagation_factors
from .schedule import Schedule

#: candidate predictors of a skipped step s with anchors p (last computed) and q (the one before)
PREDICTORS = ("reuse", "scale", "eoc", "goc", "taylor", "ls2")
REUSE, SCALE, EOC, GOC, TAYLOR, LS2 = range(len(PREDICTORS))
#: named predictor sets of the plan search (docs/planner.md, "Predictor sets"): ``fitted`` = every candidate,
#: chosen per (unit, step) by the judged error; ``taylor`` = plain reuse or the first-order Taylor forecast
#: only (TaylorSeer's / SeaCache's predictor), which the closed loop often prefers: the fitted coefficients
#: are fitted on uncached trajectories and extrapolate worse from perturbed anchors; ``forecast`` = the
#: first-order forecast wherever two computed outputs exist, plain reuse only before that (a set without
#: ``reuse`` uses it only as that fallback): TaylorSeer's and SeaCache's predictor (on the time grid, theirs
#: on the step index), which the ``taylor`` set's per-unit choice rarely makes because the judged error
#: prices the forecast worse than reuse where sampling finds it better (docs/planner.md, "Predictor sets")
PREDICTOR_SETS = {"fitted": PREDICTORS, "taylor": ("reuse", "taylor"), "forecast": ("taylor",)}


def resolve_predictors(predictors) -> tuple[str, ...]:
    """A predictor set given by name (a key of :data:`PREDICTOR_SETS`) or as names of :data:`PREDICTORS`.

    Raises:
        ValueError: an unknown set name.
    """
    if isinstance(predictors, str):
        if predictors not in PREDICTOR_SETS:
            raise ValueError(f"predictors: unknown set {predictors!r}; known: {sorted(PREDICTOR_SETS)} "
                         f"or a list of {list(PREDICTORS)}")
        return tuple(PREDICTOR_SETS[predictors])
    return tuple(predictors)


#: targets of the fitted coefficients' ridge (:class:`ErrorModel` ``shrink``)
SHRINK_TARGETS = ("reuse", "taylor")

#: predictors that need the second anchor q
NEEDS_Q = (GOC, TAYLOR, LS2)

_TINY = 1e-300


def quadratic_error(G: np.ndarray, c: np.ndarray) -> float:
    """``c^T G c``: the squared norm of ``sum_t c_t F_t`` summed over samples.

    Args:
        G: (S, S) float64 Gram matrix.
        c: (S,) coefficient vector over steps.
    Returns:
        float (same units as G: squared feature norm, summed over samples).
    """
    c = np.asarray(c, dtype=np.float64)
    return float(c @ G @ c)


def predictor_error(G: np.ndarray, s: int, steps, coeffs) -> float:
    """Exact squared error of ``F_hat_s = sum_j coeffs[j] F_{steps[j]}`` from a Gram matrix.

    ``G[s,s] - 2 sum_j a_j G[s,t_j] + sum_ij a_i a_j G[t_i,t_j]`` (calibration-format.md).

    Args:
        G: (S, S) float64 Gram (one split, summed over branches).
        s: predicted step.
        steps: source steps t_j.
        coeffs: coefficients a_j (same length as ``steps``).
    Returns:
        The summed squared error (float).
    """
    c = np.zeros(G.shape[0])
    c[s] += 1.0
    for t, a in zip(steps, coeffs):
        c[t] -= a
    return quadratic_error(G, c)


def eoc_error(reuse_error: float, lin: float, quad: float, alpha: float) -> float:
    """EOC's split error ``E(alpha) = ||F_s - F_p||^2 - 2 alpha lin + alpha^2 quad``.

    Args:
        reuse_error: ``||F_s - F_p||^2`` from the Gram.
        lin: ``<eoc_m[k, s, j-1], D>`` with ``D = P_s - P_p``, ``j = s - p``.
        quad: ``<eoc_q[k, p], D * D>``.
        alpha: correction strength (dimensionless).
    Returns:
        float. Source: EOC (arXiv 2501.19243), formula of docs/calibration-format.md.
    """
    return reuse_error - 2.0 * alpha * lin + alpha * alpha * quad


def fit_eoc_alpha(lin: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Least-squares EOC strength ``alpha = lin / quad`` (0 where ``quad`` is 0), elementwise."""
    lin = np.asarray(lin, dtype=np.float64)
    quad = np.asarray(quad, dtype=np.float64)
    return np.where(quad > _TINY, lin / np.where(quad > _TINY, quad, 1.0), 0.0)


class ErrorModel:
    """Per-unit Gram statistics split into fit/judge roles, weights and EOC inner products.

    Args:
        cal: the calibration.
        ridge: relative ridge of fitted coefficients (dimensionless; the penalty is
            ``ridge * mean(diag of the anchors' Gram)``, pulling towards ``shrink``'s coefficients).
        shrink: what the ridge pulls the two-anchor fits (``goc``, ``ls2``) towards: ``reuse`` (``[1, 0]``,
            λ = 0) or ``taylor`` (the first-order forecast ``[1 + h, -h]``, λ = h; issue 20: fitted
            coefficients that fall back on the forecast, not on reuse, where the calibration says little).
            ``scale`` shrinks towards reuse either way; ``eoc`` has no ridge.
        predictors: names from :data:`PREDICTORS` the cachec solver may use. Plain reuse is always
            available: chosen by the judged error when ``reuse`` is named, else only where no named predictor
            applies (the fallback, e.g. the steps before a unit's second computed output).
    Raises:
        ValueError: an unknown predictor name or ``shrink``, a negative ridge.

    Attributes:
        G_fit, G_judge: (U, S, S) float64 Grams summed over branches (split 0 and split 1).
        w: (U, S) float64 sensitivity weights; sw = sqrt(w).
        norm: float, number of (sample, branch) outputs in the judging split.
        lin_fit, quad_fit, lin_judge, quad_judge: (U, S, K) EOC inner products (lag j at j-1).
        tgrid: (S,) the time grid for Taylor spacing (sigmas when present, else timesteps).
    """

    def __init__(self, cal: Calibration, ridge: float = 1e-3, predictors=PREDICTORS, shrink: str = "reuse"):
        unknown = [p for p in predictors if p not in PREDICTORS]
        if unknown:
            raise ValueError(f"unknown predictors {unknown}; known: {list(PREDICTORS)}")
        if not np.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        if shrink not in SHRINK_TARGETS:
            raise ValueError(f"shrink must be one of {list(SHRINK_TARGETS)}, got {shrink!r}")
        self.cal = cal
        self.ridge = float(ridge)
        self.shrink = shrink
        #: reuse only where no named predictor applies (``reuse`` not named)
        self.reuse_fallback = "reuse" not in predictors and len(predictors) > 0
        self.predictors = tuple(p for p in PREDICTORS if p in predictors or (p == "reuse" and not self.reuse_fallback))
        G = cal.gram.sum(axis=1)  # (U, 2, S, S)
        n0, n1 = cal.samples
        judge = 1 if n1 > 0 else 0
        self.G_fit = np.ascontiguousarray(G[:, 0])
        self.G_judge = np.ascontiguousarray(G[:, judge])
        self.norm = float(max((n1 if judge else n0) * cal.branches, 1))
        self.w = np.clip(cal.sensitivity, 0.0, None)
        self.sw = np.sqrt(self.w)
        self.lin_fit, self.quad_fit = cal.eoc_lin[:, 0], cal.eoc_quad[:, 0]
        self.lin_judge, self.quad_judge = cal.eoc_lin[:, judge], cal.eoc_quad[:, judge]
        self.eoc_lags = cal.eoc_lags
        self.eoc_ok = cal.eoc_lags > 0 and int(cal.header["prior_count"]) > 0
        sig = cal.header.get("sigmas")
        self.tgrid = np.asarray(sig if sig is not None else cal.header["timesteps"], dtype=np.float64)
        self.U, self.S = cal.n_units, cal.steps
        #: what identifies this model's prices (the planner's caches are keyed by it)
        self.key = (self.ridge, self.predictors, self.shrink)

    # ---- fitted candidates -----------------------------------------------------------------------
    def fit_candidates(self, u, s, p, q, has_q):
        """Coefficients of every candidate predictor, fitted on split 0 (vectorised).

        Args:
            u, s, p, q: integer index arrays (broadcastable): unit, skipped step, last computed step p,
                previous computed step q (any valid index where ``has_q`` is False).
            has_q: bool array, whether q exists.
        Returns:
            ``(a1, a2, alpha, valid)``, each of shape ``(len(PREDICTORS),) + broadcast shape``: the
            prediction is ``a1 F_p + a2 F_q``, times ``(1 + alpha D)`` for EOC; ``valid`` marks candidates
            available there (enabled, anchors present, EOC lag within ``eoc_lags``).
        """
        u, s, p, q, has_q = np.broadcast_arrays(u, s, p, q, has_q)
        G = self.G_fit
        Gsp, Gsq = G[u, s, p], G[u, s, q]
        Gpp, Gpq, Gqq = G[u, p, p], G[u, p, q], G[u, q, q]
        shape = (len(PREDICTORS),) + u.shape
        a1 = np.zeros(shape)
        a2 = np.zeros(shape)
        alpha = np.zeros(shape)
        valid = np.zeros(shape, dtype=bool)
        on = {name: name in self.predictors for name in PREDICTORS}
        # reuse
        a1[REUSE] = 1.0
        valid[REUSE] = True
        # scaled reuse: min ||F_s - a F_p||^2 + rho (a - 1)^2
        rho1 = self.ridge * Gpp
        a1[SCALE] = (Gsp + rho1) / np.maximum(Gpp + rho1, _TINY)
        valid[SCALE] = on["scale"] & (Gpp > _TINY)
        # EOC on reuse: alpha fitted in closed form on split 0
        j = s - p
        if self.eoc_ok and on["eoc"]:
            K = self.eoc_lags
            jj = np.clip(j, 1, K) - 1
            lin, quad = self.lin_fit[u, s, jj], self.quad_fit[u, s, jj]
            a1[EOC] = 1.0
            alpha[EOC] = fit_eoc_alpha(lin, quad)
            valid[EOC] = (j >= 1) & (j <= K) & (quad > _TINY)
        # first-order Taylor / finite difference on the time grid
        t = self.tgrid
        den = t[p] - t[q]
        h = np.where(np.abs(den) > 0, (t[s] - t[p]) / np.where(np.abs(den) > 0, den, 1.0), (s - p) / np.maximum(p - q, 1))
        a1[TAYLOR], a2[TAYLOR] = 1.0 + h, -h
        valid[TAYLOR] = on["taylor"] & has_q
        # the ridge's target: lambda0 = 0 ([1, 0], reuse) or h ([1 + h, -h], the forecast)
        lam0 = h if self.shrink == "taylor" else 0.0
        rho = self.ridge * 0.5 * (Gpp + Gqq)
        # GOC gradient step with fitted lambda: F_p + lam (F_p - F_q)
        dd = Gpp - 2 * Gpq + Gqq  # ||F_p - F_q||^2
        num = Gsp - Gsq - Gpp + Gpq  # <F_s - F_p, F_p - F_q>
        lam = (num + rho * lam0) / np.maximum(dd + rho, _TINY)
        a1[GOC], a2[GOC] = 1.0 + lam, -lam
        valid[GOC] = on["goc"] & has_q & (dd > _TINY)
        # least squares over (p, q), ridge towards [1 + lam0, -lam0]
        m11, m12, m22 = Gpp + rho, Gpq, Gqq + rho
        b1, b2 = Gsp + rho * (1.0 + lam0), Gsq - rho * lam0
        det = m11 * m22 - m12 * m12
        ok = det > 1e-12 * np.maximum(m11 * m22, _TINY)
        sdet = np.where(ok, det, 1.0)
        a1[LS2] = (m22 * b1 - m12 * b2) / sdet
        a2[LS2] = (m11 * b2 - m12 * b1) / sdet
        valid[LS2] = on["ls2"] & has_q & ok
        if self.reuse_fallback:
            valid[REUSE] = ~valid[1:].any(axis=0)
        return a1, a2, alpha, valid

    # ---- exact single-step errors (judging split) ------------------------------------------------
    def step_error(self, u: int, s: int, steps, coeffs, alpha: float = 0.0, split: str = "judge") -> float:
        """Unweighted squared error of one prediction of (u, s), summed over a split's outputs.

        Args:
            u, s: unit and step.
            steps, coeffs: source steps and coefficients of the linear part.
            alpha: EOC strength; non-zero needs ``steps == [p]``, ``coeffs == [1]`` and ``s - p <= eoc_lags``
                (D = P_s - P_p).
            split: ``"fit"`` or ``"judge"``.
        Returns:
            float.
        Raises:
            ValueError: an EOC correction not on plain reuse or beyond the stored lags.
        """
        G = self.G_fit if split == "fit" else self.G_judge
        err = predictor_error(G[u], s, steps, coeffs)
        if alpha:
            lin, quad = self.eoc_terms(u, s, steps, coeffs, split)
            err += -2.0 * alpha * lin + alpha * alpha * quad
        return err

    def eoc_terms(self, u: int, s: int, steps, coeffs, split: str = "judge") -> tuple[float, float]:
        """(lin, quad) EOC inner products of step s corrected on plain reuse of ``steps[0]``.

        Raises:
            ValueError: not plain reuse, or lag outside 1..eoc_lags.
        """
        if len(steps) != 1 or tuple(coeffs) != (1.0,):
            raise ValueError("an EOC correction is only defined on plain reuse (coeffs [1])")
        j = s - int(steps[0])
        if not (1 <= j <= self.eoc_lags) or not self.eoc_ok:
            raise ValueError(f"EOC lag {j} is outside the calibrated lags 1..{self.eoc_lags}")
        lin = self.lin_fit if split == "fit" else self.lin_judge
        quad = self.quad_fit if split == "fit" else self.quad_judge
        return float(lin[u, s, j - 1]), float(quad[u, s, j - 1])


@dataclass
class SegmentTable:
    """Coherent prices of every run of skipped steps, for all units and anchors.

    A segment starts at a computed step p whose previous computed step is q = p - d (d = 0: none, only
    at p = 0) and skips the r steps p+1..p+r (r = 0..K).

    Attributes:
        cost: (U, S, K+2, K+1) float64 weighted coherent error of the segment on the judging split, per
            (sample, branch) output; inf where invalid.
        kind, a1, a2, alpha: (U, S, K+2, K) the predictor chosen for the i-th skipped step (index i-1)
            by the greedy coherent choice (kind indexes :data:`PREDICTORS`).
        use_reuse: (U, S, K+2, K+1) bool, True where pricing the whole run with plain reuse is cheaper
            than the greedy choice (then the run uses plain reuse).
        max_staleness: K.
        gram, sw, norm: the error model's judging Gram (U, S, S), square-root sensitivities (U, S) and
            normaliser, for pricing runs that are not contiguous (nested units, :mod:`~cachec.planner.nesting`).
    """

    cost: np.ndarray
    kind: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    alpha: np.ndarray
    use_reuse: np.ndarray
    max_staleness: int
    gram: np.ndarray | None = None
    sw: np.ndarray | None = None
    norm: float = 1.0

    def rows(self, units) -> "SegmentTable":
        """The table of the units ``units`` (indices), in that order."""
        idx = np.asarray(units, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]
        return SegmentTable(cost=self.cost[idx], kind=self.kind[idx], a1=self.a1[idx], a2=self.a2[idx],
                            alpha=self.alpha[idx], use_reuse=self.use_reuse[idx], max_staleness=self.max_staleness,
                            gram=pick(self.gram), sw=pick(self.sw), norm=self.norm)

    def run(self, u: int, p: int, d: int, r: int) -> list[tuple[int, tuple[float, ...], float]]:
        """Predictors of the skipped steps of one segment.

        Returns:
            list of ``(kind, coeffs, alpha)`` for steps p+1..p+r (coeffs on [H_1] or [H_1, H_2]).
        """
        out = []
        for i in range(1, r + 1):
            if self.use_reuse[u, p, d, r]:
                out.append((REUSE, (1.0,), 0.0))
                continue
            k = int(self.kind[u, p, d, i - 1])
            a1, a2, al = float(self.a1[u, p, d, i - 1]), float(self.a2[u, p, d, i - 1]), float(self.alpha[u, p, d, i - 1])
            if k == REUSE:
                out.append((k, (1.0,), 0.0))
            elif k == SCALE:
                out.append((k, (a1,), 0.0))
            elif k == EOC:
                out.append((k, (1.0,), al))
            else:
                out.append((k, (a1, a2), 0.0))
        return out


def segment_table(model: ErrorModel, max_staleness: int) -> SegmentTable:
    """Price every segment (unit, anchors, run length) once, vectorised over units and anchors.

    For each anchor pair the skipped steps are visited in order; at each one every valid candidate's
    increment of the coherent run error ``||sum_s sqrt(w_s) delta_s||^2`` (judging split) is computed
    and the smallest is kept (greedy coherent choice; plain reuse wins ties). The all-reuse run is priced
    alongside and used where cheaper (never where reuse is only the fallback, :class:`ErrorModel`).
    Cost O(U * S * K^3); G v is kept only on the window of rows
    q, p, p+1..p+K that later increments read.

    Args:
        model: the error model.
        max_staleness: K >= 0, the longest run of skipped steps.
    Returns:
        A :class:`SegmentTable`.
    Raises:
        ValueError: negative ``max_staleness``.
    """
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    U, S = model.U, model.S
    K = int(min(max_staleness, S - 1))
    Q = K + 2
    W = K + 2  # window rows per anchor: 0 -> q, 1 -> p, 1 + i -> p + i
    G = model.G_judge
    uu = np.arange(U)[:, None, None]
    p = np.arange(S)[None, :, None]
    d = np.arange(Q)[None, None, :]
    q = p - d
    has_q = (d >= 1) & (q >= 0)
    anchor_ok = np.broadcast_to(((p == 0) & (d == 0)) | ((p >= 1) & has_q), (U, S, Q))
    qi = np.where(has_q, q, p)
    pb = np.broadcast_to(p, (U, S, Q))
    qb = np.broadcast_to(qi, (U, S, Q))
    hq = np.broadcast_to(has_q, (U, S, Q))
    rows_q = np.broadcast_to(qi[..., None], (1, S, Q, 1))
    rows_p = np.broadcast_to(np.minimum(p[..., None] + np.arange(K + 1), S - 1), (1, S, Q, K + 1))
    rows = np.concatenate([rows_q, rows_p], axis=3)  # (1, S, Q, W) step index of each window row
    Gw = G[uu[..., None, None], rows[..., :, None], rows[..., None, :]]  # (U, S, Q, W, W)
    Gpp, Gpq, Gqq = Gw[..., 1, 1], Gw[..., 1, 0], Gw[..., 0, 0]
    colp, colq = Gw[..., :, 1], Gw[..., :, 0]
    Gv_g = np.zeros((U, S, Q, W))  # (G v) on the window rows, v = sum of sqrt(w) * error vectors (greedy run)
    Gv_r = np.zeros((U, S, Q, W))  # same for the all-reuse run
    E_g = np.zeros((U, S, Q))
    E_r = np.zeros((U, S, Q))
    cost = np.full((U, S, Q, K + 1), np.inf)
    cost[..., 0] = np.where(anchor_ok, 0.0, np.inf)
    kind = np.zeros((U, S, Q, K), dtype=np.int8)
    A1 = np.zeros((U, S, Q, K))
    A2 = np.zeros((U, S, Q, K))
    AL = np.zeros((U, S, Q, K))
    use_reuse = np.ones((U, S, Q, K + 1), dtype=bool)
    eoc_on = model.eoc_ok and "eoc" in model.predictors
    for i in range(1, K + 1):
        s = p + i
        valid_s = np.broadcast_to((s <= S - 1) & anchor_ok, (U, S, Q))
        if not valid_s.any():
            break
        si = np.broadcast_to(np.minimum(s, S - 1), (U, S, Q))
        a1, a2, al, ok = model.fit_candidates(uu, si, pb, qb, hq)
        ws = 1 + i
        Gss, Gsp, Gsq = Gw[..., ws, ws], Gw[..., ws, 1], Gw[..., ws, 0]
        w = model.w[uu, si]
        sw = model.sw[uu, si]
        # e^T G e for every candidate: e = e_s - a1 e_p - a2 e_q
        eGe = Gss - 2 * a1 * Gsp - 2 * a2 * Gsq + a1 * a1 * Gpp + 2 * a1 * a2 * Gpq + a2 * a2 * Gqq
        inc = 2 * sw * (Gv_g[..., ws] - a1 * Gv_g[..., 1] - a2 * Gv_g[..., 0]) + w * eGe
        if eoc_on:
            jj = np.clip(si - pb, 1, model.eoc_lags) - 1
            lin, quad = model.lin_judge[uu, si, jj], model.quad_judge[uu, si, jj]
            inc[EOC] += w * (-2 * al[EOC] * lin + al[EOC] ** 2 * quad)
        inc = np.where(ok, inc, np.inf)
        k = np.argmin(inc, axis=0)  # first minimum: reuse wins ties
        pick = lambda a: np.take_along_axis(a, k[None], axis=0)[0]
        c1, c2, ca = pick(a1), pick(a2), pick(al)
        E_g = E_g + pick(inc)
        cols = Gw[..., :, ws]
        Gv_g += sw[..., None] * (cols - c1[..., None] * colp - c2[..., None] * colq)
        # all-reuse run
        E_r = E_r + 2 * sw * (Gv_r[..., ws] - Gv_r[..., 1]) + w * (Gss - 2 * Gsp + Gpp)
        Gv_r += sw[..., None] * (cols - colp)
        kind[..., i - 1] = k
        A1[..., i - 1], A2[..., i - 1], AL[..., i - 1] = c1, c2, np.where(k == EOC, ca, 0.0)
        use_reuse[..., i] = (E_r <= E_g) & (not model.reuse_fallback)
        cost[..., i] = np.where(valid_s, np.where(use_reuse[..., i], E_r, E_g) / model.norm, np.inf)
    return SegmentTable(cost=cost, kind=kind, a1=A1, a2=A2, alpha=AL, use_reuse=use_reuse, max_staleness=K,
                        gram=G, sw=model.sw, norm=model.norm)


# ---- pricing an arbitrary schedule ---------------------------------------------------------------
def _history_vectors(schedule: Schedule, u: int, S: int):
    """``{skipped step: (S,) coefficients over computed steps of its prediction's linear part}``.

    ``history: used`` predictions are unrolled through the used values of earlier steps.
    """
    comp, idle = schedule.compute[u], schedule.idle(u)
    used = np.zeros((S, S))
    pred = {}
    computed: list[int] = []  # most recent first
    for s in range(S):
        if comp[s]:
            used[s, s] = 1.0
            computed.insert(0, s)
            continue
        if idle[s]:  # a nested unit whose parent skips the step does not run there
            continue
        a = schedule.coeffs[u][s]
        v = np.zeros(S)
        for j, aj in enumerate(a):
            if schedule.history == "computed":
                if j >= len(computed):
                    raise ValueError(f"unit {u} step {s}: {len(a)} coefficients but only {len(computed)} computed outputs")
                v[computed[j]] += aj
            else:
                if s - 1 - j < 0:
                    raise ValueError(f"unit {u} step {s}: {len(a)} coefficients but only {s} used outputs")
                v += aj * used[s - 1 - j]
        used[s] = v
        pred[s] = v
    return pred


def schedule_error(model: ErrorModel, schedule: Schedule, per_unit: bool = False, coherence: str = "run"):
    """Predicted error of any schedule: sensitivity-weighted coherent squared error on the judging split.

    For every maximal run R of skipped steps of a unit: ``||sum_{s in R} sqrt(w_s) (F_s - F_hat_s)||^2``
    (``coherence="run"``, the solver's segment prices), or one sum over all the unit's skipped steps
    (``coherence="trajectory"``: the errors of different runs add coherently too, as a lagging reuse's do
    along the sampled trajectory; docs/planner.md, "How well the error model ranks the candidates")
    with F_hat's linear part expressed over computed outputs (``history: used`` predictions are unrolled
    into combinations of computed ones), plus each EOC correction's diagonal change
    ``w_s (-2 alpha lin + alpha^2 quad)`` (exact lag ``s - p``, p the last computed step; for
    ``history: used`` that is the first-order compounding of the per-step corrections). An EOC lag beyond
    the calibrated ``eoc_lags`` cannot be priced and counts as plain reuse. Divided by ``model.norm``.

    Args:
        model: the error model.
        schedule: a schedule over the model's units and steps.
        per_unit: return the (U,) array instead of the total.
        coherence: ``run`` or ``trajectory`` (above).
    Returns:
        float (or (U,) float64): squared final-sample error per (sample, branch) output, additive model.
    A nested unit (:attr:`Schedule.parents`) adds nothing at the steps its parent skips (its parent's
    prediction stands in for it there), and its error at a step is scaled by the parent's propagation factor
    (:func:`cachec.planner.nesting.propagation_factors`: the parent's later predictions repeat it).

    Raises:
        ValueError: an inconsistent schedule (see :meth:`Schedule.validate`), an unknown ``coherence``.
    """
    if coherence not in ("run", "trajectory"):
        raise ValueError(f"coherence must be 'run' or 'trajectory', got {coherence!r}")
    schedule.validate()
    U, S = model.U, model.S
    if schedule.compute.shape != (U, S):
        raise ValueError(f"schedule shape {schedule.compute.shape} != (units, steps) = {(U, S)}")
    out = np.zeros(U)
    for u in range(U):
        comp, idle = schedule.compute[u], schedule.idle(u)
        pred = _history_vectors(schedule, u, S)
        sw = model.sw[u]
        parent = schedule.parents[u]
        if parent is not None and schedule.history == "computed":  # its error re-enters through the parent's history
            sw = sw * propagation_factors(schedule.compute[parent], schedule.coeffs[parent], model.sw[parent])
        rows = []
        cur = None
        diag = 0.0
        last_c = 0
        for s in range(S):
            if comp[s]:
                last_c = s
                if cur is not None:
                    rows.append(cur)
                    cur = None
                continue
            if idle[s]:  # not run (its parent is skipped): no error, the run of reuses goes on
                continue
            e = -pred[s]
            e[s] += 1.0
            cur = sw[s] * e if cur is None else cur + sw[s] * e
            al = schedule.eoc_alpha[u].get(s, 0.0)
            if al:
                j = s - last_c
                if model.eoc_ok and 1 <= j <= model.eoc_lags:
                    diag += model.w[u, s] * (-2 * al * model.lin_judge[u, s, j - 1] + al * al * model.quad_judge[u, s, j - 1])
        if cur is not None:
            rows.append(cur)
        if rows:
            C = np.array(rows) if coherence == "run" else np.sum(rows, axis=0)[None]
            out[u] = float(np.einsum("rs,st,rt->", C, model.G_judge[u], C)) + diag
        else:
            out[u] = diag
    out /= model.norm
    return out if per_unit else float(out.sum())
