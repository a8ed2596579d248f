"""The planner's budget fill (docs/planner.md, "Budget fill"): step/group plans with and without it.

Per model and budget, from one calibration made with the shipped plans' settings
(:func:`cachec.shipped.calibrate_reference`, or ``--calibration FILE``), no trajectory refinement: the step and group family plans
with ``fill=False`` and ``fill=True``; each run on the same held-out conditions and seeds
(:func:`cachec.evaluation.held_out_set`) beside the uncached reference. Prints realised FLOPs (fraction of a
full run, the planner's accounting, which equals the counted FLOPs: tests/test_flops.py), predicted error,
mean per-image PSNR vs uncached (capped at 80 dB) and the paired difference fill − no fill with its 95 %
bootstrap interval (:func:`cachec.metrics.paired_difference`). All numbers come from one process.

Usage (≈ 6 min per model with one thread)::

    python bench/bench_fill.py --models digits-mmdit,digits-flow --images 30 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachec.evaluation import held_out_set  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402
from cachec.shipped import calibrate_reference  # noqa: E402

PSNR_CAP = 80.0


def _images(driver, conds, seeds, steps, guidance, batch=10):
    return torch.cat([driver.generate(conds[i:i + batch], seeds[i:i + batch], steps=steps, guidance=guidance)
                      for i in range(0, len(conds), batch)])


def run_model(model: str, budgets, n_images: int, workdir: Path, calibration: Path | None = None) -> list[dict]:
    driver = load_model(model)
    cal = calibration or calibrate_reference(model, workdir / f"{model}-calib.safetensors")
    planner = Planner(load_calibration(str(cal)))
    conds, seeds = held_out_set(driver, n_images)
    steps = planner.cal.steps
    reference = None
    rows = []
    for budget in budgets:
        for family in ("step", "group"):
            scores = {}
            for fill in (False, True):
                plan, side = planner.plan(budget, "cachec", family=family, fill=fill)
                written = write_plan(plan, workdir / f"{model}-{family}-{round(100 * budget)}-{int(fill)}.yaml", side or None)
                guidance = plan.sampler.guidance.scale
                if reference is None:
                    reference = _images(driver, conds, seeds, steps, guidance)
                with apply(driver, written):
                    out = _images(driver, conds, seeds, steps, guidance)
                scores[fill] = (plan.budget.realised, plan.predicted_error, psnr(out, reference).clamp(max=PSNR_CAP))
            d, lo, hi = paired_difference(scores[True][2], scores[False][2])
            row = {"model": model, "budget": budget, "family": family, "images": len(conds),
                   "realised": [scores[False][0], scores[True][0]],
                   "predicted_error": [scores[False][1], scores[True][1]],
                   "psnr_db": [float(scores[False][2].mean()), float(scores[True][2].mean())],
                   "fill_minus_plain_db": d, "ci": [lo, hi]}
            rows.append(row)
            print(f"{model} {100 * budget:.0f}% {family:5s}  no fill {row['realised'][0]:.4f} {row['psnr_db'][0]:6.2f} dB"
                  f" | fill {row['realised'][1]:.4f} {row['psnr_db'][1]:6.2f} dB | fill − no fill {d:+.2f} dB"
                  f" [{lo:+.2f}, {hi:+.2f}]", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-mmdit,digits-flow")
    ap.add_argument("--budgets", default="0.25,0.4,0.6")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--calibration", type=Path, default=None,
                    help="use this calibration (e.g. cachec-out/calib.safetensors of `cachec compile MODEL`) instead of "
                         "making one with the shipped settings; one model only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models.split(",")
        if args.calibration and len(models) != 1:
            ap.error("--calibration needs exactly one model")
        for model in models:
            rows += run_model(model, budgets, args.images, Path(tmp), args.calibration)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
