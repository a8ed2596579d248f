"""Running the peer benchmark (``bench/compare.py``): configurations, operating points and threshold sweeps.

A :class:`Config` is one model at one step count with its evaluation set (classes 0-9 × per-class, seeds
``EVAL_SEED0 + i``) and its calibration set (seeds 0 .. n-1, disjoint). :func:`measure_reference` measures
the uncached reference and :func:`run_methods` every method (a whole configuration, confirmations included,
is :func:`bench.compare_configs.run_config`); :func:`sweep_method` measures a method's operating points,
extending and bisecting threshold sweeps until their realised FLOPs bracket the table budgets;
:func:`run_point` measures one point (FLOPs counted over whole ``generate`` calls, quality from
:func:`cachec.report.evaluate`, wall time of an uncounted timing batch). Results are plain-JSON dicts
(:func:`cachec.runtime.io.to_jsonable`); a method that raises is recorded, never raised.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench import peers
from bench.compare_report import CHECK_SIZE, COVERAGE_BELOW, EXACT_TOL, FRONTIER_SLACK, TABLE_BUDGETS, fmt
from cachec.runtime.io import to_jsonable

#: threshold sweeps are extended until they also bracket the low end of cachec's budget sweep
EXTEND_TO = (0.20,)
EVAL_SEED0 = 1_000_000  # evaluation seeds EVAL_SEED0 + i; calibration uses 0 .. n-1
MAX_GAP = 0.10  # threshold sweeps bisect brackets wider than this


def log(msg: str) -> None:
    """Print a progress line to stdout and flush it."""
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
        self.batch_size = batch_size
        ncls = int(driver.num_classes or 10)
        if driver.prompt_sets:  # the prompt-conditioned reference: its own calibration prompt set
            from cachec.evaluation import spread

            cal = driver.prompt_sets["calibration"]
            cal_conditions = spread(cal, max(len(cal), cal_per_class * ncls))
        else:
            cal_conditions = [c for _ in range(cal_per_class) for c in range(ncls)]
        self.set_eval(per_class * ncls)
        cal_seeds = list(range(len(cal_conditions)))
        assert not set(cal_seeds) & set(self.eval_seeds)
        bs = batch_size
        self.ctx = peers.BenchContext(
            driver=driver, steps=steps, guidance=self.guidance, calib_conditions=cal_conditions,
            calib_seeds=cal_seeds, workdir=workdir, batch_size=bs, sensitivity=sensitivity,
            sensitivity_samples=sensitivity_samples, log=log,
        )
        self.name = f"{model} · {steps} steps"
        self.counter = "fast"
        self.timing_size = max(1, batch_size // 2)
        #: images of the headline confirmation (:func:`bench.compare_configs.confirm_headline`; 0: none)
        self.confirm_images = 0

    def set_eval(self, n: int) -> None:
        """Use ``n`` evaluation images: classes 0-9 cycled (the first images of a larger set are those of a
        smaller one), or the held-out prompts spread condition-major (:func:`cachec.evaluation.spread`: a larger
        set is not an extension of a smaller one); seeds ``EVAL_SEED0 + i``."""
        ncls = int(self.driver.num_classes or 10)
        if self.driver.prompt_sets:
            from cachec.evaluation import spread

            held = self.driver.prompt_sets["held-out"]
            self.eval_conditions = spread(held, n)
            self.condition_text = f"{len(self.eval_conditions)} of the {len(held)} held-out prompts"
        else:
            self.eval_conditions = [c for _ in range(max(1, n // ncls)) for c in range(ncls)]
            self.condition_text = "classes 0-9 x %d" % (len(self.eval_conditions) // 10)
        self.eval_seeds = [EVAL_SEED0 + i for i in range(len(self.eval_conditions))]
        bs = self.batch_size
        self.batches = [(self.eval_conditions[i : i + bs], self.eval_seeds[i : i + bs])
                        for i in range(0, len(self.eval_conditions), bs)]


def split_calls(session: peers.Session | None, batches, call_batch: int | None = None) -> list[tuple[list, list]]:
    """``batches`` cut into ``call_batch`` (default: the session's ``call_batch``) samples per ``generate``
    call (unchanged when neither is set)."""
    k = call_batch or getattr(session, "call_batch", None)
    if not k:
        return list(batches)
    return [(list(c[i:i + k]), list(s[i:i + k])) for c, s in batches for i in range(0, len(c), k)]


def counted_generate(cfg: Config, session: peers.Session | None, batches, per_batch: list | None = None,
                     counter: str = "fast") -> tuple[torch.Tensor, int]:
    """Images and FLOPs (counted over every whole ``generate`` call) of ``batches`` under ``session``;
    per-batch counts are appended to ``per_batch`` when given. ``counter``: ``"fast"``
    (:func:`cachec.runtime.flops.count_total_flops`) or ``"torch"`` (:func:`cachec.runtime.flops.count_flops`)."""
    from cachec.runtime.flops import count_flops, count_total_flops

    images, total = [], 0
    for conds, seeds in split_calls(session, batches):
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


def timed_generate(cfg: Config, session: peers.Session | None, call_batch: int | None = None
                   ) -> tuple[float, torch.Tensor]:
    """Wall seconds and images of the ``generate`` calls on the timing batch (the first ``cfg.timing_size``
    samples of the first evaluation batch, in calls of ``call_batch`` or the session's ``call_batch`` samples;
    no FLOP counting)."""
    conds, seeds = cfg.batches[0]
    conds, seeds = conds[: cfg.timing_size], seeds[: cfg.timing_size]
    wall, images = 0.0, []
    for c, s in split_calls(session, [(conds, seeds)], call_batch):
        if session is not None:
            session.begin()
        try:
            t = time.perf_counter()
            images.append(cfg.ctx.generate(c, s))
            wall += time.perf_counter() - t
        finally:
            if session is not None:
                session.end()
    return wall, torch.cat(images)


def summarise(ev: dict) -> dict:
    """The fields of a :func:`cachec.report.evaluate` result that the tables use; on the control model also
    ``control_iou`` (mean IoU of the ink with the control masks), ``control_iou_reference`` (the uncached
    images'), ``control_iou_per_image`` and ``control_fidelity_loss`` (``1 − IoU / IoU_reference``, a fraction)."""
    fd = ev["frechet_distance"]
    control = {}
    if ev.get("control_iou"):  # the control model (cachec.control): IoU of the generated ink with the control mask
        cand, refv = ev["control_iou"]["candidate"], ev["control_iou"]["reference"]
        control = {"control_iou": cand["mean"], "control_iou_reference": refv["mean"],
                   "control_iou_per_image": cand["per_image"],
                   "control_fidelity_loss": (1.0 - cand["mean"] / refv["mean"]) if refv["mean"] else None}
    return {**control,
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
    from cachec.report import evaluate

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
                per_batch = []
                images, flops = counted_generate(cfg, session, batches, per_batch, counter="torch")
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
    k = getattr(session, "call_batch", None)
    if k:  # a method that samples in small calls (per-image decisions): counted per call, timed like for like
        sizes = [len(c) for c, _ in split_calls(session, batches)]
        rec["call_flops_fraction_max"] = max(f / (m * ref_flops / n) for f, m in zip(per_batch, sizes))
        rec["uncached_wall_s_same_calls"] = timed_generate(cfg, None, call_batch=k)[0]
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
    problems = peers.leftover_state(cfg.driver, cfg.ctx.module_order)
    if problems:
        peers.remove_diffusers_hooks(cfg.driver.transformer)
    wall, images = timed_generate(cfg, None)
    diff = float((images - ref["images"][: images.shape[0]]).abs().max())
    if diff > 1e-3:
        problems.append(f"uncached sampling no longer reproduces the reference (max diff {diff:.3g})")
    return problems, wall


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
            log(f"      {method.label(p):34s} FLOPs {rec['flops_fraction']:6.1%}  PSNR {fmt(rec.get('psnr_db'))} dB  "
                f"FD {fmt(rec.get('frechet'), '.1f')}  wall {rec['wall_s_timing_batch']:.2f} s  ({rec['seconds']:.1f} s)")
        return rec

    for p in method.grid(cfg.ctx, quick=quick):
        measure(p)
    if not (method.adaptive if method.bisect is None else method.bisect) or quick:
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
            # bisect a wide bracket, and one without a real point in [b - 2 points, b + slack] (the headline's
            # frontier rule needs a point just below each budget)
            wide = hi["flops_fraction"] - lo["flops_fraction"] > MAX_GAP
            gap = lo["flops_fraction"] < b - COVERAGE_BELOW and hi["flops_fraction"] > b + FRONTIER_SLACK
            if (wide or gap) and lo is not hi:
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


def measure_reference(cfg: Config) -> tuple[dict, dict, dict | None, list[float]]:
    """The uncached reference of ``cfg``'s evaluation set: ``(ref, reference, counter_check, ref_times)`` with
    ``ref = {"images", "flops", "flops_batch0"}`` for :func:`run_point`, ``reference`` the result fields
    (FLOPs per image, accuracy, Fréchet, timing), the fast-vs-torch counter check and the first timing."""
    from cachec.report import evaluate

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
    return ref, reference, counter_check, ref_times


def run_methods(cfg: Config, methods: list[peers.Method], ref: dict, ref_times: list[float], quick: bool,
                max_extra: int, progress: Any = None, done: list[dict] | None = None) -> list[dict]:
    """Every method's entry (:func:`sweep_method`), each followed by the leftover check and an interleaved
    uncached timing (appended to ``ref_times``); ``progress(partial)`` after each method, where ``partial``
    lists ``done`` (entries measured before) and the new ones."""
    results: list[dict] = []
    for method in methods:
        t = time.perf_counter()
        entry: dict[str, Any] = {"method": method.name, "group": method.group, "knob": method.knob,
                                 "adaptive": method.adaptive, "diagnostic": method.diagnostic,
                                 "bisect": bool(method.adaptive if method.bisect is None else method.bisect)}
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
                r["wall_ratio"] = r["wall_s_timing_batch"] / r.get("uncached_wall_s_same_calls", denom)
        entry["seconds"] = time.perf_counter() - t
        results.append(entry)
        if progress is not None:
            progress({"name": cfg.name, "methods": list(done or []) + results})
    return results


def peers_settings(method: peers.Method) -> dict:
    """A method's fixed settings (:attr:`bench.peers.Method.settings`) as plain JSON."""
    return to_jsonable(dict(method.settings))
