"""cache-dit's DBCache (PyPI ``cache-dit``, optional), with and without its TaylorSeer calibrator, through
cache-dit's own ``BlockAdapter`` for ``DiTTransformer2DModel`` (pattern 3 + ``DiTPatchFunctor``) or, for a
``FluxTransformer2DModel``, the blocks of cache-dit's Flux adapter (dual then single blocks, pattern 1). Without the
package the methods report ``cache-dit is not installed`` instead of running."""

from __future__ import annotations

import contextlib
import io
import math

from .core import BenchContext, Method, Session, short_error


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
        # (``_norm1_emb``) that ``disable_cache`` leaves behind, and enable/disable re-insert the block lists at
        # the end of the children (FLUX: single blocks before dual blocks, after norm_out), which changes what
        # ``named_children()`` order-dependent code sees (diffusers' SeaCache takes its leader and tail blocks
        # from it and ran every step in full after a cache-dit line): remember the state to restore it exactly.
        self._dict_keys = set(tr.__dict__)
        self._module_keys = set(tr._modules)
        self._module_order = list(tr._modules)
        if hasattr(tr, "single_transformer_blocks"):  # FLUX layout: cache-dit's own Flux adapter (pattern 1 twice)
            self.adapter = BlockAdapter(
                pipe=ctx.driver.pipe, transformer=tr, blocks=[tr.transformer_blocks, tr.single_transformer_blocks],
                forward_pattern=[ForwardPattern.Pattern_1, ForwardPattern.Pattern_1], check_forward_pattern=True,
            )
        else:
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
            children = dict(tr._modules)  # the original order first, anything else after it
            tr._modules.clear()
            tr._modules.update({k: children[k] for k in self._module_order if k in children})
            tr._modules.update({k: v for k, v in children.items() if k not in tr._modules})


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
