"""One adapter per caching method that ``bench/compare.py`` puts side by side at matched realised FLOPs.

Every method is run through the same call, :meth:`cachec.loading.Driver.generate`, on the same model,
conditions and seeds; what differs is what is installed on the transformer (or pipeline) around that call.
The benchmark never trusts a method's own account of what it skipped: it counts FLOPs over the whole
``generate`` call (:func:`cachec.runtime.flops.count_flops`).

Methods (``all_methods``), by group:

- **cachec**: plans solved by :mod:`cachec.planner` from a calibration the benchmark makes itself
  (:func:`cachec.calibrate.run.calibrate` on its own conditions and seeds), executed by
  :func:`cachec.runtime.apply`. Line ``cachec`` is the shipped procedure (:func:`cachec.refine.search_plan`:
  every schedule family solved, the best refined along their own cached trajectories, the mask search, the
  predictor pass, the plan closest to uncached sampling on validation and confirmation seeds kept, as
  ``cachec compile`` does); lines ``cachec (free | step | group family)`` show each family alone, unrefined.
  Line ``cachec SoftCap`` is the adaptive runtime mode (docs/softcap.md) at FLOP ceilings 25/40/60 %, on a
  base plan of the chosen family 5 points under each ceiling, deciding per image
  (:mod:`bench.peers.cachec_adaptive`).
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

Layout (one flat module per technique, as diffusers' ``hooks/``): :mod:`bench.peers.core` (context,
sessions, the :class:`Method` interface), :mod:`bench.peers.context` (the cache-context wrapper and the hook
session), :mod:`bench.peers.cachec_plans`, :mod:`bench.peers.cachec_adaptive`, :mod:`bench.peers.first_block_cache`,
:mod:`bench.peers.pyramid_attention_broadcast`, :mod:`bench.peers.taylorseer_cache`,
:mod:`bench.peers.mag_cache`, :mod:`bench.peers.faster_cache`, :mod:`bench.peers.sea_cache`,
:mod:`bench.peers.cache_dit`; this package re-exports their names and holds the registry
(:func:`all_methods`).
"""

from __future__ import annotations

from typing import Sequence

from .cache_dit import CacheDitMethod, CacheDitSession, cache_dit_status
from .cachec_adaptive import MatchedStaticMethod, SoftCapMethod, SoftCapSession
from .cachec_plans import PlanMethod, PlanSession, choose_family, ensure_calibration
from .context import CacheContextWrapper, HookSession, hook_target, remove_diffusers_hooks
from .context import _scheduler_sigma  # noqa: F401  (tests check it)
from .core import BenchContext, Method, Session, error_location, leftover_state, short_error
from .faster_cache import FasterCacheMethod
from .first_block_cache import FirstBlockCacheMethod
from .mag_cache import MagCacheMethod, magcache_calibrate, parse_magcache_ratios
from .pyramid_attention_broadcast import PABMethod
from .sea_cache import SeaCacheMethod, dit_raw_vision
from .taylorseer_cache import DIT_TAYLOR_IDENTIFIERS, TaylorSeerMethod

__all__ = [
    "BenchContext",
    "CacheContextWrapper",
    "CacheDitMethod",
    "CacheDitSession",
    "DIT_TAYLOR_IDENTIFIERS",
    "FasterCacheMethod",
    "FirstBlockCacheMethod",
    "HookSession",
    "MagCacheMethod",
    "MatchedStaticMethod",
    "Method",
    "PABMethod",
    "PlanMethod",
    "PlanSession",
    "SeaCacheMethod",
    "Session",
    "SoftCapMethod",
    "SoftCapSession",
    "TaylorSeerMethod",
    "all_methods",
    "cache_dit_status",
    "choose_family",
    "dit_raw_vision",
    "ensure_calibration",
    "error_location",
    "hook_target",
    "leftover_state",
    "magcache_calibrate",
    "parse_magcache_ratios",
    "remove_diffusers_hooks",
    "short_error",
]


def all_methods(steps: int, quick: bool = False, only: Sequence[str] | None = None,
                families: bool = False, budgets: Sequence[float] | None = None) -> list[Method]:
    """Every method of the comparison, in table order.

    Args:
        steps: sampling steps (FORA intervals and plan budgets do not depend on it; kept for symmetry).
        quick: fewer operating points (smoke run).
        only: keep methods whose name contains one of these strings (case-insensitive; ``=name``: exactly that
            name).
        families: also one line per cachec schedule family (free, step, group) without the closed-loop choice.
        budgets: the ``cachec`` line's budgets (fractions; default 25/40/60 %, the table budgets).
    """
    intervals = [2, 3, 4, 5]
    methods: list[Method] = [
        PlanMethod("cachec", "cachec", budgets=list(budgets or [0.25, 0.4, 0.6]),
                   quick_points=list(budgets or [0.25, 0.4, 0.6]), choose_family=True),
        SoftCapMethod(),
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
        keys = [o.strip().lower() for o in only]
        methods = [m for m in methods if any(m.name.lower() == k[1:] if k.startswith("=") else k in m.name.lower()
                                             for k in keys)]
    return methods
