"""Plan execution: the :class:`~cachec.runtime.hooks.UnitHandler` that follows a plan call by call.

How a transformer call is placed in the plan (all of it happens in the transformer's forward pre-hook, in
eager Python, even when the transformer is ``torch.compile``-d):

- **step**: a run must present the plan's whole timestep sequence, in order: the k-th distinct timestep a
  run passes to the transformer must be ``plan.sampler.timesteps[k]`` (equal up to 4 units in the last place
  of the timestep's dtype: bit-equal float32 schedules match, FluxPipeline's bfloat16 timesteps match the
  plan's float32 values rounded to bfloat16, within one unit in its last place; integer timesteps must be
  equal). Matching each value on its own is not enough: another step count of the same scheduler shares
  timesteps with the plan (DDIM 25 of a 50-step plan's values) and must not silently follow it. A run that
  leaves the sequence follows ``remap``:

  - ``"error"`` (default): :class:`PlanScheduleError` naming the run's step, the timestep received, the one
    the plan expects there and, when the value is another plan step's, that the run follows another
    schedule;
  - ``"nearest"``: every call follows the plan step with the nearest timestep, in any order (use it to run a
    plan with another step count or a slightly different schedule; a skip that has no history yet — e.g. the
    run starts at a later plan step — is computed instead);
  - ``"off"``: a run is computed in full from the first call that leaves the sequence (one warning).

- **guidance branch**: the call order within a step (split CFG: the second call of a step is branch 1 with
  its own history). Batched CFG is one call whose batch holds all branches. A plan calibrated with B
  branches runs with 1 call per step (batched CFG, or no guidance when B = 1) or B calls (split CFG; the two
  compute the same thing), fixed by the run's first step: more than B calls at one timestep, or a step with
  another number of calls than the first, is a :class:`PlanScheduleError` in every ``remap`` mode. When the
  caller supplies the run's guidance scale (``guidance_scale=``; :func:`cachec.runtime.apply` reads it from
  the pipeline call), a scale that switches CFG on or off against the plan's branches is an error, and
  another scale with the same branches warns once per scale (the compensation was fitted at the plan's
  scale). Where the scale is not a CFG scale (FLUX's embedded guidance) it is only compared.
- **run**: a new run starts when the pipeline calls ``scheduler.set_timesteps`` (when :func:`apply` got a
  pipeline), or when the plan's first timestep comes back (after all its branch calls). All cached state of
  the previous (possibly aborted) run is dropped then, and the caller's ``on_run_start`` check (weights
  unchanged since :func:`~cachec.runtime.apply`) runs before the run's first call.

Per call the executor resolves a *decision* — a tuple of booleans, one per plan unit — and, for skipped
units, the history tensors and coefficient tensors of the prediction. The unit wrappers (possibly traced by
``torch.compile``) only read those; so a compiled transformer recompiles once per distinct step pattern,
not per step (coefficients are 0-dim tensors, never Python floats).

Prediction of a skipped unit: plain reuse (coefficients ``[1.0]``, no EOC) returns the cached tensor ``H_1``
itself; otherwise ``F̂ = Σ_j coeffs[j]·H_{j+1}`` left to right from the most recent entry ``H_1``, times
``(1 + eoc_alpha·D)`` with an EOC prior D (per-sample shape, or broadcastable to it: as many dims, each 1 or
equal), in the feature's dtype on its device (coefficients and ``1 + eoc_alpha·D`` rounded once to it).
``history: computed`` keeps the last ``m`` computed outputs (``m`` = the unit's longest coefficient list);
``history: used`` pushes predictions too. With ``remap`` "error" or "off" a run follows the plan from step 0
in order, so each step's decision, FLOPs and which features a later step reads are fixed at construction;
a feature no later step reads holds its history slot as ``None`` (its memory is freed at once).
``remap="nearest"`` keeps every feature and resolves each call from the history it has.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import torch

from .compensation import combine
from .hooks import Feature, batch_size_of, same_timestep, timestep_and_dtype
from .plan import COMPUTE, Plan
from .run_report import RunReport
from .units import UnitSpec, parent_units, unwrap

REMAP_MODES = ("error", "nearest", "off")
__all__ = ["PlanExecutor", "PlanScheduleError", "REMAP_MODES", "RunReport"]


class PlanScheduleError(RuntimeError):
    """A transformer call does not fit the plan (timestep sequence, guidance branches or batch layout)."""


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))


def _outside_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside cachec's runtime and torch (the user's call
    of the pipeline or transformer), counted from the caller of the function that calls this one."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class _Step(NamedTuple):
    """A call at one plan step: per unit True = computed (forced ones included); (unit, number of
    coefficients, plain reuse) per prediction; skipped units computed for lack of history; (unit, kept) per
    feature entering the history (kept False: no later step reads it); FLOPs relative to the call uncached;
    predictions that are not plain reuse."""

    decision: tuple[bool, ...]
    skips: tuple[tuple[int, int, bool], ...]
    forced: tuple[int, ...]
    pushes: tuple[tuple[int, bool], ...]
    fraction: float
    compensated: int


class _Run:
    """Mutable state of one sampling run."""

    def __init__(self, index: int, plan_steps: int, report_class: type = RunReport):
        self.report = report_class(run=index, plan_steps=plan_steps)
        self.step = -1  # current plan step (-1: none yet / off-plan)
        self.k = -1  # current runtime step (index of the distinct timesteps received)
        self.t = None  # raw timestep of the current runtime step
        self.received: list[float] = []  # the distinct timesteps received, in order
        self.calls_in_step = 0
        self.calls_per_step = 0  # fixed by the run's first step: 1 (batched / no guidance) or the branches (split)
        self.off_plan = False
        self.layout: dict[int, tuple] = {}  # branch -> (batch, shape, dtype, device)
        self.history: dict[int, list[list[Feature | None]]] = {}  # branch -> unit -> [H_1, H_2, ...]


class PlanExecutor:
    """Follows a :class:`~cachec.runtime.plan.Plan` inside the hooked transformer.

    Args:
        plan: the validated plan.
        units: the :class:`UnitSpec` of each plan unit, in ``plan.units`` order (hook index = plan index).
        transformer: the transformer (possibly compiled) whose forward signature gives ``timestep``.
        remap: ``"error"``, ``"nearest"`` or ``"off"`` (see the module docstring).
        eoc_tensors: ``{"eoc/{unit}/{step}[/{part}]": numpy array}`` from the plan's sidecar.
        run_signal: True when the caller reports run starts with :meth:`new_run` (a patched
            ``scheduler.set_timesteps``); without it an extra call at step 0 beyond the plan's calls per step
            also starts a new run.
        guidance_scale: ``() -> float | None``, the guidance scale of the run that is starting (None: unknown);
            called once per run, before its first call.
        on_run_start: ``() -> None``, called before each run's first call; it raises to refuse the run (the
            weight check of :func:`cachec.runtime.apply`).
        scale_is_cfg: whether the guidance scale switches CFG branches (``> 1``: 2 branches); False for FLUX
            (:attr:`~cachec.runtime.registry.ModelSpec.guidance_scale_is_cfg`): the scale is only compared.

    Raises:
        ValueError: unknown ``remap``; a plan schedule with timesteps too close to tell apart.
    """

    report_class: type = RunReport  # the adaptive executor reports more (cachec.runtime.adaptive)

    def __init__(self, plan: Plan, units: list[UnitSpec], transformer, remap: str = "error",
                 eoc_tensors: dict[str, Any] | None = None, run_signal: bool = False,
                 guidance_scale: Callable[[], float | None] | None = None,
                 on_run_start: Callable[[], None] | None = None, scale_is_cfg: bool = True):
        if remap not in REMAP_MODES:
            raise ValueError(f"remap must be one of {', '.join(REMAP_MODES)}, got {remap!r}")
        self.plan, self.units, self.remap, self.run_signal = plan, units, remap, run_signal
        self.guidance_scale, self.on_run_start, self.scale_is_cfg = guidance_scale, on_run_start, scale_is_cfg
        self._signature = inspect.signature(unwrap(transformer).forward)
        self.timesteps = [float(t) for t in plan.sampler.timesteps]
        self._check_distinct()
        # calls per step: 1 (batched CFG or no guidance) or, with guidance branches, one per branch (split)
        self.max_calls = plan.sampler.guidance.branches
        S, U = plan.steps, len(plan.units)
        self.patterns = [tuple(u.actions[s] == COMPUTE for u in plan.units) for s in range(S)]
        self.keep = tuple(max((len(c.coeffs) for c in u.compensation.values()), default=0) for u in plan.units)
        self.push_predictions = plan.history == "used"
        self.full = plan.budget.full_step_flops
        self.fixed = plan.budget.fixed_step_flops
        self.unit_flops = [u.flops for u in plan.units]
        self._eoc_np = dict(eoc_tensors or {})
        self._coeff_cache: dict[tuple, tuple] = {}  # (unit, step, device, dtypes, shapes) -> (coeffs, eoc)
        # per step: (unit, number of coefficients, plain reuse) of each skipped unit
        self._skipped = [tuple((u, len(c.coeffs), c.eoc_alpha == 0.0 and [float(x) for x in c.coeffs] == [1.0])
                               for u, c in enumerate(un.compensation.get(s) for un in plan.units) if c is not None)
                         for s in range(S)]
        # nested units (attention maps, docs/plan-format.md "Nested units"): per step the ones idle under a skipped
        # parent; they take their parent's decision (computed when a forced, verified or shadow parent runs)
        self.parents = parent_units([u.name for u in plan.units])
        self._idle = [frozenset(u for u, un in enumerate(plan.units) if un.idle(s)) for s in range(S)]
        self._idle_now: frozenset = frozenset()
        self._steps = None if remap == "nearest" else self._static_steps()
        # per-call state read by the unit wrappers (possibly inside a compiled graph)
        self._decision: tuple[bool, ...] = (True,) * U
        self._inputs: list[Any] = [None] * U
        self._pushes: tuple[tuple[int, bool], ...] = ()
        self._pending: list[tuple[int, Feature]] = []
        self._in_call = False
        self._branch = 0
        self._fresh = True
        self._run: _Run | None = None
        self._runs = 0
        self.reports: list[RunReport] = []
        self._warned: set[str] = set()

    def step_signatures(self) -> list[tuple]:
        """Per plan step, what a compiled transformer specialises on: per unit ``None`` (computed) or
        ``(number of coefficients, has EOC, plain reuse)``. ``torch.compile`` compiles one graph per distinct
        value (per input shape); coefficient values are tensors and never cause a recompile."""
        out = []
        for s in range(self.plan.steps):
            sig: list = [None] * len(self.plan.units)
            for u, k, plain in self._skipped[s]:
                sig[u] = (k, self.plan.units[u].compensation[s].eoc_alpha != 0.0, plain)
            out.append(tuple(sig))
        return out

    def _step_record(self, s: int, lengths: list[int]) -> _Step:
        """A call at plan step ``s`` when unit u has ``lengths[u]`` history entries (every push kept)."""
        decision = list(self.patterns[s])
        forced = tuple(u for u, k, _ in self._skipped[s] if lengths[u] < k)
        skips = tuple(x for x in self._skipped[s] if lengths[x[0]] >= x[1])
        for u in forced:
            decision[u] = True
        for u in self._idle[s]:  # a nested unit runs (computed) exactly when its parent does
            decision[u] = decision[self.parents[u]]
        pushes = tuple((u, True) for u, m in enumerate(self.keep) if m and (decision[u] or self.push_predictions))
        spent = self.fixed + sum(f for f, c in zip(self.unit_flops, decision) if c)
        return _Step(tuple(decision), skips, forced, pushes, spent / self.full, sum(not x[2] for x in skips))

    def _static_steps(self) -> list[_Step]:
        """Each plan step's :class:`_Step` in a run that follows the plan from step 0 (the same in every
        branch), ``kept`` False for each pushed feature no later step reads."""
        hist: list[list[int]] = [[] for _ in self.plan.units]  # per unit: the steps of its history entries
        records, read = [], set()
        for s in range(self.plan.steps):
            rec = self._step_record(s, [len(h) for h in hist])
            for u, k, _ in rec.skips:
                read.update((u, x) for x in hist[u][:k])
            for u, _ in rec.pushes:
                hist[u].insert(0, s)
                del hist[u][self.keep[u]:]
            records.append(rec)
        return [r._replace(pushes=tuple((u, (u, s) in read) for u, _ in r.pushes)) for s, r in enumerate(records)]

    # ------------------------------------------------------------------ schedule matching

    def _check_distinct(self) -> None:
        ts = self.timesteps
        for i in range(len(ts)):
            for j in range(i + 1, len(ts)):
                if same_timestep(ts[i], ts[j], torch.float32):
                    raise ValueError(
                        f"the plan's timesteps {i} and {j} are equal ({ts[i]!r}); cachec identifies the step by "
                        "the timestep, so schedules with repeated timesteps (Heun, DPM2) are not supported")

    def _nearest(self, t: float) -> int:
        return min(range(len(self.timesteps)), key=lambda s: abs(self.timesteps[s] - t))

    def _which(self, t: float, dtype) -> int | None:
        """The plan step whose timestep ``t`` is (within the dtype's tolerance), else None."""
        s = self._nearest(t)
        return s if same_timestep(self.timesteps[s], t, dtype) else None

    def _schedule_error(self, run: _Run, k: int, t: float, dtype) -> PlanScheduleError:
        ts = self.timesteps
        shown = ", ".join(f"{x:g}" for x in (ts if len(ts) <= 12 else ts[:6] + ts[-6:]))
        schedule = f"{len(ts)} steps of {self.plan.sampler.scheduler}: {shown}{' …' if len(ts) > 12 else ''}"
        other = self._which(t, dtype)
        seen = ", ".join(f"{x:g}" for x in (run.received[-6:] if run is not None and k > 0 else []))
        if k >= len(ts):
            what = f"the run's step {k} received timestep {t:g}, but the plan has only {len(ts)} steps"
        elif other is None:
            what = (f"the transformer received timestep {t:g} at the run's step {k}; it is not in the plan's schedule "
                    f"(the plan's step {k} has {ts[k]:g})")
        else:
            what = (f"the run's step {k} received timestep {t:g}, which is the plan's step {other}, not its step {k} "
                    f"({ts[k]:g}): the run follows another schedule or step count")
        return PlanScheduleError(
            f"{what}{f' (the run so far: {seen})' if seen else ''}; the plan's schedule is {schedule}. "
            f"Run the pipeline with num_inference_steps={len(ts)} and the plan's scheduler, make a plan for "
            "this schedule, or apply the plan with remap='nearest' (follow the nearest plan step) or "
            "remap='off' (compute such runs in full)")

    def _branch_error(self, t: float, calls: int, run: _Run) -> PlanScheduleError:
        g = self.plan.sampler.guidance
        if calls > self.max_calls:
            what = (f"the plan was calibrated with {g.branches} guidance branch(es) (mode {g.mode!r}), so a step "
                    f"has at most {self.max_calls} call(s)")
        else:
            what = f"the run's first step made {run.calls_per_step}; a run keeps one guidance layout"
        return PlanScheduleError(
            f"the run made {calls} transformer call(s) at timestep {t:g}, but {what}. Cached features of one branch "
            "cannot stand in for another: run with the plan's guidance layout or make a plan for this one")

    # ------------------------------------------------------------------ run bookkeeping

    def new_run(self) -> None:
        """Mark that the next transformer call starts a new sampling run."""
        self._fresh = True

    def _start_run(self) -> _Run:
        if self.on_run_start is not None:
            self._run = None
            self.on_run_start()  # may raise (weights changed): no run state is created then
        scale = self.guidance_scale() if self.guidance_scale is not None else None
        if scale is not None:
            self._check_guidance(scale)
        self._run = _Run(self._runs, self.plan.steps, self.report_class)
        self._run.report.guidance_scale = scale
        self._runs += 1
        self.reports.append(self._run.report)
        self._fresh = False
        return self._run

    def _check_guidance(self, scale: float) -> None:
        """Compare the run's guidance scale with the plan's (module docstring, *guidance branch*).

        Raises:
            PlanScheduleError: the scale switches CFG on or off against a batched or unguided plan.
        """
        g = self.plan.sampler.guidance
        if self.scale_is_cfg:  # the pipelines' own rule: CFG runs when guidance_scale > 1
            run_branches = 2 if scale > 1.0 else 1
            if run_branches != g.branches:
                raise PlanScheduleError(
                    f"this run uses guidance scale {scale:g} ({'CFG, 2 branches' if run_branches == 2 else 'no CFG, 1 branch'}), "
                    f"but the plan was calibrated at guidance scale {g.scale:g} with {g.branches} branch(es): the batch "
                    "holds other branches than the plan's cached features; run at the plan's guidance or make a plan for it")
        if abs(scale - g.scale) > 1e-6 * max(1.0, abs(g.scale)):
            self._warn_once(
                f"scale:{scale!r}",
                f"this run uses guidance scale {scale:g} but the plan was calibrated at {g.scale:g}: its schedule and "
                "compensation were fitted for that scale (quality may drop); make a plan at this scale for full quality")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=_outside_stacklevel())

    # ------------------------------------------------------------------ UnitHandler protocol

    def begin_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Place the call in the plan and prepare the decision and prediction inputs.

        Raises:
            PlanScheduleError: the run left the plan's timestep sequence (``remap="error"``), made another
                number of guidance calls per step than the plan, uses a guidance scale that changes the number
                of branches, or changed the batch layout of a guidance branch in the middle of a run.
            PlanMismatchError: (from ``on_run_start``) the weights changed since the plan was applied.
            ValueError: the call has no ``timestep``.
        """
        self._in_call = False
        t, t_dtype = timestep_and_dtype(args, kwargs, self._signature)
        hs = kwargs.get("hidden_states", args[0] if args else None)
        batch = batch_size_of(args, kwargs)
        layout = (batch, tuple(hs.shape), hs.dtype, hs.device)

        run, step = self._place(t, t_dtype)
        branch = run.calls_in_step
        if branch in run.layout and run.layout[branch] != layout:
            old = run.layout[branch]
            # the run's cached features no longer fit: drop the run so the next step 0 starts clean
            self._run = None
            raise PlanScheduleError(
                f"the transformer call at timestep {t:g} (guidance branch {branch}) has batch {layout[0]}, "
                f"shape {list(layout[1])}, {layout[2]} on {layout[3]}, but earlier calls of this run had batch "
                f"{old[0]}, shape {list(old[1])}, {old[2]} on {old[3]}; cached features cannot be reused across "
                "batch sizes, resolutions, dtypes or devices. Start a new run (from step 0) for the new layout")
        run.layout[branch] = layout
        self._branch = branch
        self._prepare(run, step, branch, batch)
        self._pending = []
        self._in_call = True

    def _place(self, t: float, dtype) -> tuple[_Run, int | None]:
        """The run and plan step of a call with timestep ``t`` (None: computed in full, ``remap="off"``);
        starts a new run or a new runtime step as needed."""
        run = self._run
        fresh = run is None or self._fresh
        if not fresh and t == run.t:  # another call of the current runtime step
            limit = self.max_calls if run.k == 0 else run.calls_per_step
            if run.calls_in_step < limit:
                return run, (None if run.off_plan else run.step)
            if not (run.k == 0 and not self.run_signal):
                self._run = None
                raise self._branch_error(t, run.calls_in_step + 1, run)
            fresh = True  # the plan's step 0 again after all its branch calls: a new run
        if not fresh:
            k = run.k + 1
            if self.remap == "nearest":
                fresh = run.step >= 0 and self._nearest(t) < run.step  # the schedule went back
            else:  # the plan's first timestep where the sequence does not go on: a new run
                on = not run.off_plan and k < self.plan.steps and same_timestep(self.timesteps[k], t, dtype)
                fresh = not on and same_timestep(self.timesteps[0], t, dtype)
        if fresh:
            run = self._start_run()
        elif run.k == 0:
            run.calls_per_step = run.calls_in_step  # fixed by the run's first step
        elif run.calls_in_step != run.calls_per_step:
            self._run = None
            raise self._branch_error(run.t, run.calls_in_step, run)
        k = run.k + 1
        if self.remap == "nearest":
            step = self._nearest(t)
        else:
            step = k if not run.off_plan and k < self.plan.steps and same_timestep(self.timesteps[k], t, dtype) else None
            if step is None and not run.off_plan:
                if self.remap == "error":
                    self._run = None
                    raise self._schedule_error(run, k, t, dtype)
                self._warn_once(
                    "off",
                    f"the run left the plan's timestep sequence at its step {k} (timestep {t:g}): this run is "
                    "computed in full from there (remap='off')")
                run.off_plan = True
        run.k += 1
        run.t = t
        run.received.append(t)
        run.calls_in_step = 0
        run.report.steps.append(-1 if step is None else step)
        run.report.step_fractions.append(0.0)
        run.report._step_acc = [0.0, 0.0]
        if step is not None:
            run.step = step
        return run, step

    def _prepare(self, run: _Run, step: int | None, branch: int, batch: int) -> None:
        U = len(self.plan.units)
        report = run.report
        report.calls += 1
        if step is None or run.off_plan:
            report.off_plan_calls += 1
            self._decision = (True,) * U
            self._inputs = [None] * U
            self._idle_now = frozenset()
            self._pushes = ()
            report.computed += U
            self._account(run, batch, 1.0)
            return
        history = run.history.get(branch) or run.history.setdefault(branch, [[] for _ in range(U)])
        rec = self._steps[step] if self._steps is not None else self._step_record(step, [len(h) for h in history])
        for u in rec.forced:
            report.forced += 1
            comp = self.plan.units[u].compensation[step]
            self._warn_once("forced", (
                f"{self.plan.units[u].name} is skipped at plan step {step} but has only {len(history[u])} cached "
                f"output(s) for {len(comp.coeffs)} coefficient(s) in guidance branch {branch} (the run did not "
                "start at the plan's step 0, or there are more guidance branches than in calibration); it is "
                "computed instead"))
        inputs: list[Any] = [None] * U
        for u, k, plain in rec.skips:  # plain reuse: (None, None, (H_1,)), H_1 itself
            h = history[u]
            if len(h) < k:  # its module was not called when the plan computed it
                self._run = None
                raise PlanScheduleError(
                    f"{self.plan.units[u].name} is predicted at plan step {step} from {k} cached output(s) but has "
                    f"{len(h)}: its module did not run at the steps the plan computes it (was its forward or "
                    "attention processor replaced while the plan is applied?); remove the plan and apply it again")
            inputs[u] = (None, None, (h[0],)) if plain else (*self._coefficients(u, step, h[0]), tuple(h[:k]))
        report.skipped += len(rec.skips)
        report.compensated += rec.compensated
        report.computed += sum(rec.decision)
        self._decision = rec.decision
        self._idle_now = self._idle[step]
        self._inputs = inputs
        self._pushes = rec.pushes
        self._account(run, batch, rec.fraction)

    def _account(self, run: _Run, batch: int, fraction: float) -> None:
        r = run.report
        for acc in (r._acc, r._step_acc):
            acc[0], acc[1] = acc[0] + batch * fraction, acc[1] + batch
        r.flops_fraction, r.step_fractions[-1] = r._acc[0] / r._acc[1], r._step_acc[0] / r._step_acc[1]
        if r.calls == 1:
            r._t0 = time.perf_counter()

    def _coefficients(self, u: int, step: int, feature: Feature) -> tuple:
        """``(coefficients, EOC factors)`` of unit ``u`` at ``step`` for history entries like ``feature``: per
        part a tuple of 0-dim tensors and ``1 + eoc_alpha·D`` (None without EOC), in the part's dtype on its
        device; cached per unit, step, device, dtypes and shapes.

        Raises:
            PlanScheduleError: the sidecar lacks a prior, or one does not broadcast to the per-sample shape.
        """
        device = feature[0].device
        key = (u, step, device, tuple(f.dtype for f in feature), tuple(f.shape[1:] for f in feature))
        if key in self._coeff_cache:
            return self._coeff_cache[key]
        comp, name = self.plan.units[u].compensation[step], self.plan.units[u].name
        coeffs = tuple(tuple(torch.tensor(float(c), dtype=f.dtype, device=device) for c in comp.coeffs) for f in feature)
        eoc = None
        if comp.eoc_alpha != 0.0:
            base = f"eoc/{name}/{step}"
            keys = [base] if len(feature) == 1 and base in self._eoc_np else [f"{base}/{p}" for p in range(len(feature))]
            missing = [k for k in keys if k not in self._eoc_np]
            if missing:
                raise PlanScheduleError(f"{name} at step {step} has eoc_alpha {comp.eoc_alpha} but the sidecar lacks {missing}")
            eoc = []
            for p, (k, part) in enumerate(zip(keys, feature)):
                d, want = torch.as_tensor(self._eoc_np[k], dtype=torch.float32, device=device), part.shape[1:]
                if d.ndim != len(want) or any(a not in (1, b) for a, b in zip(d.shape, want)):
                    raise PlanScheduleError(
                        f"the EOC prior of {name} at step {step} (part {p}) has shape {list(d.shape)}, but the unit's "
                        f"output per sample has shape {list(want)} and the prior neither has it nor broadcasts to it "
                        f"(as many dims, each 1 or equal); the plan was made for resolution "
                        f"{self.plan.sampler.resolution}: run at that resolution or make a plan for this one")
                eoc.append((1.0 + comp.eoc_alpha * d).to(part.dtype))  # in float32, rounded once to the dtype
            eoc = tuple(eoc)
        self._coeff_cache[key] = (coeffs, eoc)
        return coeffs, eoc

    def should_compute(self, index: int) -> bool:
        """Whether plan unit ``index`` runs in the current call (read from the prepared decision). A nested unit
        idle at this step is only called when something computes its parent anyway (a shadow calibration):
        it is computed then too."""
        return self._decision[index] or index in self._idle_now

    def wraps(self, index: int) -> bool:
        """Whether unit ``index`` needs its hook: False for a nested unit (attention map) the plan never
        predicts, which then runs inside its parent as if it were not a unit (SDPA's kernel, no materialised map)."""
        return self.parents[index] is None or bool(self.plan.units[index].compensation)

    def stores(self, index: int) -> bool:
        """Whether unit ``index`` ever keeps a computed feature (fixed per unit; False: none is built)."""
        return self.keep[index] > 0

    def store(self, index: int, feature: Feature) -> None:
        """Queue a computed feature; it enters the history when the call ends."""
        if self.keep[index]:
            self._pending.append((index, feature))

    def predict(self, index: int) -> Feature:
        """The prediction of skipped unit ``index`` (module docstring): plain reuse returns the cached
        feature itself, else ``Σ_j coeffs[j]·H_{j+1}`` (left to right) ``⊙ (1 + α·D)`` in the feature dtype.

        Shapes: each part of the returned feature has the shape and dtype of the cached part (batch first);
        the EOC factor (per-sample shape, or broadcastable to it) broadcasts over the batch.
        """
        coeffs, eoc, hist = self._inputs[index]
        feature = hist[0] if coeffs is None else combine(hist, coeffs, eoc)  # None: plain reuse
        if self.push_predictions:
            self._pending.append((index, feature))
        return feature

    def end_call(self) -> None:
        """Move the call's computed (and, for ``history: used``, predicted) features into the history; a
        feature no later step reads takes its slot as ``None``."""
        if not self._in_call:
            return
        self._in_call = False
        run = self._run
        if run is None:
            return
        if self._pending:
            history = run.history.setdefault(self._branch, [[] for _ in self.plan.units])
            pending = dict(self._pending)
            for index, kept in self._pushes:
                if index in pending:
                    h = history[index]
                    h.insert(0, pending[index] if kept else None)
                    del h[self.keep[index]:]
            self._pending = []
        run.calls_in_step += 1
        if run.step == self.plan.steps - 1:
            run.report.complete = True
            device = run.layout.get(self._branch, (None, None, None, None))[3]
            if isinstance(device, torch.device) and device.type == "cuda":
                torch.cuda.synchronize(device)
        run.report.wall_time_s = time.perf_counter() - run.report._t0
        self._inputs = [None] * len(self.plan.units)

    def abort_call(self) -> None:
        """The transformer forward raised: drop the run (its history may be partial)."""
        self._in_call = False
        self._pending = []
        self._inputs = [None] * len(self.plan.units)
        self._run = None
