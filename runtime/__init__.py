"""Stage 3: load a cache plan and run it inside ordinary diffusers pipelines.

Owns the plan schema and the unit registry. Light: torch + pyyaml, never scipy. Heavy names are imported
lazily (module ``__getattr__``) so that ``cachec.runtime.plan`` (the schema) can be used without torch.

Public API::

    from cachec.runtime import load_plan, apply, find_units
    handle = apply(pipe, load_plan("plan.yaml"))   # pipe(...) now follows the plan
    handle.report                                  # FLOPs fraction, counts, wall time of the last run
    handle.remove()
"""

from __future__ import annotations

from .lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "Plan": "plan",
    "PlanError": "plan",
    "load_plan": "plan",
    "parse_plan": "plan",
    "dump_plan": "plan",
    "write_plan": "plan",
    "find_units": "units",
    "UnsupportedModelError": "units",
    "apply": "handle",
    "CacheHandle": "handle",
    "PlanMismatchError": "handle",
    "PlanScheduleError": "executor",
    "RunReport": "executor",
    "full_plan": "manual",
    "with_actions": "manual",
    "weights_fingerprint": "fingerprint",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
