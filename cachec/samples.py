"""Sample-set files: generated images with their labels, seeds and a JSON description, as safetensors.

``cachec sample`` and ``cachec run`` write them (:func:`save_samples`); ``cachec eval FILE.safetensors``
reads two of them and compares them (:func:`cachec.report.compare_sample_files`). Format in
:func:`save_samples`; images follow the convention of :mod:`cachec.metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .metrics import IMAGE_SHAPE, as_image_batch, as_labels, check_unit_range
from .runtime.io import atomic_write, to_jsonable

__all__ = ["SAMPLES_METADATA_KEY", "SAMPLES_META_KEYS", "SampleSet", "load_samples", "save_samples"]

#: safetensors metadata key holding the JSON description of a sample set
SAMPLES_METADATA_KEY = "cachec_samples"
#: keys that the JSON metadata of a sample-set file must hold (values of the last two may be null)
SAMPLES_META_KEYS = ("model", "steps", "guidance", "flops_per_image", "wall_s")


@dataclasses.dataclass(frozen=True)
class SampleSet:
    """A sample set read by :func:`load_samples`.

    Attributes:
        images: float32 (N, 1, 32, 32) in [0, 1].
        labels: int64 (N,) requested classes.
        seeds: int64 (N,) per-image seeds.
        meta: the decoded JSON metadata (at least ``model, steps, guidance, flops_per_image, wall_s``).
        path: the file it came from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor
    meta: dict[str, Any]
    path: str = ""


def _validate_set(images: Any, labels: Any, seeds: Any, where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.float32 or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{where}: images must be float32 (N, 1, 32, 32), got {desc}")
    n = images.shape[0]
    check_unit_range(images, f"{where}: images")
    out = []
    for t, what in ((labels, "labels"), (seeds, "seeds")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,):
            desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {what} must be int64 ({n},), got {desc}")
        out.append(t)
    as_labels(out[0], n, f"{where}: labels")
    return images, out[0], out[1]


def save_samples(path: str | os.PathLike, images: torch.Tensor, labels: Any, seeds: Any, meta: dict[str, Any]) -> None:
    """Write a sample set atomically (:func:`cachec.runtime.io.atomic_write`: readers never see a partial file).

    File format (safetensors): tensors ``images`` float32 (N, 1, 32, 32) in [0, 1], ``labels`` int64 (N,),
    ``seeds`` int64 (N,); header metadata ``{"cachec_samples": <JSON string of meta>}``. ``meta`` must
    hold ``model`` (str), ``steps`` (int), ``guidance`` (float), ``flops_per_image`` (FLOPs per image,
    or null) and ``wall_s`` (seconds, or null); extra keys are kept. ``meta`` is converted with
    :func:`cachec.runtime.io.to_jsonable` (NaN → null, ±inf → ``"inf"``/``"-inf"``, arrays → lists, other
    objects → their ``str``). Parent folders are created.

    Args:
        images: float tensor (N, 1, 32, 32) in [0, 1] (cast to float32, moved to CPU).
        labels, seeds: integer tensors/arrays/sequences (N,) (cast to int64).

    Raises:
        ValueError: wrong shapes/dtypes/ranges, labels outside 0..9, or missing meta keys.
        TypeError: ``meta`` is not a dict.
        OSError: the file cannot be written (the temporary file is removed, ``path`` is left as it was).
    """
    from safetensors.torch import save_file

    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in SAMPLES_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"meta lacks the keys {missing} (needed: {list(SAMPLES_META_KEYS)})")
    imgs = as_image_batch(images, "images").to("cpu", torch.float32).contiguous()
    labs = torch.as_tensor(labels).detach().to("cpu", torch.int64).contiguous()
    sds = torch.as_tensor(seeds).detach().to("cpu", torch.int64).contiguous()
    imgs, labs, sds = _validate_set(imgs, labs, sds, str(path))
    header = {SAMPLES_METADATA_KEY: json.dumps(to_jsonable(meta), allow_nan=False, sort_keys=True)}

    tensors = {"images": imgs, "labels": labs, "seeds": sds}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_samples(path: str | os.PathLike) -> SampleSet:
    """Read a sample-set file written by :func:`save_samples` (format there).

    Returns:
        :class:`SampleSet` with CPU tensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, missing tensors or metadata, bad JSON, missing meta keys,
            wrong shapes/dtypes, images outside [0, 1], labels outside 0..9. The message names the file.
    """
    from safetensors import safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sample-set file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            keys = set(fh.keys())
            missing = [k for k in ("images", "labels", "seeds") if k not in keys]
            if missing:
                raise ValueError(f"{path}: missing tensors {missing}")
            tensors = {k: fh.get_tensor(k) for k in ("images", "labels", "seeds")}
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if SAMPLES_METADATA_KEY not in header:
        raise ValueError(f"{path}: header metadata lacks {SAMPLES_METADATA_KEY!r}")
    try:
        meta = json.loads(header[SAMPLES_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata {SAMPLES_METADATA_KEY!r} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata {SAMPLES_METADATA_KEY!r} must be a JSON object")
    missing = [k for k in SAMPLES_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks the keys {missing}")
    images, labels, seeds = _validate_set(tensors["images"], tensors["labels"], tensors["seeds"], path)
    return SampleSet(images=images, labels=labels, seeds=seeds, meta=meta, path=path)
