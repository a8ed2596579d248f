"""``apply(pipe, plan)``: run an ordinary pipeline under a cache plan (module ``handle``: a submodule named
``apply`` would shadow the function ``cachec.runtime.apply``).

>>> handle = apply(pipe, "plan.yaml")          # a diffusers pipeline, a cachec Driver or a transformer
>>> images = pipe(prompt, num_inference_steps=25).images
>>> handle.report.flops_fraction               # what the last run spent, relative to uncached
>>> handle.remove()                            # or: with apply(pipe, plan): ...

``torch.compile``: compile the transformer as usual (``pipe.transformer = torch.compile(pipe.transformer,
fullgraph=True)``), before or after applying. The step is resolved in eager Python in forward hooks that
torch.compile never traces (``torch.compiler.disable``): applied to the compiled wrapper they sit outside
the graph; compiled after :func:`apply`, dynamo runs them eagerly and traces only the unit wrappers. The unit
decisions the graph reads are a tuple of booleans and coefficient tensors, so the transformer recompiles
once per distinct step pattern of the plan (which units are skipped, with how many coefficients, with or
without EOC: ``handle.executor.step_signatures()``); a plan with P patterns compiles P graphs per input
shape. :func:`apply` on a compiled transformer raises ``torch._dynamo.config.recompile_limit`` (and the older
``cache_size_limit``) to at least P + 8 so those compilations are not cut off; set it higher yourself if
other code compiles the same function for other shapes (or when compiling after :func:`apply`).

Checks at every run, not only at :func:`apply`: the run's timestep sequence, guidance branches and scale
(:mod:`cachec.runtime.executor`), and the weights: a change after :func:`apply` (``load_state_dict``, a fused
LoRA, in-place edits; :class:`~cachec.runtime.fingerprint.WeightWatch`) is checked against the plan's
fingerprint before the next run, with the same :class:`PlanMismatchError` as at :func:`apply` unless
``force``.
"""

from __future__ import annotations

import functools
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from .executor import PlanExecutor, RunReport
from .fingerprint import WeightWatch, weights_fingerprint
from .hooks import HookHandle, install
from .plan import Plan, load_plan
from .registry import spec_for_transformer
from .units import units_by_name, unwrap

_HANDLE_ATTR = "_cachec_plan_handle"


class PlanMismatchError(ValueError):
    """The plan was made for another model (class, weights or units)."""


@dataclass
class _Target:
    transformer: Any
    scheduler: Any | None
    holder: Any | None  # the pipeline (or Driver) whose .transformer is hooked


def _resolve(target) -> _Target:
    import torch

    pipe = getattr(target, "pipe", None)  # cachec Driver
    if pipe is not None and getattr(pipe, "transformer", None) is not None:
        return _Target(pipe.transformer, getattr(pipe, "scheduler", None), pipe)
    if isinstance(target, torch.nn.Module):
        return _Target(target, None, None)
    transformer = getattr(target, "transformer", None)
    if transformer is not None:
        return _Target(transformer, getattr(target, "scheduler", None), target)
    raise TypeError(
        f"apply() needs a diffusers pipeline with a transformer, a cachec Driver or a transformer module; "
        f"got {type(target).__name__}"
    )


class CacheHandle:
    """A plan applied to a transformer.

    Attributes:
        plan: the applied :class:`Plan`.
        transformer: the hooked transformer (as given, possibly compiled).
        executor: the :class:`~cachec.runtime.executor.PlanExecutor`.
    """

    def __init__(self, plan: Plan, transformer, executor: PlanExecutor, hooks: HookHandle, scheduler=None):
        self.plan = plan
        self.transformer = transformer
        self.executor = executor
        self._hooks = hooks
        self._scheduler = scheduler
        self._removed = False
        self._undo = executor.install(transformer) if hasattr(executor, "install") else None  # adaptive extras
        if scheduler is not None:
            original = scheduler.set_timesteps
            self._own_set_timesteps = scheduler.__dict__.get("set_timesteps")  # another instance patch, kept

            # wraps: pipelines inspect set_timesteps' signature (e.g. whether it accepts `sigmas`)
            @functools.wraps(original)
            def set_timesteps(*args, **kwargs):
                executor.new_run()
                return original(*args, **kwargs)

            scheduler.set_timesteps = set_timesteps

    @property
    def reports(self) -> list[RunReport]:
        """One :class:`RunReport` per sampling run since the plan was applied (the last one may be running)."""
        return self.executor.reports

    @property
    def report(self) -> RunReport | None:
        """The report of the most recent run (None before the first transformer call)."""
        return self.executor.reports[-1] if self.executor.reports else None

    @property
    def removed(self) -> bool:
        return self._removed

    def remove(self) -> None:
        """Restore the transformer (and the scheduler) exactly; idempotent."""
        if self._removed:
            return
        self._hooks.remove()
        if self._undo is not None:
            self._undo()
        if self._scheduler is not None:
            if self._own_set_timesteps is None:
                self._scheduler.__dict__.pop("set_timesteps", None)
            else:
                self._scheduler.set_timesteps = self._own_set_timesteps
        model = unwrap(self.transformer)
        if model.__dict__.get(_HANDLE_ATTR) is self:
            del model.__dict__[_HANDLE_ATTR]
        self._removed = True

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"<CacheHandle {state}: {len(self.plan.units)} units, {self.plan.steps} steps, {len(self.reports)} runs>"


def _raise_recompile_limit(patterns: int) -> None:
    import torch._dynamo.config as cfg

    want = patterns + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < want:
            setattr(cfg, name, want)


def apply(target, plan: Plan | str | os.PathLike, *, force: bool = False, remap: str = "error",
          adaptive=None) -> CacheHandle:
    """Make ``target``'s transformer follow ``plan`` in every later sampling run.

    Args:
        target: a diffusers pipeline with a ``transformer`` (``DiTPipeline``, ``PixArtSigmaPipeline``,
            ``StableDiffusion3Pipeline``, ``FluxPipeline``, ...), a :class:`cachec.loading.Driver`, or the
            transformer module itself (possibly ``torch.compile``-d). With a pipeline or Driver, each call of
            its ``scheduler.set_timesteps`` marks the start of a new run.
        plan: a :class:`Plan` or the path of a plan YAML.
        force: apply even if the weight fingerprint differs from the plan's (a warning instead of an error;
            e.g. after fusing a LoRA you know the plan still suits).
        remap: what to do with a timestep that is not in the plan's schedule: ``"error"`` (default),
            ``"nearest"`` (follow the nearest plan step) or ``"off"`` (compute such runs in full, one warning).
        adaptive: None (the static plan), or the SoftCap adaptive mode (docs/softcap.md): ``True``,
            ``"softcap"``, ``"speca"``, a dict of fields or a :class:`cachec.runtime.adaptive.AdaptiveOptions`.
            Without a calibrated ``profile`` one is calibrated first on a short probe run (``target`` must then
            be a cachec Driver). The run report is then an :class:`~cachec.runtime.adaptive.AdaptiveRunReport`.

    Returns:
        A :class:`CacheHandle` (``.remove()``, context manager, ``.report``, ``.reports``).

    Raises:
        UnsupportedModelError: the transformer class has no unit registry entry.
        PlanMismatchError: the plan is for another transformer class, its fingerprint differs (without
            ``force``), it names units the model does not have, or its units cover 0 FLOPs.
        RuntimeError: a plan is already applied to this transformer (remove it first).
        PlanError: the plan file is invalid.
    """
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    tgt = _resolve(target)
    transformer = tgt.transformer
    model = unwrap(transformer)
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and not existing.removed:
        raise RuntimeError(f"a cache plan is already applied to this {type(model).__name__}: call .remove() on its handle first")
    if adaptive is not None:
        adaptive = _adaptive_options(target, plan, adaptive)
    executor, units = plan_executor(transformer, plan, force=force, remap=remap, run_signal=tgt.scheduler is not None,
                                    warn_stacklevel=3, holder=tgt.holder, adaptive=adaptive)
    if transformer is not model:  # torch.compile wrapper
        _raise_recompile_limit(len(set(executor.step_signatures())))
    hooks = install(transformer, units, executor)
    handle = CacheHandle(plan, transformer, executor, hooks, tgt.scheduler)
    model.__dict__[_HANDLE_ATTR] = handle
    return handle


def _adaptive_options(target, plan: Plan, adaptive):
    """The adaptive options with a calibrated profile (calibrated on ``target``, a Driver, when missing)."""
    from dataclasses import replace

    from .adaptive_calibrate import calibrate_profile, resolve_options

    options = resolve_options(adaptive)
    if options.profile is None:
        if not (hasattr(target, "generate") and hasattr(target, "pipe")):
            raise TypeError("adaptive mode without a profile calibrates one on a probe run: pass a cachec Driver, "
                            "or a profile (cachec.runtime.adaptive_calibrate.calibrate_profile)")
        options = replace(options, profile=calibrate_profile(target, plan, options))
    return options


def _check_weights(model, plan: Plan, force: bool, stacklevel: int) -> None:
    """Compare the model's weight fingerprint with the plan's (:func:`weights_fingerprint`: the same for
    float32, bfloat16 and float64 loads of one checkpoint, on any device; a float16 load of a float32
    checkpoint differs, and the message says so when the model holds float16 weights).

    Raises:
        PlanMismatchError: they differ and ``force`` is False (with ``force``: a RuntimeWarning).
    """
    import torch

    fingerprint = weights_fingerprint(model)
    if fingerprint == plan.model.fingerprint:
        return
    cls = type(model).__name__
    half = any(p.dtype == torch.float16 for p in model.parameters())
    message = (
        f"the plan was made for other weights (plan fingerprint {plan.model.fingerprint[:19]}…, this "
        f"{cls} has {fingerprint[:19]}…"
        + ("; its weights are float16, and a float16 load of a float32 checkpoint has its own fingerprint: "
           "load it in bfloat16/float32 or calibrate on the float16 model" if half else "")
        + ")"
    )
    if not force:
        raise PlanMismatchError(message + "; make a plan for these weights, or pass force=True (cachec run --force) to use it anyway")
    warnings.warn(message + "; applying it anyway (force=True)", RuntimeWarning, stacklevel=stacklevel + 1)


def call_argument(holder, name: str):
    """The value of argument ``name`` of ``holder.__call__`` while that call is running (None otherwise).

    diffusers pipelines keep ``guidance_scale`` local to ``__call__`` (DiTPipeline, PixArt), so the plan
    executor reads it from the running call's frame, once per sampling run. Real numbers, numpy scalars and one-element tensors (bool is not a number).
    """
    frame = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "__call__" and name in code.co_varnames and frame.f_locals.get("self") is holder:
            value = frame.f_locals.get(name)
            if hasattr(value, "numel") and value.numel() == 1:  # a one-element tensor
                value = value.item()
            elif hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                return None
            return float(value)
        frame = frame.f_back
    return None


def plan_executor(transformer, plan: Plan, *, force: bool = False, remap: str = "error",
                  run_signal: bool = False, warn_stacklevel: int = 2, holder=None,
                  adaptive=None) -> tuple[PlanExecutor, list]:
    """Check that ``plan`` fits ``transformer`` and build its executor (without installing hooks).

    :func:`apply` installs the executor as the units' handler; calibration along a plan
    (:func:`cachec.calibrate.calibrate` with ``along=``) pairs it with its recorder.

    Args:
        transformer: the transformer module (possibly ``torch.compile``-d).
        plan: a loaded :class:`Plan`.
        force, remap: as :func:`apply`.
        run_signal: runs are started by the caller (``executor.new_run()``), not only detected from steps.
        holder: the pipeline whose ``__call__`` drives the transformer (its ``guidance_scale`` is checked
            against the plan's at each run), or None.
        adaptive: None, or :class:`cachec.runtime.adaptive.AdaptiveOptions` with a profile (an
            :class:`~cachec.runtime.adaptive.AdaptiveExecutor` is built).
    Returns:
        ``(executor, unit specs in plan order)``.
    Raises:
        UnsupportedModelError, PlanMismatchError: as :func:`apply`.
    """
    model = unwrap(transformer)
    model_units = units_by_name(transformer, [u.name for u in plan.units])  # attention maps when the plan has them
    cls = type(model).__name__
    if plan.model.cls != cls:
        raise PlanMismatchError(f"the plan is for a {plan.model.cls}, but the transformer is a {cls}")
    unknown = [u.name for u in plan.units if u.name not in model_units]
    if unknown:
        modules = dict(model.named_modules())
        detail = [f"{n} ({'not a cacheable unit' if n in modules else 'no such module'})" for n in unknown]
        raise PlanMismatchError(
            f"the plan names {len(unknown)} unit(s) this {cls} does not have: {', '.join(detail)}; "
            f"the model's units are {', '.join(list(model_units)[:8])}{' …' if len(model_units) > 8 else ''}"
        )
    if sum(u.flops for u in plan.units) <= 0:
        raise PlanMismatchError(
            "the plan's units cover 0 FLOPs, so it could not save anything; it was probably made from a FLOP "
            "count without attention/matmul FLOPs (count with sdpa_kernel(SDPBackend.MATH) on CPU)"
        )
    _check_weights(model, plan, force, warn_stacklevel + 1)
    watch = WeightWatch(model)

    def on_run_start() -> None:  # weights changed after apply(): the same check as at apply(), then a new reference
        if watch.changed():
            _check_weights(model, plan, force, 6)
            watch.refresh()

    units = [model_units[u.name] for u in plan.units]
    cls, extra = PlanExecutor, {}
    if adaptive is not None:
        from .adaptive import AdaptiveExecutor

        cls, extra = AdaptiveExecutor, {"options": adaptive}
    executor = cls(
        plan,
        units,
        transformer,
        **extra,
        remap=remap,
        eoc_tensors=plan.load_sidecar() if plan.eoc_keys() else None,
        run_signal=run_signal,
        guidance_scale=None if holder is None else functools.partial(call_argument, holder, "guidance_scale"),
        on_run_start=on_run_start,
        scale_is_cfg=spec_for_transformer(model).guidance_scale_is_cfg,
    )
    return executor, units


__all__ = ["apply", "CacheHandle", "PlanMismatchError"]
