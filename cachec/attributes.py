"""Measurable attributes of a digit image: stroke thickness and slant, in three bins each.

The prompt-conditioned reference model (``digits-mmdit``, :mod:`cachec.reference_mmdit`) is trained on
prompts that name a digit's class *and* these two attributes, so prompt adherence can be scored beyond class
accuracy: generate for "a thick right-leaning seven", measure the image, check the bins.

- **thickness** (pixels): mean stroke width ``2 · area / boundary`` of the ink (pixels > 0.5), where
  ``boundary`` counts ink pixels with a non-ink 4-neighbour (a stroke of length L and width w has
  area ≈ w·L and ≈ 2L boundary pixels).
- **slant** (dimensionless, + = top leans right): ``−μ11 / μ02`` of the ink's intensity-weighted central
  moments (x = column, y = row downward), the shear MNIST deskewing removes.

Bins are the per-class terciles of the training digits (:func:`cachec.data.split_digits`), so on real
training digits each bin holds one third of every class: **chance adherence is 1/3 per attribute** (1/9
for both).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: the three bins of each attribute, in order (the words of :mod:`cachec.digit_prompts` name them)
BINS = 3


def _as_batch(images) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) in [0, 1] (torch or numpy) → float32 numpy (N, H, W)."""
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    x = x.astype(np.float32)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"digit attributes need 1-channel images, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"digit attributes need (N, 1, H, W) or (N, H, W) images, got shape {tuple(x.shape)}")
    return x


def thickness(images) -> np.ndarray:
    """Mean stroke width in pixels, float64 (N,); 0 for an image without ink.

    Args:
        images: (N, 1, H, W) or (N, H, W) in [0, 1].
    """
    ink = _as_batch(images) > 0.5
    p = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    inner = p[:, 1:-1, 1:-1] & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    area = ink.sum((1, 2)).astype(np.float64)
    boundary = (ink & ~inner).sum((1, 2)).astype(np.float64)
    return 2.0 * area / np.maximum(boundary, 1.0)


def slant(images) -> np.ndarray:
    """Shear ``−μ11/μ02`` of the ink, float64 (N,) (+: top leans right; 0 for an image without ink).

    Args:
        images: (N, 1, H, W) or (N, H, W) in [0, 1].
    """
    x = _as_batch(images).astype(np.float64)
    h, w = x.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    m = x.sum((1, 2)) + 1e-9
    cy = (x * yy).sum((1, 2)) / m
    cx = (x * xx).sum((1, 2)) / m
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    return -(x * dx * dy).sum((1, 2)) / ((x * dy * dy).sum((1, 2)) + 1e-9)


MEASURES = {"thickness": thickness, "slant": slant}


@lru_cache(maxsize=1)
def tercile_edges() -> dict[str, np.ndarray]:
    """Per-class bin edges of each attribute from the training digits: ``{name: float64 (10, 2)}``
    (the 1/3 and 2/3 quantiles of class c in row c)."""
    from .data import split_digits

    (images, labels), _ = split_digits()
    x = images.astype(np.float32) / 255.0
    edges = {}
    for name, fn in MEASURES.items():
        v = fn(x)
        edges[name] = np.stack([np.quantile(v[labels == c], [1 / 3, 2 / 3]) for c in range(10)])
    return edges


def bins(images, classes) -> dict[str, np.ndarray]:
    """The attribute bin (0, 1, 2: thin/medium/thick, left-leaning/upright/right-leaning) of each image, judged
    against the edges of ``classes`` (the class each image is meant to be).

    Args:
        images: (N, 1, H, W) or (N, H, W) in [0, 1]; 28×28 digits or 32×32 ones padded by 2 px (the
            measures are translation-invariant, so the padding does not matter).
        classes: N ints in 0..9.

    Returns:
        ``{"thickness": int64 (N,), "slant": int64 (N,)}``.

    Raises:
        ValueError: shapes or a class out of range.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    x = _as_batch(images)
    if len(classes) != len(x):
        raise ValueError(f"got {len(classes)} classes for {len(x)} images")
    if len(classes) and (classes.min() < 0 or classes.max() > 9):
        raise ValueError("digit classes must be in 0..9")
    edges = tercile_edges()
    out = {}
    for name, fn in MEASURES.items():
        v = fn(x)
        e = edges[name][classes]
        out[name] = (v > e[:, 0]).astype(np.int64) + (v > e[:, 1]).astype(np.int64)
    return out


def adherence(images, targets) -> dict:
    """Adherence of digit images to the attribute bins they were generated for.

    Args:
        images: (N, 1, H, W) in [0, 1].
        targets: N tuples ``(class, thickness bin or None, slant bin or None)``
            (:func:`cachec.digit_prompts.parse` of each prompt).

    Returns:
        ``{"thickness": f, "slant": f, "both": f, "n": {...}, "chance": {...}}``: f is the fraction of the
        images whose target names that attribute (both, for ``"both"``) and whose measured bin matches it,
        judged against the target class's bin edges (None when no target names it); ``n`` the number of such
        images; ``chance`` 1/3, 1/3 and 1/9 (the bins are training-set terciles per class).

    Raises:
        ValueError: shapes as :func:`bins`.
    """
    targets = list(targets)
    got = bins(images, [t[0] for t in targets])
    hits = {"thickness": [], "slant": [], "both": []}
    for i, (_, t, s) in enumerate(targets):
        ok_t = None if t is None else bool(got["thickness"][i] == t)
        ok_s = None if s is None else bool(got["slant"][i] == s)
        if ok_t is not None:
            hits["thickness"].append(ok_t)
        if ok_s is not None:
            hits["slant"].append(ok_s)
        if ok_t is not None and ok_s is not None:
            hits["both"].append(ok_t and ok_s)
    out = {k: (sum(v) / len(v) if v else None) for k, v in hits.items()}
    out["n"] = {k: len(v) for k, v in hits.items()}
    out["chance"] = {"thickness": 1 / BINS, "slant": 1 / BINS, "both": 1 / BINS ** 2}
    return out
