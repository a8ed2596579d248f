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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachec.calibrate.run import calibrate  # noqa: E402
from cachec.evaluation import held_out_set  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, schedule_error  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402

SETS = ("taylor", "forecast", "fitted")


def local_search(planner, mask: list[int], pset: str, budget: float) -> tuple[list[int], float, int]:
    """Greedy first-improvement search over masks with the same number of computed steps.

    Returns:
        ``(mask, its trajectory price, prices computed)``.
    """
    S = planner.cal.steps

    def price(m):
        try:
            sched = planner.schedule(budget, "cachec", family="step", mask=sorted(m), predictors=pset)
        except ValueError:  # over the budget
            return np.inf
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
    ap.add_argument("--model", default="digits-mmdit")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cal", type=int, default=30, help="calibration conditions")
    ap.add_argument("--budgets", default="0.4,0.25,0.6")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    steps, g = args.steps, float(driver.default_guidance)
    if driver.condition_kind == "class":
        cal_conds = [i % 10 for i in range(args.cal)]
    else:
        cal_conds = list(driver.prompt_sets["calibration"][:args.cal])
    ev_conds, ev_seeds = held_out_set(driver, 20)[0], [1_000_000 + i for i in range(20)]

    def generate(conds, seeds):
        return torch.cat([driver.generate(conds[i:i + 10], seeds[i:i + 10], steps=steps, guidance=g)
                          for i in range(0, len(conds), 10)])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = calibrate(driver, cal_conds, output=work / "calib.safetensors", samples_per_condition=1, steps=steps,
                             guidance=g, seed=0, batch_size=10, sensitivity="factored", sensitivity_samples=4,
                             progress=False, restart=True)
        reference = generate(ev_conds, ev_seeds)
        planner = Planner(load_calibration(str(cal_path)))

        def sample(mask, pset, budget):
            plan, side = planner.plan(budget, "cachec", family="step", mask=sorted(mask), predictors=pset)
            written = write_plan(plan, work / "plan.yaml", side or None)
            with apply(driver, written):
                return psnr(generate(ev_conds, ev_seeds), reference).clamp(max=80)

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
