"""Sketched vs exact statistics on a reference model: what the approximations cost the planner (issue 12).

    python bench/bench_sketch.py [--model digits-flow] [--dims 512 1024 2048 4096] [--eoc-samples 16 32 64]

The reference models' units have 8192 elements (64 tokens × 128 channels), so at the defaults (sketch
dimension 8192, eoc_sample 256) their statistics are exact. This bench forces the approximations: it
calibrates the model exactly (``sketch_dim=0``, ``eoc_sample=0``, shipped-plan settings), then with smaller
sketch dimensions r and EOC subsets E on the same samples (sensitivity copied from the exact file), and
prints per setting

- the relative error of every Gram-derived reuse error ``||F_s − F_{s−1}||²`` (median, 95th percentile,
  max) against the exact calibration — expected ~ sqrt(2/r) per sample, less when summed;
- for cachec plans at 25/40/60 %: the exact model's predicted error of the plan made from the
  approximate calibration ÷ that of the plan made from the exact one (1.00 = the approximation changed
  nothing the planner can see; > 1 = decisions it got wrong).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from cachec.calibrate.format import read_tensors
from cachec.calibrate.run import calibrate
from cachec.loading import load_model
from cachec.planner import Planner, load_calibration
from cachec.planner.error_model import ErrorModel, schedule_error
from cachec.shipped import CALIBRATION

BUDGETS = (0.25, 0.40, 0.60)


def reuse_errors(path: str) -> np.ndarray:
    t = read_tensors(path)
    out = []
    for k in sorted(t):
        if k.startswith("gram/"):
            g = t[k]
            d = np.diagonal(g, axis1=2, axis2=3)
            out.append((d[..., 1:] - 2 * np.diagonal(g, offset=1, axis1=2, axis2=3) + d[..., :-1]).ravel())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-flow")
    ap.add_argument("--dims", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--eoc-samples", type=int, nargs="*", default=[16, 32, 64])
    args = ap.parse_args()
    driver = load_model(args.model)
    conds = list(range(driver.num_classes))
    with tempfile.TemporaryDirectory() as tmp:
        exact = str(calibrate(driver, conds, output=Path(tmp) / "exact.safetensors", progress=False,
                              sketch_dim=0, eoc_sample=0, **CALIBRATION))
        base = {k: v for k, v in CALIBRATION.items() if k not in ("sensitivity", "sensitivity_samples")}
        cal_exact = load_calibration(exact)
        model = ErrorModel(cal_exact)
        planner_exact = Planner(cal_exact)
        ref_err = {b: schedule_error(model, planner_exact.schedule(b, "cachec")) for b in BUDGETS}
        e_exact = reuse_errors(exact)
        print(f"{args.model}: exact calibration; cachec plans' predicted errors "
              + ", ".join(f"{100 * b:.0f}%: {ref_err[b]:.4g}" for b in BUDGETS))
        print(f"{'setting':<16} {'reuse err rel. error: median':>28} {'p95':>7} {'max':>7}   "
              + "   ".join(f"regret {100 * b:.0f}%" for b in BUDGETS))
        settings = [("sketch_dim", r, dict(sketch_dim=r, eoc_sample=0)) for r in args.dims]
        settings += [("eoc_sample", e, dict(sketch_dim=0, eoc_sample=e)) for e in args.eoc_samples]
        for name, v, kw in settings:
            path = str(calibrate(driver, conds, output=Path(tmp) / f"{name}{v}.safetensors", progress=False,
                                 sensitivity="none", sensitivity_from=exact, **base, **kw))
            rel = np.abs(reuse_errors(path) - e_exact) / np.maximum(e_exact, 1e-300)
            planner = Planner(load_calibration(path))
            regrets = [schedule_error(model, planner.schedule(b, "cachec")) / ref_err[b] for b in BUDGETS]
            print(f"{name}={v:<6} {np.median(rel):>28.2%} {np.quantile(rel, 0.95):>7.2%} {rel.max():>7.2%}   "
                  + "   ".join(f"{r:>10.3f}" for r in regrets))


if __name__ == "__main__":
    main()
