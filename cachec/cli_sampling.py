"""The sampling commands of ``cachec``: ``sample`` (uncached), ``run`` (a plan applied) and ``eval`` (a plan or
a sample set against uncached sampling). They write and read sample-set files (:mod:`cachec.samples`) and
take conditions as every command does (:mod:`cachec.cli_common`)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .cli_common import (condition_options, conditions, device_dtype_options, device_option, dtype_option, friendly,
                         given_conditions, output_folder, parse_resolution, resolution_flag, step_bar)


def _outputs(out: str, overwrite: bool) -> tuple[Path, Path]:
    """The PNG grid and the sample-set file of ``--out``, both checked before any sampling.

    Raises:
        click.ClickException: missing folder, an ``--out`` that is not a .png name.
        FileExistsError: either file exists and is not what would be written (a PNG / a sample set).
    """
    from .samples import check_replaceable

    png = output_folder(out)
    if png.suffix.lower() != ".png":
        raise click.ClickException(f"--out {png} must be a .png name (the samples go to the same name with .safetensors)")
    if png.exists() and not overwrite and png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise FileExistsError(f"{png} exists and is not a PNG image: refusing to replace it (pass --overwrite)")
    raw = png.with_suffix(".safetensors")
    check_replaceable(raw, overwrite)
    return png, raw


_OVERWRITE = click.option("--overwrite", is_flag=True,
                          help="Replace the output files even when they are not a PNG / sample set (e.g. a calibration).")


def _adaptive_flags(f):
    """``--adaptive``, ``--adaptive-mode`` and ``--ceiling`` (the SoftCap adaptive mode, docs/softcap.md)."""
    f = click.option("--ceiling", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                     help="Adaptive FLOP ceiling, fraction of uncached (>= the plan's realised) "
                          "[default: 1.5 x the plan's, at most 1].")(f)
    f = click.option("--adaptive-mode", type=click.Choice(["softcap", "speca"]), default="softcap", show_default=True,
                     help="softcap: drift observer + soft-budget PI controller; speca: forecast-then-verify baseline.")(f)
    return click.option("--adaptive", is_flag=True,
                        help="Adaptive mode: add Full steps to the plan where the observer sees risk, under a soft "
                             "FLOP ceiling (calibrated first on a short probe run).")(f)


def _adaptive_options(adaptive: bool, mode: str, ceiling: float | None):
    if not adaptive:
        if ceiling is not None:
            raise click.ClickException("--ceiling applies to --adaptive runs")
        return None
    from .runtime.adaptive import AdaptiveOptions

    return AdaptiveOptions(mode=mode, ceiling=ceiling)


def _with_probe(options, driver, conds):
    """``options`` whose calibration probe uses ``conds`` (deduplicated, on the probe's own seeds) when the
    model is text-conditional without a calibration prompt set of its own (None passes through)."""
    if options is None or driver.condition_kind != "prompt" or driver.prompt_sets.get("calibration"):
        return options
    from dataclasses import replace

    return replace(options, probe_conditions=tuple(dict.fromkeys(conds)))


def adaptive_lines(rep) -> list[str]:
    """What ``cachec run/eval --adaptive`` prints about a run: ceiling, realised, Full steps, traces."""
    def trace(xs):
        return " ".join("-" if x is None else ("inf" if x == float("inf") else f"{x:.3g}") for x in xs)

    return [f"adaptive {rep.adaptive}: ceiling {100 * rep.ceiling:.1f}%, realised {100 * rep.flops_fraction:.2f}%, "
            f"Full steps {rep.full_steps} (decisions {rep.decisions}; plain-reuse fallbacks {rep.fallbacks}"
            + (f", rejected forecasts {rep.rejected_verifications}" if rep.adaptive == "speca" else "") + ")",
            "risk: " + trace(rep.risk), "tau:  " + trace(rep.tau)]


@click.command()
@click.argument("model", required=False)
@condition_options
@click.option("--per-class", default=10, show_default=True, type=click.IntRange(min=1),
              help="Samples per condition (class or prompt).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed SEED + i.")
@resolution_flag
@click.option("--cfg", type=click.Choice(["batched", "split"]), default="batched", show_default=True)
@device_dtype_options
@click.option("--out", "out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="PNG grid; the raw samples go to the same name with .safetensors (a sample set).")
@_OVERWRITE
@friendly
def sample(model, classes, prompt, prompts_file, per_class, steps, guidance, seed, resolution, cfg, device, dtype, out,
           overwrite):
    """Generate images without caching: a PNG grid plus the raw samples (a .safetensors sample set).

    Conditions: --classes (default: all classes, or 10 spread over them when there are more) or prompts
    (--prompt/--prompts, required for text models); each is sampled --per-class times.
    """
    from .images import make_grid, save_png
    from .loading import load_model
    from .runtime.flops import count_flops
    from .samples import sample_meta, save_samples

    png, raw = _outputs(out, overwrite)
    if steps is not None and steps <= 0:
        raise click.ClickException(f"--steps must be positive, got {steps}")
    size = parse_resolution(resolution)
    driver = load_model(model, device=device_option(device), dtype=dtype_option(dtype))
    driver.set_resolution(size)
    conds = [c for c in conditions(driver, classes, prompt, prompts_file) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(conds))]
    steps = steps or driver.default_steps
    guidance = driver.default_guidance if guidance is None else guidance
    # pipelines without a step callback (DiTPipeline) get no bar rather than one that never moves
    bar, cb = step_bar(steps, 1, f"sampling {driver.name}") if driver.spec.step_callback or driver.spec.split_cfg \
        else (None, None)
    t0 = time.perf_counter()
    images, total_flops, _ = count_flops(driver.generate, conds, seeds, steps=steps, guidance=guidance, cfg=cfg,
                                         callback=cb)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    save_png(make_grid(images, ncols=per_class if per_class > 1 else 10), png)
    meta = sample_meta(driver, steps=steps, guidance=guidance, cfg=cfg, wall_s=wall,
                       flops_per_image=total_flops / len(conds))
    save_samples(raw, images, conds, seeds, meta, overwrite=overwrite)
    click.echo(f"{len(conds)} samples from {driver.name} ({steps} steps, {wall:.1f} s) -> {png}, {raw}")


@click.command()
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", required=False)
@condition_options
@click.option("--per-class", default=1, show_default=True, type=click.IntRange(min=1),
              help="Samples per condition (class or prompt).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed SEED + i.")
@click.option("--force", is_flag=True, help="Apply even if the weights' fingerprint differs from the plan's.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps [default: the plan's].")
@click.option("--guidance", type=float, default=None, help="Guidance scale [default: the plan's].")
@click.option("--remap", type=click.Choice(["error", "nearest", "off"]), default="error", show_default=True,
              help="A run whose timesteps are not the plan's sequence: refuse, follow the nearest plan step, "
                   "or compute it in full (docs/plan-format.md).")
@_adaptive_flags
@device_dtype_options
@click.option("--out", type=click.Path(dir_okay=False), default="cached.png", show_default=True,
              help="PNG grid; raw samples (a sample set with the plan's identity) go to the same name with .safetensors.")
@_OVERWRITE
@friendly
def run(plan_file, model, classes, prompt, prompts_file, per_class, seed, force, steps, guidance, remap, adaptive,
        adaptive_mode, ceiling, device, dtype, out, overwrite):
    """Sample with a plan applied (at the plan's resolution) and print the runtime's report (FLOPs fraction,
    counts, wall time). With --adaptive the plan is the reference of the SoftCap adaptive mode."""
    from .images import make_grid, save_png
    from .loading import load_model
    from .runtime import apply
    from .runtime.plan import load_plan
    from .samples import plan_identity, sample_meta, save_samples

    png, raw = _outputs(out, overwrite)
    options = _adaptive_options(adaptive, adaptive_mode, ceiling)
    device, dtype = device_option(device), dtype_option(dtype)
    plan = load_plan(plan_file)
    driver = load_model(model or plan.model.source, device=device, dtype=dtype)
    driver.set_resolution(plan.sampler.resolution)
    conds = [c for c in conditions(driver, classes, prompt, prompts_file) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(conds))]
    steps = plan.steps if steps is None else steps
    guidance = plan.sampler.guidance.scale if guidance is None else guidance
    options = _with_probe(options, driver, conds)
    with apply(driver, plan, force=force, remap=remap, adaptive=options) as handle:
        images = driver.generate(conds, seeds, steps=steps, guidance=guidance)
        rep = handle.report
    save_png(make_grid(images, ncols=per_class if per_class > 1 else 10), png)
    meta = sample_meta(driver, steps=steps, guidance=guidance, wall_s=rep.wall_time_s, flops_per_image=None,
                       plan=plan_identity(plan_file, plan), flops_fraction=rep.flops_fraction)
    save_samples(raw, images, conds, seeds, meta, overwrite=overwrite)
    click.echo(f"{len(conds)} samples with {plan.budget.method} plan: FLOPs {100 * rep.flops_fraction:.1f}% of uncached, "
               f"wall {rep.wall_time_s:.2f} s; unit calls computed {rep.computed}, skipped {rep.skipped} "
               f"(compensated {rep.compensated}) -> {png}, {raw}")
    click.echo("per-step compute %: " + " ".join(f"{100 * f:.0f}" for f in rep.step_fractions))
    if options is not None:
        click.echo("\n".join(adaptive_lines(rep)))


def eval_summary(result: dict) -> str:
    """The lines ``cachec eval`` prints under its table: PSNR and SSIM means with their paired bootstrap
    95 % intervals, counted FLOPs and speed-up, and what was not measured and why."""
    def metric(key, label, spec, unit=""):
        d = result.get(key) or {}
        if d.get("mean") is None:
            return f"{label}: n/a"
        mean = d["mean"] if isinstance(d["mean"], str) else format(d["mean"], spec)
        ci = d.get("ci95")
        ci_txt = (f", 95% CI [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci
                  else ", 95% CI n/a (fewer than 2 images or identical images)")
        return f"{label}: {mean}{unit}{ci_txt} (paired bootstrap over {result.get('n_images')} images)"

    lines = [metric("psnr_db", "PSNR vs uncached", ".2f", " dB"), metric("ssim", "SSIM vs uncached", ".4f")]
    ff, sp = result.get("flops_fraction"), result.get("speedup")
    lines.append(f"counted FLOPs: {'n/a' if ff is None else f'{100 * ff:.1f}% of uncached'}; "
                 f"wall-clock speed-up: {'n/a' if sp is None else f'{sp:.2f}x'}")
    adh = result.get("attribute_adherence")
    if adh:
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.1f}%"
        lines.append("attribute adherence, cached (uncached), chance: " + "; ".join(
            f"{k} {pct(adh[k]['candidate'])} ({pct(adh[k]['reference'])}), {pct(adh['chance'][k])} over {adh['n'][k]}"
            for k in ("thickness", "slant", "both")))
    iou = result.get("control_iou")
    if iou:
        c, r = iou["candidate"], iou["reference"]
        lines.append(f"control IoU (ink vs control mask), cached (uncached): {c['mean']:.3f} ({r['mean']:.3f}) "
                     f"over {len(c['per_image'])} images")
    for k, why in (result.get("not_measured") or {}).items():
        lines.append(f"not measured: {k} ({why})")
    return "\n".join(lines)


@click.command("eval")
@click.argument("target", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", required=False)
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sample-set mode: the uncached set with the same conditions and seeds (default: TARGET itself).")
@condition_options
@click.option("--samples", "n_samples", type=click.IntRange(min=1), default=None,
              help="Plan mode: held-out samples in all, conditions cycled evenly (default: the model family's, "
                   "100 for the digit models = 10 per class, 8 otherwise).")
@click.option("--seed", type=int, default=None, help="Plan mode: first held-out seed (default and minimum 1000000; "
              "calibration seeds lie below 500000).")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Plan mode: side-by-side PNG (uncached | cached).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
@_adaptive_flags
@device_dtype_options
@friendly
def eval_(target, model, reference, classes, prompt, prompts_file, n_samples, seed, png, json_out, adaptive,
          adaptive_mode, ceiling, device, dtype):
    """Quality of a plan (TARGET.yaml) or of a sample set (TARGET.safetensors) against uncached sampling.

    \b
    Plan mode: runs the plan and the uncached MODEL (default: the model the plan was calibrated on) at the
    plan's steps, guidance and resolution on held-out samples, and reports PSNR and SSIM vs uncached with
    paired bootstrap 95% intervals, counted FLOPs and wall-clock speed-up, and for the digit models class
    accuracy and the Fréchet distance in digit-classifier features.
    Held out: seeds start at 1000000 (calibration seeds lie below 500000); conditions are all classes (or
    --classes), and for text models cachec's held-out prompt set, which `cachec calibrate` refuses to
    calibrate on (prompts given with --prompt/--prompts are used as given: keep them out of the calibration).
    Sample-set mode: compares two files written by `cachec sample` / `cachec run`.
    --adaptive (plan mode): the plan is the reference of the SoftCap adaptive mode (docs/softcap.md); FLOPs
    are the runtime's per-run accounting.
    """
    from .pipeline_job import job_table
    from .report import compare_sample_files, format_table

    options = _adaptive_options(adaptive, adaptive_mode, ceiling)
    if target.endswith((".yaml", ".yml")):
        from .evaluation import EVAL_SEED, evaluate_plan, held_out_set
        from .images import save_png, side_by_side
        from .loading import load_model
        from .runtime.plan import load_plan

        device, dtype = device_option(device), dtype_option(dtype)
        plan = load_plan(target)
        driver = load_model(model or plan.model.source, device=device, dtype=dtype)
        driver.set_resolution(plan.sampler.resolution)
        conds, seeds = held_out_set(driver, n_samples, EVAL_SEED if seed is None else seed,
                                    given_conditions(driver, classes, prompt, prompts_file))
        click.echo(f"evaluating {Path(target).name} on {len(conds)} held-out samples (seeds {seeds[0]}+), "
                   "uncached vs cached", err=True)
        if options is None:
            result = evaluate_plan(driver, plan, conds, seeds, name=Path(target).stem)
        else:
            from .evaluation_adaptive import evaluate_adaptive

            options = _with_probe(options, driver, conds)
            result = evaluate_adaptive(driver, plan, options, conds, seeds, name=f"{Path(target).stem} {adaptive_mode}")
        click.echo(job_table(result.result))
        if options is not None:
            click.echo("\n".join(adaptive_lines(_report(result.result["runtime_report"]))))
        if png:
            save_png(side_by_side(result.reference, result.cached, ncols=min(len(conds), 10)), png)
        out = result.result
    else:
        if classes or prompt or prompts_file or n_samples or seed is not None or png or options is not None:
            raise click.ClickException("--classes/--prompt/--prompts/--samples/--seed/--png/--adaptive are plan-mode options "
                                       "(TARGET.yaml); a sample set carries its own conditions and seeds")
        out = compare_sample_files(target, reference or target, name=Path(target).stem)
        click.echo(format_table(out))
    click.echo(eval_summary(out))
    if json_out:
        write_json(json_out, out)


def _report(d: dict):
    """An :class:`AdaptiveRunReport` from its ``as_dict``."""
    from .runtime.adaptive import AdaptiveRunReport

    return AdaptiveRunReport(**d)


def write_json(path, obj) -> None:
    """Write ``obj`` as indented plain JSON (:func:`cachec.runtime.io.to_jsonable`)."""
    import json

    from .runtime.io import to_jsonable

    Path(path).write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
