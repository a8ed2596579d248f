"""Trajectory refinement and closed-loop choice of a plan (ARCHITECTURE.md lesson 6).

The planner's statistics come from *uncached* sampling, so they cannot see that a plan's anchors are
computed on inputs its own skips already perturbed, nor how skipped units interact. Refinement closes the
loop: sample along the plan (every unit still computed in shadow and recorded, the plan's predictions
passed downstream: :func:`cachec.calibrate.calibrate` with ``along=``), re-plan from those statistics
with the uncached calibration's sensitivity, and repeat. The iterates are not monotone in quality, so
every (family, iteration) plan is a candidate and the one closest to uncached sampling on validation
seeds wins (:func:`cachec.evaluation.choose_plan`).

A refined plan records ``budget.options.refine = k`` (k trajectory calibrations, each along the previous
iterate); :func:`replan` rebuilds it deterministically from the uncached calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .evaluation import choose_plan


@dataclass
class Candidate:
    """One plan of the search: its family, refinement iteration, file and (after the choice) score."""

    family: str
    iteration: int
    path: Path
    plan: object
    plan_dict: dict
    sidecar: dict
    validation_psnr: float | None = None

    @property
    def name(self) -> str:
        return f"{self.family}/refine{self.iteration}"


def write_plan_dict(plan_dict: dict, sidecar: dict | None, path: Path):
    """Validate and write a planner plan dict (and its EOC sidecar, named after ``path``) atomically.

    Sets ``plan_dict["sidecar"]`` to ``<path stem>.eoc.safetensors`` when the plan has one (the hash is filled
    in by :func:`cachec.runtime.plan.write_plan`).

    Returns:
        The written :class:`cachec.runtime.plan.Plan`.
    Raises:
        PlanError: the dict violates the plan schema.
    """
    from .runtime.plan import parse_plan, write_plan

    path = Path(path)
    if plan_dict.get("sidecar"):
        plan_dict["sidecar"] = {"file": f"{path.stem}.eoc.safetensors", "sha256": "0" * 64}
    return write_plan(parse_plan(plan_dict), path, sidecar or None)


def refined_plans(driver, calibration: str | Path, budget: float, *, family: str, iterations: int,
                  workdir: str | Path, calibrate_options: dict, method: str = "cachec", planner=None,
                  log: Callable[[str], None] | None = None) -> list[Candidate]:
    """The plan of one family at ``budget`` and its ``iterations`` trajectory refinements.

    Args:
        driver: the loaded model (:func:`cachec.loading.load_model`).
        calibration: the uncached calibration file (its sensitivity is reused by every refinement).
        budget: FLOPs fraction (0, 1].
        family: schedule family (``free`` | ``step`` | ``group``).
        iterations: number of refinements k >= 0 (k + 1 plans are returned).
        workdir: folder for the plan and trajectory-calibration files (created).
        calibrate_options: keyword arguments of :func:`cachec.calibrate.calibrate` for the trajectory runs
            (conditions, samples_per_condition, batch_size, seed, ... as in the uncached calibration).
        method: planner method (refinement is defined for ``cachec``).
        planner: a :class:`cachec.planner.Planner` of ``calibration`` to reuse for iteration 0 (saves loading
            the file and building its segment table once per family).
        log: progress printer.
    Returns:
        ``[Candidate(iteration=0), ..., Candidate(iteration=k)]``.
    Raises:
        ValueError: iterations < 0, or as the planner and :func:`cachec.calibrate.calibrate` raise.
    """
    from .calibrate.run import calibrate
    from .planner import Planner, load_calibration

    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{family}-{round(1000 * budget)}"
    options = dict(calibrate_options)
    conditions = options.pop("conditions")
    options.update(sensitivity="none", progress=False, restart=True)
    out = []
    cal_path = Path(calibration)
    for k in range(int(iterations) + 1):
        if k or planner is None:
            planner = Planner(load_calibration(str(cal_path)))
        plan_dict, side = planner.plan(budget, method, family=family)
        if k:
            plan_dict["budget"]["options"]["refine"] = k
        path = work / f"plan-{tag}-r{k}.yaml"
        plan = write_plan_dict(plan_dict, side, path)
        out.append(Candidate(family, k, path, plan, plan_dict, side))
        if k == iterations:
            break
        if log:
            log(f"    refining {family} at {100 * budget:.0f}%: calibration along iteration {k}")
        cal_path = calibrate(driver, conditions, output=work / f"calib-{tag}-along-r{k}.safetensors",
                             along=plan, sensitivity_from=calibration, **options)
    return out


def choose(driver, candidates: Sequence[Candidate], conditions, seeds) -> Candidate:
    """The candidate closest to uncached sampling on ``conditions``/``seeds`` (sets ``validation_psnr``)."""
    pick, scores = choose_plan(driver, {c.name: c.plan for c in candidates}, conditions, seeds)
    for c in candidates:
        c.validation_psnr = scores[c.name]
    return next(c for c in candidates if c.name == pick)


def replan(driver, calibration: str | Path, budget: float, options: dict, workdir: str | Path,
           calibrate_options: dict, planner=None) -> tuple[dict, dict]:
    """Rebuild a plan from its uncached calibration and its recorded options (``family``, ``refine``);
    ``planner``: as :func:`refined_plans`.

    Returns:
        ``(plan dict, sidecar)`` of the last iterate.
    """
    k = int(options.get("refine", 0))
    cands = refined_plans(driver, calibration, budget, family=options.get("family", "free"), iterations=k,
                          workdir=workdir, calibrate_options=calibrate_options, planner=planner)
    return cands[-1].plan_dict, cands[-1].sidecar
