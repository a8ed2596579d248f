"""Trajectory refinement and the closed-loop plan search (docs/planner.md, "What the statistics cannot see").

The planner's statistics come from *uncached* sampling, so they cannot see that a plan's anchors are
computed on inputs its own skips already perturbed, nor how skipped units interact. Refinement closes the
loop: sample along the plan (every unit still computed in shadow and recorded, the plan's predictions
passed downstream: :func:`cachec.calibrate.calibrate` with ``along=``), re-plan from those statistics
with the uncached calibration's sensitivity, and repeat. The iterates are not monotone in quality, so
every (family, iteration) plan is a candidate, scored closed-loop on validation seeds
(:class:`cachec.evaluation.Validation`).

:func:`search_plan` is that search (schedule families × refinements × mask search × predictor pass, the best
three confirmed on fresh seeds: :func:`confirm`); ``cachec
compile`` (:mod:`cachec.pipeline_job`), ``scripts/make_shipped_plans.py`` and the ``cachec`` line of the peer
benchmark all run it. A refined plan records ``budget.options.refine = k`` (k trajectory calibrations, each
along the previous iterate); :func:`replan` rebuilds it deterministically from the uncached calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .evaluation import Validation, choose_plan
from .mask_search import MASK_RUNS, search_mask
from .planner import FAMILIES, spaced_masks
from .runtime.plan import Plan, write_plan


@dataclass
class Candidate:
    """One plan of the search.

    Attributes:
        family: schedule family (``free`` | ``step`` | ``group`` | ``warmup``), or the planner method of a baseline.
        iteration: number k of trajectory refinements behind the plan (0: from the uncached calibration).
        plan: the plan as the planner made it (no ``sidecar`` entry: :meth:`write` names the sidecar after
            the file it writes).
        sidecar: its EOC tensors, ``{"eoc/{unit}/{step}[/{part}]": float32 array}`` (empty without EOC).
        path: the plan file written for the search.
        written: the plan as written at ``path`` (``source`` set, so its sidecar loads): what closed-loop
            runs apply.
        validation_psnr: mean per-image PSNR in dB against uncached sampling on the validation seeds
            (:class:`cachec.evaluation.Validation`), set by :func:`choose` (None before, or when the search had a
            single candidate).
        confirmation_psnr: the same on the confirmation seeds, for the candidates the search's last stage
            confirmed (None for the others).
        predictors: the predictor set's name (a key of :data:`cachec.planner.error_model.PREDICTOR_SETS`;
            ``fitted`` also when the plan was given its predictors as a list of names, as :func:`replan` does).
        variant: ``""``, or ``mask`` for the mask search's plan (:func:`mask_candidate`).
    """

    family: str
    iteration: int
    plan: Plan
    sidecar: dict
    path: Path
    written: Plan
    validation_psnr: float | None = None
    predictors: str = "fitted"
    variant: str = ""
    confirmation_psnr: float | None = None

    @property
    def name(self) -> str:
        """``"{family}/refine{iteration}"`` (``"{family}+{predictors}/refine{iteration}"`` for a predictor set
        other than ``fitted``; ``.../{variant}`` instead of ``.../refine{iteration}`` for a variant such as the
        mask search's ``mask``), the key of the closed-loop scores."""
        tag = self.family if self.predictors == "fitted" else f"{self.family}+{self.predictors}"
        return f"{tag}/{self.variant}" if self.variant else f"{tag}/refine{self.iteration}"

    def write(self, path: str | Path) -> Plan:
        """Write this plan (and its sidecar, named ``<path stem>.eoc.safetensors``) to ``path`` atomically.

        Returns:
            The :class:`Plan` as written (see :func:`cachec.runtime.plan.write_plan`).
        Raises:
            PlanError: the plan violates the schema.
        """
        return write_plan(self.plan, path, self.sidecar or None)


def _candidate(family: str, iteration: int, plan: Plan, sidecar: dict, path: Path, predictors: str = "fitted",
               variant: str = "") -> Candidate:
    return Candidate(family, iteration, plan, sidecar, path, write_plan(plan, path, sidecar or None),
                     predictors=predictors, variant=variant)


def refined_plans(driver, calibration: str | Path, budget: float, *, family: str, iterations: int,
                  workdir: str | Path, calibrate_options: dict, method: str = "cachec", planner=None,
                  log: Callable[[str], None] | None = None, plan_options: dict | None = None) -> list[Candidate]:
    """The plan of one family at ``budget`` and its ``iterations`` trajectory refinements.

    Args:
        driver: the loaded model (:func:`cachec.loading.load_model`).
        calibration: the uncached calibration file (its sensitivity is reused by every refinement).
        budget: FLOPs fraction (0, 1].
        family: schedule family (``free`` | ``step`` | ``group`` | ``warmup``).
        iterations: number of refinements k >= 0 (k + 1 plans are returned).
        workdir: folder for the plan and trajectory-calibration files (created); plans are
            ``plan-{family}-{1000·budget}-r{k}.yaml``.
        calibrate_options: keyword arguments of :func:`cachec.calibrate.calibrate` for the trajectory runs
            (conditions, samples_per_condition, batch_size, seed, ... as in the uncached calibration).
        method: planner method (refinement is defined for ``cachec``).
        planner: a :class:`cachec.planner.Planner` of ``calibration`` to reuse for iteration 0 (saves loading
            the file and building its segment table once per family).
        log: progress printer.
        plan_options: further planner options of ``method`` (e.g. ``fill``, ``mask``; see
            :func:`cachec.planner.make_plan`), the same for every iterate.
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
    plan_options = dict(plan_options or {})
    pset = plan_options.get("predictors", "fitted")
    pset = pset if isinstance(pset, str) else "fitted"  # a list of names (as replan passes them)
    tag = f"{family}-{round(1000 * budget)}" + ("" if pset == "fitted" else f"-{pset}")
    options = dict(calibrate_options)
    conditions = options.pop("conditions")
    options.update(sensitivity="none", progress=False, restart=True)
    out = []
    cal_path = Path(calibration)
    for k in range(int(iterations) + 1):
        if k or planner is None:
            planner = Planner(load_calibration(str(cal_path)))
        plan, side = planner.plan(budget, method, family=family, **plan_options)
        if k:
            plan.budget.options["refine"] = k
        cand = _candidate(family, k, plan, side, work / f"plan-{tag}-r{k}.yaml", predictors=pset)
        out.append(cand)
        if k == iterations:
            break
        if log:
            log(f"    refining {family} at {100 * budget:.0f}%: calibration along iteration {k}")
        cal_path = calibrate(driver, conditions, output=work / f"calib-{tag}-along-r{k}.safetensors",
                             along=cand.written, sensitivity_from=calibration, **options)
    return out


def choose(driver, candidates: Sequence[Candidate], conditions, seeds, validation: Validation | None = None) -> Candidate:
    """The candidate closest to uncached sampling on ``conditions``/``seeds`` (sets ``validation_psnr``).

    Ties go to the first candidate in ``candidates`` order (:func:`cachec.evaluation.choose_plan`, which
    reuses ``validation``'s reference when given).
    """
    pick, scores = choose_plan(driver, {c.name: c.written for c in candidates}, conditions, seeds, validation=validation)
    for c in candidates:
        c.validation_psnr = scores[c.name]
    return next(c for c in candidates if c.name == pick)


@dataclass
class Search:
    """Outcome of :func:`search_plan`.

    Attributes:
        best: the chosen candidate.
        candidates: every candidate, family by family (in ``families`` order), iterations in order.
        validation: ``(conditions, seeds)`` of the closed-loop choice, or None (one candidate: no choice run).
        mask_search: the third stage's record (:func:`mask_candidate`: ``start``, ``start_mask``, ``mask``,
            ``moves``, ``runs``, ``start_runs``, ``psnr_db``), or None where it did not run.
        confirmation: the fifth stage's record (:func:`confirm`: ``images``, ``first_seed``, ``runs``,
            ``psnr_db`` = ``{name: mean PSNR over validation and confirmation images}``), or None where it did
            not run.
    """

    best: Candidate
    candidates: list[Candidate]
    validation: tuple[list, list[int]] | None
    mask_search: dict | None = None
    confirmation: dict | None = None


#: schedule families of the plan search: the DP families and the peer-shaped ``warmup`` family
SEARCH_FAMILIES = FAMILIES + ("warmup",)
#: predictor sets of the plan search (:data:`cachec.planner.error_model.PREDICTOR_SETS`)
SEARCH_PREDICTORS = ("fitted", "taylor")
#: candidates of the first stage refined along their own trajectories
REFINE_TOP = 2
#: families whose plans are a step mask plus the budget fill: where the mask search starts
MASK_FAMILIES = ("step", "warmup")
#: candidates the last stage re-scores on fresh seeds
CONFIRM_TOP = 3
#: confirmation images per validation image (the validation conditions repeated with new seeds)
CONFIRM_REPEATS = 2


def confirmation_seeds(validation_seeds: Sequence[int], images: int, repeats: int = CONFIRM_REPEATS) -> list[int]:
    """Seeds of the confirmation set: ``images · repeats`` consecutive seeds just above ``validation_seeds``.

    Raises:
        ValueError: ``repeats`` < 1, or the seeds would reach the evaluation seeds
            (:data:`cachec.evaluation.EVAL_SEED`).
    """
    from .evaluation import EVAL_SEED

    if repeats < 1:
        raise ValueError(f"confirmation repeats must be >= 1, got {repeats}")
    first, n = max(int(x) for x in validation_seeds) + 1, int(images) * int(repeats)
    if first + n > EVAL_SEED:
        raise ValueError(f"confirmation seeds {first}..{first + n - 1} reach the evaluation seeds ({EVAL_SEED}+): "
                         f"use validation seeds further below")
    return list(range(first, first + n))


def _score(c: Candidate) -> float:
    """``c.validation_psnr``, NaN (a plan that diverged) ranked last."""
    v = c.validation_psnr
    return float("-inf") if v is None or math.isnan(v) else float(v)


def confirm(driver, candidates: Sequence[Candidate], validation: Validation, *, top: int = CONFIRM_TOP,
            repeats: int = CONFIRM_REPEATS) -> tuple[Candidate, dict]:
    """The search's last stage: the ``top`` candidates best on validation re-scored on fresh seeds, the winner
    chosen on all images together.

    Every earlier stage keeps a candidate only when it scores best on the same validation images, so the
    winner's validation score is biased upwards (winner's curse), most where candidates differ by less than
    the noise of 20 images (docs/planner.md, "Confirmation: the search's fifth stage"). The confirmation set is
    the validation conditions repeated ``repeats`` times with new seeds (:func:`confirmation_seeds`); each of
    the ``top`` candidates gets one run on it, and the one with the highest mean PSNR over validation and
    confirmation images together wins (ties: the better on validation).

    Args:
        driver: the loaded model.
        candidates: scored candidates (``validation_psnr`` set), at least one.
        validation: the :class:`cachec.evaluation.Validation` they were scored on.
        top: how many to confirm (>= 1).
        repeats: confirmation images per validation image (>= 1).
    Returns:
        ``(best, record)``: record has ``images``, ``first_seed``, ``runs`` and ``psnr_db`` (the combined mean
        per confirmed candidate's name). Sets ``confirmation_psnr`` on the confirmed candidates.
    Raises:
        ValueError: ``top`` or ``repeats`` < 1, no candidates, or the seeds would reach the evaluation seeds.
    """
    if top < 1 or not candidates:
        raise ValueError(f"confirm needs top >= 1 and candidates, got top={top}, {len(candidates)} candidate(s)")
    seeds = confirmation_seeds(validation.seeds, validation.images, repeats)
    n = len(seeds)
    checker = Validation(driver, validation.conditions * int(repeats), seeds, validation.steps, validation.guidance,
                         batch_size=validation.batch_size)
    ranked = sorted(candidates, key=lambda c: -_score(c))[:int(top)]
    combined = {}
    for c in ranked:
        c.confirmation_psnr = checker.score(c.written)
        v = (validation.images * _score(c) + n * c.confirmation_psnr) / (validation.images + n)
        combined[c.name] = float("-inf") if math.isnan(v) else v
    best = max(ranked, key=lambda c: combined[c.name])
    return best, {"images": n, "first_seed": seeds[0], "runs": checker.runs, "psnr_db": combined}


def mask_candidate(planner, budget: float, start: Candidate, validation: Validation, workdir: str | Path,
                   max_runs: int = MASK_RUNS, log: Callable[[str], None] | None = None) -> tuple[Candidate | None, dict]:
    """The search's third stage: :func:`cachec.mask_search.search_mask` from a first-stage ``step`` or
    ``warmup`` candidate's mask (its schedule without the fill), with its predictor set.

    Args:
        planner: the :class:`cachec.planner.Planner` of the uncached calibration ``start`` was made with.
        budget: FLOPs fraction (0, 1].
        start: a scored first-stage candidate of a family in :data:`MASK_FAMILIES` (refinement 0).
        validation: the :class:`cachec.evaluation.Validation` ``start`` was scored on.
        workdir: folder of the trial plans (``plan-mask-trial.yaml``, rewritten per run and removed at the
            end) and of the result (``plan-step-{1000·budget}-{predictors}-mask.yaml``).
        max_runs: validation runs to spend.
    Returns:
        ``(candidate, record)``: the ``step`` plan of the best mask found (variant ``mask``, scored), or None
        when no move beat the start; the record of :attr:`Search.mask_search`.
    """
    pset = start.predictors
    base = planner.schedule(budget, "cachec", family=start.family, predictors=pset, fill=False)
    mask = [s for s in range(base.compute.shape[1]) if base.compute[:, s].all()]
    work = Path(workdir)

    def score(m):
        plan, side = planner.plan(budget, "cachec", family="step", mask=m, predictors=pset)
        return validation.score(write_plan(plan, work / "plan-mask-trial.yaml", side or None))

    starts = spaced_masks(planner.cal, budget, keep_last=int(base.options.get("keep_last", 0)))
    found = search_mask(planner, budget, mask, start.validation_psnr, score, predictors=pset, max_runs=max_runs, log=log,
                        starts=starts)
    for trial in ("plan-mask-trial.yaml", "plan-mask-trial.eoc.safetensors"):  # the last trial, not a candidate
        (work / trial).unlink(missing_ok=True)
    record = {"start": start.name, "start_mask": mask, "mask": found.mask, "moves": found.moves, "runs": found.runs,
              "start_runs": found.start_runs, "psnr_db": found.psnr}
    if not found.moves:
        return None, record
    plan, side = planner.plan(budget, "cachec", family="step", mask=found.mask, predictors=pset)
    cand = _candidate("step", 0, plan, side, work / f"plan-step-{round(1000 * budget)}-{pset}-mask.yaml",
                      predictors=pset, variant="mask")
    cand.validation_psnr = found.psnr
    return cand, record


def pass_candidate(planner, budget: float, base: Candidate, validation: Validation, workdir: str | Path
                   ) -> Candidate | None:
    """The search's fourth stage: ``base``'s schedule with every skipped step's predictor re-chosen under the
    trajectory-coherent price (planner option ``predictor_pass: trajectory``,
    :func:`cachec.planner.predictor_pass.choose_predictors`; the same computed steps and FLOPs), scored on
    ``validation``.

    Args:
        planner: the :class:`cachec.planner.Planner` of the uncached calibration ``base`` was made with.
        budget: FLOPs fraction (0, 1].
        base: a scored candidate of refinement 0 (a first-stage plan or the mask search's).
        validation: the :class:`cachec.evaluation.Validation` ``base`` was scored on.
        workdir: folder of the result (``plan-{family}-{1000·budget}-{predictors}-{variant}.yaml``).
    Returns:
        The scored candidate (variant ``pass``, or ``mask+pass`` on the mask search's plan), or None where
        the pass changes no predictor (the plan would be ``base`` again).
    """
    opts = base.plan.budget.options
    options = replan_options(opts)
    options["predictor_pass"] = "trajectory"
    plan, side = planner.plan(budget, "cachec", family=opts.get("family", base.family), **options)
    if not plan.budget.options.get("repredicted"):
        return None
    variant = f"{base.variant}+pass" if base.variant else "pass"
    cand = _candidate(base.family, 0, plan, side,
                      Path(workdir) / f"plan-{base.family}-{round(1000 * budget)}-{base.predictors}-{variant}.yaml",
                      predictors=base.predictors, variant=variant)
    cand.validation_psnr = validation.score(cand.written)
    return cand


def search_plan(driver, calibration: str | Path, budget: float, *, workdir: str | Path, calibrate_options: dict,
                validation, families: Sequence[str] = SEARCH_FAMILIES,
                predictor_sets: Sequence[str] = SEARCH_PREDICTORS, iterations: int = 2, refine_top: int = REFINE_TOP,
                mask_runs: int = MASK_RUNS, predictor_pass: bool = True, confirm_top: int = CONFIRM_TOP,
                method: str = "cachec", planner=None,
                log: Callable[[str], None] | None = None,
                planned: Callable[[list[Candidate]], None] | None = None) -> Search:
    """cachec's plan search (docs/planner.md, "The plan search"), in five stages.

    1. Every (family, predictor set) plan from the uncached calibration (no refinement), scored closed-loop
       on the validation seeds: ``len(families) * len(predictor_sets)`` validation runs.
    2. The ``refine_top`` best of them refined ``iterations`` times along their own cached trajectories
       (:func:`refined_plans`: one trajectory calibration per iterate), the iterates scored the same way:
       ``refine_top * iterations`` more validation runs and trajectory calibrations.
    3. The mask search (:func:`mask_candidate`) from the best first-stage ``step`` or ``warmup`` plan:
       the spaced masks (:func:`cachec.planner.spacing.spaced_masks`, at most 11 validation runs), then at
       most ``mask_runs`` local moves, no calibration.
    4. The predictor pass (:func:`pass_candidate`) on the best candidate made from the uncached calibration
       (stages 1 and 3): one more validation run, where the pass changes any predictor.
    5. The confirmation (:func:`confirm`): the ``confirm_top`` best candidates of all stages re-scored on
       :data:`CONFIRM_REPEATS` × as many fresh seeds; the best over validation and confirmation images wins.

    Closed-loop scores are mean per-image PSNR against uncached sampling (:class:`cachec.evaluation.Validation`).

    Args:
        driver: the loaded model (:func:`cachec.loading.load_model`).
        calibration: the uncached calibration file.
        budget: FLOPs fraction (0, 1].
        workdir: folder of the candidate plans and trajectory calibrations (created).
        calibrate_options: as :func:`refined_plans`.
        validation: ``(conditions, seeds)`` of the closed-loop choice (disjoint from the calibration and
            evaluation seeds), or a function returning them; only used with more than one candidate.
        families: schedule families to solve (``cachec`` only; :data:`SEARCH_FAMILIES`).
        predictor_sets: names of :data:`cachec.planner.error_model.PREDICTOR_SETS` (``cachec`` only).
        iterations: refinements of each refined candidate, >= 0 (``cachec`` only).
        refine_top: how many first-stage candidates are refined (>= 0).
        mask_runs: validation runs of the mask search's local moves (0: no third stage; ``cachec`` only).
        predictor_pass: run the fourth stage (``cachec`` only).
        confirm_top: candidates of the fifth stage (0 or 1: no confirmation, the best on validation wins).
        method: ``cachec``, or a baseline method (then one candidate, ``workdir/plan.yaml``, no refinement).
        planner: a :class:`cachec.planner.Planner` of ``calibration`` to reuse (as :func:`refined_plans`).
        log: progress printer of the refinements.
        planned: called with the first-stage candidates once all are written, before they are scored.
    Returns:
        :class:`Search`; with a single candidate it is the best one and no validation sampling runs.
    Raises:
        ValueError: as :func:`refined_plans`, the planner and :func:`cachec.evaluation.choose_plan` raise; the
            confirmation seeds would reach the evaluation seeds (checked before any stage runs).
    """
    if method != "cachec":
        from .planner import Planner, load_calibration

        planner = planner or Planner(load_calibration(str(calibration)))
        plan, side = planner.plan(budget, method)
        cands = [_candidate(method, 0, plan, side, Path(workdir) / "plan.yaml")]
        if planned:
            planned(cands)
        return Search(cands[0], cands, None)
    if planner is None:
        from .planner import Planner, load_calibration

        planner = Planner(load_calibration(str(calibration)))
    cands: list[Candidate] = []
    for fam in families:
        for pset in predictor_sets:
            cands += refined_plans(driver, calibration, budget, family=fam, iterations=0, workdir=workdir,
                                   calibrate_options=calibrate_options, planner=planner,
                                   plan_options={"predictors": pset})
    if planned:
        planned(cands)
    shaped = [c for c in cands if c.family in MASK_FAMILIES]
    if len(cands) == 1 and not (iterations and refine_top) and not (mask_runs and shaped) and not predictor_pass:
        return Search(cands[0], cands, None)
    vconds, vseeds = validation() if callable(validation) else validation
    if confirm_top > 1:
        confirmation_seeds(vseeds, len(vconds))  # refuse a seed range that would fail after the other stages
    steps, guidance = cands[0].written.sampler.steps, cands[0].written.sampler.guidance.scale
    scorer = Validation(driver, vconds, vseeds, steps, guidance)
    best = choose(driver, cands, vconds, vseeds, scorer)
    if iterations and refine_top:
        ranked = sorted(cands, key=lambda c: -c.validation_psnr)[:int(refine_top)]
        more: list[Candidate] = []
        for c in ranked:
            more += refined_plans(driver, calibration, budget, family=c.family, iterations=iterations, workdir=workdir,
                                  calibrate_options=calibrate_options, planner=planner, log=log,
                                  plan_options={"predictors": c.predictors})[1:]
        choose(driver, more, vconds, vseeds, scorer)
        cands += more
    record = None
    if mask_runs and shaped:
        start = max(shaped, key=lambda c: c.validation_psnr)
        found, record = mask_candidate(planner, budget, start, scorer, workdir, mask_runs, log)
        cands += [found] if found is not None else []
    if predictor_pass:
        passed = pass_candidate(planner, budget, max((c for c in cands if c.iteration == 0),
                                                     key=lambda c: c.validation_psnr), scorer, workdir)
        cands += [passed] if passed is not None else []
    confirmation = None
    if confirm_top > 1 and len(cands) > 1:
        best, confirmation = confirm(driver, cands, scorer, top=confirm_top)
    else:
        top = max(c.validation_psnr for c in cands)
        best = next(c for c in cands if c.validation_psnr == top)
    return Search(best, cands, (list(vconds), list(vseeds)), record, confirmation)


def replan_options(options: dict) -> dict:
    """The planner options to pass again when rebuilding a plan from its ``budget.options``: every recorded
    solver option (``groups``, ``max_staleness``, ``keep_last``, ``ridge``, ``predictors``, ``mask``,
    ``interval``, ``fn_bn``, ``shrink``), ``fill`` (absent means False: plans made before the budget fill record
    nothing) and ``predictor_pass`` (absent means ``none``: plans made before the pass record nothing)."""
    out = {"fill": bool(options.get("fill", False)), "predictor_pass": options.get("predictor_pass", "none")}
    for key in ("groups", "max_staleness", "keep_last", "ridge", "predictors", "mask", "interval", "fn_bn", "shrink"):
        if options.get(key) is not None:
            out[key] = options[key]
    return out


def replan(driver, calibration: str | Path, budget: float, options: dict, workdir: str | Path,
           calibrate_options: dict, planner=None) -> tuple[Plan, dict]:
    """Rebuild a plan from its uncached calibration and its recorded options (``family``, ``refine`` and
    :func:`replan_options`); ``planner``: as :func:`refined_plans`.

    Returns:
        ``(plan, sidecar)`` of the last iterate (as :meth:`cachec.planner.Planner.plan` returns them).
    """
    k = int(options.get("refine", 0))
    cands = refined_plans(driver, calibration, budget, family=options.get("family", "free"), iterations=k,
                          workdir=workdir, calibrate_options=calibrate_options, planner=planner,
                          plan_options=replan_options(options))
    return cands[-1].plan, cands[-1].sidecar
