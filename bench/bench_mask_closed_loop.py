"""The plan search's third stage, the closed-loop mask search (cachec/mask_search.py), measured on held-out images.

From the step family's DP mask (or the warmup family's mask) with one predictor set, :func:`cachec.mask_search.
search_mask` moves one computed step at a time, scored on the benchmark's validation set (20 images,
:func:`cachec.evaluation.validation_set` with 2 per class or 20 calibration prompts, seeds 500000+). The start
and the mask found are then sampled on ``--test`` held-out images (seeds 1000000+) against uncached sampling,
with the paired 95 % bootstrap interval of found − start (:func:`cachec.metrics.paired_difference`);
``--mask`` adds fixed masks to the same comparison; ``--random-order SEED`` scores the neighbours in a
random order instead of by price (how far a validation gain carries over to held-out images); ``--spaced`` scores the spaced masks first
(:func:`cachec.planner.spaced_masks`), as the plan search does.

The calibration is the studies' (:func:`bench.study.study_calibration`: ``--cal`` conditions, one sample
each, factored sensitivity on 4 samples), the benchmark's settings.

Usage (≈ 4 min on one thread for digits-mmdit, 16 runs, 100 test images)::

    python bench/bench_mask_closed_loop.py --model digits-mmdit --cal 30 --budget 0.4 --test 100
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import PSNR_CAP, add_study_args, open_study, sampler, study_calibration  # noqa: E402
from cachec.evaluation import Validation, held_out_set, validation_set  # noqa: E402
from cachec.mask_search import MASK_RUNS, search_mask  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, spaced_masks  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--predictors", default="taylor")
    ap.add_argument("--family", choices=["step", "warmup"], default="step", help="whose mask the search starts from")
    ap.add_argument("--runs", type=int, default=MASK_RUNS, help=f"validation runs (default {MASK_RUNS}, as compile)")
    ap.add_argument("--test", type=int, default=100, help="held-out test images")
    ap.add_argument("--mask", action="append", default=[], help="a fixed mask to compare too, e.g. 0,1,3,5 (repeatable)")
    ap.add_argument("--spaced", action="store_true",
                    help="score the spaced masks first (cachec.planner.spaced_masks), as cachec compile's search does")
    ap.add_argument("--random-order", type=int, default=None, metavar="SEED",
                    help="score the neighbours in a random order (this seed) instead of by price: how much of a "
                         "validation gain is the validation set's noise")
    args = ap.parse_args(argv)
    st = open_study(args)
    driver, b, pset = st.driver, args.budget, args.predictors

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        planner = Planner(load_calibration(str(study_calibration(driver, st.cal_conds, st.steps, st.guidance,
                                                                 work / "calib.safetensors"))))

        def written(mask=None):
            opts = dict(family="step", mask=mask) if mask is not None else dict(family=args.family)
            plan, side = planner.plan(b, "cachec", predictors=pset, **opts)
            return write_plan(plan, work / "plan.yaml", side or None)

        base = planner.schedule(b, "cachec", family=args.family, predictors=pset, fill=False)
        start = [s for s in range(base.compute.shape[1]) if base.compute[:, s].all()]
        val = Validation(driver, *validation_set(driver, 2), st.steps, st.guidance)
        s0 = val.score(written())
        t = time.perf_counter()
        rng = None if args.random_order is None else random.Random(args.random_order)
        found = search_mask(planner, b, start, s0, lambda m: val.score(written(m)), predictors=pset,
                            max_runs=args.runs, log=print, rank=None if rng is None else (lambda m: rng.random()),
                            starts=spaced_masks(planner.cal, b, keep_last=int(base.options["keep_last"])) if args.spaced else ())
        print(f"{args.family}+{pset} at {b:.0%}: start {start} {s0:.2f} dB -> {found.mask} {found.psnr:.2f} dB on the "
              f"validation set ({found.runs} runs, {len(found.moves)} moves, {time.perf_counter() - t:.0f} s)", flush=True)

        conds, seeds = held_out_set(driver, args.test)
        generate = sampler(driver, st.steps, st.guidance)
        reference = generate(conds, seeds)

        def test(plan):
            with apply(driver, plan):
                return psnr(generate(conds, seeds), reference).clamp(max=PSNR_CAP), plan.budget.realised

        p0, r0 = test(written())
        print(f"  test ({args.test} images): start {float(p0.mean()):.2f} dB at {r0:.2%}")
        for name, m in [("found", found.mask)] + [(t, [int(x) for x in t.split(",")]) for t in args.mask]:
            p1, r1 = test(written(m))
            d, lo, hi = paired_difference(p1, p0)
            print(f"  test: {name} {m} {float(p1.mean()):.2f} dB at {r1:.2%}: {d:+.2f} [{lo:+.2f}, {hi:+.2f}] vs start",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
