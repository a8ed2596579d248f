"""The plan contract (schema version 1): the one import for plans — typed schema, strict parsing,
deterministic writing, sidecar hashing.

This is the executable form of ``docs/plan-format.md``, split by job: :mod:`cachec.runtime.plan_schema`
(dataclasses, constants, :func:`realised_fraction`), :mod:`cachec.runtime.plan_parse` (:func:`parse_plan`,
:func:`load_plan`), :mod:`cachec.runtime.plan_write` (:func:`to_dict`, :func:`dump_plan`, :func:`write_plan`).
It imports no torch (the planner builds and writes plans on machines without torch) and no scipy; it needs
``pyyaml``, ``numpy`` and, for plans with an EOC sidecar, ``safetensors``.

Entry points:

- :func:`parse_plan` (dict → :class:`Plan`), :func:`load_plan` (YAML file → :class:`Plan`, sidecar checked);
- :func:`dump_plan` (:class:`Plan` → YAML text, deterministic), :func:`write_plan` (atomic file write with
  the optional safetensors sidecar);
- :func:`realised_fraction` (the FLOPs fraction a schedule spends, the formula of the format).

Every validation failure raises :class:`PlanError` whose message starts with the key path of the offending
value (``units[3].actions: ...``).
"""

from __future__ import annotations

from .plan_parse import load_plan, parse_plan
from .plan_schema import (
    BUDGET_METHODS,
    COMPUTE,
    GUIDANCE_MODES,
    HISTORY_MODES,
    REALISED_RTOL,
    SCHEMA_VERSION,
    SKIP,
    Budget,
    Compensation,
    Guidance,
    ModelInfo,
    Plan,
    PlanError,
    Provenance,
    Sampler,
    Sidecar,
    UnitPlan,
    realised_fraction,
)
from .plan_write import dump_plan, to_dict, write_plan

__all__ = [
    "BUDGET_METHODS", "COMPUTE", "GUIDANCE_MODES", "HISTORY_MODES", "REALISED_RTOL", "SCHEMA_VERSION", "SKIP",
    "Budget", "Compensation", "Guidance", "ModelInfo", "Plan", "PlanError", "Provenance", "Sampler", "Sidecar",
    "UnitPlan", "dump_plan", "load_plan", "parse_plan", "realised_fraction", "to_dict", "write_plan",
]
