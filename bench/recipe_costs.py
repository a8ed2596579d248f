"""Expected calibration cost of the docs/recipes.md recipes, from the formulas of docs/calibration-format.md.

    python bench/recipe_costs.py [--markdown]

Each family's transformer is built at its published size (registry ``published`` config, every block) on
PyTorch's ``meta`` device — no weights, no arithmetic — and called once at the recipe's resolution, so the
per-unit output shapes (tokens × channels, tuple parts) and per-unit FLOPs (``torch.utils.flop_counter``,
FLOPs = 2 × multiply-adds) are the real ones. From them, with r = the default sketch dimension and K = 2
EOC lags:

- file bytes = ``8 · Σ_u (2 B S² + (1 + 2 + 2K) S G_u) + 8 · (3 U S + 2 U)`` (per-token EOC groups G_u);
- memory beyond plain sampling per batch of n samples = ``4 n B Σ_u (S r_u + K E_u)`` (E_u = min(D_u,
  G_u · eoc_sample)) +
  ``2 · 8 (1 + 2 + 2K) S Σ_u G_u`` (the EOC sums and their partial-state copy);
- time in transformer steps (one step = one forward of one batch row): uncached sampling of N samples,
  ``N · B · S``, plus the sensitivity probes (:func:`cachec.calibrate.sensitivity.cost`, docs/calibration.md).
"""

from __future__ import annotations

import argparse
import math

import torch

from cachec.calibrate.format import DEFAULT_EOC_SAMPLE, DEFAULT_SKETCH_DIM, eoc_group_layout, sketch_dim
from cachec.runtime.registry import registered
from cachec.runtime.units import find_units

#: recipe -> (registry family, transformer class, resolution px, steps S, branches B, samples N, batch n)
RECIPES = {
    "DiT-XL/2 (facebook/DiT-XL-2-256)": ("dit", "DiTTransformer2DModel", 256, 50, 2, 40, 8),
    "PixArt-Σ (PixArt-Sigma-XL-2-1024-MS)": ("pixart", "PixArtTransformer2DModel", 1024, 20, 2, 32, 2),
    "SD3-medium": ("sd3", "SD3Transformer2DModel", 1024, 28, 2, 32, 2),
    "FLUX.1-dev": ("flux", "FluxTransformer2DModel", 1024, 28, 1, 32, 1),
    "FLUX.1-schnell": ("flux", "FluxTransformer2DModel", 1024, 4, 1, 32, 1),
}
K = 2


def _inputs(family: str, cfg: dict, px: int) -> dict:
    """Meta-device transformer inputs of one sample at ``px`` × ``px`` pixels (VAE factor 8)."""
    lat = px // 8
    m = dict(device="meta")
    t = torch.ones(1, **m)
    if family == "dit":
        return dict(hidden_states=torch.empty(1, cfg["in_channels"], lat, lat, **m), timestep=t,
                    class_labels=torch.zeros(1, dtype=torch.long, **m))
    if family == "pixart":
        return dict(hidden_states=torch.empty(1, cfg["in_channels"], lat, lat, **m), timestep=t,
                    encoder_hidden_states=torch.empty(1, 300, cfg["caption_channels"], **m),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if family == "sd3":
        return dict(hidden_states=torch.empty(1, cfg["in_channels"], lat, lat, **m), timestep=t,
                    encoder_hidden_states=torch.empty(1, 77 + 256, cfg["joint_attention_dim"], **m),
                    pooled_projections=torch.empty(1, cfg["pooled_projection_dim"], **m))
    n_img = (lat // 2) ** 2
    return dict(hidden_states=torch.empty(1, n_img, cfg["in_channels"], **m), timestep=t,
                encoder_hidden_states=torch.empty(1, 512, cfg["joint_attention_dim"], **m),
                pooled_projections=torch.empty(1, cfg["pooled_projection_dim"], **m),
                img_ids=torch.zeros(n_img, 3, **m), txt_ids=torch.zeros(512, 3, **m),
                guidance=t if cfg.get("guidance_embeds") else None)


def unit_shapes(family: str, cls_name: str, px: int):
    """``(units [(name, [part shapes])], unit FLOPs (U,), full-step FLOPs)`` of the published model."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    spec = next(s for s in registered() if s.name == family)
    cfg = dict(spec.published)
    with torch.device("meta"):
        tr = getattr(diffusers, cls_name)(**cfg).eval()
    units = find_units(tr)
    mods = dict(tr.named_modules())
    shapes: dict[str, list] = {}
    flops: dict[str, float] = {}
    counter = FlopCounterMode(display=False)
    hooks = []
    for u in units:
        mod = mods[u.name] if u.name in mods else None
        if mod is None:
            continue

        def hook(m, a, out, name=u.name):
            outs = out if isinstance(out, tuple) else (out,)
            shapes[name] = [tuple(o.shape[1:]) for o in outs if isinstance(o, torch.Tensor)]

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad(), counter:
        tr(**_inputs(family, cfg, px), return_dict=False)
    for h in hooks:
        h.remove()
    per_module = counter.get_flop_counts()
    total = float(sum(per_module.get("Global", {}).values()))
    for u in units:
        key = next((k for k in per_module if k.endswith(u.name)), None)
        flops[u.name] = float(sum(per_module[key].values())) if key else 0.0
    return [(u.name, shapes.get(u.name, [])) for u in units], flops, total


def sensitivity_steps(method: str, U: int, S: int) -> float:
    """Transformer steps (per probe sample and branch) of a sensitivity method
    (:func:`cachec.calibrate.sensitivity.cost`: reference run, probes and step-cache fills)."""
    from cachec.calibrate.sensitivity import cost

    return float(cost(method, U, S))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    r = DEFAULT_SKETCH_DIM
    rows = []
    for name, (family, cls_name, px, S, B, N, n) in RECIPES.items():
        units, flops, total = unit_shapes(family, cls_name, px)
        U = len(units)
        D = [sum(math.prod(s) for s in sh) for _, sh in units]
        lay = [eoc_group_layout([list(s) for s in sh], "token") for _, sh in units]
        G = [sum(g for _, g, _ in L) for L in lay]
        E = [sum(g * min(size, DEFAULT_EOC_SAMPLE) for _, g, size in L) for L in lay]
        R = [sketch_dim(d, r) for d in D]
        file_b = 8 * sum(2 * B * S * S + (1 + 2 + 2 * K) * S * g for g in G) + 8 * (3 * U * S + 2 * U)
        mem_b = 4 * n * B * sum(S * ri + K * e for ri, e in zip(R, E)) + 2 * 8 * (1 + 2 + 2 * K) * S * sum(G)
        old_file = 8 * sum(2 * B * S * S + (1 + 2 + 2 * K) * S * d for d in D)
        sampling = N * B * S
        sens = {m: sensitivity_steps(m, U, S) for m in ("chain", "factored", "full")}
        rows.append((name, U, px, S, B, N, n, max(D), file_b, old_file, mem_b, sampling, sens, total))
    if args.markdown:
        print("| recipe | units | resolution | steps | branches | samples (batch) | largest unit (elements/sample) | "
              "file | v1 file | extra memory | sampling (steps) | sensitivity steps/sample: chain | factored | full |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, U, px, S, B, N, n, dmax, fb, ofb, mb, samp, sens, total in rows:
        if args.markdown:
            print(f"| {name} | {U} | {px}² | {S} | {B} | {N} ({n}) | {dmax:,} | {fb / 1e6:.1f} MB | {ofb / 1e9:.0f} GB | "
                  f"{mb / 1e9:.2f} GB | {samp:,} | {sens['chain']:,.0f} | {sens['factored']:,.0f} | {sens['full']:,.0f} |")
        else:
            print(f"{name}: U={U} {px}px S={S} B={B} N={N} batch {n}; largest unit {dmax:,} elements; file "
                  f"{fb / 1e6:.1f} MB (format 1: {ofb / 1e9:.1f} GB); memory +{mb / 1e9:.2f} GB; sampling "
                  f"{samp:,} steps; sensitivity chain {sens['chain']:,.0f} / factored {sens['factored']:,.0f} / full {sens['full']:,.0f} steps "
                  f"per probe sample-branch; {total / 1e12:.2f} TFLOP per step")


if __name__ == "__main__":
    main()
