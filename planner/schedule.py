"""The planner's in-memory schedule: which (unit, step) pairs are computed, and how skipped ones are predicted.

Every method (cachec and the baselines) produces a :class:`Schedule`; the error model prices it
(:func:`cachec.planner.error_model.schedule_error`) and :mod:`cachec.planner.plan` turns it into a typed
:class:`cachec.runtime.plan.Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HISTORIES = ("computed", "used")


def round_sig(x: float, digits: int = 8) -> float:
    """Round a float to ``digits`` significant digits (plans store such values, for determinism)."""
    x = float(x)
    if x == 0.0 or not np.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


@dataclass
class Schedule:
    """A cache schedule of U units over S steps.

    Attributes:
        compute: (U, S) bool, True where the unit is computed (and stored) at the step.
        coeffs: per unit, ``{step: tuple of floats}`` for every skipped step: the linear predictor's
            coefficients on the history (``history`` says which history), most recent first.
        eoc_alpha: per unit, ``{step: alpha}`` for skipped steps with a non-zero EOC correction.
        eoc_ref: per unit, ``{step: p}``: the EOC tensor of that step is ``D = P_step - P_p``.
        history: ``"computed"`` (predictors combine the last really computed outputs) or ``"used"``
            (the queue of outputs used at each step, GOC/EOC as published).
        options: solver/baseline options to record in the plan's ``budget.options``.
        parents: per unit, the index of the unit it is nested in (an attention-map unit, docs/hgc.md), or
            None; None for all units when omitted. A nested unit does not run at steps its parent skips
            (its *idle* steps): it is not computed there and has no coefficients there.
    """

    compute: np.ndarray
    coeffs: list[dict[int, tuple[float, ...]]]
    eoc_alpha: list[dict[int, float]] = None
    eoc_ref: list[dict[int, int]] = None
    history: str = "computed"
    options: dict = field(default_factory=dict)
    parents: list = None

    def __post_init__(self):
        self.compute = np.asarray(self.compute, dtype=bool)
        U = self.compute.shape[0]
        if self.eoc_alpha is None:
            self.eoc_alpha = [{} for _ in range(U)]
        if self.eoc_ref is None:
            self.eoc_ref = [{} for _ in range(U)]
        if self.history not in HISTORIES:
            raise ValueError(f"history: expected one of {HISTORIES}, got {self.history!r}")
        if self.parents is None:
            self.parents = [None] * U

    def idle(self, u: int) -> np.ndarray:
        """(S,) bool: the steps at which unit ``u`` does not run because its parent skips them."""
        p = self.parents[u]
        return np.zeros(self.compute.shape[1], dtype=bool) if p is None else ~self.compute[p]

    def validate(self) -> None:
        """Check internal consistency.

        Raises:
            ValueError: step 0 not computed, a skipped step without coefficients (or a computed one with
                them), an EOC correction without a reference step or on a non-reuse predictor.
        """
        U, S = self.compute.shape
        if not self.compute[:, 0].all():
            raise ValueError("step 0 must be computed for every unit")
        for u in range(U):
            idle = self.idle(u)
            if (self.compute[u] & idle).any():
                raise ValueError(f"unit {u}: computed at a step its parent unit {self.parents[u]} skips")
            skipped = set(np.flatnonzero(~self.compute[u] & ~idle).tolist())
            if set(self.coeffs[u]) != skipped:
                raise ValueError(f"unit {u}: coefficients must be given exactly for the skipped steps it runs at")
            for s, a in self.eoc_alpha[u].items():
                if s not in skipped or s not in self.eoc_ref[u]:
                    raise ValueError(f"unit {u} step {s}: eoc_alpha on a computed step or without eoc_ref")
                if tuple(self.coeffs[u][s]) != (1.0,):
                    raise ValueError(f"unit {u} step {s}: eoc_alpha is only defined on plain reuse (coeffs [1])")


def follow_parents(schedule: Schedule, parents) -> Schedule:
    """``schedule`` with every nested unit made to run exactly where its parent computes: computed there, no
    coefficients at the parent's skipped steps (how a method that knows nothing of nesting — a peer, FORA —
    treats an attention-map unit: as part of its block). ``parents``: per unit, the parent's index or None."""
    parents = list(parents)
    for u, p in enumerate(parents):
        if p is not None:
            schedule.compute[u] = schedule.compute[p]
            schedule.coeffs[u], schedule.eoc_alpha[u], schedule.eoc_ref[u] = {}, {}, {}
    schedule.parents = parents
    return schedule


def realised_fraction(compute: np.ndarray, unit_flops: np.ndarray, full_step: float, fixed_step: float) -> float:
    """FLOPs of a schedule as a fraction of a full run (docs/plan-format.md).

    ``sum_s (fixed_step + sum_u compute[u,s] * flops_u) / (S * full_step)``.

    Args:
        compute: (U, S) bool.
        unit_flops: (U,) FLOPs per call (one sample, one branch).
        full_step, fixed_step: FLOPs of one forward and its never-cached part.
    Returns:
        A fraction in (0, 1] for consistent inputs.
    """
    compute = np.asarray(compute, dtype=bool)
    S = compute.shape[1]
    spent = S * float(fixed_step) + float(np.dot(compute.sum(axis=1).astype(np.float64), unit_flops))
    return spent / (S * float(full_step))


def minimum_computes(steps: int, max_staleness: int, keep_last: int = 0) -> int:
    """Fewest computed steps of one unit under the solver's constraints.

    Step 0 computed, at most ``max_staleness`` consecutive skipped steps (also at the end), the last
    ``keep_last`` steps computed. Greedy latest-possible placement is optimal.

    Returns:
        The count (int).
    """
    last, count = 0, 1
    for s in range(1, steps):
        if s >= steps - keep_last or s - last > max_staleness:
            last, count = s, count + 1
    return count
