"""``DigitsPipeline``: the sampling loop of the reference models (class labels → digit images).

It drives a diffusers ``DiTTransformer2DModel`` and a diffusers scheduler exactly as diffusers' own
pipelines do (the transformer receives ``hidden_states``, ``timestep`` and ``class_labels`` keyword
arguments at every step), so cachec's hooks see the same calls they see inside ``DiTPipeline``. Unlike
``DiTPipeline`` it needs no VAE (pixel space) and its null class is the model's own
(``num_embeds_ada_norm``), not the hard-coded 1000, and it can run CFG as two calls per step.

What the rest of cachec needs to know about it (class labels, conditional half first in batched CFG, split
CFG available, this call signature) is its ``"digits"`` entry in :mod:`cachec.runtime.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


_EXPECTED_LABELS = "expected Python ints or an integer tensor"


def _check_label_types(class_labels) -> None:
    """Refuse class labels ``torch.as_tensor(..., dtype=torch.long)`` would silently coerce.

    Accepted: Python ints, numpy integer scalars and arrays, integer tensors (any shape), and
    (nested) sequences of these. Refused: bools (``True`` would become class 1), floats (``3.7`` would
    become 3) and anything else that is not an integer, and bool / float / complex tensors or arrays.

    Raises:
        ValueError: one line naming the first bad label (or the tensor's dtype) and what is expected.
    """
    if isinstance(class_labels, torch.Tensor):
        if class_labels.dtype == torch.bool or class_labels.is_floating_point() or class_labels.is_complex():
            first = f" (first label {class_labels.reshape(-1)[0].item()!r})" if class_labels.numel() else ""
            raise ValueError(f"class labels: a {class_labels.dtype} tensor is refused{first}: {_EXPECTED_LABELS}")
        return
    if isinstance(class_labels, np.ndarray):
        if class_labels.dtype.kind in "iu":
            return
        if class_labels.dtype.kind != "O":
            first = f" (first label {class_labels.reshape(-1)[0].item()!r})" if class_labels.size else ""
            raise ValueError(f"class labels: a numpy {class_labels.dtype} array is refused{first}: {_EXPECTED_LABELS}")
        for x in class_labels.reshape(-1):
            _check_label_types(x)
        return
    if isinstance(class_labels, (bool, np.bool_)):
        raise ValueError(f"class label {class_labels!r} is a bool, not a class index: {_EXPECTED_LABELS}")
    if isinstance(class_labels, (int, np.integer)):
        return
    if isinstance(class_labels, Sequence) and not isinstance(class_labels, (str, bytes)):
        for x in class_labels:
            _check_label_types(x)
        return
    raise ValueError(f"class label {class_labels!r} is not an integer: {_EXPECTED_LABELS}")


@dataclass
class DigitsOutput:
    """Result of a :class:`DigitsPipeline` call.

    Attributes:
        images: float32 (N, 1, 32, 32) in [0, 1].
        samples: the raw final samples in model space, float32 (N, 1, 32, 32), about [-1, 1].
    """

    images: torch.Tensor
    samples: torch.Tensor


class DigitsPipeline:
    """Class-conditional pixel-space sampling with classifier-free guidance.

    Args:
        transformer: a ``DiTTransformer2DModel`` with ``in_channels == out_channels``.
        scheduler: a diffusers scheduler (``FlowMatchEulerDiscreteScheduler`` or ``DDIMScheduler``).
        name: a display name (e.g. ``"digits-flow"``).
    """

    def __init__(self, transformer, scheduler, name: str = "digits"):
        self.transformer = transformer
        self.scheduler = scheduler
        self.name = name

    @property
    def num_classes(self) -> int:
        """Number of real classes; the null (unconditional) label is this index."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device=None, dtype=None) -> DigitsPipeline:
        self.transformer.to(device=device, dtype=dtype)
        return self

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample in model space."""
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def initial_noise(self, n: int, generator) -> torch.Tensor:
        """Initial noise (N, C, H, W), float32 on CPU; a list of N generators gives one per sample so a
        sample's noise does not depend on the batch it is drawn in."""
        shape = self.sample_shape
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} samples")
            return torch.stack([torch.randn(shape, generator=g) for g in generator])
        return torch.randn((n, *shape), generator=generator)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        cfg: str = "batched",
        callback: Callable[[int, int], None] | None = None,
    ) -> DigitsOutput:
        """Sample one image per class label.

        Args:
            class_labels: N ints in ``[0, num_classes)``: Python or numpy ints, or an integer tensor.
            num_inference_steps: sampling steps (> 0).
            guidance_scale: classifier-free guidance scale; ``<= 1`` disables guidance (one branch).
            generator: a generator or a list of N generators (one per sample).
            cfg: ``"batched"`` (conditional and unconditional in one transformer call, conditional first)
                or ``"split"`` (two calls per step, conditional first).
            callback: called as ``callback(step_index, num_steps)`` after each step.

        Raises:
            ValueError: a label out of range, a label that is not an integer (a bool such as ``True``, a
                float such as ``3.7``, a bool or float tensor; numpy integers are fine), a non-positive
                step count or an unknown ``cfg``.
        """
        _check_label_types(class_labels)
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = int(labels[(labels < 0) | (labels >= self.num_classes)][0])
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{self.num_classes - 1}")
        labels = labels.to(self.device)
        null = torch.full_like(labels, self.num_classes)
        return self._sample(labels.numel(), {"class_labels": labels}, {"class_labels": null}, num_inference_steps,
                            guidance_scale, generator, cfg, callback)

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The ``timestep`` the transformer receives for scheduler timestep ``t`` (DiT: ``t`` itself)."""
        return t

    def _predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        """One transformer call: sample-shaped input (B, C, H, W) → float32 prediction of that shape."""
        return self.transformer(hidden_states=x.to(self.dtype), timestep=timestep, **cond).sample.float()

    def _sample(self, n: int, cond: dict, uncond: dict, num_inference_steps: int, guidance_scale: float,
                generator, cfg: str, callback) -> DigitsOutput:
        """The sampling loop shared by the reference pipelines. ``cond``/``uncond``: the transformer's
        conditioning keyword arguments of the N conditional / unconditional rows (tensors with N rows)."""
        if int(num_inference_steps) <= 0:
            raise ValueError(f"the number of steps must be positive, got {num_inference_steps}")
        if cfg not in ("batched", "split"):
            raise ValueError(f"cfg must be 'batched' or 'split', got {cfg!r}")
        x = self.initial_noise(n, generator).to(device=self.device, dtype=torch.float32)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        guided = guidance_scale > 1.0
        both = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()} if guided and cfg == "batched" else None
        self.scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            tt = self._timestep(t)
            if both is not None:
                c, u = self._predict(torch.cat([x, x]), tt.expand(2 * n), both).chunk(2)
            elif guided:
                c = self._predict(x, tt.expand(n), cond)
                u = self._predict(x, tt.expand(n), uncond)
            else:
                c = u = self._predict(x, tt.expand(n), cond)
            pred = u + guidance_scale * (c - u) if guided else c
            x = self.scheduler.step(pred, t, x).prev_sample
            if callback is not None:
                callback(i, len(timesteps))
        return DigitsOutput(images=(x.clamp(-1, 1) + 1) / 2, samples=x)
