"""Weight fingerprint: identifies a checkpoint across dtypes and devices (not a cryptographic hash).

The hash covers every parameter and buffer name, its shape, and its sum and sum of absolute values
computed in float64 and rounded to 4 significant digits, so the same weights in float32, float64 or float16,
on CPU or GPU, give the same fingerprint while a different checkpoint (or a fused LoRA) gives another.
bfloat16 rounding moves most tensors' 4-digit sums, so a plan
made in float32 needs ``force=True`` on bfloat16 weights (a dtype-invariant fingerprint is open work).
"""

from __future__ import annotations

import hashlib

import torch

from .units import unwrap


def _sig(x: float) -> str:
    return f"{x:.4g}"


@torch.no_grad()
def weights_fingerprint(transformer) -> str:
    """``"sha256:<hex>"`` fingerprint of a transformer's weights.

    Args:
        transformer: an ``nn.Module`` (``torch.compile`` wrappers are unwrapped).

    Returns:
        The fingerprint string (71 characters).
    """
    model = unwrap(transformer)
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        d = t.detach().to(device="cpu", dtype=torch.float64)
        h.update(f"{name}|{tuple(t.shape)}|{_sig(float(d.sum()))}|{_sig(float(d.abs().sum()))};".encode())
    return "sha256:" + h.hexdigest()


class WeightWatch:
    """Notices, cheaply, that a module's weights may have changed since the last :meth:`refresh`.

    A change shows in a tensor's identity, storage pointer, shape, dtype or device, in its autograd version
    counter (every in-place op through the parameter: ``load_state_dict``, ``p.mul_(2)`` under
    ``no_grad``), or in a fixed sample of its elements (``PROBE`` evenly spaced values per tensor, which
    catches writes through ``p.data`` that bypass the version counter, as PEFT's LoRA fusion does). The
    cost per check is one small gather per tensor and one device-to-host copy, not a re-hash: a writer
    that changes only elements outside the sample through ``p.data`` goes unseen.
    """

    PROBE = 8

    def __init__(self, transformer):
        self.model = unwrap(transformer)
        self.refresh()

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.named_parameters()) + list(self.model.named_buffers())

    @staticmethod
    def _meta(tensors) -> tuple:
        return tuple((n, id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype, t.device) for n, t in tensors)

    @torch.no_grad()
    def _probe(self, tensors) -> torch.Tensor:
        """The sampled elements of every tensor as float64 bits (int64), on CPU."""
        parts = [t.detach().reshape(-1)[idx].to(torch.float64) for (_, t), idx in zip(tensors, self._idx)]
        return torch.cat(parts).cpu().view(torch.int64) if parts else torch.zeros(0, dtype=torch.int64)

    def refresh(self) -> None:
        """Take the current weights as the reference."""
        tensors = self._tensors()
        self._idx = [
            torch.linspace(0, max(t.numel() - 1, 0), min(self.PROBE, t.numel()), device=t.device).long()
            for _, t in tensors
        ]
        self._ref_meta = self._meta(tensors)
        self._ref_probe = self._probe(tensors)

    def changed(self) -> bool:
        """Whether anything watched differs from the reference (sampled values compared bit for bit)."""
        tensors = self._tensors()
        if self._meta(tensors) != self._ref_meta:
            return True
        return not torch.equal(self._probe(tensors), self._ref_probe)
