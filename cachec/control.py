"""Control signals of ``digits-mmdit-control``: ink masks, (prompt, mask) conditions, control fidelity (IoU).

- **Ink mask**: the pixels of a digit above 0.5 (in [0, 1]; above 0 in model space [-1, 1]), float32 0/1,
  (N, 1, 32, 32) (28 × 28 digits padded by 2 px). Packed like the image tokens (4 × 4 patches, (N, 64, 16))
  it is the ControlNet's ``controlnet_cond``. In training the mask is the training digit's own.
- **Mask splits**: the 50 held-out digits per class of :func:`cachec.data.split_digits` (never trained on)
  are split, in data order, into ``calibration`` masks (the first 25 of each class) and ``held-out`` masks
  (the last 25): disjoint. Mask ``SPLIT:K`` is digit ``K mod 25`` of class ``K // 25`` of that split
  (K in 0..249).
- **Conditions**: one string ``"PROMPT | SPLIT:K"``, e.g. ``"a thick upright seven | held-out:187"``, so
  every cachec command takes (prompt, mask) pairs as it takes prompts (``--prompt``, ``--prompts FILE``).
  :func:`condition_set` pairs each prompt of the shipped prompt set of the same name
  (:func:`cachec.digit_prompts.prompt_set`) with masks of its class from the same split, the masks whose
  measured thickness/slant bins are closest to the prompt's, no mask used twice: ``calibration`` 30
  conditions (one mask per prompt), ``held-out`` 90 (three per prompt).
- **Control IoU** (:func:`control_iou`): per image, |ink ∩ mask| / |ink ∪ mask| of the generated ink
  (pixels > 0.5) and the control mask; 1 when both are empty.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

import numpy as np

from .digit_prompts import parse, prompt_set

NAME = "digits-mmdit-control"
BASE = "digits-mmdit"  # the generator the ControlNet drives
MASK_SPLITS = ("calibration", "held-out")
MASKS_PER_CLASS = 25  # per split and class (the 50 held-out digits per class, halved)
INK_THRESHOLD = 0.5
#: masks per prompt in :func:`condition_set`
PER_PROMPT = {"calibration": 1, "held-out": 3}
_CONDITION = re.compile(r"^(?P<prompt>.*?)\s*\|\s*(?P<split>[\w-]+):(?P<k>\d+)\s*$")
FORMAT = "'PROMPT | SPLIT:K' (SPLIT calibration or held-out, K in 0..249), e.g. 'a thick upright seven | held-out:187'"


def ink_mask(images) -> np.ndarray:
    """Ink of images in [0, 1]: float32 0/1 of the same shape (pixels > :data:`INK_THRESHOLD`)."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return (x > INK_THRESHOLD).astype(np.float32)


def control_iou(images, masks) -> np.ndarray:
    """Control fidelity: IoU of the generated ink with the control mask, per image.

    Args:
        images: (N, 1, H, W) (or (N, H, W)) in [0, 1] (torch or numpy).
        masks: control masks of the same shape, 0/1 (values > 0.5 count as mask).

    Returns:
        float64 (N,) in [0, 1]: |ink ∩ mask| / |ink ∪ mask|, 1.0 where both are empty.

    Raises:
        ValueError: shapes differ.
    """
    ink, mask = ink_mask(images) > 0.5, ink_mask(masks) > 0.5
    if ink.shape != mask.shape:
        raise ValueError(f"images {ink.shape} and control masks {mask.shape} differ in shape")
    axes = tuple(range(1, ink.ndim))
    inter = (ink & mask).sum(axes).astype(np.float64)
    union = (ink | mask).sum(axes).astype(np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


@lru_cache(maxsize=2)
def mask_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(masks float32 (250, 1, 32, 32) 0/1, digits float32 (250, 1, 32, 32) in [0, 1])`` of a mask split,
    ordered class-major (row K = class K // 25).

    Raises:
        ValueError: unknown split.
    """
    from .data import split_digits

    if split not in MASK_SPLITS:
        raise ValueError(f"unknown mask split {split!r}; splits: {', '.join(MASK_SPLITS)}")
    _, (images, labels) = split_digits()
    half = 0 if split == "calibration" else 1
    rows = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rows.append(idx[half * MASKS_PER_CLASS:(half + 1) * MASKS_PER_CLASS])
    digits = np.pad(images[np.concatenate(rows)].astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))[:, None]
    return ink_mask(digits), digits


def split_condition(condition: str, require_mask: bool = False) -> tuple[str, tuple[str, int] | None]:
    """``"PROMPT | SPLIT:K"`` → ``(PROMPT, (SPLIT, K))``; a plain prompt → ``(prompt, None)``.

    Raises:
        ValueError: a mask reference that is malformed or out of range, a prompt outside the grammar of
            :mod:`cachec.digit_prompts`, or (``require_mask``) no mask.
    """
    m = _CONDITION.match(condition)
    if m is None:
        if "|" in condition or require_mask:
            raise ValueError(f"condition {condition!r} needs a control mask: write {FORMAT}")
        return condition, None
    prompt, split, k = m.group("prompt"), m.group("split"), int(m.group("k"))
    if split not in MASK_SPLITS or not 0 <= k < 10 * MASKS_PER_CLASS:
        raise ValueError(f"condition {condition!r}: no mask {split}:{k}; write {FORMAT}")
    parse(prompt)
    return prompt, (split, k)


def prompt_of(condition: str) -> str:
    """The prompt part of a condition (the condition itself when it names no mask)."""
    return split_condition(condition)[0]


def held_out_condition(condition) -> bool:
    """Whether a condition names a ``held-out`` mask or a held-out prompt (:func:`cachec.digit_prompts.prompt_set`):
    ``cachec calibrate`` refuses those, so a plan is never evaluated on its own calibration masks or prompts."""
    if not isinstance(condition, str) or "|" not in condition:
        return False
    try:
        prompt, ref = split_condition(condition)
    except ValueError:
        return False  # not a control condition: the pipeline refuses it when sampling
    return (ref is not None and ref[0] == "held-out") or prompt in prompt_set("held-out")


def masks_of(refs: Sequence[tuple[str, int]]):
    """Control masks of ``(split, K)`` references: float32 torch (N, 1, 32, 32), 0/1."""
    import torch

    return torch.from_numpy(np.stack([mask_split(s)[0][k] for s, k in refs])) if refs else torch.zeros(0, 1, 32, 32)


def condition_masks(conditions: Sequence) -> np.ndarray | None:
    """The control masks of conditions (float32 (N, 1, 32, 32)) when every one names a mask, else None."""
    if not conditions or not all(isinstance(c, str) for c in conditions):
        return None
    refs = [split_condition(c)[1] for c in conditions]
    if any(r is None for r in refs):
        return None
    return masks_of(refs).numpy()


@lru_cache(maxsize=2)
def condition_set(name: str) -> list[str]:
    """The shipped condition set ``name`` (``"calibration"``: 30, ``"held-out"``: 90; see the module docstring).

    Raises:
        ValueError: unknown name.
    """
    from .attributes import bins

    prompts = prompt_set(name)  # raises on an unknown name
    _, digits = mask_split(name)
    classes = np.repeat(np.arange(10), MASKS_PER_CLASS)
    b = bins(digits, classes)
    used: set[int] = set()
    out = []
    for p in prompts:
        d, t, s = parse(p)
        cand = [k for k in range(d * MASKS_PER_CLASS, (d + 1) * MASKS_PER_CLASS) if k not in used]
        cand.sort(key=lambda k: (abs(int(b["thickness"][k]) - t) + abs(int(b["slant"][k]) - s), k))
        for k in cand[:PER_PROMPT[name]]:
            used.add(k)
            out.append(f"{p} | {name}:{k}")
    return out
