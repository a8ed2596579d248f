"""The main job: calibrate → plan → closed-loop check → evaluate, for one model and one FLOPs budget.

``cachec compile`` runs it. Every stage writes its file into one output folder, and a re-run reuses
what is already there (the calibration resumes or is reused when its file exists with the same settings).
Plan search (``family="auto"``, ``refine=2``, :func:`cachec.refine.search_plan`): the planner solves a
free per-unit schedule, a step-synchronous one, a block-group one and a warm-up + interval one, each with
the fitted predictors and with the Taylor set; every one of these plans runs closed-loop on *validation*
seeds (disjoint from the calibration and evaluation seeds), the two best are refined twice along their own
cached trajectories and scored the same way, the best step-shaped plan's computed steps are searched
closed-loop from spaced starts and one-step moves (:mod:`cachec.mask_search`), the best uncached candidate's
predictors are re-chosen along the trajectory, and the three best are confirmed on twice as many fresh seeds;
the plan closest to the uncached output over validation and confirmation images wins (predicted errors rank
plans of one family, but error propagation can reorder families and predictor sets: docs/planner.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .evaluation import (EVAL_SEED, VALIDATION_SEED, check_calibration_conditions, evaluate_plan, held_out_prompts,
                         spread)
from .mask_search import MASK_RUNS
from .refine import search_plan


@dataclass
class JobResult:
    """Files and numbers of one main-job run.

    Attributes:
        calibration: the uncached calibration file.
        plan: the chosen plan's file (``plan.yaml``).
        result: the evaluation record (also written to ``eval.json``).
        side_by_side: the PNG of uncached and cached samples.
        candidates: every :class:`cachec.refine.Candidate` of the search.
    """

    calibration: Path
    plan: Path
    result: dict
    side_by_side: Path
    candidates: list  # of cachec.refine.Candidate


def _calibration_matches(path: Path, driver, steps: int, guidance: float, spc: int, conditions: list,
                         attention_maps: bool = False) -> bool:
    from .calibrate.format import read_header
    from .runtime.fingerprint import weights_fingerprint

    try:
        h = read_header(path)
    except Exception:
        return False
    return (h["model"]["fingerprint"] == weights_fingerprint(driver.transformer) and h["steps"] == steps
            and abs(h["guidance"]["scale"] - guidance) < 1e-9 and h["samples_per_condition"] == spc
            and list(h["conditions"]) == list(conditions)
            and any(u["kind"] == "attn_map" for u in h["units"]) == bool(attention_maps))


def run_job(model: str | None = None, budget: float = 0.4, out_dir: str | Path = "cachec-out", *,
            method: str = "cachec", family: str = "auto", samples_per_condition: int | None = None,
            eval_per_class: int = 10, validation_per_class: int = 3, sensitivity: str = "auto",
            refine: int = 2, mask_runs: int = MASK_RUNS, progress: bool = True, log=print, conditions=None,
            resolution: tuple[int, int] | None = None, attention_maps: bool = False) -> JobResult:
    """Run the whole compiler on ``model`` at ``budget`` and evaluate the plan against uncached sampling.

    Args:
        model: shipped name, folder or hub id (default: the embedded ``digits-flow``).
        budget: fraction (0, 1] of a full run's FLOPs.
        out_dir: folder for calib.safetensors, plan.yaml, eval.json and side_by_side.png (created).
        method: planner method (``cachec`` or a baseline).
        family: ``"free"``, ``"step"``, ``"group"``, ``"warmup"`` or ``"auto"`` (closed-loop choice among
            them on validation seeds; cachec only).
        samples_per_condition: calibration samples per condition (calibration seeds 0..N−1); None: about 40
            samples in all, ``max(1, round(40 / conditions))`` (4 per class of 10; 1 per prompt of 30).
        eval_per_class: evaluation samples per condition (seeds from :data:`EVAL_SEED`); text models are
            evaluated on :func:`cachec.evaluation.held_out_prompts` (as many samples in all).
        validation_per_class: samples per condition of the family choice (seeds from :data:`VALIDATION_SEED`).
        conditions: calibration conditions, or a callable ``driver -> conditions`` (default: every class, or
            the model's calibration prompt set).
        resolution: ``(H, W)`` pixels to sample at (pipelines that take a size), default the model's.
        sensitivity: calibration sensitivity method; ``auto``: ``factored`` where ``full`` would be affordable
            (the digit models), else ``chain`` (:func:`cachec.calibrate.sensitivity.resolve`).
        refine: trajectory refinements of each of the best first-stage candidates (:mod:`cachec.refine`);
            every iterate is a candidate of the closed-loop choice (cachec only; 0 = plans from the uncached
            calibration only).
        mask_runs: validation runs of the mask search, the plan search's third stage (cachec only; 0 = none).
        attention_maps: calibrate and plan attention-map units too (docs/hgc.md, "Fine grain").
        log: where progress lines go.

    Returns:
        :class:`JobResult`.

    Raises:
        ValueError: bad budget/model/options (the message says which), as the stages raise them.
    """
    from .calibrate.run import calibrate
    from .images import save_png, side_by_side
    from .loading import load_model
    from .planner import Planner, load_calibration
    from .refine import SEARCH_FAMILIES
    from .runtime.io import to_jsonable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    driver = load_model(model)
    driver.set_resolution(resolution)
    if callable(conditions):
        conditions = conditions(driver)
    if conditions is None and driver.prompt_sets.get("calibration"):
        conditions = list(driver.prompt_sets["calibration"])
    if conditions is None:
        if driver.condition_kind != "class":
            raise ValueError(f"{driver.name} is text-conditional: give calibration prompts (--prompt/--prompts)")
        conditions = list(range(driver.num_classes))
    conditions = driver.check_conditions(conditions)
    if samples_per_condition is None:
        samples_per_condition = max(1, round(40 / len(conditions)))
    check_calibration_conditions(conditions, 0, len(conditions) * samples_per_condition, driver)
    # samples per condition x conditions; a prompt set counts as 10 conditions (30 prompts would make 300 images)
    n_cond = len(conditions) if driver.condition_kind == "class" else min(len(conditions), 10)
    steps, guidance = driver.default_steps, driver.default_guidance
    calib = out / "calib.safetensors"
    if calib.exists() and _calibration_matches(calib, driver, steps, guidance, samples_per_condition, conditions,
                                               attention_maps):
        log(f"[1/4] calibration: reusing {calib}")
    else:
        log(f"[1/4] calibrating {driver.name}: {len(conditions)} {'classes' if driver.condition_kind == 'class' else 'prompts'} x {samples_per_condition} samples, "
            f"{steps} steps, guidance {guidance}")
        if sensitivity == "auto":  # factored for models where full is affordable, chain (O(S + U)) above
            from .calibrate.sensitivity import resolve
            from .runtime.units import find_units

            sensitivity = resolve("auto", len(find_units(driver.transformer, attention_maps)), steps, small="factored")
        calibrate(driver, conditions, output=calib, samples_per_condition=samples_per_condition, steps=steps,
                  guidance=guidance, sensitivity=sensitivity, progress=progress, restart=True,
                  attention_maps=attention_maps)
    families = list(SEARCH_FAMILIES) if family == "auto" else [family]
    cal_opts = dict(conditions=conditions, samples_per_condition=samples_per_condition, steps=steps, guidance=guidance)

    def planned(cands):
        log(f"[2/4] planned {method} at {100 * budget:.0f}%: {len(cands)} candidate(s) ("
            + ", ".join(f"{c.name} {100 * c.plan.budget.realised:.2f}%" for c in cands) + ")")

    search = search_plan(driver, calib, budget, workdir=out / "candidates", calibrate_options=cal_opts,
                         validation=lambda: _seeded(spread(conditions, validation_per_class * n_cond), VALIDATION_SEED),
                         families=families, iterations=refine, mask_runs=mask_runs, method=method,
                         planner=Planner(load_calibration(calib)), log=log, planned=planned)
    best, candidates = search.best, search.candidates
    if search.validation is not None:
        ms = search.mask_search
        if ms is not None:
            log(f"      mask search from {ms['start']}: {len(ms['moves'])} move(s) in {ms['runs']} validation runs, "
                f"steps {ms['start_mask']} -> {ms['mask']}")
        log("[3/4] closed-loop check on validation seeds (mean PSNR): "
            + ", ".join(f"{c.name} {c.validation_psnr:.2f} dB" for c in candidates))
        if search.confirmation is not None:
            cf = search.confirmation
            log(f"      confirmed on {cf['images']} more seeds ({cf['first_seed']}+), validation + confirmation: "
                + ", ".join(f"{k} {v:.2f} dB" for k, v in cf["psnr_db"].items()))
        log(f"      -> {best.name}")
    else:
        log("[3/4] closed-loop check skipped (one candidate)")
    plan_path = out / "plan.yaml"
    chosen = best.write(plan_path)
    eval_conditions = conditions if driver.condition_kind == "class" else held_out_prompts(driver)
    conds, seeds = _seeded(spread(eval_conditions, eval_per_class * n_cond), EVAL_SEED)
    log(f"[4/4] evaluating on {len(conds)} held-out samples (seeds {EVAL_SEED}+), uncached vs cached")
    run = evaluate_plan(driver, chosen, conds, seeds, name=f"{method} {100 * budget:.0f}%")
    run.result.update(model=driver.name, family=best.family, refine=best.iteration, predictors=best.predictors,
                      variant=best.variant,
                      mask_search=search.mask_search, confirmation=search.confirmation,
                      candidates=[{"family": c.family, "predictors": c.predictors, "refine": c.iteration, "path": str(c.path),
                                   "variant": c.variant,
                                   "realised": c.plan.budget.realised, "validation_psnr": c.validation_psnr,
                                   "confirmation_psnr": c.confirmation_psnr}
                                  for c in candidates])
    png = save_png(side_by_side(run.reference, run.cached, ncols=eval_per_class), out / "side_by_side.png")
    (out / "eval.json").write_text(json.dumps(to_jsonable(run.result), indent=2, allow_nan=False) + "\n")
    return JobResult(calib, plan_path, run.result, png, candidates)


def _seeded(conds: list, seed: int) -> tuple[list, list[int]]:
    return conds, [seed + i for i in range(len(conds))]


def job_table(result: dict) -> str:
    """The one-table summary of a main-job (or plan evaluation) result."""
    def f(v, spec):
        return "n/a" if v is None else (v if isinstance(v, str) else format(v, spec))

    acc = result.get("class_accuracy") or {}
    fd = result.get("frechet_distance") or {}
    psnr = result.get("psnr_db") or {}
    ssim = result.get("ssim") or {}
    head = ["budget", "realised FLOPs", "speed-up", "PSNR dB", "PSNR 95% CI", "SSIM", "class acc (ref)", "Fréchet (ref)"]
    both = ((result.get("attribute_adherence") or {}).get("both")) or None

    def ci(d):
        c = d.get("ci95")
        return "n/a" if not c else f"[{f(c[0], '.2f')}, {f(c[1], '.2f')}]"

    row = [
        f"{100 * result['budget_target']:.0f}%",
        f"{100 * result['flops_fraction']:.1f}%",
        f"{f(result.get('speedup'), '.2f')}x",
        f"{f(psnr.get('mean'), '.2f')} ± {f(psnr.get('std'), '.2f')}",
        ci(psnr),
        f"{f(ssim.get('mean'), '.4f')}",
        f"{f(acc.get('candidate'), '.1%')} ({f(acc.get('reference'), '.1%')})",
        f"{f(fd.get('candidate'), '.1f')} ({f(fd.get('reference'), '.1f')})",
    ]
    if both is not None:  # the prompt-conditioned digit model: both prompted attributes matched (chance 11 %)
        head.append("attributes (ref)")
        row.append(f"{f(both['candidate'], '.1%')} ({f(both['reference'], '.1%')})")
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), line(row)])
