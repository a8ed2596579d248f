"""Attention-map units at full width (issue 16): where they are offered, what they cost and save.

    python bench/bench_attention_map_scale.py [--threads 1] [--repeats 3] [--json FILE]

Random-weight transformers built from the published configs (:func:`cachec.shapes.transformer_config`;
nothing is downloaded):

1. **Offered or refused, and the FLOPs share.** Per family and resolution: the map of one attention per
   sample (heads × queries × keys, float32) against the calibration's limit
   (:data:`cachec.runtime.attention_maps.MAP_LIMIT_BYTES`), and the share of a transformer call's FLOPs that the
   maps hold (counted on fake tensors with ``torch.utils.flop_counter``, maps materialised; checked: each
   attention's count = its map's + the rest). DiT-XL/2 and PixArt-Σ at full depth; FLUX.1 with 2 double- and
   2 single-stream blocks (its 19 + 38 blocks are the same blocks repeated).
2. **Wall time at DiT-XL/2 size** (28 blocks, 256 tokens, batch 2 = one image with batched CFG): the
   uncached transformer call (SDPA) against the same call with every map materialised and computed
   (explicit softmax: the price of making maps reusable at all) and with every map reused from the
   previous call (the FLOPs a map unit saves), median of ``--repeats``, interleaved; with speed-up ÷ ideal
   (ideal = counted FLOPs ratio). Plus the time :func:`cachec.runtime.attention_maps.materialise` and
   ``remove`` take on the 28 attentions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachec.runtime import attention_maps  # noqa: E402
from cachec.runtime.attention_maps import MAP_LIMIT_BYTES  # noqa: E402
from cachec.runtime.flops import count_flops, relative_module_flops  # noqa: E402
from cachec.runtime.hooks import install  # noqa: E402
from cachec.runtime.io import atomic_write  # noqa: E402
from cachec.runtime.units import find_units  # noqa: E402
from cachec.shapes import transformer_config  # noqa: E402

#: (family, depth, single depth, resolution in pixels)
CASES = (("dit", 28, None, 256), ("pixart", 28, None, 512), ("pixart", 28, None, 1024),
         ("flux", 2, 2, 256), ("flux", 2, 2, 512), ("flux", 2, 2, 1024))


def build(family: str, depth: int, single: int | None, px: int):
    """``(transformer, call kwargs for batch 2)`` at full width, random weights."""
    import diffusers

    torch.manual_seed(0)
    if family == "flux":
        cfg = transformer_config("flux", depth, single_depth=single)
        model = diffusers.FluxTransformer2DModel(**cfg).eval()
        n_img, n_txt = (px // 16) ** 2, 512
        kw = dict(hidden_states=torch.zeros(2, n_img, cfg["in_channels"]),
                  encoder_hidden_states=torch.zeros(2, n_txt, cfg["joint_attention_dim"]),
                  pooled_projections=torch.zeros(2, cfg["pooled_projection_dim"]), timestep=torch.ones(2),
                  img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), guidance=torch.ones(2))
        return model, kw
    cfg = transformer_config(family, depth, sample_size=px // 8)
    cls = diffusers.DiTTransformer2DModel if family == "dit" else diffusers.PixArtTransformer2DModel
    model = cls(**cfg).eval()
    x = torch.zeros(2, cfg["in_channels"], px // 8, px // 8)
    if family == "dit":
        return model, dict(hidden_states=x, timestep=torch.ones(2, dtype=torch.long), class_labels=torch.zeros(2, dtype=torch.long))
    return model, dict(hidden_states=x, encoder_hidden_states=torch.zeros(2, 300, cfg["caption_channels"]),
                       timestep=torch.ones(2), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


class _Reuse:
    """A handler for map units only: compute (and keep) every map, or return the kept one."""

    def __init__(self, n: int):
        self.kept, self.reuse = [None] * n, False

    def begin_call(self, args, kwargs):
        pass

    def end_call(self):
        pass

    def should_compute(self, i):
        return not self.reuse

    def store(self, i, feature):
        self.kept[i] = feature

    def predict(self, i):
        return self.kept[i]


def share(family, depth, single, px) -> dict:
    """Part 1 for one case, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model, kw = build(family, depth, single, px)
    maps = [u for u in find_units(model, attention_maps=True) if u.kind == "attn_map"]
    handle = install(model, maps, _Reuse(len(maps)))
    attention_maps.MAP_LIMIT_BYTES = float("inf")  # counted on fake tensors also where the limit refuses maps
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            _, total, per_module = count_flops(model, **kw)
    finally:
        attention_maps.MAP_LIMIT_BYTES = MAP_LIMIT_BYTES
        handle.remove()
    rel = relative_module_flops(per_module, model)
    map_flops = sum(rel.get(u.name, 0) for u in maps)
    parent = maps[0].name.rsplit(".", 1)[0]
    heads = model.config.num_attention_heads
    n_q = {"flux": (px // 16) ** 2 + 512}.get(family, (px // 8 // 2) ** 2)
    per_sample = 4 * heads * n_q * n_q
    return {"family": family, "depth": depth, "single_depth": single, "resolution": px, "map_units": len(maps),
            "tokens": n_q, "map_mib_per_sample": per_sample / 2**20,
            "offered": per_sample <= MAP_LIMIT_BYTES, "map_flops_share": map_flops / total,
            "first_attention_map_share": rel.get(maps[0].name, 0) / max(rel.get(parent, 1), 1)}


def timing(repeats: int) -> dict:
    """Part 2: DiT-XL/2, real tensors, one thread per the caller's setting."""
    from cachec.runtime.attention_maps import map_paths, materialise

    model, kw = build("dit", 28, None, 256)
    kw = dict(kw, hidden_states=torch.randn(2, 4, 32, 32), class_labels=torch.tensor([3, 1000]))
    maps = [u for u in find_units(model, attention_maps=True) if u.kind == "attn_map"]
    t = time.perf_counter()
    h = materialise(model, map_paths(u.name for u in maps))
    t_mat = time.perf_counter() - t
    t = time.perf_counter()
    h.remove()
    t_rm = time.perf_counter() - t
    handler = _Reuse(len(maps))

    def call():
        with torch.no_grad():
            return model(**kw).sample

    times = {"uncached": [], "maps_computed": [], "maps_reused": []}
    with torch.no_grad():
        ref = call()
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times["uncached"].append(time.perf_counter() - t)
            hook = install(model, maps, handler)
            try:
                handler.reuse = False
                t = time.perf_counter()
                out = call()
                times["maps_computed"].append(time.perf_counter() - t)
                handler.reuse = True
                t = time.perf_counter()
                call()
                times["maps_reused"].append(time.perf_counter() - t)
            finally:
                hook.remove()
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    _, total, per_module = count_flops(model, **kw)
    hook = install(model, maps, handler)
    try:
        handler.reuse = False
        call()  # the maps to reuse (a fresh installation has none yet)
        handler.reuse = True
        _, reused, _ = count_flops(model, **kw)
    finally:
        hook.remove()
    ideal = total / reused
    return {"model": "DiT-XL/2 (28 blocks, 256 tokens, batch 2)", "threads": torch.get_num_threads(),
            "median_s": med, "max_abs_diff_maps_computed": float((out - ref).abs().max()),
            "computed_over_uncached": med["maps_computed"] / med["uncached"],
            "speedup_reused": med["uncached"] / med["maps_reused"], "ideal_speedup_reused": ideal,
            "speedup_over_ideal": (med["uncached"] / med["maps_reused"]) / ideal,
            "materialise_s": t_mat, "remove_s": t_rm}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {"limit_mib": MAP_LIMIT_BYTES / 2**20, "cases": []}
    for case in CASES:
        row = share(*case)
        out["cases"].append(row)
        print(f"{row['family']:6} {row['resolution']:5}px: {row['map_units']:3} maps, {row['tokens']:5} tokens, "
              f"{row['map_mib_per_sample']:8.1f} MiB/map/sample ({'offered' if row['offered'] else 'refused'}), "
              f"maps {100 * row['map_flops_share']:.1f} % of a call's FLOPs "
              f"({100 * row['first_attention_map_share']:.1f} % of its attention)", flush=True)
    out["dit_xl_timing"] = t = timing(args.repeats)
    print(f"DiT-XL/2 batch 2, {t['threads']} thread(s): uncached {t['median_s']['uncached']:.2f} s, maps computed "
          f"{t['median_s']['maps_computed']:.2f} s ({t['computed_over_uncached']:.3f}x, max |d| "
          f"{t['max_abs_diff_maps_computed']:.1e}), maps reused {t['median_s']['maps_reused']:.2f} s: speed-up "
          f"{t['speedup_reused']:.3f}x of ideal {t['ideal_speedup_reused']:.3f}x ({t['speedup_over_ideal']:.2f}); "
          f"materialise {1e3 * t['materialise_s']:.1f} ms, remove {1e3 * t['remove_s']:.1f} ms", flush=True)
    if args.json:
        atomic_write(args.json, (json.dumps(out, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
