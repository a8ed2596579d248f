"""Make the shipped plans under plans/ (run by hand after training; not in CI).

For each reference model: calibrate (cachec.shipped.CALIBRATION), solve a plan of every schedule family at
each shipped budget and refine each REFINE times along its own cached trajectory (cachec.refine), keep the
plan closest to uncached sampling on validation seeds, write
plans/<model>-<pct>.yaml, evaluate it on held-out seeds and write plans/README.md with the results.

    python scripts/make_shipped_plans.py [--keep-choices] [digits-flow digits-ddim]

``--keep-choices`` skips the closed-loop search: each plan is re-made with the family and refinements
recorded in the shipped plan (``cachec.shipped.replan``, what tests/test_shipped_plans.py checks), e.g.
after a change of the calibration format; the table then also prints, per plan, the paired PSNR
difference new − old on the same held-out images with its 95 % bootstrap interval.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


from cachec.metrics import paired_difference
from cachec.evaluation import VALIDATION_SEED, evaluate_plan, held_out_set, validation_set
from cachec.loading import load_model
from cachec.planner import Planner, load_calibration
from cachec.refine import search_plan
from cachec.runtime.io import to_jsonable
import torch

from cachec.runtime.plan import load_plan
from cachec.runtime.plan_write import write_plan
from cachec.shipped import (
    BUDGETS, CALIBRATION_THREADS, PLANS_DIR, REFINE, REFINE_FOR, calibrate_reference, calibration_options, plan_name, replan,
)


def remake(model: str, results: dict) -> None:
    """Re-make ``model``'s shipped plans with their recorded family and refinements; evaluate; compare."""
    driver = load_model(model)
    conds, seeds = held_out_set(driver)
    with tempfile.TemporaryDirectory() as tmp:
        calib = calibrate_reference(model, Path(tmp) / "calib.safetensors", progress=True)
        old = {b: load_plan(PLANS_DIR / plan_name(model, b)) for b in BUDGETS[model]}
        made = replan(calib, model, {b: dict(p.budget.options) for b, p in old.items()}, Path(tmp) / "replan")
        for b, (plan, side) in made.items():
            path = PLANS_DIR / plan_name(model, b)
            before = results.get(path.stem)
            stale = path.with_name(f"{path.stem}.eoc.safetensors")
            if not side and stale.exists():
                stale.unlink()  # the re-made plan corrects nothing with EOC: no sidecar ships with it
            written = write_plan(plan, path, side or None)
            r = evaluate_plan(driver, written, conds, seeds, name=path.stem).result
            r["family"] = written.budget.options.get("family")
            r["refine"] = written.budget.options.get("refine", 0)
            results[path.stem] = to_jsonable(r)
            line = f"-> {path}: PSNR {r['psnr_db']['mean']:.2f} dB, FLOPs {r['flops_fraction']:.4f}"
            if before is not None and before.get("seeds") == r.get("seeds"):
                m, lo, hi = paired_difference([float(x) for x in r["psnr_db"]["per_image"]],
                                              [float(x) for x in before["psnr_db"]["per_image"]], cap=100.0)
                line += f"; new - old {m:+.3f} dB [{lo:+.3f}, {hi:+.3f}] (was {before['psnr_db']['mean']:.2f} dB)"
            print(line, flush=True)


def adherence_cell(r: dict) -> str:
    """Both-attribute adherence cached (uncached) of a prompt-model plan; "–" for class models."""
    a = (r.get("attribute_adherence") or {}).get("both")
    return "–" if not a else f"{100 * a['candidate']:.0f}% ({100 * a['reference']:.0f}%)"


def main(models: list[str], keep_choices: bool = False) -> None:
    torch.set_num_threads(CALIBRATION_THREADS)
    results = json.loads((PLANS_DIR / "results.json").read_text()) if (PLANS_DIR / "results.json").exists() else {}
    for model in models:
        if keep_choices:
            remake(model, results)
            continue
        driver = load_model(model)
        with tempfile.TemporaryDirectory() as tmp:
            calib = calibrate_reference(model, Path(tmp) / "calib.safetensors", progress=True)
            vconds, vseeds = validation_set(driver, 3, VALIDATION_SEED)
            conds, seeds = held_out_set(driver)
            planner = Planner(load_calibration(str(calib)))
            for b in BUDGETS[model]:
                search = search_plan(driver, calib, b, workdir=Path(tmp) / "cands", iterations=REFINE_FOR.get(model, REFINE),
                                     calibrate_options=calibration_options(driver), validation=(vconds, vseeds),
                                     planner=planner)
                for c in search.candidates:
                    print(f"{model} {b:.0%} {c.name}: realised {c.plan.budget.realised:.4f}, validation {c.validation_psnr:.2f} dB")
                path = PLANS_DIR / plan_name(model, b)
                plan = search.best.write(path)
                r = evaluate_plan(driver, plan, conds, seeds, name=path.stem).result
                r["family"] = plan.budget.options.get("family")
                r["refine"] = plan.budget.options.get("refine", 0)
                results[path.stem] = to_jsonable(r)
                print(f"-> {path}: PSNR {r['psnr_db']['mean']} dB, FLOPs {r['flops_fraction']:.4f}")
    (PLANS_DIR / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    rows = ["| plan | family | refinements | target | realised FLOPs (counted) | speed-up | PSNR dB | SSIM | class acc (uncached) | Fréchet (uncached) | both attributes (uncached) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items()):
        rows.append(f"| {name} | {r.get('family', '') or ''} | {r.get('refine', 0)} | {100 * r['budget_target']:.0f}% | {100 * r['flops_fraction']:.1f}% | "
                    f"{r['speedup']:.2f}x | {r['psnr_db']['mean']:.2f} | {r['ssim']['mean']:.4f} | "
                    f"{100 * r['class_accuracy']['candidate']:.0f}% ({100 * r['class_accuracy']['reference']:.0f}%) | "
                    f"{r['frechet_distance']['candidate']:.1f} ({r['frechet_distance']['reference']:.1f}) | {adherence_cell(r)} |")
    (PLANS_DIR / "README.md").write_text(
        "# Shipped plans\n\nCache plans for the reference models, made by `scripts/make_shipped_plans.py` "
        "(calibration settings in `cachec/shipped.py`; `tests/test_shipped_plans.py` checks the planner still "
        "produces them). Use: `cachec run plans/digits-flow-40.yaml` or `cachec eval plans/digits-flow-40.yaml`.\n\n"
        "Each plan is the best on validation seeds (30 samples, seeds 500000+; digits-mmdit: its 30 calibration prompts) of nine candidates: the free, step and "
        "group schedule families, each as solved from the uncached calibration and after 1 and 2 refinements along its "
        "own cached trajectory (`cachec/refine.py`; digits-mmdit: one refinement, six candidates).\n\n"
        "Measured on 100 held-out samples (10 per class, seeds 1000000+; digits-mmdit: its 30 held-out prompts 3 "
        "times each = 90, chance of matching both attributes 11 %) against uncached sampling on the same "
        "seeds; FLOPs counted with torch.utils.flop_counter over whole sampling calls; speed-up is wall-clock on "
        "the 2-core CPU machine that made them (batch 50, CFG batched; uncached and cached batches interleaved).\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    args = sys.argv[1:]
    keep = "--keep-choices" in args
    args = [a for a in args if a != "--keep-choices"]
    main(args or sorted(BUDGETS), keep_choices=keep)
