"""Stage 2: statistics + FLOP budget -> cache plan. numpy/scipy only: never imports torch.

Public API:

- :func:`load_calibration` -> :class:`Calibration` (docs/calibration-format.md).
- :func:`make_plan` (calibration, budget, method) -> (typed :class:`cachec.runtime.plan.Plan`, EOC sidecar
  arrays) (docs/plan-format.md; :func:`cachec.runtime.plan.write_plan` writes both);
  :func:`sweep` over budgets; :class:`Planner` caches the error model across budgets.
- :class:`ErrorModel`, :func:`schedule_error`: the Gram-based error model shared by every method.
- :func:`synthetic_calibration`, :func:`calibration_from_features`: statistics for tests and benchmarks.
"""

from .calibration import Calibration, CalibrationError, load_calibration
from .error_model import PREDICTOR_SETS, PREDICTORS, ErrorModel, schedule_error, segment_table
from .plan import METHODS, Planner, build_plan, make_plan, sweep
from .schedule import Schedule, realised_fraction
from .solver import FAMILIES, minimum_budget, solve
from .spacing import spaced_masks
from .synthetic import calibration_from_features, synthetic_calibration

__all__ = [
    "Calibration", "CalibrationError", "load_calibration", "PREDICTOR_SETS", "PREDICTORS", "ErrorModel", "schedule_error",
    "segment_table", "METHODS", "Planner", "build_plan", "make_plan", "sweep", "Schedule",
    "realised_fraction", "FAMILIES", "minimum_budget", "solve", "calibration_from_features",
    "synthetic_calibration", "spaced_masks",
]
