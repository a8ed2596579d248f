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

    Runs the captured first transformer call once more under :func:`cachec.runtime.flops.count_flops`
    (FLOP counts depend on shapes only) and divides by its batch rows.

    Args:
        transformer: the (possibly wrapped) transformer.
        units: its UnitSpec list.
        captured: ``(args, kwargs)`` of a transformer call (the recorder's ``captured``).
    Returns:
        ``(unit_flops, full_step, fixed_step)``: U floats, and two floats with
        ``fixed_step = full_step - sum(unit_flops)``.
    """
    from cachec.runtime.flops import count_flops, relative_module_flops

    args, kwargs = captured
    rows = batch_size_of(args, kwargs)
    with torch.no_grad():
        _, total, per_module = count_flops(transformer, *args, **kwargs)
    rel = relative_module_flops(per_module, unwrap(transformer))
    unit = [rel.get(u.name, 0) / rows for u in units]
    full = rel.get("", total) / rows
    return unit, float(full), float(full - sum(unit))


def mean_latency(lat_sum: np.ndarray, lat_count: np.ndarray) -> np.ndarray:
    """(U,) float64 mean seconds per unit call; 0 where a unit was never timed."""
    return np.where(lat_count > 0, lat_sum / np.maximum(lat_count, 1), 0.0)
