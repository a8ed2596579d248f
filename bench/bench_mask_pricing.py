"""How well each pricing ranks step masks and predictor rules: realised error vs run- and trajectory-coherent prices.

Issue 20 asks for pricing what the additive model misses, among it the propagation of errors along the
cached trajectory. The planner's segment prices sum a unit's weighted errors coherently within each run of
skipped steps (``||Σ_{s∈R} √w_s e_s||²`` per run R); a lagging reuse makes errors of the same sign in every
run, so across runs they add up as well. :func:`cachec.planner.schedule_error` with
``coherence="trajectory"`` sums them over all of a unit's skipped steps.

For one calibration (the compile-like one: ``--cal`` conditions, seed 0, factored sensitivity) this script
plans the step family on ``--masks`` (each a list of computed steps, no fill) with plain reuse only and with
the ``forecast`` set (:data:`cachec.planner.error_model.PREDICTOR_SETS`), samples each plan on 20 held-out
images (:func:`cachec.evaluation.held_out_set`, seeds 1000000+), and prints, per plan, both prices, the
realised error (mean squared difference of the [0, 1] images) and the PSNR, then Spearman's rank
correlation of each price with the realised error over all plans and within each predictor rule.

Usage (≈ 8 min on one thread)::

    python bench/bench_mask_pricing.py --model digits-mmdit --cal 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import PSNR_CAP, add_study_args, open_study, plan_images, study_calibration  # noqa: E402
from cachec.metrics import psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, schedule_error  # noqa: E402

#: 10-step masks of 25 steps (40.4 % of the FLOPs on digits-mmdit): SeaCache's realised steps at threshold 1.2,
#: dense-early and uniform shapes, and the step DP's neighbours (docs/planner.md)
MASKS = ("0,2,5,8,11,14,17,20,23,24;0,1,3,5,7,9,12,15,18,22;0,1,2,3,6,8,11,14,17,21;0,1,2,5,8,11,14,17,20,23;"
         "0,1,3,5,8,11,14,17,21,24;0,3,6,9,12,15,18,21,23,24;0,1,2,4,6,9,12,15,19,23;0,1,3,6,9,12,15,18,21,24;"
         "0,2,4,6,8,10,13,16,19,22;0,1,2,3,4,6,9,13,18,24")
RULES = (("reuse", ("reuse",)), ("forecast", "forecast"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--masks", default=MASKS, help="';'-separated masks, each ','-separated computed steps")
    args = ap.parse_args(argv)
    st = open_study(args)
    driver, steps, g, generate = st.driver, st.steps, st.guidance, st.generate
    cal_conds, ev_conds, ev_seeds = st.cal_conds, st.ev_conds, st.ev_seeds
    masks = [[int(x) for x in m.split(",")] for m in args.masks.split(";") if m]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = study_calibration(driver, cal_conds, steps, g, work / "calib.safetensors")
        reference = generate(ev_conds, ev_seeds)
        planner = Planner(load_calibration(str(cal_path)))
        budget = 1.0
        for mask in masks:
            for rule, pset in RULES:
                sched = planner.schedule(budget, "cachec", family="step", mask=mask, fill=False, predictors=pset)
                plan, side = planner.plan(budget, "cachec", family="step", mask=mask, fill=False, predictors=pset)
                model = planner.error_model(pset)
                out = plan_images(driver, generate, plan, side, work / "plan.yaml", ev_conds, ev_seeds)
                row = {"mask": mask, "rule": rule, "run": schedule_error(model, sched),
                       "trajectory": schedule_error(model, sched, coherence="trajectory"),
                       "realised": float(((out - reference) ** 2).mean()),
                       "psnr": float(psnr(out, reference).clamp(max=PSNR_CAP).mean()), "flops": plan.budget.realised}
                rows.append(row)
                print(f"{','.join(map(str, mask)):32s} {rule:8s} {row['flops']:.2%}  run {row['run']:.4g}  trajectory "
                      f"{row['trajectory']:.4g}  realised {row['realised']:.4g}  PSNR {row['psnr']:.2f} dB", flush=True)
    for price in ("run", "trajectory"):
        parts = [("all", rows)] + [(rule, [r for r in rows if r["rule"] == rule]) for rule, _ in RULES]
        print(f"{price:10s} Spearman vs realised: " + ", ".join(
            f"{name} {stats.spearmanr([r[price] for r in sub], [r['realised'] for r in sub]).statistic:+.3f}"
            for name, sub in parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
