"""``python -m cachec.calibrate``: a minimal calibration entry point, mainly for ``torchrun``.

    torchrun --nproc_per_node 2 -m cachec.calibrate --model digits-flow --classes 0-9 -o calib.safetensors

Each rank loads the model (on ``cuda:$LOCAL_RANK`` when ``--device cuda``), takes every WORLD_SIZE-th
batch, the sums are all-reduced and rank 0 writes the file. The user-facing command is
``cachec calibrate`` (same options); this module only exists so that ``torchrun -m`` has a target.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cachec.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="shipped name, model folder or hub id (default digits-flow)")
    p.add_argument("--classes", default=None, help="class labels, e.g. 0-9,12 (class-conditional models)")
    p.add_argument("--prompts", default=None, help="UTF-8 file with one prompt per line (text models)")
    p.add_argument("--samples-per-condition", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--shard", default="0/1")
    p.add_argument("--eoc-lags", type=int, default=2)
    p.add_argument("--eoc-prior", default="token", choices=["channel", "token", "element"])
    p.add_argument("--eoc-sample", type=int, default=256, help="most elements per EOC group (0: all)")
    p.add_argument("--sketch-dim", type=int, default=8192, help="Gram sketch dimension r (0: exact)")
    p.add_argument("--sensitivity", default="auto", choices=["auto", "full", "factored", "chain", "none"])
    p.add_argument("--sensitivity-samples", type=int, default=4)
    p.add_argument("--cfg", default="batched", choices=["batched", "split"])
    p.add_argument("--restart", action="store_true")
    p.add_argument("--checkpoint-every", type=float, default=30.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from cachec.loading import load_model

    from . import calibrate, parse_classes, read_prompts

    device = a.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        import torch

        driver = load_model(a.model, device=device, dtype=getattr(torch, a.dtype))
        if a.prompts:
            conditions = read_prompts(a.prompts)
        else:
            conditions = parse_classes(a.classes or f"0-{(driver.num_classes or 1) - 1}", driver.num_classes)
        calibrate(
            driver, conditions, output=a.output, samples_per_condition=a.samples_per_condition, steps=a.steps,
            guidance=a.guidance, seed=a.seed, batch_size=a.batch_size, shard=a.shard, eoc_lags=a.eoc_lags,
            sensitivity=a.sensitivity, sensitivity_samples=a.sensitivity_samples, progress=not a.no_progress,
            cfg=a.cfg, restart=a.restart, checkpoint_every=a.checkpoint_every, eoc_prior=a.eoc_prior,
            sketch_dim=a.sketch_dim, eoc_sample=a.eoc_sample,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"Error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
