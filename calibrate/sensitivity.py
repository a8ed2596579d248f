"""Sensitivity: how much the final image moves per unit of local feature error (``sensitivity`` (U, S)).

Definition (docs/calibration.md): for unit u and step s ≥ 1, replace u's output at step s alone by its
reuse value F(u, s−1) — exactly what a plan's plain reuse does — and run the rest of the trajectory:

    sensitivity[u, s] = Σ_n ‖x_n − x_n^ref‖²  /  Σ_{n,b} ‖F(u,n,b,s) − F(u,n,b,s−1)‖²

x_n is the image of sample n as ``Driver.generate`` returns it (float32 in [0, 1], after VAE decoding
and clamping: the space the quality metrics compare in), summed over the sensitivity samples n and the
guidance branches b. ``sensitivity[u, 0] = sensitivity[u, 1]`` (step 0 has no reuse value); with S = 1
the array is ones. Where the local error is exactly zero the ratio is undefined: it is replaced by the
median of the defined values of the same step (or of all steps; 1.0 if none).

Cost: a recording *reference run* of the sensitivity samples keeps every unit's raw output and every
transformer output at every step (the hooks are installed once, see
:class:`~cachec.calibrate.recorder.Switch`). Each probe then re-runs the unmodified pipeline from the
same seeds, but the transformer calls of the steps before s return the recorded outputs without running
(the scheduler then reproduces the reference latent at step s exactly), so a probe at step s costs S − s
transformer steps; the perturbed units are not computed at step s.

Methods:

- ``full``: one probe per (u, s), s = 1..S−1: U·(S−1) probes, ≈ U·S²/2 full steps.
- ``factored``: one joint probe per step (all units reuse at step s: a_s = Δ/Σ_u‖δ_u‖²) and one probe
  per unit at the middle step m = max(1, S // 2) (b_u); ``sensitivity[u, s] = a_s · b_u / a_m``.
  S − 1 + U probes, ≈ S²/2 + U·S/2 full steps.
- ``none``: ones, nothing is run.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from .recorder import StepTracker

METHODS = ("full", "factored", "none")


class _RefHandler:
    """Computes every unit and keeps a clone of each raw feature: ``feats[u][s][call]``."""

    def __init__(self, tracker: StepTracker, n_units: int):
        self.tracker = tracker
        self.feats: list[list[list]] = [[[] for _ in range(tracker.S)] for _ in range(n_units)]

    def begin_call(self, args, kwargs):
        self.tracker.on_call(args, kwargs)

    def end_call(self):
        pass

    def should_compute(self, index):
        return True

    def store(self, index, feature):
        info = self.tracker.info
        slot = self.feats[index][info.step]
        if len(slot) != info.call:
            raise RuntimeError("sensitivity reference run: unexpected call order")
        slot.append(tuple(p.clone() for p in feature))

    def predict(self, index):
        raise RuntimeError("the sensitivity reference run never skips a unit")


class _ProbeHandler:
    """At step ``step`` the ``targets`` reuse their step-(step−1) reference output; all else computes."""

    def __init__(self, tracker: StepTracker, feats, targets: frozenset, step: int):
        self.tracker = tracker
        self.feats = feats
        self.targets = targets
        self.step = step

    def begin_call(self, args, kwargs):
        self.tracker.on_call(args, kwargs)

    def end_call(self):
        pass

    def should_compute(self, index):
        return not (self.tracker.info.step == self.step and index in self.targets)

    def store(self, index, feature):
        pass

    def predict(self, index):
        return self.feats[index][self.step - 1][self.tracker.info.call]


def _clone(out):
    """A copy of a transformer's return value (tensor, tuple, or diffusers ``BaseOutput``)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, dict):
        return type(out)(**{k: _clone(v) for k, v in out.items()})
    return out


class _TransformerTap:
    """Patches the transformer's ``forward`` (instance attribute, restored on exit) to record its return
    value per (step, call) or, before step ``replay_before``, to return the recorded value without running.

    The hook core's pre-hook has classified the call (``tracker.info``) before ``forward`` runs.
    """

    def __init__(self, transformer, tracker: StepTracker, outputs: dict, replay_before: int = 0, record: bool = False):
        self.transformer = transformer
        self.tracker = tracker
        self.outputs = outputs
        self.replay_before = replay_before
        self.record = record

    def __enter__(self):
        original = self.transformer.forward

        def forward(*args, **kwargs):
            info = self.tracker.info
            key = (info.step, info.call)
            if info.step < self.replay_before:
                return _clone(self.outputs[key])
            out = original(*args, **kwargs)
            if self.record:
                self.outputs[key] = _clone(out)
            return out

        self.transformer.forward = forward
        return self

    def __exit__(self, *exc):
        if "forward" in self.transformer.__dict__:
            del self.transformer.forward
        return False


def jobs(method: str, n_units: int, steps: int) -> list[tuple[tuple[int, ...], int]]:
    """The probes of a method: ``[(unit indices perturbed together, step), ...]`` in a fixed order.

    Raises:
        ValueError: unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none" or steps < 2:
        return []
    if method == "full":
        return [((u,), s) for s in range(1, steps) for u in range(n_units)]
    mid = max(1, steps // 2)
    return [(tuple(range(n_units)), s) for s in range(1, steps)] + [((u,), mid) for u in range(n_units)]


def local_errors(feats, n_units: int, steps: int) -> np.ndarray:
    """(U, S) float64: ``Σ_{n,b} ‖F(u,n,b,s) − F(u,n,b,s−1)‖²`` from the reference features (0 at s = 0)."""
    out = np.zeros((n_units, steps))
    for u in range(n_units):
        for s in range(1, steps):
            tot = 0.0
            for cur, prev in zip(feats[u][s], feats[u][s - 1]):
                for a, b in zip(cur, prev):
                    tot += float(((a.double() - b.double()) ** 2).sum())
            out[u, s] = tot
    return out


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
        method: ``full``, ``factored`` or ``none``.
        job_list: :func:`jobs` of the method.
        results: (len(job_list), 2) float64: per probe the final squared change Δ and the local squared
            error Σ‖δ‖² of the perturbed units.

    Returns:
        (U, S) float64, finite and >= 0 (see the module docstring for s = 0, S = 1 and zero local errors).
    """
    U, S = n_units, steps
    if method == "none" or S < 2:
        return np.ones((U, S))

    def ratio(d, e):
        return d / e if e > 0 else math.nan

    if method == "full":
        sens = np.full((U, S), math.nan)
        for (targets, s), (d, e) in zip(job_list, results):
            sens[targets[0], s] = ratio(d, e)
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


def reference_run(driver, switch, tracker: StepTracker, n_units: int, conditions: Sequence, seeds: Sequence[int],
                  steps: int, guidance: float, cfg: str):
    """Run the sensitivity samples uncached, keeping every raw unit output and transformer output.

    Returns:
        ``(feats, outputs, images)``: ``feats[u][s][call]`` tuples of tensors (the call's rows), the
        transformer's return values by ``(step, call)``, and the reference images, float32 (N, C, H, W)
        on CPU.
    """
    handler = _RefHandler(tracker, n_units)
    outputs: dict = {}
    images = _tracked_run(driver, switch, handler, _TransformerTap(driver.transformer, tracker, outputs, record=True),
                          tracker, conditions, seeds, steps, guidance, cfg)
    return handler.feats, outputs, images


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


def run_probe(driver, switch, tracker: StepTracker, feats, outputs: dict, ref_images: torch.Tensor,
              targets: tuple[int, ...], step: int, conditions, seeds, steps: int, guidance: float, cfg: str) -> float:
    """One probe: the final squared image change when ``targets`` reuse their step-(step−1) output at
    ``step``; the transformer calls of the steps before are replayed from ``outputs`` (not run).

    Returns:
        Σ ‖x − x_ref‖² over the samples (float).
    """
    images = _tracked_run(driver, switch, _ProbeHandler(tracker, feats, frozenset(targets), step),
                          _TransformerTap(driver.transformer, tracker, outputs, replay_before=step),
                          tracker, conditions, seeds, steps, guidance, cfg)
    return float(((images.double() - ref_images.double()) ** 2).sum())


def measure(driver, switch, make_tracker: Callable[[], StepTracker], n_units: int, method: str, conditions, seeds,
            steps: int, guidance: float, cfg: str, results: np.ndarray, done: np.ndarray,
            mine: Callable[[int], bool] = lambda j: True, on_probe: Callable[[int], None] | None = None,
            progress: bool = False) -> None:
    """Run the probes of ``method`` that are ``mine`` and not ``done``, filling ``results`` in place.

    Args:
        driver: the :class:`~cachec.loading.Driver` (hooks already installed with ``switch``).
        switch: the installed :class:`~cachec.calibrate.recorder.Switch`.
        make_tracker: returns a fresh :class:`StepTracker` that knows the schedule.
        results: (len(jobs), 2) float64, written per finished probe: (Δ, Σ‖δ‖²).
        done: (len(jobs),) bool, set per finished probe.
        mine: which probe indices this process runs (distributed runs split them).
        on_probe: called with the probe index after each finished probe (checkpointing).
        progress: show a tqdm bar.
    """
    job_list = jobs(method, n_units, steps)
    todo = [j for j in range(len(job_list)) if mine(j) and not done[j]]
    if not todo:
        return
    feats, outputs, ref = reference_run(driver, switch, make_tracker(), n_units, conditions, seeds, steps, guidance, cfg)
    local = local_errors(feats, n_units, steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"sensitivity ({method})", unit="probe", disable=not progress, dynamic_ncols=True)
    try:
        for j in todo:
            targets, s = job_list[j]
            d = run_probe(driver, switch, make_tracker(), feats, outputs, ref, targets, s, conditions, seeds, steps,
                          guidance, cfg)
            results[j] = (d, float(local[list(targets), s].sum()))
            done[j] = True
            bar.update(1)
            if on_probe is not None:
                on_probe(j)
    finally:
        bar.close()
