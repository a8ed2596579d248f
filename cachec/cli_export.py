"""``cachec export``: a plan as ONNX step graphs + manifest for runtimes without PyTorch (docs/onnx.md)."""

from __future__ import annotations

import click

from .cli_common import friendly


@click.command()
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", required=False)
@click.option("--onnx", "onnx_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder: one ONNX graph per distinct step signature, uncached.onnx, weights.bin, manifest.json.")
@click.option("--force", is_flag=True, help="Export even if the weights' fingerprint differs from the plan's.")
@click.option("--opset", type=click.IntRange(min=14), default=17, show_default=True, help="ONNX opset of the graphs.")
@click.option("--no-flops", is_flag=True, help="Skip the FLOP count on the ONNX graphs (the cross-check of the plan's costs).")
@click.option("--verify", type=click.IntRange(min=0), default=0, show_default=True,
              help="Then sample N images with onnxruntime and with the torch runtime and print the max abs difference.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that holds no earlier export.")
@friendly
def export(plan_file, model, onnx_dir, force, opset, no_flops, verify, overwrite):
    """Export PLAN_FILE applied to MODEL (default: the plan's model) as ONNX step graphs driven by a manifest.

    \b
    Run them without PyTorch:  python -m cachec.runtime.onnx_loop DIR --classes 0-9
    or from Python:            cachec.runtime.onnx_loop.OnnxSampler(DIR)(labels, noise)
    """
    from .loading import load_model
    from .runtime.onnx_export import export_plan
    from .runtime.plan import load_plan

    plan = load_plan(plan_file)
    driver = load_model(model or plan.model.source)
    result = export_plan(driver.pipe, plan, onnx_dir, force=force, opset=opset, flops=not no_flops,
                         overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    m = result.manifest_data
    click.echo(f"{plan.budget.method} plan ({plan.steps} steps, {100 * plan.budget.realised:.2f}% of full FLOPs): "
               f"{result.graphs} step graphs + uncached.onnx, onnx.checker full check passed, "
               f"{result.seconds:.1f} s -> {result.manifest}")
    check = m["flops"].get("onnx_check")
    if check is not None:
        gap = check["uncached_gap"]
        click.echo(f"FLOPs on the graphs: units {'agree with' if check['units_agree'] else 'DIFFER from'} the plan's "
                   f"costs; the whole forward counts {gap:.0f} fewer FLOPs than the plan's "
                   f"({100 * gap / m['flops']['full_step']:.3f}%, never-cached part)")
    if verify:
        click.echo(verify_export(driver, plan, onnx_dir, verify, force=force))


def verify_export(driver, plan, onnx_dir, n: int, force: bool = False) -> str:
    """Sample ``n`` images (classes cycled, seeds 0..n-1) with the ONNX loop and with the torch runtime.

    Returns:
        One line: max abs difference of the images, realised FLOPs, wall times.
    """
    import numpy as np
    import torch

    from .runtime import apply
    from .runtime.onnx_loop import OnnxSampler

    labels = [i % (driver.num_classes or 1) for i in range(n)]
    seeds = list(range(n))
    noise = driver.pipe.initial_noise(n, [torch.Generator().manual_seed(s) for s in seeds]).numpy()  # generate()'s
    with apply(driver, plan, force=force) as handle:
        ref = driver.generate(labels, seeds, steps=plan.steps, guidance=plan.sampler.guidance.scale).numpy()
        torch_s = handle.report.wall_time_s
    out = OnnxSampler(onnx_dir)(labels, noise)
    diff = float(np.abs(out.images - ref).max())
    return (f"verify ({n} images): onnxruntime vs torch runtime max abs diff {diff:.2e}; realised FLOPs "
            f"{100 * out.report.flops_fraction:.2f}% (manifest); wall {out.report.wall_time_s:.2f} s (onnxruntime) "
            f"vs {torch_s:.2f} s (torch)")
