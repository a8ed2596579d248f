"""diffusers' FirstBlockCache (``diffusers.hooks.apply_first_block_cache``)."""

from __future__ import annotations

from .context import HookSession
from .core import Method


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
