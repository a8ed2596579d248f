"""diffusers' PyramidAttentionBroadcast (``diffusers.hooks.apply_pyramid_attention_broadcast``)."""

from __future__ import annotations

from .context import HookSession
from .core import Method


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
