"""Recording unit features from an unmodified pipeline call through the runtime hook core.

Steps and branches are read from the calls themselves, never from a call counter
(docs/calibration-format.md):

- the **step** is the position of the call's ``timestep`` in the schedule. During the first run the
  received values are recorded in order (a new value opens the next step); later runs must present the
  same values in the same order, or the run fails with the step and both values named. A value matches
  the recorded one by :func:`cachec.runtime.hooks.same_timestep`, the rule plan execution applies to a
  plan's timesteps, so calibration and runtime accept exactly the same timesteps;
- the **branch**: a call with ``2N`` rows for a batch of N samples is batched CFG — its two halves are the
  conditional and the unconditional branch (in the pipeline's order, see :func:`batched_cond_first`); a
  call with N rows is branch 0, and a further call with the *same* timestep as the previous call is the
  next branch (split CFG, the conditional call first). One call per step with N rows is no guidance
  (B = 1).

Second-order schedulers that call the model twice with the same timestep (Heun) look like split CFG and
are not supported; a repeated timestep inside batched CFG is reported as an error.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from cachec.runtime.hooks import Feature, batch_size_of, same_timestep, timestep_and_dtype
from cachec.runtime.registry import spec_for_pipeline
from cachec.runtime.units import UnitSpec, unwrap


def batched_cond_first(pipe) -> bool:
    """Whether a pipeline's batched-CFG transformer call holds the conditional half first (the registry's
    :attr:`~cachec.runtime.registry.ModelSpec.cond_first`: ``DigitsPipeline`` and diffusers' ``DiTPipeline``
    concatenate ``[labels, null]``; the text pipelines ``[negative, prompt]``).

    Raises:
        UnsupportedModelError: the pipeline class is not registered.
    """
    return spec_for_pipeline(pipe).cond_first


@dataclass
class CallInfo:
    """Where the current transformer call sits.

    Attributes:
        step: step index s (0 = first, noisiest).
        call: index of this call within the step (0, or 1 for the second split-CFG call).
        rows: batch rows of the call.
        parts: ``[(branch, row_slice), ...]``: which rows of the call hold which guidance branch.
    """

    step: int
    call: int
    rows: int
    parts: list[tuple[int, slice]]


class StepTracker:
    """Maps each transformer call of a run to (step, branch rows).

    Args:
        transformer: the (possibly compiled) transformer; its ``forward`` signature locates ``timestep``.
        steps: S, the number of steps a run must make.
        cond_first: batched-CFG halves order (see :func:`batched_cond_first`).
        schedule: the timesteps of an earlier run (None: record them during the first run); a received
            timestep matches its entry by :func:`cachec.runtime.hooks.same_timestep` (in the dtype it is
            passed in).
    """

    def __init__(self, transformer, steps: int, cond_first: bool = True, schedule: list[float] | None = None):
        self.signature = inspect.signature(unwrap(transformer).forward)
        self.S = int(steps)
        self.cond_first = cond_first
        self.schedule: list[float] | None = list(schedule) if schedule is not None else None
        self.mode: str | None = None  # batched | split | none, fixed by the first run
        self._recording: list[float] = []
        self.n = 0
        self.info: CallInfo | None = None

    def start_run(self, n_samples: int) -> None:
        """A pipeline call over ``n_samples`` samples begins."""
        self.n = int(n_samples)
        self._last_t: float | None = None
        self._step = -1
        self._call = 0
        self._calls_per_step: list[int] = []
        self._rows: set[int] = set()
        self.info = None
        if self.schedule is None:
            self._recording = []

    def on_call(self, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        """Classify one transformer call.

        Raises:
            ValueError: a timestep that does not match the schedule, more steps than S, a batch that is
                neither N nor 2N rows, or a third call at one timestep.
        """
        t, t_dtype = timestep_and_dtype(args, kwargs, self.signature)
        rows = batch_size_of(args, kwargs)
        # exactly the previous call's value: another call of the same step (as in plan execution)
        if self._last_t is not None and t == self._last_t:
            self._call += 1
            self._calls_per_step[-1] += 1
        else:
            self._step += 1
            self._call = 0
            self._calls_per_step.append(1)
            s = self._step
            if s >= self.S:
                raise ValueError(f"the pipeline made more than steps={self.S} transformer steps (timestep {t:g} would be step {s})")
            if self.schedule is None:
                self._recording.append(t)
            else:
                expected = self.schedule[s]
                if not same_timestep(expected, t, t_dtype):
                    raise ValueError(
                        f"step {s} received timestep {t:g} but the schedule recorded in the first batch has {expected:g}: "
                        "the sampler's schedule changed between batches"
                    )
        self._last_t = t
        n = self.n
        if rows == 2 * n:
            if self._call > 0:
                raise ValueError(
                    f"a second transformer call with timestep {t:g} in a batched-CFG layout: second-order schedulers "
                    "(repeated timesteps) are not supported"
                )
            first, second = (0, 1) if self.cond_first else (1, 0)
            parts = [(first, slice(0, n)), (second, slice(n, 2 * n))]
        elif rows == n:
            if self._call > 1:
                raise ValueError(f"{self._call + 1} transformer calls with timestep {t:g}: at most 2 (split CFG) are supported")
            parts = [(self._call, slice(0, n))]
        else:
            raise ValueError(f"a transformer call has {rows} rows for a batch of {n} samples: cachec expects {n} or {2 * n}")
        self._rows.add(rows)
        self.info = CallInfo(self._step, self._call, rows, parts)
        return self.info

    def finish_run(self) -> None:
        """Check the run made S steps with the same branch layout at every step; fixes ``mode``/``schedule``.

        Raises:
            ValueError: too few steps, a varying number of calls per step, or a layout that changed.
        """
        steps_seen = self._step + 1
        if steps_seen != self.S:
            raise ValueError(f"the pipeline made {steps_seen} transformer steps but steps={self.S} were requested")
        calls = set(self._calls_per_step)
        if len(calls) != 1 or len(self._rows) != 1:
            raise ValueError(f"the guidance layout varied between steps (calls per step {sorted(calls)}, rows {sorted(self._rows)})")
        rows = next(iter(self._rows))
        mode = "batched" if rows == 2 * self.n else ("split" if calls == {2} else "none")
        if self.mode is not None and mode != self.mode:
            raise ValueError(f"the guidance layout changed between batches ({self.mode} then {mode})")
        self.mode = mode
        if self.schedule is None:
            self.schedule = list(self._recording)

    @property
    def branches(self) -> int:
        """B: 2 for batched or split CFG, 1 without guidance (valid after the first run)."""
        return 1 if self.mode == "none" else 2


class Switch:
    """A :class:`~cachec.runtime.hooks.UnitHandler` that forwards to a replaceable delegate.

    The hook core remembers each unit's output layout from its first real computation within one
    installation, so calibration installs the hooks once and switches between recording and the
    sensitivity replays. With no delegate every unit computes and nothing is recorded.
    """

    def __init__(self):
        self.target = None

    def begin_call(self, args, kwargs):
        if self.target is not None:
            self.target.begin_call(args, kwargs)

    def end_call(self):
        if self.target is not None:
            self.target.end_call()

    def should_compute(self, index: int) -> bool:
        return True if self.target is None else self.target.should_compute(index)

    def store(self, index: int, feature: Feature) -> None:
        if self.target is not None:
            self.target.store(index, feature)

    def predict(self, index: int) -> Feature:
        if self.target is None:
            raise RuntimeError("no calibration handler is active, yet a unit was skipped")
        return self.target.predict(index)

    def substitute(self, index: int) -> Feature | None:
        sub = getattr(self.target, "substitute", None)
        return None if sub is None else sub(index)

    def abort_call(self) -> None:
        abort = getattr(self.target, "abort_call", None)
        if abort is not None:
            abort()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder:
    """Streams every unit's output of one batch into a :class:`~.streaming.BatchRecord` (the hook core's
    handler; it always computes). No trajectory is kept: per (unit, branch) the record holds the step's
    sketch and EOC group sums and a window of the last ``eoc_lags`` raw outputs.

    Args:
        units: the unit specs (order = unit index).
        tracker: the :class:`StepTracker`.
        device: the transformer's device (for synchronised latency timing on CUDA).

    Attributes:
        record: the :class:`~.streaming.BatchRecord` the current batch is streamed into (set by the caller
            before :meth:`start_run`).
        shapes: per unit, the per-sample shapes of its tuple parts (fixed by the first stored feature).
        lat_sum, lat_count: summed seconds and number of timed unit calls.
        timing: when True, unit calls of steps >= 1 (all steps if S == 1) are timed.
        capture: when True, the first transformer call's (args, kwargs) are kept in ``captured``.
        on_step: optional callable, called once per step (at its first transformer call).
    """

    def __init__(self, units: list[UnitSpec], tracker: StepTracker, device=None):
        self.units = units
        self.tracker = tracker
        self.device = torch.device(device or "cpu")
        self.shapes: list[list[tuple[int, ...]] | None] = [None] * len(units)
        self.record = None
        self.lat_sum = [0.0] * len(units)
        self.lat_count = [0] * len(units)
        self.timing = False
        self.capture = False
        self.captured: tuple[tuple, dict] | None = None
        self._t0: dict[int, float] = {}
        self._timed = False
        self.on_step = None  # called at the first call of every step (progress bars)

    def start_run(self, n_samples: int, first_sample: int = 0) -> None:
        """A batch of ``n_samples`` samples (global indices from ``first_sample``) begins."""
        self.tracker.start_run(n_samples)
        if self.record is not None:
            self.record.reset(n_samples, first_sample)

    def finish_run(self) -> None:
        self.tracker.finish_run()

    # ---- UnitHandler ------------------------------------------------------------------------------
    def begin_call(self, args, kwargs) -> None:
        info = self.tracker.on_call(args, kwargs)
        if info.call == 0 and self.on_step is not None:
            self.on_step()
        if self.capture and self.captured is None:
            self.captured = (args, dict(kwargs))
        self._timed = self.timing and (info.step >= 1 or self.tracker.S == 1)

    def end_call(self) -> None:
        pass

    def should_compute(self, index: int) -> bool:
        if self._timed:
            _sync(self.device)
            self._t0[index] = time.perf_counter()  # per unit: a nested unit's call starts inside its parent's
        return True

    def store(self, index: int, feature: Feature) -> None:
        if self._timed:
            _sync(self.device)
            self.lat_sum[index] += time.perf_counter() - self._t0[index]
            self.lat_count[index] += 1
        info = self.tracker.info
        shapes = [tuple(p.shape[1:]) for p in feature]
        if self.shapes[index] is None:
            self.shapes[index] = shapes
        elif shapes != self.shapes[index]:
            raise ValueError(
                f"unit {self.units[index].name} changed its per-sample output shapes from {self.shapes[index]} to {shapes}"
            )
        if self.record is None:
            return
        n = self.tracker.n
        for branch, rows in info.parts:
            parts = [p[rows].reshape(n, -1).float() for p in feature]
            x = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
            self.record.push(index, branch, info.step, x, shapes)

    def predict(self, index: int) -> Feature:
        raise RuntimeError("the calibration recorder never skips a unit")


class ShadowRecorder:
    """Records features along a plan's cached trajectory: every unit is computed (shadow computation) and
    recorded, but where the plan skips a unit its prediction is passed downstream, so later units, later
    steps and the sample follow exactly the trajectory the plan produces at run time.

    The recorded feature of a skipped (unit, step) is what the unit would have returned on the perturbed
    input, the target the prediction should have hit; computed features are the anchors the runtime
    really stores. Statistics of such a recording price predictors with the propagation of the plan's own
    errors included (re-record along the cached trajectory, then re-plan).

    Args:
        recorder: the :class:`Recorder` (step tracking, feature buffers, timing).
        executor: a :class:`cachec.runtime.executor.PlanExecutor` of the plan (``run_signal=False``: runs are
            detected from the steps).
    """

    def __init__(self, recorder: Recorder, executor):
        self.recorder = recorder
        self.executor = executor

    def begin_call(self, args, kwargs) -> None:
        self.recorder.begin_call(args, kwargs)
        self.executor.begin_call(args, kwargs)

    def end_call(self) -> None:
        self.recorder.end_call()
        self.executor.end_call()

    def abort_call(self) -> None:
        self.executor.abort_call()

    def should_compute(self, index: int) -> bool:
        return self.recorder.should_compute(index)

    def store(self, index: int, feature: Feature) -> None:
        self.recorder.store(index, feature)
        if self.executor.should_compute(index):
            self.executor.store(index, feature)

    def substitute(self, index: int) -> Feature | None:
        return None if self.executor.should_compute(index) else self.executor.predict(index)

    def predict(self, index: int) -> Feature:
        raise RuntimeError("the shadow recorder computes every unit")
