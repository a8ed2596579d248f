"""Fréchet distance between Gaussians fitted to two feature sets.

Fed the digit classifier's features (:func:`cachec.classifier.classify`) of a sample set and of the 500
held-out real digits (:func:`cachec.classifier.reference_features`), it is the "Fréchet distance
(digit-classifier features)" of the quality reports. It is built like FID but on a different network and
data, so its values are not comparable with FID and must never be called FID.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["FRECHET_NAME", "frechet_distance"]

#: the name the reports give the distance (never "FID")
FRECHET_NAME = "Fréchet distance (digit-classifier features)"


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
