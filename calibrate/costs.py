"""Unit costs: FLOPs (counted once, on the first transformer call) and latency (timed by the recorder).

FLOPs are floating-point operations as :mod:`cachec.runtime.flops` counts them (a multiply-add counts 2),
for ONE sample of ONE guidance branch; latencies are wall seconds per unit call at the calibration batch
size (docs/calibration.md, "Costs").
"""

from __future__ import annotations

import numpy as np
import torch

from cachec.runtime.hooks import batch_size_of
from cachec.runtime.units import unwrap

#: the header's ``flops.counter``
FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode (SDPA math backend)"


def count_unit_flops(transformer, units, captured) -> tuple[list[float], float, float]:
    """FLOPs of one call for one sample of one branch: per unit, full forward, fixed (never-cached) part.

    Runs the captured first transformer call once more under :func:`cachec.runtime.flops.count_flops` —
    on fake tensors (FLOP counts depend on shapes only: no arithmetic, no activation memory), or for real
    where the forward needs tensor values — and divides by its batch rows.

    Args:
        transformer: the (possibly wrapped) transformer.
        units: its UnitSpec list.
        captured: ``(args, kwargs)`` of a transformer call (the recorder's ``captured``).
    Returns:
        ``(unit_flops, full_step, fixed_step)``: U floats, and two floats with
        ``fixed_step = full_step - sum(unit_flops)``. A unit that holds nested units (an attention-map unit,
        :attr:`~cachec.runtime.units.UnitSpec.parent`) is counted without them, so every FLOP is in one unit.
    """
    from cachec.runtime.flops import count_flops, relative_module_flops

    args, kwargs = captured
    rows = batch_size_of(args, kwargs)
    with torch.no_grad():
        try:
            total, per_module = _count_on_fake_tensors(transformer, args, kwargs, count_flops)
        except Exception:  # a model whose forward reads tensor values (data-dependent control flow)
            _, total, per_module = count_flops(transformer, *args, **kwargs)
    rel = relative_module_flops(per_module, unwrap(transformer))
    unit = [rel.get(u.name, 0) / rows for u in units]
    for i, u in enumerate(units):  # a parent's count holds its nested units' FLOPs: take them out
        unit[i] -= sum(rel.get(v.name, 0) for v in units if v.parent == u.name) / rows
    full = rel.get("", total) / rows
    return unit, float(full), float(full - sum(unit))


def _count_on_fake_tensors(transformer, args, kwargs, count_flops) -> tuple[int, dict[str, int]]:
    """The FLOP count of one call run on fake tensors (``torch._subclasses.FakeTensorMode``): shapes
    propagate, nothing is computed or allocated, so counting costs neither the forward's time nor its
    activation memory (the MATH attention kernel's score matrices: 4.4 GB for one FLUX block at 1024²).

    Raises:
        Whatever the fake forward raises (e.g. a data-dependent operation); the caller then counts a real call.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        _, total, per_module = count_flops(transformer, *args, **kwargs)
    return total, per_module


def mean_latency(lat_sum: np.ndarray, lat_count: np.ndarray) -> np.ndarray:
    """(U,) float64 mean seconds per unit call; 0 where a unit was never timed."""
    return np.where(lat_count > 0, lat_sum / np.maximum(lat_count, 1), 0.0)
