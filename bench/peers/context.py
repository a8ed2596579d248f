"""diffusers' cache context for a transformer whose pipeline does not open one, and the hook session.

``DigitsPipeline`` does not open ``transformer.cache_context(...)`` (only diffusers' own pipelines do), so
:class:`CacheContextWrapper` wraps the transformer's forward and runs every call inside
``cache_context(name, step_index=, num_inference_steps=, timestep=, sigma=)``. :class:`HookSession`
applies diffusers hooks fresh around each ``generate`` call and removes them after it."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .core import BenchContext, Session


def _scheduler_sigma(scheduler, index: int, timestep: float) -> float | None:
    """Flow-matching noise level in [0, 1] of plan step ``index`` (see the module docstring)."""
    sig = getattr(scheduler, "sigmas", None)
    if sig is not None and "FlowMatch" in type(scheduler).__name__ and index < len(sig):
        return float(sig[index])
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        return None
    t = int(round(timestep))
    t = min(max(t, 0), len(ac) - 1)
    a = math.sqrt(float(ac[t]))
    s = math.sqrt(max(0.0, 1.0 - float(ac[t])))
    return s / (a + s) if a + s > 0 else None


def _swap_halves(x):
    if torch.is_tensor(x) and x.ndim >= 1 and x.shape[0] % 2 == 0 and x.shape[0] > 0:
        h = x.shape[0] // 2
        return torch.cat([x[h:], x[:h]])
    return x


def hook_target(driver) -> torch.nn.Module:
    """The module diffusers' hooks are applied to: ``driver.transformer``, or for a transformer driven by a
    ControlNet (the control reference model, :class:`cachec.pipeline_control.ControlledFluxTransformer`) its
    generator ``.transformer`` — where diffusers' FLUX ControlNet pipeline users apply them
    (``pipe.transformer``); the ControlNet then runs uncached every step."""
    tr = driver.transformer
    inner = getattr(tr, "transformer", None)
    if getattr(tr, "controlnet", None) is not None and isinstance(inner, torch.nn.Module):
        return inner
    return tr


class CacheContextWrapper:
    """Runs every call of the hooked transformer (:func:`hook_target`) inside ``transformer.cache_context(...)``.

    Installed *after* the diffusers hooks (it wraps the outermost ``forward``) and removed before them.
    ``DiTTransformer2DModel`` is not a ``CacheMixin``; the context is set with ``CacheMixin.cache_context``
    called on it, which is exactly what the mixin's method does on models that have it.

    Args:
        driver: the loaded model.
        steps: sampling steps S (passed as ``num_inference_steps``).
        cfg: ``"batched"`` (one call per step, context ``"cond_uncond"``), ``"split"`` (``"cond"`` then
            ``"uncond"``) or ``"none"`` (``"cond"``).
        uncond_first: present the batched CFG call to the model as ``[uncond, cond]`` (diffusers'
            convention that FasterCache assumes) and swap the output back.

    Attributes:
        current_timestep: timestep of the call in progress (for ``current_timestep_callback``).
        contexts: (name, step_index) of every call of the current run, in order.
    """

    def __init__(self, driver, steps: int, cfg: str = "batched", uncond_first: bool = False):
        self.driver = driver
        self.transformer = hook_target(driver)
        self.steps = int(steps)
        self.cfg = cfg
        self.uncond_first = uncond_first
        self.current_timestep: float | None = None
        self.step_index: int | None = None
        self._calls_at_step = 0
        self._scale: float | None = None  # scheduler timestep / transformer timestep, fixed at a run's first call
        self._orig = None
        self._had_attr = False
        self.contexts: list[tuple[str, int]] = []

    def get_timestep(self) -> float:
        return -1.0 if self.current_timestep is None else self.current_timestep

    def install(self) -> None:
        tr = self.transformer
        self._had_attr = "forward" in tr.__dict__
        self._orig = tr.forward

        def forward(*args, **kwargs):
            return self._call(*args, **kwargs)

        tr.forward = forward
        self.step_index = None
        self._scale = None
        self.contexts = []

    def remove(self) -> None:
        tr = self.transformer
        if self._orig is None:
            return
        if self._had_attr:
            tr.forward = self._orig
        else:
            tr.__dict__.pop("forward", None)
        self._orig = None

    def _call(self, *args, **kwargs):
        from diffusers.models.cache_utils import CacheMixin

        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        tval = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        sched = self.driver.scheduler
        raw = torch.as_tensor(sched.timesteps).float()
        if self._scale is None and raw.numel():
            # fixed at a run's first call (step 0): FLUX-style transformers receive the scheduler timestep / 1000.
            # Deciding per call by the nearer match fails where a late scheduler timestep equals an early
            # divided one (digits-mmdit: the last timestep is 1.0, step 0 receives 1000 / 1000 = 1.0)
            self._scale = 1000.0 if abs(float(raw[0]) / 1000.0 - tval) < abs(float(raw[0]) - tval) else 1.0
        ts = raw / (self._scale or 1.0)
        idx = int(torch.argmin((ts - tval).abs())) if ts.numel() else 0
        if idx == self.step_index:
            self._calls_at_step += 1
        else:
            self.step_index, self._calls_at_step = idx, 0
        if self.cfg == "batched":
            name = "cond_uncond"
        elif self.cfg == "split":
            name = ("cond", "uncond")[min(self._calls_at_step, 1)]
        else:
            name = "cond"
        sigma = _scheduler_sigma(sched, idx, tval)
        self.contexts.append((name, idx))
        if self.uncond_first:
            args = tuple(_swap_halves(a) for a in args)
            kwargs = {k: _swap_halves(v) for k, v in kwargs.items()}
        # what diffusers pipelines expose as current_timestep: the scheduler's timestep (FLUX: 1000x the call's)
        self.current_timestep = float(raw[idx]) if raw.numel() else tval
        with CacheMixin.cache_context(
            self.transformer, name, step_index=idx, num_inference_steps=self.steps, timestep=tval, sigma=sigma
        ):
            out = self._orig(*args, **kwargs)
        if self.uncond_first:
            if hasattr(out, "sample"):
                out.sample = _swap_halves(out.sample)
            elif isinstance(out, tuple):
                out = (_swap_halves(out[0]), *out[1:])
            else:
                out = _swap_halves(out)
        return out


def remove_diffusers_hooks(module: torch.nn.Module) -> None:
    """Remove every diffusers hook registry under ``module`` and restore the original ``forward``s."""
    for m in module.modules():
        reg = m.__dict__.get("_diffusers_hook")
        if reg is None:
            continue
        for name in list(reversed(reg._hook_order)):
            reg.remove_hook(name, recurse=False)
        del m.__dict__["_diffusers_hook"]
        f = m.__dict__.get("forward")
        if f is not None and getattr(f, "__func__", None) is type(m).forward and getattr(f, "__self__", None) is m:
            del m.__dict__["forward"]


def _invalidate(transformer) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


class HookSession(Session):
    """diffusers hooks, applied fresh around each ``generate`` call, with the cache-context wrapper."""

    def __init__(self, ctx: BenchContext, apply_fn: Callable[[torch.nn.Module, CacheContextWrapper], None],
                 uncond_first: bool = False, cfg: str = "batched") -> None:
        super().__init__()
        self.ctx = ctx
        self.apply_fn = apply_fn
        self.wrapper = CacheContextWrapper(ctx.driver, ctx.steps, cfg=cfg, uncond_first=uncond_first)
        self.stdout = ""
        self._active = False

    def begin(self) -> None:
        tr = hook_target(self.ctx.driver)
        remove_diffusers_hooks(tr)
        self.apply_fn(tr, self.wrapper)
        _invalidate(tr)
        self.wrapper.install()
        self._active = True

    def end(self) -> None:
        if not self._active:
            return
        self._active = False
        tr = hook_target(self.ctx.driver)
        try:
            self.wrapper.remove()
        finally:
            remove_diffusers_hooks(tr)

    def close(self) -> None:
        self.end()
