"""Runtime benchmark at real size (issue 12): the executor's own cost on a DiT-XL/2-shaped transformer.

    python bench/bench_runtime_scale.py [--layers 28] [--batch 1] [--steps 10] [--repeats 3] [--threads 1]

Builds a ``DiTTransformer2DModel`` with the published facebook/DiT-XL-2-256 shape and random weights
(hidden 1152 = 16 heads x 72, patch 2, 32x32x4 latent, 8 output channels, 1000 classes, 28 blocks = 56
cacheable units) inside a ``DiTPipeline`` with a DDIM scheduler (the published config's linear betas) and
a tiny random ``AutoencoderKL`` (4 levels of 8 channels: the 256x256 decode costs ~1 % of a run, and it is
in every variant's wall time and counted FLOPs alike). Nothing is downloaded.

Prints, for one run of ``--batch`` class labels with batched CFG (2·batch rows per transformer call) and
DDIM ``--steps`` steps, timings interleaved within each repeat, median over repeats, in wall seconds and in
process CPU seconds (with one thread the CPU time is the work done, unaffected by other jobs taking the
core; on a shared machine the wall ratios are noisy, the CPU ones much less):

- uncached wall time, 100 % plan wall time and their ratio (target <= 1.02; the 100 % plan is bitwise
  equal to uncached, checked once);
- a step-synchronous 40 % plan (every unit computed at 4 of the 10 steps, plain reuse in between; built
  with :func:`cachec.runtime.with_actions`), its counted FLOPs fraction (``torch.utils.flop_counter`` over
  the whole pipeline call), speed-up and speed-up / ideal, ideal = 1 / FLOPs fraction (target >= 0.80);
- with ``--compensated``, the same schedule with a 2-term linear extrapolation ``[2, -1]`` where two
  computed outputs exist (exercises the compensation arithmetic).

``--heads 2 --head-dim 8`` keeps the 28 blocks, 56 units and 256 tokens but makes the model's own compute
small, so the difference between the 100 % plan and uncached is the runtime's own cost per transformer call
(printed in ms per call).

The plans are applied before the timer starts and removed after it stops, so :func:`cachec.runtime.apply`'s
weight fingerprint is not timed; the per-run weight watch (``on_run_start``) is.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cachec.loading import Driver, quiet_diffusers
from cachec.runtime import apply, full_plan, with_actions
from cachec.runtime.flops import count_total_flops

#: facebook/DiT-XL-2-256 transformer/config.json (what matters for the shape)
DIT_XL2 = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    sample_size=32, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5, attention_bias=True,
    upcast_attention=False, dropout=0.0, norm_num_groups=32,
)
#: a step-synchronous schedule computing every unit at 4 of 10 steps (the issue's 40 % plan)
SYNC_40 = "CC..C..C.."


def build_driver(layers: int = 28, seed: int = 0, dtype=torch.float32, device="cpu", heads: int = 16,
                 head_dim: int = 72) -> Driver:
    """A :class:`cachec.loading.Driver` around a random DiT-XL/2-shaped ``DiTPipeline``.

    Args:
        layers: transformer blocks (28: DiT-XL/2; fewer to iterate fast).
        seed: torch seed of the random weights.
        dtype, device: of the pipeline.
        heads, head_dim: attention heads and channels per head (16 x 72 = 1152: DiT-XL/2).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    with quiet_diffusers():
        transformer = DiTTransformer2DModel(**{**DIT_XL2, "num_layers": layers, "num_attention_heads": heads,
                                                 "attention_head_dim": head_dim})
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=256)
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                  clip_sample=False)
        pipe = DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Driver(pipe, f"dit-xl2-random-{layers}", "class", 1000, 10, 4.0, (256, 256), {"pipeline": "DiTPipeline"})


def make_plans(driver: Driver, steps: int, compensated: bool = False) -> dict:
    """``{"100%": full plan, "40%": step-synchronous plain reuse[, "40% comp": [2, -1] extrapolation]}``."""
    full = full_plan(driver, steps=steps)
    pattern = (SYNC_40 * (steps // len(SYNC_40) + 1))[:steps]
    plans = {"100%": full, "40%": with_actions(full, {u.name: pattern for u in full.units})}
    if compensated:
        computed = [s for s, a in enumerate(pattern) if a == "C"]
        comp = {s: [2.0, -1.0] for s, a in enumerate(pattern) if a != "C" and sum(c < s for c in computed) >= 2}
        plans["40% comp"] = with_actions(full, {u.name: pattern for u in full.units},
                                         {u.name: comp for u in full.units})
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--batch", type=int, default=1, help="class labels per run (x2 rows with batched CFG)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--compensated", action="store_true", help="also time the 40 %% schedule with [2, -1]")
    ap.add_argument("--no-count", action="store_true", help="take the FLOPs fraction from the runtime report")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_build = time.perf_counter()
    driver = build_driver(args.layers, heads=args.heads, head_dim=args.head_dim)
    conds = [(7 * i + 207) % 1000 for i in range(args.batch)]
    seeds = list(range(3_000_000, 3_000_000 + args.batch))
    guidance = 4.0
    plans = make_plans(driver, args.steps, args.compensated)
    print(f"built in {time.perf_counter() - t_build:.1f} s: {args.layers} blocks, {len(plans['100%'].units)} units")

    def generate():
        with torch.no_grad():
            return driver.generate(conds, seeds, steps=args.steps, guidance=guidance)

    def timed(plan):
        """((wall, CPU) seconds of the pipeline call, images, the run's report); apply/remove not timed."""
        handle = apply(driver, plan) if plan is not None else None
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            images = generate()
            spent = (time.perf_counter() - t0, time.process_time() - c0)
        finally:
            if handle is not None:
                handle.remove()
        return spent, images, (handle.report if handle is not None else None)

    variants = {"uncached": None, **plans}
    fracs: dict[str, float] = {}
    for k, p in variants.items():
        if args.no_count or k == "100%":
            continue  # the 100 % plan computes exactly what uncached does
        if p is None:
            _, fracs[k] = count_total_flops(generate)
        else:
            with apply(driver, p):
                _, fracs[k] = count_total_flops(generate)
    base = fracs.get("uncached")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    reports = {}
    ref = None
    for r in range(args.repeats + 1):  # repeat 0 is the warm-up (and the bitwise check) of uncached and 100%
        for k, p in variants.items():
            if r == 0 and k not in ("uncached", "100%"):
                continue
            spent, images, report = timed(p)
            if r == 0:
                if k == "uncached":
                    ref = images
                elif not torch.equal(images, ref):
                    raise SystemExit("the 100% plan is not bitwise equal to uncached")
                continue
            times[k].append(spent)
            reports[k] = report
            print(f"  repeat {r} {k:9s} wall {spent[0]:7.2f} s  cpu {spent[1]:7.2f} s", flush=True)
    frac = {k: (fracs[k] / base if k in fracs and base else (reports[k].flops_fraction if reports.get(k) else 1.0))
            for k in variants}
    frac["100%"] = 1.0
    width = "" if (args.heads, args.head_dim) == (16, 72) else f" at {args.heads} x {args.head_dim} channels"
    print(f"DiT-XL/2 shape{width}, {args.layers} blocks, random weights: batch {args.batch} + batched CFG "
          f"({2 * args.batch} rows), DDIM {args.steps} steps, {torch.get_num_threads()} thread(s), median of "
          f"{args.repeats} interleaved repeats (apply/fingerprint not timed)")
    print(f"{'variant':10s} {'FLOPs frac':>10s} {'ideal':>6s} | {'wall s':>8s} {'speed-up':>8s} {'ratio':>6s} | "
          f"{'cpu s':>8s} {'speed-up':>8s} {'ratio':>6s}")
    med = {}
    for k in variants:
        med[k] = [statistics.median(t[i] for t in times[k]) for i in (0, 1)]
        cols = []
        for i in (0, 1):
            speed = med["uncached"][i] / med[k][i]
            cols.append(f"{med[k][i]:8.2f} {speed:8.3f} {speed * frac[k]:6.3f}")
        print(f"{k:10s} {frac[k]:10.4f} {1 / frac[k]:6.2f} | {cols[0]} | {cols[1]}")
    ratio = [med["100%"][i] / med["uncached"][i] for i in (0, 1)]
    print(f"100% plan / uncached: wall {ratio[0]:.3f}, cpu {ratio[1]:.3f}  (target <= 1.02; bitwise equal: yes); "
          f"the difference per transformer call: wall {1000 * (med['100%'][0] - med['uncached'][0]) / args.steps:.2f} "
          f"ms, cpu {1000 * (med['100%'][1] - med['uncached'][1]) / args.steps:.2f} ms")
    for k in variants:
        if k.startswith("40%"):
            r = [med["uncached"][i] / med[k][i] * frac[k] for i in (0, 1)]
            print(f"{k} plan: speed-up / ideal: wall {r[0]:.3f}, cpu {r[1]:.3f}  (target >= 0.80); FLOPs fraction "
                  f"{'counted' if k in fracs else 'from the report'} {frac[k]:.4f}")


if __name__ == "__main__":
    main()
