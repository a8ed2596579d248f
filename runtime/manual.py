"""Hand-made plans: an all-compute plan for a model, and plans with hand-written actions.

- :func:`trace_run` records what a pipeline feeds its transformer (timesteps, calls per step, batch) with
  one real forward and cheap stand-ins for the other calls.
- :func:`full_plan` builds the 100 %-budget plan (every unit computed at every step), the base of manual
  plans and a bitwise no-op when applied.
- :func:`with_actions` derives a plan with other actions/compensations from a base plan, recomputing the
  realised FLOPs fraction.

No scipy here; torch is imported lazily by the functions that run the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from .plan import (
    COMPUTE,
    Budget,
    Compensation,
    Guidance,
    ModelInfo,
    Plan,
    Provenance,
    Sampler,
    UnitPlan,
    realised_fraction,
)
from .units import unwrap


@dataclass
class RunTrace:
    """What a sampling run feeds the transformer.

    Attributes:
        timesteps: the ``timestep`` value received at each step (first element of the batch), in order.
        calls_per_step: transformer calls at each step (2 for split CFG).
        batch: batch size of the first call (2·N for batched CFG with N samples).
        samples: N, the number of samples of the run.
        sigmas: the scheduler's sigmas after the run (first S values), or None.
        scheduler: scheduler class name.
        args, kwargs: the arguments of the first transformer call (tensors as passed).
    """

    timesteps: list[float]
    calls_per_step: list[int]
    batch: int
    samples: int
    sigmas: list[float] | None
    scheduler: str
    args: tuple
    kwargs: dict

    @property
    def guidance(self) -> tuple[str, int]:
        """``(mode, branches)``: split if a step has several calls, batched if the batch is 2·N, else none."""
        if max(self.calls_per_step) > 1:
            return "split", max(self.calls_per_step)
        if self.batch > self.samples and self.batch % self.samples == 0:
            return "batched", self.batch // self.samples
        return "none", 1


def _driver(target):
    if not hasattr(target, "generate") or not hasattr(target, "pipe"):
        raise TypeError(f"expected a cachec Driver (cachec.loading.load_model), got {type(target).__name__}")
    return target


def trace_run(
    driver,
    conditions: Sequence | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    cfg: str = "batched",
) -> RunTrace:
    """Run ``driver`` once with one real transformer forward and record the calls.

    Every transformer call after the first returns the first call's output (so the run costs one forward,
    the text encoders and the VAE decode); only the call arguments are recorded.

    Args:
        driver: a :class:`cachec.loading.Driver` whose transformer is not compiled.
        conditions: conditions for the run (default: one class label 0 or one short prompt).
        steps, guidance, cfg: as :meth:`Driver.generate`.

    Raises:
        TypeError: not a Driver. RuntimeError: the transformer is compiled or was never called.
    """
    import torch

    driver = _driver(driver)
    transformer = driver.transformer
    model = unwrap(transformer)
    if model is not transformer:
        raise RuntimeError("trace the run before torch.compile-ing the transformer (the stand-in forward is eager)")
    if conditions is None:
        conditions = [0] if driver.condition_kind == "class" else ["a photo"]
    calls: list[tuple[float, int]] = []
    first: dict[str, Any] = {}
    real_forward = model.forward
    import inspect

    from .hooks import timestep_of

    signature = inspect.signature(real_forward)

    def forward(*args, **kwargs):
        t = timestep_of(args, kwargs, signature)
        hs = kwargs.get("hidden_states", args[0] if args else None)
        calls.append((t, int(hs.shape[0])))
        if "out" not in first:
            first["args"], first["kwargs"] = args, dict(kwargs)
            first["out"] = real_forward(*args, **kwargs)
        return first["out"]

    own = model.__dict__.get("forward")  # an instance-level forward someone else installed, kept as is
    model.forward = forward
    try:
        driver.generate(list(conditions), list(range(len(conditions))), steps=steps, guidance=guidance, cfg=cfg)
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own
    if not calls:
        raise RuntimeError("the pipeline never called its transformer")
    timesteps: list[float] = []
    per_step: list[int] = []
    for t, _ in calls:
        # exactly the previous call's value: another call of the same step, as in calibration and plan
        # execution (cachec.runtime.hooks); same_timestep is for matching a recorded schedule, not this
        if timesteps and t == timesteps[-1]:
            per_step[-1] += 1
        else:
            timesteps.append(t)
            per_step.append(1)
    sigmas = getattr(driver.scheduler, "sigmas", None)
    if sigmas is not None:
        sigmas = [float(x) for x in torch.as_tensor(sigmas).reshape(-1)[: len(timesteps)]]
        if len(sigmas) != len(timesteps):
            sigmas = None
    return RunTrace(
        timesteps=timesteps,
        calls_per_step=per_step,
        batch=calls[0][1],
        samples=len(conditions),
        sigmas=sigmas,
        scheduler=type(driver.scheduler).__name__,
        args=first["args"],
        kwargs=first["kwargs"],
    )


def full_plan(
    target,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    cfg: str = "batched",
    conditions: Sequence | None = None,
    timesteps: Sequence[float] | None = None,
    example_inputs: dict | None = None,
    sigmas: Sequence[float] | None = None,
    scheduler: str | None = None,
    resolution: Sequence[int] | None = None,
    guidance_mode: tuple[str, int] = ("none", 1),
) -> Plan:
    """The 100 %-budget plan of a model: every registered unit computed at every step.

    With a :class:`cachec.loading.Driver` everything is measured with :func:`trace_run` (``steps``,
    ``guidance``, ``cfg``, ``conditions`` as :meth:`Driver.generate`). With a bare transformer pass
    ``timesteps`` (the values the transformer receives), ``example_inputs`` (keyword arguments of one
    forward, for the FLOP count), and optionally ``sigmas``, ``scheduler``, ``resolution``, ``guidance_mode``.

    Returns:
        A valid :class:`Plan` (``method: manual``, ``target = realised = 1.0``).

    Raises:
        UnsupportedModelError: unregistered transformer. ValueError: missing inputs for a bare transformer.
    """
    from cachec import __version__

    from .fingerprint import weights_fingerprint
    from .flops import unit_flops

    if hasattr(target, "generate") and hasattr(target, "pipe"):
        trace = trace_run(target, conditions=conditions, steps=steps, guidance=guidance, cfg=cfg)
        transformer = target.transformer
        unit_costs, total = unit_flops(transformer, trace.args, trace.kwargs)
        mode, branches = trace.guidance
        scale = float(target.default_guidance if guidance is None else guidance)
        sampler = Sampler(
            scheduler=trace.scheduler,
            steps=len(trace.timesteps),
            timesteps=trace.timesteps,
            sigmas=trace.sigmas,
            guidance=Guidance(mode, scale, branches),  # the scale the run used, as calibration records it
            resolution=[int(r) for r in target.resolution],
        )
    else:
        transformer = target
        if timesteps is None or example_inputs is None or resolution is None:
            raise ValueError("full_plan of a bare transformer needs timesteps=, example_inputs= and resolution=")
        unit_costs, total = unit_flops(transformer, (), example_inputs)
        mode, branches = guidance_mode
        sampler = Sampler(
            scheduler=scheduler or "unknown",
            steps=len(timesteps),
            timesteps=[float(t) for t in timesteps],
            sigmas=None if sigmas is None else [float(s) for s in sigmas],
            guidance=Guidance(mode, float(guidance or 1.0), int(branches)),
            resolution=[int(r) for r in resolution],
        )
    units = [UnitPlan(name, float(f), COMPUTE * sampler.steps, {}) for name, f in unit_costs.items()]
    fixed = max(total - sum(unit_costs.values()), 0.0)
    model = unwrap(transformer)
    return Plan(
        model=ModelInfo(type(model).__name__, weights_fingerprint(model), []),
        sampler=sampler,
        budget=Budget("manual", 1.0, 1.0, float(total), float(fixed), {}),
        predicted_error=None,
        history="computed",
        units=units,
        sidecar=None,
        provenance=Provenance(None, 0, 0, __version__, None),
    )


def with_actions(
    base: Plan,
    actions: dict[str, str],
    compensation: dict[str, dict[int, Sequence[float] | Compensation]] | None = None,
    *,
    history: str | None = None,
    method: str | None = None,
) -> Plan:
    """A copy of ``base`` with some units' actions and compensations replaced.

    Args:
        base: e.g. :func:`full_plan`.
        actions: ``{unit name: "CC.C…"}``.
        compensation: ``{unit name: {step: coeffs or Compensation}}``; a skipped step without an entry
            reuses the last computed output (``[1.0]``).
        history: ``"computed"``/``"used"`` (default: the base's).
        method: budget method (default: the base's).

    Returns:
        The new plan, validated, with ``budget.realised`` recomputed and ``budget.target`` set to it.

    Raises:
        KeyError: a unit not in ``base``. PlanError: the result violates the schema.
    """
    import yaml

    from .plan import dump_plan, parse_plan

    names = {u.name for u in base.units}
    unknown = set(actions) - names | set(compensation or {}) - names
    if unknown:
        raise KeyError(f"unit(s) {sorted(unknown)} are not in the base plan")
    units = []
    for u in base.units:
        acts = actions.get(u.name, u.actions)
        given = (compensation or {}).get(u.name, {})
        comp = {}
        for s, a in enumerate(acts):
            if a == COMPUTE:
                continue
            c = given.get(s, u.compensation.get(s, Compensation([1.0])))
            comp[s] = c if isinstance(c, Compensation) else Compensation([float(x) for x in c])
        units.append(UnitPlan(u.name, u.flops, acts, comp))
    b = base.budget
    realised = realised_fraction(units, base.steps, b.full_step_flops, b.fixed_step_flops)
    plan = replace(
        base,
        units=units,
        history=history or base.history,
        budget=replace(b, method=method or b.method, target=realised, realised=realised),
    )
    parsed = parse_plan(yaml.safe_load(dump_plan(plan)))  # full validation, canonical floats
    parsed.source = base.source
    return parsed
