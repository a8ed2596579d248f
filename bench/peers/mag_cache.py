"""diffusers' MagCache (``diffusers.hooks.apply_mag_cache``), with ratios from its own calibrate mode
run on the benchmark's calibration conditions and seeds (parsed from stdout, averaged over batches)."""

from __future__ import annotations

import ast
import contextlib
import io

from .context import HookSession
from .core import BenchContext, Method


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
