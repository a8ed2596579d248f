"""One configuration of the peer benchmark (``bench/compare.py``) from start to end: the uncached reference,
every method's sweep (:mod:`bench.compare_sweeps`), and the re-measurements on the confirmation images.

:func:`run_config` measures a configuration; :func:`add_to_config` adds methods to a stored result after
checking that this machine reproduces it; :func:`confirm_headline` and :func:`confirm_adaptive` re-measure
the headline's pairs and the adaptive lines on ``cfg.confirm_images`` images (more images than the sweep's,
for narrower paired intervals: issue 20 asks for ±0.5 dB), both against one uncached reference of that larger set
(:func:`confirmation_images`). Results are plain-JSON dicts.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from bench import peers
from bench.compare_report import _num, fmt
from bench.compare_sweeps import Config, counted_generate, log, measure_reference, run_methods, run_point


def run_config(cfg: Config, methods: list[peers.Method], quick: bool, max_extra: int,
               progress: Any = None) -> dict:
    """Measure one configuration: the uncached reference (:func:`measure_reference`), then every method in
    ``methods`` (:func:`run_methods`), the headline's and the adaptive lines' confirmations;
    ``progress(partial_result)`` is called after each method.

    Returns:
        The configuration's result dict (``name, model, steps, ..., reference, methods, seconds``).

    Raises:
        Whatever the uncached reference run raises; a method's errors are recorded in its entry.
    """
    log(f"\n=== {cfg.name}: {len(cfg.eval_conditions)} evaluation images in {len(cfg.batches)} batches, "
        f"guidance {cfg.guidance}, calibration {len(cfg.ctx.calib_conditions)} samples")
    t_cfg = time.perf_counter()
    ref, reference, counter_check, ref_times = measure_reference(cfg)
    results = run_methods(cfg, methods, ref, ref_times, quick, max_extra, progress)
    confirmation = confirm_headline(cfg, methods, results)
    adaptive_confirmation = confirm_adaptive(cfg, methods, results)
    out = {
        "name": cfg.name,
        "model": cfg.model,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "n_images": len(cfg.eval_conditions),
        "batch_size": cfg.ctx.batch_size,
        "eval_conditions": cfg.condition_text,
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
        "confirmation": confirmation,
        "adaptive_confirmation": adaptive_confirmation,
        "seconds": time.perf_counter() - t_cfg,
    }
    log(f"  {cfg.name}: {out['seconds']:.0f} s")
    return out


#: a stored point re-measured to check that new points pair with a stored result image by image (dB)
REPRODUCE_TOL = 1e-3


#: deterministic lines whose first stored point :func:`reproduction_check` re-measures, in order of preference
#: (EOC as published uses the calibration's priors, so it also checks that the calibration is reproduced)
REPRODUCE_WITH = ("EOC (paper)", "FORA")


def same_reference_flops(cfg: Config, stored: dict, reference: dict) -> None:
    """Refuse a stored result whose uncached FLOPs per image differ from this run's (another model).

    Raises:
        RuntimeError: they differ by more than half a FLOP.
    """
    want = stored["reference"]["flops_per_image"]
    if abs(reference["flops_per_image"] - want) > 0.5:
        raise RuntimeError(f"{cfg.name}: uncached FLOPs per image {reference['flops_per_image']:.0f} differ from the "
                           f"stored {want:.0f}: the stored result is of another model; rerun the whole benchmark")


def reproduction_check(cfg: Config, stored: dict, ref: dict) -> dict:
    """Re-measure the first stored point of the first line of :data:`REPRODUCE_WITH` that the stored
    configuration has, against ``ref`` (this machine's uncached reference of the same images).

    Returns:
        ``{"point", "max_abs_psnr_diff_db"}``.

    Raises:
        RuntimeError: no such line is stored, the re-measurement fails, gives another number of images, or
            differs from the stored per-image PSNRs by more than :data:`REPRODUCE_TOL` dB.
    """
    base = next((e for name in REPRODUCE_WITH for e in stored["methods"] if e["method"] == name
                 and any("error" not in r for r in e["points"])), None)
    if base is None:
        raise RuntimeError(f"{cfg.name}: the stored result has no {' or '.join(REPRODUCE_WITH)} point to check that "
                           "this machine reproduces it; rerun the whole benchmark")
    point = next(r for r in base["points"] if "error" not in r)
    method = next(m for m in peers.all_methods(cfg.steps, only=[f"={base['method']}"]))
    method.prepare(cfg.ctx)
    rec = run_point(cfg, method, point["param"], ref)
    what = f"{base['method']} {point['label']}"
    mine, theirs = rec.get("psnr_db_per_image"), point["psnr_db_per_image"]
    if "error" in rec or mine is None or len(mine) != len(theirs):
        raise RuntimeError(f"{cfg.name}: re-measuring the stored {what} failed or gave another image count "
                           f"({rec.get('error') or len(mine or [])}); rerun the whole benchmark")
    # per-image PSNRs are numbers or +inf ("inf" in stored JSON); two infinities agree, one infinity does not
    diff = max(0.0 if _num(a) == _num(b) else abs(_num(a) - _num(b)) for a, b in zip(mine, theirs))
    log(f"  reproduces the stored {what}: max per-image PSNR difference {diff:.2e} dB")
    if diff > REPRODUCE_TOL:
        raise RuntimeError(f"{cfg.name}: {what} differs from the stored result by up to {diff:.3g} dB per image: "
                           "this machine does not reproduce it; rerun the whole benchmark")
    return {"point": what, "max_abs_psnr_diff_db": diff}


def add_to_config(cfg: Config, stored: dict, methods: list[peers.Method], quick: bool, max_extra: int,
                  progress: Any = None) -> dict:
    """Add ``methods`` to a stored configuration result (``bench/compare.py --add``): the new lines are
    measured on the same images as the stored ones, so the report pairs them image by image.

    Checks first that this machine reproduces the stored result: the uncached reference's FLOPs must be equal
    and a stored planner-baseline point must be reproduced (:func:`reproduction_check`). cachec's stored plan choices (``info.plan_options`` of the
    ``cachec`` line's points) are what :class:`bench.peers.SoftCapMethod` builds on. Entries of the same name are
    replaced; the adaptive lines are confirmed (:func:`confirm_adaptive`) on the stored confirmation's images.

    Returns:
        ``stored`` updated (``methods``, ``adaptive_confirmation`` where an added line is adaptive,
        ``additions``).

    Raises:
        RuntimeError: the stored result is not reproduced here (other model weights, torch or CPU kernels), or
        it has no planner-baseline point to check that with.
    """
    log(f"\n=== {cfg.name}: adding {', '.join(m.name for m in methods)} to the stored result")
    t_cfg = time.perf_counter()
    ref, reference, _, ref_times = measure_reference(cfg)
    same_reference_flops(cfg, stored, reference)
    use_stored_choices(cfg, stored)
    check = reproduction_check(cfg, stored, ref)
    names = {m.name for m in methods}
    kept = [e for e in stored["methods"] if e["method"] not in names]
    new = run_methods(cfg, methods, ref, ref_times, quick, max_extra, progress, done=kept)
    stored["methods"] = kept + new
    conf = stored.get("confirmation")
    if conf:
        cfg.confirm_images = int(conf["n_images"])
    adaptive = confirm_adaptive(cfg, methods, new)
    if adaptive is not None:  # a line that is not adaptive keeps the stored adaptive confirmation
        stored["adaptive_confirmation"] = adaptive
    stored.setdefault("additions", []).append({
        "methods": sorted(names), "reproduction_check": check, "reference_seconds": reference["seconds"],
        "seconds": time.perf_counter() - t_cfg})
    log(f"  {cfg.name}: added in {time.perf_counter() - t_cfg:.0f} s")
    return stored


def _stored_cachec_points(stored: dict) -> Iterator[tuple[float, dict]]:
    """``(budget rounded to 6 places, info)`` of every stored ``cachec`` point that records its plan options."""
    for e in stored["methods"]:
        if e["method"] == "cachec":
            for r in e["points"]:
                if (r.get("info") or {}).get("plan_options"):
                    yield round(float(r["param"]), 6), r["info"]


def use_stored_choices(cfg: Config, stored: dict) -> None:
    """Make cachec's stored plan choices (``info.plan_options`` of the ``cachec`` line's points) the ones the
    SoftCap line builds its base plans on (:func:`bench.peers.cachec_adaptive.chosen_options`)."""
    for budget, info in _stored_cachec_points(stored):
        cfg.ctx.cache[("chosen options", budget)] = info["plan_options"]


def _pair_points(pairs: dict, keys, counter: str) -> list[tuple[str, Any, str, str]]:
    """``(method, param, label, FLOP counter)`` of each distinct point of the headline pairs at ``keys``
    (:func:`bench.compare_report.headline_pairs`; pairs missing a side are skipped)."""
    wanted: list[tuple[str, Any, str, str]] = []
    for key in keys:
        mine, best = pairs[key]
        if not (mine and best):
            continue
        for name, rec in (("cachec", mine), (best[0], best[1])):
            if (name, rec["label"]) not in [(w[0], w[2]) for w in wanted]:
                wanted.append((name, rec["param"], rec["label"], rec.get("flop_counter", counter)))
    return wanted


@contextlib.contextmanager
def confirmation_images(cfg: Config) -> Iterator[tuple[dict, float]]:
    """Switch ``cfg`` to its first ``cfg.confirm_images`` evaluation images for the ``with`` block and yield
    ``(ref, ref_seconds)``: the uncached reference of that set for :func:`bench.compare_sweeps.run_point`
    (``{"images", "flops", "flops_batch0"}``) and the seconds it took (0 where an earlier confirmation of the
    same set measured it: it is kept on ``cfg.confirm_reference`` and counted once). The sweep's image set is restored on exit,
    also when the block raises."""
    saved = (cfg.eval_conditions, cfg.eval_seeds, cfg.batches, cfg.condition_text)
    t = time.perf_counter()
    cfg.set_eval(int(cfg.confirm_images))
    try:
        have = getattr(cfg, "confirm_reference", None)
        if have is not None and have[0] == len(cfg.eval_conditions):
            ref, ref_seconds = have[1], 0.0
        else:
            per_batch: list[int] = []
            images, flops = counted_generate(cfg, None, cfg.batches, per_batch, counter=cfg.counter)
            ref, ref_seconds = {"images": images, "flops": flops, "flops_batch0": per_batch[0]}, time.perf_counter() - t
            cfg.confirm_reference = (len(cfg.eval_conditions), ref, ref_seconds)
        yield ref, ref_seconds
    finally:
        cfg.eval_conditions, cfg.eval_seeds, cfg.batches, cfg.condition_text = saved


def _confirmed(cfg: Config, method: peers.Method, param: Any, ref: dict, counter: str) -> dict:
    """:func:`bench.compare_sweeps.run_point` on the confirmation images with the FLOP counter the method's
    sweep settled on (``torch`` where its fast count disagreed), logged."""
    rec = run_point(cfg, method, param, ref, {"checked": True, "counter": counter})
    log(f"      {method.name} {rec.get('label', ''):28s} FLOPs {fmt(rec.get('flops_fraction'), '.2%')}  PSNR "
        f"{fmt(rec.get('psnr_db'))} dB" + (f"  ERROR {rec['error']}" if "error" in rec else ""))
    return rec


def _summary(cfg: Config, ref_seconds: float, points: list[dict], t0: float) -> dict:
    return {"n_images": len(cfg.eval_conditions), "eval_seeds": [cfg.eval_seeds[0], cfg.eval_seeds[-1]],
            "reference_seconds": ref_seconds, "points": points, "seconds": time.perf_counter() - t0}


def confirm_headline(cfg: Config, methods: list[peers.Method], results: list[dict]) -> dict | None:
    """Re-measure the headline's points on ``cfg.confirm_images`` images, so that the paired intervals of the
    margins are narrow enough to call (issue 20: under ±0.5 dB).

    The pairs are chosen on the sweep's images by the frontier rule
    (:func:`bench.compare_report.headline_pairs`); each chosen (method, operating point) is run once more
    (:func:`bench.compare_sweeps.run_point`, cachec's plan reused from its search) on the larger set, beside
    a new uncached reference of it. :func:`bench.compare_report.headline` then uses these records.

    Returns:
        ``{"n_images", "eval_seeds", "reference_seconds", "points": [run_point records], "seconds"}``, or None
        when ``cfg.confirm_images`` is not above the sweep's image count or there is nothing to confirm.
    """
    from bench.compare_report import headline_pairs

    if int(cfg.confirm_images) <= len(cfg.eval_conditions):
        return None
    pairs = headline_pairs({"methods": results})
    wanted = _pair_points(pairs, list(pairs), cfg.counter)
    if not wanted:
        return None
    by_name = {m.name: m for m in methods}
    t = time.perf_counter()
    with confirmation_images(cfg) as (ref, ref_seconds):
        log(f"  -- confirming the headline on {len(cfg.eval_conditions)} images: "
            + ", ".join(f"{w[0]} {w[2]}" for w in wanted))
        points = [_confirmed(cfg, by_name[name], param, ref, counter) for name, param, _, counter in wanted]
        return _summary(cfg, ref_seconds, points, t)


def confirm_adaptive(cfg: Config, methods: list[peers.Method], results: list[dict]) -> dict | None:
    """Every point of the adaptive lines (:class:`bench.peers.SoftCapMethod`) re-measured on
    ``cfg.confirm_images`` images (one sampling call per image), each followed by the static plan of the same
    family and predictors solved at exactly the realised fraction it had on those images
    (:class:`bench.peers.MatchedStaticMethod`), against the same uncached reference as the headline's
    confirmation (:func:`confirmation_images`). :func:`bench.compare_adaptive.adaptive_comparison` pairs them
    with each other and with the headline's confirmed points.

    Returns:
        ``{"n_images", "eval_seeds", "reference_seconds", "points": [adaptive record, its static record, ...],
        "seconds"}``, or None without adaptive lines or with ``cfg.confirm_images`` not above the sweep's
        image count.
    """
    adaptive = [m for m in methods if isinstance(m, peers.SoftCapMethod)]
    if not adaptive or int(cfg.confirm_images) <= len(cfg.eval_conditions):
        return None
    t = time.perf_counter()
    with confirmation_images(cfg) as (ref, ref_seconds):
        static = peers.MatchedStaticMethod()
        points = []
        for method in adaptive:
            entry = next((e for e in results if e["method"] == method.name), None)
            for r in (entry or {}).get("points", []):
                if "error" in r:
                    continue
                counter = r.get("flop_counter", cfg.counter)
                rec = _confirmed(cfg, method, r["param"], ref, counter)
                points.append(rec)
                if "error" in rec:
                    continue
                srec = _confirmed(cfg, static, (float(r["param"]), rec["flops_fraction"]), ref, counter)
                srec["matches"] = rec["label"]
                points.append(srec)
        return _summary(cfg, ref_seconds, points, t)


#: the paired-interval half-width (dB) the headline's margins aim under (issue 20: "under ±0.5 dB")
TARGET_HALF_WIDTH = 0.5
#: the most images a widened confirmation uses (its cost grows linearly)
WIDEN_CAP = 400


def widen_images(headline: dict, n_images: int, batch: int, target: float = TARGET_HALF_WIDTH,
                 cap: int = WIDEN_CAP) -> tuple[int, list[str]]:
    """How many images bring every headline margin's paired 95 % interval under ``target`` dB, from the stored
    intervals: a half-width h over n images shrinks as 1/√n, so n·(h / (0.9·target))² images (0.9: room for
    the noise of h itself), rounded up to whole batches and capped at ``cap``.

    Args:
        headline: a configuration's ``headline`` (:func:`bench.compare_report.headline`).
        n_images: the images its margins are over now.
        batch: images per generate call.
    Returns:
        ``(images, budget keys whose half-width is over target)``; ``(n_images, [])`` when all are under it.
    """
    need, keys = n_images, []
    for key, h in sorted(headline.items()):
        if h.get("margin_ci_low") is None or int(h.get("images") or 0) != n_images:
            continue
        half = (h["margin_ci_high"] - h["margin_ci_low"]) / 2
        if half <= target:
            continue
        keys.append(key)
        want = n_images * (half / (0.9 * target)) ** 2
        need = max(need, min(cap, int(-(-want // batch) * batch)))
    return need, keys


def widen_confirmation(cfg: Config, stored: dict, methods: list[peers.Method], target: float = TARGET_HALF_WIDTH,
                       cap: int = WIDEN_CAP) -> dict | None:
    """Re-measure the headline pairs whose paired interval is wider than ``target`` dB on as many images as
    :func:`widen_images` asks (``bench/compare.py --widen``), beside a new uncached reference of that set.
    The pairs stay those the frontier rule chose on the sweep's images; cachec's plans are rebuilt from
    their stored choices (``info.plan_options``), not searched again.

    The pairs to widen and their image count come from the confirmation's intervals, so a second ``--widen``
    measures every such pair again and replaces the first one's record.

    Returns:
        ``{"n_images", "eval_seeds", "reference_seconds", "points", "seconds", "budgets", "target_half_width",
        "prefix_check"}`` (:func:`bench.compare_report.headline` prefers it for the pairs it holds), or None when
        every interval is already under ``target`` or the configuration has no confirmation to widen.
    Raises:
        RuntimeError: a headline method is missing from ``methods``; on class models, a widened point's first
        images do not reproduce its confirmation within :data:`REPRODUCE_TOL` dB (:func:`prefix_check`);
        cachec's rebuilt plan is not the stored one (:func:`bench.peers.cachec_plans.rebuild_choice`).
    """
    from bench.compare_report import headline, headline_pairs

    conf = stored.get("confirmation")
    if not conf:
        return None
    for budget, info in _stored_cachec_points(stored):
        cfg.ctx.cache[("stored choice", budget)] = info
    # from the confirmation's intervals, also when an earlier --widen ran (its pairs are measured again)
    base = headline({k: v for k, v in stored.items() if k != "wide_confirmation"})
    n, keys = widen_images(base, int(conf["n_images"]), cfg.batch_size, target, cap)
    if not keys or n <= int(conf["n_images"]):
        return None
    wanted = _pair_points(headline_pairs(stored), keys, cfg.counter)
    by_name = {m.name: m for m in methods}
    missing = sorted({w[0] for w in wanted} - set(by_name))
    if missing:
        raise RuntimeError(f"{cfg.name}: methods {missing} of the headline are not in this version's peer list")
    cfg.confirm_images = n
    t = time.perf_counter()
    with confirmation_images(cfg) as (ref, ref_seconds):
        log(f"  -- widening the headline at {', '.join(keys)} to {len(cfg.eval_conditions)} images: "
            + ", ".join(f"{w[0]} {w[2]}" for w in wanted))
        points = [_confirmed(cfg, by_name[name], param, ref, counter) for name, param, _, counter in wanted]
        out = _summary(cfg, ref_seconds, points, t)
    check = prefix_check(cfg, conf, points)
    if check is not None and check["max_abs_diff_db"] > REPRODUCE_TOL:
        raise RuntimeError(f"{cfg.name}: the widened points' first {check['images']} per-image PSNRs differ from the "
                           f"confirmation's by up to {check['max_abs_diff_db']:.3g} dB (> {REPRODUCE_TOL} dB): this run "
                           "does not reproduce the stored result; rerun the whole benchmark")
    out.update(budgets=keys, target_half_width=target, prefix_check=check)
    return out


def prefix_check(cfg: Config, conf: dict, points: list[dict]) -> dict | None:
    """On class models a larger evaluation set begins with the smaller one (:meth:`Config.set_eval`), so each
    widened point's first ``conf["n_images"]`` per-image PSNRs must equal its stored confirmation's: the
    largest absolute difference (dB) over the points, and the points compared. None on prompt models (their
    larger sets are not extensions)."""
    if cfg.driver.prompt_sets:
        return None
    from bench.compare_report import confirmed

    n, worst, compared = int(conf["n_images"]), 0.0, []
    for r in points:
        old = confirmed({"confirmation": conf}, r["method"], r["label"])
        if old is None or "error" in r:
            continue
        a = [min(_num(v), 100.0) for v in r["psnr_db_per_image"][:n]]
        b = [min(_num(v), 100.0) for v in old["psnr_db_per_image"]]
        worst = max([worst] + [abs(x - y) for x, y in zip(a, b)])
        compared.append(f"{r['method']} {r['label']}")
    return {"images": n, "max_abs_diff_db": worst, "points": compared}


def widen_config(cfg: Config, stored: dict, methods: list[peers.Method], target: float = TARGET_HALF_WIDTH,
                 cap: int = WIDEN_CAP) -> dict:
    """``bench/compare.py --widen``: check that this machine reproduces ``stored`` (as :func:`add_to_config`),
    then :func:`widen_confirmation`; returns ``stored`` with ``wide_confirmation`` set (unchanged when every
    interval is already narrow enough).

    Raises:
        RuntimeError: as :func:`add_to_config`, or a headline method is missing from ``methods``.
    """
    log(f"\n=== {cfg.name}: widening the headline's confirmation to ±{target:g} dB")
    t = time.perf_counter()
    ref, reference, _, _ = measure_reference(cfg)
    same_reference_flops(cfg, stored, reference)
    reproduction_check(cfg, stored, ref)
    wide = widen_confirmation(cfg, stored, methods, target, cap)
    if wide is not None:
        stored["wide_confirmation"] = wide
    log(f"  {cfg.name}: widened in {time.perf_counter() - t:.0f} s")
    return stored
