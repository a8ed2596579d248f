"""cachec against every peer caching method at matched realised FLOPs: one command, one run.

Usage::

    python bench/compare.py [--models digits-flow,digits-ddim] [--out docs/] [--quick]

For each configuration (``digits-flow`` at 25 steps, ``digits-ddim`` at 20 and 50 steps) on the same model,
the same held-out conditions (classes 0-9 × ``--per-class``) and seeds (disjoint from the calibration
seeds), in one process:

1. the uncached reference: images, FLOPs counted over the whole ``generate`` call, wall time;
2. every method of :func:`bench.peers.all_methods` at its operating points: cachec plans at a sweep of
   budgets (from a calibration the benchmark makes itself), FORA / EOC / GOC as published (same planner
   and runtime), the diffusers 0.42.1 hooks and cache-dit. Threshold methods are swept (extended and
   bisected) until their realised FLOPs bracket 25 %, 40 % and 60 %;
3. per operating point: FLOPs counted over the whole call (never a method's claim), PSNR and SSIM vs the
   uncached images of the same seeds, class accuracy, Fréchet distance in the digit classifier's features
   (vs 500 real held-out digits), and the wall-clock ratio vs the uncached run of the same batch, timed
   right before and after each method (interleaved);
4. writes ``<out>/benchmarks.json`` (raw results), ``<out>/benchmarks.md`` (tables at 25/40/60 % FLOPs,
   interpolated only between measured points) and ``<out>/benchmarks.png`` (PSNR vs realised FLOPs).

A method that raises is recorded with its error message; a method that never skips shows realised FLOPs
of 100 %. Nothing in the outputs is typed by hand.

Cost: dominated by the ≈ 45 operating points × 3 configurations, each a sampling run of the evaluation set
(default 20 images) plus a timing run of 5 images. Timings of every stage are printed and stored. On a
machine shared with other jobs pass ``--threads 1`` (two torch threads competing with other processes
were several times slower than one). ``--quick`` is a smoke run (10 images, 1–3 points per method).

Code: :mod:`bench.compare_configs` runs configurations (:mod:`bench.compare_sweeps` their sweeps and
points), :mod:`bench.compare_report` turns the results into margins and :mod:`bench.compare_markdown` into
the tables and plot; this file is the command line (and runs the worker processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import peers  # noqa: E402
from bench.compare_configs import run_config  # noqa: E402
from bench.compare_report import TABLE_BUDGETS, at_budget, headline  # noqa: E402
from bench.compare_rescore import derive, summary_lines, write_results  # noqa: E402
from bench.compare_sweeps import Config, log, run_point  # noqa: E402
from cachec.mask_search import MASK_RUNS  # noqa: E402
from cachec.runtime.io import to_jsonable  # noqa: E402

# the benchmark's API as `from bench import compare` users (tests/test_bench_peers.py) reach it
__all__ = ["Config", "at_budget", "headline", "main", "parse_args", "run_config", "run_point"]

#: steps per shipped model (the issue: digits-flow 25, digits-ddim 20 and 50)
DEFAULT_STEPS = {"digits-flow": [25], "digits-ddim": [20, 50], "digits-mmdit": [25]}


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    """The command-line options (``argv``: list of strings, default ``sys.argv[1:]``) as a Namespace.

    Raises:
        SystemExit: ``--help`` or an invalid option (argparse prints the message).
    """
    ap = argparse.ArgumentParser(description="cachec vs peer caching methods at matched realised FLOPs.")
    ap.add_argument("--models", default=None,
                    help="comma-separated shipped names or model folders (default: digits-flow,digits-ddim; with --add: "
                         "every configuration of FILE)")
    ap.add_argument("--steps", default=None,
                    help="comma-separated step counts for every model (default: digits-flow 25, digits-ddim 20 and 50, "
                         "otherwise the model's default)")
    ap.add_argument("--out", default="docs", help="folder for benchmarks.md / .json / .png (default: docs)")
    ap.add_argument("--stem", default="benchmarks",
                    help="output file names <stem>.json/.md/.png (default benchmarks; e.g. benchmarks-mmdit)")
    ap.add_argument("--per-class", type=int, default=None, help="evaluation images per class (default 2; quick 1)")
    ap.add_argument("--cal-per-class", type=int, default=None, help="calibration samples per class (default 2; quick 1)")
    ap.add_argument("--batch-size", type=int, default=10, help="samples per generate call (default 10)")
    ap.add_argument("--sensitivity", choices=["full", "factored", "none"], default=None,
                    help="cachec calibration sensitivity (default factored; quick none)")
    ap.add_argument("--sensitivity-samples", type=int, default=4)
    ap.add_argument("--methods", default=None, help="only methods whose name contains one of these (comma-separated)")
    ap.add_argument("--max-extra", type=int, default=5,
                    help="extra points per threshold method to bracket the budgets and reach each within 2 points below")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--flop-counter", choices=["fast", "torch"], default="fast",
                    help="fast: flop_counter formulas in a bare dispatch mode, checked against cachec.runtime.flops.count_flops "
                         "on the reference and on every method's first point; torch: count_flops everywhere (≈2× slower)")
    ap.add_argument("--refine", type=int, default=None,
                    help="trajectory refinements of each of the 2 best first-stage candidates in cachec's plan search "
                         "(default 1; quick 0)")
    ap.add_argument("--mask-runs", type=int, default=None,
                    help="validation runs of the mask search, the third stage of cachec's plan search (default "
                         f"{MASK_RUNS} as cachec compile; quick 0; stored results without the option ran none)")
    ap.add_argument("--confirm-images", type=int, default=None,
                    help="re-measure the headline's points (cachec and the best peer at each budget) on this many "
                         "images for narrower paired intervals (default 100; quick 0 = off)")
    ap.add_argument("--budgets", default=None,
                    help="comma-separated budgets of the cachec line, fractions or percents (default 25,40,60 %%); "
                         "the tables stay at 25/40/60 %%")
    ap.add_argument("--families", action="store_true",
                    help="also one line per cachec schedule family (free, step, group) besides the closed-loop choice")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 10 images, few points, no adaptive sweep")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes, one torch thread each, one configuration each (default 2, or 1 on one core): "
                         "the configurations run in parallel, each on one core; wall ratios stay interleaved within "
                         "a process")
    ap.add_argument("--add", default=None, metavar="FILE",
                    help="add the --methods lines (e.g. SoftCap) to an existing benchmarks JSON on its own images and "
                         "options (after checking this machine reproduces a stored point) and rewrite FILE and its "
                         ".md/.png; --models narrows its configurations")
    ap.add_argument("--widen", default=None, metavar="FILE",
                    help="re-measure the headline pairs of an existing benchmarks JSON whose paired interval is wider "
                         "than --half-width on as many images as that needs (cachec's stored plan choices rebuilt, not "
                         "searched again) and rewrite FILE and its .md/.png; --models narrows its configurations")
    ap.add_argument("--half-width", type=float, default=0.5, help="--widen: target half-width of the intervals, dB (default 0.5)")
    ap.add_argument("--max-images", type=int, default=400, help="--widen: most images per configuration (default 400)")
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def parse_budgets(text: str | None) -> list[float] | None:
    """``"15,25,40"``, ``"15%,25%"`` or ``"0.15,0.25"`` as fractions (a value with ``%`` is always a percent,
    one without it a percent when above 1); None for None.

    Raises:
        SystemExit: a value that is not a number in (0, 100].
    """
    if not text:
        return None
    out = []
    for part in text.split(","):
        text_v = part.strip()
        try:
            v = float(text_v.rstrip("%"))
        except ValueError:
            raise SystemExit(f"--budgets: {part!r} is not a number; give fractions or percents, e.g. 15,25,40") from None
        v = v / 100 if text_v.endswith("%") or v > 1 else v
        if not 0 < v <= 1:
            raise SystemExit(f"--budgets: {part!r} is outside (0, 100] %")
        out.append(v)
    return out


def main(argv=None) -> int:
    """Run the benchmark and write ``benchmarks.json``, ``.md`` and ``.png`` to ``--out``; returns 0.

    With ``--worker-json`` (set by :func:`run_workers`) only this process's configurations are run and
    written there as JSON.

    Raises:
        RuntimeError: a worker process failed. Errors of single methods are recorded, not raised.
    """
    args = parse_args(argv)
    _mask_runs(args)  # refuses a negative --mask-runs before any work
    if args.add and args.widen:
        raise SystemExit("--add and --widen are separate runs: give one of them")
    if args.add or args.widen:
        return add_main(args, argv)
    t_all = time.perf_counter()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    per_class = args.per_class or (1 if args.quick else 2)
    cal_per_class = args.cal_per_class or (1 if args.quick else 2)
    sensitivity = args.sensitivity or ("none" if args.quick else "factored")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import diffusers

    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:
        pass
    cd_ok, cd_msg = peers.cache_dit_status()
    log(f"cachec benchmark: torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers "
        f"{diffusers.__version__}, cache-dit {cd_msg}")
    plan_list = []
    for model in [m.strip() for m in (args.models or "digits-flow,digits-ddim").split(",") if m.strip()]:
        steps_list = ([int(x) for x in args.steps.split(",")] if args.steps else DEFAULT_STEPS.get(model))
        plan_list.append((model, steps_list))
    if args.jobs > 1 and args.worker_json is None:
        configs = run_workers(args, argv, plan_list)
    else:
        configs = run_configs(args, plan_list, out_dir, per_class, cal_per_class, sensitivity)
    if args.worker_json is not None:
        Path(args.worker_json).write_text(json.dumps(to_jsonable(configs), allow_nan=False))
        return 0
    results = {
        "command": "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "cache_dit": cd_msg if cd_ok else f"absent ({cd_msg})", "python": platform.python_version(),
                        "cpu_threads": 1 if args.jobs > 1 else torch.get_num_threads(), "worker_processes": args.jobs,
                        "machine": platform.machine()},
        "options": {"flop_counter": args.flop_counter, "per_class": per_class, "cal_per_class": cal_per_class, "batch_size": args.batch_size,
                    "sensitivity": sensitivity, "quick": args.quick, "table_budgets": list(TABLE_BUDGETS),
                    "refine": args.refine if args.refine is not None else (0 if args.quick else 1),
                    "mask_runs": _mask_runs(args),
                    "cachec_budgets": parse_budgets(args.budgets) or [0.25, 0.4, 0.6],
                    "confirm_images": args.confirm_images if args.confirm_images is not None else (0 if args.quick else 100)},
        "configs": configs,
        "seconds": time.perf_counter() - t_all,
    }
    json_path = out_dir / f"{args.stem}.json"
    write_results(to_jsonable(results), json_path)
    log(f"\nwrote {json_path} and its .md and .png in {results['seconds'] / 60:.1f} min")
    log("\n".join("  " + line for line in summary_lines(results)))
    return 0


def _mask_runs(args) -> int:
    """The mask search's validation runs per cachec budget: ``--mask-runs``, else 0 with ``--quick``, else the
    default of ``cachec compile`` (:data:`cachec.mask_search.MASK_RUNS`)."""
    if args.mask_runs is not None and args.mask_runs < 0:
        raise SystemExit(f"--mask-runs must be >= 0 (validation runs of the mask search), got {args.mask_runs}")
    return args.mask_runs if args.mask_runs is not None else (0 if args.quick else MASK_RUNS)


def add_main(args, argv) -> int:
    """``--add FILE``: measure the ``--methods`` lines on every (or every ``--models``) configuration of FILE
    with FILE's options (:func:`bench.compare_configs.add_to_config`), recompute every derived table
    (:func:`bench.compare_rescore.derive`) and rewrite FILE, its ``.md`` and ``.png``; returns 0.

    Raises:
        SystemExit: FILE is not a benchmark result or ``--methods`` is missing. RuntimeError: a worker failed
        or this machine does not reproduce FILE.
    """
    path = Path(args.add or args.widen)
    flag = "--add" if args.add else "--widen"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        stored = results["configs"]
        opts = results["options"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{flag} {path}: not a bench/compare.py result ({exc}); give a benchmarks JSON it wrote")
    if args.add and not args.methods:
        raise SystemExit("--add needs --methods (the lines to add, e.g. --methods SoftCap)")
    t_all = time.perf_counter()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [m.strip() for m in args.models.split(",")] if args.models else None
    todo = [c for c in stored if wanted is None or c["model"] in wanted]
    if args.steps:
        todo = [c for c in todo if c["steps"] in [int(x) for x in args.steps.split(",")]]
    if args.jobs > 1 and args.worker_json is None and len(todo) > 1:
        updated = run_workers(args, argv, [(c["model"], [c["steps"]]) for c in todo])
    else:
        updated = add_configs(args, todo, opts)
    if args.worker_json is not None:
        Path(args.worker_json).write_text(json.dumps(to_jsonable(updated), allow_nan=False))
        return 0
    by_name = {c["name"]: c for c in updated}
    results["configs"] = [by_name.get(c["name"], c) for c in stored]
    for cfg in results["configs"]:
        derive(cfg)
    results.setdefault("added" if args.add else "widened", []).append({
        "command": "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": time.perf_counter() - t_all,
        "worker_processes": args.jobs})
    write_results(to_jsonable(results), path)
    log(f"\nwrote {path} and its .md and .png in {(time.perf_counter() - t_all) / 60:.1f} min")
    log("\n".join("  " + line for line in summary_lines(results)))
    return 0


def add_configs(args, todo: list[dict], opts: dict) -> list[dict]:
    """:func:`bench.compare_configs.add_to_config` for each stored configuration in ``todo``, in this process."""
    from bench.compare_configs import add_to_config, widen_config
    from cachec.loading import load_model

    out = []
    with tempfile.TemporaryDirectory(prefix="cachec-bench-add-") as work:
        for stored in todo:
            driver = load_model(stored["model"])
            wd = os.path.join(work, f"{Path(stored['model']).name}_{stored['steps']}")
            os.makedirs(wd, exist_ok=True)
            cfg = Config(driver, stored["model"], int(stored["steps"]), int(opts["per_class"]), int(opts["cal_per_class"]),
                         int(opts["batch_size"]), wd, opts["sensitivity"], args.sensitivity_samples)
            cfg.counter = stored.get("flop_counter", opts.get("flop_counter", "fast"))
            cfg.ctx.refine = int(opts.get("refine", 1))
            cfg.ctx.mask_runs = int(opts.get("mask_runs", 0))
            if args.widen:
                methods = peers.all_methods(cfg.steps, quick=bool(opts.get("quick")))
                out.append(widen_config(cfg, stored, methods, args.half_width, args.max_images))
                continue
            methods = peers.all_methods(cfg.steps, quick=bool(opts.get("quick")), only=args.methods.split(","))
            out.append(add_to_config(cfg, stored, methods, bool(opts.get("quick")), args.max_extra))
    return out


def run_workers(args, argv, plan_list) -> list[dict]:
    """Run every (model, steps) configuration in its own worker process (one torch thread), at most
    ``args.jobs`` at a time, most steps first; return their results in the original order."""
    import subprocess

    items = [(m, st) for m, steps in plan_list for st in (steps or [None])]
    passthrough, skip = [], {"--jobs", "--models", "--steps", "--threads", "--worker-json", "--out", "--stem"}
    raw = list(sys.argv[1:] if argv is None else argv)
    k = 0
    while k < len(raw):
        a = raw[k]
        name = a.split("=", 1)[0]
        if name in skip:
            k += 1 if "=" in a else 2
            continue
        passthrough.append(a)
        k += 1
    procs = []
    with tempfile.TemporaryDirectory(prefix="cachec-bench-jobs-") as tmp:
        for i, (m, st) in enumerate(items):
            out = Path(tmp) / f"cfg{i}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--models", m, "--threads", "1",
                   "--worker-json", str(out), "--out", str(Path(tmp) / f"out{i}")] + (["--steps", str(st)] if st else [])
            procs.append((i, cmd, out))
        # one process per configuration, at most args.jobs at a time, most steps first
        running: list = []
        pending = sorted(procs, key=lambda x: -(items[x[0]][1] or 25))
        results: dict[int, list] = {}
        while pending or running:
            while pending and len(running) < args.jobs:
                i, cmd, out = pending.pop(0)
                log(f"[jobs] starting {items[i][0]} · {items[i][1]} steps")
                running.append((i, out, subprocess.Popen(cmd + passthrough)))
            time.sleep(2)
            for r in list(running):
                i, out, p = r
                if p.poll() is not None:
                    running.remove(r)
                    if p.returncode != 0:
                        for _, _, q in running:
                            q.kill()
                        raise RuntimeError(f"benchmark worker for {items[i]} failed with exit code {p.returncode}")
                    results[i] = json.loads(out.read_text())
    return [c for i in sorted(results) for c in results[i]]


def run_configs(args, plan_list, out_dir, per_class, cal_per_class, sensitivity) -> list[dict]:
    """Run the configurations in this process and return their result dicts."""
    from cachec.loading import load_model

    configs = []
    partial = out_dir / f"{args.stem}.partial.json"

    def progress(current: dict) -> None:  # survives an interrupted run; removed at the end
        partial.write_text(json.dumps(to_jsonable({"configs": configs, "current": current}), allow_nan=False))

    with tempfile.TemporaryDirectory(prefix="cachec-bench-") as work:
        for model, steps_list in plan_list:
            t = time.perf_counter()
            driver = load_model(model)
            log(f"loaded {model} in {time.perf_counter() - t:.1f} s")
            for steps in (steps_list or [driver.default_steps]):
                wd = os.path.join(work, f"{Path(model).name}_{steps}")
                os.makedirs(wd, exist_ok=True)
                cfg = Config(driver, model, steps, per_class, cal_per_class, args.batch_size, wd, sensitivity,
                             args.sensitivity_samples)
                cfg.counter = args.flop_counter
                cfg.ctx.refine = args.refine if args.refine is not None else (0 if args.quick else 1)
                cfg.ctx.mask_runs = _mask_runs(args)
                cfg.confirm_images = args.confirm_images if args.confirm_images is not None else (0 if args.quick else 100)
                methods = peers.all_methods(steps, quick=args.quick, families=args.families,
                                            only=args.methods.split(",") if args.methods else None,
                                            budgets=parse_budgets(args.budgets))
                configs.append(derive(run_config(cfg, methods, args.quick, args.max_extra, progress)))
    partial.unlink(missing_ok=True)
    return configs


if __name__ == "__main__":
    sys.exit(main())
