"""The predictor pass (planner option ``predictor_pass: trajectory``, planner/predictor_pass.py) measured on
held-out images: the same plans with and without it.

For one model and budget, from the studies' calibration (:func:`bench.study.study_calibration`, the benchmark's
settings), each ``--family`` (DP or warmup mask) and each ``--mask`` (a step-family plan on those computed steps,
filled or trimmed into the budget) is planned with the ``--predictors`` set twice: as the solver chooses and with
the pass. Both run on ``--test`` held-out images (seeds 1000000+) against uncached sampling; the line gives both
plans' run-coherent and trajectory-coherent prices, PSNR (dB, capped) and the paired 95 % bootstrap interval of
pass − solver (:func:`cachec.metrics.paired_difference`). With ``--validation K`` both plans also run on
validation images (:func:`cachec.evaluation.validation_set`, seeds 500000+; on a prompt model its calibration
prompts): the benchmark search's 20 (2 per class) and a larger set of K per class, scored both ways a
closed-loop choice could score them: the mean per-image PSNR capped at 100 dB (the search's score since
2026-12-07, :class:`cachec.evaluation.Validation`) and the PSNR of the pooled MSE (its score before).

Usage (≈ 4 min on one thread for digits-mmdit, 3 plans, 30 images)::

    python bench/bench_predictor_pass.py --model digits-mmdit --budget 0.4 --test 30 \\
        --mask 0,1,3,5,7,9,12,15,18,22 --mask 0,1,3,5,8,10,13,16,19,22
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import PSNR_CAP, add_study_args, open_study, sampler, study_calibration  # noqa: E402
from cachec.evaluation import PSNR_CAP_DB, held_out_set, validation_set  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, schedule_error  # noqa: E402
from cachec.planner.plan import build_plan  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--predictors", default="taylor")
    ap.add_argument("--family", action="append", default=None, help="DP families to compare (default: step)")
    ap.add_argument("--mask", action="append", default=[], help="step-family plans on these computed steps (repeatable)")
    ap.add_argument("--test", type=int, default=30, help="held-out test images")
    ap.add_argument("--validation", type=int, default=0,
                    help="also score on the search's validation images, K per class (0: no)")
    args = ap.parse_args(argv)
    st = open_study(args)
    driver, b, pset = st.driver, args.budget, args.predictors
    plans = [(f, dict(family=f)) for f in (args.family or ["step"])]
    plans += [(m, dict(family="step", mask=[int(x) for x in m.split(",")])) for m in args.mask]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        planner = Planner(load_calibration(str(study_calibration(driver, st.cal_conds, st.steps, st.guidance,
                                                                 work / "calib.safetensors"))))
        model = planner.error_model(pset)
        conds, seeds = held_out_set(driver, args.test)
        generate = sampler(driver, st.steps, st.guidance)
        reference = generate(conds, seeds)

        vsets = [(k, *validation_set(driver, k)) for k in sorted({2, args.validation})] if args.validation else []
        vrefs = [generate(c, sd) for _, c, sd in vsets]

        def run(sched):
            plan, side = build_plan(planner.cal, model, sched, "cachec", b)
            with apply(driver, write_plan(plan, work / "plan.yaml", side or None)):
                for (k, vc, vs), vref in zip(vsets, vrefs):
                    img = generate(vc, vs)
                    mse = float((img.double() - vref.double()).pow(2).mean())
                    mean = float(psnr(img, vref).clamp(max=PSNR_CAP_DB).mean())
                    pooled = math.inf if mse == 0 else 10 * math.log10(1 / mse)
                    print(f"    validation, {len(vc):3d} images ({k} per class): mean per-image PSNR {mean:.2f} dB, "
                          f"PSNR of the pooled MSE {pooled:.2f} dB", flush=True)
                return psnr(generate(conds, seeds), reference).clamp(max=PSNR_CAP), plan.budget.realised

        for name, opts in plans:
            scores = []
            for ppass in ("none", "trajectory"):
                sched = planner.schedule(b, "cachec", predictors=pset, predictor_pass=ppass, **opts)
                p, r = run(sched)
                scores.append(p)
                print(f"{name:34s} {pset:7s} pass {ppass:10s} realised {r:.2%}  run price "
                      f"{schedule_error(model, sched):.4g}  trajectory price "
                      f"{schedule_error(model, sched, coherence='trajectory'):.4g}  changed "
                      f"{sched.options.get('repredicted', 0):4d}  PSNR {float(p.mean()):.2f} dB", flush=True)
            d, lo, hi = paired_difference(scores[1], scores[0])
            print(f"{name:34s} pass − solver: {d:+.2f} [{lo:+.2f}, {hi:+.2f}] dB ({args.test} images)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
