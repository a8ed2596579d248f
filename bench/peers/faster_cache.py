"""diffusers' FasterCache (``diffusers.hooks.apply_faster_cache``).

FasterCache assumes the batched CFG call holds ``[uncond, cond]`` and splits only the kwargs it names; the
wrapper presents our ``[cond, uncond]`` batch swapped (and swaps the output back) and ``class_labels`` is
added to the split kwargs."""

from __future__ import annotations

import contextlib
import io

from .context import HookSession
from .core import Method


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
