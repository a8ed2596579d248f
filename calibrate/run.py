"""``calibrate()``: uncached sampling that records the statistics of docs/calibration-format.md.

Flow of one call:

1. validate the inputs (before any work: output folder, steps, conditions, shard, options);
2. the global sample order (``conditions × samples_per_condition``, condition-major, seeds ``seed + n``) is
   cut into fixed batches of ``batch_size`` samples; ``shard=(i, n)`` keeps batches ``b % n == i``; under
   ``torchrun`` (``WORLD_SIZE > 1``) rank r of W takes every W-th of those;
3. hooks are installed once on the transformer (:func:`cachec.runtime.hooks.install`); each batch is an
   ordinary ``Driver.generate`` call during which the recorder keeps every unit's float32 trajectory;
   after the call the trajectories are folded into float64 sums (:class:`~.stats.Accumulators`). The
   first batch also fixes the timestep schedule, the guidance layout and the unit shapes, measures unit
   latencies (steps >= 1) and counts FLOPs on its first transformer call;
4. a partial state (``OUT.partial.safetensors``: sums, completed batches, configuration hash) is written
   atomically after a batch when ``checkpoint_every`` seconds have passed since the last one (0: after
   every batch), and when the loop is interrupted by an exception. Re-running the same call resumes;
   the completed batches are folded in the same order, so the result is bit-identical to an
   uninterrupted run (timing fields — ``created``, ``unit_latency_s``, ``sensitivity.seconds`` — aside);
5. distributed ranks all-reduce the sums; the sensitivity probes (:mod:`.sensitivity`) run on shard 0
   only, split over the ranks; rank 0 writes the file atomically and the partial files are removed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cachec import __version__
from cachec.runtime.fingerprint import weights_fingerprint
from cachec.runtime.hooks import batch_size_of, install
from cachec.runtime.units import find_units, unwrap

from . import sensitivity as sens_mod
from .calfile import FORMAT, FORMAT_VERSION, HEADER_KEYS, atomic_save, write_calibration
from .conditions import batch_samples, num_batches, sample_plan
from .recorder import Recorder, ShadowRecorder, StepTracker, Switch, batched_cond_first
from .stats import Accumulators

PARTIAL_KEY = "cachec_partial"
FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode (SDPA math backend)"


def parse_shard(text: str | tuple | None) -> tuple[int, int]:
    """Parse ``"i/n"`` (0 <= i < n) or pass an ``(i, n)`` tuple through; None means ``(0, 1)``.

    Raises:
        ValueError: malformed text or i out of range.
    """
    if text is None:
        return (0, 1)
    if isinstance(text, str):
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"cannot parse shard {text!r}: expected i/n, e.g. 0/4") from None
    else:
        i, n = (int(x) for x in text)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is out of range: expected 0 <= i < n")
    return i, n


def partial_paths(output: str | Path, rank: int = 0, world: int = 1) -> tuple[Path, Path]:
    """The partial-state files of an output: ``(batches, sensitivity)``.

    ``calib.safetensors`` → ``calib.partial.safetensors`` and ``calib.partial-sensitivity.safetensors``
    (``.rank{r}`` before the suffix when running distributed).
    """
    out = Path(output)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    tag = f".rank{rank}" if world > 1 else ""
    return out.with_name(f"{stem}.partial{tag}.safetensors"), out.with_name(f"{stem}.partial-sensitivity{tag}.safetensors")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _jsonable(obj):
    """Scheduler configs → plain JSON (tuples → lists, numpy/torch scalars → numbers, others → str)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (np.generic, torch.Tensor)) and np.ndim(obj) == 0:
        return _jsonable(obj.item())
    return str(obj)


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _config_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, list) and isinstance(b, list):
                diffs.append(f"{key}: {len(a)} vs {len(b)} entries" if len(a) != len(b) else f"{key}: differ")
            else:
                diffs.append(f"{key}: {a!r} → {b!r}")
    return ", ".join(diffs)


# ---------------------------------------------------------------------------------------------------------
class _State:
    """Everything a run accumulates, saved to and restored from the partial file."""

    def __init__(self, config: dict, units):
        self.config = config
        self.hash = _config_hash(config)
        self.names = [u.name for u in units]
        self.created = _utc_now()
        self.completed: list[int] = []
        self.structure: dict | None = None  # fixed by the first batch
        self.acc: Accumulators | None = None
        self.lat_sum = np.zeros(len(units))
        self.lat_count = np.zeros(len(units))
        self.consistent = True  # False while a batch is being folded in
        self.reduced = False  # True after the distributed all-reduce: never saved again

    def allocate(self, device) -> None:
        st = self.structure
        self.acc = Accumulators([u["numel"] for u in st["units"]], st["steps"], st["branches"], self.config["eoc_lags"], device)

    def save(self, path: Path) -> None:
        tensors = self.acc.tensors(self.names) if self.acc is not None else {}
        tensors["state/lat_sum"] = torch.from_numpy(self.lat_sum.copy())
        tensors["state/lat_count"] = torch.from_numpy(self.lat_count.copy())
        meta = {
            "config": self.config, "config_hash": self.hash, "created": self.created, "completed": self.completed,
            "structure": self.structure, "samples": self.acc.samples if self.acc is not None else [0, 0],
        }
        atomic_save(tensors, path, {PARTIAL_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, config: dict, units, device) -> "_State":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(PARTIAL_KEY)
        if meta_raw is None:
            raise ValueError(f"{path} is not a cachec partial calibration state; delete it or pass restart=True (--restart)")
        meta = json.loads(meta_raw)
        state = cls(config, units)
        if meta["config_hash"] != state.hash:
            raise ValueError(
                f"a partial calibration at {path} was made with a different configuration "
                f"({_config_difference(meta['config'], config)}); run the same command to resume it, "
                "or pass restart=True (--restart) to discard it"
            )
        tensors = load_file(str(path))
        state.created = meta["created"]
        state.completed = [int(b) for b in meta["completed"]]
        state.structure = meta["structure"]
        state.lat_sum = tensors["state/lat_sum"].numpy().copy()
        state.lat_count = tensors["state/lat_count"].numpy().copy()
        if state.structure is not None:
            state.allocate(device)
            state.acc.load(state.names, tensors, meta["samples"])
        return state


# ---------------------------------------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, created_here): initialise ``torch.distributed`` from the environment when
    ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); an already initialised group is used as is."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _reduce(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def _count_unit_flops(transformer, units, captured) -> tuple[list[float], float, float]:
    """FLOPs of one call for one sample of one branch: per unit, full forward, fixed (never-cached) part.

    Runs the captured first transformer call once more under :func:`cachec.runtime.flops.count_flops` (FLOP
    counts depend on shapes only) and divides by its batch rows.
    """
    from cachec.runtime.flops import count_flops, relative_module_flops

    args, kwargs = captured
    rows = batch_size_of(args, kwargs)
    with torch.no_grad():
        _, total, per_module = count_flops(transformer, *args, **kwargs)
    rel = relative_module_flops(per_module, unwrap(transformer))
    unit = [rel.get(u.name, 0) / rows for u in units]
    full = rel.get("", total) / rows
    return unit, float(full), float(full - sum(unit))


def _sigmas(scheduler, steps: int):
    sig = getattr(scheduler, "sigmas", None)
    if sig is None:
        return None
    sig = [float(x) for x in torch.as_tensor(sig).reshape(-1).tolist()]
    if len(sig) < steps or not all(math.isfinite(x) for x in sig[:steps]):
        return None
    return sig[:steps]


def _structure(driver, units, recorder: Recorder, steps: int, flops) -> dict:
    tracker = recorder.tracker
    unit_flops, full, fixed = flops
    return {
        "steps": steps,
        "timesteps": [float(t) for t in tracker.schedule],
        "sigmas": _sigmas(driver.scheduler, steps),
        "mode": tracker.mode,
        "branches": tracker.branches,
        "scheduler": {"class": type(driver.scheduler).__name__, "config": _jsonable(dict(driver.scheduler.config))},
        "units": [
            {"name": u.name, "kind": u.kind, "mode": u.mode, "shapes": [list(s) for s in recorder.shapes[i]],
             "numel": int(sum(math.prod(s) for s in recorder.shapes[i]))}
            for i, u in enumerate(units)
        ],
        "unit_flops": unit_flops,
        "flops": {"full_step": full, "fixed_step": fixed, "counter": FLOP_COUNTER},
    }


class _Folder:
    """Folds a recorded batch into the sums — on a worker thread while the next batch samples (CPU), or
    inline. One batch at a time and in batch order, so the sums are the same either way; the batch is
    *committed* (counted, marked completed) only when its fold has finished."""

    def __init__(self, state: _State, n_units: int, overlap: bool):
        self.state = state
        self.n_units = n_units
        self.pool = None
        if overlap:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachec-fold")
        self.pending = None

    def _fold(self, traj, first_sample: int) -> None:
        state = self.state
        with torch.no_grad():
            for u in range(self.n_units):
                for branch in range(state.structure["branches"]):
                    state.acc.add(u, branch, traj[u][branch], first_sample)

    def submit(self, batch: int, idx: range, traj, lat_sum, lat_count) -> None:
        self.state.consistent = False
        if self.pool is not None:
            future = self.pool.submit(self._fold, traj, idx.start)
        else:
            self._fold(traj, idx.start)
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
        if self.pool is not None:
            self.pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------------------
def calibrate(
    driver,
    conditions: Sequence,
    *,
    output: str | Path,
    samples_per_condition: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    shard: tuple[int, int] | str = (0, 1),
    eoc_lags: int = 2,
    sensitivity: str = "full",
    sensitivity_samples: int = 4,
    progress: bool = True,
    cfg: str = "batched",
    restart: bool = False,
    checkpoint_every: float = 30.0,
    overlap: bool = False,
    along=None,
    sensitivity_from: str | Path | None = None,
) -> Path:
    """Run uncached sampling over ``conditions`` and write the calibration statistics file.

    With ``along`` the sampling follows a plan instead (trajectory calibration, ARCHITECTURE.md lesson 6):
    the plan is executed, but every unit is also computed in shadow and recorded, so the statistics price
    predictors on the trajectory the plan really produces (anchors computed on already-perturbed inputs).
    Re-planning from such a file and repeating is the refinement loop of ``cachec compile``.

    Args:
        driver: a :class:`cachec.loading.Driver` (``load_model(...)``).
        conditions: class labels (ints) or prompts (str), as the model takes them.
        output: the ``.safetensors`` file to write; its folder must exist.
        samples_per_condition: images per condition (global sample n uses ``conditions[n // spc]``).
        steps: sampling steps S (default: the model's).
        guidance: CFG scale (default: the model's); ``<= 1`` records a single branch.
        seed: sample n uses seed ``seed + n``.
        batch_size: samples per pipeline call (memory ∝ batch_size × units × S × feature size, float32).
        shard: ``(i, n)`` or ``"i/n"``: this process calibrates batches ``b % n == i``; merge the shard files
            with :func:`cachec.calibrate.merge`.
        eoc_lags: K, lags of the EOC inner products.
        sensitivity: ``"full"``, ``"factored"`` or ``"none"`` (docs/calibration.md).
        sensitivity_samples: samples used by the sensitivity probes (the first ones of the sample order).
        progress: show tqdm progress bars (rank 0 only).
        cfg: ``"batched"`` or ``"split"`` guidance calls (split only on the reference pipelines).
        restart: discard a partial state of a different configuration instead of refusing.
        checkpoint_every: seconds between partial-state writes (0: after every batch).
        overlap: fold a batch's statistics on a worker thread while the next batch samples (same result;
            twice the trajectory memory). Helps on CPU when cores are idle during sampling (e.g. with
            ``torch.set_num_threads`` below the core count); on a busy machine it only adds contention.
        along: a plan (:class:`cachec.runtime.plan.Plan` or YAML path) for this model, steps and guidance;
            the samples follow its cached trajectory. Needs ``sensitivity="none"`` (probes measure the
            uncached trajectory; take them from the uncached calibration with ``sensitivity_from``).
        sensitivity_from: a calibration file of the same model, units and timesteps whose ``sensitivity``
            (and its header entry) is copied instead of measuring it (``sensitivity`` must be ``"none"``).

    Returns:
        ``Path(output)`` (on every rank).

    Raises:
        FileNotFoundError: the output folder is missing.
        ValueError: non-positive steps/batch size/samples, empty or invalid conditions, bad shard, unknown
            sensitivity method or cfg mode, an unsupported model, a partial state of another configuration,
            or a pipeline whose calls do not follow its own schedule; ``along``/``sensitivity_from`` for other
            steps, guidance, units or weights, or combined with measured sensitivity.
    """
    # ---- validation, before any work -----------------------------------------------------------------
    output = Path(output)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(output.parent)!r} does not exist")
    if output.is_dir():
        raise ValueError(f"output {str(output)!r} is a folder; give a file name such as calib.safetensors")
    steps = driver.default_steps if steps is None else int(steps)
    if steps <= 0:
        raise ValueError(f"the number of steps must be positive, got {steps}")
    guidance = driver.default_guidance if guidance is None else float(guidance)
    conditions = driver.check_conditions(conditions)
    if int(samples_per_condition) < 1:
        raise ValueError(f"samples_per_condition must be >= 1, got {samples_per_condition}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(eoc_lags) < 0:
        raise ValueError(f"eoc_lags must be >= 0, got {eoc_lags}")
    if sensitivity not in sens_mod.METHODS:
        raise ValueError(f"unknown sensitivity method {sensitivity!r}; choose one of {', '.join(sens_mod.METHODS)}")
    if sensitivity != "none" and int(sensitivity_samples) < 1:
        raise ValueError(f"sensitivity_samples must be >= 1, got {sensitivity_samples}")
    if cfg not in ("batched", "split"):
        raise ValueError(f"cfg must be 'batched' or 'split', got {cfg!r}")
    if cfg == "split" and not hasattr(driver.pipe, "initial_noise"):  # Driver.generate splits only DigitsPipeline
        raise ValueError(f"{type(driver.pipe).__name__} only runs batched CFG; use cfg='batched'")
    if float(checkpoint_every) < 0:
        raise ValueError(f"checkpoint_every must be >= 0 seconds, got {checkpoint_every}")
    spc, bs, K = int(samples_per_condition), int(batch_size), int(eoc_lags)
    shard_i, shard_n = parse_shard(shard)
    sample_conds, sample_seeds = sample_plan(conditions, spc, seed)
    n_total = len(sample_conds)
    nb = num_batches(n_total, bs)
    if shard_i >= nb:
        raise ValueError(f"shard {shard_i}/{shard_n} has no batch: there are only {nb} batches of {bs} samples")
    transformer = driver.transformer
    units = find_units(transformer)
    device = next(unwrap(transformer).parameters()).device
    along_executor = along_info = None
    if along is not None:
        along_executor, along_info = _check_along(along, transformer, units, steps, guidance, cfg, sensitivity)
    sens_copy = None
    if sensitivity_from is not None:
        if sensitivity != "none":
            raise ValueError(f"sensitivity_from copies the sensitivity; pass sensitivity='none', not {sensitivity!r}")
        sens_copy = _sensitivity_from(sensitivity_from, transformer, units, steps)

    rank, world, own_group = _dist_setup(device)
    try:
        return _calibrate(
            driver, transformer, units, device, rank, world, output, conditions, sample_conds, sample_seeds, spc, steps,
            guidance, int(seed), bs, (shard_i, shard_n), nb, K, sensitivity, int(sensitivity_samples), progress, cfg,
            restart, float(checkpoint_every), overlap, along_executor, along_info, sens_copy,
        )
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _check_along(plan, transformer, units, steps: int, guidance: float, cfg: str, sensitivity: str):
    """Load and check the plan of a trajectory calibration; returns ``(its PlanExecutor, header entry)``."""
    from cachec.runtime.plan import Plan, dump_plan, load_plan

    if sensitivity != "none":
        raise ValueError("a calibration along a plan does not measure sensitivity (the probes need the uncached "
                         "trajectory): pass sensitivity='none' and sensitivity_from=<the uncached calibration>")
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    if plan.steps != steps:
        raise ValueError(f"the plan has {plan.steps} steps but the calibration samples {steps}; use the plan's steps")
    g = plan.sampler.guidance
    if abs(g.scale - guidance) > 1e-9:
        raise ValueError(f"the plan was made for guidance {g.scale} but the calibration uses {guidance}")
    if g.mode in ("batched", "split") and g.mode != cfg:
        raise ValueError(f"the plan runs {g.mode} CFG but the calibration uses cfg={cfg!r}")
    from cachec.runtime.handle import plan_executor

    executor, plan_units = plan_executor(transformer, plan)  # raises PlanMismatchError for another model or weights
    if [u.name for u in plan_units] != [u.name for u in units]:
        raise ValueError("the plan's units are not the model's units in model order; make the plan from a "
                         "calibration of this model")
    info = {
        "plan_sha256": hashlib.sha256(dump_plan(plan).encode()).hexdigest(),
        "method": plan.budget.method,
        "target": plan.budget.target,
        "realised": plan.budget.realised,
        "options": plan.budget.options,
    }
    return executor, info


def _sensitivity_from(path, transformer, units, steps: int):
    """``(sensitivity (U, S) float64, its header entry, file sha256)`` copied from another calibration."""
    from .calfile import read_header, read_tensors

    h = read_header(path)
    names = [u["name"] for u in h["units"]]
    if names != [u.name for u in units] or h["steps"] != steps:
        raise ValueError(f"sensitivity_from {str(path)!r} has other units or steps ({len(names)} units, {h['steps']} "
                         f"steps) than this calibration ({len(units)} units, {steps} steps)")
    if h["model"]["fingerprint"] != weights_fingerprint(transformer):
        raise ValueError(f"sensitivity_from {str(path)!r} was measured on other weights")
    sens = np.asarray(read_tensors(path, ["sensitivity"])["sensitivity"], dtype=np.float64)
    st = os.stat(path)
    return sens, dict(h["sensitivity"]), _file_sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hex SHA-256 of a file, cached per (path, size, mtime): a refinement loop copies the sensitivity of the
    same uncached calibration (hundreds of MB) once per family and iteration."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _calibrate(driver, transformer, units, device, rank, world, output, conditions, sample_conds, sample_seeds, spc,
               steps, guidance, seed, bs, shard, nb, K, sensitivity, n_sens, progress, cfg, restart, every,
               overlap, along_executor=None, along_info=None, sens_copy=None) -> Path:
    from tqdm.auto import tqdm

    shard_i, shard_n = shard
    n_total = len(sample_conds)
    fingerprint = weights_fingerprint(transformer)
    config = {
        "format_version": FORMAT_VERSION, "model_class": type(unwrap(transformer)).__name__, "fingerprint": fingerprint,
        "conditions": list(conditions), "samples_per_condition": spc, "steps": steps, "guidance": guidance,
        "seed": seed, "batch_size": bs, "shard": f"{shard_i}/{shard_n}", "eoc_lags": K, "sensitivity": sensitivity,
        "sensitivity_samples": n_sens, "cfg": cfg, "world": world, "rank": rank, "units": [u.name for u in units],
    }
    if along_info is not None:
        config["along"] = along_info
    if sens_copy is not None:
        config["sensitivity_from"] = sens_copy[2]
    partial, sens_partial = partial_paths(output, rank, world)
    if restart:
        for p in (partial, sens_partial):
            if p.exists():
                p.unlink()
    state = _State.load(partial, config, units, device) if partial.exists() else _State(config, units)

    shard_batches = [b for b in range(nb) if b % shard_n == shard_i]
    mine = shard_batches[rank::world]
    todo = [b for b in mine if b not in set(state.completed)]
    show = progress and rank == 0

    switch = Switch()
    handle = install(transformer, units, switch)
    try:
        schedule = state.structure["timesteps"] if state.structure else None
        cond_first = batched_cond_first(driver.pipe)

        def make_tracker() -> StepTracker:
            tr = StepTracker(transformer, steps, cond_first, schedule=state.structure["timesteps"])
            tr.mode = state.structure["mode"]
            return tr

        tracker = StepTracker(transformer, steps, cond_first, schedule=schedule)
        if state.structure:
            tracker.mode = state.structure["mode"]
        recorder = Recorder(units, tracker, device)
        target = recorder
        if along_executor is not None:
            target = ShadowRecorder(recorder, along_executor)
        folder = _Folder(state, len(units), overlap=bool(overlap))
        # trajectory buffers, reused between batches; two sets when a fold overlaps the next batch
        buffer_sets = [[dict() for _ in units] for _ in range(2 if folder.pool is not None else 1)]
        last_save = time.monotonic()
        unsaved = False
        done_before = len(state.completed)
        bar = tqdm(total=len(mine) * steps, initial=(len(mine) - len(todo)) * steps, desc="calibrating", unit="step",
                   disable=not show, dynamic_ncols=True)
        bar.set_postfix(batches=f"{len(mine) - len(todo)}/{len(mine)}")
        recorder.on_step = lambda: bar.update(1)

        def committed() -> None:
            nonlocal unsaved, last_save
            unsaved = True
            bar.set_postfix(batches=f"{len(mine) - len(todo) + len(state.completed) - done_before}/{len(mine)}")
            if time.monotonic() - last_save >= every:
                state.save(partial)
                last_save, unsaved = time.monotonic(), False

        try:
            for i, b in enumerate(todo):
                idx = batch_samples(b, n_total, bs)
                first = state.structure is None
                recorder.traj = buffer_sets[i % len(buffer_sets)]
                recorder.timing = not state.lat_count.any() and i == 0
                recorder.capture = first
                recorder.captured = None
                recorder.lat_sum = [0.0] * len(units)
                recorder.lat_count = [0] * len(units)
                switch.target = target
                recorder.start_run(len(idx))
                with torch.no_grad():
                    driver.generate([sample_conds[n] for n in idx], [sample_seeds[n] for n in idx], steps=steps,
                                    guidance=guidance, cfg=cfg)
                recorder.finish_run()
                switch.target = None
                if first:
                    flops = _count_unit_flops(transformer, units, recorder.captured)
                    recorder.captured = None
                    state.structure = _structure(driver, units, recorder, steps, flops)
                    state.allocate(next(iter(recorder.traj[0].values())).device)
                if folder.wait():  # the previous batch, folded while this one was sampled
                    committed()
                folder.submit(b, idx, recorder.traj, recorder.lat_sum, recorder.lat_count)
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
        if unsaved and sensitivity != "none" and shard_i == 0:
            state.save(partial)  # the probes take long: do not lose the batches if they are interrupted
        recorder.traj = buffer_sets = None  # free the trajectories

        if world > 1:
            _gather(state, device)
        st = state.structure
        U, S = len(units), steps

        # ---- sensitivity ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        sens_seconds = 0.0
        n_probe = min(n_sens, n_total)
        if sensitivity != "none" and shard_i == 0 and S >= 2:
            job_list = sens_mod.jobs(sensitivity, U, S)
            results, done, sens_seconds = _load_sens_partial(sens_partial, state.hash, len(job_list))
            last = [time.monotonic()]

            def on_probe(j):
                if time.monotonic() - last[0] >= every:
                    _save_sens_partial(sens_partial, state.hash, results, done, sens_seconds + time.perf_counter() - t0)
                    last[0] = time.monotonic()

            try:
                sens_mod.measure(
                    driver, switch, make_tracker, U, sensitivity, sample_conds[:n_probe], sample_seeds[:n_probe], S,
                    guidance, cfg, results, done, mine=lambda j: j % world == rank, on_probe=on_probe, progress=show,
                )
            except BaseException:
                try:
                    _save_sens_partial(sens_partial, state.hash, results, done, sens_seconds + time.perf_counter() - t0)
                except Exception:
                    pass
                raise
            sens_seconds += time.perf_counter() - t0
            if world > 1:
                r = torch.from_numpy(np.where(done[:, None], results, 0.0)).to(device)
                tsec = torch.tensor([sens_seconds], dtype=torch.float64, device=device)
                _reduce([r, tsec])  # each probe ran on exactly one rank; seconds add up over ranks
                results, sens_seconds = r.cpu().numpy(), float(tsec[0])
            sens = sens_mod.compose(sensitivity, U, S, job_list, results)
            sens_info = {"method": sensitivity, "samples": n_probe, "seconds": sens_seconds}
        elif sens_copy is not None:
            sens, sens_info = sens_copy[0], dict(sens_copy[1], copied_from=sens_copy[2])
        else:  # "none", a shard other than 0 (shard 0 measures for all), or a single step
            sens = np.ones((U, S))
            sens_info = {"method": sensitivity, "samples": 0, "seconds": 0.0}
    finally:
        switch.target = None
        handle.remove()

    # ---- write ------------------------------------------------------------------------------------------
    if rank == 0:
        latency = np.where(state.lat_count > 0, state.lat_sum / np.maximum(state.lat_count, 1), 0.0)
        acc = state.acc
        B = st["branches"]
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": state.created,
            "cachec_version": __version__,
            "model": {"class": config["model_class"], "fingerprint": config["fingerprint"], "source": str(driver.name)},
            "scheduler": st["scheduler"],
            "steps": S,
            "timesteps": st["timesteps"],
            "sigmas": st["sigmas"],
            "guidance": {"mode": st["mode"], "scale": guidance, "branches": B},
            "resolution": [int(x) for x in driver.resolution],
            "conditions": list(conditions),
            "samples_per_condition": spc,
            "seed": seed,
            "samples": list(acc.samples),
            "prior_count": sum(acc.samples) * B,
            "goc_count": sum(acc.samples) * B,
            "eoc_lags": K,
            "units": st["units"],
            "flops": st["flops"],
            "sensitivity": sens_info,
            "shards": [f"{shard_i}/{shard_n}"] if shard_n > 1 else [],
        }
        assert tuple(header) == HEADER_KEYS
        if along_info is not None:
            header["along_plan"] = along_info
        tensors = acc.tensors(state.names)
        tensors["unit_flops"] = torch.tensor(st["unit_flops"], dtype=torch.float64)
        tensors["unit_latency_s"] = torch.from_numpy(latency)
        tensors["sensitivity"] = torch.from_numpy(np.ascontiguousarray(sens, dtype=np.float64))
        write_calibration(output, header, tensors)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    for p in (partial, sens_partial):
        if p.exists():
            p.unlink()
    return output


def _gather(state: _State, device) -> None:
    """All-reduce a rank's sums (in place); ranks without a batch take the structure of rank 0."""
    import torch.distributed as dist

    box = [state.structure]
    dist.broadcast_object_list(box, src=0)
    if state.structure is None:
        state.structure = box[0]
        state.allocate(device)
    elif state.structure["timesteps"] != box[0]["timesteps"] or state.structure["units"] != box[0]["units"]:
        raise RuntimeError(f"rank {dist.get_rank()} recorded a different schedule or unit layout than rank 0")
    acc = state.acc
    counts = torch.tensor(acc.samples, dtype=torch.float64, device=acc.device)
    lat = torch.from_numpy(np.stack([state.lat_sum, state.lat_count])).to(acc.device)
    state.reduced = True
    _reduce([*acc.all_tensors(), counts, lat])
    acc.samples = [int(round(float(c))) for c in counts.cpu()]
    lat = lat.cpu().numpy()
    state.lat_sum, state.lat_count = lat[0].copy(), lat[1].copy()


def _save_sens_partial(path: Path, config_hash: str, results: np.ndarray, done: np.ndarray, seconds: float) -> None:
    tensors = {"results": torch.from_numpy(results.copy()), "done": torch.from_numpy(done.astype(np.float64))}
    atomic_save(tensors, path, {PARTIAL_KEY: json.dumps({"config_hash": config_hash, "seconds": seconds})})


def _load_sens_partial(path: Path, config_hash: str, n_jobs: int) -> tuple[np.ndarray, np.ndarray, float]:
    results, done = np.zeros((n_jobs, 2)), np.zeros(n_jobs, dtype=bool)
    if not path.exists():
        return results, done, 0.0
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get(PARTIAL_KEY, "{}"))
        if meta.get("config_hash") != config_hash:
            raise ValueError(f"the partial sensitivity state {path} belongs to another configuration; "
                             "pass restart=True (--restart) to discard it")
        stored = f.get_tensor("results")
        if stored.shape != results.shape:
            raise ValueError(f"the partial sensitivity state {path} does not match the probe list; pass restart=True")
        return stored.copy(), f.get_tensor("done") > 0.5, float(meta.get("seconds", 0.0))
