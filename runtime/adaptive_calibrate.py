"""Offline calibration of the adaptive mode's threshold profile (docs/softcap.md, "Calibration").

The observer's statistic (the first unit's input drift since the last refresh, or SpeCa's verify error)
depends on the plan's schedule, so its typical size per step is measured under the plan itself, on a short
probe run: P samples (default 4) on seeds in the validation range (600000+; calibration seeds lie below
500000, evaluation seeds start at 1000000), conditions spread over the classes (or the model's calibration
prompts). Two steps:

1. **shape**: one probe run that follows the static plan and only records the risk ``ρ̄_s`` of each step
   (batch mean over the probe's rows, as the runtime computes it);
2. **scale**: ``τ_ref,s(κ) = κ · m^(1−β) · ρ̄_s^β`` (m: mean of ``ρ̄_s`` over candidate steps), with κ found by
   bisection in log space (12 closed-loop probe runs with the PI controller off) as the smallest κ whose probe
   spends at most ``t = ceiling − headroom·(ceiling − plan realised)``. The probe's cumulative per-step spend
   at that κ is the reference profile ``R_s`` the PI controller tracks.

Ceiling 1 (or more): every step Full (τ = −1). Ceiling equal to the plan's realised fraction: never Full.
The calibration statistics of ``cachec calibrate`` are not used: they are not shipped with plans, and they
describe unit outputs along the uncached trajectory, not this observer's drift under the plan's schedule.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from .adaptive import MODES, AdaptiveOptions, AdaptiveProfile
from .plan import COMPUTE, Plan

BISECTION_STEPS = 12
KAPPA_RANGE = (1e-3, 1e3)


def resolve_options(adaptive) -> AdaptiveOptions:
    """``True`` (softcap defaults), a mode name, a dict of :class:`AdaptiveOptions` fields or the options.

    Raises:
        ValueError: an unknown mode. TypeError: another type.
    """
    if adaptive is True:
        return AdaptiveOptions()
    if isinstance(adaptive, str):
        if adaptive not in MODES:
            raise ValueError(f"adaptive mode must be one of {', '.join(MODES)}, got {adaptive!r}")
        return AdaptiveOptions(mode=adaptive)
    if isinstance(adaptive, dict):
        return AdaptiveOptions(**adaptive)
    if isinstance(adaptive, AdaptiveOptions):
        return adaptive
    raise TypeError(f"adaptive must be True, a mode name, a dict or AdaptiveOptions, got {type(adaptive).__name__}")


def step_floor(plan: Plan) -> list[float]:
    """Per step the plan's own cost, fraction of one uncached step: ``(fixed + Σ_u C[u,s]·flops_u) / full``."""
    b = plan.budget
    return [(b.fixed_step_flops + sum(u.flops for u in plan.units if u.actions[s] == COMPUTE)) / b.full_step_flops
            for s in range(plan.steps)]


def _cumulative(per_step: Sequence[float]) -> list[float]:
    out, acc, S = [], 0.0, len(per_step)
    for x in per_step:
        acc += x / S
        out.append(acc)
    return out


def probe_set(driver, n: int, seed: int, conditions: Sequence | None = None) -> tuple[list, list[int]]:
    """The probe's ``n`` conditions (default: spread over the classes, or the driver's ``calibration`` prompt
    set) and seeds ``seed + i``.

    Raises:
        ValueError: a prompt model without conditions or calibration prompts; n < 1.
    """
    if n < 1:
        raise ValueError(f"the adaptive probe needs at least one sample, got {n}")
    if conditions is None:
        if driver.condition_kind == "class":
            conditions = list(range(driver.num_classes))
        else:
            conditions = list((getattr(driver, "prompt_sets", None) or {}).get("calibration") or [])
            if not conditions:
                raise ValueError("the adaptive probe of a text model needs prompts (conditions=...)")
    conditions = list(conditions)
    k = len(conditions)
    return [conditions[i * k // n] for i in range(n)], [seed + i for i in range(n)]


def _probe(driver, plan: Plan, options: AdaptiveOptions, profile: AdaptiveProfile, conds, seeds,
           record_only: bool = False):
    """One probe run under ``profile`` (PI off); returns its :class:`AdaptiveRunReport`. Hooks are installed
    directly (not through :func:`cachec.runtime.apply`, which calls this module: the caller checked the
    plan against the model already)."""
    from .adaptive import AdaptiveExecutor
    from .hooks import install
    from .units import units_by_name

    cfg = "split" if plan.sampler.guidance.mode == "split" else "batched"
    # open loop: PI off and no ceiling guard (ceiling 1), so the spend falls monotonically with κ; a binding guard
    # would make a tiny κ look affordable by spending greedily on the first steps
    opts = replace(options, profile=profile, kp=0.0, ki=0.0, ceiling=1.0)
    transformer = driver.transformer
    by_name = units_by_name(transformer, [u.name for u in plan.units])
    units = [by_name[u.name] for u in plan.units]
    executor = AdaptiveExecutor(plan, units, transformer, opts,
                                eoc_tensors=plan.load_sidecar() if plan.eoc_keys() else None)
    executor.record_only = record_only
    hooks = install(transformer, units, executor)
    undo = executor.install(transformer)
    try:
        driver.generate(list(conds), list(seeds), steps=plan.steps, guidance=plan.sampler.guidance.scale, cfg=cfg)
    finally:
        undo()
        hooks.remove()
    return executor.reports[-1]


def calibrate_profile(driver, plan: Plan, options: AdaptiveOptions | None = None,
                      conditions: Sequence | None = None) -> AdaptiveProfile:
    """Calibrate the per-step reference thresholds and the reference compute profile (module docstring).

    Args:
        driver: a :class:`cachec.loading.Driver` of the plan's model (``generate`` is called).
        plan: the static reference plan.
        options: mode, ceiling, β, headroom and probe settings (default: softcap defaults).
        conditions: probe conditions (default: ``options.probe_conditions``, else :func:`probe_set`'s).

    Returns:
        An :class:`AdaptiveProfile` (``probe`` records seeds, conditions, κ's probe spend and the target).

    Raises:
        ValueError: as :meth:`AdaptiveOptions.resolved_ceiling` and :func:`probe_set`.
    """
    options = options or AdaptiveOptions()
    c, S, realised = options.resolved_ceiling(plan), plan.steps, plan.budget.realised
    floor = step_floor(plan)
    mode = options.mode
    if c >= 1.0 - 1e-9:
        return AdaptiveProfile(mode, c, [-1.0] * S, _cumulative([1.0] * S), 0.0, options.beta, [], {"rule": "ceiling 1: every step Full"})
    base = AdaptiveProfile(mode, c, [math.inf] * S, _cumulative(floor), math.inf, options.beta)
    if c <= realised + 1e-9:
        base.probe = {"rule": "ceiling at the plan's realised fraction: never Full"}
        return base
    if conditions is None and options.probe_conditions is not None:
        conditions = list(options.probe_conditions)
    conds, seeds = probe_set(driver, options.probe_samples, options.probe_seed, conditions)
    shape_rep = _probe(driver, plan, options, base, conds, seeds, record_only=True)
    shape = [float(r) if r is not None and t is not None else 0.0 for r, t in zip(shape_rep.risk, shape_rep.tau)]
    cand = [s for s in range(S) if shape_rep.tau[s] is not None]
    if not cand:
        base.probe = {"rule": "no candidate step (the plan computes every unit at every step after 0)"}
        return base
    m = max(sum(shape[s] for s in cand) / len(cand), 1e-30)
    beta = options.beta

    def taus(kappa: float) -> list[float]:
        return [kappa * m ** (1 - beta) * max(shape[s], 1e-30) ** beta if s in cand else math.inf for s in range(S)]

    target = c - options.headroom * (c - realised)

    def run(kappa: float):
        return _probe(driver, plan, options, replace(base, tau=taus(kappa), kappa=kappa, shape=shape), conds, seeds)

    lo, hi = math.log(KAPPA_RANGE[0]), math.log(KAPPA_RANGE[1])
    rep_lo = run(math.exp(lo))
    if rep_lo.flops_fraction <= target:
        kappa, rep = math.exp(lo), rep_lo
    else:
        rep = run(math.exp(hi))
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            r = run(math.exp(mid))
            if r.flops_fraction > target:
                lo = mid
            else:
                hi, rep = mid, r
        kappa = math.exp(hi)
    return AdaptiveProfile(
        mode, c, taus(kappa), _cumulative(rep.step_fractions), kappa, beta, shape,
        {"conditions": list(conds), "seeds": list(seeds), "target": target, "fraction": rep.flops_fraction,
         "full_steps": list(rep.full_steps)})


__all__ = ["calibrate_profile", "probe_set", "resolve_options", "step_floor"]
