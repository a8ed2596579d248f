"""diffusers' TaylorSeerCache (``diffusers.hooks.apply_taylorseer_cache``).

Its default identifiers (``^transformer_blocks.*attn``, ``re.fullmatch``) match no module of
``DiTTransformer2DModel`` (its attention is ``attn1``): the default is measured once as a diagnostic line,
the swept line names ``attn1`` and ``ff`` of every block (:data:`DIT_TAYLOR_IDENTIFIERS`)."""

from __future__ import annotations

import torch

from .context import HookSession, hook_target
from .core import Method


DIT_TAYLOR_IDENTIFIERS = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]
#: FLUX layout: every cacheable module of the dual blocks, attention and MLP input of the single blocks (their
#: output projection reads both, so it always runs)
FLUX_TAYLOR_IDENTIFIERS = [r"transformer_blocks\.\d+\.(attn|ff|ff_context)", r"single_transformer_blocks\.\d+\.(attn|proj_mlp)"]


def taylor_identifiers(transformer) -> list[str]:
    """The swept line's ``cache_identifiers`` for this transformer's block layout."""
    return list(FLUX_TAYLOR_IDENTIFIERS if hasattr(transformer, "single_transformer_blocks") else DIT_TAYLOR_IDENTIFIERS)


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

        ids = None if self.default_identifiers else taylor_identifiers(hook_target(ctx.driver))
        if ids is not None:
            self.settings["cache_identifiers"] = ids

        def apply(tr, w):
            cfg = TaylorSeerCacheConfig(cache_interval=int(p), disable_cache_before_step=3, max_order=1,
                                        taylor_factors_dtype=torch.float32, cache_identifiers=ids)
            apply_taylorseer_cache(tr, cfg)

        s = HookSession(ctx, apply)
        return s
