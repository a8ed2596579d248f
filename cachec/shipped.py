"""The plans shipped under ``plans/`` for the reference models, and how to rebuild them.

Each shipped plan is rebuilt by: calibrating the model with :data:`CALIBRATION` settings, then planning
with the family recorded in the plan (``budget.options.family``, chosen closed-loop on validation seeds
when the plans were made). ``tests/test_shipped_plans.py`` re-runs both steps and checks that the planner
still produces the shipped schedules.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: shipped model -> budgets (fractions)
BUDGETS = {"digits-flow": (0.25, 0.40, 0.60)}
#: torch intra-op threads the shipped plans were calibrated with (matmul reductions differ in the last bits
#: across thread counts, so the re-plan test calibrates with the same number)
CALIBRATION_THREADS = 2
#: calibration settings of the shipped plans (seeds 0..N-1; sensitivity on the first samples)
CALIBRATION = dict(samples_per_condition=2, sensitivity="factored", sensitivity_samples=2, batch_size=10, seed=0)
PLANS_DIR = Path(importlib.import_module("cachec.plans").__file__).parent


def plan_name(model: str, budget: float) -> str:
    """File name of a shipped plan, e.g. ``digits-flow-40.yaml``."""
    return f"{model}-{round(100 * budget)}.yaml"


def calibrate_reference(model: str, output: Path, progress: bool = False) -> Path:
    """Calibrate a shipped model with the settings of the shipped plans."""
    from .calibrate.run import calibrate
    from .loading import load_model

    driver = load_model(model)
    return calibrate(driver, list(range(driver.num_classes)), output=output, progress=progress, restart=True,
                     **CALIBRATION)


def replan(calibration_path: Path, model: str, families: dict[float, str]) -> dict[float, tuple[dict, dict]]:
    """Plans of ``model`` at its shipped budgets, each with the given family: {budget: (plan, sidecar)}."""
    from .planner import Planner, load_calibration

    planner = Planner(load_calibration(calibration_path))
    return {b: planner.plan(b, "cachec", family=families[b]) for b in BUDGETS[model]}
