"""Weight fingerprint (identifies a checkpoint across dtypes and devices) and the cheap per-run weight watch.

:func:`weights_fingerprint` is not a cryptographic hash of the weights and makes no copy of them: it hashes,
for every entry of the module's ``state_dict`` (parameters and persistent buffers, in name order), the name,
the shape, whether it is floating point, and a fixed sample of its values, gathered where the weights are.

Sample: :data:`SAMPLES` values per tensor (all of them when it has fewer), in ``SAMPLES / RUN`` runs of
:data:`RUN` consecutive flat (row-major) indices whose starts step by a large prime modulo the tensor's size
(distinct runs spread over rows and columns; one memory read per run), gathered with ``torch.take`` on the
tensor's device (no copy of a non-contiguous tensor), cast to float32 there (exact for 16- and 32-bit
floats) and moved to the CPU in one transfer per device.

Canonical value of a sampled float: its round-to-nearest-even **bfloat16** value, with magnitudes below
2^-14 (float16's smallest normal, ≈ 6.1e-5) flushed to +0 and every NaN mapped to one NaN; the 2-byte
patterns are hashed. Integer and bool tensors are hashed as int64 values; complex ones as their real and
imaginary parts.

What is invariant (the same fingerprint), for a checkpoint stored as:

- float32: loaded in float32, bfloat16 or float64 (every value's bfloat16 rounding is the same). **Not** a
  float16 load: rounding to float16 first (3 more fraction bits than bfloat16) puts 1/8 of the values on a
  bfloat16 tie, and half of those then round to the other neighbour, so about 1 value in 16 differs and
  every tensor has some: a float16 load of a float32 checkpoint has its own fingerprint (calibrate on it,
  or force). ``tests/test_fingerprint_scale.py`` measures the fraction.
- bfloat16: any of float32, float64, bfloat16, float16 (bfloat16 values of magnitude ≥ 2^-14 are exact in
  float16, smaller ones are flushed), unless a value exceeds float16's range (65504).
- float16: any of float32, float64, bfloat16, float16.
- and on any device (CPU, CUDA, …), in any memory layout (contiguous, transposed, channels-last), with any
  placement of tensors over devices.

What it detects: another checkpoint; a renamed, added, removed or reshaped tensor; a fused LoRA or any
dense edit (``w.data += delta``, ``load_state_dict`` of other weights) that moves the bfloat16 rounding of
at least one sampled value. A dense relative edit ``w * (1 + ε·N(0, 1))`` moves a value's rounding with
probability ≈ 150ε (ε·E|N(0, 1)| over bfloat16's relative spacing, 2^-8…2^-7; measured in the tests), so
on one tensor of ≥ SAMPLES values it goes unseen with probability ≈ (1 - 150ε)^SAMPLES: ≈ 1e-27 for
ε = 1e-4, ≈ 2e-3 for ε = 1e-5, ≈ 0.5 for ε = 1e-6 (an edit of several tensors only if unseen on each).

What it cannot detect: edits of values outside the sample (a single-element edit of an n-element tensor
is seen with probability SAMPLES / n, e.g. 4096 / 1152² ≈ 0.3 %; scattered edits of a fraction f of the
values with probability ≈ 1 - (1 - f)^SAMPLES); edits too small to move any sampled value's bfloat16
rounding; changes of values below 2^-14 in magnitude; a permutation of values that maps the sample onto
itself; non-persistent buffers (not in ``state_dict``); the dtype (by design).

Cost: a few kernels per tensor on at most SAMPLES values and one device-to-host copy of 4 bytes per sampled
value, whatever the size of the tensors.
"""

from __future__ import annotations

import hashlib

import torch

from .units import unwrap

#: values sampled per tensor by :func:`weights_fingerprint`
SAMPLES = 4096
#: sampled values come in runs of RUN consecutive flat indices (one cache line of float32: a random read per
#: run, not per value)
RUN = 16
#: a prime stride between the sampled runs (mod the number of whole runs in the tensor)
STRIDE = 2654435761
#: canonical values of smaller magnitude are flushed to +0 (float16's smallest normal number)
TINY = 2.0 ** -14
_VERSION = b"cachec weights fingerprint v2\0"


def _sample(t: torch.Tensor, k: int, cache: dict) -> torch.Tensor:
    """The sampled values of ``t``: all of them when it has at most ``max(k, RUN)``, else ``k // RUN`` runs of
    :data:`RUN` consecutive flat (row-major) indices starting at ``RUN * ((j * STRIDE) mod (numel // RUN))``,
    ``j = 0, 1, …`` (distinct runs, spread over the tensor). A 1-D tensor of ``t``'s dtype on its device;
    complex tensors are sampled as their (real, imaginary) pairs. ``cache`` keeps the index tensors per
    (device, numel) for the call (a transformer's blocks share their shapes)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    n = t.numel()
    if n <= max(k, RUN):
        return t.reshape(-1)  # a view of a contiguous tensor; a copy of at most max(k, RUN) values otherwise
    key = (t.device, n)
    idx = cache.get(key)
    if idx is None:
        first = torch.arange(max(k // RUN, 1), dtype=torch.int64, device=t.device) * STRIDE
        starts = first.remainder(n // RUN).mul_(RUN)
        idx = cache[key] = (starts[:, None] + torch.arange(RUN, dtype=torch.int64, device=t.device)).reshape(-1)
    return torch.take(t, idx)


def _canonical(values: torch.Tensor) -> torch.Tensor:
    """float32 CPU values → their canonical bfloat16 bit patterns (int16): flush below :data:`TINY`, one NaN."""
    b = values.to(torch.bfloat16)
    b = torch.where(b.abs() < TINY, torch.zeros((), dtype=b.dtype), b)
    b = torch.where(torch.isnan(b), torch.full((), float("nan"), dtype=b.dtype), b)
    return b.view(torch.int16)


@torch.no_grad()
def weights_fingerprint(transformer, samples: int = SAMPLES) -> str:
    """``"sha256:<64 hex>"`` fingerprint of a module's weights (see the module docstring for what it covers).

    Args:
        transformer: an ``nn.Module`` (``torch.compile`` wrappers are unwrapped); its tensors may be of any
            dtype, on any devices.
        samples: values sampled per tensor (the plans' fingerprints use :data:`SAMPLES`).

    Returns:
        The fingerprint string (71 characters).

    Raises:
        ValueError: a tensor is on the ``meta`` device (weights not loaded: nothing to fingerprint).
    """
    model = unwrap(transformer)
    h = hashlib.sha256(_VERSION + type(model).__name__.encode())
    cache: dict = {}
    streams: dict = {}  # (device, "f" | "i") -> list of sampled tensors
    where = []  # per non-empty tensor: (device, kind, position in its stream)
    for name, t in sorted(model.state_dict().items()):  # detached tensors
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (weights not loaded): cannot fingerprint them")
        floating = t.is_floating_point() or t.is_complex()
        kind = "f" if floating else "i"
        s = _sample(t, samples, cache) if t.numel() else None
        h.update(f"{name}|{tuple(t.shape)}|{kind}|{0 if s is None else s.numel()};".encode())
        if s is None:
            continue
        part = streams.setdefault((t.device, kind), [])
        where.append((t.device, kind, len(part)))
        part.append(s.float() if floating else s.to(torch.int64))
    host = {}
    for key, parts in streams.items():
        sizes = [p.numel() for p in parts]
        flat = torch.cat(parts).cpu()
        host[key] = (_canonical(flat) if key[1] == "f" else flat).split(sizes)
    floats = [host[(d, k)][i] for d, k, i in where if k == "f"]
    ints = [host[(d, k)][i] for d, k, i in where if k == "i"]
    for seq, fmt in ((floats, "<i2"), (ints, "<i8")):
        if seq:
            h.update(torch.cat(seq).numpy().astype(fmt).tobytes())
    return "sha256:" + h.hexdigest()


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(sample: torch.Tensor) -> torch.Tensor:
    """The exact bit patterns of a sampled (contiguous, 1-D) tensor as int64 (floats bit for bit: -0.0 and
    each NaN payload count as different values)."""
    if sample.is_floating_point() and sample.element_size() in _BITS:
        sample = sample.view(_BITS[sample.element_size()])
    return sample.to(torch.int64)


class WeightWatch:
    """Notices, cheaply, that a module's weights may have changed since the last :meth:`refresh`.

    A change shows in a tensor's identity, storage pointer, shape, dtype or device, in its autograd version
    counter (every in-place op through the parameter: ``load_state_dict``, ``p.mul_(2)`` under
    ``no_grad``), or in a fixed sample of its elements (``PROBE`` evenly spaced values per tensor, compared
    bit for bit, which catches writes through ``p.data`` that bypass the version counter, as PEFT's LoRA
    fusion does). The cost per check is one small gather per tensor (``torch.take``: no copy of
    non-contiguous tensors) and one device-to-host copy, not a re-hash: a writer that changes only elements
    outside the sample through ``p.data`` goes unseen. A change seen here is only a reason to recompute
    :func:`weights_fingerprint`, which decides (an edit below its bfloat16 resolution is accepted).
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
        """The sampled elements of every tensor as their bit patterns (int64), on CPU."""
        by_device: dict = {}
        for (_, t), idx in zip(tensors, self._idx):
            t = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
            by_device.setdefault(t.device, []).append(_bits(torch.take(t, idx)))
        parts = [torch.cat(p).cpu() for p in by_device.values()]  # one transfer per device
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def refresh(self) -> None:
        """Take the current weights as the reference."""
        tensors = self._tensors()
        self._idx = []
        for _, t in tensors:
            n = t.numel() * (2 if t.is_complex() else 1)
            k = min(self.PROBE, n)  # evenly spaced integer positions (float32 linspace overshoots past 2**24)
            self._idx.append((torch.arange(k, device=t.device) * max(n - 1, 0)) // max(k - 1, 1))
        self._ref_meta = self._meta(tensors)
        self._ref_probe = self._probe(tensors)

    def changed(self) -> bool:
        """Whether anything watched differs from the reference (sampled values compared bit for bit)."""
        tensors = self._tensors()
        if self._meta(tensors) != self._ref_meta:
            return True
        return not torch.equal(self._probe(tensors), self._ref_probe)
