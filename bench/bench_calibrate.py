"""Calibration overhead benchmark (run by hand, not part of the tests).

    python bench/bench_calibrate.py [--model digits-flow] [--conditions 20] [--batch-size 8]
    python bench/bench_calibrate.py --random-init          # reference architecture, untrained weights

Prints:

1. throughput ratio = (samples/s of calibration without sensitivity) ÷ (samples/s of plain uncached
   sampling), same conditions, seeds and batches (target >= 0.8). Calibration time includes everything
   ``calibrate()`` does: fingerprint, recording, float64 statistics, FLOP count, the file write.
   Runs alternate (plain, calibrate) ``--repeats`` times and the fastest of each is kept, which damps the
   noise of a shared machine; the ratio is also given in process CPU time, which a busy machine disturbs
   less than wall time;
2. peak RSS of a whole calibration process for 20 and 200 conditions (separate subprocesses; memory must
   not grow with the number of conditions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _random_reference(folder: Path) -> str:
    """A digits-flow-shaped model folder with diffusers' random init (for timing only)."""
    import torch
    from diffusers import DiTTransformer2DModel

    from cachec.reference import TRANSFORMER_CONFIG, make_scheduler

    torch.manual_seed(0)
    DiTTransformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(str(folder / "transformer"))
    make_scheduler("flow").save_pretrained(str(folder / "scheduler"))
    (folder / "cachec_model.json").write_text(json.dumps(dict(objective="flow", default_steps=25, default_guidance=3.0)))
    return str(folder)


def _conditions(driver, n: int) -> list:
    if driver.condition_kind == "class":
        return [i % driver.num_classes for i in range(n)]
    words = ["a cat", "a dog", "a red car", "a house", "a tree", "the sky", "a small boat", "a green field"]
    return [words[i % len(words)] + f" {i}" for i in range(n)]


def _load(args, tmp: Path):
    from cachec.loading import load_model

    model = _random_reference(tmp / "model") if args.random_init else args.model
    return load_model(model), model


def _rss_child(args) -> None:
    import torch

    from cachec.calibrate import calibrate

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        driver, _ = _load(args, Path(d))
        conds = _conditions(driver, args.rss_child)
        t0 = time.perf_counter()
        calibrate(driver, conds, output=Path(d) / "c.safetensors", batch_size=args.batch_size, steps=args.steps,
                  sensitivity="none", progress=False, checkpoint_every=1e9)
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"conditions": args.rss_child, "peak_rss_mb": peak_mb, "wall_s": wall}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-flow")
    p.add_argument("--random-init", action="store_true", help="untrained model of the reference architecture")
    p.add_argument("--conditions", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=torch_threads_default())
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--overlap", action="store_true", help="fold statistics on a worker thread (calibrate(overlap=True))")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-only", action="store_true")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return _rss_child(args)

    import torch

    from cachec.calibrate import calibrate

    torch.set_num_threads(args.threads)
    bs = args.batch_size
    if args.rss_only:
        return _rss(args, bs)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        driver, model = _load(args, tmp)
        steps = args.steps or driver.default_steps
        conds = _conditions(driver, args.conditions)
        seeds = list(range(len(conds)))
        driver.generate(conds[:bs], seeds[:bs], steps=steps)  # warm-up

        def timed(fn) -> tuple[float, float]:
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - w0, time.process_time() - c0

        def plain() -> None:
            for i in range(0, len(conds), bs):
                driver.generate(conds[i:i + bs], seeds[i:i + bs], steps=steps)

        def calib() -> None:
            calibrate(driver, conds, output=tmp / "c.safetensors", batch_size=bs, steps=steps, seed=0,
                      sensitivity="none", progress=False, checkpoint_every=1e9, overlap=args.overlap)

        tp, tc = [], []
        for _ in range(args.repeats):
            tp.append(timed(plain))
            tc.append(timed(calib))
        size_mb = (tmp / "c.safetensors").stat().st_size / 1e6
        n = len(conds)
        wp, wc = min(t[0] for t in tp), min(t[0] for t in tc)
        cp, cc = min(t[1] for t in tp), min(t[1] for t in tc)
        print(f"model {model}: {n} conditions, batch {bs}, {steps} steps, {args.threads} threads"
              + (", overlapped folds" if args.overlap else ""))
        print(f"plain sampling   wall {wp:7.2f} s ({n / wp:.2f} samples/s)  cpu {cp:7.2f} s   "
              f"runs {[round(t[0], 2) for t in tp]}")
        print(f"calibration      wall {wc:7.2f} s ({n / wc:.2f} samples/s)  cpu {cc:7.2f} s   "
              f"runs {[round(t[0], 2) for t in tc]}   file {size_mb:.0f} MB")
        print(f"throughput ratio {wp / wc:.3f} (wall clock), {cp / cc:.3f} (CPU time)   target >= 0.8")

    if not args.skip_rss:
        _rss(args, bs)


def _rss(args, bs: int) -> None:
    """Peak RSS of whole calibration processes (20 and 200 conditions), one subprocess each."""
    for n in (20, 200):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--batch-size", str(bs), "--threads",
               str(args.threads), "--model", args.model] + (["--random-init"] if args.random_init else [])
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if res.returncode != 0:
            print(f"RSS run with {n} conditions failed:\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"peak RSS, {n:3d} conditions: {r['peak_rss_mb']:8.0f} MB   ({r['wall_s']:.1f} s)")


def torch_threads_default() -> int:
    return max(1, min(os.cpu_count() or 1, 2))


if __name__ == "__main__":
    main()
