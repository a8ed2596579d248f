"""SoftCap adaptive mode vs static cachec plans at matched realised FLOPs, and its soft-ceiling sweep (issue 15).

Per reference model (digits-flow, digits-ddim):

- the uncached reference on held-out samples (seeds 1000000+, classes cycled);
- the static shipped plans (25 %, 40 %, 60 %): per-image PSNR vs uncached, realised FLOPs fraction;
- for each adaptive mode (softcap, speca) and each ceiling: the profile calibrated on the probe seeds
  (600000+), then the adaptive runs on the base plan (default: the 25 % shipped plan) in batches of
  ``--batch`` images (one decision sequence per batch; 1 = per image): per-image PSNR, realised fraction of
  every run (mean and max), Full steps;
- a static ablation at exactly the adaptive point's compute: the base plan with the probe's typical Full steps
  (those of the calibrated reference profile) made all-compute, run statically ("static+F");
- paired 95 % bootstrap intervals (10000 resamples, seed 0) of per-image PSNR differences adaptive − static,
  against the static+F ablation and against the shipped plan closest in realised FLOPs;
- the ceiling check: the largest realised fraction of any run minus the ceiling (must be ≤ 1 point).

All numbers of one table come from one process, side by side. Full run (≈ 1 h on 2 CPU cores)::

    python bench/bench_softcap.py --json bench/softcap_results.json

Smoke run (a few minutes)::

    python bench/bench_softcap.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cachec.metrics import paired_difference
from cachec.evaluation import EVAL_SEED, spread  # noqa: E402
from cachec.evaluation_adaptive import adaptive_options, evaluate_adaptive  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.runtime import apply, load_plan, with_actions  # noqa: E402
from cachec.runtime.adaptive import AdaptiveOptions  # noqa: E402
from cachec.runtime.io import to_jsonable  # noqa: E402

PLANS = ROOT / "plans"
BUDGETS = (25, 40, 60)


def psnr(cand: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB (data range 1), capped at 100 dB for identical images."""
    mse = (cand.double() - ref.double()).pow(2).flatten(1).mean(1)
    return [100.0 if m == 0 else min(100.0, 10 * math.log10(1.0 / m)) for m in mse.tolist()]


def generate(driver, plan, conds, seeds, batch, uncached=False):
    """Images of ``plan`` (``uncached``: at its steps and guidance, without it) and each run's realised fraction."""
    out, fractions = [], []
    for i in range(0, len(conds), batch):
        c, s = conds[i:i + batch], seeds[i:i + batch]
        if uncached:
            out.append(driver.generate(c, s, steps=plan.steps, guidance=plan.sampler.guidance.scale))
            continue
        with apply(driver, plan) as handle:
            out.append(driver.generate(c, s, steps=plan.steps, guidance=plan.sampler.guidance.scale))
        fractions.append(handle.report.flops_fraction)
    return torch.cat(out), fractions


def static_with_full(base, steps: list[int]):
    """The base plan with ``steps`` made all-compute (the static ablation at the adaptive point's compute)."""
    acts = {u.name: "".join("C" if s in steps else a for s, a in enumerate(u.actions)) for u in base.units}
    return with_actions(base, acts)


def bench_model(model: str, args) -> dict:
    driver = load_model(model)
    base = load_plan(PLANS / f"{model}-{args.base}.yaml")
    n = args.images
    conds = spread(list(range(driver.num_classes)), n)
    seeds = [EVAL_SEED + i for i in range(n)]
    t0 = time.perf_counter()
    ref, _ = generate(driver, base, conds, seeds, 50, uncached=True)
    static = {}
    for b in BUDGETS:
        plan = load_plan(PLANS / f"{model}-{b}.yaml")
        img, fr = generate(driver, plan, conds, seeds, 50)
        static[f"static-{b}"] = {"realised": max(fr), "psnr": psnr(img, ref)}
    print(f"[{model}] uncached + static plans in {time.perf_counter() - t0:.0f} s", flush=True)
    points = []
    for mode in args.modes:
        for c in args.ceilings:
            t0 = time.perf_counter()
            opts = adaptive_options(driver, base, AdaptiveOptions(mode=mode, ceiling=c, probe_samples=args.probe))
            run = evaluate_adaptive(driver, base, opts, conds, seeds, batch_size=args.batch, reference=ref,
                                    digit_metrics=False, name=f"{mode} {c}")
            r = run.result
            fr = [x["flops_fraction"] for x in r["runtime_reports"]]
            point = {"mode": mode, "ceiling": c, "realised_mean": float(np.mean(fr)), "realised_max": max(fr),
                     "over_ceiling_points": 100 * (max(fr) - c), "full_steps_mean": r["full_steps_mean"],
                     "psnr": psnr(run.cached, ref), "probe_full_steps": opts.profile.probe.get("full_steps", []),
                     "kappa": opts.profile.kappa}
            ablation = static_with_full(base, point["probe_full_steps"])
            img, afr = generate(driver, ablation, conds, seeds, 50)
            point["static+F"] = {"realised": max(afr), "psnr": psnr(img, ref), "full_steps": point["probe_full_steps"]}
            points.append(point)
            print(f"[{model}] {mode} ceiling {c:.2f}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {"model": model, "base": f"{model}-{args.base}", "n_images": n, "static": static, "points": points}


def report(res: dict) -> None:
    static = res["static"]
    print(f"\n## {res['model']} (base {res['base']}, {res['n_images']} held-out images; PSNR vs uncached, dB)")
    print("| point | ceiling | realised mean | realised max | max - ceiling (pts) | Full steps | PSNR | "
          "vs static+F (realised): diff [95% CI] | vs nearest shipped (realised): diff [95% CI] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in static.items():
        print(f"| {name} | - | {100 * s['realised']:.2f}% | {100 * s['realised']:.2f}% | - | - | "
              f"{np.mean(s['psnr']):.2f} | - | - |")
    for p in res["points"]:
        a = p["static+F"]
        m, lo, hi = paired_difference(p["psnr"], a["psnr"], cap=100.0)
        near = min(static, key=lambda k: abs(static[k]["realised"] - p["realised_mean"]))
        m2, lo2, hi2 = paired_difference(p["psnr"], static[near]["psnr"], cap=100.0)
        print(f"| {p['mode']} | {100 * p['ceiling']:.0f}% | {100 * p['realised_mean']:.2f}% | "
              f"{100 * p['realised_max']:.2f}% | {p['over_ceiling_points']:+.2f} | {p['full_steps_mean']:.2f} | "
              f"{np.mean(p['psnr']):.2f} | {m:+.2f} [{lo:+.2f}, {hi:+.2f}] ({100 * a['realised']:.2f}%) | "
              f"{near}: {m2:+.2f} [{lo2:+.2f}, {hi2:+.2f}] ({100 * static[near]['realised']:.2f}%) |")
    worst = max(p["over_ceiling_points"] for p in res["points"]) if res["points"] else float("nan")
    print(f"ceiling check: largest realised - ceiling over all runs = {worst:+.3f} points (must be <= +1)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["digits-flow", "digits-ddim"])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--ceilings", nargs="+", type=float, default=[0.30, 0.35, 0.40, 0.50, 0.60])
    ap.add_argument("--modes", nargs="+", default=["softcap", "speca"], choices=["softcap", "speca"])
    ap.add_argument("--base", type=int, default=25, choices=BUDGETS, help="shipped plan used as the reference")
    ap.add_argument("--batch", type=int, default=1, help="images per adaptive run (one decision sequence each)")
    ap.add_argument("--probe", type=int, default=4, help="probe samples of the calibration")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="4 images, ceilings 0.35 0.45, probe 2")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.ceilings, args.probe = 4, [0.35, 0.45], 2
    torch.set_num_threads(args.threads)
    results = [bench_model(m, args) for m in args.models]
    for r in results:
        report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(to_jsonable(results), indent=1) + "\n")


if __name__ == "__main__":
    main()
