"""FBCache's and DBCache's block shape as cachec plans, against the schedules cachec's plan search chooses from
(issue 20: "cachec ≥ any schedule + predictor a peer uses").

FBCache computes the first block at every step and caches the rest; cache-dit's DBCache computes the first
Fn and the last Bn blocks at every step. As a static cachec plan that is the step family with planner option
``fn_bn = [F, B]`` (:func:`cachec.planner.blocks.edge_blocks`): those blocks compute at every step, the
others share one DP mask fitted to what is left of the budget, and the budget fill tops it up. This script
runs, at each budget, the shapes (1, 0), (1, 1) and (2, 0) with both predictor sets beside the step and warmup
families of the plan search (both predictor sets, unrefined), all from one calibration with the shipped plans'
settings (:func:`cachec.shipped.calibrate_reference`), on held-out conditions and seeds
(:func:`cachec.evaluation.held_out_set`). PSNR is in dB against uncached sampling of the same seeds (mean
over images, capped at 100 dB per image); each Fn-Bn plan is paired image by image with the best search
family at that budget (mean difference, paired 95 % bootstrap interval). All numbers come from one process.

Usage (digits-flow, 30 plans, ≈ 8 min on one thread)::

    python bench/bench_block_shapes.py --model digits-flow --images 40 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import sampler  # noqa: E402
from cachec.evaluation import held_out_set  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402
from cachec.shipped import calibrate_reference  # noqa: E402

PSNR_CAP = 100.0
SHAPES = ((1, 0), (1, 1), (2, 0))
SEARCH = (("step", "fitted"), ("step", "taylor"), ("warmup", "fitted"), ("warmup", "taylor"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-flow")
    ap.add_argument("--budgets", default="0.25,0.4,0.6")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    conds, seeds = held_out_set(driver, args.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        planner = Planner(load_calibration(str(calibrate_reference(args.model, work / "calib.safetensors"))))
        images = sampler(driver)
        reference = images(conds, seeds)
        for budget in (float(b) for b in args.budgets.split(",")):
            scores = {}
            for name, opts in ([(f"{f}+{p}", dict(family=f, predictors=p)) for f, p in SEARCH]
                               + [(f"F{f}B{b}+{p}", dict(family="step", predictors=p, fn_bn=[f, b]))
                                  for f, b in SHAPES for p in ("fitted", "taylor")]):
                try:
                    plan, side = planner.plan(budget, "cachec", **opts)
                except ValueError as exc:  # the always-computed blocks alone exceed the budget
                    print(f"  {name} at {budget:.0%}: {exc}")
                    continue
                written = write_plan(plan, work / f"{name}-{round(100 * budget)}.yaml", side or None)
                with apply(driver, written):
                    scores[name] = psnr(images(conds, seeds), reference).clamp(max=PSNR_CAP)
                rows.append({"budget": budget, "plan": name, "realised_flops": plan.budget.realised,
                             "psnr_db": float(scores[name].mean()), "psnr_db_per_image": scores[name].tolist()})
            best = max((n for n in scores if not n.startswith("F")), key=lambda n: float(scores[n].mean()))
            print(f"\n{args.model} at {budget:.0%} ({args.images} images): best search family {best} "
                  f"{float(scores[best].mean()):.2f} dB")
            for r in rows:
                if r["budget"] != budget or r["plan"] not in scores:
                    continue
                m, lo, hi = paired_difference(scores[r["plan"]], scores[best])
                r.update(vs=best, margin_db=m, margin_ci_low=lo, margin_ci_high=hi)
                ci = "" if lo is None else f" [{lo:+.2f}, {hi:+.2f}]"
                print(f"  {r['plan']:14s} {100 * r['realised_flops']:5.1f} %  {r['psnr_db']:6.2f} dB  vs {best}: "
                      f"{m:+.2f}{ci}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "images": args.images, "rows": rows}, indent=1) + "\n",
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
