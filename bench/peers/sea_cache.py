"""diffusers' SeaCache (``diffusers.hooks.apply_sea_cache``), with a DiT adapter for its visual latents."""

from __future__ import annotations

import torch

from .context import HookSession
from .core import Method


def dit_raw_vision(module, args, kwargs):
    """SeaCache adapter: each sample of ``hidden_states`` as a (C, 1, H, W) latent — DiT's (N, C, H, W) as is,
    FLUX-style packed tokens (N, L, C) with a square token grid L = h·w as (C, 1, h, w)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if torch.is_tensor(x) and x.ndim == 3:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            return None
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
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
