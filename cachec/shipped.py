"""The plans shipped under ``plans/`` for the reference models, and how to rebuild them.

Each shipped plan is rebuilt by: calibrating the model with its :func:`settings`, planning with the
family recorded in the plan (``budget.options.family``) and, when the plan records ``refine = k``, k
trajectory refinements (:mod:`cachec.refine`: calibrate along the previous plan with the same settings,
re-plan). Family and refinement were chosen closed-loop on validation seeds when the plans were made.
``tests/test_shipped_plans.py`` re-runs all of it and checks that the shipped schedules come out again.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: shipped model -> budgets (fractions)
BUDGETS = {"digits-flow": (0.25, 0.40, 0.60), "digits-ddim": (0.25, 0.40, 0.60), "digits-mmdit": (0.25, 0.40, 0.60)}
#: torch intra-op threads the shipped plans were calibrated with (matmul reductions differ in the last bits
#: across thread counts, so the re-plan test calibrates with the same number)
CALIBRATION_THREADS = 2
#: calibration settings of the shipped plans (seeds 0..N-1; sensitivity on the first samples). The shipped
#: plans were made with the per-element EOC prior (calibration format 1); format 2 reproduces those
#: statistics exactly with ``eoc_prior="element"`` (the reference units have 8192 elements: exact Grams), so
#: the plans and their sidecars stay as shipped. New calibrations default to the per-token prior.
CALIBRATION = dict(samples_per_condition=2, sensitivity="factored", sensitivity_samples=2, batch_size=10, seed=0,
                   eoc_prior="element")
#: the prompt-conditioned model: its 30 calibration prompts once each, the per-token EOC prior (the default
#: of new calibrations; it has no format-1 plans to reproduce)
CALIBRATION_FOR = {"digits-mmdit": dict(CALIBRATION, samples_per_condition=1, eoc_prior="token")}
PLANS_DIR = Path(importlib.import_module("cachec.plans").__file__).parent


def settings(model: str) -> dict:
    """The calibration settings of ``model``'s shipped plans (:data:`CALIBRATION`, or its entry of
    :data:`CALIBRATION_FOR`)."""
    return dict(CALIBRATION_FOR.get(model, CALIBRATION))


def calibration_conditions(driver) -> list:
    """The shipped plans' calibration conditions: every class, or the model's calibration prompt set."""
    if driver.prompt_sets.get("calibration"):
        return list(driver.prompt_sets["calibration"])
    return list(range(driver.num_classes))


def plan_name(model: str, budget: float) -> str:
    """File name of a shipped plan, e.g. ``digits-flow-40.yaml``."""
    return f"{model}-{round(100 * budget)}.yaml"


def calibrate_reference(model: str, output: Path, progress: bool = False) -> Path:
    """Calibrate a shipped model with the settings of the shipped plans."""
    from .calibrate.run import calibrate
    from .loading import load_model

    driver = load_model(model)
    return calibrate(driver, calibration_conditions(driver), output=output, progress=progress, restart=True,
                     **settings(model))


#: trajectory refinements per family searched when the shipped plans are made
REFINE = 2
#: per-model exceptions: one refinement for the prompt model (each costs a 30-sample calibration)
REFINE_FOR = {"digits-mmdit": 1}


def calibration_options(driver) -> dict:
    """Keyword arguments of :func:`cachec.calibrate.calibrate` for the trajectory refinements."""
    opts = {k: v for k, v in settings(driver.name).items() if k not in ("sensitivity", "sensitivity_samples")}
    return dict(opts, conditions=calibration_conditions(driver))


def replan(calibration_path: Path, model: str, options: dict[float, dict], workdir: Path) -> dict:
    """Plans of ``model`` at its shipped budgets, each rebuilt from its recorded options (``family``,
    ``refine``).

    Args:
        calibration_path: a calibration made with :func:`settings` (:func:`calibrate_reference`).
        model: a key of :data:`BUDGETS`.
        options: ``{budget: budget.options of the shipped plan}``.
        workdir: folder of the trajectory calibrations and candidate plans (created).
    Returns:
        ``{budget: (plan, sidecar)}``: a typed :class:`cachec.runtime.plan.Plan` (not written) and its EOC
        tensors, as :func:`cachec.refine.replan` returns them.
    Raises:
        KeyError: ``options`` lacks one of the model's budgets.
    """
    from .loading import load_model
    from .planner import Planner, load_calibration
    from .refine import replan as replan_one

    driver = load_model(model)
    planner = Planner(load_calibration(str(calibration_path)))
    return {b: replan_one(driver, calibration_path, b, options[b], Path(workdir) / f"b{round(100 * b)}",
                          calibration_options(driver), planner=planner) for b in BUDGETS[model]}
