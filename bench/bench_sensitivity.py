"""Sensitivity methods side by side (run by hand, not part of the tests).

    python bench/bench_sensitivity.py                       # both reference models, ≈ 30 min at 1 thread
    python bench/bench_sensitivity.py --models digits-flow --steps 10 --samples 1   # a quick look

Prints:

1. the cost of each method in transformer steps (reference run, probes and step-cache fills, each step over
   the sensitivity samples and guidance branches: ``cachec.calibrate.sensitivity.cost``) for DiT-XL/2
   (56 units × 50 steps), FLUX.1 as the issue counts it (76 units × 28 steps), FLUX.1 as the registry
   splits it (19 double blocks × 3 + 38 single = 95 units × 28 steps) and the reference models;
2. per reference model, a calibration with each method (same conditions, seeds and statistics; only the
   sensitivity differs): its measured seconds, the Spearman rank correlation of its (U, S) array with
   ``full``'s over all (u, s ≥ 1) (column 0 is a copy of column 1), the mean over steps of the rank
   correlation across units within a step, the median factor between its values and ``full``'s
   (exp of the median |log ratio|), and the closed-loop quality of the plans made from it at ``--budget``
   (families free, step and group, no trajectory refinement): mean per-image PSNR vs uncached sampling
   on the same held-out seeds (``cachec.evaluation.held_out_set``) for every method.

Timings are wall-clock on whatever machine runs it (the docs' numbers: one thread of a shared 2-core
machine); ranks and PSNR are deterministic for a given thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("full", "factored", "chain", "none")
FAMILIES = ("free", "step", "group")
#: (name, units, steps) of the big models the issue prices
BIG = (("DiT-XL/2", 56, 50), ("FLUX.1 (issue: 76 units)", 76, 28), ("FLUX.1 (registry: 95 units)", 95, 28))


def cost_table(models: list[tuple[str, int, int]]) -> str:
    """Transformer steps (and sampling runs = steps ÷ S) of every method for each (name, U, S)."""
    from cachec.calibrate.sensitivity import cost, resolve

    lines = [f"{'model':<30} {'U':>3} {'S':>3} " + " ".join(f"{m:>17}" for m in METHODS[:3]) + "   auto"]
    for name, U, S in models:
        cells = [f"{cost(m, U, S):>8} ({cost(m, U, S) / S:>6.1f})" for m in METHODS[:3]]
        lines.append(f"{name:<30} {U:>3} {S:>3} " + " ".join(cells) + f"   {resolve('auto', U, S)}")
    lines.append("(transformer steps over the sensitivity samples; in brackets: sampling runs of S steps)")
    return "\n".join(lines)


def agreement(full, other) -> dict:
    """Spearman over all (u, s ≥ 1), mean within-step Spearman across units, median factor vs ``full``."""
    import numpy as np
    from scipy.stats import spearmanr

    a, b = np.asarray(full)[:, 1:], np.asarray(other)[:, 1:]
    per_step = [spearmanr(a[:, s], b[:, s])[0] for s in range(a.shape[1])]
    per_step = [r for r in per_step if np.isfinite(r)]
    pos = (a > 0) & (b > 0)
    factor = float(np.exp(np.median(np.abs(np.log(a[pos] / b[pos]))))) if pos.any() else math.nan
    overall = spearmanr(a.ravel(), b.ravel())[0]
    return {"spearman": float(overall) if np.isfinite(overall) else math.nan,
            "spearman_within_step": float(np.mean(per_step)) if per_step else math.nan,
            "median_factor": factor}


def run_model(model: str, steps: int, samples: int, eval_samples: int, budget: float, workdir: Path,
              reuse: bool, log) -> dict:
    """Calibrate ``model`` with every method, plan at ``budget`` per family, evaluate closed-loop."""
    from safetensors import safe_open

    from cachec.calibrate import calibrate, read_header
    from cachec.evaluation import evaluate_plan, held_out_set
    from cachec.loading import load_model
    from cachec.planner import Planner, load_calibration
    from cachec.runtime.plan import load_plan, write_plan

    driver = load_model(model)
    conds = list(range(driver.num_classes))
    eval_conds, eval_seeds = held_out_set(driver, n=eval_samples)
    out: dict = {"model": model, "steps": steps, "sensitivity_samples": samples, "methods": {}}
    sens = {}
    for method in METHODS:
        path = workdir / f"{model}-{steps}-{samples}-{method}.safetensors"
        if not (reuse and path.exists()):
            log(f"  {model}: calibrating with sensitivity={method} ...")
            calibrate(driver, conds, output=path, samples_per_condition=2, steps=steps, batch_size=10, seed=0,
                      sensitivity=method, sensitivity_samples=samples, progress=False, restart=True)
        with safe_open(str(path), framework="numpy") as f:
            sens[method] = f.get_tensor("sensitivity")
        row = {"seconds": read_header(path)["sensitivity"]["seconds"], "psnr_db": {}, "psnr_of_mean_mse_db": {}}
        if method not in ("full", "none"):  # none: ones, no ranks to compare
            row.update(agreement(sens["full"], sens[method]))
        planner = Planner(load_calibration(str(path)))
        for family in FAMILIES:
            plan, sidecar = planner.plan(budget, "cachec", family=family)
            plan_path = workdir / f"{model}-{steps}-{samples}-{method}-{family}.yaml"
            write_plan(plan, plan_path, sidecar or None)
            res = evaluate_plan(driver, load_plan(plan_path), eval_conds, eval_seeds, batch_size=eval_samples).result
            row["psnr_db"][family] = res["psnr_db"]["mean"]
            row["psnr_of_mean_mse_db"][family] = res["psnr_of_mean_mse_db"]
        out["units"] = int(sens[method].shape[0])
        out["methods"][method] = row
        log(f"  {model} {method}: {row['seconds']:.0f} s, PSNR " + ", ".join(
            f"{k} {v:.2f}" for k, v in row["psnr_db"].items()))
    return out


def format_results(res: dict, budget: float) -> str:
    from cachec.calibrate.sensitivity import cost

    model, S, U = res["model"], res["steps"], res["units"]
    head = (f"{model}, {S} steps, {res['sensitivity_samples']} sensitivity samples; plans at {100 * budget:.0f} %, "
            "PSNR (dB, mean per image) vs uncached on the same held-out seeds")
    cols = f"{'method':<9} {'steps':>6} {'seconds':>8} {'spearman':>8} {'in-step':>7} {'factor':>6} " + " ".join(
        f"{'PSNR ' + f:>10}" for f in FAMILIES)
    lines = [head, cols]
    for method, row in res["methods"].items():
        def num(key, fmt):
            v = row.get(key)
            return format(v, fmt) if isinstance(v, float) and math.isfinite(v) else "—"
        lines.append(f"{method:<9} {cost(method, U, S):>6} {row['seconds']:>8.0f} {num('spearman', '8.3f'):>8} "
                     f"{num('spearman_within_step', '7.3f'):>7} {num('median_factor', '6.2f'):>6} "
                     + " ".join(f"{row['psnr_db'][f]:>10.2f}" for f in FAMILIES))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits-flow,digits-ddim")
    p.add_argument("--steps", default="digits-flow=25,digits-ddim=20",
                   help="MODEL=STEPS,... or one number for all (digits-ddim defaults to 20 of its 50: full costs "
                        "U·S²/2 steps)")
    p.add_argument("--samples", type=int, default=2, help="sensitivity samples")
    p.add_argument("--eval-samples", type=int, default=20, help="held-out samples of the closed-loop check")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="keep calibrations and plans here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="reuse calibrations already in --workdir")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    models = [m for m in a.models.split(",") if m]
    if "=" in a.steps:
        steps = {k: int(v) for k, v in (kv.split("=") for kv in a.steps.split(","))}
    else:
        steps = {m: int(a.steps) for m in models}
    print(cost_table(list(BIG) + [(f"{m} (24 units)", 24, steps.get(m, 25)) for m in models]))
    print()
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        workdir = Path(tmp.name)
    else:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    results = []
    t0 = time.perf_counter()
    try:
        for m in models:
            res = run_model(m, steps.get(m, 25), a.samples, a.eval_samples, a.budget, workdir, a.reuse,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
            results.append(res)
            print(format_results(res, a.budget))
            print(flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
