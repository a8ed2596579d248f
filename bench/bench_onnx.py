"""ONNX export benchmark (issue 17): a plan's step graphs under onnxruntime against the uncached ONNX graph,
measured side by side on CPU, and the images against the torch runtime's.

    python bench/bench_onnx.py [--plan plans/digits-flow-40.yaml] [--model M] [--batch 10] [--repeats 5]
                               [--threads 1] [--out bench-out/onnx] [--json FILE]

1. ``cachec export PLAN --onnx OUT`` (timed: tracing, the full ``onnx.checker`` check, the FLOP count).
2. The same noise (torch's per-seed generators, as ``Driver.generate`` draws it) through
   (a) the torch runtime with the plan applied, (b) the onnxruntime loop on the step graphs,
   (c) uncached torch sampling, (d) the onnxruntime loop on ``uncached.onnx`` at every step;
   max abs image differences (b)−(a) and (d)−(c).
3. Wall clock of (b) and (d), alternating within each repeat (same process, same machine load; sessions
   opened beforehand), median over repeats: speed-up = wall(d) / wall(b), next to the ideal 1 / FLOPs
   fraction from the manifest. The torch runtime's own timings (a), (c) are printed for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cachec.loading import load_model
from cachec.runtime import apply, load_plan
from cachec.runtime.onnx_export import export_plan
from cachec.runtime.onnx_loop import OnnxSampler

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, default=ROOT / "plans" / "digits-flow-40.yaml")
    ap.add_argument("--model", default=None, help="default: the plan's model")
    ap.add_argument("--batch", type=int, default=10, help="images per run (batched CFG: twice the rows)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads and torch threads")
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "onnx", help="export folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plan = load_plan(args.plan)
    driver = load_model(args.model or plan.model.source)
    S, g = plan.steps, plan.sampler.guidance.scale

    t0 = time.perf_counter()
    result = export_plan(driver.pipe, plan, args.out, log=lambda m: None)
    export_s = time.perf_counter() - t0
    m = result.manifest_data

    labels = [i % driver.num_classes for i in range(args.batch)]
    seeds = list(range(2_000_000, 2_000_000 + args.batch))
    noise = driver.pipe.initial_noise(len(seeds), [torch.Generator().manual_seed(s) for s in seeds]).numpy()
    t0 = time.perf_counter()
    cached = OnnxSampler(args.out, threads=args.threads)
    uncached = OnnxSampler(args.out, uncached=True, threads=args.threads)
    open_s = time.perf_counter() - t0

    walls: dict[str, list[float]] = {"onnx_cached": [], "onnx_uncached": [], "torch_cached": [], "torch_uncached": []}
    for r in range(args.repeats):
        oc = cached(labels, noise)
        ou = uncached(labels, noise)
        walls["onnx_cached"].append(oc.report.wall_time_s)
        walls["onnx_uncached"].append(ou.report.wall_time_s)
        if r == 0:  # torch references (and one timing each): the images must agree
            with apply(driver, plan) as handle:
                tc = driver.generate(labels, seeds, steps=S, guidance=g).numpy()
                walls["torch_cached"].append(handle.report.wall_time_s)
            t0 = time.perf_counter()
            tu = driver.generate(labels, seeds, steps=S, guidance=g).numpy()
            walls["torch_uncached"].append(time.perf_counter() - t0)
            diff_cached = float(np.abs(oc.images - tc).max())
            diff_uncached = float(np.abs(ou.images - tu).max())
    med = {k: statistics.median(v) for k, v in walls.items()}
    fraction = oc.report.flops_fraction
    out = {
        "plan": str(args.plan), "model": driver.name, "batch": args.batch, "steps": S, "threads": args.threads,
        "repeats": args.repeats, "graphs": result.graphs, "export_s": export_s, "open_sessions_s": open_s,
        "max_abs_diff_cached_vs_torch": diff_cached, "max_abs_diff_uncached_vs_torch": diff_uncached,
        "flops_fraction": fraction, "ideal_speedup": 1 / fraction,
        "onnx_flops_check": m["flops"].get("onnx_check"),
        "median_wall_s": med, "walls_s": walls,
        "speedup_onnx": med["onnx_uncached"] / med["onnx_cached"],
        "speedup_torch": med["torch_uncached"] / med["torch_cached"],
    }
    print(f"export: {result.graphs} step graphs + uncached.onnx in {export_s:.1f} s -> {args.out}; "
          f"sessions opened in {open_s:.1f} s")
    print(f"images, max abs diff: onnxruntime plan vs torch runtime {diff_cached:.2e}; "
          f"uncached.onnx vs uncached torch {diff_uncached:.2e}")
    print(f"{args.batch} images, {S} steps, {args.threads} thread(s), median of {args.repeats} (side by side):")
    print(f"  onnxruntime  uncached {med['onnx_uncached']:.3f} s   plan {med['onnx_cached']:.3f} s   "
          f"speed-up {out['speedup_onnx']:.2f}x  (ideal {1 / fraction:.2f}x at {100 * fraction:.2f}% FLOPs)")
    print(f"  torch (1 run) uncached {med['torch_uncached']:.3f} s   plan {med['torch_cached']:.3f} s   "
          f"speed-up {out['speedup_torch']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
