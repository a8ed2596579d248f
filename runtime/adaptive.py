"""SoftCap: an adaptive runtime mode that adds Full steps to a static plan under a soft FLOP ceiling.

The static plan is the *reference*: it supplies every non-Full step's decision (which units compute, which
are predicted, with its compensation coefficients) and so the floor of the compute profile. Per step the
executor may upgrade the plan's step to a **Full step** (every unit computes; all cache histories refresh).
Two modes decide when (formulas, constants and the ceiling guarantee: docs/softcap.md):

- ``"softcap"``: a **Trajectory Drift Observer** reads the input of the first plan unit (for DiT
  ``transformer_blocks.0.attn1``: the adaLN-modulated hidden states, shape (B, N, D)) and measures its relative
  L1 drift since the last refresh step, ``ρ_s = mean_rows ‖z_s − z_r‖₁ / ‖z_r‖₁`` (dimensionless, float32). The
  step is Full when ``ρ_s > τ_s``, where ``log τ_s = log τ_ref,s + u_s`` and ``u_s ≥ 0`` is the output of the
  **Soft-Budget PI Controller** driven by realised minus reference cumulative compute (in Full-step
  equivalents). Under-spending decays ``u`` to 0, i.e. τ relaxes back to its reference and never below it
  (a soft ceiling: the budget raises the threshold, it never forces Full steps).
- ``"speca"`` (baseline, SpeCa-style forecast-then-verify): the step runs the plan's forecast, but one deep
  verify unit is computed and compared with its prediction, ``ε_s = mean_rows ‖F_v − F̂_v‖₁ / ‖F_v‖₁``; when
  ``ε_s > τ_s`` the forecast is rejected and the whole call is recomputed as a Full step (the forecast's FLOPs
  are spent too and counted).

In both modes a **hard guard** keeps the ceiling: a Full step (or a verification) is only taken when the
compute spent so far, plus this step's cost, plus the plan's own cost of every remaining step (the least a
remainder can cost), stays ≤ the ceiling. So the realised fraction never exceeds the ceiling (it starts at the
plan's realised fraction ≤ ceiling and every step keeps that invariant).

Decisions are per step and shared by all rows of a call and all guidance branches: the first call of a step
(split CFG: branch 0) decides, later branch calls of that step reuse the decision. The observer reads the rows
of the first branch only (batched CFG: the first ``batch / branches`` rows; split CFG: the first call), so a
batched and a split run of the same samples decide alike. Everything is deterministic for given inputs (no
random numbers; the statistics are reductions in float32 on the features' device).

Predictors after a Full step: a skipped unit uses the plan's coefficients (and EOC factor) only when its
history holds exactly the steps the plan assumed (the static run's history); otherwise it reuses its most
recent computed output (plain reuse). The plan's coefficients were fitted for the plan's step gaps; applied to
other entries they would extrapolate with wrong gaps, while the freshest computed output is never worse than
the plan's stale one at reuse.

Graphs: the static executor is untouched (no observer, no data-dependent branch). Here the decision point is
the observer call at the first unit (``torch.compiler.disable``-d: one graph break per call) and, in SpeCa mode,
the verification at the verify unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .compensation import combine
from .executor import PlanExecutor, RunReport, _Run
from .plan import Plan
from .units import unwrap

MODES = ("softcap", "speca")
EXTRA_DEPTH = 3  # history entries kept beyond the plan's longest coefficient list
FULL, PLAN, COMPUTED = "F", ".", "C"  # report.decisions: controller's Full step, plan step, plan computes all


class _Rejected(Exception):
    """SpeCa: the verify unit's prediction was rejected; the call is recomputed as a Full step."""


def _eager(fn):
    return torch.compiler.disable(fn, reason="cachec adaptive mode: the Full-step decision reads values")


@dataclass
class AdaptiveProfile:
    """The calibrated threshold profile of one plan, mode and ceiling (:func:`calibrate_profile`).

    Attributes:
        mode: ``"softcap"`` or ``"speca"``.
        ceiling: the FLOP ceiling as a fraction of an uncached run (plan.budget units).
        tau: per plan step, the reference threshold ``τ_ref,s`` (dimensionless, same unit as the risk);
            ``inf`` never Full, ``-1`` always Full; length S.
        reference: per plan step, the reference cumulative compute ``R_s`` through step s (fraction of an
            uncached run); ``R_{S-1}`` is the probe's mean realised fraction. Length S.
        kappa, beta: ``τ_ref,s = κ · m^(1−β) · ρ̄_s^β`` with ``ρ̄_s`` the probe's risk at step s under the static
            plan and ``m`` its mean over candidate steps.
        shape: ``ρ̄_s`` per step (0 where the step is no candidate).
        probe: what the profile was measured on (seeds, conditions, realised fraction).
    """

    mode: str
    ceiling: float
    tau: list[float]
    reference: list[float]
    kappa: float = 1.0
    beta: float = 0.5
    shape: list[float] = field(default_factory=list)
    probe: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """A JSON-ready dict (infinite thresholds as the strings ``"inf"``)."""
        d = dict(self.__dict__)
        d["tau"] = [("inf" if math.isinf(t) else t) for t in self.tau]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptiveProfile":
        d = dict(d)
        d["tau"] = [float(t) for t in d["tau"]]
        return cls(**d)


@dataclass
class AdaptiveOptions:
    """Options of the adaptive mode (``cachec.runtime.apply(pipe, plan, adaptive=AdaptiveOptions(...))``).

    Attributes:
        mode: ``"softcap"`` (drift observer + PI controller) or ``"speca"`` (forecast-then-verify baseline).
        ceiling: FLOP ceiling, fraction of an uncached run in (0, 1], at least the plan's realised fraction
            (adaptive mode only adds compute to the plan). None: ``min(1, 1.5 × plan.budget.realised)``.
        profile: the calibrated :class:`AdaptiveProfile`; None: :func:`cachec.runtime.apply` calibrates one on
            a short probe run (needs a cachec Driver as target).
        kp, ki: PI gains on the overspend in Full-step equivalents (``log τ`` per step of overspend).
        u_max: the largest ``log τ`` offset (τ at most ``e^u_max`` × its reference).
        beta: exponent of the per-step threshold shape (0: one constant τ, 1: τ proportional to the
            probe's typical risk at each step).
        headroom: calibration aims the probe's mean spend at ``ceiling − headroom·(ceiling − plan)``.
        probe_samples, probe_seed: the calibration probe (seeds ``probe_seed + i``; the default lies in the
            validation range, away from calibration and evaluation seeds).
        verify_unit: SpeCa's verified unit (default: the deepest unit the plan ever skips).
        probe_conditions: conditions of the calibration probe (default: the classes, or the model's
            calibration prompt set; a text model without one needs them — ``cachec run/eval --adaptive``
            pass the run's own prompts).
    """

    mode: str = "softcap"
    ceiling: float | None = None
    profile: AdaptiveProfile | None = None
    kp: float = 0.7
    ki: float = 0.2
    u_max: float = 4.0
    beta: float = 0.5
    headroom: float = 0.1
    probe_samples: int = 4
    probe_seed: int = 600_000
    verify_unit: str | None = None
    probe_conditions: tuple | None = None

    def resolved_ceiling(self, plan: Plan) -> float:
        """The ceiling for ``plan`` (the default when None).

        Raises:
            ValueError: a ceiling outside (0, 1] or below the plan's realised fraction.
        """
        c = min(1.0, 1.5 * plan.budget.realised) if self.ceiling is None else float(self.ceiling)
        if not 0.0 < c <= 1.0:
            raise ValueError(f"the adaptive ceiling must lie in (0, 1] (a fraction of an uncached run), got {c}")
        if c < plan.budget.realised - 1e-9:
            raise ValueError(
                f"the adaptive ceiling {c:.4f} is below the plan's realised fraction {plan.budget.realised:.4f}: "
                "adaptive mode only adds Full steps to the plan; use a cheaper plan as the reference")
        return c


@dataclass
class AdaptiveRunReport(RunReport):
    """A :class:`RunReport` with what the adaptive mode did.

    Attributes:
        adaptive: the mode (``"softcap"`` / ``"speca"``).
        ceiling: the FLOP ceiling (fraction of an uncached run); ``flops_fraction`` is the realised one.
        decisions: per plan step ``F`` (Full step added by the controller), ``C`` (the plan computes every unit
            there) or ``.`` (the plan's step).
        full_steps: the steps marked ``F``.
        risk: per step the observer's risk (softcap: drift ρ_s; speca: verify error ε_s), None where not
            measured.
        tau: per step the threshold τ_s compared with it (None where the step was no candidate).
        fallbacks: predictions that used plain reuse because the history was not the plan's assumption.
        rejected_verifications: SpeCa forecasts rejected (each recomputed as a Full step).
    """

    adaptive: str = ""
    ceiling: float = 1.0
    decisions: str = ""
    full_steps: list[int] = field(default_factory=list)
    risk: list = field(default_factory=list)
    tau: list = field(default_factory=list)
    fallbacks: int = 0
    rejected_verifications: int = 0


class SoftBudgetController:
    """Soft-Budget PI controller on ``log τ`` with a hard ceiling guard.

    State after step k: spent ``Q_k`` (fraction of an uncached run). Error ``e_k = S·(Q_k − R_k)`` (Full-step
    equivalents over the reference), integral ``I_k = clip(I_{k−1} + e_k, 0, u_max/ki)``, offset
    ``u_k = clip(kp·e_k + ki·I_k, 0, u_max)``; the threshold of step k+1 is ``τ_ref,k+1 · exp(u_k)``.

    Args:
        tau_ref, reference: per step, as :class:`AdaptiveProfile`.
        floor: per step the plan's own cost of the step (fraction of one uncached step).
        ceiling: fraction of an uncached run.
    """

    def __init__(self, tau_ref, reference, floor, ceiling: float, kp: float, ki: float, u_max: float):
        self.tau_ref, self.reference, self.floor = list(tau_ref), list(reference), list(floor)
        self.ceiling, self.kp, self.ki, self.u_max = ceiling, kp, ki, u_max
        self.S = len(self.floor)
        self.rest = [sum(self.floor[s:]) / self.S for s in range(self.S + 1)]  # least cost of steps s..S-1
        self.reset()

    def reset(self) -> None:
        self.spent, self.integral, self.u = 0.0, 0.0, 0.0

    def threshold(self, step: int) -> float:
        t = self.tau_ref[step]
        return t if t <= 0 or math.isinf(t) else t * math.exp(self.u)

    def allows(self, step: int, cost: float) -> bool:
        """Whether spending ``cost`` (fraction of one uncached step) at ``step`` keeps the ceiling even if
        every later step costs only the plan's."""
        return self.spent + cost / self.S + self.rest[step + 1] <= self.ceiling + 1e-12

    def spend(self, step: int, cost: float) -> None:
        """Book step ``step``'s cost (fraction of one uncached step) and update the PI state."""
        self.spent += cost / self.S
        e = self.S * (self.spent - self.reference[step])
        if self.ki > 0:
            self.integral = min(max(self.integral + e, 0.0), self.u_max / self.ki)
        self.u = min(max(self.kp * e + self.ki * self.integral, 0.0), self.u_max)


def relative_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``mean_rows ‖x − ref‖₁ / ‖ref‖₁`` over the leading (batch) dim, in float32 (a Python float: a graph
    break under torch.compile). Shapes: x and ref (B, ...) alike."""
    x, ref = x.float().flatten(1), ref.float().flatten(1)
    num = (x - ref).abs().sum(1)
    den = ref.abs().sum(1).clamp_min(torch.finfo(torch.float32).tiny)
    return float((num / den).mean())


class _State:
    """Per-run adaptive state."""

    def __init__(self, controller: SoftBudgetController):
        controller.reset()
        self.controller = controller
        self.hsteps: dict[int, list[list[int]]] = {}  # branch -> unit -> steps of its history entries
        self.choice: dict[int, tuple[bool, bool]] = {}  # step -> (full, verify)
        self.anchor: torch.Tensor | None = None  # observer rows at the last refresh
        self.cost = 0.0  # the current step's cost (branch 0), fraction of one uncached step
        self.rec = None  # branch 0's plan record of the current call


class AdaptiveExecutor(PlanExecutor):
    """A :class:`PlanExecutor` that upgrades plan steps to Full steps (module docstring).

    Args:
        plan, units, transformer: as :class:`PlanExecutor`.
        options: :class:`AdaptiveOptions` (its ``profile`` must be set).
        **kwargs: the remaining :class:`PlanExecutor` arguments (``remap`` must be ``"error"``).

    Raises:
        ValueError: no profile, a profile for another step count/mode, an unknown mode, ``remap`` other than
            ``"error"``, a ceiling below the plan's realised fraction, or (speca) a plan that never skips.
    """

    report_class = AdaptiveRunReport

    def __init__(self, plan: Plan, units, transformer, options: AdaptiveOptions, **kwargs):
        if kwargs.get("remap", "error") != "error":
            raise ValueError("adaptive mode follows the plan's schedule from step 0: use remap='error'")
        if options.mode not in MODES:
            raise ValueError(f"adaptive mode must be one of {', '.join(MODES)}, got {options.mode!r}")
        super().__init__(plan, units, transformer, **kwargs)
        profile = options.profile
        if profile is None:
            raise ValueError("AdaptiveExecutor needs a calibrated profile (cachec.runtime.adaptive_calibrate)")
        if len(profile.tau) != plan.steps or len(profile.reference) != plan.steps or profile.mode != options.mode:
            raise ValueError(f"the adaptive profile is for {len(profile.tau)} steps in mode {profile.mode!r}, the "
                             f"plan has {plan.steps} steps and the mode is {options.mode!r}")
        self.options, self.profile = options, profile
        self.ceiling = options.resolved_ceiling(plan)
        S, U = plan.steps, len(plan.units)
        self._steps = None  # records are built per call from the real history (every push kept)
        self.floor = [(self.fixed + sum(f for f, c in zip(self.unit_flops, self.patterns[s]) if c)) / self.full
                      for s in range(S)]
        self.all_computed = [all(p) for p in self.patterns]
        self.expected = self._expected_history()
        # deeper histories than the plan's, so the plan's entries survive Full steps in between
        self.keep = tuple(k + EXTRA_DEPTH if k else 0 for k in self.keep)
        self._full_pushes = tuple((u, True) for u in range(U) if self.keep[u])
        self.verify = self._verify_unit() if options.mode == "speca" else None
        self.controller = SoftBudgetController(profile.tau, profile.reference, self.floor, self.ceiling,
                                               options.kp, options.ki, options.u_max)
        self._state: _State | None = None
        self._verify_now = False
        self._verify_inputs = None
        self._skips_now = (0, 0, 0, 0)  # (skipped, compensated, fallbacks, computed) of the current call's plan record
        self._observe = _eager(self._observe_call)
        self._check = _eager(self._verify_call)
        self.record_only = False  # calibration: measure the risk, never take a Full step

    # ------------------------------------------------------------------ static facts

    def _expected_history(self) -> list[dict[int, tuple[int, ...]]]:
        """Per step, per skipped unit: the steps of the history entries the plan's coefficients combine."""
        hist: list[list[int]] = [[] for _ in self.plan.units]
        out = []
        for s in range(self.plan.steps):
            out.append({u: tuple(hist[u][:k]) for u, k, _ in self._skipped[s]})
            for u in range(len(self.plan.units)):
                if self.keep[u] and (self.patterns[s][u] or self.push_predictions):
                    hist[u].insert(0, s)
                    del hist[u][self.keep[u]:]
        return out

    def _verify_unit(self) -> int:
        names = [u.name for u in self.plan.units]
        if self.options.verify_unit is not None:
            if self.options.verify_unit not in names:
                raise ValueError(f"verify unit {self.options.verify_unit!r} is not a plan unit")
            return names.index(self.options.verify_unit)
        # an attention-map unit runs only inside its parent: not a verify point
        skipped = [u for u in range(len(names)) if self.parents[u] is None and any(not p[u] for p in self.patterns)]
        if not skipped:
            raise ValueError("the plan never skips a unit: SpeCa has nothing to verify")
        return skipped[-1]

    def verify_cost(self, step: int) -> float:
        """Extra cost (fraction of one uncached step) of verifying at ``step`` (0 where the plan computes it)."""
        v = self.verify
        if v is None or self.patterns[step][v]:
            return 0.0
        return (self.unit_flops[v] + sum(self.unit_flops[n] for n in self._idle[step] if self.parents[n] == v)) / self.full

    # ------------------------------------------------------------------ hooks

    def observer(self, index: int) -> Callable | None:
        """The decision point (softcap: the first plan unit's input), see :mod:`cachec.runtime.hooks`."""
        return self._observe if index == 0 and self.options.mode == "softcap" else None

    def _start_run(self) -> _Run:
        run = super()._start_run()
        self._state = _State(self.controller)
        rep = run.report
        rep.adaptive, rep.ceiling = self.options.mode, self.ceiling
        return run

    def _prepare(self, run: _Run, step: int | None, branch: int, batch: int) -> None:
        U = len(self.plan.units)
        st, report = self._state, run.report
        report.calls += 1
        history = run.history.get(branch) or run.history.setdefault(branch, [[] for _ in range(U)])
        hsteps = st.hsteps.get(branch) or st.hsteps.setdefault(branch, [[] for _ in range(U)])
        if branch == 0:
            verify = (self.verify is not None and step > 0 and not self.patterns[step][self.verify]
                      and self._can_verify(step))
            st.choice[step] = (False, verify)
            st.cost = 0.0
            report.decisions += COMPUTED if self.all_computed[step] else PLAN
            report.risk.append(None)
            report.tau.append(None)
        full, verify = st.choice.get(step, (False, False))
        if full:
            self._set_full(run, batch, None)
            return
        decision = list(self.patterns[step])
        if verify:
            decision[self.verify] = True
        skips, inputs, fallbacks, compensated = [], [None] * U, 0, 0
        for u, k, plain in self._skipped[step]:
            if decision[u]:
                continue
            entries = self._plan_entries(history[u], hsteps[u], self.expected[step][u])
            if not history[u]:
                decision[u] = True
                report.forced += 1
                continue
            if plain or entries is None:  # plain reuse of the freshest computed output
                inputs[u] = (None, None, (history[u][0],))
                fallbacks += entries is None
            else:
                inputs[u] = (*self._coefficients(u, step, entries[0]), entries)
                compensated += 1
            skips.append(u)
        for u in self._idle[step]:  # a nested unit runs (computed) exactly when its parent does
            decision[u] = decision[self.parents[u]]
        if verify:
            v = self.verify
            h, comp = history[v], self.plan.units[v].compensation[step]
            entries = self._plan_entries(h, hsteps[v], self.expected[step][v])
            if not h:
                self._verify_inputs = None
            elif entries is None or (comp.eoc_alpha == 0.0 and list(comp.coeffs) == [1.0]):
                self._verify_inputs = (None, None, (h[0],))
            else:
                self._verify_inputs = (*self._coefficients(v, step, entries[0]), entries)
        self._verify_now = verify and branch == 0 and self._verify_inputs is not None
        report.skipped += len(skips)
        report.compensated += compensated
        report.fallbacks += fallbacks
        report.computed += sum(decision)
        self._decision = tuple(decision)
        self._idle_now = self._idle[step]
        self._inputs = inputs
        self._pushes = tuple((u, True) for u in range(U) if self.keep[u] and (decision[u] or self.push_predictions))
        fraction = (self.fixed + sum(f for f, c in zip(self.unit_flops, decision) if c)) / self.full
        self._skips_now = (len(skips), compensated, fallbacks, sum(decision))
        if branch == 0:
            st.cost = fraction
        self._account(run, batch, fraction)

    @staticmethod
    def _plan_entries(h: list, hs: list[int], expected: tuple[int, ...]) -> tuple | None:
        """The history entries the plan's coefficients combine, when the plan's most recent entry is still the
        freshest and every entry it assumed is still held (a Full step in between only adds entries deeper
        down); None otherwise (a fresher entry exists: plain reuse of it)."""
        if not expected or not hs or hs[0] != expected[0] or any(x not in hs for x in expected):
            return None
        return tuple(h[hs.index(x)] for x in expected)

    def _can_verify(self, step: int) -> bool:
        """SpeCa: whether the verification itself keeps the ceiling (else the step is not verified)."""
        return self.controller.allows(step, self.floor[step] + self.verify_cost(step))

    def _set_full(self, run: _Run, batch: int, old_fraction: float | None) -> None:
        """Make the current call a Full step (``old_fraction``: the call was already accounted at it)."""
        U, rep = len(self.plan.units), run.report
        if old_fraction is not None:
            n, comp, fb, n_computed = self._skips_now
            rep.skipped -= n
            rep.compensated -= comp
            rep.fallbacks -= fb
            rep.computed -= n_computed
        rep.computed += U
        self._decision = (True,) * U
        self._idle_now = frozenset()
        self._inputs = [None] * U
        self._pushes = self._full_pushes
        self._pending = []
        self._verify_now = False
        self._skips_now = (0, 0, 0, 0)
        if old_fraction is None:
            self._account(run, batch, 1.0)
        else:
            self._reaccount(run, batch, old_fraction, 1.0)

    def _reaccount(self, run: _Run, batch: int, old: float, new: float) -> None:
        r = run.report
        for acc in (r._acc, r._step_acc):
            acc[0] += batch * (new - old)
        r.flops_fraction, r.step_fractions[-1] = r._acc[0] / r._acc[1], r._step_acc[0] / r._step_acc[1]

    def _rows(self, z: torch.Tensor, run: _Run) -> torch.Tensor:
        """The observer's rows: the first branch's (batched CFG: the first batch/branches rows)."""
        batched = self.max_calls > 1 and run.calls_per_step <= 1
        return z[: z.shape[0] // self.max_calls] if batched else z

    def _upgrade(self, run: _Run, step: int, risk: float | None) -> bool:
        """The decision at a candidate step: Full when ``risk > τ`` and the guard allows."""
        st, rep = self._state, run.report
        rep.risk[-1] = risk
        if step == 0 or self.all_computed[step] or risk is None:
            return False
        tau = self.controller.threshold(step)
        rep.tau[-1] = tau
        extra = self._state.cost if self.options.mode == "speca" else 0.0  # a rejected forecast's cost (bound)
        if self.record_only or not risk > tau or not self.controller.allows(step, 1.0 + extra):
            return False
        st.choice[step] = (True, False)
        rep.full_steps.append(step)
        rep.decisions = rep.decisions[:-1] + FULL
        return True

    def _observe_call(self, args: tuple, kwargs: dict) -> None:
        """Softcap decision point, at the first plan unit of every call."""
        run, st = self._run, self._state
        if run is None or not self._in_call or self._branch != 0 or run.step < 0:
            return
        z = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(z, (tuple, list)):
            z = z[0]
        if run.k == 0:  # the layout (batched or split) is only known from step 1: keep every row
            st.anchor = z.detach().clone()
            return
        rows = self._rows(z, run)
        anchor = st.anchor[: rows.shape[0]] if st.anchor.shape[0] != rows.shape[0] else st.anchor
        risk = relative_l1(rows, anchor)
        step = run.step
        if self._upgrade(run, step, risk):
            self._set_full(run, run.layout[0][0], st.cost)
            st.cost = 1.0
        if st.choice[step][0] or self.all_computed[step]:
            st.anchor = rows.detach().clone()

    def stores(self, index: int) -> bool:
        return self.keep[index] > 0 or index == self.verify

    def store(self, index: int, feature) -> None:
        if index == self.verify and self._verify_now:
            self._check(feature)
        if self.keep[index]:
            self._pending.append((index, feature))

    def _verify_call(self, feature) -> None:
        """SpeCa: compare the verify unit's computed output with its prediction; reject → Full step."""
        run = self._run
        self._verify_now = False
        coeffs, eoc, hist = self._verify_inputs
        pred = hist[0] if coeffs is None else combine(hist, coeffs, eoc)
        risk = relative_l1(self._rows(pred[0], run), self._rows(feature[0], run))  # ‖F̂ − F‖₁ / ‖F‖₁, part 0
        if self._upgrade(run, run.step, risk):
            raise _Rejected()

    def retry_full(self) -> None:
        """SpeCa: the forecast was rejected; book the partial forecast and make the call a Full step."""
        run, st = self._run, self._state
        v = self.verify
        partial = (self.fixed + sum(f for u, (f, c) in enumerate(zip(self.unit_flops, self._decision))
                                    if c and u <= v)) / self.full
        batch = run.layout[0][0]
        run.report.rejected_verifications += 1
        self._set_full(run, batch, st.cost)
        self._reaccount(run, batch, 1.0, 1.0 + partial)
        st.cost = 1.0 + partial

    def install(self, transformer) -> Callable[[], None]:
        """SpeCa: wrap the transformer's forward so a rejected forecast reruns the call in full; returns the
        undo (the static and softcap modes need nothing: a no-op)."""
        if self.options.mode != "speca":
            return lambda: None
        model = unwrap(transformer)
        original = model.forward
        own = model.__dict__.get("forward")

        def forward(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except _Rejected:
                self.retry_full()
                return original(*args, **kwargs)

        model.forward = forward

        def undo() -> None:
            if own is None:
                model.__dict__.pop("forward", None)
            else:
                model.forward = own
        return undo

    def end_call(self) -> None:
        if not self._in_call:
            return
        run, branch, st = self._run, self._branch, self._state
        pending = {u for u, _ in self._pending}
        pushed = [u for u, _ in self._pushes if u in pending]
        step = None if run is None else run.step
        super().end_call()
        if run is None or st is None:
            return
        hs = st.hsteps.setdefault(branch, [[] for _ in self.plan.units])
        for u in pushed:
            hs[u].insert(0, step)
            del hs[u][self.keep[u]:]
        if branch == 0:
            st.controller.spend(step, st.cost)

    def abort_call(self) -> None:
        super().abort_call()
        self._state = None


__all__ = ["AdaptiveExecutor", "AdaptiveOptions", "AdaptiveProfile", "AdaptiveRunReport", "MODES",
           "SoftBudgetController", "relative_l1"]
