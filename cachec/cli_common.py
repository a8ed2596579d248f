"""What every ``cachec`` command shares: one-line user errors, the ``--device``/``--dtype`` options, progress
bars, and the condition options (``--classes``, ``--prompt``, ``--prompts``, ``--resolution``) parsed one way
everywhere.

The commands live in :mod:`cachec.cli` (calibrate, plan, inspect, compile) and :mod:`cachec.cli_sampling`
(sample, run, eval).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import click

#: errors that are the user's input, shown as one line without a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                                NotADirectoryError, PermissionError, RuntimeError)
#: default number of classes sampled when ``--classes`` is not given and the model has more classes
DEFAULT_CLASS_COUNT = 10


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


#: ``--dtype`` names → torch dtype names (the dtypes a model can be loaded in)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def device_dtype_options(fn):
    """Add ``--device`` and ``--dtype`` (checked with :func:`device_option` / :func:`dtype_option`) to a command."""
    fn = click.option("--dtype", default="float32", show_default=True, metavar="float32|bfloat16|float16",
                      help="dtype the model is loaded in (also fp32, bf16, fp16). A plan's weight fingerprint is "
                           "the same for float32 and bfloat16 loads of one checkpoint (docs/plan-format.md).")(fn)
    fn = click.option("--device", default="cpu", show_default=True,
                      help="torch device of the model: cpu, cuda, cuda:N, mps.")(fn)
    return fn


def device_option(device: str) -> str:
    """``--device`` checked: a valid torch device string whose backend is available here.

    Returns:
        ``device`` unchanged.

    Raises:
        click.ClickException: one line naming the problem and the fix: not a device string, ``cuda…`` without
            a usable CUDA GPU (a CPU-only torch build, or no GPU), a GPU index past the last one, ``mps``
            unavailable, or another backend this torch cannot allocate on.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise click.ClickException(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise click.ClickException(
                f"--device {device} needs a CUDA build of torch, but this one (torch {torch.__version__}) is CPU-only: "
                "install torch with CUDA (pip install without '-c constraints.txt'), or use --device cpu")
        if not torch.cuda.is_available():
            raise click.ClickException(f"--device {device} was given but no CUDA GPU is available (check the driver "
                                       "and CUDA_VISIBLE_DEVICES); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise click.ClickException(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise click.ClickException(f"--device {device} was given but MPS (Apple GPU) is not available; use --device cpu")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # noqa: BLE001 - any backend failure is the same user error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(f"--device {device} is not usable here ({first}); use --device cpu") from None
    return device


def dtype_option(name: str):
    """``--dtype`` name (a key of :data:`DTYPES`, any case) → torch dtype.

    Raises:
        click.ClickException: an unsupported name (the message lists the supported ones).
    """
    import torch

    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise click.ClickException(f"unsupported --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[key])


def step_bar(total_steps: int, n_batches: int, desc: str):
    """A tqdm bar on stderr and a ``callback(step, steps)`` that advances it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps * n_batches, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    return bar, (lambda i, n: bar.update(1))


def output_folder(path: str | Path) -> Path:
    """``path`` as a Path whose parent folder exists.

    Raises:
        click.ClickException: the folder is missing.
    """
    p = Path(path)
    if not p.parent.exists():
        raise click.ClickException(f"output folder {p.parent} does not exist; create it first")
    return p


def condition_options(fn):
    """Add ``--classes``, ``--prompt`` (repeatable) and ``--prompts FILE`` to a command."""
    fn = click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
                      help="Text models: UTF-8 file, one prompt per line (blank lines skipped).")(fn)
    fn = click.option("--prompt", "prompt", multiple=True,
                      help="Text models: a prompt; repeat for several (after those of --prompts).")(fn)
    fn = click.option("--classes", default=None,
                      help="Class-conditional models: labels, ranges and subsets, e.g. '0-9', '1,3,5' or '0-4,207,980'.")(fn)
    return fn


def resolution_flag(fn):
    """Add ``--resolution HxW`` (pixels) to a command."""
    return click.option("--resolution", default=None, metavar="HxW",
                        help="Image size in pixels, e.g. 512x512, for pipelines that take a size (text models; "
                             "default: the model's).")(fn)


_RES = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_resolution(text: str | None) -> tuple[int, int] | None:
    """``"HxW"`` (also ``"H×W"``) → ``(H, W)``; None → None.

    Raises:
        ValueError: not two positive integers separated by ``x``.
    """
    if text is None:
        return None
    m = _RES.match(str(text))
    if m is None or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise ValueError(f"cannot parse --resolution {text!r}: expected HxW in pixels, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


def given_conditions(driver, classes: str | None, prompt: tuple[str, ...] = (), prompts_file: str | None = None
                     ) -> list | None:
    """The conditions the user gave (None when none): ``--classes`` parsed for the model's class count, or
    the prompts of ``--prompts FILE`` followed by those of ``--prompt``. One parser for every command
    (:func:`cachec.calibrate.conditions.parse_classes`, :func:`~cachec.calibrate.conditions.read_prompts`).

    Raises:
        ValueError: classes and prompts together, the wrong kind for the model (classes for a text model,
            prompts for a class-conditional one), an unparsable or out-of-range class list, an empty prompt,
            or an unreadable/empty prompt file.
        FileNotFoundError: no such prompt file.
    """
    from .calibrate.conditions import parse_classes, read_prompts

    prompt = tuple(prompt or ())
    if classes is not None and (prompt or prompts_file):
        raise ValueError("give either --classes or prompts (--prompt/--prompts), not both")
    if classes is not None:
        if driver.condition_kind != "class":
            raise ValueError(f"{driver.name} is text-conditional: give --prompt TEXT or --prompts FILE, not --classes")
        return parse_classes(classes, driver.num_classes)
    if not (prompt or prompts_file):
        return None
    if driver.condition_kind != "prompt":
        raise ValueError(f"{driver.name} is class-conditional: give --classes (e.g. 0-9), not prompts")
    for p in prompt:
        if not p.strip():
            raise ValueError("--prompt is empty: give the prompt text")
    return (read_prompts(prompts_file) if prompts_file else []) + [p.strip() for p in prompt]


def default_classes(driver) -> list[int]:
    """Classes used when none are given: all of them, or :data:`DEFAULT_CLASS_COUNT` spread evenly over them
    when the model has more (e.g. 0, 100, …, 900 of ImageNet's 1000)."""
    k = int(driver.num_classes)
    if k <= DEFAULT_CLASS_COUNT:
        return list(range(k))
    return [i * k // DEFAULT_CLASS_COUNT for i in range(DEFAULT_CLASS_COUNT)]


def conditions(driver, classes: str | None, prompt: tuple[str, ...] = (), prompts_file: str | None = None) -> list:
    """:func:`given_conditions`, else :func:`default_classes` for class-conditional models, else the
    model's own calibration prompt set (``driver.prompt_sets``, the shipped prompt-conditioned model).

    Raises:
        ValueError: as :func:`given_conditions`; a text model without prompts and without a prompt set.
    """
    got = given_conditions(driver, classes, prompt, prompts_file)
    if got is not None:
        return got
    if driver.condition_kind == "prompt" and driver.prompt_sets.get("calibration"):
        return list(driver.prompt_sets["calibration"])
    if driver.condition_kind == "prompt":
        raise ValueError(f"{driver.name} is text-conditional: give --prompt TEXT (repeatable) or --prompts FILE")
    return default_classes(driver)


def _is_plan_yaml(path: Path) -> bool:
    head = path.read_bytes()[:4096]
    return head.startswith(b"# cachec plan") or b"\ncachec_plan:" in head or head.startswith(b"cachec_plan:")


def check_output(path: str | Path, kind: str, overwrite: bool = False) -> None:
    """Refuse to replace an existing file that is not of ``kind`` (unless ``overwrite``).

    Args:
        path: the output file a command is about to write.
        kind: ``"plan"`` (a plan YAML; its sidecar name ``<stem>.eoc.safetensors`` is checked too: it may only
            replace another sidecar) or ``"calibration"``.

    Raises:
        click.ClickException: one line naming the file, what it is and ``--overwrite``.
    """
    from .samples import describe_file

    p = Path(path)
    if kind == "plan" and p.suffix not in (".yaml", ".yml"):
        raise click.ClickException(f"{p}: a plan is a YAML file: give -o NAME.yaml")
    if overwrite:
        return
    if kind == "plan":
        if p.is_dir() or (p.exists() and not _is_plan_yaml(p)):
            raise click.ClickException(f"{p} exists and is not a cachec plan: refusing to replace it (pass --overwrite)")
        side = p.with_name(f"{p.stem}.eoc.safetensors")
        if side.exists() and describe_file(side) != "a plan sidecar":
            raise click.ClickException(f"{side} (the plan's sidecar name) exists and is {describe_file(side)}: "
                                       "refusing to replace it (pass --overwrite or choose another -o)")
    elif kind == "calibration":
        if p.exists() and describe_file(p) != "a cachec calibration file":
            raise click.ClickException(f"{p} exists and is {describe_file(p) or 'a cachec sample set'}: refusing to "
                                       "replace it with a calibration (pass --overwrite)")
    else:
        raise ValueError(f"unknown output kind {kind!r}")
