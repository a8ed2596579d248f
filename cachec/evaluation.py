"""Closed-loop evaluation of a plan: run it and the uncached model on the same conditions and seeds.

Used by ``cachec eval PLAN``, ``cachec compile`` and the benchmarks. Quality comes from
:func:`cachec.report.evaluate`; FLOPs are counted with ``torch.utils.flop_counter`` over whole sampling calls
(never taken from the plan's claim); wall time is measured with uncached and cached batches interleaved
in the same process so that machine load affects both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .runtime.flops import count_flops
from .report import evaluate

#: evaluation seeds start here; calibration seeds start at 0 (``--seed``) and stay below VALIDATION_SEED
#: (``cachec calibrate`` refuses more), validation seeds (the closed-loop choice) lie in [VALIDATION_SEED, EVAL_SEED)
EVAL_SEED = 1_000_000
VALIDATION_SEED = 500_000
#: per-image PSNR cap in dB of the closed-loop scores and the benchmark's margins (an identical image, PSNR
#: +inf, counts as this much, so one identical image cannot make a mean infinite)
PSNR_CAP_DB = 100.0

#: the held-out prompts of ``cachec eval`` on text models. ``cachec calibrate`` refuses to calibrate on any
#: of them (compared case- and whitespace-insensitively), so a plan is never evaluated on its own
#: calibration prompts unless the user passes those to ``eval`` explicitly.
HELD_OUT_PROMPTS = (
    "a red bicycle leaning against a brick wall",
    "an astronaut reading a newspaper on a park bench",
    "a bowl of ramen on a wooden table, top view",
    "a lighthouse on a cliff at sunset",
    "a watercolor painting of a fox in the snow",
    "a glass teapot with blooming flowers inside",
    "a vintage typewriter on a desk by a window",
    "a city street in the rain at night, neon signs",
    "a herd of elephants crossing a river",
    "a cozy cabin in a pine forest covered in snow",
    "a macro photo of a dragonfly on a leaf",
    "a sailboat on a calm lake with mountains behind",
    "a plate of pancakes with berries and syrup",
    "an old stone bridge over a stream in autumn",
    "a hot air balloon above a field of sunflowers",
    "a portrait of a cat wearing a knitted scarf",
)


def _norm_prompt(p: str) -> str:
    return " ".join(str(p).lower().split())


def held_out_prompts(driver=None) -> list[str]:
    """The held-out prompts of ``cachec eval`` for ``driver``: the model's own ``held-out`` prompt set
    (``driver.prompt_sets``, the shipped prompt-conditioned model) or :data:`HELD_OUT_PROMPTS`."""
    own = getattr(driver, "prompt_sets", {}).get("held-out") if driver is not None else None
    return list(own or HELD_OUT_PROMPTS)


def held_out_prompt(prompt: str, driver=None) -> bool:
    """Whether ``prompt`` is one of :func:`held_out_prompts` (case- and whitespace-insensitive)."""
    return _norm_prompt(prompt) in {_norm_prompt(p) for p in (*HELD_OUT_PROMPTS, *held_out_prompts(driver))}


def check_calibration_conditions(conditions: Sequence, seed: int, n_samples: int, driver=None) -> None:
    """What ``cachec calibrate`` checks so that evaluation stays held out: no prompt of
    :data:`HELD_OUT_PROMPTS` or of the driver's held-out set (:func:`held_out_prompts`), no control condition
    naming a held-out mask or prompt (:func:`cachec.control.held_out_condition`) and seeds
    ``seed .. seed + n_samples − 1`` inside ``[0, VALIDATION_SEED)``.

    Raises:
        ValueError: a held-out prompt (named) or a seed outside that range.
    """
    from .control import held_out_condition

    for c in conditions:
        if isinstance(c, str) and held_out_prompt(c, driver):
            raise ValueError(f"prompt {c!r} is one of cachec eval's held-out prompts: calibrate on other prompts")
        if held_out_condition(c):
            raise ValueError(f"condition {c!r} names a held-out control mask or prompt: calibrate on calibration ones")
    if seed < 0 or seed + n_samples > VALIDATION_SEED:
        raise ValueError(f"calibration seeds {seed}..{seed + n_samples - 1} must lie in 0..{VALIDATION_SEED - 1} "
                         f"(validation seeds start at {VALIDATION_SEED}, evaluation seeds at {EVAL_SEED})")


def spread(conditions: Sequence, n: int) -> list:
    """``n`` conditions cycled evenly through ``conditions`` (K of them), condition-major: item i is
    ``conditions[i·K // n]``, so every condition is used ⌊n/K⌋ or ⌈n/K⌉ times (n = 10·K: each 10 times, as
    ``--per-class 10`` did) and n < K takes an evenly spaced subset.

    Raises:
        ValueError: no conditions or n < 1.
    """
    conditions = list(conditions)
    if not conditions or n < 1:
        raise ValueError(f"need at least one condition and one sample, got {len(conditions)} and {n}")
    k = len(conditions)
    return [conditions[i * k // n] for i in range(n)]


def held_out_set(driver, n: int | None = None, seed: int = EVAL_SEED, conditions: Sequence | None = None
                 ) -> tuple[list, list[int]]:
    """Held-out conditions and seeds of ``cachec eval``: ``n`` samples (default: the registry entry's
    ``eval_samples``) cycled through ``conditions`` (default: every class, or :func:`held_out_prompts` for
    text models) by :func:`spread`, seeds ``seed + i``.

    Raises:
        ValueError: ``seed`` below :data:`EVAL_SEED` (those are calibration/validation seeds), n < 1, or
            conditions of the wrong kind (:meth:`Driver.check_conditions`).
    """
    if seed < EVAL_SEED:
        raise ValueError(f"held-out seeds start at {EVAL_SEED} (calibration seeds lie below {VALIDATION_SEED}, "
                         f"validation seeds below {EVAL_SEED}); got --seed {seed}")
    n = driver.spec.eval_samples if n is None else int(n)
    if conditions is None:
        conditions = list(range(driver.num_classes)) if driver.condition_kind == "class" else held_out_prompts(driver)
    conds = spread(driver.check_conditions(conditions), n)
    return conds, [seed + i for i in range(n)]


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
        plan: a loaded :class:`cachec.runtime.plan.Plan` (its steps, guidance and resolution are used:
            the driver is set to the plan's resolution).
        conditions, seeds: N conditions and N seeds (held-out: never the calibration ones).
        batch_size: samples per sampling call; uncached and cached batches alternate.
        flop_samples: samples used for the FLOP count (FLOPs per image do not depend on the batch).
        name: row name for tables.

    Returns:
        A :class:`PlanRun`; ``result`` holds the metrics of :func:`cachec.report.evaluate` (the
        digit-classifier ones only where the registry entry has ``digit_metrics``) plus ``budget_target``,
        ``plan_flops_fraction`` (the plan's accounting), ``flops_fraction`` (counted: cached ÷ uncached
        FLOPs of the same call), ``speedup`` (uncached ÷ cached wall time), ``runtime_report`` (the
        runtime's report of the last cached batch), ``conditions`` and ``seeds`` (the N used).

    Raises:
        ValueError: as :meth:`Driver.generate` and :meth:`Driver.set_resolution`; PlanMismatchError when the
            plan does not fit the model.
    """
    from .runtime import apply

    conditions, seeds = list(conditions), [int(s) for s in seeds]
    steps, guidance = plan.sampler.steps, plan.sampler.guidance.scale
    driver.set_resolution(plan.sampler.resolution)
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
    result = evaluate(candidate, reference, conditions, flops_per_image=flops_cached / k, wall_s=wall_cached,
                      name=name or f"{plan.budget.method} {100 * plan.budget.target:.0f}%",
                      digit_metrics=driver.spec.digit_metrics)
    result.update(
        budget_target=plan.budget.target,
        plan_flops_fraction=plan.budget.realised,
        flops_fraction=flops_cached / flops_ref,
        reference_flops_per_image=flops_ref / k,
        reference_wall_s=wall_ref,
        speedup=wall_ref / wall_cached if wall_cached > 0 else None,
        runtime_report=report.as_dict() if report is not None else None,
        n_images=len(conditions),
        conditions=list(conditions),
        seeds=list(seeds),
    )
    return PlanRun(reference, candidate, conditions, seeds, result)


class Validation:
    """Closed-loop scores of plans on validation seeds: the uncached reference is sampled once (on first use)
    and every plan is scored by the mean over images of the per-image PSNR (dB, each capped at
    :data:`PSNR_CAP_DB`) against it: the quality metric ``cachec eval`` reports (``psnr_db.mean``, uncapped)
    and the benchmark's margins use (capped the same way, docs/benchmarks.md), so the search optimises what is
    measured. Before 2026-12-07 it scored the PSNR of the pooled MSE, which the worst images dominate
    (docs/planner.md, "Confirmation: the search's fifth stage", measures where the two disagree).

    Args:
        driver: a :class:`cachec.loading.Driver` for the plans' model.
        conditions, seeds: validation conditions and seeds (disjoint from calibration and evaluation).
        steps, guidance: the sampler settings every scored plan must have.
        batch_size: samples per sampling call.
    Attributes:
        runs: number of plans scored so far (each one sampling run of the validation set).
        images: number of validation images.
        conditions, seeds, batch_size: as given.
    """

    def __init__(self, driver, conditions: Sequence, seeds: Sequence[int], steps: int, guidance: float, *,
                 batch_size: int = 50):
        self.driver, self.steps, self.guidance = driver, int(steps), float(guidance)
        conditions, seeds = list(conditions), [int(x) for x in seeds]
        if not conditions or len(conditions) != len(seeds):
            raise ValueError(f"validation needs one seed per condition and at least one, got {len(conditions)} "
                             f"conditions and {len(seeds)} seeds")
        self.conditions, self.seeds, self.batch_size = conditions, seeds, int(batch_size)
        self.images = len(conditions)
        self.batches = [(conditions[i:i + batch_size], seeds[i:i + batch_size])
                        for i in range(0, len(conditions), batch_size)]
        self._reference = None
        self.runs = 0

    def _sample(self) -> torch.Tensor:
        """The images (N, C, H, W) in the driver's output dtype: the reference is kept for every later score, and
        :func:`cachec.metrics.psnr` computes in float64 itself (an upcast here doubled the memory for nothing)."""
        return torch.cat([self.driver.generate(c, s, steps=self.steps, guidance=self.guidance)
                          for c, s in self.batches])

    def score(self, plan) -> float:
        """Mean per-image PSNR in dB (each capped at :data:`PSNR_CAP_DB`) of the loaded ``plan`` against
        uncached sampling.

        Raises:
            ValueError: the plan's steps or guidance differ from this validation's.
        """
        from .metrics import psnr
        from .runtime import apply

        if (plan.sampler.steps, plan.sampler.guidance.scale) != (self.steps, self.guidance):
            raise ValueError(f"plan samples (steps, guidance) = {(plan.sampler.steps, plan.sampler.guidance.scale)}, "
                             f"the validation {(self.steps, self.guidance)}")
        if self._reference is None:
            self._reference = self._sample()
        with apply(self.driver, plan):
            cand = self._sample()
        self.runs += 1
        return float(psnr(cand, self._reference).clamp(max=PSNR_CAP_DB).mean())


def choose_plan(driver, candidates: dict, conditions: Sequence, seeds: Sequence[int], *,
                batch_size: int = 50, validation: Validation | None = None) -> tuple[str, dict[str, float]]:
    """Closed-loop choice among candidate plans: the one closest to uncached sampling on validation seeds.

    The planner's predicted error ranks schedules of one family well but can misrank free (per-unit)
    against synchronised schedules (cross-unit error terms are not in the calibration statistics), so the
    main job and the shipped plans pick the family by running each candidate. The uncached reference is
    generated once; each candidate is scored by its mean per-image PSNR (:class:`Validation`).

    Args:
        driver: a :class:`cachec.loading.Driver` for the plans' model.
        candidates: ``{name: loaded Plan}`` (same sampler settings), at least one.
        conditions, seeds: validation conditions and seeds (disjoint from calibration and evaluation).
        batch_size: samples per sampling call.
        validation: a :class:`Validation` of these conditions and seeds to reuse (its reference is sampled
            once for several choices); ``driver``, ``conditions``, ``seeds`` and ``batch_size`` are then unused.
    Returns:
        ``(best_name, {name: psnr_db})``; ties go to the first candidate in ``candidates`` order.
    Raises:
        ValueError: no candidates, or candidates with different steps/guidance.
    """
    if not candidates:
        raise ValueError("choose_plan needs at least one candidate plan")
    settings = {(p.sampler.steps, p.sampler.guidance.scale) for p in candidates.values()}
    if len(settings) != 1:
        raise ValueError(f"candidate plans have different (steps, guidance): {sorted(settings)}")
    if validation is None:
        validation = Validation(driver, conditions, seeds, *settings.pop(), batch_size=batch_size)
    scores = {name: validation.score(plan) for name, plan in candidates.items()}
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


def validation_set(driver, per_class: int = 3, seed: int = VALIDATION_SEED) -> tuple[list, list[int]]:
    """Validation conditions and seeds of the closed-loop plan choice: every class ``per_class`` times, or
    for a model with its own prompt sets its calibration prompts cycled to ``10·per_class`` samples (held-in
    prompts, new seeds); seeds ``seed + i`` (``VALIDATION_SEED`` ≤ seed < ``EVAL_SEED``).

    Raises:
        ValueError: a text model without prompt sets (give validation prompts instead).
    """
    if driver.condition_kind == "prompt" and driver.prompt_sets.get("calibration"):
        conds = spread(driver.prompt_sets["calibration"], 10 * per_class)
        return conds, [seed + i for i in range(len(conds))]
    return held_out(driver, per_class, seed)
