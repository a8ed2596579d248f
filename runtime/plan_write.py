"""Deterministic plan writing: :class:`Plan` → YAML text, and atomic plan + sidecar files.

The only place that names and hashes a plan's sidecar (``write_plan``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write
from .plan_parse import _check_relative, _check_sidecar_tensors, parse_plan
from .plan_schema import SCHEMA_VERSION, Plan, PlanError, Sidecar


def to_dict(plan: Plan) -> dict:
    """The plan as a plain mapping in the canonical key order of the format (floats as Python floats)."""
    s, b, p = plan.sampler, plan.budget, plan.provenance
    units = []
    for u in plan.units:
        comp = {}
        for step in sorted(u.compensation):
            c = u.compensation[step]
            entry: dict[str, Any] = {"coeffs": [float(x) for x in c.coeffs]}
            if c.eoc_alpha != 0.0:
                entry["eoc_alpha"] = float(c.eoc_alpha)
            comp[int(step)] = entry
        units.append({"name": u.name, "flops": float(u.flops), "actions": u.actions, "compensation": comp})
    return {
        "cachec_plan": int(plan.version),
        "model": {
            "class": plan.model.cls,
            "fingerprint": plan.model.fingerprint,
            "adapters": list(plan.model.adapters),
            "source": plan.model.source,
        },
        "sampler": {
            "scheduler": s.scheduler,
            "steps": int(s.steps),
            "timesteps": [float(t) for t in s.timesteps],
            "sigmas": None if s.sigmas is None else [float(x) for x in s.sigmas],
            "guidance": {
                "mode": s.guidance.mode,
                "scale": float(s.guidance.scale),
                "branches": int(s.guidance.branches),
            },
            "resolution": [int(r) for r in s.resolution],
        },
        "budget": {
            "method": b.method,
            "target": float(b.target),
            "realised": float(b.realised),
            "full_step_flops": float(b.full_step_flops),
            "fixed_step_flops": float(b.fixed_step_flops),
            "options": _sorted_plain(b.options),
        },
        "predicted_error": None if plan.predicted_error is None else float(plan.predicted_error),
        "history": plan.history,
        "units": units,
        "sidecar": None if plan.sidecar is None else {"file": plan.sidecar.file, "sha256": plan.sidecar.sha256},
        "provenance": {
            "calibration_sha256": p.calibration_sha256,
            "conditions": int(p.conditions),
            "samples": int(p.samples),
            "cachec_version": p.cachec_version,
            "created": p.created,
        },
    }


def _sorted_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _sorted_plain(v[k]) for k in sorted(v)}
    if isinstance(v, (list, tuple)):
        return [_sorted_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars from the planner
        return v.item()
    return v


class _Dumper(yaml.SafeDumper):
    """SafeDumper that never emits aliases (shared lists would otherwise become &id001 anchors) and writes
    text with U+0085 double-quoted (PyYAML writes it raw in single quotes, where YAML reads it as a line
    break folded to a space: the text would not load back)."""

    def ignore_aliases(self, data):
        return True

    def choose_scalar_style(self):
        if "\x85" in self.event.value:
            return '"'
        return super().choose_scalar_style()


def dump_plan(plan: Plan) -> str:
    """Serialise a plan to YAML text, deterministically.

    The plan is validated first (the text always loads back). Keys follow the order of the format, floats
    are written at ``repr`` precision, leaf lists in flow style; nothing depends on the time of writing.

    Raises:
        PlanError: the plan object violates the schema.
    """
    data = to_dict(plan)
    parse_plan(data)  # never write what cannot be read back
    header = f"# cachec plan (schema {SCHEMA_VERSION}); format: docs/plan-format.md\n"
    body = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100, allow_unicode=True
    )
    return header + body


def write_plan(plan: Plan, path: str | os.PathLike, sidecar_tensors: dict[str, Any] | None = None) -> Plan:
    """Write a plan YAML (and its sidecar) atomically (temporary file + ``os.replace``).

    Args:
        plan: the plan. Its ``sidecar`` entry is (re)computed here: the file name is kept if set, else
            ``<plan stem>.eoc.safetensors``; the sha256 is that of the bytes written.
        path: destination YAML path.
        sidecar_tensors: ``{"eoc/{unit}/{step}[/{part}]": numpy array}`` (per-sample shape of the unit
            output, float32). None: the plan must need no sidecar, or it was loaded from a file whose sidecar
            is copied.

    Returns:
        The plan as written (a copy with ``sidecar`` and ``source`` updated).

    Raises:
        PlanError: the plan violates the schema, a non-zero ``eoc_alpha`` has no tensor, or tensors are given
            for a plan that needs none.
    """
    path = Path(path).absolute()
    if sidecar_tensors is None and plan.sidecar is not None:
        sidecar_tensors = plan.load_sidecar()
    needed = plan.eoc_keys()
    sidecar = None
    if sidecar_tensors:
        if not needed:
            raise PlanError("sidecar: tensors were given but no compensation has a non-zero eoc_alpha")
        import numpy as np
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v) for k, v in sorted(sidecar_tensors.items())}
        _check_sidecar_tensors(plan, set(tensors), "sidecar_tensors")
        blob = save(tensors)
        name = plan.sidecar.file if plan.sidecar is not None else f"{path.stem}.eoc.safetensors"
        _check_relative(name, "sidecar.file")
        sidecar = Sidecar(file=name, sha256=hashlib.sha256(blob).hexdigest())
    elif needed:
        unit, step = needed[0]
        raise PlanError(f"sidecar: eoc_alpha of {unit} at step {step} is non-zero: pass sidecar_tensors")
    out = replace(plan, sidecar=sidecar)
    text = dump_plan(out)
    if sidecar is not None:
        atomic_write(path.parent / sidecar.file, blob)
    atomic_write(path, text.encode("utf-8"))
    out.source = path
    return out
