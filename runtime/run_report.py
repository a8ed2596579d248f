"""What one sampling run did under a plan: :class:`RunReport` (filled by
:class:`cachec.runtime.executor.PlanExecutor`; the adaptive executor's report extends it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunReport:
    """What one sampling run did under a plan.

    Attributes:
        run: run index (0-based) since the plan was applied.
        plan_steps: S, the plan's number of steps.
        steps: plan step of each runtime step seen, in order (-1: off-plan step).
        step_fractions: FLOPs of each runtime step relative to the same step uncached (mean over its calls,
            weighted by batch size).
        flops_fraction: FLOPs of the whole run relative to the same run uncached (from the plan's unit and
            fixed FLOPs and what actually ran).
        calls: transformer calls.
        computed: unit calls that ran their real computation.
        skipped: unit calls replaced by a prediction.
        compensated: skipped unit calls whose prediction is not plain reuse (coefficients other than
            ``[1.0]``, or an EOC correction).
        forced: unit calls the plan skips but that were computed because no history was available.
        off_plan_calls: calls computed in full because the run left the plan's timestep sequence
            (``remap="off"``).
        guidance_scale: the run's guidance scale as the caller reported it (None: unknown, e.g. a bare
            transformer was hooked).
        wall_time_s: seconds from the first call's start to the last call's end (CUDA synchronised at the
            end of the final plan step).
        complete: the final plan step was reached.
    """

    run: int
    plan_steps: int
    steps: list[int] = field(default_factory=list)
    step_fractions: list[float] = field(default_factory=list)
    flops_fraction: float = 0.0
    calls: int = 0
    computed: int = 0
    skipped: int = 0
    compensated: int = 0
    forced: int = 0
    off_plan_calls: int = 0
    guidance_scale: float | None = None
    wall_time_s: float = 0.0
    complete: bool = False
    # accumulators: (Σ batch·fraction, Σ batch) overall and for the current runtime step
    _acc: list[float] = field(default_factory=lambda: [0.0, 0.0], repr=False)
    _step_acc: list[float] = field(default_factory=lambda: [0.0, 0.0], repr=False)
    _t0: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict:
        """The public fields as a plain dict (for JSON reports)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
