"""Why an adaptive peer beat cachec at one benchmark point: its computed steps, run statically by cachec.

On digits-ddim at 50 steps, 60 % of the FLOPs, SeaCache (diffusers ``apply_sea_cache``, threshold 0.05,
at most 2 consecutive cached steps) was 2.9 dB ahead of cachec's chosen plan (docs/benchmarks.json before
planner v2). This script separates schedule from predictor (docs/planner.md, "Predictor sets" and
"Peer-shaped family"):

1. SeaCache runs on the benchmark's 20 held-out images (classes 0-9 × 2, seeds 1000000+) and on the first
   calibration batch; a forward pre-hook on the last linear layer of the last block records, per
   transformer call, whether the block stack ran (SeaCache skips the whole stack and extrapolates its
   residual to first order);
2. the steps it computed on the calibration batch become a step-synchronous cachec plan
   (``family="step", mask=...``, no fill) with the fitted predictor set, the Taylor set (reuse or the
   forecast, chosen per unit and step by the judged error) and the forecast set (the forecast wherever two
   computed outputs exist: SeaCache's own predictor, summed over the units);
3. at the same FLOPs: the step family's DP mask (both predictor sets) and the ``warmup`` family (Taylor set).

Every plan prints its predicted error and its PSNR vs uncached (mean over images, capped at 80 dB), and
the paired difference to SeaCache with a 95 % bootstrap interval (:func:`cachec.metrics.paired_difference`).
The calibration is the benchmark's (20 samples, seeds 0-19, factored sensitivity with 4 samples).

On a prompt model the calibration uses 20 of its calibration prompts and the evaluation the benchmark's 20
held-out prompts (:func:`cachec.evaluation.held_out_set`); SeaCache's run is recorded at the last block of
the whole stack (FLUX: the last single block).

Usage (≈ 11 min on one thread)::

    python bench/bench_peer_shapes.py [--model digits-ddim --steps 50 --threshold 0.05]
    python bench/bench_peer_shapes.py --model digits-mmdit --steps 25 --threshold 1.2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers.core import BenchContext  # noqa: E402
from bench.peers.sea_cache import SeaCacheMethod  # noqa: E402
from bench.study import PSNR_CAP, plan_images, sampler, study_calibration, study_conditions  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.metrics import paired_difference, psnr  # noqa: E402
from cachec.planner import Planner, load_calibration, realised_fraction  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    steps, g = args.steps, float(driver.default_guidance)
    cal_conds, ev_conds, ev_seeds = study_conditions(driver, 20)
    generate = sampler(driver, steps, g)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = study_calibration(driver, cal_conds, steps, g, work / "calib.safetensors")
        reference = generate(ev_conds, ev_seeds)
        ctx = BenchContext(driver=driver, steps=steps, guidance=g, calib_conditions=cal_conds,
                           calib_seeds=list(range(20)), workdir=str(work), batch_size=10, sensitivity="factored",
                           sensitivity_samples=4, log=print)
        stack = getattr(driver.transformer, "single_transformer_blocks", None) or driver.transformer.transformer_blocks
        last = [m for m in stack[-1].modules() if isinstance(m, torch.nn.Linear)][-1]
        ran: list[int] = []
        flags: list[bool] = []
        hooks = [last.register_forward_pre_hook(lambda m, a: ran.append(1)),
                 driver.transformer.register_forward_pre_hook(lambda m, a: ran.clear()),
                 driver.transformer.register_forward_hook(lambda m, a, o: flags.append(bool(ran)))]

        def sea(conds, seeds):
            session = SeaCacheMethod().session(ctx, args.threshold)
            flags.clear()
            session.begin()
            try:
                out = driver.generate(conds, seeds, steps=steps, guidance=g)
            finally:
                session.end()
                session.close()
            return out, list(flags)

        outs, masks = [], []
        for i in (0, 10):
            o, m = sea(ev_conds[i:i + 10], ev_seeds[i:i + 10])
            outs.append(o)
            masks.append(m)
        _, cal_mask = sea(cal_conds[:10], list(range(10)))
        for h in hooks:
            h.remove()
        p_sea = psnr(torch.cat(outs), reference).clamp(max=PSNR_CAP)
        show = lambda m: "".join("#" if x else "." for x in m)  # noqa: E731
        for name, m in [("eval batch 1", masks[0]), ("eval batch 2", masks[1]), ("calibration batch", cal_mask)]:
            print(f"SeaCache computed steps, {name:17s} {show(m)} ({sum(m)} of {len(m)})")
        planner = Planner(load_calibration(str(cal_path)))
        cal = planner.cal
        computed = [i for i, x in enumerate(cal_mask) if x]
        budget = min(1.0, realised_fraction(np.tile(np.array(cal_mask), (cal.n_units, 1)), cal.unit_flops,
                                            cal.full_step_flops, cal.fixed_step_flops) + 1e-9)
        print(f"SeaCache threshold {args.threshold}: PSNR {float(p_sea.mean()):.2f} dB on 20 images; its calibration "
              f"mask spends {budget:.4f} of the FLOPs")
        rows = [
            ("SeaCache's steps, fitted predictors", dict(family="step", mask=computed, fill=False)),
            ("SeaCache's steps, Taylor set", dict(family="step", mask=computed, fill=False, predictors="taylor")),
            ("SeaCache's steps, forecast set", dict(family="step", mask=computed, fill=False, predictors="forecast")),
            ("step DP, fitted predictors", dict(family="step", fill=False)),
            ("step DP, Taylor set", dict(family="step", fill=False, predictors="taylor")),
            ("warmup family, Taylor set", dict(family="warmup", predictors="taylor")),
            ("warmup family, fitted predictors", dict(family="warmup")),
        ]
        for i, (name, opts) in enumerate(rows):
            plan, side = planner.plan(budget, "cachec", **opts)
            out = plan_images(driver, generate, plan, side, work / f"plan{i}.yaml", ev_conds, ev_seeds)
            p = psnr(out, reference).clamp(max=PSNR_CAP)
            d, lo, hi = paired_difference(p, p_sea)
            extra = plan.budget.options.get("warmup")
            print(f"{name:38s} realised {plan.budget.realised:.4f} predicted {plan.predicted_error:.4g} "
                  f"PSNR {float(p.mean()):.2f} dB  vs SeaCache {d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                  + (f"  (warm-up {extra}, interval {plan.budget.options['interval']})" if extra else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
