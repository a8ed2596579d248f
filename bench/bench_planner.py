"""Planner timing on a synthetic calibration shaped like DiT-XL/2 (28 blocks x {attn1, ff} = 56 units, 50 steps).

Usage: python bench/bench_planner.py [--steps 50] [--blocks 28] [--max-staleness 8] [--attention-maps]
Prints the time of each stage, of one budget from scratch, and of a 20-budget sweep. ``--attention-maps``
adds a nested map unit to every attn1 (84 units) and times each family's solve with the map exchange
(docs/planner.md, "Nested units").
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cachec.planner import Planner, make_plan, sweep, synthetic_calibration
from cachec.planner.predictor_pass import choose_predictors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--max-staleness", type=int, default=8)
    ap.add_argument("--attention-maps", action="store_true")
    args = ap.parse_args()

    t = time.perf_counter()
    cal = synthetic_calibration(blocks=args.blocks, steps=args.steps, dim=args.dim, samples=8, seed=0,
                                attention_maps=args.attention_maps)
    print(f"synthetic calibration: {cal.n_units} units x {cal.steps} steps, built in {time.perf_counter() - t:.2f} s")

    planner = Planner(cal)
    t = time.perf_counter()
    planner.table(args.max_staleness)
    t_table = time.perf_counter() - t
    t = time.perf_counter()
    planner.frontier(args.max_staleness, 0, "free")
    t_front = time.perf_counter() - t
    print(f"segment table: {t_table:.3f} s   per-unit DP frontier: {t_front:.3f} s")

    for b in (0.25, 0.4, 0.6):
        t = time.perf_counter()
        plan, _ = make_plan(cal, b, "cachec", max_staleness=args.max_staleness)
        dt = time.perf_counter() - t
        print(f"one budget from scratch  target {b:.2f}  realised {plan.budget.realised:.4f}  "
              f"error {plan.predicted_error:.4g}  {dt:.3f} s")
    t = time.perf_counter()
    plan, _ = make_plan(cal, 0.3, "cachec", family="step", max_staleness=args.max_staleness)
    print(f"step family, one budget from scratch: realised {plan.budget.realised:.4f}  {time.perf_counter() - t:.3f} s")

    budgets = np.round(np.linspace(0.15, 0.9, 20), 4).tolist()
    t = time.perf_counter()
    plans = sweep(cal, budgets, max_staleness=args.max_staleness)
    dt = time.perf_counter() - t
    print(f"20-budget sweep (free): {dt:.3f} s total, {dt / 20:.3f} s per budget")
    for plan, _ in plans[::4]:
        print(f"  target {plan.budget.target:.4f}  realised {plan.budget.realised:.4f}  "
              f"predicted error {plan.predicted_error:.4g}")
    if args.attention_maps:  # after the stage timings, so that the table and frontiers are built already
        for family in ("free", "step", "group", "warmup"):
            for b in (0.25, 0.4, 0.6):
                t = time.perf_counter()
                sched = planner.schedule(b, family=family, max_staleness=args.max_staleness)
                print(f"{family:6s} at {b:.2f} with map units: {sched.options['map_skips']:4d} map skips, "
                      f"{time.perf_counter() - t:.3f} s")
    for family in ("free", "step"):  # the predictor pass (the search's fourth stage) on a solved schedule
        sched = planner.schedule(0.4, family=family, max_staleness=args.max_staleness)
        t = time.perf_counter()
        passed = choose_predictors(planner.model, sched)
        print(f"predictor pass, {family:4s} at 0.40: {passed.options['repredicted']} predictors changed, "
              f"{time.perf_counter() - t:.3f} s")
    for method in ("fora", "eoc-paper", "goc-paper", "uniform"):
        t = time.perf_counter()
        plan, _ = make_plan(cal, 0.4, method)
        print(f"{method:10s} at 0.40: realised {plan.budget.realised:.4f}  error {plan.predicted_error:.4g}  "
              f"{time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
