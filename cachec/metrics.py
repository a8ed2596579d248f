"""Pixel metrics of image pairs (PSNR, SSIM) and the checks every quality function applies to its inputs.

Image convention of the quality functions (here, :mod:`cachec.classifier`, :mod:`cachec.report`,
:mod:`cachec.samples`): float tensors of shape (N, 1, 32, 32) with values in [0, 1] (0 = black background,
1 = white stroke), MNIST digits padded 28→32 by 2 px on each side. Model space is [-1, 1]: map with
``(x + 1) / 2``. Labels are int64 digit classes 0..9.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["IMAGE_SHAPE", "as_image_batch", "as_labels", "check_unit_range", "mean_ci", "psnr", "ssim"]

#: (C, H, W) of one image of the reference models
IMAGE_SHAPE = (1, 32, 32)


# --------------------------------------------------------------------------------------------------------
# input checks


def as_image_batch(x: Any, name: str) -> torch.Tensor:
    """``x`` detached, after checking it is a 4-d floating tensor (N, C, H, W) (values are not checked).

    Raises:
        TypeError: not a tensor. ValueError: not 4-d or not floating point (``name`` is in the message).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor with values in [0, 1], got {x.dtype}")
    return x.detach()


def _pair(candidate: Any, reference: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = as_image_batch(candidate, "candidate")
    b = as_image_batch(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"candidate and reference shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.to("cpu", torch.float64), b.to("cpu", torch.float64)


def check_unit_range(x: torch.Tensor, name: str) -> None:
    """Check that every value of ``x`` is finite and lies in [0, 1] (an empty tensor passes).

    Raises:
        ValueError: NaN/inf, or a value outside [0, 1] (the message gives the range found and the mapping
            from model space).
    """
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


def as_labels(labels: Any, n: int, name: str = "labels") -> torch.Tensor:
    """``labels`` (tensor, array or sequence) as an int64 CPU tensor (n,) of digit classes 0..9.

    Raises:
        ValueError: not of shape (n,), not integers (floats and bools are refused), or outside 0..9.
    """
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
# confidence intervals


def mean_ci(values: torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Paired bootstrap confidence interval of the mean of per-pair scores (e.g. PSNR of each cached image
    against its uncached twin of the same condition and seed): the pairs are resampled with replacement
    ``resamples`` times (a fixed generator seeded with ``seed``, so the interval is reproducible) and the
    interval is the ``(1 − level)/2`` and ``(1 + level)/2`` percentiles of the resampled means.

    Args:
        values: (N,) per-pair scores (any float dtype; computed in float64).
        level: coverage in (0, 1).

    Returns:
        ``(low, high)`` in the unit of ``values``, or None when it means nothing: fewer than 2 pairs, or a
        non-finite score (PSNR of bit-identical images is +inf).

    Raises:
        ValueError: ``level`` outside (0, 1), ``resamples < 1`` or ``values`` not 1-d.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    v = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-d (N,), got {tuple(v.shape)}")
    n = v.shape[0]
    if n < 2 or not bool(torch.isfinite(v).all()):
        return None
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (int(resamples), n), generator=g)
    means = v[idx].mean(dim=1)
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return float(lo), float(hi)


def paired_difference(new, old, level: float = 0.95, resamples: int = 10000, seed: int = 0,
                      cap: float | None = None) -> tuple[float, float | None, float | None]:
    """Mean per-pair difference ``new − old`` (e.g. per-image PSNR of two methods on the same images) and
    its paired bootstrap interval (:func:`mean_ci` of the differences).

    Args:
        new, old: (N,) per-pair scores of the same pairs, in the same order.
        cap: scores above it (e.g. +inf PSNR of bit-identical images) count as ``cap``; None: no cap.

    Returns:
        ``(mean, low, high)``; ``low``/``high`` None when :func:`mean_ci` gives no interval.

    Raises:
        ValueError: different lengths, or as :func:`mean_ci`.
    """
    a = torch.as_tensor(new, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(old, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same pairs: {a.numel()} vs {b.numel()}")
    if cap is not None:
        a, b = a.clamp(max=cap), b.clamp(max=cap)
    d = a - b
    ci = mean_ci(d, level=level, resamples=resamples, seed=seed)
    return float(d.mean()), (ci[0] if ci else None), (ci[1] if ci else None)
