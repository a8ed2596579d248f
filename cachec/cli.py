"""The ``cachec`` command line. It only wires the stages together; no logic lives here."""

from __future__ import annotations

import time
from pathlib import Path

import click

from . import __version__

from .cli_common import (USER_ERRORS, condition_options, conditions, device_dtype_options, device_option,  # noqa: F401
                         dtype_option, friendly, check_output, output_folder, parse_resolution, resolution_flag)
from .cli_export import export
from .mask_search import MASK_RUNS
from .cli_sampling import eval_, run, sample, write_json


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


main.add_command(sample)
main.add_command(run)
main.add_command(eval_)
main.add_command(export)


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
@condition_options
@click.option("--samples-per-condition", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="CFG scale (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sample n uses seed SEED + n (all below 500000: the validation and evaluation seeds lie above).")
@resolution_flag
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--shard", default="0/1", show_default=True, help="i/n: calibrate every n-th batch starting at i.")
@click.option("--eoc-lags", type=int, default=2, show_default=True, help="Lags kept for EOC's inner products.")
@click.option("--eoc-prior", type=click.Choice(["token", "channel", "element"]), default="token", show_default=True,
              help="Grouping of EOC's prior (element: the full per-element prior, large files; docs/calibration-format.md).")
@click.option("--eoc-sample", type=click.IntRange(min=0), default=256, show_default=True,
              help="Most elements of an EOC group the sums read (a fixed random subset; 0: all).")
@click.option("--sketch-dim", type=click.IntRange(min=0), default=8192, show_default=True,
              help="Units with more output elements per sample get their Gram from a CountSketch of this size (0: exact).")
@click.option("--sensitivity", type=click.Choice(["auto", "full", "factored", "chain", "none"]), default="auto", show_default=True,
              help="How the final-sample sensitivity per unit and step is measured (docs/calibration.md).")
@click.option("--sensitivity-samples", type=int, default=4, show_default=True)
@click.option("--cfg", type=click.Choice(["batched", "split"]), default="batched", show_default=True)
@device_dtype_options
@click.option("--restart", is_flag=True, help="Discard a partial run of another configuration instead of refusing.")
@click.option("--along", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Sample along this plan's cached trajectory (units computed in shadow); needs --sensitivity-from.")
@click.option("--sensitivity-from", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Copy the sensitivity from this calibration of the same model instead of measuring it.")
@click.option("--attention-maps", is_flag=True,
              help="Also record attention-map units (each attention's probability map, nested in its block; docs/hgc.md).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Calibration .safetensors file.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT even if it is not a calibration file.")
@friendly
def calibrate_run(model, classes, prompt, prompts_file, samples_per_condition, steps, guidance, seed, resolution,
                  batch_size, shard, eoc_lags, eoc_prior, eoc_sample, sketch_dim, sensitivity, sensitivity_samples, cfg,
                  device, dtype, restart, along, sensitivity_from, attention_maps, output, overwrite):
    """Calibrate MODEL (default digits-flow). Interrupted runs resume when the same command is re-run.

    Conditions: --classes (default: all classes, or 10 spread over them when there are more) or prompts
    (--prompt/--prompts, required for text models; cachec eval's held-out prompts are refused).
    """
    from .evaluation import check_calibration_conditions
    from .calibrate.format import read_header
    from .calibrate.run import calibrate as run_calibration
    from .loading import load_model

    if not Path(output).parent.is_dir():
        raise click.ClickException(f"output folder {Path(output).parent} does not exist; create it first")
    check_output(output, "calibration", overwrite)
    if steps is not None and steps <= 0:
        raise click.ClickException(f"--steps must be positive, got {steps}")
    if along and not sensitivity_from:
        raise click.ClickException("--along needs --sensitivity-from CALIB (the uncached calibration the plan was made from)")
    size = parse_resolution(resolution)
    driver = load_model(model, device=device_option(device), dtype=dtype_option(dtype))
    driver.set_resolution(size)
    conds = conditions(driver, classes, prompt, prompts_file)
    check_calibration_conditions(conds, seed, len(conds) * samples_per_condition, driver)
    t0 = time.perf_counter()
    path = run_calibration(driver, conds, output=output, samples_per_condition=samples_per_condition, steps=steps,
                           guidance=guidance, seed=seed, batch_size=batch_size, shard=shard, eoc_lags=eoc_lags,
                           eoc_prior=eoc_prior, eoc_sample=eoc_sample, sketch_dim=sketch_dim,
                           sensitivity="none" if (along or sensitivity_from) else sensitivity,
                           sensitivity_samples=sensitivity_samples, cfg=cfg, restart=restart, along=along,
                           sensitivity_from=sensitivity_from, attention_maps=attention_maps)
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
@click.option("--interval", type=click.IntRange(min=1), default=None,
              help="FORA interval N (fora/eoc-paper/goc-paper); cachec --family warmup: interval after the warm-up (default: the smallest, from 2, that fits the budget).")
@click.option("--family", type=click.Choice(["free", "step", "group", "warmup"]), default="free", show_default=True,
              help="cachec: free per-unit schedules, one shared mask per step, one mask per group of blocks, or "
                   "warm-up + interval steps (TaylorSeer's shape).")
@click.option("--predictors", type=click.Choice(["fitted", "taylor", "forecast"]), default="fitted", show_default=True,
              help="cachec: predictor set (fitted = every candidate by judged error; taylor = reuse or first-order Taylor by "
                   "judged error; forecast = first-order Taylor wherever two computed outputs exist).")
@click.option("--ridge", type=click.FloatRange(min=0, max=1e6), default=None,
              help="cachec --predictors fitted: relative ridge of the fitted coefficients (default 0.001).")
@click.option("--shrink", type=click.Choice(["reuse", "taylor"]), default="reuse", show_default=True,
              help="cachec --predictors fitted: what the ridge pulls the two-anchor fits (goc, ls2) towards: plain reuse "
                   "or the first-order forecast (with a large --ridge, e.g. 10).")
@click.option("--predictor-pass", type=click.Choice(["none", "trajectory"]), default="none", show_default=True,
              help="cachec: trajectory = re-choose each skipped step's predictor under the trajectory-coherent price after "
                   "the solve (the same steps and FLOPs; the fourth stage of cachec compile's search).")
@click.option("--no-fill", is_flag=True, help="cachec step/group/warmup: leave the slack of the shared masks unspent.")
@click.option("--groups", type=click.IntRange(min=1), default=None,
              help="cachec --family group: number of contiguous block groups (default 4).")
@click.option("--max-staleness", type=click.IntRange(min=1), default=None, help="cachec: most consecutive skipped steps.")
@click.option("--keep-last", type=click.IntRange(min=0), default=None, help="cachec: always compute the last N steps.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="plan.yaml", show_default=True,
              help="Plan YAML (with --sweep: NAME-<percent>.yaml per budget).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT (and its sidecar name) even if they are not plan files.")
@friendly
def plan(calibration, budget, sweep_range, method, interval, family, predictors, ridge, shrink, predictor_pass, no_fill,
         groups, max_staleness, keep_last, output, overwrite):
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
    if (ridge is not None or shrink != "reuse") and (method != "cachec" or predictors != "fitted"):
        raise click.ClickException("--ridge and --shrink only change the fitted coefficients: use them with --method "
                                   "cachec --predictors fitted")
    if predictor_pass != "none" and method != "cachec":
        raise click.ClickException("--predictor-pass re-chooses cachec's predictors: use it with --method cachec")
    if interval is not None and method == "cachec" and family != "warmup":
        raise click.ClickException("--interval is only used by the baselines and by --family warmup")
    if method == "cachec":
        options["family"] = family
        if predictors != "fitted":
            options["predictors"] = predictors
        if ridge is not None:
            options["ridge"] = ridge
        if shrink != "reuse":
            options["shrink"] = shrink
        if predictor_pass != "none":
            options["predictor_pass"] = predictor_pass
        if no_fill:
            options["fill"] = False
        if interval is not None:
            options["interval"] = interval
        if groups is not None:
            options["groups"] = groups
        if max_staleness is not None:
            options["max_staleness"] = max_staleness
        if keep_last is not None:
            options["keep_last"] = keep_last
    elif interval is not None:
        options["interval"] = interval
    budgets = parse_sweep(sweep_range) if sweep_range else [parse_budget(budget) if budget else None]
    paths = [out] if len(budgets) == 1 else [
        out.with_name(f"{out.stem}-{round(100 * b)}{out.suffix}") for b in budgets]
    for path in paths:
        check_output(path, "plan", overwrite)
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


@main.command("compile")
@click.argument("model", required=False)
@click.option("--budget", default="40%", show_default=True, help="FLOPs budget: fraction of a full run's FLOPs.")
@click.option("--method", type=click.Choice(["cachec", "fora", "eoc-paper", "goc-paper", "uniform"]), default="cachec",
              show_default=True)
@click.option("--family", type=click.Choice(["auto", "free", "step", "group", "warmup"]), default="auto", show_default=True,
              help="cachec: schedule family; auto = closed-loop choice on validation seeds.")
@click.option("--samples-per-condition", type=click.IntRange(min=1), default=None,
              help="Calibration samples per condition (default: about 40 samples in all, e.g. 4 per class of 10, "
                   "1 per prompt of 30).")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Evaluation samples per condition.")
@condition_options
@resolution_flag
@click.option("--refine", type=click.IntRange(min=0), default=2, show_default=True,
              help="cachec: re-calibrations along each plan's own cached trajectory (each iterate is a candidate).")
@click.option("--mask-runs", type=click.IntRange(min=0), default=MASK_RUNS, show_default=True,
              help="cachec: validation runs of the step-mask search after the refinements (0 = none).")
@click.option("--attention-maps", is_flag=True,
              help="Also calibrate and plan attention-map units (reuse of attention probabilities; docs/hgc.md).")
@click.option("--out-dir", type=click.Path(file_okay=False), default="cachec-out", show_default=True)
@friendly
def compile_(model, budget, method, family, samples_per_condition, per_class, classes, prompt, prompts_file, resolution,
             refine, mask_runs, attention_maps, out_dir):
    """The main job: calibrate MODEL, plan at BUDGET (schedule families, refined along their own cached
    trajectories, the best step mask searched from spaced starts, predictors re-chosen along the trajectory;
    chosen closed-loop on validation seeds, the three best confirmed on fresh ones), evaluate against uncached
    sampling on held-out seeds.

    Writes OUT_DIR/calib.safetensors, plan.yaml, eval.json and side_by_side.png (uncached | cached) and
    prints one table. Calibration and validation use the conditions given (--classes, default all classes or
    10 spread over them; prompts for text models); evaluation uses the same classes, or for text models
    cachec's held-out prompt set (see `cachec eval --help`), on held-out seeds.
    """
    from .pipeline_job import job_table, run_job
    from .planner.budget import parse_budget

    b = parse_budget(budget)
    size = parse_resolution(resolution)
    job = run_job(model, b, out_dir, method=method, family=family, samples_per_condition=samples_per_condition,
                  eval_per_class=per_class, refine=refine, mask_runs=mask_runs, log=lambda m: click.echo(m, err=True),
                  conditions=lambda driver: conditions(driver, classes, prompt, prompts_file), resolution=size,
                  attention_maps=attention_maps)
    click.echo(job_table(job.result))
    click.echo(f"plan -> {job.plan}; side-by-side (uncached | cached) -> {job.side_by_side}")


if __name__ == "__main__":  # pragma: no cover
    main()
