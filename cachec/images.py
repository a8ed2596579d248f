"""Image grids as PNG files (matplotlib writes them; no other image library needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .runtime.io import atomic_write


def make_grid(images: torch.Tensor, ncols: int = 10, pad: int = 2) -> np.ndarray:
    """Tile images into one array.

    Args:
        images: float (N, C, H, W) in [0, 1], C = 1 or 3.
        ncols: images per row.
        pad: pixels of white padding between images.

    Returns:
        float32 (rows·(H+pad)+pad, ncols·(W+pad)+pad, 3) in [0, 1].
    """
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i].permute(1, 2, 0).numpy()
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 4) -> Path:
    """Write an (H, W, 3) float array in [0, 1] as a PNG, upscaled ``scale``× (nearest), atomically.

    The file is PNG whatever the suffix of ``path``; it is written with :func:`cachec.runtime.io.atomic_write`
    (missing parent folders are created).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        OSError: the file cannot be written (``path`` is left as it was).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    big = np.kron(array, np.ones((scale, scale, 1), dtype=array.dtype)) if scale > 1 else array
    return atomic_write(path, lambda tmp: plt.imsave(str(tmp), np.clip(big, 0, 1), format="png"))


def side_by_side(left: torch.Tensor, right: torch.Tensor, ncols: int = 10) -> np.ndarray:
    """Two grids of the same images next to each other (e.g. uncached | cached), separated by a gap."""
    a, b = make_grid(left, ncols), make_grid(right, ncols)
    gap = np.ones((a.shape[0], 8, 3), dtype=np.float32) * 0.5
    return np.concatenate([a, gap, b], axis=1)
