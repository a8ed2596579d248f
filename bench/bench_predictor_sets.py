"""Every (schedule family, predictor set) plan at each budget, and SeaCache at one threshold, on held-out images.

Why a ``forecast`` predictor set (docs/planner.md, "Predictor sets"): SeaCache forecasts the block stack's
residual to first order on every cached step, and the sum of per-unit first-order forecasts is that forecast,
but cachec's ``taylor`` set chooses reuse or the forecast per (unit, step) by the judged error. This script
plans each family (free, step, group, warmup) with each set (fitted, taylor, forecast) from one uncached
calibration and measures PSNR vs uncached on the benchmark's 20 held-out images (classes 0-9 × 2, or the
prompt model's held-out prompts; seeds 1000000+), paired with SeaCache (diffusers ``apply_sea_cache``) at
``--threshold`` by a 95 % bootstrap interval (:func:`cachec.metrics.paired_difference`). SeaCache runs at
that one threshold (1.2: about 40 % of the FLOPs on the digit models, not measured here), so its pairs
are matched in FLOPs only at the 40 % budget.

The calibration: ``--cal`` conditions (the first calibration prompts, or classes cycled), seed 0, factored
sensitivity with 4 samples (the benchmark's 20 for class models; ``cachec compile``'s 30 for prompt models).

Usage (≈ 12 min per budget on one thread)::

    python bench/bench_predictor_sets.py --model digits-mmdit --cal 30 --budgets 0.4
    python bench/bench_predictor_sets.py --model digits-flow --cal 20 --budgets 0.4,0.25,0.6
    python bench/bench_predictor_sets.py --model digits-flow --cal 20 --budgets 0.4,0.25,0.6 --families step,warmup \
        --shrink-ridges 10,100

``--shrink-ridges`` adds the fitted set with its ridge pulled towards the forecast instead of reuse
(planner options ``shrink: taylor``, ``ridge``; :class:`cachec.planner.error_model.ErrorModel`), each also
paired with the taylor set of the same family and budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers.core import BenchContext  # noqa: E402
from bench.peers.sea_cache import SeaCacheMethod  # noqa: E402
from bench.study import PSNR_CAP, add_study_args, open_study, plan_images, study_calibration  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration  # noqa: E402

FAMILIES = ("step", "warmup", "free", "group")
SETS = ("fitted", "taylor", "forecast")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--threshold", type=float, default=1.2, help="SeaCache's threshold (1.2: its 40 %% point)")
    ap.add_argument("--budgets", default="0.4", help="comma-separated FLOPs fractions")
    ap.add_argument("--shrink-ridges", default="",
                    help="also the fitted set with its ridge pulled towards the forecast (shrink: taylor) at these ridges")
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    st = open_study(args)
    driver, steps, g, generate = st.driver, st.steps, st.guidance, st.generate
    cal_conds, ev_conds, ev_seeds = st.cal_conds, st.ev_conds, st.ev_seeds

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = study_calibration(driver, cal_conds, steps, g, work / "calib.safetensors")
        reference = generate(ev_conds, ev_seeds)
        ctx = BenchContext(driver=driver, steps=steps, guidance=g, calib_conditions=cal_conds[:20],
                           calib_seeds=list(range(20)), workdir=str(work), batch_size=10, sensitivity="factored",
                           sensitivity_samples=4, log=print)
        outs = []
        for i in range(0, 20, 10):
            session = SeaCacheMethod().session(ctx, args.threshold)
            session.begin()
            try:
                outs.append(driver.generate(ev_conds[i:i + 10], ev_seeds[i:i + 10], steps=steps, guidance=g))
            finally:
                session.end()
                session.close()
        p_sea = psnr(torch.cat(outs), reference).clamp(max=PSNR_CAP)
        print(f"SeaCache threshold {args.threshold}: PSNR {float(p_sea.mean()):.2f} dB on 20 images", flush=True)
        planner = Planner(load_calibration(str(cal_path)))
        variants = [(pset, {"predictors": pset}) for pset in SETS] + [
            (f"fitted, shrink taylor, ridge {r}", {"shrink": "taylor", "ridge": float(r)})
            for r in args.shrink_ridges.split(",") if r]
        for budget in [float(b) for b in args.budgets.split(",")]:
            for fam in args.families.split(","):
                for pset, options in variants:
                    plan, side = planner.plan(budget, "cachec", family=fam, **options)
                    out = plan_images(driver, generate, plan, side, work / "plan.yaml", ev_conds, ev_seeds)
                    p = psnr(out, reference).clamp(max=PSNR_CAP)
                    d, lo, hi = paired_difference(p, p_sea)
                    if pset == "taylor":
                        p_taylor = p
                    vs_taylor = "" if pset in SETS else "  vs taylor set {:+.2f} [{:+.2f}, {:+.2f}]".format(
                        *paired_difference(p, p_taylor))
                    print(f"{budget:.2f} {fam:6s} {pset:8s} realised {plan.budget.realised:.4f} predicted "
                          f"{plan.predicted_error:.4g} PSNR {float(p.mean()):.2f} dB  vs SeaCache {d:+.2f} "
                          f"[{lo:+.2f}, {hi:+.2f}]" + vs_taylor, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
