"""Sample-set files: generated images of any model with their conditions, seeds and settings, as safetensors.

``cachec sample`` and ``cachec run`` write them (:func:`save_samples`); ``cachec eval FILE.safetensors``
reads two of them and compares them (:func:`cachec.report.compare_sample_files`). One format for every
model family: images of any channel count and size, class labels or prompts.

Format version 2 (:data:`FORMAT_VERSION`), one safetensors file:

- tensors ``images`` float32 (N, C, H, W) in [0, 1]; ``seeds`` int64 (N,); ``labels`` int64 (N,) class
  labels (≥ 0) for class-conditional models, absent for text models;
- header metadata ``cachec_samples_format = "cachec-samples"``, ``cachec_samples_version = "2"``,
  ``cachec_samples`` = JSON object of the settings (``model``, ``steps``, ``guidance``,
  ``flops_per_image`` (FLOPs per image or null), ``wall_s`` (seconds or null), and by convention
  ``family``, ``condition_kind``, ``resolution`` [H, W], ``cfg``, ``plan`` (null for uncached samples, else
  ``{file, sha256, method, target, realised}``: the plan file's sha256 and its budget); extra keys kept) and,
  for text models, ``cachec_samples_prompts`` = JSON list of the N prompts.

Version 1 (cachec before format versions: no ``cachec_samples_version`` key) is the digit format —
images (N, 1, 32, 32), labels 0..9 — and is still read (``SampleSet.version == 1``); a file of a version
newer than this cachec knows is refused naming its version.

Writing (:func:`save_samples`) is atomic and may replace an older sample set, never another kind of file
(a calibration, a plan sidecar, anything that is not a sample set) unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .metrics import IMAGE_SHAPE, as_image_batch, check_unit_range
from .runtime.io import atomic_write, to_jsonable

__all__ = ["FORMAT", "FORMAT_VERSION", "SAMPLES_METADATA_KEY", "SAMPLES_META_KEYS", "SampleSet", "check_replaceable",
           "describe_file", "load_samples", "save_samples"]

FORMAT = "cachec-samples"
#: the sample-set format version this cachec writes (it reads 1 and 2)
FORMAT_VERSION = 2
#: safetensors metadata key holding the JSON description of a sample set
SAMPLES_METADATA_KEY = "cachec_samples"
FORMAT_KEY = "cachec_samples_format"
VERSION_KEY = "cachec_samples_version"
PROMPTS_KEY = "cachec_samples_prompts"
#: keys that the JSON metadata of a sample-set file must hold (values of the last two may be null)
SAMPLES_META_KEYS = ("model", "steps", "guidance", "flops_per_image", "wall_s")
#: safetensors metadata keys of the other cachec files, for naming them in refusals
_OTHER_KINDS = {"cachec_calibration": "a cachec calibration file"}


@dataclasses.dataclass(frozen=True)
class SampleSet:
    """A sample set read by :func:`load_samples`.

    Attributes:
        images: float32 (N, C, H, W) in [0, 1].
        labels: int64 (N,) requested classes (class-conditional sets), or None (prompt sets).
        seeds: int64 (N,) per-image seeds.
        meta: the decoded JSON metadata (at least ``model, steps, guidance, flops_per_image, wall_s``).
        path: the file it came from.
        prompts: the N prompts (prompt sets), or None.
        version: format version of the file (1 or 2).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    seeds: torch.Tensor
    meta: dict[str, Any]
    path: str = ""
    prompts: list[str] | None = None
    version: int = FORMAT_VERSION

    @property
    def conditions(self) -> list:
        """The N conditions: class labels (ints) or prompts (strs)."""
        return list(self.prompts) if self.prompts is not None else [int(x) for x in self.labels.tolist()]

    @property
    def condition_kind(self) -> str:
        """``"class"`` or ``"prompt"``."""
        return "prompt" if self.prompts is not None else "class"


def _desc(t: Any) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _validate_set(images: Any, labels: Any, seeds: Any, prompts: list | None, where: str, version: int):
    if not isinstance(images, torch.Tensor) or images.dtype != torch.float32 or images.ndim != 4:
        raise ValueError(f"{where}: images must be float32 (N, C, H, W), got {_desc(images)}")
    if version == 1 and tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{where}: a version-1 sample set holds (N, 1, 32, 32) digit images, got {tuple(images.shape)}")
    n = images.shape[0]
    check_unit_range(images, f"{where}: images")
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or tuple(seeds.shape) != (n,):
        raise ValueError(f"{where}: seeds must be int64 ({n},), got {_desc(seeds)}")
    if prompts is not None:
        if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{where}: prompts must be {n} strings, got {len(prompts)} items")
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
        raise ValueError(f"{where}: labels must be int64 ({n},), got {_desc(labels)}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got {int(labels.min())}")
    if version == 1 and n and int(labels.max()) > 9:
        raise ValueError(f"{where}: a version-1 sample set holds digit classes 0..9, got {int(labels.max())}")


def describe_file(path: str | os.PathLike) -> str | None:
    """What an existing file is: None for a cachec sample set (any version), else a short description
    (``"a cachec calibration file"``, ``"a plan sidecar"``, ``"a safetensors file that is not a sample set"``,
    ``"not a sample set"``, ``"a folder"``).

    Raises:
        FileNotFoundError: nothing at ``path``.
    """
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        return "a folder"
    if not p.exists():
        raise FileNotFoundError(f"no file at {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
    except Exception:  # not a safetensors file at all
        return "not a sample set"
    if SAMPLES_METADATA_KEY in header:
        return None
    for key, kind in _OTHER_KINDS.items():
        if key in header:
            return kind
    if p.name.endswith(".eoc.safetensors"):
        return "a plan sidecar"
    return "a safetensors file that is not a sample set"


def check_replaceable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to write a sample set over a file that is not one (unless ``overwrite``).

    Raises:
        FileExistsError: ``path`` exists and is not a sample set (the message names the file and what it is).
    """
    p = Path(path)
    if overwrite or not (p.exists() or p.is_symlink()):
        return
    kind = describe_file(p)
    if kind is not None:
        raise FileExistsError(f"{p} exists and is {kind}: refusing to replace it with samples (pass --overwrite)")


def _as_conditions(conditions: Any, n: int) -> tuple[torch.Tensor | None, list[str] | None]:
    if isinstance(conditions, torch.Tensor):
        if conditions.is_floating_point() or conditions.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got {conditions.dtype}")
        return conditions.detach().to("cpu", torch.int64).contiguous(), None
    items = list(conditions)
    if items and all(isinstance(c, str) for c in items):
        return None, items
    if any(isinstance(c, (bool, float, str)) for c in items):
        raise ValueError("conditions must be all class labels (ints) or all prompts (strs)")
    return torch.as_tensor(items, dtype=torch.int64).reshape(-1), None


def save_samples(path: str | os.PathLike, images: torch.Tensor, conditions: Any, seeds: Any, meta: dict[str, Any], *,
                 overwrite: bool = False) -> None:
    """Write a sample set (format version 2, module docstring) atomically
    (:func:`cachec.runtime.io.atomic_write`: readers never see a partial file). Parent folders are created.

    ``meta`` must hold ``model`` (str), ``steps`` (int), ``guidance`` (float), ``flops_per_image`` (FLOPs per
    image, or null) and ``wall_s`` (seconds, or null); extra keys are kept. It is converted with
    :func:`cachec.runtime.io.to_jsonable` (NaN → null, ±inf → ``"inf"``/``"-inf"``, arrays → lists, other
    objects → their ``str``).

    Args:
        images: float tensor (N, C, H, W) in [0, 1] (cast to float32, moved to CPU).
        conditions: N class labels (ints ≥ 0: tensor, array or sequence) or N prompts (strs).
        seeds: integer tensor/array/sequence (N,) (cast to int64).
        overwrite: replace ``path`` even when it is not a sample set.

    Raises:
        ValueError: wrong shapes/dtypes/ranges, negative or non-integer labels, mixed conditions, or missing
            meta keys.
        TypeError: ``meta`` is not a dict.
        FileExistsError: ``path`` exists and is not a sample set, and ``overwrite`` is false.
        OSError: the file cannot be written (the temporary file is removed, ``path`` is left as it was).
    """
    from safetensors.torch import save_file

    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in SAMPLES_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"meta lacks the keys {missing} (needed: {list(SAMPLES_META_KEYS)})")
    check_replaceable(path, overwrite)
    imgs = as_image_batch(images, "images").to("cpu", torch.float32).contiguous()
    labs, prompts = _as_conditions(conditions, imgs.shape[0])
    sds = torch.as_tensor(seeds).detach().to("cpu", torch.int64).contiguous()
    _validate_set(imgs, labs, sds, prompts, str(path), FORMAT_VERSION)
    header = {SAMPLES_METADATA_KEY: json.dumps(to_jsonable(meta), allow_nan=False, sort_keys=True),
              FORMAT_KEY: FORMAT, VERSION_KEY: str(FORMAT_VERSION)}
    tensors = {"images": imgs, "seeds": sds}
    if prompts is not None:
        header[PROMPTS_KEY] = json.dumps(prompts, ensure_ascii=False)
    else:
        tensors["labels"] = labs
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_samples(path: str | os.PathLike) -> SampleSet:
    """Read a sample-set file of format version 1 or 2 (module docstring).

    Returns:
        :class:`SampleSet` with CPU tensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, not a sample set (e.g. a calibration), a format version this cachec
            does not read (named), missing tensors or metadata, bad JSON, missing meta keys, wrong
            shapes/dtypes, images outside [0, 1], negative labels. The message names the file.
    """
    from safetensors import safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sample-set file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k) for k in ("images", "labels", "seeds") if k in keys}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if SAMPLES_METADATA_KEY not in header:
        kind = next((k for key, k in _OTHER_KINDS.items() if key in header), None)
        raise ValueError(f"{path}: " + (f"{kind}, not a sample set" if kind else
                                        f"header metadata lacks {SAMPLES_METADATA_KEY!r}: not a sample set"))
    raw_version = header.get(VERSION_KEY, "1")
    try:
        version = int(raw_version)
    except ValueError:
        raise ValueError(f"{path}: sample-set format version {raw_version!r} is not an integer") from None
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: sample-set format version {version}; this cachec reads versions 1 and {FORMAT_VERSION}")
    try:
        meta = json.loads(header[SAMPLES_METADATA_KEY])
        prompts = json.loads(header[PROMPTS_KEY]) if PROMPTS_KEY in header else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: sample-set metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata {SAMPLES_METADATA_KEY!r} must be a JSON object")
    if prompts is not None and (version == 1 or not isinstance(prompts, list)):
        raise ValueError(f"{path}: metadata {PROMPTS_KEY!r} must be a JSON list (format version 2)")
    missing = [k for k in SAMPLES_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks the keys {missing}")
    need = ("images", "seeds") if prompts is not None else ("images", "labels", "seeds")
    missing = [k for k in need if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    labels = tensors.get("labels") if prompts is None else None
    _validate_set(tensors["images"], labels, tensors["seeds"], prompts, path, version)
    return SampleSet(images=tensors["images"], labels=labels, seeds=tensors["seeds"], meta=meta, path=path,
                     prompts=prompts, version=version)


def plan_identity(plan_path: str | os.PathLike, plan) -> dict[str, Any]:
    """The ``plan`` entry of a cached sample set: ``{file, sha256, method, target, realised}`` (sha256 of the
    plan YAML file; the budget's method, target and realised FLOPs fractions).

    Raises:
        OSError: the plan file cannot be read.
    """
    from .runtime.io import file_sha256

    b = plan.budget
    return {"file": str(plan_path), "sha256": file_sha256(plan_path), "method": b.method, "target": b.target,
            "realised": b.realised}


def sample_meta(driver, *, steps: int, guidance: float, flops_per_image: float | None, wall_s: float | None,
                cfg: str = "batched", plan: dict | None = None, **extra: Any) -> dict[str, Any]:
    """The settings of a sample set made with ``driver`` (the keys of the module docstring)."""
    return {"model": driver.name, "family": driver.spec.name, "condition_kind": driver.condition_kind,
            "resolution": list(driver.resolution), "steps": int(steps), "guidance": float(guidance), "cfg": cfg,
            "plan": plan, "flops_per_image": flops_per_image, "wall_s": wall_s, **extra}

