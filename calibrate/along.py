"""Calibration along a plan (trajectory calibration) and sensitivity copied from another calibration.

With ``along`` the samples follow a plan: its executor decides per unit and step, every unit is still
computed in shadow and recorded, and where the plan skips a unit its prediction is what flows
downstream — so the statistics describe the trajectory the plan really produces (docs/calibration.md,
"Calibration along a plan"). The sensitivity probes need the uncached trajectory, so such a run copies
the sensitivity of the uncached calibration (``sensitivity_from``) instead of measuring it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from cachec.runtime.fingerprint import weights_fingerprint
from cachec.runtime.io import file_sha256


@dataclass(frozen=True)
class AlongPlan:
    """The plan a trajectory calibration follows.

    Attributes:
        executor: its :class:`cachec.runtime.executor.PlanExecutor` (for :class:`~.recorder.ShadowRecorder`).
        info: the header's ``along_plan`` entry: ``{"plan_sha256", "method", "target", "realised", "options"}``.
    """

    executor: Any
    info: dict


@dataclass(frozen=True)
class CopiedSensitivity:
    """Sensitivity copied from another calibration file.

    Attributes:
        values: (U, S) float64, dimensionless.
        info: that file's ``sensitivity`` header entry (``method``, ``samples``, ``seconds``).
        sha256: hex SHA-256 of that file (the header's ``sensitivity.copied_from``).
    """

    values: np.ndarray
    info: dict
    sha256: str


def check_along(plan, transformer, units, steps: int, guidance: float, cfg: str, sensitivity: str) -> AlongPlan:
    """Load and check the plan of a trajectory calibration.

    Args:
        plan: a :class:`cachec.runtime.plan.Plan` or the path of its YAML file.
        transformer, units: the model and its UnitSpec list.
        steps, guidance, cfg, sensitivity: the calibration's settings.
    Returns:
        The :class:`AlongPlan`.
    Raises:
        ValueError: measured sensitivity requested, or the plan's steps, guidance, CFG mode or units differ.
        PlanMismatchError: the plan is for another model or other weights.
    """
    from cachec.runtime.plan import Plan, dump_plan, load_plan

    if sensitivity != "none":
        raise ValueError("a calibration along a plan does not measure sensitivity (the probes need the uncached "
                         "trajectory): pass sensitivity='none' and sensitivity_from=<the uncached calibration>")
    if not isinstance(plan, Plan):
        plan = load_plan(plan)
    if plan.steps != steps:
        raise ValueError(f"the plan has {plan.steps} steps but the calibration samples {steps}; use the plan's steps")
    g = plan.sampler.guidance
    if abs(g.scale - guidance) > 1e-9:
        raise ValueError(f"the plan was made for guidance {g.scale} but the calibration uses {guidance}")
    if g.mode in ("batched", "split") and g.mode != cfg:
        raise ValueError(f"the plan runs {g.mode} CFG but the calibration uses cfg={cfg!r}")
    from cachec.runtime.handle import plan_executor

    executor, plan_units = plan_executor(transformer, plan)  # raises PlanMismatchError for another model or weights
    if [u.name for u in plan_units] != [u.name for u in units]:
        raise ValueError("the plan's units are not the model's units in model order; make the plan from a "
                         "calibration of this model")
    info = {
        "plan_sha256": hashlib.sha256(dump_plan(plan).encode()).hexdigest(),
        "method": plan.budget.method,
        "target": plan.budget.target,
        "realised": plan.budget.realised,
        "options": plan.budget.options,
    }
    return AlongPlan(executor, info)


def copy_sensitivity(path, transformer, units, steps: int) -> CopiedSensitivity:
    """The sensitivity of another calibration of the same model, units and steps.

    Raises:
        FileNotFoundError: no such file.
        CalibrationError: not a calibration file.
        ValueError: other units or steps, or measured on other weights.
    """
    from .format import read_header, read_tensors

    h = read_header(path)
    names = [u["name"] for u in h["units"]]
    if names != [u.name for u in units] or h["steps"] != steps:
        raise ValueError(f"sensitivity_from {str(path)!r} has other units or steps ({len(names)} units, {h['steps']} "
                         f"steps) than this calibration ({len(units)} units, {steps} steps)")
    if h["model"]["fingerprint"] != weights_fingerprint(transformer):
        raise ValueError(f"sensitivity_from {str(path)!r} was measured on other weights")
    sens = np.asarray(read_tensors(path, ["sensitivity"])["sensitivity"], dtype=np.float64)
    st = os.stat(path)
    return CopiedSensitivity(sens, dict(h["sensitivity"]), _cached_sha256(str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    """:func:`cachec.runtime.io.file_sha256`, cached per (path, size, mtime): a refinement loop copies the
    sensitivity of the same uncached calibration (hundreds of MB) once per family and iteration."""
    return file_sha256(path)
