"""Predicted vs realised plan error on held-out seeds, before and after trajectory-aware pricing (issue 20).

The planner prices a schedule with the additive error model on **uncached** statistics ("before"). The
trajectory calibration (`cachec calibrate run --along PLAN`, docs/planner.md) records the features along the
plan's own cached trajectory; pricing the *same* schedule with those statistics ("after") sees the
propagation of the plan's own errors into its anchors and the cross-unit effects that reach them (TCC-like).

For one model, from one calibration with the shipped plans' settings (:func:`cachec.shipped.calibrate_reference`),
every (budget, family, predictor set) plan of the plan search is

1. run on held-out conditions and seeds (:func:`cachec.evaluation.held_out_set`) beside the uncached model:
   realised error = mean over images of the summed squared difference of the [0, 1] images (C·H·W values);
2. priced "before" (its ``predicted_error``) and, with ``--along``, "after": the schedule re-priced by
   :func:`cachec.planner.schedule_error` on a calibration along the plan (same settings, the uncached
   calibration's sensitivity).

Prints, for both pricings, Spearman's rank correlation with the realised errors over all plans, the slope of
log(realised) on log(predicted) (1 = errors scale as predicted) and the median ratio realised ÷ predicted
(the unit offset: predicted errors are per (sample, branch) output in the model's sample space), and per
budget the rank correlation among that budget's plans, the plan each pricing would pick and how much more
realised error it has than the best one. A third pricing, ``trajectory``, sums each unit's errors over all its
skipped steps coherently (not per run of skipped steps; :func:`cachec.planner.schedule_error`,
``coherence="trajectory"``) on the uncached statistics. All numbers come from one process; ``--summary FILE``
prints them again from a ``--json`` result, and ``--reprice FILE`` adds the trajectory pricing to an older
result without sampling again.

Usage (digits-flow, 24 plans, ≈ 25 min on one thread with ``--along``)::

    python bench/bench_error_model.py --model digits-flow --images 40 --along [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import sampler  # noqa: E402
from cachec.calibrate.run import calibrate  # noqa: E402
from cachec.evaluation import held_out_set  # noqa: E402
from cachec.loading import load_model  # noqa: E402
from cachec.planner import Planner, load_calibration, schedule_error  # noqa: E402
from cachec.refine import SEARCH_FAMILIES, SEARCH_PREDICTORS  # noqa: E402
from cachec.runtime import apply, write_plan  # noqa: E402
from cachec.shipped import calibrate_reference, calibration_options  # noqa: E402


def fit_quality(pred, real) -> dict:
    """Spearman rho, log-log slope (least squares of log real on log pred) and median real/pred ratio."""
    pred, real = np.asarray(pred, float), np.asarray(real, float)
    ok = (pred > 0) & (real > 0)
    rho = float(stats.spearmanr(pred[ok], real[ok]).statistic)
    slope = float(np.polyfit(np.log(pred[ok]), np.log(real[ok]), 1)[0])
    return {"spearman": rho, "loglog_slope": slope, "median_ratio": float(np.median(real[ok] / pred[ok])), "plans": int(ok.sum())}


def summarise(rows: list[dict]) -> dict:
    """Fit quality of each pricing (``before``, and ``after`` where the rows have it) over all plans, and per
    budget: Spearman's rho among that budget's plans (does the error model rank the candidates the plan
    search chooses between?) and whether the plan it prices lowest is the one with the least realised error."""
    real = [r["realised_error"] for r in rows]
    out: dict = {}
    for key, col in (("before", "predicted_before"), ("after", "predicted_after"),
                     ("trajectory", "predicted_trajectory")):
        if not rows or col not in rows[0]:
            continue
        out[key] = fit_quality([r[col] for r in rows], real)
        out[key]["per_budget"] = {}
        for b in sorted({r["budget"] for r in rows}):
            at = [r for r in rows if r["budget"] == b]
            pick = min(at, key=lambda r: r[col])
            best = min(at, key=lambda r: r["realised_error"])
            out[key]["per_budget"][f"{b:.2f}"] = {
                "spearman": float(stats.spearmanr([r[col] for r in at], [r["realised_error"] for r in at]).statistic),
                "plans": len(at), "priced_best": f"{pick['family']}+{pick['predictors']}",
                "realised_best": f"{best['family']}+{best['predictors']}",
                "regret": pick["realised_error"] / best["realised_error"]}
    return out


def summary_lines(summary: dict) -> list[str]:
    """The console lines of :func:`summarise`."""
    lines = []
    for k, v in summary.items():
        lines.append(f"{k:6s}: Spearman {v['spearman']:+.3f}, log-log slope {v['loglog_slope']:.3f}, "
                     f"median realised/predicted {v['median_ratio']:.3g} over {v['plans']} plans")
        for b, pb in v["per_budget"].items():
            lines.append(f"        at {float(b):.0%}: Spearman {pb['spearman']:+.3f} over {pb['plans']} plans; priced best "
                         f"{pb['priced_best']}, realised best {pb['realised_best']} (its realised error x{pb['regret']:.2f})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-flow")
    ap.add_argument("--budgets", default="0.25,0.4,0.6")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--along", action="store_true", help="also price each schedule along its own trajectory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--summary", type=Path, default=None, metavar="FILE",
                    help="print the summary of a --json result again (nothing is run)")
    ap.add_argument("--reprice", type=Path, default=None, metavar="FILE",
                    help="add the trajectory-coherent pricing to a --json result's plans (rebuilt from the same "
                         "reference calibration; nothing is sampled but the calibration) and rewrite FILE")
    args = ap.parse_args(argv)
    if args.summary:
        print("\n".join(summary_lines(summarise(json.loads(args.summary.read_text(encoding="utf-8"))["rows"]))))
        return 0
    if args.reprice:
        return reprice(args.reprice, args.threads)
    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cal_path = calibrate_reference(args.model, work / "calib.safetensors")
        planner = Planner(load_calibration(str(cal_path)))
        conds, seeds = held_out_set(driver, args.images)
        steps = planner.cal.steps
        reference = None
        cal_opts = calibration_options(driver)
        cal_conds = cal_opts.pop("conditions")
        for budget in (float(b) for b in args.budgets.split(",")):
            for family in SEARCH_FAMILIES:
                for pset in SEARCH_PREDICTORS:
                    opts = dict(family=family, predictors=pset)
                    sched = planner.schedule(budget, "cachec", **opts)
                    plan, side = planner.plan(budget, "cachec", **opts)
                    tag = f"{family}-{pset}-{round(100 * budget)}"
                    written = write_plan(plan, work / f"{tag}.yaml", side or None)
                    guidance = plan.sampler.guidance.scale
                    if reference is None:
                        reference = sampler(driver, steps, guidance)(conds, seeds).double()
                    with apply(driver, written):
                        out = sampler(driver, steps, guidance)(conds, seeds).double()
                    real = float(((out - reference) ** 2).flatten(1).sum(1).mean())
                    row = {"budget": budget, "family": family, "predictors": pset, "realised_flops": plan.budget.realised,
                           "predicted_before": plan.predicted_error, "realised_error": real,
                           "predicted_trajectory": float(schedule_error(planner.error_model(pset), sched,
                                                                        coherence="trajectory"))}
                    if args.along:
                        along = calibrate(driver, cal_conds, output=work / f"{tag}-along.safetensors", along=written,
                                          sensitivity_from=cal_path, sensitivity="none", progress=False, restart=True,
                                          **cal_opts)
                        p2 = Planner(load_calibration(str(along)))
                        row["predicted_after"] = float(schedule_error(p2.error_model(pset), sched))
                    rows.append(row)
                    print(f"{args.model} {100 * budget:.0f}% {family:6s} {pset:6s} before {row['predicted_before']:.4g}"
                          + (f" after {row['predicted_after']:.4g}" if "predicted_after" in row else "")
                          + f" realised {real:.4g}", flush=True)
    summary = summarise(rows)
    print("\n".join(summary_lines(summary)))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "images": args.images, "rows": rows, "summary": summary}, indent=1))
    return 0


def reprice(path: Path, threads: int = 1) -> int:
    """``--reprice FILE``: the trajectory-coherent price (:func:`cachec.planner.schedule_error`,
    ``coherence="trajectory"``) of every plan of a stored result, rebuilt from the same reference calibration
    and checked against its stored ``predicted_before`` and realised FLOPs; FILE is rewritten with the new
    column and summary.

    Raises:
        RuntimeError: a rebuilt plan is not the stored one (another calibration or planner version).
    """
    torch.set_num_threads(threads)
    res = json.loads(path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        cal_path = calibrate_reference(res["model"], Path(tmp) / "calib.safetensors")
        planner = Planner(load_calibration(str(cal_path)))
        for row in res["rows"]:
            opts = dict(family=row["family"], predictors=row["predictors"])
            sched = planner.schedule(row["budget"], "cachec", **opts)
            plan, _ = planner.plan(row["budget"], "cachec", **opts)
            if not np.isclose(plan.predicted_error, row["predicted_before"], rtol=1e-4) or \
                    abs(plan.budget.realised - row["realised_flops"]) > 1e-6:
                raise RuntimeError(f"{row['family']}+{row['predictors']} at {row['budget']:.0%}: the rebuilt plan is not "
                                   "the stored one; run the whole script again")
            row["predicted_trajectory"] = float(schedule_error(planner.error_model(row["predictors"]), sched,
                                                               coherence="trajectory"))
    res["summary"] = summarise(res["rows"])
    path.write_text(json.dumps(res, indent=1))
    print("\n".join(summary_lines(res["summary"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
