"""What the reference-model training scripts share: the learning-rate schedule, the EMA update, progress
lines and the resumable checkpoint (safetensors weights + the optimizer + a JSON state, written atomically).

Also the command line every training script takes (:func:`training_parser`) and the rectified-flow batch
of the prompt-conditioned models (:func:`flow_batch`, :func:`prompt_batch`).

Imported by scripts/train_reference.py, scripts/train_mmdit_reference.py and
scripts/train_control_reference.py (run from the repository root as ``python scripts/<name>.py``, which puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cachec.runtime.io import atomic_write

WARMUP = 100  # iterations of linear warm-up
FINAL_LR = 0.1  # the cosine decays to this fraction of the base learning rate
EMA_DECAY = 0.999


def training_parser(description: str, *, iters: int, batch: int, threads: int, save_every: int,
                    export_only: bool = False) -> argparse.ArgumentParser:
    """The options every training script takes (``--iters --batch --lr --seed --threads --save-every
    --workdir --export``, and ``--export-only`` when asked), with the script's defaults."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--save-every", type=int, default=save_every)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True)
    if export_only:
        ap.add_argument("--export-only", action="store_true", help="export the current checkpoint's EMA and stop")
    return ap


def set_lr(opt, lr: float) -> None:
    """Set the learning rate of every parameter group of ``opt``."""
    for g in opt.param_groups:
        g["lr"] = lr


def flow_batch(data: torch.Tensor, batch: int, gen: torch.Generator):
    """One rectified-flow training batch: ``(idx, x0, noise, sigma, xt)`` with ``idx`` (B,) int64 indices
    into ``data`` (N, C, H, W), sigma (B,) logit-normal in (0, 1) and ``xt = (1 − σ) x0 + σ noise``; draws
    idx, noise, sigma from ``gen`` in that order."""
    idx = torch.randint(0, len(data), (batch,), generator=gen)
    x0 = data[idx]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal
    s = sigma.view(-1, 1, 1, 1)
    return idx, x0, noise, sigma, (1 - s) * x0 + s * noise


def prompt_batch(attrs: list, idx: torch.Tensor, rng: random.Random, empty: float = 0.1) -> list[str]:
    """Prompts of a batch: the empty prompt with probability ``empty`` (CFG dropout), else
    :func:`cachec.digit_prompts.random_prompt` of the digit's (class, thickness bin, slant bin)."""
    from cachec.digit_prompts import random_prompt

    return ["" if rng.random() < empty else random_prompt(*attrs[i], rng) for i in idx.tolist()]


def atomic_save(tensors: dict, path: Path) -> None:
    """Write a state dict (name → tensor, made contiguous) as safetensors with :func:`atomic_write`."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def learning_rate(base: float, it: int, iters: int) -> float:
    """Linear warm-up over :data:`WARMUP` iterations, then cosine from ``base`` to ``FINAL_LR·base`` at
    ``iters`` (re-evaluated over the new length when a run is resumed with another ``--iters``)."""
    return base * min(1.0, (it + 1) / WARMUP) * (0.5 * (1 + math.cos(math.pi * it / iters)) * (1 - FINAL_LR) + FINAL_LR)


@torch.no_grad()
def ema_update(pairs, it: int) -> None:
    """``ema ← lerp(ema, live, 1 − decay)`` for each (ema, live) module pair; decay warms up to 0.999."""
    decay = min(EMA_DECAY, (1 + it) / (10 + it))
    for ema, live in pairs:
        for pe, pm in zip(ema.parameters(), live.parameters()):
            pe.lerp_(pm, 1 - decay)


class Checkpoint:
    """A resumable training checkpoint in ``workdir``: ``<name>.safetensors`` per module, ``opt.pt`` (the
    optimizer state, loaded with ``weights_only=True``) and ``state.json`` (``iter``, ``seconds``,
    ``losses``).

    Args:
        workdir: the folder (created).
        modules: ``{name: nn.Module}`` saved and restored by name.
        opt: the optimizer.
    """

    def __init__(self, workdir: Path, modules: dict, opt) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.modules, self.opt = modules, opt
        self.state = {"iter": 0, "seconds": 0.0, "losses": []}
        self._t0 = time.time()

    def resume(self) -> dict:
        """Load the checkpoint when there is one (prints the iteration); returns the state."""
        path = self.dir / "state.json"
        if path.exists():
            for name, module in self.modules.items():
                module.load_state_dict(load_file(str(self.dir / f"{name}.safetensors")))
            self.opt.load_state_dict(torch.load(self.dir / "opt.pt", weights_only=True))
            self.state = json.loads(path.read_text())
            print(f"resumed at iteration {self.state['iter']}", flush=True)
        self._t0 = time.time()
        return self.state

    def step(self, loss: float, lr: float, iters: int, save_every: int) -> None:
        """Record one finished iteration: its loss; a progress line every 20; a checkpoint every
        ``save_every`` and at ``iters``."""
        st = self.state
        st["iter"] += 1
        st["losses"].append(round(float(loss), 5))
        if st["iter"] % 20 == 0:
            el = st["seconds"] + time.time() - self._t0
            print(f"iter {st['iter']} loss {sum(st['losses'][-20:]) / 20:.4f} lr {lr:.2e} {el:.0f}s", flush=True)
        if st["iter"] % save_every == 0 or st["iter"] == iters:
            st["seconds"] += time.time() - self._t0
            self._t0 = time.time()
            for name, module in self.modules.items():
                atomic_save(module.state_dict(), self.dir / f"{name}.safetensors")
            atomic_write(self.dir / "opt.pt", lambda tmp: torch.save(self.opt.state_dict(), tmp))
            atomic_write(self.dir / "state.json", json.dumps(st).encode())

    def mean_loss(self, last: int = 100) -> float:
        tail = self.state["losses"][-last:]
        return sum(tail) / max(1, len(tail))
