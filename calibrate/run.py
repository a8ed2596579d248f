"""``calibrate()``: uncached sampling that records the statistics of docs/calibration-format.md.

Flow of one call (each step lives in its own module):

1. validate the inputs before any work (output folder, steps, conditions, shard, options) and freeze
   them into a :class:`~.job.CalibrationJob` (this module);
2. the global sample order (``conditions × samples_per_condition``, condition-major, seeds ``seed + n``) is
   cut into fixed batches of ``batch_size`` samples; ``shard=(i, n)`` keeps batches ``b % n == i``; under
   ``torchrun`` (``WORLD_SIZE > 1``) rank r of W takes every W-th of those (:mod:`.job`,
   :mod:`.distributed`);
3. hooks are installed once on the transformer (:func:`cachec.runtime.hooks.install`); each batch is an
   ordinary ``Driver.generate`` call during which the recorder streams every unit's output into sketches
   and EOC group sums (:mod:`.streaming`); after the call they are folded into float64 sums
   (:mod:`.sampling`, :mod:`.stats`). The
   first batch also fixes the timestep schedule, the guidance layout and the unit shapes, measures unit
   latencies (steps >= 1) and counts FLOPs on its first transformer call (:mod:`.costs`);
4. a partial state (``OUT.partial.safetensors``: sums, completed batches, configuration hash) is written
   atomically after a batch when ``checkpoint_every`` seconds have passed since the last one (0: after
   every batch), and when the loop is interrupted by an exception. Re-running the same call resumes;
   the completed batches are folded in the same order, so the result is bit-identical to an
   uninterrupted run (timing fields — ``created``, ``unit_latency_s``, ``sensitivity.seconds`` — aside)
   (:mod:`.checkpoint`);
5. distributed ranks all-reduce the sums; the sensitivity probes (:mod:`.sensitivity`) run on shard 0
   only, split over the ranks — or the sensitivity is copied from another file (:mod:`.along`); rank 0
   writes the file atomically (:func:`.format.write_calibration`) and the partial files are removed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cachec import __version__
from cachec.runtime.fingerprint import weights_fingerprint
from cachec.runtime.hooks import install
from cachec.runtime.units import find_units, is_map_unit, unwrap

from . import distributed
from . import sensitivity as sens_mod
from .along import check_along, copy_sensitivity
from .checkpoint import (  # noqa: F401  (partial_paths re-exported: cachec.calibrate.run.partial_paths)
    RunState, load_sensitivity_partial, partial_paths, run_config, save_sensitivity_partial,
)
from .costs import mean_latency
from .format import DEFAULT_EOC_SAMPLE, DEFAULT_SKETCH_DIM, EOC_PRIORS, CalibrationHeader, write_calibration
from .job import CalibrationJob, RunContext, parse_shard
from .recorder import Recorder, ShadowRecorder, StepTracker, Switch, batched_cond_first
from .sampling import sample_batches

__all__ = ["calibrate", "parse_shard", "partial_paths"]


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
    eoc_prior: str = "token",
    eoc_sample: int = DEFAULT_EOC_SAMPLE,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    sensitivity: str = "auto",
    sensitivity_samples: int = 4,
    progress: bool = True,
    cfg: str = "batched",
    restart: bool = False,
    checkpoint_every: float = 30.0,
    overlap: bool = False,
    along=None,
    sensitivity_from: str | Path | None = None,
    attention_maps: bool = False,
) -> Path:
    """Run uncached sampling over ``conditions`` and write the calibration statistics file.

    With ``along`` the sampling follows a plan instead (trajectory calibration, docs/calibration.md
    "Calibration along a plan"): the plan is executed, but every unit is also computed in shadow and
    recorded, so the statistics price predictors on the trajectory the plan really produces (anchors
    computed on already-perturbed inputs). Re-planning from such a file and repeating is the refinement
    loop of ``cachec compile``.

    Args:
        driver: a :class:`cachec.loading.Driver` (``load_model(...)``).
        conditions: class labels (ints) or prompts (str), as the model takes them.
        output: the ``.safetensors`` file to write; its folder must exist.
        samples_per_condition: images per condition (global sample n uses ``conditions[n // spc]``).
        steps: sampling steps S (default: the model's).
        guidance: CFG scale (default: the model's); ``<= 1`` records a single branch.
        seed: sample n uses seed ``seed + n``.
        batch_size: samples per pipeline call (memory beyond plain sampling ≈ 4 · batch_size · B · Σ_u
            (S · r_u + eoc_lags · D_u) bytes, docs/calibration-format.md "Memory").
        shard: ``(i, n)`` or ``"i/n"``: this process calibrates batches ``b % n == i``; merge the shard files
            with :func:`cachec.calibrate.merge`.
        eoc_lags: K, lags of the EOC inner products.
        eoc_prior: grouping of the EOC prior: ``"token"`` (default: one value per token, S × tokens values
            per unit), ``"channel"``, or ``"element"`` (the full per-element prior: large files, opt-in).
            Measured on both reference models, per token keeps far more of EOC's held-out gain than per
            channel or per element (bench/bench_eoc_prior.py, docs/calibration-format.md "EOC prior").
        eoc_sample: E; the EOC sums of a group read at most E of its elements (a fixed random subset of
            the tokens for ``channel``, of the channels for ``token``; scaled to estimate the full sums), so
            the raw-output window the lag products need holds ``eoc_lags · G_u · E`` values per unit, not
            ``eoc_lags · D_u``. Exact when every group has at most E elements; 0 reads every element.
        sketch_dim: r; a unit with more than r output elements per sample has its Gram computed from a
            CountSketch of dimension r (relative error of any predictor's error ≤ sqrt(2/r) in standard
            deviation, docs/calibration-format.md); 0 computes every Gram exactly.
        sensitivity: ``"auto"`` (default: ``full`` while its probes cost at most
            :data:`~.sensitivity.AUTO_FULL_RUNS` sampling runs — both digit models —, else the O(S + U)
            ``chain``; ``none`` with ``along``/``sensitivity_from``), ``"full"``, ``"factored"``, ``"chain"``
            or ``"none"`` (docs/calibration.md). The header records the method that ran.
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
        attention_maps: also record the attention-map units the model's registry entry declares (kind
            ``"attn_map"``, nested in the unit holding the attention; docs/hgc.md). Their attention runs with
            an explicit softmax (not SDPA's kernel) while calibrating. A map over
            :data:`~cachec.runtime.attention_maps.MAP_LIMIT_BYTES` per sample is refused (at the first call).

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
    if eoc_prior not in EOC_PRIORS:
        raise ValueError(f"unknown eoc_prior {eoc_prior!r}; choose one of {', '.join(EOC_PRIORS)}")
    if int(eoc_sample) < 0:
        raise ValueError(f"eoc_sample must be >= 0 (0: every element), got {eoc_sample}")
    if int(sketch_dim) < 0:
        raise ValueError(f"sketch_dim must be >= 0 (0: exact Grams), got {sketch_dim}")
    if sensitivity == sens_mod.AUTO:
        if along is not None or sensitivity_from is not None:
            sensitivity = "none"
        else:
            sensitivity = sens_mod.resolve(sens_mod.AUTO, len(find_units(driver.transformer, attention_maps)), steps)
    if sensitivity not in sens_mod.METHODS:
        raise ValueError(f"unknown sensitivity method {sensitivity!r}; choose one of {', '.join(sens_mod.METHODS)}")
    if sensitivity != "none" and int(sensitivity_samples) < 1:
        raise ValueError(f"sensitivity_samples must be >= 1, got {sensitivity_samples}")
    if cfg not in ("batched", "split"):
        raise ValueError(f"cfg must be 'batched' or 'split', got {cfg!r}")
    if cfg == "split" and not driver.spec.split_cfg:  # the registry says which pipelines can split CFG
        raise ValueError(f"{type(driver.pipe).__name__} only runs batched CFG; use cfg='batched'")
    if float(checkpoint_every) < 0:
        raise ValueError(f"checkpoint_every must be >= 0 seconds, got {checkpoint_every}")
    job = CalibrationJob(
        output=output, conditions=tuple(conditions), samples_per_condition=int(samples_per_condition), steps=steps,
        guidance=guidance, seed=int(seed), batch_size=int(batch_size), shard=parse_shard(shard),
        eoc_lags=int(eoc_lags), sensitivity=sensitivity, sensitivity_samples=int(sensitivity_samples), cfg=cfg,
        restart=bool(restart), checkpoint_every=float(checkpoint_every), overlap=bool(overlap), progress=bool(progress),
        eoc_prior=eoc_prior, sketch_dim=int(sketch_dim), eoc_sample=int(eoc_sample),
    )
    shard_i, shard_n = job.shard
    if shard_i >= job.n_batches:
        raise ValueError(f"shard {shard_i}/{shard_n} has no batch: there are only {job.n_batches} batches of "
                         f"{job.batch_size} samples")
    transformer = driver.transformer
    if along is not None and not attention_maps:  # a plan with attention-map units is followed with them
        from cachec.runtime.plan import Plan, load_plan

        along = along if isinstance(along, Plan) else load_plan(along)
        attention_maps = any(is_map_unit(u.name) for u in along.units)
    units = find_units(transformer, bool(attention_maps))
    device = next(unwrap(transformer).parameters()).device
    plan = None
    if along is not None:
        plan = check_along(along, transformer, units, steps, guidance, cfg, sensitivity)
    copied = None
    if sensitivity_from is not None:
        if sensitivity != "none":
            raise ValueError(f"sensitivity_from copies the sensitivity; pass sensitivity='none', not {sensitivity!r}")
        copied = copy_sensitivity(sensitivity_from, transformer, units, steps)

    rank, world, own_group = distributed.setup(device)
    try:
        ctx = RunContext(driver=driver, units=units, device=device, rank=rank, world=world, along=plan,
                         copied_sensitivity=copied)
        return _calibrate(job, ctx)
    finally:
        if own_group:
            distributed.teardown()


def _calibrate(job: CalibrationJob, ctx: RunContext) -> Path:
    """One process's part of a validated calibration (see the module docstring); returns ``job.output``."""
    transformer, units, steps = ctx.transformer, ctx.units, job.steps
    config = run_config(job, ctx, type(unwrap(transformer)).__name__, weights_fingerprint(transformer))
    partial, sens_partial = partial_paths(job.output, ctx.rank, ctx.world)
    if job.restart:
        for p in (partial, sens_partial):
            if p.exists():
                p.unlink()
    state = RunState.load(partial, config, units, ctx.device) if partial.exists() else RunState(config, units)

    mine = job.batches(ctx.rank, ctx.world)
    todo = [b for b in mine if b not in set(state.completed)]
    show = job.progress and ctx.rank == 0

    switch = Switch()
    handle = install(transformer, units, switch)
    try:
        schedule = state.structure["timesteps"] if state.structure else None
        cond_first = batched_cond_first(ctx.driver.pipe)

        def make_tracker() -> StepTracker:
            tr = StepTracker(transformer, steps, cond_first, schedule=state.structure["timesteps"])
            tr.mode = state.structure["mode"]
            return tr

        tracker = StepTracker(transformer, steps, cond_first, schedule=schedule)
        if state.structure:
            tracker.mode = state.structure["mode"]
        recorder = Recorder(units, tracker, ctx.device)
        target = recorder if ctx.along is None else ShadowRecorder(recorder, ctx.along.executor)
        unsaved = sample_batches(job, ctx, state, switch, recorder, target, todo, len(mine), partial, show)
        if unsaved and job.sensitivity != "none" and job.shard[0] == 0:
            state.save(partial)  # the probes take long: do not lose the batches if they are interrupted
        if ctx.world > 1:
            distributed.gather(state, ctx.device)
        sens, sens_info = _sensitivity(job, ctx, state, switch, make_tracker, sens_partial, show)
    finally:
        switch.target = None
        handle.remove()

    if ctx.rank == 0:
        tensors = {k: v.numpy() for k, v in state.acc.tensors(state.names).items()}
        tensors["unit_flops"] = np.asarray(state.structure["unit_flops"], dtype=np.float64)
        tensors["unit_latency_s"] = mean_latency(state.lat_sum, state.lat_count)
        tensors["sensitivity"] = np.ascontiguousarray(sens, dtype=np.float64)
        write_calibration(job.output, _header(job, ctx, state, sens_info), tensors)
    if ctx.world > 1:
        distributed.barrier()
    for p in (partial, sens_partial):
        if p.exists():
            p.unlink()
    return job.output


def _sensitivity(job: CalibrationJob, ctx: RunContext, state: RunState, switch, make_tracker, sens_partial: Path,
                 show: bool) -> tuple[np.ndarray, dict]:
    """The run's ``(sensitivity (U, S) float64, header entry)``: measured (resumable, split over the ranks),
    copied from another file, or ones (``"none"``, a shard other than 0 — shard 0 measures for all —, or a
    single step)."""
    U, S = len(ctx.units), job.steps
    t0 = time.perf_counter()
    sens_seconds = 0.0
    n_probe = min(job.sensitivity_samples, job.n_samples)
    if job.sensitivity != "none" and job.shard[0] == 0 and S >= 2:
        joint = tuple(i for i, u in enumerate(ctx.units) if not u.parent)  # (attention maps: not in joint probes)
        job_list = sens_mod.jobs(job.sensitivity, U, S, joint)
        results, done, sens_seconds = load_sensitivity_partial(sens_partial, state.hash, len(job_list))
        last = [time.monotonic()]

        def on_probe(j):
            if time.monotonic() - last[0] >= job.checkpoint_every:
                save_sensitivity_partial(sens_partial, state.hash, results, done, sens_seconds + time.perf_counter() - t0)
                last[0] = time.monotonic()

        try:
            sens_mod.measure(
                ctx.driver, switch, make_tracker, U, job.sensitivity, job.sample_conditions[:n_probe],
                job.sample_seeds[:n_probe], S, job.guidance, job.cfg, results, done,
                mine=lambda j: j % ctx.world == ctx.rank, on_probe=on_probe, progress=show, joint=joint,
            )
        except BaseException:
            try:
                save_sensitivity_partial(sens_partial, state.hash, results, done, sens_seconds + time.perf_counter() - t0)
            except Exception:
                pass
            raise
        sens_seconds += time.perf_counter() - t0
        if ctx.world > 1:
            r = torch.from_numpy(np.where(done[:, None], results, 0.0)).to(ctx.device)
            tsec = torch.tensor([sens_seconds], dtype=torch.float64, device=ctx.device)
            distributed.all_reduce_sum([r, tsec])  # each probe ran on exactly one rank; seconds add up over ranks
            results, sens_seconds = r.cpu().numpy(), float(tsec[0])
        sens = sens_mod.compose(job.sensitivity, U, S, job_list, results)
        return sens, {"method": job.sensitivity, "samples": n_probe, "seconds": sens_seconds}
    if ctx.copied_sensitivity is not None:
        c = ctx.copied_sensitivity
        return c.values, dict(c.info, copied_from=c.sha256)
    return np.ones((U, S)), {"method": job.sensitivity, "samples": 0, "seconds": 0.0}


def _header(job: CalibrationJob, ctx: RunContext, state: RunState, sens_info: dict) -> CalibrationHeader:
    """The file's header, from the settings, the first batch's structure and the summed sample counts."""
    st, acc, config = state.structure, state.acc, state.config
    B = st["branches"]
    shard_i, shard_n = job.shard
    return CalibrationHeader(
        created=state.created,
        cachec_version=__version__,
        model={"class": config["model_class"], "fingerprint": config["fingerprint"], "source": str(ctx.driver.name)},
        scheduler=st["scheduler"],
        steps=job.steps,
        timesteps=st["timesteps"],
        sigmas=st["sigmas"],
        guidance={"mode": st["mode"], "scale": job.guidance, "branches": B},
        resolution=[int(x) for x in ctx.driver.resolution],
        conditions=list(job.conditions),
        samples_per_condition=job.samples_per_condition,
        seed=job.seed,
        samples=list(acc.samples),
        prior_count=sum(acc.samples) * B,
        goc_count=sum(acc.samples) * B,
        eoc_lags=job.eoc_lags,
        eoc_prior=job.eoc_prior,
        eoc_sample=job.eoc_sample,
        gram_sketch={"method": "countsketch" if any(u["sketch_dim"] < u["numel"] for u in st["units"]) else "exact",
                     "dim": job.sketch_dim, "seed": job.sketch_seed},
        units=st["units"],
        flops=st["flops"],
        sensitivity=sens_info,
        shards=[f"{shard_i}/{shard_n}"] if shard_n > 1 else [],
        along_plan=None if ctx.along is None else ctx.along.info,
    )
