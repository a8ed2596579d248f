"""The ``cachec`` command line. It only wires the stages together; no logic lives here."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from . import __version__

#: errors that are the user's input, shown as one line without a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, PermissionError, RuntimeError)


def friendly(fn):
    """Turn user-input errors into a one-line ``Error: …`` and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(msg).splitlines()[0] if str(msg) else type(exc).__name__) from None

    return wrapper


def _device(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--device cuda was given but no CUDA GPU is available; use --device cpu")
    return device


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise click.ClickException(f"unknown dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _step_bar(total_steps: int, n_batches: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps * n_batches, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    return bar, (lambda i, n: bar.update(1))


def _conditions(driver, classes: str | None, prompts: str | None, prompt: tuple[str, ...] = ()) -> list:
    from .calibrate.conditions import parse_classes, read_prompts

    if classes and (prompts or prompt):
        raise click.ClickException("give either --classes or prompts, not both")
    if prompts:
        return read_prompts(prompts)
    if prompt:
        return list(prompt)
    if driver.condition_kind == "prompt":
        raise click.ClickException(f"{driver.name} is text-conditional: give --prompts FILE or --prompt TEXT")
    return parse_classes(classes or f"0-{driver.num_classes - 1}", driver.num_classes)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cachec")
def main():
    """cachec: calibrate a Diffusion Transformer, compile a cache plan under a FLOP budget, run it.

    \b
    Stages:  cachec calibrate MODEL -o calib.safetensors
             cachec plan calib.safetensors --budget 40% -o plan.yaml
             cachec run plan.yaml   |   cachec eval plan.yaml
    MODEL is a shipped name (digits-flow, digits-ddim; default digits-flow), a local diffusers folder or a
    hub id already in the local cache.
    """


@main.command()
@click.argument("model", required=False)
@click.option("--classes", default=None, help="Class labels, e.g. '0-9' or '3,5,7' (default: all classes).")
@click.option("--per-class", default=10, show_default=True, type=click.IntRange(min=1), help="Samples per class.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed SEED + i.")
@click.option("--cfg", type=click.Choice(["batched", "split"]), default="batched", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False), default="samples.png", show_default=True,
              help="PNG grid; the raw samples go to the same name with .safetensors.")
@friendly
def sample(model, classes, per_class, steps, guidance, seed, cfg, device, dtype, out):
    """Generate images without caching: a PNG grid plus the raw samples (.safetensors)."""
    import torch

    from .images import make_grid, save_png
    from .loading import load_model
    from .quality import save_samples

    out = Path(out)
    if not out.parent.exists():
        raise click.ClickException(f"output folder {out.parent} does not exist; create it first")
    if steps is not None and steps <= 0:
        raise click.ClickException(f"--steps must be positive, got {steps}")
    driver = load_model(model, device=_device(device), dtype=_dtype(dtype))
    conds = [c for c in _conditions(driver, classes, None) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(conds))]
    steps = steps or driver.default_steps
    bar, cb = _step_bar(steps, 1, f"sampling {driver.name}")
    t0 = time.perf_counter()
    images = driver.generate(conds, seeds, steps=steps, guidance=guidance, cfg=cfg, callback=cb)
    wall = time.perf_counter() - t0
    bar.close()
    save_png(make_grid(images, ncols=per_class if per_class > 1 else 10), out)
    raw = out.with_suffix(".safetensors")
    meta = {"model": driver.name, "steps": steps, "guidance": guidance if guidance is not None else driver.default_guidance,
            "cfg": cfg, "plan": None, "wall_s": wall}
    save_samples(raw, images, torch.tensor(conds), torch.tensor(seeds), meta)
    click.echo(f"{len(conds)} samples from {driver.name} ({steps} steps, {wall:.1f} s) -> {out}, {raw}")


if __name__ == "__main__":  # pragma: no cover
    main()
