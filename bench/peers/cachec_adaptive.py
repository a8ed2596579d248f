"""cachec's SoftCap adaptive mode (issue 15, docs/softcap.md) as a benchmark line, and the static plan solved at
exactly an adaptive point's realised FLOPs.

Line ``cachec SoftCap`` at ceiling ``c`` (a fraction of the uncached FLOPs): the base plan is solved by the
planner at ``c − headroom`` with the schedule family and predictor set that cachec's plan search chose at
budget ``c`` (the ``cachec`` line's point, or the stored choice when the line is added to an existing result,
``bench/compare.py --add``), without trajectory refinement; the threshold profile is calibrated on the probe
seeds (600000+, never evaluation seeds); every image is its own sampling call (``call_batch = 1``: per-image
decisions). Its realised FLOPs are input-dependent, never above ``c`` (the hard guard).

Line ``cachec static (at SoftCap's FLOPs)``: the same family and predictors solved at a given budget (the
adaptive point's realised fraction), run statically; :func:`bench.compare_configs.confirm_adaptive` pairs the two
on the same images.
"""

from __future__ import annotations

from pathlib import Path

from .cachec_plans import PlanSession, _planner, plan_path
from .core import BenchContext, Method, Session

#: the base plan of a SoftCap point lies this far (fraction of uncached FLOPs) under its ceiling
HEADROOM = 0.05


def chosen_options(ctx: BenchContext, budget: float) -> dict:
    """The planner options (``family`` + :func:`cachec.refine.replan_options`, without the warm-up ``interval``
    and step ``mask``, which the planner fits to each budget) of cachec's plan-search choice at ``budget``: from the ``cachec`` line of this run (``ctx.cache[("chosen plan", budget)]``) or from a stored
    result (``ctx.cache[("chosen options", budget)]``, the point's ``info.plan_options``).

    Raises:
        KeyError: neither is there (run the ``cachec`` line first, or add to a result that has it).
    """
    from cachec.refine import replan_options

    key = round(float(budget), 6)
    stored = ctx.cache.get(("chosen plan", float(budget)))
    if stored is not None:
        options = dict(stored[0].budget.options)
    elif ("chosen options", key) in ctx.cache:
        options = dict(ctx.cache[("chosen options", key)])
    else:
        raise KeyError(f"no cachec plan choice at {budget:.0%} in this run: run the 'cachec' line first "
                       "(or add the SoftCap line to a result that has it: bench/compare.py --add FILE)")
    out = {"family": options.get("family", "free"), **replan_options(options)}
    # the shape of a peer-shaped family (warm-up interval, step mask) was fitted to ``budget``: at another
    # budget the planner fits it again
    out.pop("interval", None)
    out.pop("mask", None)
    return out


class SoftCapSession(Session):
    """A static base plan applied in SoftCap mode; ``end()`` records every sampling run's realised fraction and
    Full steps (``info["runs"]``)."""

    call_batch = 1

    def __init__(self, ctx: BenchContext, plan, sidecar: dict, path: Path, ceiling: float, mode: str) -> None:
        super().__init__()
        from cachec.evaluation_adaptive import adaptive_options
        from cachec.runtime import apply, load_plan, write_plan
        from cachec.runtime.adaptive import AdaptiveOptions

        write_plan(plan, path, sidecar or None)
        loaded = load_plan(path)
        self.options = adaptive_options(ctx.driver, loaded, AdaptiveOptions(mode=mode, ceiling=float(ceiling)))
        self.handle = apply(ctx.driver, loaded, adaptive=self.options)
        self.runs: list[dict] = []
        self.info = {"plan_file": path.name, "base_budget": plan.budget.target, "base_realised": plan.budget.realised,
                     "plan_options": plan.budget.options, "ceiling": float(ceiling), "mode": mode,
                     "profile": self.options.profile.as_dict()}

    def end(self) -> None:
        rep = self.handle.report
        if rep is not None:
            self.runs.append({"flops_fraction": rep.flops_fraction, "full_steps": len(rep.full_steps),
                              "decisions": "".join(rep.decisions)})
            fr = [r["flops_fraction"] for r in self.runs]
            self.info.update(runs=len(self.runs), run_flops_fraction_max=max(fr),
                             run_flops_fraction_mean=sum(fr) / len(fr),
                             full_steps_mean=sum(r["full_steps"] for r in self.runs) / len(self.runs),
                             decisions=[r["decisions"] for r in self.runs])

    def close(self) -> None:
        self.handle.remove()


class SoftCapMethod(Method):
    """cachec's adaptive mode at FLOP ceilings (see the module docstring)."""

    group = "cachec"
    knob = "ceiling"
    adaptive = True  # input-dependent compute (docs/softcap.md)
    bisect = False  # the ceiling is the operating point: no threshold search

    def __init__(self, ceilings=(0.25, 0.40, 0.60), mode: str = "softcap", headroom: float = HEADROOM,
                 name: str = "cachec SoftCap") -> None:
        super().__init__()
        self.name = name
        self.ceilings = list(ceilings)
        self.mode = mode
        self.headroom = float(headroom)
        self.settings = {"mode": mode, "base": f"cachec's chosen family and predictors at the ceiling, solved at "
                         f"ceiling - {headroom:.0%} without refinement", "call_batch": 1,
                         "probe": "AdaptiveOptions defaults (4 samples, seeds 600000+)"}

    def grid(self, ctx: BenchContext, quick: bool = False) -> list:
        return list(self.ceilings[1:2] if quick else self.ceilings)

    def label(self, p) -> str:
        return f"ceiling {float(p):.0%}"

    def base_plan(self, ctx: BenchContext, ceiling: float):
        """``(plan, sidecar)`` of the base plan at ``ceiling − headroom``."""
        key = ("softcap base", float(ceiling))
        if key not in ctx.cache:
            ctx.cache[key] = _planner(ctx).plan(float(ceiling) - self.headroom, "cachec",
                                                **chosen_options(ctx, ceiling))
        return ctx.cache[key]

    def session(self, ctx: BenchContext, p) -> Session:
        plan, side = self.base_plan(ctx, float(p))
        return SoftCapSession(ctx, plan, side, plan_path(ctx, f"{self.name}-{p}"), float(p), self.mode)


class MatchedStaticMethod(Method):
    """The static plan of cachec's chosen family and predictors at ``ceiling`` solved at a given budget (an
    adaptive point's realised fraction); param ``(ceiling, budget)``."""

    group = "cachec"
    knob = "budget"
    name = "cachec static (at SoftCap's FLOPs)"

    def label(self, p) -> str:
        return f"budget {float(p[1]):.2%} (family of {float(p[0]):.0%})"

    def session(self, ctx: BenchContext, p) -> Session:
        ceiling, budget = float(p[0]), float(p[1])
        plan, side = _planner(ctx).plan(budget, "cachec", **chosen_options(ctx, ceiling))
        return PlanSession(ctx, plan, side, plan_path(ctx, f"static-{ceiling}-{budget:.4f}"))
