"""Attention-map units (issue 16, HGC's fine grain): plans with and without them, side by side in one run.

Two uncached calibrations of one model on the same conditions and seeds — one recording the attention-map
units its registry entry declares (``attention_maps=True``, docs/hgc.md), one without — are planned at each
budget with each schedule family, and every plan samples the same held-out images. Reported per (budget,
family): realised FLOPs of the plan, map skips, PSNR vs uncached (SDPA) sampling, control IoU on the
ControlNet model, and the paired 95 % bootstrap interval of the PSNR difference with − without maps
(:func:`cachec.metrics.paired_difference`; a difference whose interval holds 0 is a tie). It also times the
plan solve with and without maps and checks that the always-computed plan (budget 100 %) with map units
matches uncached sampling to float rounding (the explicit softmax is not SDPA's kernel).

Usage (≈ 9 min on one thread for the control model with the defaults)::

    python bench/bench_attention_map_units.py --model digits-mmdit-control --cal 30 --budgets 0.25,0.4 \
        --json docs/hgc/attention-map-units-control.json
    python bench/bench_attention_map_units.py --model digits-flow --cal 20 --json docs/hgc/attention-map-units-flow.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import PSNR_CAP, add_study_args, open_study, plan_images, study_calibration  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration  # noqa: E402
from cachec.runtime.io import atomic_write  # noqa: E402


def _iou(driver, images, conds):
    if driver.name != "digits-mmdit-control":
        return None
    from cachec.control import condition_masks, control_iou

    return float(control_iou(images, condition_masks(conds)).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap, model="digits-mmdit-control")
    ap.add_argument("--budgets", default="0.25,0.4", help="comma-separated FLOPs fractions")
    ap.add_argument("--families", default="step,free", help="schedule families to plan with")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--work", default=None, help="folder for the calibrations and plans (kept: a rerun with the same "
                                                 "folder reuses its calibrations); default a new temporary folder")
    args = ap.parse_args(argv)
    st = open_study(args)
    driver, steps, g = st.driver, st.steps, st.guidance
    work = Path(args.work or tempfile.mkdtemp(prefix="cachec-maps-"))
    work.mkdir(parents=True, exist_ok=True)
    cals, planners, solve_s = {}, {}, {}
    for maps in (False, True):
        t = time.perf_counter()
        cals[maps] = work / f"cal-{args.cal}-{steps}-{int(maps)}.safetensors"
        if not cals[maps].exists():
            study_calibration(driver, st.cal_conds, steps, g, cals[maps], attention_maps=maps)
        print(f"calibration (maps={maps}): {time.perf_counter() - t:.1f} s -> {cals[maps]}", flush=True)
        planners[maps] = Planner(load_calibration(str(cals[maps])))
    ref = st.generate(st.ev_conds, st.ev_seeds)
    out = {"model": driver.name, "steps": steps, "guidance": g, "calibration_conditions": len(st.cal_conds),
           "eval_images": len(st.ev_conds), "uncached_iou": _iou(driver, ref, st.ev_conds), "points": []}
    cal = planners[True].cal
    names = cal.unit_names
    map_flops = sum(f for n, f in zip(names, cal.unit_flops) if n.endswith(".cachec_map"))
    out["map_flops_share"] = float(map_flops / cal.full_step_flops)
    print(f"{sum(n.endswith('.cachec_map') for n in names)} map units, {100 * out['map_flops_share']:.1f} % of a "
          f"step's FLOPs; uncached IoU {out['uncached_iou']}", flush=True)

    # the 100 % plan with map units: every map computed with the explicit softmax
    full, side = planners[True].plan(1.0, family="step")
    img = plan_images(driver, st.generate, full, side, work / "full.yaml", st.ev_conds, st.ev_seeds)
    out["full_plan_max_abs_diff"] = float((img - ref).abs().max())
    print(f"100 % plan with map units: max |Δ| {out['full_plan_max_abs_diff']:.2e} vs uncached", flush=True)

    for b in [float(x) for x in args.budgets.split(",")]:
        for fam in args.families.split(","):
            row, scores = {"budget": b, "family": fam}, {}
            for maps in (False, True):
                t = time.perf_counter()
                plan, side = planners[maps].plan(b, family=fam)
                solve_s[maps] = time.perf_counter() - t
                img = plan_images(driver, st.generate, plan, side, work / f"p{int(maps)}.yaml", st.ev_conds, st.ev_seeds)
                scores[maps] = psnr(img, ref).clamp(max=PSNR_CAP)
                key = "maps" if maps else "no_maps"
                row[key] = {"realised": plan.budget.realised, "psnr_db": float(scores[maps].mean()),
                            "control_iou": _iou(driver, img, st.ev_conds), "solve_s": solve_s[maps],
                            "map_skips": plan.budget.options.get("map_skips")}
            d = paired_difference(scores[True], scores[False])
            row["difference_db"] = d
            out["points"].append(row)
            print(f"{100 * b:.0f} % {fam}: no maps {row['no_maps']['psnr_db']:.2f} dB ({100 * row['no_maps']['realised']:.2f} %), "
                  f"maps {row['maps']['psnr_db']:.2f} dB ({100 * row['maps']['realised']:.2f} %, "
                  f"{row['maps']['map_skips']} map skips), diff {d}", flush=True)
    if args.json:
        atomic_write(args.json, (json.dumps(out, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
