"""The sampling loop: one ordinary ``Driver.generate`` call per batch, recorded and folded into the sums.

During a call the recorder (hooks installed once by the caller) streams every unit's output into a
:class:`~.streaming.BatchRecord` (sketches and EOC group sums, never the trajectory); after the call the
record is folded into float64 sums (:class:`~.stats.Accumulators`), inline or on a worker thread while
the next batch samples. The first batch also fixes the run's structure
(timestep schedule, guidance layout, unit shapes, FLOPs). A batch counts as completed only once its fold
has finished; the partial state is written after a completed batch when ``checkpoint_every`` seconds
have passed, and when the loop is interrupted.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cachec.runtime.io import to_jsonable

from .checkpoint import RunState
from .costs import FLOP_COUNTER, count_unit_flops
from .format import eoc_group_layout, sketch_dim
from .job import CalibrationJob, RunContext
from .recorder import Recorder
from .streaming import BatchRecord


def _sigmas(scheduler, steps: int) -> list[float] | None:
    """The scheduler's first ``steps`` sigmas as floats, or None (none, too few, or not finite)."""
    sig = getattr(scheduler, "sigmas", None)
    if sig is None:
        return None
    sig = [float(x) for x in torch.as_tensor(sig).reshape(-1).tolist()]
    if len(sig) < steps or not all(math.isfinite(x) for x in sig[:steps]):
        return None
    return sig[:steps]


def structure(driver, units, recorder: Recorder, steps: int, flops: tuple[list[float], float, float],
              sketch: int = 0, eoc_prior: str = "token") -> dict:
    """The facts the first batch fixes (stored in the partial state, copied into the header).

    Args:
        sketch: the run's sketch dimension r (0: exact Grams); ``eoc_prior``: its EOC grouping.
    Returns:
        ``{"steps", "timesteps", "sigmas", "mode", "branches", "scheduler": {"class", "config"}, "units":
        [{name, kind, mode, shapes, numel, sketch_dim, eoc_groups}], "unit_flops", "flops": {full_step,
        fixed_step, counter}}``.
    """
    tracker = recorder.tracker
    unit_flops, full, fixed = flops

    def entry(i: int, u) -> dict:
        shapes = [list(s) for s in recorder.shapes[i]]
        numel = int(sum(math.prod(s) for s in recorder.shapes[i]))
        groups = sum(g for _, g, _ in eoc_group_layout(shapes, eoc_prior))
        return {"name": u.name, "kind": u.kind, "mode": u.mode, "shapes": shapes, "numel": numel,
                "sketch_dim": sketch_dim(numel, sketch), "eoc_groups": int(groups)}

    return {
        "steps": steps,
        "timesteps": [float(t) for t in tracker.schedule],
        "sigmas": _sigmas(driver.scheduler, steps),
        "mode": tracker.mode,
        "branches": tracker.branches,
        "scheduler": {"class": type(driver.scheduler).__name__, "config": to_jsonable(dict(driver.scheduler.config))},
        "units": [entry(i, u) for i, u in enumerate(units)],
        "unit_flops": unit_flops,
        "flops": {"full_step": full, "fixed_step": fixed, "counter": FLOP_COUNTER},
    }


class Folder:
    """Folds a recorded batch into the sums — on a worker thread while the next batch samples (CPU), or
    inline. One batch at a time and in batch order, so the sums are the same either way; the batch is
    *committed* (counted, marked completed) only when its fold has finished.

    Args:
        state: the run's state (its ``acc`` must be allocated before the first :meth:`submit`).
        n_units: U.
        overlap: fold on a worker thread.
    """

    def __init__(self, state: RunState, n_units: int, overlap: bool):
        self.state = state
        self.n_units = n_units
        self.pool = None
        if overlap:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachec-fold")
        self.pending = None

    def _fold(self, record: BatchRecord, first_sample: int) -> None:
        state = self.state
        with torch.no_grad():
            for u in range(self.n_units):
                for branch in range(state.structure["branches"]):
                    state.acc.add(u, branch, record.y[u][branch], first_sample)
                state.acc.add_eoc(u, record.prior[u], record.q[u], record.m[u])

    def submit(self, batch: int, idx: range, record: BatchRecord, lat_sum, lat_count) -> None:
        """Start folding batch ``batch`` (samples ``idx``, streamed into ``record``)."""
        self.state.consistent = False
        if self.pool is not None:
            future = self.pool.submit(self._fold, record, idx.start)
        else:
            self._fold(record, idx.start)
            future = None
        self.pending = (future, batch, idx, list(lat_sum), list(lat_count))

    def wait(self) -> bool:
        """Finish and commit the pending batch (re-raising its error). Returns whether one was committed."""
        if self.pending is None:
            return False
        future, batch, idx, lat_sum, lat_count = self.pending
        self.pending = None
        if future is not None:
            future.result()
        state = self.state
        state.acc.count(idx.start, len(idx))
        state.completed.append(batch)
        state.lat_sum += np.asarray(lat_sum)
        state.lat_count += np.asarray(lat_count)
        state.consistent = True
        return True

    def close(self) -> None:
        """Stop the worker thread (after the pending fold)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def sample_batches(job: CalibrationJob, ctx: RunContext, state: RunState, switch, recorder: Recorder, target,
                   todo: list[int], n_mine: int, partial, show: bool) -> bool:
    """Sample, record and fold the batches ``todo`` in order, checkpointing as configured.

    Args:
        job: the run's settings.
        ctx: its process context.
        state: the run's state (restored or fresh); its structure is fixed by the first batch if unset.
        switch: the installed :class:`~.recorder.Switch`; its target is ``target`` during each call.
        recorder: the :class:`~.recorder.Recorder` (its tracker knows the schedule once fixed).
        target: ``recorder`` or a :class:`~.recorder.ShadowRecorder` around it (calibration along a plan).
        todo: batch indices still to run; ``n_mine`` the number of batches of this process in all.
        partial: the partial-state file.
        show: show a tqdm progress bar.
    Returns:
        Whether committed batches have not been saved to ``partial`` yet.
    Raises:
        Whatever sampling or folding raises (e.g. ValueError for calls that do not follow the schedule,
        KeyboardInterrupt); the consistent state is saved to ``partial`` first.
    """
    from tqdm.auto import tqdm

    driver, units, steps = ctx.driver, ctx.units, job.steps
    folder = Folder(state, len(units), overlap=bool(job.overlap))
    # per-batch records, reused between batches; two when a fold overlaps the next batch
    records = [BatchRecord(steps, job.eoc_lags, job.eoc_prior, job.sketch_dim, job.sketch_seed, job.eoc_sample)
               for _ in range(2 if folder.pool is not None else 1)]
    last_save = time.monotonic()
    unsaved = False
    done_before = len(state.completed)
    bar = tqdm(total=n_mine * steps, initial=(n_mine - len(todo)) * steps, desc="calibrating", unit="step",
               disable=not show, dynamic_ncols=True)
    bar.set_postfix(batches=f"{n_mine - len(todo)}/{n_mine}")
    recorder.on_step = lambda: bar.update(1)

    def committed() -> None:
        nonlocal unsaved, last_save
        unsaved = True
        bar.set_postfix(batches=f"{n_mine - len(todo) + len(state.completed) - done_before}/{n_mine}")
        if time.monotonic() - last_save >= job.checkpoint_every:
            state.save(partial)
            last_save, unsaved = time.monotonic(), False

    conds, seeds = job.sample_conditions, job.sample_seeds
    try:
        for i, b in enumerate(todo):
            idx = job.batch(b)
            first = state.structure is None
            recorder.record = records[i % len(records)]
            recorder.timing = not state.lat_count.any() and i == 0
            recorder.capture = first
            recorder.captured = None
            recorder.lat_sum = [0.0] * len(units)
            recorder.lat_count = [0] * len(units)
            switch.target = target
            recorder.start_run(len(idx), idx.start)
            with torch.no_grad():
                driver.generate([conds[n] for n in idx], [seeds[n] for n in idx], steps=steps,
                                guidance=job.guidance, cfg=job.cfg)
            recorder.finish_run()
            switch.target = None
            if first:
                flops = count_unit_flops(ctx.transformer, units, recorder.captured)
                recorder.captured = None
                state.structure = structure(driver, units, recorder, steps, flops, job.sketch_dim, job.eoc_prior)
                state.allocate(next(iter(recorder.record.y[0].values())).device)
            if folder.wait():  # the previous batch, folded while this one was sampled
                committed()
            folder.submit(b, idx, recorder.record, recorder.lat_sum, recorder.lat_count)
        if folder.wait():
            committed()
    except BaseException:
        switch.target = None
        try:
            if folder.wait():
                unsaved = True
        except BaseException:  # the fold failed: the sums are not consistent, save nothing
            pass
        if unsaved and state.consistent and state.structure is not None:
            try:
                state.save(partial)
            except Exception:  # never hide the original error
                pass
        raise
    finally:
        folder.close()
        bar.close()
        recorder.record = None  # free the per-batch buffers
    return unsaved
