"""Plan execution: the :class:`~cachec.runtime.hooks.UnitHandler` that follows a plan call by call.

How a transformer call is placed in the plan (all of it happens in the transformer's forward pre-hook, in
eager Python, even when the transformer is ``torch.compile``-d):

- **step**: the received ``timestep`` is matched to ``plan.sampler.timesteps`` (nearest value, accepted
  within a relative tolerance of ``max(1e-4, 2·eps(timestep dtype))``; FluxPipeline passes bfloat16
  timesteps on GPU). Unmatched timesteps follow ``remap``:

  - ``"error"`` (default): :class:`PlanScheduleError` naming the timestep and the plan's schedule;
  - ``"nearest"``: every call follows the plan step with the nearest timestep (use it to run a plan with
    another step count or a slightly different schedule; a skip that has no history yet — e.g. the run
    starts at a later plan step — is computed instead);
  - ``"off"``: a run with an unmatched timestep is computed in full from that call on (one warning).

- **guidance branch**: the call order within a step (split CFG: the second call of a step is branch 1 with
  its own history). Batched CFG is one call whose batch holds all branches.
- **run**: a new run starts when the pipeline calls ``scheduler.set_timesteps`` (when :func:`apply` got a
  pipeline), when a call's plan step is earlier than the current one, or when step 0 comes back after it
  was left. All cached state of the previous (possibly aborted) run is dropped then.

Per call the executor resolves a *decision* — a tuple of booleans, one per plan unit — and, for skipped
units, the history tensors and coefficient tensors of the prediction. The unit wrappers (possibly traced by
``torch.compile``) only read those; so a compiled transformer recompiles once per distinct step pattern,
not per step (coefficients are 0-dim float32 tensors, never Python floats).

Prediction of a skipped unit: ``F̂ = Σ_j coeffs[j]·H_{j+1}`` accumulated left to right in float32 from the
most recent history entry ``H_1``, times ``(1 + eoc_alpha·D)`` when the plan has an EOC prior D, then cast
to the feature dtype. ``history: computed`` keeps the last ``m`` really computed outputs (``m`` = the
unit's longest coefficient list); ``history: used`` pushes predictions too.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .hooks import Feature, batch_size_of, timestep_arg
from .plan import COMPUTE, Plan
from .units import UnitSpec, unwrap

REMAP_MODES = ("error", "nearest", "off")
#: relative tolerance of the timestep match (raised to 2·eps of low-precision timestep dtypes)
TIMESTEP_RTOL = 1e-4


class PlanScheduleError(RuntimeError):
    """A transformer call does not fit the plan (timestep not in the schedule, batch layout changed)."""


@dataclass
class RunReport:
    """What one sampling run did under a plan.

    Attributes:
        run: run index (0-based) since the plan was applied.
        plan_steps: S, the plan's number of steps.
        steps: plan step of each runtime step seen, in order (-1: off-plan step).
        step_fractions: FLOPs of each runtime step relative to the same step uncached (mean over its calls,
            weighted by batch size).
        flops_fraction: FLOPs of the whole run relative to the same run uncached (from the plan's unit and
            fixed FLOPs and what actually ran).
        calls: transformer calls.
        computed: unit calls that ran their real computation.
        skipped: unit calls replaced by a prediction.
        compensated: skipped unit calls whose prediction is not plain reuse (coefficients other than
            ``[1.0]``, or an EOC correction).
        forced: unit calls the plan skips but that were computed because no history was available.
        off_plan_calls: calls computed in full because their timestep was not in the plan (``remap="off"``).
        wall_time_s: seconds from the first call's start to the last call's end (CUDA synchronised at the
            end of the final plan step).
        complete: the final plan step was reached.
    """

    run: int
    plan_steps: int
    steps: list[int] = field(default_factory=list)
    step_fractions: list[float] = field(default_factory=list)
    flops_fraction: float = 0.0
    calls: int = 0
    computed: int = 0
    skipped: int = 0
    compensated: int = 0
    forced: int = 0
    off_plan_calls: int = 0
    wall_time_s: float = 0.0
    complete: bool = False
    # accumulators: (Σ batch·fraction, Σ batch) overall and for the current runtime step
    _acc: list[float] = field(default_factory=lambda: [0.0, 0.0], repr=False)
    _step_acc: list[float] = field(default_factory=lambda: [0.0, 0.0], repr=False)
    _t0: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        """The public fields as a plain dict (for JSON reports)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class _Run:
    """Mutable state of one sampling run."""

    def __init__(self, index: int, plan_steps: int):
        self.report = RunReport(run=index, plan_steps=plan_steps)
        self.step = -1  # current plan step (-1: none yet / off-plan)
        self.t = None  # raw timestep of the current runtime step
        self.calls_in_step = 0
        self.off_plan = False
        self.layout: dict[int, tuple] = {}  # branch -> (batch, shape, dtype, device)
        self.history: dict[int, list[list[Feature]]] = {}  # branch -> unit -> [H_1, H_2, ...]


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

    Raises:
        ValueError: unknown ``remap``; a plan schedule with timesteps too close to tell apart.
    """

    def __init__(
        self,
        plan: Plan,
        units: list[UnitSpec],
        transformer,
        remap: str = "error",
        eoc_tensors: dict[str, Any] | None = None,
        run_signal: bool = False,
    ):
        if remap not in REMAP_MODES:
            raise ValueError(f"remap must be one of {', '.join(REMAP_MODES)}, got {remap!r}")
        self.plan = plan
        self.units = units
        self.remap = remap
        self.run_signal = run_signal
        self._signature = inspect.signature(unwrap(transformer).forward)
        self.timesteps = [float(t) for t in plan.sampler.timesteps]
        self._check_distinct()
        g = plan.sampler.guidance
        self.calls_per_step = g.branches if g.mode == "split" else 1
        S, U = plan.steps, len(plan.units)
        self.patterns = [tuple(u.actions[s] == COMPUTE for u in plan.units) for s in range(S)]
        self.keep = tuple(max((len(c.coeffs) for c in u.compensation.values()), default=0) for u in plan.units)
        self.push_predictions = plan.history == "used"
        self.full = plan.budget.full_step_flops
        self.fixed = plan.budget.fixed_step_flops
        self.unit_flops = [u.flops for u in plan.units]
        self._eoc_np = dict(eoc_tensors or {})
        self._coeff_cache: dict[tuple, tuple] = {}  # (unit, step, device) -> (coeff tensors, eoc factors)
        # per-call state read by the unit wrappers (possibly inside a compiled graph)
        self._decision: tuple[bool, ...] = (True,) * U
        self._inputs: list[Any] = [None] * U
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
        ``(number of coefficients, has EOC)``. ``torch.compile`` compiles one graph per distinct value (per
        input shape); coefficient values are tensors and never cause a recompile."""
        out = []
        for s in range(self.plan.steps):
            sig = []
            for unit in self.plan.units:
                c = unit.compensation.get(s)
                sig.append(None if c is None else (len(c.coeffs), c.eoc_alpha != 0.0))
            out.append(tuple(sig))
        return out

    # ------------------------------------------------------------------ schedule matching

    def _check_distinct(self) -> None:
        ts = self.timesteps
        for i in range(len(ts)):
            for j in range(i + 1, len(ts)):
                if abs(ts[i] - ts[j]) <= TIMESTEP_RTOL * max(abs(ts[i]), abs(ts[j]), 1e-12):
                    raise ValueError(
                        f"the plan's timesteps {i} and {j} are equal ({ts[i]!r}); cachec identifies the step by "
                        "the timestep, so schedules with repeated timesteps (Heun, DPM2) are not supported"
                    )

    def _match(self, t: float, dtype) -> int | None:
        """Index of the plan step whose timestep equals ``t`` within tolerance, else None."""
        rtol = TIMESTEP_RTOL
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            rtol = max(rtol, 2 * torch.finfo(dtype).eps)
        best = min(range(len(self.timesteps)), key=lambda s: abs(self.timesteps[s] - t))
        ref = self.timesteps[best]
        scale = max(abs(ref), abs(t), rtol * max(abs(x) for x in self.timesteps))
        return best if abs(ref - t) <= rtol * scale else None

    def _nearest(self, t: float) -> int:
        return min(range(len(self.timesteps)), key=lambda s: abs(self.timesteps[s] - t))

    def _schedule_error(self, t: float) -> PlanScheduleError:
        ts = self.timesteps
        shown = ", ".join(f"{x:g}" for x in (ts if len(ts) <= 12 else ts[:6] + ts[-6:]))
        return PlanScheduleError(
            f"the transformer received timestep {t:g}, which is not in the plan's schedule "
            f"({len(ts)} steps of {self.plan.sampler.scheduler}: {shown}{' …' if len(ts) > 12 else ''}). "
            f"Run the pipeline with num_inference_steps={len(ts)} and the plan's scheduler, make a plan for "
            "this schedule, or apply the plan with remap='nearest' (follow the nearest plan step) or "
            "remap='off' (compute such runs in full)"
        )

    # ------------------------------------------------------------------ run bookkeeping

    def new_run(self) -> None:
        """Mark that the next transformer call starts a new sampling run."""
        self._fresh = True

    def _start_run(self) -> _Run:
        self._run = _Run(self._runs, self.plan.steps)
        self._runs += 1
        self.reports.append(self._run.report)
        self._fresh = False
        return self._run

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ UnitHandler protocol

    def begin_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Place the call in the plan and prepare the decision and prediction inputs.

        Raises:
            PlanScheduleError: timestep not in the plan (``remap="error"``) or the batch layout of a guidance
                branch changed in the middle of a run.
            ValueError: the call has no ``timestep``.
        """
        self._in_call = False
        raw = timestep_arg(args, kwargs, self._signature)
        if isinstance(raw, torch.Tensor):
            t, t_dtype = float(raw.reshape(-1)[0].item()), raw.dtype
        else:
            t, t_dtype = float(raw), None
        step = self._match(t, t_dtype)
        if step is None:
            if self.remap == "error":
                raise self._schedule_error(t)
            if self.remap == "nearest":
                step = self._nearest(t)
        hs = kwargs.get("hidden_states", args[0] if args else None)
        batch = batch_size_of(args, kwargs)
        layout = (batch, tuple(hs.shape), hs.dtype, hs.device)

        run = self._run
        if run is None or self._fresh:
            run = self._start_run()
        elif step is not None:
            if run.step >= 0 and step < run.step:
                run = self._start_run()  # the schedule went back: a new run
            elif (
                step == 0
                and run.step == 0
                and not self.run_signal
                and run.t is not None
                and abs(run.t - t) <= TIMESTEP_RTOL * max(abs(t), 1e-12)
                and run.calls_in_step >= self.calls_per_step
            ):
                run = self._start_run()  # step 0 again after all its branches: a new run
        new_step = run.t is None or abs(run.t - t) > TIMESTEP_RTOL * max(abs(t), abs(run.t), 1e-12)
        if new_step:
            run.calls_in_step = 0
            run.t = t
            run.report.steps.append(-1 if step is None else step)
            run.report.step_fractions.append(0.0)
            run.report._step_acc = [0.0, 0.0]
        branch = run.calls_in_step
        if branch in run.layout and run.layout[branch] != layout:
            old = run.layout[branch]
            # the run's cached features no longer fit: drop the run so the next step 0 starts clean
            self._run = None
            raise PlanScheduleError(
                f"the transformer call at timestep {t:g} (guidance branch {branch}) has batch {layout[0]}, "
                f"shape {list(layout[1])}, {layout[2]} on {layout[3]}, but earlier calls of this run had batch "
                f"{old[0]}, shape {list(old[1])}, {old[2]} on {old[3]}; cached features cannot be reused across "
                "batch sizes, resolutions, dtypes or devices. Start a new run (from step 0) for the new layout"
            )
        run.layout[branch] = layout
        if step is None:
            if not run.off_plan:
                self._warn_once(
                    "off",
                    f"timestep {t:g} is not in the plan's schedule: this run is computed in full (remap='off')",
                )
            run.off_plan = True
        if step is not None:
            run.step = step
        self._branch = branch
        self._prepare(run, step, branch, batch, hs.device)
        self._pending = []
        self._in_call = True

    def _prepare(self, run: _Run, step: int | None, branch: int, batch: int, device) -> None:
        U = len(self.plan.units)
        report = run.report
        report.calls += 1
        if step is None or run.off_plan:
            report.off_plan_calls += 1
            self._decision = (True,) * U
            self._inputs = [None] * U
            report.computed += U
            self._account(run, batch, 1.0)
            return
        history = run.history.setdefault(branch, [[] for _ in range(U)])
        decision = list(self.patterns[step])
        inputs: list[Any] = [None] * U
        for u, compute in enumerate(decision):
            if compute:
                continue
            comp = self.plan.units[u].compensation[step]
            hist = history[u]
            if len(hist) < len(comp.coeffs):
                decision[u] = True
                report.forced += 1
                self._warn_once(
                    "forced",
                    f"{self.plan.units[u].name} is skipped at plan step {step} but has only {len(hist)} cached "
                    f"output(s) for {len(comp.coeffs)} coefficient(s) in guidance branch {branch} (the run did not "
                    "start at the plan's step 0, or there are more guidance branches than in calibration); it is "
                    "computed instead",
                )
                continue
            coeffs, eoc = self._coefficients(u, step, device, len(hist[0]))
            if eoc is not None:
                for p, (factor, part) in enumerate(zip(eoc, hist[0])):
                    if tuple(factor.shape) != tuple(part.shape[1:]):
                        raise PlanScheduleError(
                            f"the EOC prior of {self.plan.units[u].name} at step {step} (part {p}) has shape "
                            f"{list(factor.shape)}, but the unit's output per sample has shape {list(part.shape[1:])}; "
                            f"the plan was made for resolution {self.plan.sampler.resolution}: run at that "
                            "resolution or make a plan for this one"
                        )
            inputs[u] = (coeffs, tuple(hist[: len(coeffs)]), eoc)
            report.skipped += 1
            if eoc is not None or [float(c) for c in comp.coeffs] != [1.0]:
                report.compensated += 1
        report.computed += sum(decision)
        self._decision = tuple(decision)
        self._inputs = inputs
        spent = self.fixed + sum(f for f, c in zip(self.unit_flops, decision) if c)
        self._account(run, batch, spent / self.full)

    def _account(self, run: _Run, batch: int, fraction: float) -> None:
        r = run.report
        r._acc[0] += batch * fraction
        r._acc[1] += batch
        r._step_acc[0] += batch * fraction
        r._step_acc[1] += batch
        r.flops_fraction = r._acc[0] / r._acc[1]
        r.step_fractions[-1] = r._step_acc[0] / r._step_acc[1]
        if r.calls == 1:
            r._t0 = time.perf_counter()

    def _coefficients(self, u: int, step: int, device, parts: int):
        key = (u, step, str(device))
        if key not in self._coeff_cache:
            comp = self.plan.units[u].compensation[step]
            coeffs = tuple(torch.tensor(float(c), dtype=torch.float32, device=device) for c in comp.coeffs)
            eoc = None
            if comp.eoc_alpha != 0.0:
                name = self.plan.units[u].name
                base = f"eoc/{name}/{step}"
                keys = [base] if parts == 1 and base in self._eoc_np else [f"{base}/{p}" for p in range(parts)]
                missing = [k for k in keys if k not in self._eoc_np]
                if missing:
                    raise PlanScheduleError(
                        f"{name} at step {step} has eoc_alpha {comp.eoc_alpha} but the sidecar lacks {missing}"
                    )
                eoc = tuple(
                    1.0 + comp.eoc_alpha * torch.as_tensor(self._eoc_np[k], dtype=torch.float32, device=device)
                    for k in keys
                )
            self._coeff_cache[key] = (coeffs, eoc)
        return self._coeff_cache[key]

    def should_compute(self, index: int) -> bool:
        """Whether plan unit ``index`` runs in the current call (read from the prepared decision)."""
        return self._decision[index]

    def store(self, index: int, feature: Feature) -> None:
        """Queue a computed feature; it enters the history when the call ends."""
        if self.keep[index]:
            self._pending.append((index, feature))

    def predict(self, index: int) -> Feature:
        """``Σ_j coeffs[j]·H_{j+1}`` (float32, left to right) ``⊙ (1 + α·D)``, cast to the feature dtype.

        Shapes: each part of the returned feature has the shape and dtype of the cached part (batch first);
        the EOC factor (per-sample shape) broadcasts over the batch.
        """
        coeffs, hist, eoc = self._inputs[index]
        out = []
        for p in range(len(hist[0])):
            acc = coeffs[0] * hist[0][p].float()
            for j in range(1, len(coeffs)):
                acc = acc + coeffs[j] * hist[j][p].float()
            if eoc is not None:
                acc = acc * eoc[p]
            out.append(acc.to(hist[0][p].dtype))
        feature = tuple(out)
        if self.push_predictions:
            self._pending.append((index, feature))
        return feature

    def end_call(self) -> None:
        """Move the call's computed (and, for ``history: used``, predicted) features into the history."""
        if not self._in_call:
            return
        self._in_call = False
        run = self._run
        if run is None:
            return
        history = run.history.setdefault(self._branch, [[] for _ in self.plan.units])
        for index, feature in self._pending:
            h = history[index]
            h.insert(0, feature)
            del h[self.keep[index] :]
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
