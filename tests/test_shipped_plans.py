"""The shipped plans are still what the planner produces from a fresh calibration of the shipped model."""

import math

import pytest

from cachec.runtime.plan import load_plan, parse_plan
import torch

from cachec.shipped import BUDGETS, CALIBRATION_THREADS, PLANS_DIR, calibrate_reference, plan_name, replan

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("model", sorted(BUDGETS))
def test_shipped_plans_match_a_fresh_replan(model, tmp_path):
    paths = {b: PLANS_DIR / plan_name(model, b) for b in BUDGETS[model]}
    if not all(p.exists() for p in paths.values()):
        pytest.fail(f"shipped plans missing for {model}: run scripts/make_shipped_plans.py {model}")
    shipped = {b: load_plan(p) for b, p in paths.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(CALIBRATION_THREADS)
    try:
        calib = calibrate_reference(model, tmp_path / "calib.safetensors")
    finally:
        torch.set_num_threads(threads)
    fresh = replan(calib, model, {b: p.budget.options["family"] for b, p in shipped.items()})
    for b, (plan_dict, _) in fresh.items():
        new, old = parse_plan(plan_dict), shipped[b]
        assert new.model.fingerprint == old.model.fingerprint
        assert [u.name for u in new.units] == [u.name for u in old.units]
        assert [u.actions for u in new.units] == [u.actions for u in old.units], f"{model} {b:.0%}: schedule changed"
        assert new.budget.realised == pytest.approx(old.budget.realised, rel=1e-9)
        assert math.isclose(new.predicted_error, old.predicted_error, rel_tol=1e-3)
        for nu, ou in zip(new.units, old.units):
            assert nu.compensation.keys() == ou.compensation.keys()
            for s in nu.compensation:
                assert nu.compensation[s].coeffs == pytest.approx(ou.compensation[s].coeffs, rel=1e-3, abs=1e-5)
