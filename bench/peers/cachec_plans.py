"""cachec's plans and the planner baselines (FORA, EOC and GOC as published), executed by
:func:`cachec.runtime.apply` on a calibration the benchmark makes itself."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from .core import BenchContext, Method, Session


class PlanSession(Session):
    """A cachec plan (or planner baseline) applied with :func:`cachec.runtime.apply` for the whole point."""

    def __init__(self, ctx: BenchContext, plan, sidecar: dict, path: Path) -> None:
        """Write ``plan`` (a :class:`cachec.runtime.plan.Plan` from the planner) and its EOC ``sidecar``
        tensors to ``path`` (sidecar ``<stem>.eoc.safetensors``) and apply it to ``ctx.driver``.

        Raises:
            PlanError: the plan violates the schema. PlanMismatchError: it is for another model.
        """
        super().__init__()
        from cachec.runtime import apply, load_plan, write_plan

        write_plan(plan, path, sidecar or None)
        self.handle = apply(ctx.driver, load_plan(path))
        self.info = {
            "plan_file": path.name,
            "plan_realised_claim": plan.budget.realised,
            "plan_target": plan.budget.target,
            "predicted_error": plan.predicted_error,
            "history": plan.history,
            "plan_options": plan.budget.options,
        }

    def end(self) -> None:
        rep = self.handle.report
        if rep is not None:
            self.info["runtime_flops_fraction_last_run"] = rep.flops_fraction
            self.info["runtime_skipped_last_run"] = rep.skipped
            self.info["runtime_forced_last_run"] = rep.forced

    def close(self) -> None:
        self.handle.remove()


def ensure_calibration(ctx: BenchContext) -> Path:
    """cachec's calibration of this configuration (made once, on the calibration conditions and seeds)."""
    if "calibration" in ctx.cache:
        if isinstance(ctx.cache["calibration"], BaseException):
            raise ctx.cache["calibration"]
        return ctx.cache["calibration"]
    import time

    from cachec.calibrate.run import calibrate

    conds, seeds = list(ctx.calib_conditions), list(ctx.calib_seeds)
    # calibrate() takes conditions + samples_per_condition and seeds seed+n; the benchmark's calibration set
    # is every condition once per seed block, so pass the conditions in sample order with spc = 1.
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError("calibration seeds must be consecutive")
    out = Path(ctx.workdir) / f"calibration_{ctx.steps}steps.safetensors"
    t = time.perf_counter()
    try:
        path = calibrate(
            ctx.driver, conds, output=out, samples_per_condition=1, steps=ctx.steps, guidance=ctx.guidance,
            seed=int(seeds[0]), batch_size=ctx.batch_size, sensitivity=ctx.sensitivity,
            sensitivity_samples=ctx.sensitivity_samples, progress=False, restart=True,
        )
    except Exception as exc:
        ctx.cache["calibration"] = exc
        raise
    ctx.cache["calibration_seconds"] = time.perf_counter() - t
    ctx.cache["calibration"] = Path(path)
    ctx.log(f"    cachec calibration: {len(conds)} samples, sensitivity={ctx.sensitivity}, "
            f"{ctx.cache['calibration_seconds']:.1f} s -> {path}")
    return Path(path)


def plan_path(ctx: BenchContext, label: str) -> Path:
    """Where a benchmark plan named by ``label`` (a method name and its parameter) is written in the run's
    work directory."""
    tag = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    return Path(ctx.workdir) / f"plan_{ctx.steps}_{tag}.yaml"


def _planner(ctx: BenchContext):
    if "planner" not in ctx.cache:
        from cachec.planner import Planner, load_calibration

        ctx.cache["planner"] = Planner(load_calibration(str(ensure_calibration(ctx))))
    return ctx.cache["planner"]


def choose_family(ctx: BenchContext, planner, budget: float, path: Path) -> tuple[object, dict, dict]:
    """cachec's shipped procedure (``cachec compile``, :func:`cachec.refine.search_plan`): solve every
    schedule family with every predictor set, refine the best two ``ctx.refine`` times along their own cached
    trajectories (on the calibration samples), search the best step-shaped plan's mask closed-loop
    (:func:`cachec.refine.mask_candidate`), try the predictor pass, confirm the three best on fresh seeds
    (:func:`cachec.refine.confirm`) and keep the plan closest to uncached sampling on validation and confirmation
    seeds (from ``VALIDATION_SEED``, disjoint from the calibration and evaluation seeds). Candidates are written
    under ``<path stem>-candidates/``.

    Returns:
        ``(plan, sidecar, {"chosen", "predictors", "refine", "name", "validation_psnr_db", "validation_images",
        "mask_search", "confirmation"})``: the chosen
        :class:`cachec.runtime.plan.Plan` (not yet written to ``path``), its EOC tensors and the choice.
    """
    from cachec.evaluation import VALIDATION_SEED, validation_set
    from cachec.refine import search_plan

    def validation():
        if "validation" not in ctx.cache:
            ctx.cache["validation"] = validation_set(ctx.driver, ctx.validation_per_class, VALIDATION_SEED)
        return ctx.cache["validation"]

    calib = ensure_calibration(ctx)  # the file ``planner`` was loaded from
    opts = dict(conditions=list(ctx.calib_conditions), samples_per_condition=1, steps=ctx.steps, guidance=ctx.guidance,
                seed=int(ctx.calib_seeds[0]), batch_size=ctx.batch_size)
    search = search_plan(ctx.driver, calib, budget, workdir=path.parent / f"{path.stem}-candidates",
                         calibrate_options=opts, validation=validation, iterations=ctx.refine, planner=planner,
                         mask_runs=ctx.mask_runs)
    best = search.best
    return best.plan, best.sidecar, {
        "chosen": best.family, "predictors": best.predictors, "refine": best.iteration, "name": best.name,
        "validation_psnr_db": {c.name: c.validation_psnr for c in search.candidates},
        "validation_images": len(validation()[0]), "mask_search": search.mask_search,
        "confirmation": search.confirmation,
    }


def rebuild_choice(ctx: BenchContext, planner, budget: float, path: Path, stored: dict) -> tuple[object, dict, dict]:
    """A stored plan-search choice rebuilt without searching again (``bench/compare.py --widen``): the plan
    of ``stored["plan_options"]`` (``family``, ``refine`` and the solver options) from this run's
    calibration, refinements included (:func:`cachec.refine.replan`), checked against the stored point.

    Args:
        stored: the stored point's ``info`` (``plan_options``, ``predicted_error``, ``plan_realised_claim``).
    Returns:
        ``(plan, sidecar, {"rebuilt_from": options})`` as :func:`choose_family`.
    Raises:
        RuntimeError: the rebuilt plan's predicted error or realised fraction differs from the stored one
        (another calibration, planner version or CPU kernels: widen a result of this version only).
    """
    from cachec.refine import replan

    options = dict(stored["plan_options"])
    calib = ensure_calibration(ctx)
    opts = dict(conditions=list(ctx.calib_conditions), samples_per_condition=1, steps=ctx.steps, guidance=ctx.guidance,
                seed=int(ctx.calib_seeds[0]), batch_size=ctx.batch_size)
    plan, side = replan(ctx.driver, calib, budget, options, path.parent / f"{path.stem}-rebuilt", opts, planner=planner)
    want_err, want_real = stored.get("predicted_error"), stored.get("plan_realised_claim")
    if want_err is not None and not math.isclose(plan.predicted_error, want_err, rel_tol=1e-4, abs_tol=1e-12):
        raise RuntimeError(f"cachec at {budget:.0%}: the rebuilt plan predicts {plan.predicted_error:.6g}, the stored one "
                           f"{want_err:.6g}: this run does not rebuild the stored choice; rerun the whole benchmark")
    if want_real is not None and abs(plan.budget.realised - want_real) > 1e-6:
        raise RuntimeError(f"cachec at {budget:.0%}: the rebuilt plan realises {plan.budget.realised:.6f}, the stored one "
                           f"{want_real:.6f}; rerun the whole benchmark")
    return plan, side, {"rebuilt_from": options}


class PlanMethod(Method):
    """A plan built by :mod:`cachec.planner` (``method``) and executed by :mod:`cachec.runtime`."""

    group = "cachec"

    def __init__(self, name: str, method: str, budgets: Sequence[float] = (), intervals: Sequence[int] = (),
                 quick_points: Sequence = (), choose_family: bool = False, **options) -> None:
        super().__init__()
        self.choose_family = choose_family
        self.name = name
        self.method = method
        self.budgets = list(budgets)
        self.intervals = list(intervals)
        self.quick_points = list(quick_points)
        self.options = options
        self.knob = "budget" if budgets else "interval N"
        if method != "cachec":
            self.group = "planner baseline"
        self.settings = {"planner_method": method, **options}
        if choose_family:
            self.settings["family"] = ("free/step/group/warmup x fitted/taylor predictors, the best two refined along "
                                       "their own trajectories, the best step-shaped plan's mask searched, the "
                                       "predictor pass tried, chosen closed-loop on validation seeds and the best "
                                       "three confirmed on 2x fresh seeds (as cachec compile does: "
                                       "cachec.refine.search_plan)")

    def prepare(self, ctx: BenchContext) -> None:
        _planner(ctx)

    def grid(self, ctx: BenchContext, quick: bool = False) -> list:
        if quick and self.quick_points:
            return list(self.quick_points)
        if self.budgets:
            return list(self.budgets)
        return [n for n in self.intervals if n < ctx.steps]

    def label(self, p) -> str:
        return f"budget {p:.0%}" if self.budgets else f"N={p}"

    def session(self, ctx: BenchContext, p) -> Session:
        planner = _planner(ctx)
        path = plan_path(ctx, f"{self.name}-{p}")
        if self.choose_family:
            key = ("chosen plan", float(p))  # the headline confirmation runs the same point again
            if key not in ctx.cache:
                stored = ctx.cache.get(("stored choice", round(float(p), 6)))
                ctx.cache[key] = (rebuild_choice(ctx, planner, float(p), path, stored) if stored is not None
                                  else choose_family(ctx, planner, float(p), path))
            plan, side, choice = ctx.cache[key]
            session = PlanSession(ctx, plan, side, path)
            session.info["family_choice"] = choice
            return session
        if self.budgets:
            plan, side = planner.plan(float(p), self.method, **self.options)
        else:
            plan, side = planner.plan(None, self.method, interval=int(p), **self.options)
        return PlanSession(ctx, plan, side, path)
