"""How well the planner prices a reused attention map (docs/planner.md, "Nested units"), predicted vs measured.

One calibration with attention-map units (:func:`bench.study.study_calibration`), then, on the studies' 20
held-out images, squared error vs uncached sampling (mean over images of Σ over pixels) beside the error
model's prediction (:func:`cachec.planner.schedule_error`, summed over units):

1. **maps alone**: every block computed at every step, each map computed at every second step and reused in
   between (no parent output is ever reused, so nothing propagates);
2. **the exchange at ``--budget``** (step family) with three propagation factors
   (:func:`cachec.planner.nesting.propagation_factors`): ``none`` (k = 1), ``signed`` and ``abs`` (the
   planner's). For each: the map skips taken, the plan's PSNR against the same calibration planned without
   map reuse (``follow``), and the map skips alone on ``follow``'s block schedule: their measured error
   increase against their predicted map error.

Usage (≈ 6 min on one thread)::

    python bench/bench_map_pricing.py --model digits-mmdit-control --cal 10 --budget 0.4
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import PSNR_CAP, add_study_args, open_study, plan_images, study_calibration  # noqa: E402
from cachec.metrics import psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, schedule_error  # noqa: E402
from cachec.planner import error_model, nesting  # noqa: E402
from cachec.planner.plan import build_plan  # noqa: E402
from cachec.planner.schedule import Schedule  # noqa: E402

FACTORS = {
    "none": lambda compute, coeffs, sw: np.ones(len(compute)),
    "signed": functools.partial(nesting.propagation_factors, signed=True),
    "abs": nesting.propagation_factors,
}


def _use_factor(fn) -> None:
    nesting.propagation_factors = fn
    error_model.propagation_factors = fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_study_args(ap, model="digits-mmdit-control", cal=10)
    ap.add_argument("--budget", type=float, default=0.4)
    args = ap.parse_args(argv)
    st = open_study(args)
    work = Path(tempfile.mkdtemp(prefix="cachec-map-pricing-"))
    planner = Planner(load_calibration(str(study_calibration(st.driver, st.cal_conds, st.steps, st.guidance,
                                                               work / "cal.safetensors", attention_maps=True))))
    parents, cal = planner.parents, planner.cal
    ref = st.generate(st.ev_conds, st.ev_seeds)

    def measure(sched, tag):
        """(predicted total error, predicted map error, measured squared error, PSNR dB) of a schedule."""
        plan, side = build_plan(cal, planner.model, sched, "cachec", None)
        img = plan_images(st.driver, st.generate, plan, side, work / f"{tag}.yaml", st.ev_conds, st.ev_seeds)
        per_unit = schedule_error(planner.model, sched, per_unit=True)
        maps = sum(e for e, p in zip(per_unit, parents) if p is not None)
        return (float(per_unit.sum()), float(maps), float(((img - ref) ** 2).flatten(1).sum(1).mean()),
                float(psnr(img, ref).clamp(max=PSNR_CAP).mean()))

    U, S = cal.n_units, cal.steps
    compute = np.ones((U, S), dtype=bool)
    for u, p in enumerate(parents):
        if p is not None:
            compute[u] = np.arange(S) % 2 == 0
    coeffs = [{s: (1.0,) for s in np.flatnonzero(~compute[u])} for u in range(U)]
    pred, pred_maps, sq, _ = measure(Schedule(compute=compute, coeffs=coeffs, parents=parents), "alone")
    print(f"maps alone (blocks every step, maps every 2nd): predicted {pred_maps:.3g}, measured {sq:.3g} "
          f"({sq / pred_maps:.2f}x the prediction)", flush=True)

    planner.map_reuse = False
    follow = planner.schedule(args.budget, family="step")
    planner.map_reuse = True
    f_pred, _, f_sq, f_psnr = measure(follow, "follow")
    print(f"{100 * args.budget:.0f} % step family, no map reuse: predicted {f_pred:.3g}, measured {f_sq:.3g}, "
          f"{f_psnr:.2f} dB", flush=True)
    try:
        for name, fn in FACTORS.items():
            _use_factor(fn)
            sched = planner.schedule(args.budget, family="step")
            _, _, _, c_psnr = measure(sched, f"x-{name}")
            only = copy.deepcopy(follow)  # the same map skips on the block schedule without map reuse
            for u, p in enumerate(parents):
                if p is not None:
                    only.compute[u] = sched.compute[u] & follow.compute[p]
                    only.coeffs[u] = {s: (1.0,) for s in np.flatnonzero(follow.compute[p] & ~only.compute[u])}
            _, o_maps, o_sq, _ = measure(only, f"only-{name}")
            print(f"  factor {name:6}: {sched.options['map_skips']:3} map skips, {c_psnr:.2f} dB "
                  f"({c_psnr - f_psnr:+.2f} vs no map reuse); the skips alone add {o_sq - f_sq:.3g} measured "
                  f"squared error, priced {o_maps:.3g}", flush=True)
    finally:
        _use_factor(FACTORS["abs"])
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
