"""On a fresh calibration of each shipped reference model: the shipped plans are still what the planner
produces, and the planner's must-show properties hold on real statistics (issue 4): realised FLOPs within
[B - 1 %, B], predicted error decreasing with the budget, cachec's predicted error at most every baseline's
at the baseline's realised FLOPs."""

import math

import pytest

from cachec.runtime.plan import load_plan
import torch

from cachec.shipped import BUDGETS, CALIBRATION_THREADS, PLANS_DIR, calibrate_reference, plan_name, replan

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def fresh_calibrations(tmp_path_factory):
    """{model: path} of calibrations made now with the shipped settings (made once per model, on demand)."""
    made = {}

    def get(model):
        if model not in made:
            threads = torch.get_num_threads()
            torch.set_num_threads(CALIBRATION_THREADS)
            try:
                made[model] = calibrate_reference(model, tmp_path_factory.mktemp(model) / "calib.safetensors")
            finally:
                torch.set_num_threads(threads)
        return made[model]

    return get


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_planner_must_show_on_reference_calibration(model, fresh_calibrations):
    from cachec.planner import Planner, load_calibration

    planner = Planner(load_calibration(fresh_calibrations(model)))
    for family in ("free", "group"):
        for b in (0.25, 0.40, 0.60):
            plan, _ = planner.plan(b, "cachec", family=family)
            assert b - 0.01 <= plan.budget.realised <= b, (family, b, plan.budget.realised)
    errors = [planner.plan(b / 100, "cachec")[0].predicted_error for b in range(20, 85, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    baselines = [("fora", {"interval": n}) for n in (2, 3, 4, 5)]
    baselines += [(m, {"interval": n}) for m in ("eoc-paper", "goc-paper") for n in (2, 3, 4)]
    baselines += [("uniform", {"budget": b}) for b in (0.25, 0.4, 0.6)]
    for method, opt in baselines:
        b = opt.pop("budget", None)
        theirs, _ = planner.plan(b, method, **opt)
        r = theirs.budget.realised
        for family in ("free", "step", "group"):
            mine, _ = planner.plan(r, "cachec", family=family)
            if family == "free":
                assert mine.predicted_error <= theirs.predicted_error, (method, opt, r)
            if family == "step" and method in ("fora", "eoc-paper", "goc-paper"):
                # a FORA-type schedule is itself step-synchronous: the step family must do at least as well
                assert mine.predicted_error <= theirs.predicted_error, (method, opt, r)


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_shipped_plans_match_a_fresh_replan(model, fresh_calibrations, tmp_path):
    paths = {b: PLANS_DIR / plan_name(model, b) for b in BUDGETS[model]}
    if not all(p.exists() for p in paths.values()):
        pytest.fail(f"shipped plans missing for {model}: run scripts/make_shipped_plans.py {model}")
    shipped = {b: load_plan(p) for b, p in paths.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(CALIBRATION_THREADS)
    try:
        fresh = replan(fresh_calibrations(model), model, {b: p.budget.options for b, p in shipped.items()}, tmp_path)
    finally:
        torch.set_num_threads(threads)
    for b, (new, _) in fresh.items():
        old = shipped[b]
        assert new.model.fingerprint == old.model.fingerprint
        assert [u.name for u in new.units] == [u.name for u in old.units]
        assert [u.actions for u in new.units] == [u.actions for u in old.units], f"{model} {b:.0%}: schedule changed"
        assert new.budget.realised == pytest.approx(old.budget.realised, rel=1e-9)
        assert math.isclose(new.predicted_error, old.predicted_error, rel_tol=1e-3)
        for nu, ou in zip(new.units, old.units):
            assert nu.compensation.keys() == ou.compensation.keys()
            for s in nu.compensation:
                assert nu.compensation[s].coeffs == pytest.approx(ou.compensation[s].coeffs, rel=1e-3, abs=1e-5)
