"""Given computed-step masks against the step family's DP mask, closed loop (issue 20: how much the mask the
error model picks leaves on the table).

For one model and budget, from one calibration (cachec's defaults for the model: its calibration prompts
or 4 samples per class, factored sensitivity), every ``--mask`` (computed step indices) becomes a step-family
plan with the given predictor set (``mask`` option; ``--no-fill``: exactly those steps, else the budget fill
tops it up), beside the DP's own plan at the budget. A mask that computes more steps than the budget allows is
planned at exactly its own FLOPs and marked. Each plan runs on held-out conditions and seeds
(:func:`cachec.evaluation.held_out_set`); PSNR (dB, per image, capped at 100) against uncached sampling of the
same seeds, paired with the DP plan (mean difference, 95 % bootstrap interval). All numbers come from one
process.

Usage (digits-mmdit at 40 %, ≈ 3 min on one thread)::

    python bench/bench_step_masks.py --model digits-mmdit --budget 0.4 --images 30 \\
        --mask 0,1,3,5,7,9,12,15,18,22 --mask 0,1,2,3,6,8,11,14,17,21
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachec.calibrate.run import calibrate  # noqa: E402
from cachec.evaluation import held_out_set  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402

PSNR_CAP = 100.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-mmdit")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--predictors", default="taylor")
    ap.add_argument("--mask", action="append", default=[], help="computed steps, e.g. 0,1,3,5 (repeatable)")
    ap.add_argument("--no-fill", action="store_true")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    if driver.condition_kind == "class":
        cal_conds, per = list(range(driver.num_classes)), 4
    else:
        cal_conds, per = list(driver.prompt_sets["calibration"]), 1
    conds, seeds = held_out_set(driver, args.images)

    def generate():
        return torch.cat([driver.generate(conds[i:i + 10], seeds[i:i + 10]) for i in range(0, len(conds), 10)])

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = calibrate(driver, cal_conds, output=work / "calib.safetensors", samples_per_condition=per,
                             sensitivity="factored", sensitivity_samples=2, progress=False, restart=True)
        planner = Planner(load_calibration(str(cal_path)))
        cal = planner.cal
        S, total = cal.steps, float(np.sum(cal.unit_flops))
        reference = generate()
        plans = [("DP mask", dict(family="step", predictors=args.predictors, fill=not args.no_fill), args.budget)]
        for text in args.mask:
            m = sorted(int(x) for x in text.split(","))
            own = (S * cal.fixed_step_flops + len(m) * total) / (S * cal.full_step_flops)
            b = args.budget if own <= args.budget else own + 1e-9
            plans.append((text + ("" if own <= args.budget else f" (over: {own:.2%})"),
                          dict(family="step", predictors=args.predictors, mask=m, fill=not args.no_fill), b))
        scores = {}
        for i, (name, opts, b) in enumerate(plans):
            plan, side = planner.plan(b, "cachec", **opts)
            written = write_plan(plan, work / f"plan{i}.yaml", side or None)
            with apply(driver, written):
                scores[name] = psnr(generate(), reference).clamp(max=PSNR_CAP)
            shared = [s for s in range(S) if all(u.actions[s] == "C" for u in plan.units)]
            line = (f"{name:44s} realised {plan.budget.realised:.4f}  predicted {plan.predicted_error:.4g}  "
                    f"PSNR {float(scores[name].mean()):.2f} dB  computed steps {shared}")
            if i:
                d, lo, hi = paired_difference(scores[name], scores["DP mask"])
                line += f"  vs DP mask {d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
