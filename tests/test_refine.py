"""Trajectory refinement (cachec/refine.py): iterates are plans re-solved from calibrations along the previous
plan; a refined plan is rebuilt exactly from its recorded options; the closed-loop choice picks the best."""

import pytest

from cachec.calibrate import calibrate, read_header
from cachec.refine import choose, refined_plans, replan

pytestmark = pytest.mark.filterwarnings("ignore")


def test_refinement_iterates_replan_and_choice(tiny_digits, tmp_path):
    opts = dict(conditions=[0, 1, 2, 3], samples_per_condition=2, steps=6, batch_size=4, seed=0)
    base = calibrate(tiny_digits, opts["conditions"], output=tmp_path / "base.safetensors", steps=6,
                     samples_per_condition=2, batch_size=4, sensitivity="factored", sensitivity_samples=2, progress=False)
    cands = refined_plans(tiny_digits, base, 0.5, family="free", iterations=2, workdir=tmp_path / "w",
                          calibrate_options=opts)
    assert [c.iteration for c in cands] == [0, 1, 2]
    assert "refine" not in cands[0].plan.budget.options and cands[2].plan.budget.options["refine"] == 2
    unit_step = max(u.flops for u in cands[0].plan.units) / (6 * cands[0].plan.budget.full_step_flops)
    for c in cands:
        assert 0.5 - unit_step <= c.plan.budget.realised <= 0.5
    # each refinement calibrated along the previous iterate, with the base calibration's sensitivity
    for k in (0, 1):
        h = read_header(tmp_path / "w" / f"calib-free-500-along-r{k}.safetensors")
        assert h["along_plan"]["options"].get("refine", 0) == k and h["sensitivity"]["method"] == "factored"
    # the refinement changed the statistics the planner sees (the plan's own errors are in them now)
    assert cands[1].plan.predicted_error != cands[0].plan.predicted_error
    # a refined plan is rebuilt exactly from the uncached calibration and its options
    plan_dict, _ = replan(tiny_digits, base, 0.5, cands[2].plan.budget.options, tmp_path / "again", opts)
    assert [u["actions"] for u in plan_dict["units"]] == [u.actions for u in cands[2].plan.units]
    assert plan_dict["predicted_error"] == pytest.approx(cands[2].plan.predicted_error, rel=1e-12)
    best = choose(tiny_digits, cands, [5, 6, 7], [100, 101, 102])
    assert best.validation_psnr == max(c.validation_psnr for c in cands)
    with pytest.raises(ValueError, match="iterations"):
        refined_plans(tiny_digits, base, 0.5, family="free", iterations=-1, workdir=tmp_path / "x", calibrate_options=opts)
