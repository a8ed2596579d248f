"""Runtime benchmark (issue 5): overhead of a 100% plan and speed-up of real plans, measured side by side.

    python bench/bench_runtime.py [--model digits-flow] [--batch 16] [--repeats 7] [--calibration FILE] [--family F]

The 40% and 25% plans are the shipped ones under plans/ when the model has them (what users run);
otherwise (or with --calibration / --family) they are solved from a quick calibration.

Prints, for a realistic batch (16 images, batched CFG, so 32 rows per transformer call):
(a) runtime overhead = wall(plan at 100%) / wall(no runtime)          target <= 1.02
(b) for plans at 40% and 25%: speed-up / ideal, ideal = 1 / (counted FLOPs fraction)   target >= 0.85
(c) the floor: a plan that computes every unit at step 0 only, i.e. the wall time no plan can remove, and
    the speed-up / ideal that a plan at the same FLOPs could reach if unit time were exactly proportional
Timings alternate between the variants within each repeat (same process, same machine load), and the
median over repeats is reported. FLOPs are counted with torch.utils.flop_counter over whole calls.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cachec.calibrate.run import calibrate
from cachec.runtime.flops import count_flops
from cachec.loading import load_model
from cachec.planner import Planner, load_calibration
from cachec.runtime import apply, full_plan, load_plan, with_actions, write_plan
from cachec.shipped import PLANS_DIR, plan_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-flow")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calibration", type=Path, default=None, help="reuse a calibration file of the same model")
    ap.add_argument("--family", choices=["free", "step", "group"], default=None,
                    help="solve the plans with this family instead of using the shipped plans")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    steps, guidance = driver.default_steps, driver.default_guidance
    conds = [i % driver.num_classes for i in range(args.batch)]
    seeds = list(range(2_000_000, 2_000_000 + args.batch))
    shipped = {b: PLANS_DIR / plan_name(args.model, b) for b in (0.40, 0.25)}
    use_shipped = args.calibration is None and args.family is None and all(p.exists() for p in shipped.values())
    with tempfile.TemporaryDirectory() as tmp:
        plans = {"100%": full_plan(driver, steps=steps)}
        if use_shipped:
            for b, path in shipped.items():
                plans[f"{b:.0%}"] = load_plan(path)
            source = "shipped plans " + ", ".join(p.name for p in shipped.values())
        else:
            calib = args.calibration
            if calib is None:
                calib = calibrate(driver, list(range(driver.num_classes)), output=Path(tmp) / "calib.safetensors",
                                  samples_per_condition=1, sensitivity="factored", sensitivity_samples=1,
                                  progress=False, steps=steps, guidance=guidance)
            planner = Planner(load_calibration(calib))
            family = args.family or "free"
            for b in (0.40, 0.25):
                plan, side = planner.plan(b, "cachec", family=family)
                plans[f"{b:.0%}"] = write_plan(plan, Path(tmp) / f"plan{int(100 * b)}.yaml", side or None)
            source = f"plans solved now ({family} family)"
        # the floor: every unit computed at step 0 only, reused after; what no plan can remove (embeddings,
        # norms, adaLN modulation and gates, residual adds, final layer, sampler) plus the runtime itself
        full = plans["100%"]
        plans["floor"] = with_actions(full, {u.name: "C" + "." * (steps - 1) for u in full.units})

        def run(plan):
            if plan is None:
                return driver.generate(conds, seeds, steps=steps, guidance=guidance)
            with apply(driver, plan):
                return driver.generate(conds, seeds, steps=steps, guidance=guidance)

        variants = {"uncached": None, **plans}
        flops = {k: count_flops(run, p)[1] for k, p in variants.items()}
        run(None)  # warm-up
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, p in variants.items():
                t0 = time.perf_counter()
                run(p)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}: batch {args.batch} + CFG, {steps} steps, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats; {source}")
    print(f"{'variant':10s} {'FLOPs frac':>10s} {'wall s':>8s} {'speed-up':>9s} {'ideal':>6s} {'ratio':>6s}")
    for k in variants:
        frac = flops[k] / flops["uncached"]
        speed = med["uncached"] / med[k]
        print(f"{k:10s} {frac:10.4f} {med[k]:8.3f} {speed:9.3f} {1 / frac:6.2f} {speed * frac:6.3f}")
    print(f"(a) runtime overhead, 100% plan / no runtime: {med['100%'] / med['uncached']:.3f}  (target <= 1.02)")
    for k in ("40%", "25%"):
        frac = flops[k] / flops["uncached"]
        print(f"(b) {k} plan: speed-up / ideal = {(med['uncached'] / med[k]) * frac:.3f}  (target >= 0.85)")
    # the runtime's own per-step cost, where it is not hidden by the model's compute: one sample, 100% plan
    small_c, small_s = conds[:1], seeds[:1]
    tiny = {"uncached": [], "100%": []}
    for _ in range(max(5, args.repeats)):
        for k in tiny:
            t_start = time.perf_counter()
            if k == "uncached":
                driver.generate(small_c, small_s, steps=steps, guidance=guidance)
            else:
                with apply(driver, plans["100%"]):
                    driver.generate(small_c, small_s, steps=steps, guidance=guidance)
            tiny[k].append(time.perf_counter() - t_start)
    per_step = (statistics.median(tiny["100%"]) - statistics.median(tiny["uncached"])) / steps
    print(f"    runtime cost per step (1 sample, 100% plan, apply/remove included): {1000 * per_step:.3f} ms = "
          f"{100 * per_step * steps / med['uncached']:.2f}% of the batch-{args.batch} uncached run")
    # wall time as fixed + unit part: t(plan) ~ t_floor + (f - f_floor) / (1 - f_floor) * (t_100 - t_floor)
    f0, t0, t1 = flops["floor"] / flops["uncached"], med["floor"], med["100%"]
    print(f"floor: {100 * f0:.1f}% of the FLOPs take {100 * t0 / med['uncached']:.1f}% of the uncached wall time")
    for k in ("40%", "25%"):
        frac = flops[k] / flops["uncached"]
        model = t0 + (frac - f0) / (1 - f0) * (t1 - t0)
        print(f"    {k}: wall explained by floor + proportional unit time {model:.3f} s (measured {med[k]:.3f} s); "
              f"speed-up / ideal under that model (floor kept, unit time proportional to FLOPs): "
              f"{med['uncached'] / model * frac:.3f}")


if __name__ == "__main__":
    main()
