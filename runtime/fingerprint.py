"""Weight fingerprint: identifies a checkpoint across dtypes and devices (not a cryptographic hash).

The hash covers every parameter and buffer name, its shape, and its sum and sum of absolute values
computed in float64 and rounded to 4 significant digits, so the same weights loaded in float32 on CPU or
bfloat16 on GPU give the same fingerprint while a different checkpoint (or a fused LoRA) gives another.
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
