"""Closed-loop evaluation of a plan: run it and the uncached model on the same conditions and seeds.

Used by ``cachec eval PLAN``, ``cachec compile`` and the benchmarks. Quality comes from
:func:`cachec.report.evaluate`; FLOPs are counted with ``torch.utils.flop_counter`` over whole sampling calls
(never taken from the plan's claim); wall time is measured with uncached and cached batches interleaved
in the same process so that machine load affects both alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .runtime.flops import count_flops
from .report import evaluate

#: evaluation seeds start here; calibration seeds start at 0 (``--seed``), validation seeds at VALIDATION_SEED
EVAL_SEED = 1_000_000
VALIDATION_SEED = 500_000


@dataclass
class PlanRun:
    """Images and measurements of one closed-loop comparison.

    Attributes:
        reference, cached: float32 (N, C, H, W) images in [0, 1] (uncached / following the plan).
        labels, seeds: the conditions and seeds used (length N).
        result: JSON-ready dict (quality metrics + FLOPs + wall-clock, see :func:`evaluate_plan`).
    """

    reference: torch.Tensor
    cached: torch.Tensor
    labels: list
    seeds: list[int]
    result: dict


def _counted(driver, conditions, seeds, steps, guidance) -> float:
    _, flops, _ = count_flops(driver.generate, conditions, seeds, steps=steps, guidance=guidance)
    return float(flops)


def evaluate_plan(driver, plan, conditions: Sequence, seeds: Sequence[int], *, batch_size: int = 50,
                  flop_samples: int = 2, name: str | None = None) -> PlanRun:
    """Run ``plan`` and the uncached model on the same conditions and seeds and compare them.

    Args:
        driver: a :class:`cachec.loading.Driver` for the plan's model.
        plan: a loaded :class:`cachec.runtime.plan.Plan` (its steps and guidance are used).
        conditions, seeds: N conditions and N seeds (held-out: never the calibration ones).
        batch_size: samples per sampling call; uncached and cached batches alternate.
        flop_samples: samples used for the FLOP count (FLOPs per image do not depend on the batch).
        name: row name for tables.

    Returns:
        A :class:`PlanRun`; ``result`` holds the metrics of :func:`cachec.report.evaluate` plus ``budget_target``,
        ``plan_flops_fraction`` (the plan's accounting), ``flops_fraction`` (counted: cached ÷ uncached
        FLOPs of the same call), ``speedup`` (uncached ÷ cached wall time), ``runtime_report`` (the
        runtime's report of the last cached batch).

    Raises:
        ValueError: as :meth:`Driver.generate`; PlanMismatchError when the plan does not fit the model.
    """
    from .runtime import apply

    conditions, seeds = list(conditions), [int(s) for s in seeds]
    steps, guidance = plan.sampler.steps, plan.sampler.guidance.scale
    refs, cached = [], []
    wall_ref = wall_cached = 0.0
    report = None
    for start in range(0, len(conditions), batch_size):
        c, s = conditions[start:start + batch_size], seeds[start:start + batch_size]
        t0 = time.perf_counter()
        refs.append(driver.generate(c, s, steps=steps, guidance=guidance))
        wall_ref += time.perf_counter() - t0
        with apply(driver, plan) as handle:
            t0 = time.perf_counter()
            cached.append(driver.generate(c, s, steps=steps, guidance=guidance))
            wall_cached += time.perf_counter() - t0
            report = handle.report
    k = max(1, min(flop_samples, len(conditions)))
    flops_ref = _counted(driver, conditions[:k], seeds[:k], steps, guidance)
    with apply(driver, plan):
        flops_cached = _counted(driver, conditions[:k], seeds[:k], steps, guidance)
    reference, candidate = torch.cat(refs), torch.cat(cached)
    labels = conditions if driver.condition_kind == "class" else list(range(len(conditions)))
    result = evaluate(candidate, reference, labels, flops_per_image=flops_cached / k, wall_s=wall_cached,
                      name=name or f"{plan.budget.method} {100 * plan.budget.target:.0f}%") \
        if driver.condition_kind == "class" else _pixel_only(candidate, reference, name)
    result.update(
        budget_target=plan.budget.target,
        plan_flops_fraction=plan.budget.realised,
        flops_fraction=flops_cached / flops_ref,
        reference_flops_per_image=flops_ref / k,
        reference_wall_s=wall_ref,
        speedup=wall_ref / wall_cached if wall_cached > 0 else None,
        runtime_report=report.as_dict() if report is not None else None,
        n_images=len(conditions),
    )
    return PlanRun(reference, candidate, conditions, seeds, result)


def _pixel_only(candidate, reference, name):
    from .metrics import psnr, ssim
    from .runtime.io import to_jsonable

    p, s = psnr(candidate, reference), ssim(candidate, reference)
    return to_jsonable({"name": name, "psnr_db": {"mean": float(p.mean())}, "ssim": {"mean": float(s.mean())}})


def choose_plan(driver, candidates: dict, conditions: Sequence, seeds: Sequence[int], *,
                batch_size: int = 50) -> tuple[str, dict[str, float]]:
    """Closed-loop choice among candidate plans: the one closest to uncached sampling on validation seeds.

    The planner's predicted error ranks schedules of one family well but can misrank free (per-unit)
    against synchronised schedules (cross-unit error terms are not in the calibration statistics), so the
    main job and the shipped plans pick the family by running each candidate. The uncached reference is
    generated once; each candidate is scored by the PSNR of the mean squared error over all images.

    Args:
        driver: a :class:`cachec.loading.Driver` for the plans' model.
        candidates: ``{name: loaded Plan}`` (same sampler settings), at least one.
        conditions, seeds: validation conditions and seeds (disjoint from calibration and evaluation).
        batch_size: samples per sampling call.
    Returns:
        ``(best_name, {name: psnr_db})``; ties go to the first candidate in ``candidates`` order.
    Raises:
        ValueError: no candidates, or candidates with different steps/guidance.
    """
    from .runtime import apply

    if not candidates:
        raise ValueError("choose_plan needs at least one candidate plan")
    settings = {(p.sampler.steps, p.sampler.guidance.scale) for p in candidates.values()}
    if len(settings) != 1:
        raise ValueError(f"candidate plans have different (steps, guidance): {sorted(settings)}")
    steps, guidance = settings.pop()
    conditions, seeds = list(conditions), [int(x) for x in seeds]
    batches = [(conditions[i:i + batch_size], seeds[i:i + batch_size]) for i in range(0, len(conditions), batch_size)]
    reference = torch.cat([driver.generate(c, s, steps=steps, guidance=guidance) for c, s in batches]).double()
    scores = {}
    for name, plan in candidates.items():
        with apply(driver, plan):
            cand = torch.cat([driver.generate(c, s, steps=steps, guidance=guidance) for c, s in batches]).double()
        mse = float((cand - reference).pow(2).mean())
        scores[name] = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
    best = max(scores, key=lambda k: scores[k])
    return best, scores


def held_out(driver, per_class: int = 10, seed: int = EVAL_SEED) -> tuple[list, list[int]]:
    """Evaluation conditions and seeds: every class ``per_class`` times, seeds ``seed + i``.

    Raises:
        ValueError: the model is not class-conditional (give prompts instead).
    """
    if driver.condition_kind != "class":
        raise ValueError(f"{driver.name} is text-conditional: give evaluation prompts")
    conds = [c for c in range(driver.num_classes) for _ in range(per_class)]
    return conds, [seed + i for i in range(len(conds))]
