"""The ``cachec`` command line. It only wires the stages together; no logic lives here."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from . import __version__

#: errors that are the user's input, shown as one line without a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, PermissionError, RuntimeError)


def friendly(fn):
    """Turn user-input errors into a one-line ``Error: …`` and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(msg).splitlines()[0] if str(msg) else type(exc).__name__) from None

    return wrapper


def _device(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--device cuda was given but no CUDA GPU is available; use --device cpu")
    return device


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise click.ClickException(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _step_bar(total_steps: int, n_batches: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps * n_batches, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    return bar, (lambda i, n: bar.update(1))


def _conditions(driver, classes: str | None, prompts: str | None, prompt: tuple[str, ...] = ()) -> list:
    from .calibrate.conditions import parse_classes, read_prompts

    if classes and (prompts or prompt):
        raise click.ClickException("give either --classes or prompts, not both")
    if prompts:
        return read_prompts(prompts)
    if prompt:
        return list(prompt)
    if driver.condition_kind == "prompt":
        raise click.ClickException(f"{driver.name} is text-conditional: give --prompts FILE or --prompt TEXT")
    return parse_classes(classes or f"0-{driver.num_classes - 1}", driver.num_classes)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cachec")
def main():
    """cachec: calibrate a Diffusion Transformer, compile a cache plan under a FLOP budget, run it.

    \b
    Stages:  cachec calibrate MODEL -o calib.safetensors
             cachec plan calib.safetensors --budget 40% -o plan.yaml
             cachec run plan.yaml   |   cachec eval plan.yaml
    MODEL is a shipped name (digits-flow, digits-ddim; default digits-flow), a local diffusers folder or a
    hub id already in the local cache.
    """


@main.command()
@click.argument("model", required=False)
@click.option("--classes", default=None, help="Class labels, e.g. '0-9' or '3,5,7' (default: all classes).")
@click.option("--per-class", default=10, show_default=True, type=click.IntRange(min=1), help="Samples per class.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed SEED + i.")
@click.option("--cfg", type=click.Choice(["batched", "split"]), default="batched", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="PNG grid; the raw samples go to the same name with .safetensors.")
@friendly
def sample(model, classes, per_class, steps, guidance, seed, cfg, device, dtype, out):
    """Generate images without caching: a PNG grid plus the raw samples (.safetensors)."""
    import torch

    from .images import make_grid, save_png
    from .loading import load_model
    from .samples import save_samples

    out = Path(out)
    if not out.parent.exists():
        raise click.ClickException(f"output folder {out.parent} does not exist; create it first")
    if steps is not None and steps <= 0:
        raise click.ClickException(f"--steps must be positive, got {steps}")
    driver = load_model(model, device=_device(device), dtype=_dtype(dtype))
    conds = [c for c in _conditions(driver, classes, None) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(conds))]
    steps = steps or driver.default_steps
    bar, cb = _step_bar(steps, 1, f"sampling {driver.name}")
    from .runtime.flops import count_flops

    t0 = time.perf_counter()
    images, total_flops, _ = count_flops(driver.generate, conds, seeds, steps=steps, guidance=guidance, cfg=cfg,
                                         callback=cb)
    wall = time.perf_counter() - t0
    bar.close()
    save_png(make_grid(images, ncols=per_class if per_class > 1 else 10), out)
    raw = out.with_suffix(".safetensors")
    meta = {"model": driver.name, "steps": steps, "guidance": guidance if guidance is not None else driver.default_guidance,
            "cfg": cfg, "plan": None, "wall_s": wall, "flops_per_image": total_flops / len(conds)}
    save_samples(raw, images, torch.tensor(conds), torch.tensor(seeds), meta)
    click.echo(f"{len(conds)} samples from {driver.name} ({steps} steps, {wall:.1f} s) -> {out}, {raw}")


class _DefaultRunGroup(click.Group):
    """A group whose first argument is a subcommand (show, merge) or else the options of ``run``."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultRunGroup)
def calibrate():
    """Record calibration statistics by real uncached sampling (default subcommand: run).

    \b
    cachec calibrate [MODEL] [--classes 0-9 | --prompts FILE] -o calib.safetensors
    cachec calibrate show calib.safetensors
    cachec calibrate merge shard0.safetensors shard1.safetensors -o calib.safetensors
    """


@calibrate.command("run")
@click.argument("model", required=False)
@click.option("--classes", default=None, help="Class labels, e.g. '0-9' or '1,3,5' (default: all classes).")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None, help="UTF-8 file, one prompt per line.")
@click.option("--samples-per-condition", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample n uses seed SEED + n.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--shard", default="0/1", show_default=True, help="i/n: calibrate every n-th batch starting at i.")
@click.option("--eoc-lags", type=int, default=2, show_default=True, help="Lags kept for EOC's inner products.")
@click.option("--sensitivity", type=click.Choice(["full", "factored", "none"]), default="full", show_default=True,
              help="How the final-sample sensitivity per unit and step is measured (docs/calibration.md).")
@click.option("--sensitivity-samples", type=int, default=4, show_default=True)
@click.option("--cfg", type=click.Choice(["batched", "split"]), default="batched", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--restart", is_flag=True, help="Discard a partial run of another configuration instead of refusing.")
@click.option("--along", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Sample along this plan's cached trajectory (units computed in shadow); needs --sensitivity-from.")
@click.option("--sensitivity-from", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Copy the sensitivity from this calibration of the same model instead of measuring it.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Calibration .safetensors file.")
@friendly
def calibrate_run(model, classes, prompts, samples_per_condition, steps, guidance, seed, batch_size, shard, eoc_lags,
                  sensitivity, sensitivity_samples, cfg, device, dtype, restart, along, sensitivity_from, output):
    """Calibrate MODEL (default digits-flow). Interrupted runs resume when the same command is re-run."""
    from .calibrate.format import read_header
    from .calibrate.run import calibrate as run_calibration
    from .loading import load_model

    if not Path(output).parent.is_dir():
        raise click.ClickException(f"output folder {Path(output).parent} does not exist; create it first")
    if steps is not None and steps <= 0:
        raise click.ClickException(f"--steps must be positive, got {steps}")
    if along and not sensitivity_from:
        raise click.ClickException("--along needs --sensitivity-from CALIB (the uncached calibration the plan was made from)")
    driver = load_model(model, device=_device(device), dtype=_dtype(dtype))
    conds = _conditions(driver, classes, prompts)
    t0 = time.perf_counter()
    path = run_calibration(driver, conds, output=output, samples_per_condition=samples_per_condition, steps=steps,
                           guidance=guidance, seed=seed, batch_size=batch_size, shard=shard, eoc_lags=eoc_lags,
                           sensitivity="none" if (along or sensitivity_from) else sensitivity,
                           sensitivity_samples=sensitivity_samples, cfg=cfg, restart=restart, along=along,
                           sensitivity_from=sensitivity_from)
    h = read_header(path)
    S, B = h["steps"], h["guidance"]["branches"]
    full_run = h["flops"]["full_step"] * S * B
    click.echo(f"calibrated {h['model']['class']} ({driver.name}): {len(h['units'])} units, {S} steps, "
               f"{sum(h['samples'])} samples x {B} branches, {time.perf_counter() - t0:.1f} s; "
               f"full run {full_run / 1e9:.3f} GFLOPs per sample; "
               f"{Path(path).stat().st_size / 2**20:.1f} MiB -> {path}")


@calibrate.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@friendly
def calibrate_show(file):
    """Print the header and a few statistics of a calibration file."""
    from .calibrate.calfile import show

    click.echo(show(file))


@calibrate.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@friendly
def calibrate_merge(files, output):
    """Merge calibration shards (exact: sums add) into one file."""
    from .calibrate import merge

    click.echo(f"merged {len(files)} files -> {merge(list(files), output)}")


@main.command()
@click.argument("calibration", type=click.Path(exists=True, dir_okay=False))
@click.option("--budget", default=None, help="FLOPs budget: fraction of a full run's FLOPs (never-cached parts "
              "included), as 40% or 0.4.")
@click.option("--sweep", "sweep_range", default=None, help="A family of plans, e.g. 20%..80% (step 10%) or 20%..80%:5%.")
@click.option("--method", type=click.Choice(["cachec", "fora", "eoc-paper", "goc-paper", "uniform"]), default="cachec",
              show_default=True, help="cachec = solved schedule; the others are the published baselines.")
@click.option("--interval", type=click.IntRange(min=1), default=None, help="FORA interval N (fora/eoc-paper/goc-paper).")
@click.option("--family", type=click.Choice(["free", "step", "group"]), default="free", show_default=True,
              help="cachec: free per-unit schedules, one shared mask per step, or one mask per group of blocks.")
@click.option("--groups", type=click.IntRange(min=1), default=None,
              help="cachec --family group: number of contiguous block groups (default 4).")
@click.option("--max-staleness", type=click.IntRange(min=1), default=None, help="cachec: most consecutive skipped steps.")
@click.option("--keep-last", type=click.IntRange(min=0), default=None, help="cachec: always compute the last N steps.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="plan.yaml", show_default=True,
              help="Plan YAML (with --sweep: NAME-<percent>.yaml per budget).")
@friendly
def plan(calibration, budget, sweep_range, method, interval, family, groups, max_staleness, keep_last, output):
    """Solve a cache plan from a calibration file under a FLOPs budget and write it as YAML."""
    from .planner import load_calibration, sweep
    from .planner.budget import parse_budget, parse_sweep
    from .runtime.plan import write_plan

    if (budget is None) == (sweep_range is None) and interval is None:
        raise click.ClickException("give exactly one of --budget B or --sweep LO..HI")
    out = Path(output)
    if not out.parent.exists():
        raise click.ClickException(f"output folder {out.parent} does not exist; create it first")
    options = {}
    if groups is not None and (method != "cachec" or family != "group"):
        raise click.ClickException("--groups is only used with --family group")
    if method == "cachec":
        options["family"] = family
        if groups is not None:
            options["groups"] = groups
        if max_staleness is not None:
            options["max_staleness"] = max_staleness
        if keep_last is not None:
            options["keep_last"] = keep_last
    elif interval is not None:
        options["interval"] = interval
    budgets = parse_sweep(sweep_range) if sweep_range else [parse_budget(budget) if budget else None]
    cal = load_calibration(calibration)
    planned = sweep(cal, budgets, method, **options)
    for plan, side in planned:
        b = plan.budget
        path = out if len(budgets) == 1 else out.with_name(f"{out.stem}-{round(100 * b.target)}{out.suffix}")
        written = write_plan(plan, path, side or None)
        click.echo(f"{method} plan: target {100 * b.target:.1f}%, realised {100 * b.realised:.2f}% of full "
                   f"FLOPs, predicted error {plan.predicted_error:.6g} -> {path}"
                   + (f" (+ {written.sidecar.file})" if written.sidecar else ""))
    if len(budgets) > 1:
        click.echo("\n target  realised  predicted error")
        for plan, _ in planned:
            b = plan.budget
            click.echo(f"{100 * b.target:6.1f}% {100 * b.realised:8.2f}%  {plan.predicted_error:.6g}")


@main.command()
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Write a units × steps heatmap PNG.")
@friendly
def inspect(plan_file, png):
    """Summarise a plan: identity, budget, actions and per-step compute fraction (optionally a heatmap)."""
    from .plan_summary import heatmap_png, summary
    from .runtime.plan import load_plan

    p = load_plan(plan_file)
    click.echo(summary(p))
    if png:
        click.echo(f"heatmap -> {heatmap_png(p, png)}")


@main.command("eval")
@click.argument("target", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", required=False)
@click.option("--reference", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sample-set mode: the uncached set with the same labels and seeds (default: TARGET itself).")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Plan mode: held-out samples per class.")
@click.option("--seed", type=int, default=None, help="Plan mode: first held-out seed (default 1000000; never the "
              "calibration seeds).")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Plan mode: side-by-side PNG (uncached | cached).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
@friendly
def eval_(target, model, reference, per_class, seed, png, json_out):
    """Quality of a plan (TARGET.yaml) or of a sample set (TARGET.safetensors) against uncached sampling.

    \b
    Plan mode: runs the plan and the uncached MODEL (default: the model the plan was calibrated on) on
    held-out conditions and seeds, and reports PSNR/SSIM vs uncached, class accuracy, the Fréchet distance
    in digit-classifier features, counted FLOPs fraction and wall-clock speed-up.
    Sample-set mode: compares two files written by `cachec sample` / `cachec run`.
    """
    from .report import compare_sample_files, format_table

    if target.endswith((".yaml", ".yml")):
        from .evaluation import EVAL_SEED, evaluate_plan, held_out
        from .images import save_png, side_by_side
        from .loading import load_model
        from .pipeline_job import job_table
        from .runtime.plan import load_plan

        plan = load_plan(target)
        driver = load_model(model or plan.model.source)
        conds, seeds = held_out(driver, per_class, EVAL_SEED if seed is None else seed)
        result = evaluate_plan(driver, plan, conds, seeds, name=Path(target).stem)
        click.echo(job_table(result.result))
        if png:
            save_png(side_by_side(result.reference, result.cached, ncols=per_class), png)
        out = result.result
    else:
        out = compare_sample_files(target, reference or target, name=Path(target).stem)
        click.echo(format_table(out))
    if json_out:
        _write_json(json_out, out)


@main.command()
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", required=False)
@click.option("--classes", default=None, help="Class labels, e.g. '0-9' (class-conditional models).")
@click.option("--prompt", multiple=True, help="A prompt (text models); repeat for several.")
@click.option("--per-class", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed SEED + i.")
@click.option("--force", is_flag=True, help="Apply even if the weights' fingerprint differs from the plan's.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps [default: the plan's].")
@click.option("--guidance", type=float, default=None, help="Guidance scale [default: the plan's].")
@click.option("--remap", type=click.Choice(["error", "nearest", "off"]), default="error", show_default=True,
              help="A run whose timesteps are not the plan's sequence: refuse, follow the nearest plan step, "
                   "or compute it in full (docs/plan-format.md).")
@click.option("--out", type=click.Path(dir_okay=False), default="cached.png", show_default=True,
              help="PNG grid; raw samples go to the same name with .safetensors.")
@friendly
def run(plan_file, model, classes, prompt, per_class, seed, force, steps, guidance, remap, out):
    """Sample with a plan applied and print the runtime's report (FLOPs fraction, counts, wall time)."""
    import torch

    from .images import make_grid, save_png
    from .loading import load_model
    from .samples import save_samples
    from .runtime import apply
    from .runtime.plan import load_plan

    out = Path(out)
    if not out.parent.exists():
        raise click.ClickException(f"output folder {out.parent} does not exist; create it first")
    plan = load_plan(plan_file)
    driver = load_model(model or plan.model.source)
    conds = [c for c in _conditions(driver, classes, None, prompt) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(conds))]
    steps = plan.steps if steps is None else steps
    guidance = plan.sampler.guidance.scale if guidance is None else guidance
    with apply(driver, plan, force=force, remap=remap) as handle:
        images = driver.generate(conds, seeds, steps=steps, guidance=guidance)
        rep = handle.report
    save_png(make_grid(images, ncols=per_class if per_class > 1 else 10), out)
    if driver.condition_kind == "class":
        meta = {"model": driver.name, "steps": steps, "guidance": guidance, "plan": str(plan_file),
                "wall_s": rep.wall_time_s, "flops_per_image": None, "flops_fraction": rep.flops_fraction}
        save_samples(out.with_suffix(".safetensors"), images, torch.tensor(conds), torch.tensor(seeds), meta)
    click.echo(f"{len(conds)} samples with {plan.budget.method} plan: FLOPs {100 * rep.flops_fraction:.1f}% of uncached, "
               f"wall {rep.wall_time_s:.2f} s; unit calls computed {rep.computed}, skipped {rep.skipped} "
               f"(compensated {rep.compensated}) -> {out}")
    click.echo("per-step compute %: " + " ".join(f"{100 * f:.0f}" for f in rep.step_fractions))


@main.command("compile")
@click.argument("model", required=False)
@click.option("--budget", default="40%", show_default=True, help="FLOPs budget: fraction of a full run's FLOPs.")
@click.option("--method", type=click.Choice(["cachec", "fora", "eoc-paper", "goc-paper", "uniform"]), default="cachec",
              show_default=True)
@click.option("--family", type=click.Choice(["auto", "free", "step", "group"]), default="auto", show_default=True,
              help="cachec: schedule family; auto = closed-loop choice on validation seeds.")
@click.option("--samples-per-condition", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True, help="Evaluation samples per class.")
@click.option("--refine", type=click.IntRange(min=0), default=2, show_default=True,
              help="cachec: re-calibrations along each plan's own cached trajectory (each iterate is a candidate).")
@click.option("--out-dir", type=click.Path(file_okay=False), default="cachec-out", show_default=True)
@friendly
def compile_(model, budget, method, family, samples_per_condition, per_class, refine, out_dir):
    """The main job: calibrate MODEL, plan at BUDGET (schedule families, refined along their own cached
    trajectories, chosen closed-loop on validation seeds), evaluate against uncached sampling on held-out seeds.

    Writes OUT_DIR/calib.safetensors, plan.yaml, eval.json and side_by_side.png (uncached | cached) and
    prints one table.
    """
    from .pipeline_job import job_table, run_job
    from .planner.budget import parse_budget

    b = parse_budget(budget)
    job = run_job(model, b, out_dir, method=method, family=family, samples_per_condition=samples_per_condition,
                  eval_per_class=per_class, refine=refine, log=lambda m: click.echo(m, err=True))
    click.echo(job_table(job.result))
    click.echo(f"plan -> {job.plan}; side-by-side (uncached | cached) -> {job.side_by_side}")


def _write_json(path, obj) -> None:
    from .runtime.io import to_jsonable

    Path(path).write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
