"""Sensitivity: how much the final image moves per unit of local feature error (``sensitivity`` (U, S)).

Definition (docs/calibration.md): for unit u and step s ≥ 1, replace u's output at step s alone by its
reuse value F(u, s−1) — exactly what a plan's plain reuse does — and run the rest of the trajectory:

    sensitivity[u, s] = Σ_n ‖x_n − x_n^ref‖²  /  Σ_{n,b} ‖F(u,n,b,s) − F(u,n,b,s−1)‖²

x_n is the image of sample n as ``Driver.generate`` returns it (float32 in [0, 1], after VAE decoding
and clamping: the space the quality metrics compare in), summed over the sensitivity samples n and the
guidance branches b. ``sensitivity[u, 0] = sensitivity[u, 1]`` (step 0 has no reuse value); with S = 1
the array is ones. Where the local error is exactly zero the ratio is undefined: it is replaced by the
median of the defined values of the same step (or of all steps; 1.0 if none).

Mechanism and memory. A *reference run* of the sensitivity samples keeps only latent-sized tensors per
step: the transformer's return value per (step, call) and, for ``chain``, the scheduler's output sample
per step. The local errors Σ‖F(u,s) − F(u,s−1)‖² are folded into a (U, S) float64 array during that run,
holding only each unit's previous-step output. A *probe* (targets, s) re-runs the unmodified pipeline from
the same seeds; transformer calls before step s return the recorded outputs without running (the scheduler
then reproduces the reference latent at step s bit-exactly); at step s the targets are not computed but
take their step-(s−1) output, which comes from a :class:`StepCache` holding every unit's output of *one*
step: a probe whose step-(s−1) features are not cached runs step s−1 live and fills it (one extra
transformer step; probes run grouped by step, so once per distinct step). Memory is therefore
O(S × latent) + O(U × one step's unit outputs), never O(U × S × features); results are bit-identical to
keeping every feature (a live step s−1 recomputes the reference features exactly).

Methods (cost in transformer steps over the sensitivity samples, reference run and cache fills included:
:func:`cost`):

- ``full``: one probe per (u, s), s = 1..S−1, run to the end: U·(S−1) probes;
  S + U·S(S−1)/2 + (S−1) steps.
- ``factored``: one joint probe per step (all units reuse at step s: a_s = Δ/Σ_u‖δ_u‖²) and one probe per
  unit at the middle step m = max(1, S // 2) (b_u); ``sensitivity[u, s] = a_s · b_u / a_m``.
  S + S(S−1)/2 + U·(S−m) + (S−1) steps.
- ``chain``: ``full``'s values at the middle step m, carried to the other steps by each unit's own chain
  rule unit → next latent → image. Per (u, s ≤ S−2) a one-step probe stops after step s's scheduler step
  and measures the latent change L(u, s) = ‖Δx_{s+1}‖²; per step s ≤ S−2 one joint probe (all units reuse)
  measures the final change and its own latent change, κ_s = Δ/‖Δx_{s+1}‖² (how much the rest of the
  trajectory amplifies a latent change); c(u, s) = κ_s · L(u, s) / Σ‖δ_u‖² and, with U full probes at m,
  ``sensitivity[u, s] = full[u, m] · c(u, s) / c(u, m)`` (c(u, s) alone where c(u, m) is undefined; the
  last step's per-unit probes are full probes). Exact for U = 1, at m and at S−1; it assumes the ratio
  between a unit's true amplification and κ_s stays what it is at m. S + S(S−1)/2 − 1 + U·(S−1) +
  U·(S−m) + (S−1) steps when m ≤ S−2: O(S + U) sampling runs. A one-step probe still pays the pipeline's
  per-call work (prompt encoding, latent preparation), not the VAE decoding.
- ``none``: ones, nothing is run.

``auto`` (:func:`resolve`) is ``full`` while its probes cost at most :data:`AUTO_FULL_RUNS` sampling runs
(U·(S−1)/2 ≤ 600: both digit reference models at their default steps) and ``chain`` above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .recorder import StepTracker

METHODS = ("full", "factored", "chain", "none")
#: the method name that :func:`resolve` turns into ``full`` (small models) or ``chain`` (big ones)
AUTO = "auto"
#: ``auto`` is ``full`` while full's probes cost at most this many sampling runs (U·(S−1)/2), else ``chain``
AUTO_FULL_RUNS = 600


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")


def resolve(method: str, n_units: int, steps: int, small: str = "full") -> str:
    """The concrete method of a request: ``auto`` is ``small`` when ``full`` costs at most
    :data:`AUTO_FULL_RUNS` sampling runs (U·(S−1)/2, e.g. 24 units × 50 steps: 588), else ``chain``
    (DiT-XL/2 at 50 steps: 1372; FLUX.1 at 28 steps: 1026); any other method is returned unchanged.

    Raises:
        ValueError: an unknown method (or ``small``).
    """
    _check(small)
    if method == AUTO:
        return small if n_units * (steps - 1) / 2 <= AUTO_FULL_RUNS else "chain"
    _check(method)
    return method


def jobs(method: str, n_units: int, steps: int, joint: tuple[int, ...] | None = None
         ) -> list[tuple[tuple[int, ...], int]]:
    """The probes of a method: ``[(unit indices perturbed together, step), ...]`` in a fixed order
    (``chain``: the S−2 joint probes, the per-unit probes step by step, then the U probes at the middle
    step m when m ≤ S−2). ``joint``: the units a joint probe perturbs (default all; a calibration with
    attention-map units leaves them out: a map reused inside a reused block changes nothing, and its local
    error would only dilute the joint ratio).

    Raises:
        ValueError: unknown method.
    """
    _check(method)
    if method == "none" or steps < 2:
        return []
    everyone = tuple(range(n_units)) if joint is None else tuple(joint)
    if method == "full":
        return [((u,), s) for s in range(1, steps) for u in range(n_units)]
    mid = max(1, steps // 2)
    if method == "chain":
        anchors = [((u,), mid) for u in range(n_units)] if mid <= steps - 2 else []
        return ([(everyone, s) for s in range(1, steps - 1)] + [((u,), s) for s in range(1, steps) for u in range(n_units)]
                + anchors)
    return [(everyone, s) for s in range(1, steps)] + [((u,), mid) for u in range(n_units)]


def probe_kinds(method: str, n_units: int, steps: int) -> list[str]:
    """What each probe of :func:`jobs` measures, and so what its ``results`` row (d, e) holds:

    - ``"final"``: run to the end; d = Σ‖x − x_ref‖² (final images), e = local error of the targets;
    - ``"latent"``: stop after step s's scheduler step; d = ‖Δx_{s+1}‖² (scheduler output), e = local error;
    - ``"joint"``: run to the end; d = Σ‖x − x_ref‖², e = ‖Δx_{s+1}‖² (``chain``'s κ_s = d / e).

    Raises:
        ValueError: unknown method.
    """
    job_list = jobs(method, n_units, steps)
    if method != "chain":
        return ["final"] * len(job_list)
    n_joint, n_chain = max(0, steps - 2), max(0, steps - 2) + n_units * (steps - 1)
    return ["joint" if j < n_joint else ("latent" if s < steps - 1 and j < n_chain else "final")
            for j, (_, s) in enumerate(job_list)]


def cost(method: str, n_units: int, steps: int) -> int:
    """Transformer steps a single-process measurement runs (each over the sensitivity samples and their
    guidance branches): the reference run, every probe (S − s for a probe run to the end, 1 for a
    ``latent`` probe) and one step per distinct probe step for filling the :class:`StepCache`.

    Raises:
        ValueError: unknown method.
    """
    job_list = jobs(method, n_units, steps)
    if not job_list:
        return 0
    probes = sum(1 if k == "latent" else steps - s
                 for (_, s), k in zip(job_list, probe_kinds(method, n_units, steps)))
    return steps + probes + len({s for _, s in job_list})


def _fill_undefined(sens: np.ndarray) -> np.ndarray:
    sens = sens.copy()
    for s in range(sens.shape[1]):
        col = sens[:, s]
        bad = ~np.isfinite(col)
        if bad.any():
            good = col[~bad]
            if good.size:
                col[bad] = np.median(good)
    bad = ~np.isfinite(sens)
    if bad.any():
        good = sens[~bad]
        sens[bad] = np.median(good) if good.size else 1.0
    return sens


def compose(method: str, n_units: int, steps: int, job_list, results: np.ndarray) -> np.ndarray:
    """Turn probe results into the (U, S) sensitivity array.

    Args:
        method: ``full``, ``factored``, ``chain`` or ``none``.
        job_list: :func:`jobs` of the method.
        results: (len(job_list), 2) float64, one row (d, e) per probe as :func:`probe_kinds` describes
            (``full``/``factored``: the final squared change Δ and the local squared error Σ‖δ‖² of the
            perturbed units).

    Returns:
        (U, S) float64, finite and >= 0 (see the module docstring for s = 0, S = 1 and zero local errors).

    Raises:
        ValueError: unknown method.
    """
    _check(method)
    U, S = n_units, steps
    if method == "none" or S < 2:
        return np.ones((U, S))

    def ratio(d, e):
        return d / e if e > 0 else math.nan

    if method == "full":
        sens = np.full((U, S), math.nan)
        for (targets, s), (d, e) in zip(job_list, results):
            sens[targets[0], s] = ratio(d, e)
    elif method == "chain":
        sens = np.full((U, S), math.nan)
        kappa = np.full(S, math.nan)
        anchor = np.full(U, math.nan)  # full[u, m]
        n_chain = (S - 2) + U * (S - 1)
        for j, ((targets, s), (d, e)) in enumerate(zip(job_list, results)):
            if j < S - 2:
                kappa[s] = ratio(d, e)
            elif j >= n_chain:
                anchor[targets[0]] = ratio(d, e)
        for (targets, s), (d, e) in zip(job_list[S - 2:n_chain], results[S - 2:n_chain]):
            sens[targets[0], s] = ratio(d, e) * (kappa[s] if s < S - 1 else 1.0)
        mid = max(1, S // 2)
        if mid <= S - 2:
            c_mid, known = sens[:, mid].copy(), np.isfinite(anchor)
            ok = known & np.isfinite(c_mid) & (c_mid > 0)
            sens[ok, :S - 1] *= (anchor[ok] / c_mid[ok])[:, None]
            sens[known, mid] = anchor[known]
    else:
        a = np.full(S, math.nan)  # joint probes: the first S - 1 jobs
        b = np.full(U, math.nan)  # per-unit probes at the middle step: the last U jobs
        mid = max(1, S // 2)
        for j, ((targets, s), (d, e)) in enumerate(zip(job_list, results)):
            if j < S - 1:
                a[s] = ratio(d, e)
            else:
                b[targets[0]] = ratio(d, e)
        a_mid = a[mid]
        if math.isfinite(a_mid) and a_mid > 0:
            sens = np.outer(b, a) / a_mid
        else:
            sens = np.tile(a, (U, 1))
    sens[:, 0] = sens[:, 1]
    return np.clip(_fill_undefined(sens), 0.0, None)


# ---- memory: what the probes keep -----------------------------------------------------------------------
class StepCache:
    """Every unit's raw output of one step (the step-(s−1) reuse values of the probes at step s).

    Attributes:
        step: the step the held features belong to (None: empty or incomplete).
        feats: ``{(unit index, call): tuple of tensors}`` (the call's rows, on the model's device); at most
            U × (calls per step) entries, all of one step.
    """

    def __init__(self):
        self.step: int | None = None
        self.feats: dict[tuple[int, int], tuple] = {}

    def clear(self) -> None:
        self.step = None
        self.feats = {}

    def put(self, index: int, call: int, feature) -> None:
        self.feats[(index, call)] = tuple(p.clone() for p in feature)

    def get(self, index: int, call: int):
        """The held feature of (unit, call).

        Raises:
            RuntimeError: not held (a probe asked for a step the cache was not filled for).
        """
        try:
            return self.feats[(index, call)]
        except KeyError:
            raise RuntimeError(f"sensitivity probe: no cached step-{self.step} output of unit {index} call {call}") from None


@dataclass
class ProbeState:
    """What the probes need from the reference run (nothing per (unit, step) but the (U, S) errors).

    Attributes:
        local: (U, S) float64, ``Σ_{n,b} ‖F(u,n,b,s) − F(u,n,b,s−1)‖²`` (0 at s = 0).
        latents: ``{step: scheduler output sample}`` of the reference run (tensors shaped as the pipeline's
            latents, on its device), recorded for ``chain`` only (else empty).
        cache: the :class:`StepCache` shared by the probes.
    """

    local: np.ndarray
    latents: dict = field(default_factory=dict)
    cache: StepCache = field(default_factory=StepCache)


class _RefHandler:
    """Computes every unit and folds the local errors; keeps only each unit's previous-step output."""

    def __init__(self, tracker: StepTracker, n_units: int):
        self.tracker = tracker
        self.local = np.zeros((n_units, tracker.S))
        self.prev: list[dict[int, tuple]] = [dict() for _ in range(n_units)]  # call -> the unit's last output
        self.last: list[tuple[int, int] | None] = [None] * n_units

    def begin_call(self, args, kwargs):
        self.tracker.on_call(args, kwargs)

    def end_call(self):
        pass

    def should_compute(self, index):
        return True

    def store(self, index, feature):
        info = self.tracker.info
        s, c, last = info.step, info.call, self.last[index]
        in_order = (last == (s, c - 1)) if c > 0 else (last is None and s == 0) or (last is not None and last[0] == s - 1)
        if not in_order or (s >= 1 and c not in self.prev[index]):
            raise RuntimeError("sensitivity reference run: unexpected call order")
        if s >= 1:  # same order of float64 additions as summing over calls, then parts
            for a, b in zip(feature, self.prev[index][c]):
                self.local[index, s] += float(((a.double() - b.double()) ** 2).sum())
        self.prev[index][c] = tuple(p.clone() for p in feature)
        self.last[index] = (s, c)

    def predict(self, index):
        raise RuntimeError("the sensitivity reference run never skips a unit")


class _ProbeHandler:
    """At step ``step`` the ``targets`` take their cached step-(step−1) output; all else computes. With
    ``fill`` the outputs of step ``step − 1`` are put into the cache."""

    def __init__(self, tracker: StepTracker, cache: StepCache, targets: frozenset, step: int, fill: bool):
        self.tracker = tracker
        self.cache = cache
        self.targets = targets
        self.step = step
        self.fill = fill

    def begin_call(self, args, kwargs):
        self.tracker.on_call(args, kwargs)

    def end_call(self):
        pass

    def should_compute(self, index):
        return not (self.tracker.info.step == self.step and index in self.targets)

    def store(self, index, feature):
        if self.fill and self.tracker.info.step == self.step - 1:
            self.cache.put(index, self.tracker.info.call, feature)

    def predict(self, index):
        return self.cache.get(index, self.tracker.info.call)


def _clone(out):
    """A copy of a transformer's return value (tensor, tuple, or diffusers ``BaseOutput``)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, dict):
        return type(out)(**{k: _clone(v) for k, v in out.items()})
    return out


class _Patch:
    """Replaces ``obj.<name>`` by an instance attribute for the ``with`` block (restored on exit, another
    library's instance patch included)."""

    _ABSENT = object()

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name

    def wrap(self, original):  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        self._previous = self.obj.__dict__.get(self.name, self._ABSENT)
        setattr(self.obj, self.name, self.wrap(getattr(self.obj, self.name)))
        return self

    def __exit__(self, *exc):
        if self._previous is self._ABSENT:
            self.obj.__dict__.pop(self.name, None)
        else:
            setattr(self.obj, self.name, self._previous)
        return False


class _TransformerTap(_Patch):
    """Patches the transformer's ``forward`` to record its return value per (step, call) or, before step
    ``replay_before``, to return the recorded value without running.

    The hook core's pre-hook has classified the call (``tracker.info``) before ``forward`` runs.
    """

    def __init__(self, transformer, tracker: StepTracker, outputs: dict, replay_before: int = 0, record: bool = False):
        super().__init__(transformer, "forward")
        self.tracker, self.outputs, self.replay_before, self.record = tracker, outputs, replay_before, record

    def wrap(self, original):
        def forward(*args, **kwargs):
            info = self.tracker.info
            key = (info.step, info.call)
            if info.step < self.replay_before:
                return _clone(self.outputs[key])
            out = original(*args, **kwargs)
            if self.record:
                self.outputs[key] = _clone(out)
            return out

        return forward


class _Stop(Exception):
    """Ends a ``latent`` probe after the scheduler step it measures."""


def _sample_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "prev_sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot read the sample from the scheduler's step() result ({type(out).__name__})")


class _SchedulerTap(_Patch):
    """Patches the scheduler's ``step``: records its output sample per transformer step (``record``) and
    captures the one of step ``at`` (then raises :class:`_Stop` when ``stop``)."""

    def __init__(self, scheduler, tracker: StepTracker, latents: dict, record: bool = False, at: int | None = None,
                 stop: bool = False):
        super().__init__(scheduler, "step")
        self.tracker, self.latents, self.record, self.at, self.stop = tracker, latents, record, at, stop
        self.captured: torch.Tensor | None = None

    def wrap(self, original):
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            s = self.tracker.info.step
            if self.record and s not in self.latents:
                self.latents[s] = _sample_of(out).detach().clone()
            if s == self.at and self.captured is None:
                self.captured = _sample_of(out).detach().clone()
                if self.stop:
                    raise _Stop
            return out

        return step


class _NoTap:
    captured = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- runs ------------------------------------------------------------------------------------------------
def reference_run(driver, switch, tracker: StepTracker, n_units: int, conditions: Sequence, seeds: Sequence[int],
                  steps: int, guidance: float, cfg: str, latents: bool = False):
    """Run the sensitivity samples uncached, keeping what the probes need.

    Args:
        latents: also record the scheduler's output sample of every step (``chain``).

    Returns:
        ``(state, outputs, images)``: the :class:`ProbeState` (local errors (U, S) float64, latents, an
        empty cache), the transformer's return values by ``(step, call)``, and the reference images,
        float32 (N, C, H, W) on CPU.

    Raises:
        ValueError: the pipeline's calls do not follow the tracker's schedule (:class:`StepTracker`).
        RuntimeError: unit calls out of step order.
    """
    handler = _RefHandler(tracker, n_units)
    outputs: dict = {}
    state = ProbeState(local=handler.local)
    sched = _SchedulerTap(driver.scheduler, tracker, state.latents, record=True) if latents else _NoTap()
    with sched:
        images = _tracked_run(driver, switch, handler, _TransformerTap(driver.transformer, tracker, outputs, record=True),
                              tracker, conditions, seeds, steps, guidance, cfg)
    return state, outputs, images


def _tracked_run(driver, switch, handler, tap, tracker: StepTracker, conditions, seeds, steps: int, guidance: float,
                 cfg: str) -> torch.Tensor:
    """One sampling run with ``handler`` on the units and ``tap`` on the transformer; returns the images."""
    switch.target = handler
    try:
        with tap:
            tracker.start_run(len(conditions))
            images = driver.generate(conditions, seeds, steps=steps, guidance=guidance, cfg=cfg)
            tracker.finish_run()
    finally:
        switch.target = None
    return images


def _probe(driver, switch, tracker: StepTracker, state: ProbeState, outputs: dict, ref_images: torch.Tensor,
           targets: tuple[int, ...], step: int, kind: str, conditions, seeds, steps: int, guidance: float,
           cfg: str) -> tuple[float, float]:
    """One probe (see :func:`probe_kinds`); returns ``(Σ‖x − x_ref‖², ‖Δx_{step+1}‖²)``, NaN where the kind
    does not measure it."""
    cache = state.cache
    fill = cache.step != step - 1
    if fill:
        cache.clear()
    handler = _ProbeHandler(tracker, cache, frozenset(targets), step, fill)
    tap = _TransformerTap(driver.transformer, tracker, outputs, replay_before=step - 1 if fill else step)
    sched = (_SchedulerTap(driver.scheduler, tracker, {}, at=step, stop=kind == "latent") if kind != "final"
             else _NoTap())
    final = math.nan
    try:
        with sched:
            images = _tracked_run(driver, switch, handler, tap, tracker, conditions, seeds, steps, guidance, cfg)
        final = float(((images.double() - ref_images.double()) ** 2).sum())
    except _Stop:
        pass
    except BaseException:
        cache.clear()  # possibly incomplete
        raise
    if fill:
        cache.step = step - 1
    latent = math.nan
    if kind != "final":
        if sched.captured is None:
            raise RuntimeError(f"sensitivity probe: the scheduler's step() was not called at step {step}")
        latent = float(((sched.captured.double() - state.latents[step].double()) ** 2).sum())
    return final, latent


def run_probe(driver, switch, tracker: StepTracker, feats: ProbeState, outputs: dict, ref_images: torch.Tensor,
              targets: tuple[int, ...], step: int, conditions, seeds, steps: int, guidance: float, cfg: str) -> float:
    """One probe run to the end: the final squared image change when ``targets`` reuse their step-(step−1)
    output at ``step``; the transformer calls of the steps before are replayed from ``outputs`` (not run),
    step − 1 runs live when ``feats.cache`` does not hold its features.

    Args:
        feats: the :class:`ProbeState` of :func:`reference_run`.

    Returns:
        Σ ‖x − x_ref‖² over the samples (float).
    """
    return _probe(driver, switch, tracker, feats, outputs, ref_images, targets, step, "final", conditions, seeds,
                  steps, guidance, cfg)[0]


def measure(driver, switch, make_tracker: Callable[[], StepTracker], n_units: int, method: str, conditions, seeds,
            steps: int, guidance: float, cfg: str, results: np.ndarray, done: np.ndarray,
            mine: Callable[[int], bool] = lambda j: True, on_probe: Callable[[int], None] | None = None,
            progress: bool = False, joint: tuple[int, ...] | None = None) -> None:
    """Run the probes of ``method`` that are ``mine`` and not ``done``, filling ``results`` in place.

    The probes run grouped by step (their indices, and so ``results``, keep the order of :func:`jobs`).

    Args:
        driver: the :class:`~cachec.loading.Driver` (hooks already installed with ``switch``).
        switch: the installed :class:`~cachec.calibrate.recorder.Switch`.
        make_tracker: returns a fresh :class:`StepTracker` that knows the schedule.
        results: (len(jobs), 2) float64, written per finished probe: (d, e) of :func:`probe_kinds`.
        done: (len(jobs),) bool, set per finished probe.
        mine: which probe indices this process runs (distributed runs split them).
        on_probe: called with the probe index after each finished probe (checkpointing).
        progress: show a tqdm bar.
        joint: the units of the joint probes (:func:`jobs`).

    Raises:
        ValueError: unknown method, or a pipeline whose calls leave the schedule.
    """
    job_list = jobs(method, n_units, steps, joint)
    kinds = probe_kinds(method, n_units, steps)
    todo = sorted((j for j in range(len(job_list)) if mine(j) and not done[j]), key=lambda j: (job_list[j][1], j))
    if not todo:
        return
    state, outputs, ref = reference_run(driver, switch, make_tracker(), n_units, conditions, seeds, steps, guidance,
                                        cfg, latents="joint" in kinds or "latent" in kinds)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"sensitivity ({method})", unit="probe", disable=not progress, dynamic_ncols=True)
    try:
        for j in todo:
            targets, s = job_list[j]
            final, latent = _probe(driver, switch, make_tracker(), state, outputs, ref, targets, s, kinds[j],
                                   conditions, seeds, steps, guidance, cfg)
            local = float(state.local[list(targets), s].sum())
            results[j] = {"final": (final, local), "latent": (latent, local), "joint": (final, latent)}[kinds[j]]
            done[j] = True
            bar.update(1)
            if on_probe is not None:
                on_probe(j)
    finally:
        bar.close()
