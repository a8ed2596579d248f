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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import peers  # noqa: E402

TABLE_BUDGETS = (0.25, 0.40, 0.60)
#: threshold sweeps are extended until they also bracket the low end of cachec's budget sweep
EXTEND_TO = (0.20,)
#: steps per shipped model (the issue: digits-flow 25, digits-ddim 20 and 50)
DEFAULT_STEPS = {"digits-flow": [25], "digits-ddim": [20, 50]}
EVAL_SEED0 = 1_000_000  # evaluation seeds EVAL_SEED0 + i; calibration uses 0 .. n-1
EXACT_TOL = 0.005  # a point within 0.5 % FLOPs of a budget is "at" it
MAX_GAP = 0.10  # threshold sweeps bisect brackets wider than this
CHECK_SIZE = 2  # samples on which the fast FLOP counter is checked against cachec.runtime.flops.count_flops
BELOW_TOL = 0.10  # without a bracket, a point at most this far below a budget is shown (marked)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------- running


class Config:
    """One benchmark configuration: a model at a step count, with its evaluation and calibration sets."""

    def __init__(self, driver, model: str, steps: int, per_class: int, cal_per_class: int, batch_size: int,
                 workdir: str, sensitivity: str, sensitivity_samples: int) -> None:
        self.driver = driver
        self.model = model
        self.steps = steps
        self.guidance = float(driver.default_guidance)
        ncls = int(driver.num_classes or 10)
        self.eval_conditions = [c for _ in range(per_class) for c in range(ncls)]
        self.eval_seeds = [EVAL_SEED0 + i for i in range(len(self.eval_conditions))]
        cal_conditions = [c for _ in range(cal_per_class) for c in range(ncls)]
        cal_seeds = list(range(len(cal_conditions)))
        assert not set(cal_seeds) & set(self.eval_seeds)
        bs = batch_size
        self.batches = [(self.eval_conditions[i : i + bs], self.eval_seeds[i : i + bs])
                        for i in range(0, len(self.eval_conditions), bs)]
        self.ctx = peers.BenchContext(
            driver=driver, steps=steps, guidance=self.guidance, calib_conditions=cal_conditions,
            calib_seeds=cal_seeds, workdir=workdir, batch_size=bs, sensitivity=sensitivity,
            sensitivity_samples=sensitivity_samples, log=log,
        )
        self.name = f"{model} · {steps} steps"
        self.counter = "fast"
        self.timing_size = max(1, batch_size // 2)


def counted_generate(cfg: Config, session: peers.Session | None, batches, per_batch: list | None = None,
                     counter: str = "fast") -> tuple[torch.Tensor, int]:
    """Images and FLOPs (counted over every whole ``generate`` call) of ``batches`` under ``session``;
    per-batch counts are appended to ``per_batch`` when given. ``counter``: ``"fast"``
    (:func:`cachec.runtime.flops.count_total_flops`) or ``"torch"`` (:func:`cachec.runtime.flops.count_flops`)."""
    from cachec.runtime.flops import count_flops, count_total_flops

    images, total = [], 0
    for conds, seeds in batches:
        if session is not None:
            session.begin()
        try:
            if counter == "torch":
                out, flops, _ = count_flops(cfg.ctx.generate, conds, seeds)
            else:
                out, flops = count_total_flops(cfg.ctx.generate, conds, seeds)
        finally:
            if session is not None:
                session.end()
        images.append(out)
        total += int(flops)
        if per_batch is not None:
            per_batch.append(int(flops))
    return torch.cat(images), total


def timed_generate(cfg: Config, session: peers.Session | None) -> tuple[float, torch.Tensor]:
    """Wall seconds and images of one ``generate`` call on the timing batch (the first ``cfg.timing_size``
    samples of the first evaluation batch; no FLOP counting)."""
    conds, seeds = cfg.batches[0]
    conds, seeds = conds[: cfg.timing_size], seeds[: cfg.timing_size]
    if session is not None:
        session.begin()
    try:
        t = time.perf_counter()
        images = cfg.ctx.generate(conds, seeds)
        return time.perf_counter() - t, images
    finally:
        if session is not None:
            session.end()


def summarise(ev: dict) -> dict:
    """The fields of a :func:`cachec.quality.evaluate` result that the tables use."""
    fd = ev["frechet_distance"]
    return {
        "psnr_db": ev["psnr_db"]["mean"],
        "psnr_db_std": ev["psnr_db"]["std"],
        "psnr_db_per_image": ev["psnr_db"]["per_image"],
        "psnr_of_mean_mse_db": ev["psnr_of_mean_mse_db"],
        "ssim": ev["ssim"]["mean"],
        "n_identical": ev["n_identical"],
        "max_abs_diff": ev["max_abs_diff"],
        "class_accuracy": ev["class_accuracy"]["candidate"],
        "class_accuracy_reference": ev["class_accuracy"]["reference"],
        "class_agreement": ev["class_agreement"],
        "frechet": fd["candidate"],
        "frechet_reference": fd["reference"],
        "frechet_vs_reference": fd["candidate_vs_reference"],
    }


def run_point(cfg: Config, method: peers.Method, p, ref: dict, check: dict | None = None) -> dict:
    """Measure one operating point; never raises (errors are recorded).

    ``check`` (per method): on the method's first measured point the fast FLOP count of the first
    ``CHECK_SIZE`` samples is compared with :func:`cachec.runtime.flops.count_flops`; on a mismatch the point is recounted and the method
    counted with ``count_flops`` from then on (``check["counter"] = "torch"``).
    """
    from cachec.quality import evaluate, to_jsonable

    rec: dict[str, Any] = {"method": method.name, "label": method.label(p), "param": to_jsonable(p)}
    t0 = time.perf_counter()
    batches = cfg.batches[:1] if method.diagnostic else cfg.batches
    check = {} if check is None else check
    counter = check.get("counter", cfg.counter)
    session = None
    try:
        session = method.session(cfg.ctx, p)
        per_batch: list[int] = []
        images, flops = counted_generate(cfg, session, batches, per_batch, counter=counter)
        if counter == "fast" and "checked" not in check:
            # both counters on the same small batch (same inputs, so the same caching decisions)
            small = [(c[:CHECK_SIZE], s[:CHECK_SIZE]) for c, s in batches[:1]]
            _, fast_flops = counted_generate(cfg, session, small, counter="fast")
            _, torch_flops = counted_generate(cfg, session, small, counter="torch")
            check["checked"] = {"label": rec["label"], "samples": CHECK_SIZE, "fast": fast_flops,
                                "count_flops": torch_flops, "equal": fast_flops == torch_flops}
            rec["flop_counter_check"] = check["checked"]
            if fast_flops != torch_flops:
                check["counter"] = "torch"
                images, flops = counted_generate(cfg, session, batches, counter="torch")
        rec["flop_counter"] = check.get("counter", cfg.counter)
        wall, _ = timed_generate(cfg, session)
        rec["info"] = to_jsonable(dict(session.info))
    except Exception as exc:  # a method that raises is a result, not a crash
        rec["error"] = peers.short_error(exc)
        rec["error_at"] = peers.error_location(exc)
        rec["seconds"] = time.perf_counter() - t0
        return rec
    finally:
        if session is not None:
            try:
                session.close()
            except Exception as exc:
                rec.setdefault("error", f"cleanup failed: {peers.short_error(exc)}")
    n = images.shape[0]
    ref_flops = ref["flops"] if not method.diagnostic else ref["flops_batch0"]
    rec["n_images"] = n
    rec["flops_per_image"] = flops / n
    rec["flops_fraction"] = flops / ref_flops
    rec["wall_s_timing_batch"] = wall
    rec["evaluated_on"] = "first batch only (diagnostic)" if method.diagnostic else "all batches"
    if not torch.isfinite(images).all():
        rec["error"] = "non-finite images"
    else:
        try:
            ev = evaluate(images.clamp(0, 1), ref["images"][:n], cfg.eval_conditions[:n])
            rec.update(summarise(ev))
        except Exception as exc:
            rec["error"] = f"evaluation failed: {peers.short_error(exc)}"
    rec["seconds"] = time.perf_counter() - t0
    return rec


def check_clean(cfg: Config, ref: dict) -> tuple[list[str], float]:
    """Leftovers after a method (hooks, patched forwards; cleaned where possible), then the interleaved
    uncached timing of the first batch, whose images must still match the reference (up to the difference
    between the fused and the math attention kernel). Returns (problems, wall seconds)."""
    problems = peers.leftover_state(cfg.driver)
    if problems:
        peers.remove_diffusers_hooks(cfg.driver.transformer)
    wall, images = timed_generate(cfg, None)
    diff = float((images - ref["images"][: images.shape[0]]).abs().max())
    if diff > 1e-3:
        problems.append(f"uncached sampling no longer reproduces the reference (max diff {diff:.3g})")
    return problems, wall


def _fmt_p(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sweep_method(cfg: Config, method: peers.Method, ref: dict, quick: bool, max_extra: int) -> list[dict]:
    """All operating points of a method; threshold methods are extended/bisected to bracket the budgets."""
    points: list[dict] = []
    check: dict = {}

    def measure(p) -> dict:
        rec = run_point(cfg, method, p, ref, check)
        points.append(rec)
        if "error" in rec:
            log(f"      {method.label(p):34s} ERROR {rec['error']}")
        else:
            log(f"      {method.label(p):34s} FLOPs {rec['flops_fraction']:6.1%}  PSNR {_fmt(rec.get('psnr_db'))} dB  "
                f"FD {_fmt(rec.get('frechet'), '.1f')}  wall {rec['wall_s_timing_batch']:.2f} s  ({rec['seconds']:.1f} s)")
        return rec

    for p in method.grid(cfg.ctx, quick=quick):
        measure(p)
    if not method.adaptive or quick:
        return points
    # a sweep whose two most (least) aggressive points already realise the same FLOPs has hit its floor
    # (ceiling): e.g. MagCache's max_skip_steps caps how much any threshold can skip
    ok0 = sorted((r for r in points if "error" not in r), key=lambda r: float(r["param"]))
    floor_hit = len(ok0) >= 2 and abs(ok0[-1]["flops_fraction"] - ok0[-2]["flops_fraction"]) <= EXACT_TOL / 5
    ceil_hit = len(ok0) >= 2 and abs(ok0[0]["flops_fraction"] - ok0[1]["flops_fraction"]) <= EXACT_TOL / 5
    for _ in range(max_extra):
        ok = [r for r in points if "error" not in r]
        if not ok:
            break
        ok.sort(key=lambda r: float(r["param"]))
        proposal = None
        for b in list(TABLE_BUDGETS) + list(EXTEND_TO):
            below = [r for r in ok if r["flops_fraction"] <= b + EXACT_TOL]
            above = [r for r in ok if r["flops_fraction"] >= b - EXACT_TOL]
            if not below:
                if floor_hit:
                    continue
                proposal = ("down", method.more(float(ok[-1]["param"])))
                break
            if not above:
                if ceil_hit:
                    continue
                proposal = ("up", method.less(float(ok[0]["param"])))
                break
            if b not in TABLE_BUDGETS:
                continue  # the ends of cachec's sweep are only bracketed, not refined
            lo = max(below, key=lambda r: r["flops_fraction"])
            hi = min(above, key=lambda r: r["flops_fraction"])
            if hi["flops_fraction"] - lo["flops_fraction"] > MAX_GAP and lo is not hi:
                a, c = float(lo["param"]), float(hi["param"])
                mid = method.between(a, c)
                if all(abs(mid - float(r["param"])) > 1e-9 * max(1.0, abs(mid)) for r in ok):
                    proposal = ("bisect", mid)
                    break
        if proposal is None:
            break
        kind, p = proposal
        before = [r["flops_fraction"] for r in ok]
        rec = measure(p)
        if "error" in rec:
            break
        if kind == "down" and rec["flops_fraction"] >= min(before) - EXACT_TOL:
            floor_hit = True
        if kind == "up" and rec["flops_fraction"] <= max(before) + EXACT_TOL:
            ceil_hit = True
    return points


def run_config(cfg: Config, methods: list[peers.Method], quick: bool, max_extra: int,
               progress: Any = None) -> dict:
    from cachec.quality import evaluate

    log(f"\n=== {cfg.name}: {len(cfg.eval_conditions)} evaluation images in {len(cfg.batches)} batches, "
        f"guidance {cfg.guidance}, calibration {len(cfg.ctx.calib_conditions)} samples")
    t_cfg = time.perf_counter()
    t = time.perf_counter()
    per_batch: list[int] = []
    ref_images, ref_flops = counted_generate(cfg, None, cfg.batches, per_batch, counter=cfg.counter)
    counter_check = None
    if cfg.counter == "fast":
        small = [(c[:CHECK_SIZE], s[:CHECK_SIZE]) for c, s in cfg.batches[:1]]
        _, fast0 = counted_generate(cfg, None, small, counter="fast")
        _, torch0 = counted_generate(cfg, None, small, counter="torch")
        counter_check = {"samples": CHECK_SIZE, "fast": fast0, "count_flops": torch0, "equal": fast0 == torch0}
        if fast0 != torch0:
            log(f"  fast FLOP counter disagrees with cachec.runtime.flops.count_flops ({fast0} vs {torch0}): "
                "counting everything with count_flops")
            cfg.counter = "torch"
            per_batch = []
            ref_images, ref_flops = counted_generate(cfg, None, cfg.batches, per_batch, counter="torch")
    ref = {"images": ref_images, "flops": ref_flops, "flops_batch0": per_batch[0]}
    ref_eval = evaluate(ref_images, ref_images, cfg.eval_conditions)
    ref_times = [timed_generate(cfg, None)[0]]
    reference = {
        "flops_per_image": ref_flops / ref_images.shape[0],
        "class_accuracy": ref_eval["class_accuracy"]["reference"],
        "frechet": ref_eval["frechet_distance"]["reference"],
        "wall_s_timing_batch": ref_times[0],
        "timing_batch": cfg.timing_size,
        "seconds": time.perf_counter() - t,
    }
    log(f"  uncached: {reference['flops_per_image'] / 1e9:.3f} GFLOP/image, accuracy {reference['class_accuracy']:.3f}, "
        f"Fréchet {reference['frechet']:.1f}, timing batch wall {ref_times[0]:.2f} s ({reference['seconds']:.1f} s)")
    results = []
    for method in methods:
        t = time.perf_counter()
        entry: dict[str, Any] = {"method": method.name, "group": method.group, "knob": method.knob,
                                 "adaptive": method.adaptive, "diagnostic": method.diagnostic}
        log(f"  -- {method.name}")
        try:
            method.prepare(cfg.ctx)
            entry["prepare_seconds"] = time.perf_counter() - t
            entry["points"] = sweep_method(cfg, method, ref, quick, max_extra)
        except Exception as exc:
            entry["error"] = peers.short_error(exc)
            entry["error_at"] = peers.error_location(exc)
            entry["points"] = []
            log(f"      ERROR {entry['error']}")
        entry["settings"] = peers_settings(method)
        problems, wall = check_clean(cfg, ref)
        if problems:
            entry["leftovers"] = problems
            log(f"      LEFTOVERS {problems}")
        ref_times.append(wall)
        entry["ref_wall_s"] = [ref_times[-2], ref_times[-1]]
        denom = (ref_times[-2] + ref_times[-1]) / 2
        for r in entry["points"]:
            if "wall_s_timing_batch" in r:
                r["wall_ratio"] = r["wall_s_timing_batch"] / denom
        entry["seconds"] = time.perf_counter() - t
        results.append(entry)
        if progress is not None:
            progress({"name": cfg.name, "methods": results})
    out = {
        "name": cfg.name,
        "model": cfg.model,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "n_images": len(cfg.eval_conditions),
        "batch_size": cfg.ctx.batch_size,
        "eval_conditions": "classes 0-9 x %d" % (len(cfg.eval_conditions) // 10),
        "eval_seeds": [cfg.eval_seeds[0], cfg.eval_seeds[-1]],
        "calibration_samples": len(cfg.ctx.calib_conditions),
        "calibration_seeds": [cfg.ctx.calib_seeds[0], cfg.ctx.calib_seeds[-1]],
        "calibration_sensitivity": cfg.ctx.sensitivity,
        "calibration_seconds": cfg.ctx.cache.get("calibration_seconds"),
        "magcache_ratios": cfg.ctx.cache.get("magcache_ratios"),
        "reference": reference,
        "flop_counter": cfg.counter,
        "flop_counter_check_reference": counter_check,
        "reference_wall_s": ref_times,
        "methods": results,
        "seconds": time.perf_counter() - t_cfg,
    }
    log(f"  {cfg.name}: {out['seconds']:.0f} s")
    return out


def peers_settings(method: peers.Method) -> dict:
    from cachec.quality import to_jsonable

    return to_jsonable(dict(method.settings))


# ------------------------------------------------------------------------------------- analysis


def _ok_points(entry: dict) -> list[dict]:
    return sorted((r for r in entry["points"] if "error" not in r and r.get("psnr_db") is not None),
                  key=lambda r: r["flops_fraction"])


def _num(v) -> float:
    if isinstance(v, str):
        return math.inf if v == "inf" else -math.inf
    return float(v)


def at_budget(entry: dict, b: float) -> dict:
    """Quality of a method at FLOPs budget ``b``, only from measured points.

    Returns ``{"psnr", "frechet", "how", "note"}``: ``how`` is ``exact`` (a point within 0.5 %),
    ``interp`` (linear between the two measured points that bracket ``b``), ``below`` (no bracket: the
    nearest point under the budget, at most 10 % below), or ``none`` (``note`` says why).
    """
    pts = [r for r in _ok_points(entry) if not entry.get("diagnostic")]
    if not pts:
        return {"psnr": None, "frechet": None, "how": "none", "note": "no measured point"}
    near = [r for r in pts if abs(r["flops_fraction"] - b) <= EXACT_TOL]
    if near:
        r = min(near, key=lambda r: abs(r["flops_fraction"] - b))
        return {"psnr": _num(r["psnr_db"]), "frechet": r["frechet"], "how": "exact",
                "note": f"{r['label']} at {r['flops_fraction']:.1%}"}
    lo = [r for r in pts if r["flops_fraction"] < b]
    hi = [r for r in pts if r["flops_fraction"] > b]
    if lo and hi:
        a, c = lo[-1], hi[0]
        pa, pc = _num(a["psnr_db"]), _num(c["psnr_db"])
        if math.isfinite(pa) and math.isfinite(pc) and a["frechet"] is not None and c["frechet"] is not None:
            w = (b - a["flops_fraction"]) / (c["flops_fraction"] - a["flops_fraction"])
            return {"psnr": pa + w * (pc - pa), "frechet": a["frechet"] + w * (c["frechet"] - a["frechet"]),
                    "how": "interp", "note": f"between {a['flops_fraction']:.1%} and {c['flops_fraction']:.1%}"}
    if lo and b - lo[-1]["flops_fraction"] <= BELOW_TOL:
        r = lo[-1]
        return {"psnr": _num(r["psnr_db"]), "frechet": r["frechet"], "how": "below",
                "note": f"nearest point below: {r['label']} at {r['flops_fraction']:.1%}"}
    if not lo:
        return {"psnr": None, "frechet": None, "how": "none",
                "note": f"not reached: lowest realised FLOPs {pts[0]['flops_fraction']:.1%}"}
    at = ", ".join(format(r["flops_fraction"], ".0%") for r in pts)
    return {"psnr": None, "frechet": None, "how": "none", "note": f"no point within {BELOW_TOL:.0%} below; points at {at}"}


def status_of(entry: dict) -> str:
    """One-line status: error, silent no-op, failed points."""
    if entry.get("error"):
        return f"did not run: {entry['error']}"
    pts = entry["points"]
    errs = [r for r in pts if "error" in r]
    ok = [r for r in pts if "error" not in r]
    parts = []
    if not ok and errs:
        return f"every point failed: {errs[0]['error']}"
    if ok and all(r["flops_fraction"] >= 0.999 for r in ok):
        parts.append("never skips (realised FLOPs 100%): silent no-op")
    if errs:
        parts.append(f"{len(errs)} point(s) failed: {errs[0]['error']}")
    if entry.get("leftovers"):
        parts.append(f"left state behind: {entry['leftovers'][0]}")
    return "; ".join(parts)


def headline(cfg_res: dict) -> dict:
    """cachec vs the best peer at each table budget."""
    out = {}
    ours = next((e for e in cfg_res["methods"] if e["method"] == "cachec"), None)
    for b in TABLE_BUDGETS:
        mine = at_budget(ours, b) if ours else {"psnr": None}
        best = None
        for e in cfg_res["methods"]:
            if e["group"] == "cachec" or e.get("diagnostic"):
                continue
            v = at_budget(e, b)
            if v["psnr"] is not None and v["how"] in ("exact", "interp") and (best is None or v["psnr"] > best[1]):
                best = (e["method"], v["psnr"])
        out[f"{b:.2f}"] = {
            "cachec_psnr": mine.get("psnr"),
            "best_peer": best[0] if best else None,
            "best_peer_psnr": best[1] if best else None,
            "margin_db": (mine["psnr"] - best[1]) if best and mine.get("psnr") is not None else None,
        }
    return out


# ------------------------------------------------------------------------------------- outputs


def _fmt(v, spec: str = ".2f") -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return "∞" if v == "inf" else v
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec)


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = results["configs"]
    fig, axes = plt.subplots(1, len(cfgs), figsize=(6.5 * len(cfgs), 5.6), squeeze=False)
    names = []
    for cfg in cfgs:
        for e in cfg["methods"]:
            if e["method"] not in names and not e.get("diagnostic"):
                names.append(e["method"])
    cmap = plt.get_cmap("tab20")
    groups = {e["method"]: e["group"] for cfg in cfgs for e in cfg["methods"]}
    marker = {"cachec": "o-", "planner baseline": "o-", "diffusers": "s--", "cache-dit": "^:"}
    style = {n: (cmap(i % 20), marker.get(groups.get(n), "x-.")) for i, n in enumerate(names)}
    for ax, cfg in zip(axes[0], cfgs):
        for e in cfg["methods"]:
            if e.get("diagnostic"):
                continue
            pts = [r for r in _ok_points(e) if math.isfinite(_num(r["psnr_db"]))]
            if not pts:
                continue
            color, fmt = style[e["method"]]
            lw = 2.6 if e["method"] == "cachec" else 1.3
            ax.plot([100 * r["flops_fraction"] for r in pts], [_num(r["psnr_db"]) for r in pts], fmt, color=color,
                    lw=lw, ms=4, label=e["method"])
        for b in TABLE_BUDGETS:
            ax.axvline(100 * b, color="0.75", lw=0.8, ls=":")
        ax.set_xlim(0, 102)
        ax.set_xlabel("realised FLOPs (% of uncached, counted)")
        ax.set_ylabel("PSNR vs uncached (dB, mean over images)")
        ax.set_title(f"{cfg['name']} ({cfg['n_images']} images)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    ncol = max(2, min(6, 2 * len(cfgs)))
    rows = math.ceil(len(labels) / ncol)
    fig.set_figheight(5.0 + 0.22 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("cachec vs peer caching methods: PSNR vs realised FLOPs (higher-left is better)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.22 * rows / fig.get_figheight(), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def counter_note(results: dict) -> str:
    """How FLOPs were counted, and whether the fast counter agreed with ``cachec.runtime.flops.count_flops``."""
    found = []  # (what, check) for every check made
    for cfg in results["configs"]:
        found.append((f"{cfg['name']} reference", cfg.get("flop_counter_check_reference")))
        found += [(f"{cfg['name']} {e['method']}", r.get("flop_counter_check")) for e in cfg["methods"] for r in e["points"]]
    found = [(what, c) for what, c in found if c]
    checks, bad = len(found), [what for what, c in found if not c["equal"]]
    if not checks:
        return "counted with `cachec.runtime.flops.count_flops`."
    if not bad:
        return (f"a bare dispatch-mode counter with those formulas was used and matched `cachec.runtime.flops.count_flops` "
                f"exactly in all {checks} checks (the uncached run and the first point of every method, on the first "
                f"{CHECK_SIZE} samples).")
    return (f"a bare dispatch-mode counter was checked against `cachec.runtime.flops.count_flops` ({checks} checks); where it "
            f"disagreed ({', '.join(bad)}) everything of that method was recounted with `count_flops`.")


def write_markdown(results: dict, path: Path, json_name: str, png_name: str) -> None:
    L: list[str] = []
    env = results["environment"]
    L.append("# Benchmarks: cachec vs peer caching methods at matched FLOPs")
    L.append("")
    L.append(f"Generated by `{results['command']}` on {results['finished']} "
             f"({env['cpu_threads']} CPU threads, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"cache-dit {env['cache_dit']}); total {results['seconds'] / 60:.1f} min. Raw results: "
             f"[`{json_name}`]({json_name}); plot: [`{png_name}`]({png_name}). This file is generated: do not edit.")
    L.append("")
    L.append("Protocol: every method runs through the same `Driver.generate` call on the same model, held-out "
             "conditions and seeds (disjoint from the calibration seeds). FLOPs are counted over the whole call "
             "with the formulas of `torch.utils.flop_counter` (attention counted via the math SDPA kernel), never "
             "taken from a method's claim; " + counter_note(results) + " PSNR (dB, mean over images) and SSIM compare with the uncached images of the same seeds; "
             "Fréchet distance is in the digit classifier's features against 500 held-out real digits (not FID; "
             "with few images it is biased upwards, compare only within a table). Wall ratio: seconds of one "
             "uncounted `generate` call on the timing batch divided by the mean of the uncached timings of the same "
             "batch taken right before and right after that method (interleaved; noisy on a shared machine). "
             "Table values at a budget are "
             "a measured point within 0.5 % (=), linear interpolation between the two measured points that "
             "bracket the budget (~), or, where nothing brackets it, the nearest point at most 10 % below the "
             "budget (≤, marked); '–' = the method has no point there.")
    L.append("")
    L.append(f"![PSNR vs realised FLOPs]({png_name})")
    L.append("")
    for cfg in results["configs"]:
        ref = cfg["reference"]
        L.append(f"## {cfg['name']}")
        L.append("")
        L.append(f"{cfg['n_images']} images ({cfg['eval_conditions']}, seeds {cfg['eval_seeds'][0]}–{cfg['eval_seeds'][1]}, "
                 f"batch {cfg['batch_size']}), guidance {cfg['guidance']}. Uncached: "
                 f"{ref['flops_per_image'] / 1e9:.3f} GFLOP/image, class accuracy {ref['class_accuracy']:.3f}, "
                 f"Fréchet {ref['frechet']:.1f}, {ref['wall_s_timing_batch']:.2f} s per timing batch of {ref['timing_batch']}. Calibration (cachec and "
                 f"MagCache): {cfg['calibration_samples']} samples, seeds {cfg['calibration_seeds'][0]}–"
                 f"{cfg['calibration_seeds'][1]}, cachec sensitivity `{cfg['calibration_sensitivity']}`"
                 + (f", {cfg['calibration_seconds']:.0f} s" if cfg.get("calibration_seconds") else "")
                 + f". Configuration run time {cfg['seconds'] / 60:.1f} min.")
        L.append("")
        hdr = ["method"]
        for b in TABLE_BUDGETS:
            hdr += [f"PSNR @{b:.0%}", f"Fréchet @{b:.0%}"]
        hdr += ["points", "notes"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "|".join(["---"] + ["---:"] * (2 * len(TABLE_BUDGETS)) + ["---:", "---"]) + "|")
        mark = {"exact": "=", "interp": "~", "below": "≤"}
        for e in cfg["methods"]:
            row = [e["method"]]
            notes = []
            not_reached = None
            for b in TABLE_BUDGETS:
                v = at_budget(e, b)
                if v["psnr"] is None:
                    row += ["–", "–"]
                    if v["note"].startswith("not reached"):
                        not_reached = v["note"].split(": ", 1)[1]
                    elif v["note"] and not e.get("diagnostic") and not e.get("error"):
                        notes.append(f"@{b:.0%}: {v['note']}")
                else:
                    m = mark[v["how"]]
                    row += [f"{m}{_fmt(v['psnr'])}", f"{m}{_fmt(v['frechet'], '.1f')}"]
                    if v["how"] == "below":
                        notes.append(f"@{b:.0%}: {v['note']}")
            if not_reached and not e.get("diagnostic") and not e.get("error"):
                notes.insert(0, not_reached)
            ok = _ok_points(e)
            row.append(str(len(e["points"])))
            st = status_of(e)
            if e.get("diagnostic") and ok:
                st = (st + "; " if st else "") + f"diagnostic (first batch): realised FLOPs {ok[0]['flops_fraction']:.1%}"
            if st:
                notes.insert(0, st)
            row.append("; ".join(notes).replace("|", "/"))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        hl = cfg["headline"]
        parts = []
        for b in TABLE_BUDGETS:
            h = hl[f"{b:.2f}"]
            if h["margin_db"] is None:
                parts.append(f"at {b:.0%}: no comparison (cachec {_fmt(h['cachec_psnr'])} dB, best peer "
                             f"{h['best_peer'] or '–'} {_fmt(h['best_peer_psnr'])} dB)")
            else:
                parts.append(f"at {b:.0%}: cachec {_fmt(h['cachec_psnr'])} dB vs best peer {h['best_peer']} "
                             f"{_fmt(h['best_peer_psnr'])} dB ({h['margin_db']:+.2f} dB)")
        L.append("**cachec vs the best peer** (peers with a measured or interpolated value): " + "; ".join(parts) + ".")
        L.append("")
        L.append("<details><summary>Every measured operating point</summary>")
        L.append("")
        L.append("| method | setting | realised FLOPs | PSNR dB | SSIM | class acc. | Fréchet | wall ratio | note |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for e in cfg["methods"]:
            if e.get("error"):
                L.append(f"| {e['method']} | – | – | – | – | – | – | – | did not run: {e['error'].replace('|', '/')} |")
                continue
            for r in sorted(e["points"], key=lambda r: r.get("flops_fraction", 2.0)):
                if "flops_fraction" not in r:
                    L.append(f"| {e['method']} | {r['label']} | – | – | – | – | – | – | {r.get('error', '').replace('|', '/')} |")
                    continue
                note = r.get("error", "")
                if r.get("evaluated_on", "").startswith("first"):
                    note = (note + "; " if note else "") + "first batch only"
                claim = (r.get("info") or {}).get("plan_realised_claim")
                if claim is not None:
                    note = (note + "; " if note else "") + f"plan claims {claim:.1%}"
                choice = (r.get("info") or {}).get("family_choice")
                if choice:
                    sc = " / ".join(f"{k} {_fmt(v)}" for k, v in choice["validation_psnr_db"].items())
                    note += (f"; chosen {choice['chosen']}/refine{choice['refine']} (validation PSNR on "
                             f"{choice['validation_images']} images: {sc} dB)")
                L.append(f"| {e['method']} | {r['label']} | {r['flops_fraction']:.1%} | {_fmt(r.get('psnr_db'))} | "
                         f"{_fmt(r.get('ssim'), '.4f')} | {_fmt(r.get('class_accuracy'), '.3f')} | "
                         f"{_fmt(r.get('frechet'), '.1f')} | {_fmt(r.get('wall_ratio'), '.2f')} | {note.replace('|', '/')} |")
        L.append("")
        L.append("</details>")
        L.append("")
    L.append("## Method settings")
    L.append("")
    seen = set()
    for cfg in results["configs"]:
        for e in cfg["methods"]:
            if e["method"] in seen:
                continue
            seen.add(e["method"])
            st = {k: v for k, v in (e.get("settings") or {}).items() if k != "mag_ratios"}
            L.append(f"- **{e['method']}** ({e['group']}; sweep: {e['knob']}"
                     + ("; threshold swept until the FLOPs bracket 25/40/60 %" if e.get("adaptive") else "")
                     + f"): `{json.dumps(st, ensure_ascii=False)}`")
    L.append("")
    L.append("## Timings")
    L.append("")
    L.append("| configuration | total | reference | calibration (cachec) | slowest method |")
    L.append("|---|---:|---:|---:|---|")
    for cfg in results["configs"]:
        slow = max(cfg["methods"], key=lambda e: e.get("seconds", 0.0)) if cfg["methods"] else None
        L.append(f"| {cfg['name']} | {cfg['seconds']:.0f} s | {cfg['reference']['seconds']:.0f} s | "
                 f"{_fmt(cfg.get('calibration_seconds'), '.0f')} s | "
                 + (f"{slow['method']} ({slow.get('seconds', 0):.0f} s)" if slow else "–") + " |")
    L.append("")
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="cachec vs peer caching methods at matched realised FLOPs.")
    ap.add_argument("--models", default="digits-flow,digits-ddim",
                    help="comma-separated shipped names or model folders (default: digits-flow,digits-ddim)")
    ap.add_argument("--steps", default=None,
                    help="comma-separated step counts for every model (default: digits-flow 25, digits-ddim 20 and 50, "
                         "otherwise the model's default)")
    ap.add_argument("--out", default="docs", help="folder for benchmarks.md / .json / .png (default: docs)")
    ap.add_argument("--per-class", type=int, default=None, help="evaluation images per class (default 2; quick 1)")
    ap.add_argument("--cal-per-class", type=int, default=None, help="calibration samples per class (default 2; quick 1)")
    ap.add_argument("--batch-size", type=int, default=10, help="samples per generate call (default 10)")
    ap.add_argument("--sensitivity", choices=["full", "factored", "none"], default=None,
                    help="cachec calibration sensitivity (default factored; quick none)")
    ap.add_argument("--sensitivity-samples", type=int, default=4)
    ap.add_argument("--methods", default=None, help="only methods whose name contains one of these (comma-separated)")
    ap.add_argument("--max-extra", type=int, default=2, help="extra points per threshold method to bracket budgets")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--flop-counter", choices=["fast", "torch"], default="fast",
                    help="fast: flop_counter formulas in a bare dispatch mode, checked against cachec.runtime.flops.count_flops "
                         "on the reference and on every method's first point; torch: count_flops everywhere (≈2× slower)")
    ap.add_argument("--refine", type=int, default=None,
                    help="trajectory refinements per family in cachec's plan search (default 1; quick 0)")
    ap.add_argument("--families", action="store_true",
                    help="also one line per cachec schedule family (free, step, group) besides the closed-loop choice")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 10 images, few points, no adaptive sweep")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes, one torch thread each, one configuration each (default 2, or 1 on one core): "
                         "the configurations run in parallel, each on one core; wall ratios stay interleaved within "
                         "a process")
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
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

    from cachec.quality import to_jsonable

    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:
        pass
    cd_ok, cd_msg = peers.cache_dit_status()
    log(f"cachec benchmark: torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers "
        f"{diffusers.__version__}, cache-dit {cd_msg}")
    plan_list = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
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
                    "refine": args.refine if args.refine is not None else (0 if args.quick else 1)},
        "configs": configs,
        "seconds": time.perf_counter() - t_all,
    }
    json_path, md_path, png_path = out_dir / "benchmarks.json", out_dir / "benchmarks.md", out_dir / "benchmarks.png"
    json_path.write_text(json.dumps(to_jsonable(results), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    write_plot(results, png_path)
    write_markdown(results, md_path, json_path.name, png_path.name)
    log(f"\nwrote {md_path}, {json_path}, {png_path} in {results['seconds'] / 60:.1f} min")
    for cfg in configs:
        for b, h in cfg["headline"].items():
            log(f"  {cfg['name']} @ {float(b):.0%}: cachec {_fmt(h['cachec_psnr'])} dB, best peer "
                f"{h['best_peer'] or '–'} {_fmt(h['best_peer_psnr'])} dB")
    return 0


def run_workers(args, argv, plan_list) -> list[dict]:
    """Run every (model, steps) configuration in its own worker process (one torch thread), at most
    ``args.jobs`` at a time, most steps first; return their results in the original order."""
    import subprocess

    items = [(m, st) for m, steps in plan_list for st in (steps or [None])]
    passthrough, skip = [], {"--jobs", "--models", "--steps", "--threads", "--worker-json", "--out"}
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
    from cachec.quality import to_jsonable

    configs = []
    partial = out_dir / "benchmarks.partial.json"

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
                methods = peers.all_methods(steps, quick=args.quick, families=args.families,
                                            only=args.methods.split(",") if args.methods else None)
                res = run_config(cfg, methods, args.quick, args.max_extra, progress)
                res["headline"] = headline(res)
                configs.append(res)
    partial.unlink(missing_ok=True)
    return configs


if __name__ == "__main__":
    sys.exit(main())
