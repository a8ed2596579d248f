"""A step-mask local search under the trajectory-coherent price, sampled against the step DP's mask.

docs/planner.md ("How well the error model ranks the candidates"): the trajectory-coherent price
(:func:`cachec.planner.schedule_error`, ``coherence="trajectory"``) ranks step masks far better than the
solver's run-coherent segment prices, but does not split into the DP's segments. This script tries the
obvious use: from the step family's DP mask, move one computed step by ±1 or ±2 at a time (step 0 stays),
keep a move that lowers the trajectory price (the schedule re-solved on the new mask, fill included), until
no move does. Both masks are then sampled on 20 held-out images (seeds 1000000+) against uncached sampling,
with the paired 95 % bootstrap interval of searched − DP (:func:`cachec.metrics.paired_difference`).

The calibration: ``--cal`` conditions, seed 0, factored sensitivity with 4 samples.

Usage (≈ 6 min on one thread)::

    python bench/bench_mask_search.py --model digits-mmdit --cal 30 --budgets 0.4,0.25,0.6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import PSNR_CAP, add_study_args, open_study, plan_images, study_calibration  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, schedule_error  # noqa: E402

SETS = ("taylor", "forecast", "fitted")


def local_search(planner, mask: list[int], pset: str, budget: float) -> tuple[list[int], float, int]:
    """Greedy first-improvement search over masks with the same number of computed steps.

    Returns:
        ``(mask, its trajectory price, prices computed)``.
    """
    S = planner.cal.steps

    def price(m):  # every move keeps the number of computed steps, so every mask costs what the start does
        sched = planner.schedule(budget, "cachec", family="step", mask=sorted(m), predictors=pset)
        return schedule_error(planner.error_model(pset), sched, coherence="trajectory")

    cur, best, n, improved = sorted(mask), price(mask), 0, True
    while improved:
        improved = False
        for i in range(1, len(cur)):
            for d in (-2, -1, 1, 2):
                new = cur.copy()
                new[i] += d
                if not 1 <= new[i] <= S - 1 or len(set(new)) != len(new):
                    continue
                p = price(new)
                n += 1
                if p < best - 1e-12:
                    best, cur, improved = p, sorted(new), True
    return cur, best, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--budgets", default="0.4,0.25,0.6")
    args = ap.parse_args(argv)
    st = open_study(args)
    driver, steps, g, generate = st.driver, st.steps, st.guidance, st.generate
    cal_conds, ev_conds, ev_seeds = st.cal_conds, st.ev_conds, st.ev_seeds

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = study_calibration(driver, cal_conds, steps, g, work / "calib.safetensors")
        reference = generate(ev_conds, ev_seeds)
        planner = Planner(load_calibration(str(cal_path)))

        def sample(mask, pset, budget):
            plan, side = planner.plan(budget, "cachec", family="step", mask=sorted(mask), predictors=pset)
            out = plan_images(driver, generate, plan, side, work / "plan.yaml", ev_conds, ev_seeds)
            return psnr(out, reference).clamp(max=PSNR_CAP)

        for budget in (float(b) for b in args.budgets.split(",")):
            for pset in SETS:
                dp = planner.schedule(budget, "cachec", family="step", predictors=pset)
                m0 = [s for s in range(planner.cal.steps) if dp.compute[:, s].all()]
                t = time.perf_counter()
                m1, p1, n = local_search(planner, m0, pset, budget)
                dt = time.perf_counter() - t
                p_dp, p_ls = sample(m0, pset, budget), sample(m1, pset, budget)
                d, lo, hi = paired_difference(p_ls, p_dp)
                print(f"{budget:.2f} {pset:8s} DP mask {m0} PSNR {float(p_dp.mean()):.2f} dB | searched {m1} "
                      f"PSNR {float(p_ls.mean()):.2f} dB ({n} prices, {dt:.1f} s): {d:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
