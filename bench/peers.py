"""One adapter per caching method that ``bench/compare.py`` puts side by side at matched realised FLOPs.

Every method is run through the same call, :meth:`cachec.loading.Driver.generate`, on the same model,
conditions and seeds; what differs is what is installed on the transformer (or pipeline) around that call.
The benchmark never trusts a method's own account of what it skipped: it counts FLOPs over the whole
``generate`` call (:func:`cachec.runtime.flops.count_flops`).

Methods (``all_methods``), by group:

- **cachec**: plans solved by :mod:`cachec.planner` from a calibration the benchmark makes itself
  (:func:`cachec.calibrate.run.calibrate` on its own conditions and seeds), executed by
  :func:`cachec.runtime.apply`. Line ``cachec`` is the shipped procedure (every schedule family solved and
  refined along its own cached trajectory, the plan closest to uncached sampling on validation seeds kept, as
  ``cachec compile`` does); lines ``cachec (free | step | group family)`` show each family alone, unrefined.
- **planner baselines**: FORA (interval N), EOC as published (FORA + α = 0.01), GOC as published (FORA +
  λ = 1.2 with the inflection gate), built by the same planner and run by the same runtime.
- **diffusers 0.42.1 hooks** (``diffusers.hooks.apply_*`` on the transformer): FirstBlockCache,
  PyramidAttentionBroadcast, TaylorSeerCache, MagCache, FasterCache, SeaCache. Our ``DigitsPipeline`` does
  not open ``transformer.cache_context(...)`` (only diffusers' own pipelines do), so
  :class:`CacheContextWrapper` wraps the transformer's forward and runs every call inside
  ``cache_context(name, step_index=, num_inference_steps=, timestep=, sigma=)``: name ``"cond_uncond"``
  for the batched classifier-free-guidance call (diffusers' LTX convention), ``"cond"``/``"uncond"`` in
  call order for split guidance. Hooks are applied fresh for every ``generate`` call and removed after it,
  so no state (e.g. FirstBlockCache's residual) leaks between batches or runs.
- **cache-dit** (PyPI ``cache-dit``, optional): DBCache F1B0, with and without its TaylorSeer calibrator,
  through cache-dit's own ``BlockAdapter`` for ``DiTTransformer2DModel`` (pattern 3 + ``DiTPatchFunctor``).
  When the package is missing the methods report ``cache-dit is not installed`` instead of running.

Adapter choices made so that each peer works on our DiT as its authors intend (all recorded in the
results next to each operating point):

- TaylorSeerCache's default identifiers (``^transformer_blocks.*attn``, ``re.fullmatch``) match no module of
  ``DiTTransformer2DModel`` (its attention is ``attn1``), so the default is a silent no-op. It is measured
  once as a diagnostic line; the swept line passes ``cache_identifiers`` for ``attn1`` and ``ff`` of every
  block and float32 Taylor factors (the CPU has no bf16).
- FasterCache assumes the batched CFG call holds ``[uncond, cond]`` and splits only the kwargs it names;
  our pipeline puts the conditional half first and passes ``class_labels``. The wrapper presents the batch
  as ``[uncond, cond]`` (and swaps the output back) and ``class_labels`` is added to the split kwargs;
  ``tensor_format="BCHW"``.
- SeaCache needs the visual latents of the call (``raw_vision_callback``, shapes (C, T, H, W)): the
  adapter returns each sample of ``hidden_states`` as (C, 1, H, W). Its ``sigma`` is the flow-matching
  noise level: the scheduler's sigma for flow models; for DDPM/DDIM models the equivalent
  ``√(1−ᾱ) / (√ᾱ + √(1−ᾱ))``. The default configuration without that callback is measured once as a
  diagnostic line (it runs fail-open).
- MagCache's ratios come from its own calibrate mode run on the benchmark's calibration conditions and
  seeds; the ratios it prints are parsed from stdout and averaged over the calibration batches.
- PyramidAttentionBroadcast and FasterCache get ``current_timestep_callback`` from the wrapper.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "BenchContext",
    "CacheContextWrapper",
    "Method",
    "Session",
    "all_methods",
    "cache_dit_status",
    "leftover_state",
    "remove_diffusers_hooks",
    "short_error",
]


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters), for tables."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_location(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``exc``."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    fr = tb[-1]
    return f"{fr.filename}:{fr.lineno} in {fr.name}"


# ------------------------------------------------------------------------------------------ context


@dataclass
class BenchContext:
    """What the methods need to know about one benchmark configuration (model + sampler).

    Attributes:
        driver: the loaded model (:func:`cachec.loading.load_model`).
        steps: sampling steps S.
        guidance: classifier-free guidance scale.
        calib_conditions, calib_seeds: the calibration samples (disjoint from the evaluation seeds); used by
            cachec's calibration and by MagCache's calibrate mode.
        workdir: scratch folder (calibration file, plans).
        batch_size: samples per ``generate`` call.
        sensitivity: cachec calibration sensitivity method (``full`` | ``factored`` | ``none``).
        sensitivity_samples: samples of cachec's sensitivity probes.
        validation_per_class: validation samples per class of cachec's closed-loop family choice.
        refine: trajectory refinements per family of cachec's plan search.
        log: progress printer.
        cache: per-configuration results shared between methods (the calibration file, MagCache ratios).
    """

    driver: Any
    steps: int
    guidance: float
    calib_conditions: list
    calib_seeds: list
    workdir: str
    batch_size: int = 10
    sensitivity: str = "factored"
    sensitivity_samples: int = 4
    validation_per_class: int = 2
    refine: int = 1
    log: Callable[[str], None] = print
    cache: dict = field(default_factory=dict)

    def generate(self, conditions: Sequence, seeds: Sequence[int]) -> torch.Tensor:
        return self.driver.generate(conditions, seeds, steps=self.steps, guidance=self.guidance)

    def calib_batches(self) -> list[tuple[list, list]]:
        bs = self.batch_size
        c, s = list(self.calib_conditions), list(self.calib_seeds)
        return [(c[i : i + bs], s[i : i + bs]) for i in range(0, len(c), bs)]


# ------------------------------------------------------------------------ diffusers cache context


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


class CacheContextWrapper:
    """Runs every call of ``driver.transformer`` inside ``transformer.cache_context(...)``.

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
        self.transformer = driver.transformer
        self.steps = int(steps)
        self.cfg = cfg
        self.uncond_first = uncond_first
        self.current_timestep: float | None = None
        self.step_index: int | None = None
        self._calls_at_step = 0
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
        ts = torch.as_tensor(sched.timesteps).float()
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
        self.current_timestep = tval
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


def leftover_state(driver) -> list[str]:
    """Anything a method left installed on the model or pipeline class (empty list: clean)."""
    problems = []
    for name, m in driver.transformer.named_modules():
        where = name or "<transformer>"
        reg = m.__dict__.get("_diffusers_hook")
        if reg is not None and reg.hooks:
            problems.append(f"{where}: diffusers hooks {list(reg.hooks)}")
        if "forward" in m.__dict__:
            problems.append(f"{where}: forward is patched")
        if m._forward_hooks or m._forward_pre_hooks:
            problems.append(f"{where}: torch forward hooks remain")
    cls = type(driver.pipe)
    if "_original_call" in cls.__dict__ or cls.__dict__.get("_is_cached"):
        problems.append(f"{cls.__name__}.__call__ is still patched (cache-dit)")
    return problems


# ------------------------------------------------------------------------------------ sessions


class Session:
    """One operating point of a method, installed on the model.

    ``begin()``/``end()`` bracket every ``generate`` call (hooks that keep per-run state are applied fresh
    there); ``close()`` removes whatever the session installed. ``info`` holds facts for the results
    (e.g. a plan's own FLOPs claim).
    """

    info: dict

    def __init__(self) -> None:
        self.info = {}

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass


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
        tr = self.ctx.driver.transformer
        remove_diffusers_hooks(tr)
        self.apply_fn(tr, self.wrapper)
        _invalidate(tr)
        self.wrapper.install()
        self._active = True

    def end(self) -> None:
        if not self._active:
            return
        self._active = False
        tr = self.ctx.driver.transformer
        try:
            self.wrapper.remove()
        finally:
            remove_diffusers_hooks(tr)

    def close(self) -> None:
        self.end()


class PlanSession(Session):
    """A cachec plan (or planner baseline) applied with :func:`cachec.runtime.apply` for the whole point."""

    def __init__(self, ctx: BenchContext, plan: dict, sidecar: dict, path: Path) -> None:
        super().__init__()
        from cachec.runtime import apply, load_plan
        from cachec.runtime.plan import parse_plan, write_plan

        write_plan(parse_plan(plan), path, sidecar or None)
        self.handle = apply(ctx.driver, load_plan(path))
        self.info = {
            "plan_file": path.name,
            "plan_realised_claim": plan["budget"]["realised"],
            "plan_target": plan["budget"]["target"],
            "predicted_error": plan.get("predicted_error"),
            "history": plan.get("history"),
            "plan_options": plan["budget"].get("options"),
        }

    def end(self) -> None:
        rep = self.handle.report
        if rep is not None:
            self.info["runtime_flops_fraction_last_run"] = rep.flops_fraction
            self.info["runtime_skipped_last_run"] = rep.skipped
            self.info["runtime_forced_last_run"] = rep.forced

    def close(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------- methods


class Method:
    """A caching method and its operating points.

    Attributes:
        name: the line in the table and the plot.
        group: ``cachec`` | ``planner baseline`` | ``diffusers`` | ``cache-dit``.
        knob: what the sweep parameter is.
        adaptive: a threshold method (the benchmark extends/bisects its parameter until the realised FLOPs
            bracket each target budget); larger parameter = fewer FLOPs.
        diagnostic: a configuration measured on the first batch only to show it does nothing (no-op).
        settings: fixed configuration facts reported with the results.
    """

    name = ""
    group = ""
    knob = ""
    adaptive = False
    diagnostic = False

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def prepare(self, ctx: BenchContext) -> None:
        """One-time work per configuration (calibration, imports). Raising marks every point failed."""

    def grid(self, ctx: BenchContext, quick: bool = False) -> list:
        """Initial operating points."""
        raise NotImplementedError

    def label(self, p) -> str:
        return f"{self.knob}={p:.4g}" if isinstance(p, float) else f"{self.knob}={p}"

    def session(self, ctx: BenchContext, p) -> Session:
        raise NotImplementedError

    # adaptive search (only for ``adaptive`` methods)
    def more(self, p: float) -> float:
        """A more aggressive parameter than ``p``."""
        return p * 2.0

    def less(self, p: float) -> float:
        """A less aggressive parameter than ``p``."""
        return p / 2.0

    def between(self, a: float, b: float) -> float:
        return math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2


# ---- cachec and the planner baselines


def ensure_calibration(ctx: BenchContext) -> Path:
    """cachec's calibration of this configuration (made once, on the calibration conditions and seeds)."""
    if "calibration" in ctx.cache:
        if isinstance(ctx.cache["calibration"], BaseException):
            raise ctx.cache["calibration"]
        return ctx.cache["calibration"]
    import time

    from cachec.calibrate.run import calibrate

    conds, seeds = list(ctx.calib_conditions), list(ctx.calib_seeds)
    # calibrate() takes conditions + samples_per_condition and seeds seed+n; the benchmark's calibration set
    # is every condition once per seed block, so pass the conditions in sample order with spc = 1.
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError("calibration seeds must be consecutive")
    out = Path(ctx.workdir) / f"calibration_{ctx.steps}steps.safetensors"
    t = time.perf_counter()
    try:
        path = calibrate(
            ctx.driver, conds, output=out, samples_per_condition=1, steps=ctx.steps, guidance=ctx.guidance,
            seed=int(seeds[0]), batch_size=ctx.batch_size, sensitivity=ctx.sensitivity,
            sensitivity_samples=ctx.sensitivity_samples, progress=False, restart=True,
        )
    except Exception as exc:
        ctx.cache["calibration"] = exc
        raise
    ctx.cache["calibration_seconds"] = time.perf_counter() - t
    ctx.cache["calibration"] = Path(path)
    ctx.log(f"    cachec calibration: {len(conds)} samples, sensitivity={ctx.sensitivity}, "
            f"{ctx.cache['calibration_seconds']:.1f} s -> {path}")
    return Path(path)


def _planner(ctx: BenchContext):
    if "planner" not in ctx.cache:
        from cachec.planner import Planner, load_calibration

        ctx.cache["planner"] = Planner(load_calibration(str(ensure_calibration(ctx))))
    return ctx.cache["planner"]


def choose_family(ctx: BenchContext, planner, budget: float, path: Path) -> tuple[dict, dict, dict]:
    """cachec's shipped procedure (``cachec compile``): solve every schedule family, refine each
    ``ctx.refine`` times along its own cached trajectory (:mod:`cachec.refine`, on the calibration samples),
    keep the plan closest to uncached sampling on validation seeds (``VALIDATION_SEED``, disjoint from the
    calibration and evaluation seeds).

    Returns:
        ``(plan, sidecar, {"chosen", "refine", "validation_psnr_db", "validation_images"})``.
    """
    from cachec.evaluation import VALIDATION_SEED, held_out
    from cachec.planner import FAMILIES
    from cachec.refine import choose, refined_plans

    if "validation" not in ctx.cache:
        ctx.cache["validation"] = held_out(ctx.driver, ctx.validation_per_class, VALIDATION_SEED)
    vconds, vseeds = ctx.cache["validation"]
    calib = ensure_calibration(ctx)  # the file ``planner`` was loaded from
    opts = dict(conditions=list(ctx.calib_conditions), samples_per_condition=1, steps=ctx.steps, guidance=ctx.guidance,
                seed=int(ctx.calib_seeds[0]), batch_size=ctx.batch_size)
    cands = []
    for fam in FAMILIES:
        cands += refined_plans(ctx.driver, calib, budget, family=fam, iterations=ctx.refine,
                               workdir=path.parent / f"{path.stem}-candidates", calibrate_options=opts, planner=planner)
    best = choose(ctx.driver, cands, vconds, vseeds)
    return dict(best.plan_dict), best.sidecar, {
        "chosen": best.family, "refine": best.iteration,
        "validation_psnr_db": {c.name: c.validation_psnr for c in cands}, "validation_images": len(vconds),
    }


class PlanMethod(Method):
    """A plan built by :mod:`cachec.planner` (``method``) and executed by :mod:`cachec.runtime`."""

    group = "cachec"

    def __init__(self, name: str, method: str, budgets: Sequence[float] = (), intervals: Sequence[int] = (),
                 quick_points: Sequence = (), choose_family: bool = False, **options) -> None:
        super().__init__()
        self.choose_family = choose_family
        self.name = name
        self.method = method
        self.budgets = list(budgets)
        self.intervals = list(intervals)
        self.quick_points = list(quick_points)
        self.options = options
        self.knob = "budget" if budgets else "interval N"
        if method != "cachec":
            self.group = "planner baseline"
        self.settings = {"planner_method": method, **options}
        if choose_family:
            self.settings["family"] = ("free/step/group, each refined along its own trajectory, chosen closed-loop on "
                                       "validation seeds (as cachec compile does)")

    def prepare(self, ctx: BenchContext) -> None:
        _planner(ctx)

    def grid(self, ctx: BenchContext, quick: bool = False) -> list:
        if quick and self.quick_points:
            return list(self.quick_points)
        if self.budgets:
            return list(self.budgets)
        return [n for n in self.intervals if n < ctx.steps]

    def label(self, p) -> str:
        return f"budget {p:.0%}" if self.budgets else f"N={p}"

    def session(self, ctx: BenchContext, p) -> Session:
        planner = _planner(ctx)
        tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.name}-{p}").strip("-")
        path = Path(ctx.workdir) / f"plan_{ctx.steps}_{tag}.yaml"
        if self.choose_family:
            plan, side, choice = choose_family(ctx, planner, float(p), path)
            session = PlanSession(ctx, plan, side, path)
            session.info["family_choice"] = choice
            return session
        if self.budgets:
            plan, side = planner.plan(float(p), self.method, **self.options)
        else:
            plan, side = planner.plan(None, self.method, interval=int(p), **self.options)
        return PlanSession(ctx, plan, side, path)


# ---- diffusers hooks


class FirstBlockCacheMethod(Method):
    name = "FirstBlockCache"
    group = "diffusers"
    knob = "threshold"
    adaptive = True

    def grid(self, ctx, quick=False):
        return [0.05, 0.2] if quick else [0.1, 0.25, 0.5]

    def session(self, ctx, p):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        return HookSession(ctx, lambda tr, w: apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=float(p))))


class PABMethod(Method):
    """PyramidAttentionBroadcast: reuse self-attention outputs every N calls inside a timestep range."""

    name = "PyramidAttentionBroadcast"
    group = "diffusers"
    knob = "skip range N, timestep range"

    def grid(self, ctx, quick=False):
        if quick:
            return [(2, (100, 800))]
        return [(2, (100, 800)), (4, (-1, 1001))]

    def label(self, p):
        n, rng = p
        return f"N={n}, t in ({rng[0]}, {rng[1]})"

    def session(self, ctx, p):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        n, rng = p

        def apply(tr, w):
            cfg = PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(n),
                spatial_attention_timestep_skip_range=tuple(rng),
                current_timestep_callback=w.get_timestep,
            )
            apply_pyramid_attention_broadcast(tr, cfg)

        return HookSession(ctx, apply)


DIT_TAYLOR_IDENTIFIERS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


class TaylorSeerMethod(Method):
    group = "diffusers"
    knob = "cache_interval"

    def __init__(self, default_identifiers: bool = False) -> None:
        super().__init__()
        self.default_identifiers = default_identifiers
        if default_identifiers:
            self.name = "TaylorSeerCache (default identifiers)"
            self.diagnostic = True
            self.settings = {"cache_identifiers": None, "max_order": 1, "disable_cache_before_step": 3,
                             "taylor_factors_dtype": "float32"}
        else:
            self.name = "TaylorSeerCache"
            self.settings = {"cache_identifiers": DIT_TAYLOR_IDENTIFIERS, "max_order": 1,
                             "disable_cache_before_step": 3, "taylor_factors_dtype": "float32"}

    def grid(self, ctx, quick=False):
        if self.default_identifiers:
            return [5]
        return [3] if quick else [2, 3, 5, 8]

    def session(self, ctx, p):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        ids = None if self.default_identifiers else list(DIT_TAYLOR_IDENTIFIERS)

        def apply(tr, w):
            cfg = TaylorSeerCacheConfig(cache_interval=int(p), disable_cache_before_step=3, max_order=1,
                                        taylor_factors_dtype=torch.float32, cache_identifiers=ids)
            apply_taylorseer_cache(tr, cfg)

        s = HookSession(ctx, apply)
        return s


def parse_magcache_ratios(text: str) -> list[list[float]]:
    """Every ratio list that MagCache's calibrate mode printed in ``text`` (one per completed run)."""
    runs = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "[MagCache] Calibration Complete" in line:
            for nxt in lines[i + 1 :]:
                if nxt.strip():
                    runs.append([float(x) for x in ast.literal_eval(nxt.strip())])
                    break
    return runs


def magcache_calibrate(ctx: BenchContext) -> list[float]:
    """MagCache ratios from its calibrate mode on the calibration batches (elementwise mean over batches).

    Raises:
        RuntimeError: nothing parseable was printed, or the lists have a wrong length.
    """
    if "magcache_ratios" in ctx.cache:
        return ctx.cache["magcache_ratios"]
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    sess = HookSession(ctx, lambda tr, w: apply_mag_cache(
        tr, MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps)))
    buf = io.StringIO()
    try:
        for conds, seeds in ctx.calib_batches():
            sess.begin()
            try:
                with contextlib.redirect_stdout(buf):
                    ctx.generate(conds, seeds)
            finally:
                sess.end()
    finally:
        sess.close()
    runs = parse_magcache_ratios(buf.getvalue())
    if not runs:
        raise RuntimeError(f"MagCache calibrate mode printed no ratios (stdout: {buf.getvalue()[:200]!r})")
    bad = [len(r) for r in runs if len(r) != ctx.steps]
    if bad:
        raise RuntimeError(f"MagCache printed {bad[0]} ratios for {ctx.steps} steps")
    ratios = [sum(col) / len(col) for col in zip(*runs)]
    ctx.cache["magcache_ratios"] = ratios
    ctx.cache["magcache_calibration_runs"] = len(runs)
    return ratios


class MagCacheMethod(Method):
    group = "diffusers"
    knob = "threshold"
    adaptive = True

    def __init__(self, max_skip_steps: int = 3, retention_ratio: float = 0.2, name: str | None = None) -> None:
        super().__init__()
        self.max_skip_steps = max_skip_steps
        self.retention_ratio = retention_ratio
        self.name = name or "MagCache"
        self.settings = {"max_skip_steps": max_skip_steps, "retention_ratio": retention_ratio}

    def prepare(self, ctx):
        ratios = magcache_calibrate(ctx)
        self.settings["mag_ratios"] = [round(r, 5) for r in ratios]
        self.settings["calibration_runs"] = ctx.cache.get("magcache_calibration_runs")

    def grid(self, ctx, quick=False):
        if quick:
            return [0.06, 0.24]
        return [0.06, 0.2] if self.max_skip_steps <= 3 else [0.1, 0.3]

    def session(self, ctx, p):
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        ratios = magcache_calibrate(ctx)

        def apply(tr, w):
            cfg = MagCacheConfig(threshold=float(p), max_skip_steps=self.max_skip_steps,
                                 retention_ratio=self.retention_ratio, num_inference_steps=ctx.steps,
                                 mag_ratios=list(ratios))
            apply_mag_cache(tr, cfg)

        return HookSession(ctx, apply)


class FasterCacheMethod(Method):
    name = "FasterCache"
    group = "diffusers"
    knob = "attention skip N, uncond skip M"

    def __init__(self) -> None:
        super().__init__()
        self.settings = {"tensor_format": "BCHW", "uncond_first": True,
                         "split_kwargs": ["hidden_states", "timestep", "class_labels"],
                         "timestep ranges": "defaults (attention (-1, 681), uncond (-1, 641))"}

    def grid(self, ctx, quick=False):
        return [(2, 5)] if quick else [(2, 5), (4, 2)]

    def label(self, p):
        return f"N={p[0]}, M={p[1]}"

    def session(self, ctx, p):
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        n, m = p

        def apply(tr, w):
            cfg = FasterCacheConfig(
                spatial_attention_block_skip_range=int(n),
                unconditional_batch_skip_range=int(m),
                current_timestep_callback=w.get_timestep,
                tensor_format="BCHW",
                _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"],
            )
            with contextlib.redirect_stderr(io.StringIO()):
                apply_faster_cache(tr, cfg)

        return HookSession(ctx, apply, uncond_first=True)


def dit_raw_vision(module, args, kwargs):
    """SeaCache adapter for DiT: each sample of ``hidden_states`` (N, C, H, W) as a (C, 1, H, W) latent."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not torch.is_tensor(x) or x.ndim != 4:
        return None
    return [s.unsqueeze(1) for s in x.unbind(0)]


class SeaCacheMethod(Method):
    group = "diffusers"
    knob = "threshold"
    adaptive = True

    def __init__(self, adapter: bool = True, max_consecutive_cached: int = 2, name: str | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.max_consecutive_cached = max_consecutive_cached
        if adapter:
            self.name = name or "SeaCache"
            self.settings = {"raw_vision_callback": "hidden_states as (C, 1, H, W)",
                             "max_consecutive_cached": max_consecutive_cached}
        else:
            self.name = "SeaCache (built-in adapters)"
            self.diagnostic = True
            self.adaptive = False
            self.settings = {"raw_vision_callback": None}

    def grid(self, ctx, quick=False):
        if not self.adapter:
            return [0.25]
        if quick:
            return [0.1, 0.5]
        return [0.1, 0.3] if self.max_consecutive_cached else [0.3, 0.8]

    def session(self, ctx, p):
        from diffusers.hooks import SeaCacheConfig, apply_sea_cache

        def apply(tr, w):
            kw = dict(threshold=float(p), max_consecutive_cached=self.max_consecutive_cached)
            if self.adapter:
                kw["raw_vision_callback"] = dit_raw_vision
            apply_sea_cache(tr, SeaCacheConfig(**kw))

        return HookSession(ctx, apply)


# ---- cache-dit


def cache_dit_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import importlib.metadata as md

        version = md.version("cache-dit")
    except Exception:
        return False, "cache-dit is not installed (pip install cache-dit)"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import cache_dit  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, f"cache-dit {version} does not import: {short_error(exc)}"
    return True, version


class CacheDitSession(Session):
    def __init__(self, ctx: BenchContext, threshold: float, taylorseer: bool, fn: int, bn: int, warmup: int) -> None:
        super().__init__()
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        self.ctx = ctx
        self.cache_dit = cache_dit
        tr = ctx.driver.transformer
        # cache-dit's DiTPatchFunctor replaces the transformer's forward and registers an alias submodule
        # (``_norm1_emb``) that ``disable_cache`` leaves behind: remember the state to restore it exactly.
        self._dict_keys = set(tr.__dict__)
        self._module_keys = set(tr._modules)
        self.adapter = BlockAdapter(
            pipe=ctx.driver.pipe, transformer=tr, blocks=tr.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(), check_forward_pattern=True,
        )
        cfg = DBCacheConfig(
            Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=float(threshold),
            max_warmup_steps=warmup, num_inference_steps=ctx.steps, enable_separate_cfg=False,
        )
        cal = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        self._enabled = True
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(self.adapter, cache_config=cfg, calibrator_config=cal)

    def close(self) -> None:
        if not self._enabled:
            return
        self._enabled = False
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.cache_dit.disable_cache(self.adapter)
        finally:
            tr = self.ctx.driver.transformer
            for key in set(tr._modules) - self._module_keys:
                del tr._modules[key]
            for key in set(tr.__dict__) - self._dict_keys:
                del tr.__dict__[key]


class CacheDitMethod(Method):
    group = "cache-dit"
    knob = "residual_diff_threshold"
    adaptive = True

    def __init__(self, taylorseer: bool = False, fn: int = 1, bn: int = 0) -> None:
        super().__init__()
        self.taylorseer = taylorseer
        self.fn, self.bn = fn, bn
        self.name = f"cache-dit DBCache F{fn}B{bn}" + (" + TaylorSeer" if taylorseer else "")
        self.settings = {"Fn_compute_blocks": fn, "Bn_compute_blocks": bn, "enable_separate_cfg": False,
                         "taylorseer_order": 1 if taylorseer else None,
                         "max_warmup_steps": "ceil(0.15 * steps)"}

    def warmup(self, ctx) -> int:
        return max(1, math.ceil(0.15 * ctx.steps))

    def prepare(self, ctx):
        ok, msg = cache_dit_status()
        if not ok:
            raise RuntimeError(msg)
        self.settings["cache_dit_version"] = msg
        self.settings["max_warmup_steps"] = self.warmup(ctx)

    def grid(self, ctx, quick=False):
        return [0.08, 0.32] if quick else [0.1, 0.3]

    def session(self, ctx, p):
        return CacheDitSession(ctx, float(p), self.taylorseer, self.fn, self.bn, self.warmup(ctx))


# ------------------------------------------------------------------------------------- registry


def all_methods(steps: int, quick: bool = False, only: Sequence[str] | None = None,
                families: bool = False) -> list[Method]:
    """Every method of the comparison, in table order.

    Args:
        steps: sampling steps (FORA intervals and plan budgets do not depend on it; kept for symmetry).
        quick: fewer operating points (smoke run).
        only: keep methods whose name contains one of these strings (case-insensitive).
        families: also one line per cachec schedule family (free, step, group) without the closed-loop choice.
    """
    intervals = [2, 3, 4, 5]
    methods: list[Method] = [
        PlanMethod("cachec", "cachec", budgets=[0.25, 0.4, 0.6], quick_points=[0.25, 0.4, 0.6], choose_family=True),
    ]
    if families:
        methods += [PlanMethod(f"cachec ({fam} family)", "cachec", budgets=[0.25, 0.4, 0.6], quick_points=[0.4], family=fam)
                    for fam in ("free", "step", "group")]
    methods += [
        PlanMethod("FORA", "fora", intervals=intervals, quick_points=[2, 4]),
        PlanMethod("EOC (paper)", "eoc-paper", intervals=intervals[:3], quick_points=[2, 4]),
        PlanMethod("GOC (paper)", "goc-paper", intervals=intervals[:3], quick_points=[2, 4]),
        FirstBlockCacheMethod(),
        PABMethod(),
        TaylorSeerMethod(default_identifiers=False),
        TaylorSeerMethod(default_identifiers=True),
        MagCacheMethod(),
        MagCacheMethod(max_skip_steps=8, retention_ratio=0.1, name="MagCache (K=8, retention 0.1)"),
        FasterCacheMethod(),
        SeaCacheMethod(),
        SeaCacheMethod(max_consecutive_cached=0, name="SeaCache (no consecutive limit)"),
        SeaCacheMethod(adapter=False),
        CacheDitMethod(taylorseer=False),
        CacheDitMethod(taylorseer=True),
    ]
    if only:
        keys = [o.lower() for o in only]
        methods = [m for m in methods if any(k in m.name.lower() for k in keys)]
    return methods
