"""Attention-map reuse vs attention-output reuse on the joint or self-attention of a model (issue 16, HGC).

HGC's fine grain reuses attention probability maps across adjacent steps: at step s the map
``P_r = softmax(Q_r K_rᵀ / √d)`` of an earlier step r is applied to the step's fresh values, ``P_r V_s``, which
skips the Q/K projections and ``QKᵀ``/softmax but still computes V, ``P V`` and the output projection. cachec's
attention units reuse (or predict) the whole output instead, ``O_r = P_r V_r``. This script measures, on
uncached sampling of a model, how far each reuse is from the real output ``O_s = P_s V_s`` at a staleness of
k = s − r steps, to decide whether map units would buy quality per FLOP that output units do not.

Per attention call (FLUX layout: every ``dispatch_attention_fn`` call of diffusers' ``FluxAttnProcessor``, the
dual and single blocks of the generator and, on ``digits-mmdit-control``, of the ControlNet; DiT: every
self-attention), per step s ≥ k and per image row, with O the attention core's output before the output projection (float32, shape (B, N, H, d)):

    e_out(k) = ‖O_{s−k} − O_s‖² / ‖O_s‖²          e_map(k) = ‖P_{s−k} V_s − O_s‖² / ‖O_s‖²
    e_taylor(k) = ‖2·O_{s−k} − O_{s−2k} − O_s‖² / ‖O_s‖²   (s ≥ 2k: a first-order forecast of the output, the
                                                            predictor of cachec's ``taylor`` set)

averaged over steps, rows and calls of a group (relative squared errors, dimensionless). The output
projection is a linear map common to both, so the comparison is made before it. FLOPs (a multiply-add is 2,
as ``torch.utils.flop_counter`` counts; softmax not counted) of one joint attention over N tokens of width D:
Q/K/V projections 6·N·D², ``QKᵀ`` and ``PV`` 2·N²·D each, output projection(s) 2·N·D²; map reuse saves the
Q/K projections and ``QKᵀ`` (4·N·D² + 2·N²·D), output reuse all of it. Memory of one stored map:
heads·N² values per row and CFG branch, printed for the measured model and for the published full-size
FLUX.1 and DiT-XL/2 shapes (bf16).

Usage (≈ 1 min on one thread)::

    python bench/bench_attention_maps.py [--model digits-mmdit-control | digits-flow] [--images 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cachec.evaluation import held_out_set  # noqa: E402
from cachec.loading import load_model  # noqa: E402


def attention_flops(n: int, d: int) -> tuple[int, int]:
    """(FLOPs of one joint attention over ``n`` tokens of width ``d``, FLOPs that map reuse skips)."""
    total = 6 * n * d * d + 4 * n * n * d + 2 * n * d * d
    return total, 4 * n * d * d + 2 * n * n * d


def record(driver, conds, seeds, steps, guidance) -> list[list[tuple[torch.Tensor, ...]]]:
    """Uncached sampling; per transformer call the (q, k, v) of every attention call, float32 (B, N, H, d).

    FLUX-layout models attend through diffusers' ``dispatch_attention_fn`` (tensors (B, N, H, d)); the
    others (DiT, PixArt: ``AttnProcessor2_0``) call ``torch.nn.functional.scaled_dot_product_attention``
    ((B, H, N, d)). Both are wrapped for the call and restored after it."""
    import diffusers.models.transformers.transformer_flux as tf
    import torch.nn.functional as F

    calls: list[list[tuple[torch.Tensor, ...]]] = []
    dispatch, sdpa = tf.dispatch_attention_fn, F.scaled_dot_product_attention

    def keep(*t):
        calls[-1].append(tuple(x.detach().float().clone() for x in t))

    inside = [False]  # dispatch_attention_fn's native backend calls SDPA itself: record that call once

    def capture_dispatch(query, key, value, *args, **kwargs):
        keep(query, key, value)
        inside[0] = True
        try:
            return dispatch(query, key, value, *args, **kwargs)
        finally:
            inside[0] = False

    def capture_sdpa(query, key, value, *args, **kwargs):
        if calls and query.ndim == 4 and not inside[0]:
            keep(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return sdpa(query, key, value, *args, **kwargs)

    hook = driver.transformer.register_forward_pre_hook(lambda m, a: calls.append([]))
    tf.dispatch_attention_fn, F.scaled_dot_product_attention = capture_dispatch, capture_sdpa
    try:
        driver.generate(conds, seeds, steps=steps, guidance=guidance)
    finally:
        tf.dispatch_attention_fn, F.scaled_dot_product_attention = dispatch, sdpa
        hook.remove()
    return calls


def probs(q, k):
    """softmax(Q Kᵀ / √d), (B, H, N, N)."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def rel(err, ref):
    """Per-row relative squared error ‖err‖² / ‖ref‖², (B,)."""
    return err.flatten(1).pow(2).sum(1) / ref.flatten(1).pow(2).sum(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-mmdit-control")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    driver = load_model(args.model)
    steps, guidance = int(driver.default_steps), float(driver.default_guidance)
    conds, seeds = held_out_set(driver, args.images)
    calls = record(driver, conds, seeds, steps, guidance)
    if len(calls) != steps:
        raise SystemExit(f"expected one transformer call per step (batched CFG), got {len(calls)} for {steps} steps")
    n_attn = len(calls[0])
    control = sum(1 for name, _ in driver.transformer.named_children() if name == "controlnet")
    n_ctrl = 0
    if control:
        cn = driver.transformer.controlnet
        n_ctrl = len(cn.transformer_blocks) + len(cn.single_transformer_blocks)
        n_dual_c = len(cn.transformer_blocks)
    gen = getattr(driver.transformer, "transformer", driver.transformer)
    n_dual_g = len(gen.transformer_blocks)
    flux = hasattr(gen, "single_transformer_blocks")

    def group(i: int) -> str:
        if not flux:
            return "self-attention"
        if i < n_ctrl:
            return "ControlNet dual" if i < n_dual_c else "ControlNet single"
        return "generator dual" if i - n_ctrl < n_dual_g else "generator single"

    rows: dict[str, dict[int, dict[str, list[float]]]] = {}
    for s in range(steps):
        for a in range(n_attn):
            q, k, v = calls[s][a]
            p_s = probs(q, k)
            o_s = p_s @ v.transpose(1, 2)
            for kk in range(1, args.max_k + 1):
                if s - kk < 0:
                    continue
                q_r, k_r, v_r = calls[s - kk][a]
                p_r = probs(q_r, k_r)
                cell = rows.setdefault(group(a), {}).setdefault(kk, {"out": [], "map": [], "taylor": []})
                o_r = p_r @ v_r.transpose(1, 2)
                cell["out"] += rel(o_r - o_s, o_s).tolist()
                cell["map"] += rel(p_r @ v.transpose(1, 2) - o_s, o_s).tolist()
                if s - 2 * kk >= 0:
                    q_2, k_2, v_2 = calls[s - 2 * kk][a]
                    cell["taylor"] += rel(2 * o_r - probs(q_2, k_2) @ v_2.transpose(1, 2) - o_s, o_s).tolist()
    q0 = calls[0][n_ctrl][0]
    n, heads, dh = q0.shape[1], q0.shape[2], q0.shape[3]
    total, saved = attention_flops(n, heads * dh)
    print(f"{args.model}: {steps} steps, guidance {guidance}, {len(conds)} images (rows incl. CFG: {q0.shape[0]}), "
          f"{n_attn} attention calls per step, N = {n} tokens, {heads} heads × {dh}")
    print(f"map reuse skips {saved / total:.1%} of an attention's FLOPs (output reuse: 100 %)\n")
    print("| group | k | e_out (output reuse) | e_taylor (output forecast) | e_map (map reuse) | e_map / e_out |")
    print("|---|---:|---:|---:|---:|---:|")
    summary: dict = {"model": args.model, "steps": steps, "images": len(conds), "tokens": n, "heads": heads,
                     "head_dim": dh, "map_saved_fraction": saved / total, "groups": {}}
    for g, by_k in rows.items():
        for kk, cell in sorted(by_k.items()):
            e_out = sum(cell["out"]) / len(cell["out"])
            e_map = sum(cell["map"]) / len(cell["map"])
            e_tay = sum(cell["taylor"]) / len(cell["taylor"])
            summary["groups"].setdefault(g, {})[kk] = {"e_out": e_out, "e_taylor": e_tay, "e_map": e_map}
            print(f"| {g} | {kk} | {e_out:.3e} | {e_tay:.3e} | {e_map:.3e} | {e_map / e_out:.3f} |")
    print("\nOne stored map (bf16, per row and CFG branch, one attention):")
    shapes = {args.model: (n, heads), "FLUX.1 at 1024² (4096 + 512 tokens, 24 heads)": (4608, 24),
              "DiT-XL/2 at 256² (256 tokens, 16 heads)": (256, 16)}
    summary["map_bytes_bf16"] = {}
    for name, (nn_, h) in shapes.items():
        b = 2 * h * nn_ * nn_
        summary["map_bytes_bf16"][name] = b
        print(f"  {name}: {b / 2**20:.2f} MiB")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
