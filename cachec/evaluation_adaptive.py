"""Closed-loop evaluation of a plan in the SoftCap adaptive mode (docs/softcap.md): ``cachec eval PLAN
--adaptive`` and bench/bench_softcap.py.

Like :func:`cachec.evaluation.evaluate_plan`, but the realised compute depends on the input, so FLOPs are the
runtime's accounting per run (in plan.budget units; equal to torch's FLOP counter, tests/test_softcap.py),
averaged over the runs weighted by their batch size, with the largest run's fraction beside it. The threshold
profile is calibrated once, before sampling, on the probe seeds (validation range, never the evaluation ones).
Decisions are shared by the rows of a run: ``batch_size`` sets how finely the mode adapts (1: per image).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import torch

from .evaluation import PlanRun
from .report import evaluate


def adaptive_options(driver, plan, options=None):
    """``options`` (default softcap) with a calibrated profile (:func:`calibrate_profile` on ``driver``)."""
    from .runtime.adaptive_calibrate import calibrate_profile, resolve_options

    options = resolve_options(True if options is None else options)
    if options.profile is None:
        options = replace(options, profile=calibrate_profile(driver, plan, options))
    return options


def evaluate_adaptive(driver, plan, options, conditions: Sequence, seeds: Sequence[int], *, batch_size: int = 50,
                      name: str | None = None, reference: torch.Tensor | None = None,
                      digit_metrics: bool | None = None) -> PlanRun:
    """Run ``plan`` adaptively and (unless ``reference`` is given) the uncached model on the same conditions and
    seeds, and compare them.

    Args:
        driver: a :class:`cachec.loading.Driver` for the plan's model.
        plan: the static reference plan.
        options: :class:`cachec.runtime.adaptive.AdaptiveOptions`, a mode name or True; a missing profile is
            calibrated first.
        conditions, seeds: N held-out conditions and seeds.
        batch_size: samples per sampling run (one decision sequence per run).
        name: row name for tables.
        reference: float32 (N, C, H, W) uncached images of the same conditions and seeds (skips sampling them).
        digit_metrics: override the registry's choice (False: PSNR/SSIM only, no classifier).

    Returns:
        A :class:`~cachec.evaluation.PlanRun` whose ``result`` has :func:`cachec.report.evaluate`'s metrics plus
        ``flops_fraction`` (runtime accounting, batch-weighted mean), ``flops_fraction_max``, ``ceiling``,
        ``plan_flops_fraction``, ``full_steps_mean``, ``speedup`` (None when ``reference`` was given),
        ``runtime_report`` (the last run's), ``runtime_reports`` (all), ``conditions``, ``seeds``, ``adaptive``.

    Raises:
        ValueError: as :meth:`Driver.generate` and :class:`AdaptiveOptions`.
    """
    from .runtime import apply

    options = adaptive_options(driver, plan, options)
    conditions, seeds = list(conditions), [int(s) for s in seeds]
    steps, guidance = plan.sampler.steps, plan.sampler.guidance.scale
    cfg = "split" if plan.sampler.guidance.mode == "split" else "batched"
    driver.set_resolution(plan.sampler.resolution)
    refs, cached, reports = [], [], []
    wall_ref = wall_cached = 0.0
    for start in range(0, len(conditions), batch_size):
        c, s = conditions[start:start + batch_size], seeds[start:start + batch_size]
        if reference is None:
            t0 = time.perf_counter()
            refs.append(driver.generate(c, s, steps=steps, guidance=guidance, cfg=cfg))
            wall_ref += time.perf_counter() - t0
        with apply(driver, plan, adaptive=options) as handle:
            t0 = time.perf_counter()
            cached.append(driver.generate(c, s, steps=steps, guidance=guidance, cfg=cfg))
            wall_cached += time.perf_counter() - t0
            reports.append((len(c), handle.report))
    ref = torch.cat(refs) if reference is None else reference
    cand = torch.cat(cached)
    use_digits = driver.spec.digit_metrics if digit_metrics is None else digit_metrics
    n = len(conditions)
    fraction = sum(k * r.flops_fraction for k, r in reports) / n
    result = evaluate(cand, ref, conditions, wall_s=wall_cached, digit_metrics=use_digits,
                      name=name or f"{options.mode} {100 * options.profile.ceiling:.0f}%")
    result.update(
        adaptive=options.mode,
        ceiling=options.profile.ceiling,
        budget_target=options.profile.ceiling,
        plan_flops_fraction=plan.budget.realised,
        flops_fraction=fraction,
        flops_fraction_max=max(r.flops_fraction for _, r in reports),
        full_steps_mean=sum(k * len(r.full_steps) for k, r in reports) / n,
        reference_wall_s=wall_ref if reference is None else None,
        speedup=wall_ref / wall_cached if reference is None and wall_cached > 0 else None,
        runtime_report=reports[-1][1].as_dict(),
        runtime_reports=[r.as_dict() for _, r in reports],
        profile=options.profile.as_dict(),
        n_images=n,
        conditions=conditions,
        seeds=seeds,
    )
    return PlanRun(ref, cand, conditions, seeds, result)


__all__ = ["adaptive_options", "evaluate_adaptive"]
