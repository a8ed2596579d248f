"""Trajectory refinement and the plan search (cachec/refine.py): iterates are plans re-solved from calibrations
along the previous plan; a refined plan is rebuilt exactly from its recorded options; the closed-loop choice
picks the best; :func:`search_plan` runs families × refinements × choice and writes the winner anywhere."""

import hashlib

import pytest

from cachec.calibrate import calibrate, read_header
from cachec.planner.spacing import SPACING_GAMMAS
from cachec.evaluation import EVAL_SEED, Validation
from cachec.refine import choose, confirm, refined_plans, replan, search_plan
from cachec.runtime.plan import load_plan

pytestmark = pytest.mark.filterwarnings("ignore")

OPTS = dict(conditions=[0, 1, 2, 3], samples_per_condition=2, steps=6, batch_size=4, seed=0)


def _check_winner(search):
    """The search's winner rule: the best over validation and confirmation images among the confirmed (the
    ``CONFIRM_TOP`` best on validation), else the best on validation."""
    cf = search.confirmation
    if cf is None:
        assert search.best.validation_psnr == max(c.validation_psnr for c in search.candidates)
        return
    confirmed = [c for c in search.candidates if c.confirmation_psnr is not None]
    ranked = sorted(search.candidates, key=lambda c: -c.validation_psnr)[:len(confirmed)]
    assert {c.name for c in confirmed} == {c.name for c in ranked}
    assert set(cf["psnr_db"]) == {c.name for c in confirmed} and cf["runs"] == len(confirmed)
    assert search.best.name == max(cf["psnr_db"], key=lambda k: cf["psnr_db"][k])


@pytest.fixture(scope="module")
def base(tiny_digits, tmp_path_factory):
    """The uncached calibration of the refinement runs (6 steps, 4 classes x 2 samples)."""
    return calibrate(tiny_digits, OPTS["conditions"], output=tmp_path_factory.mktemp("refine") / "base.safetensors",
                     steps=6, samples_per_condition=2, batch_size=4, sensitivity="factored", sensitivity_samples=2,
                     progress=False)


def test_refinement_iterates_replan_and_choice(tiny_digits, base, tmp_path):
    opts = OPTS
    cands = refined_plans(tiny_digits, base, 0.5, family="free", iterations=2, workdir=tmp_path / "w",
                          calibrate_options=opts)
    assert [c.iteration for c in cands] == [0, 1, 2]
    assert "refine" not in cands[0].plan.budget.options and cands[2].plan.budget.options["refine"] == 2
    unit_step = max(u.flops for u in cands[0].plan.units) / (6 * cands[0].plan.budget.full_step_flops)
    for c in cands:
        assert 0.5 - unit_step <= c.plan.budget.realised <= 0.5
        assert c.path == tmp_path / "w" / f"plan-free-500-r{c.iteration}.yaml"
        assert load_plan(c.path) == c.written and c.written.source == c.path
    # each refinement calibrated along the previous iterate, with the base calibration's sensitivity
    for k in (0, 1):
        h = read_header(tmp_path / "w" / f"calib-free-500-along-r{k}.safetensors")
        assert h["along_plan"]["options"].get("refine", 0) == k and h["sensitivity"]["method"] == "factored"
    # the refinement changed the statistics the planner sees (the plan's own errors are in them now)
    assert cands[1].plan.predicted_error != cands[0].plan.predicted_error
    # a refined plan is rebuilt exactly from the uncached calibration and its options
    again, _ = replan(tiny_digits, base, 0.5, cands[2].plan.budget.options, tmp_path / "again", opts)
    assert [u.actions for u in again.units] == [u.actions for u in cands[2].plan.units]
    assert again.predicted_error == pytest.approx(cands[2].plan.predicted_error, rel=1e-12)
    best = choose(tiny_digits, cands, [5, 6, 7], [100, 101, 102])
    assert best.validation_psnr == max(c.validation_psnr for c in cands)
    with pytest.raises(ValueError, match="iterations"):
        refined_plans(tiny_digits, base, 0.5, family="free", iterations=-1, workdir=tmp_path / "x", calibrate_options=opts)


def test_search_plan_families_choice_and_baseline(tiny_digits, base, tmp_path):
    asked = []

    def validation():
        asked.append(1)
        return [5, 6, 7], [100, 101, 102]

    seen = []
    search = search_plan(tiny_digits, base, 0.4, workdir=tmp_path / "s", calibrate_options=OPTS, validation=validation,
                         families=("free", "step"), predictor_sets=("fitted",), iterations=0, mask_runs=0,
                         predictor_pass=False, confirm_top=0, planned=lambda cands: seen.append(len(cands)))
    assert [c.name for c in search.candidates] == ["free/refine0", "step/refine0"] and seen == [2] and asked == [1]
    assert search.validation == ([5, 6, 7], [100, 101, 102])
    _check_winner(search)
    # the same choice as the separate steps
    alone = refined_plans(tiny_digits, base, 0.4, family="free", iterations=0, workdir=tmp_path / "a", calibrate_options=OPTS)
    alone += refined_plans(tiny_digits, base, 0.4, family="step", iterations=0, workdir=tmp_path / "a",
                           calibrate_options=OPTS)
    assert choose(tiny_digits, alone, [5, 6, 7], [100, 101, 102]).name == search.best.name
    # writing a candidate elsewhere names its sidecar after the new file
    written = search.best.write(tmp_path / "out" / "chosen.yaml")
    assert written.budget == search.best.plan.budget and written.units == search.best.plan.units
    if written.sidecar is not None:
        sc = tmp_path / "out" / "chosen.eoc.safetensors"
        assert written.sidecar.file == sc.name and written.sidecar.sha256 == hashlib.sha256(sc.read_bytes()).hexdigest()
    # a baseline method: one candidate, no refinement, no closed-loop run
    fora = search_plan(tiny_digits, base, 0.4, workdir=tmp_path / "f", calibrate_options=OPTS, validation=validation,
                       method="fora")
    assert [c.name for c in fora.candidates] == ["fora/refine0"] and fora.validation is None and asked == [1]
    assert fora.best.path == tmp_path / "f" / "plan.yaml" and fora.best.validation_psnr is None


def test_two_stage_search_refines_the_best_first_stage_candidates(tiny_digits, base, tmp_path):
    """Stage 1 scores every (family, predictor set) plan; stage 2 refines the ``refine_top`` best of them; the
    winner is the best score of both stages, and a refined Taylor-set warm-up plan is rebuilt from its options."""
    val = ([5, 6, 7], [100, 101, 102])
    search = search_plan(tiny_digits, base, 0.5, workdir=tmp_path / "s", calibrate_options=OPTS, validation=val,
                         families=("free", "warmup"), predictor_sets=("fitted", "taylor"), iterations=1, refine_top=1,
                         mask_runs=0, predictor_pass=False)
    first = search.candidates[:4]
    assert [c.name for c in first] == ["free/refine0", "free+taylor/refine0", "warmup/refine0", "warmup+taylor/refine0"]
    top = max(first, key=lambda c: c.validation_psnr)
    refined = search.candidates[4:]
    assert [(c.family, c.predictors, c.iteration) for c in refined] == [(top.family, top.predictors, 1)]
    _check_winner(search)
    for c in search.candidates:
        opts = c.plan.budget.options
        assert opts["predictors"] == (["reuse", "taylor"] if c.predictors == "taylor" else
                                      ["reuse", "scale", "eoc", "goc", "taylor", "ls2"])
        if c.family == "warmup":
            assert opts["interval"] == 3 and opts["warmup"] >= 1 and opts["fill"] is True  # 6 steps: 2 needs > 50 %
    # rebuilding the refined candidate from the uncached calibration and its recorded options
    r = refined[0]
    again, _ = replan(tiny_digits, base, 0.5, r.plan.budget.options, tmp_path / "again", OPTS)
    assert [u.actions for u in again.units] == [u.actions for u in r.plan.units]


def test_mask_search_stage_moves_the_best_step_shaped_mask(tiny_digits, base, tmp_path):
    """Stage 3 starts from the best first-stage step/warmup plan; a mask it keeps scored above that plan on the
    same validation images (re-scored identically), stays within the budget and is rebuilt from its options."""
    val = ([5, 6, 7], [100, 101, 102])
    search = search_plan(tiny_digits, base, 0.5, workdir=tmp_path / "s", calibrate_options=OPTS, validation=val,
                         families=("free", "step", "warmup"), predictor_sets=("fitted",), iterations=0, mask_runs=6,
                         predictor_pass=False)
    ms = search.mask_search
    first = search.candidates[:3]
    start = max((c for c in first if c.family in ("step", "warmup")), key=lambda c: c.validation_psnr)
    assert ms["start"] == start.name and 1 <= ms["runs"] - ms["start_runs"] <= 6
    assert 1 <= ms["start_runs"] <= len(SPACING_GAMMAS)  # the spaced masks the planner accepts, each scored once
    assert not (tmp_path / "s" / "plan-mask-trial.yaml").exists()  # the last trial is not left behind
    _check_winner(search)
    if not ms["moves"]:
        assert len(search.candidates) == 3 and ms["mask"] == ms["start_mask"]
        return
    found = search.candidates[3]
    assert found.name == "step/mask" and found.validation_psnr == ms["psnr_db"] > start.validation_psnr + 0.05
    assert found.plan.budget.realised <= 0.5 and found.plan.budget.options["mask"] == ms["mask"]
    assert choose(tiny_digits, [found], *val).validation_psnr == ms["psnr_db"]  # same ops, same shapes
    again, _ = replan(tiny_digits, base, 0.5, found.plan.budget.options, tmp_path / "again", OPTS)
    assert [u.actions for u in again.units] == [u.actions for u in found.plan.units]


def test_predictor_pass_stage_rescores_the_best_uncached_candidate(tiny_digits, base, tmp_path):
    """Stage 4 re-chooses the predictors of the best refinement-0 candidate under the trajectory price: the same
    computed steps and FLOPs, scored on the same validation images, and rebuilt exactly from its options."""
    val = ([5, 6, 7], [100, 101, 102])
    search = search_plan(tiny_digits, base, 0.4, workdir=tmp_path / "s", calibrate_options=OPTS, validation=val,
                         families=("free", "step"), predictor_sets=("fitted", "taylor"), iterations=0, mask_runs=0)
    first = search.candidates[:4]
    top = max(first, key=lambda c: c.validation_psnr)
    if len(search.candidates) == 4:  # the pass changed nothing: no candidate
        again = search_plan(tiny_digits, base, 0.4, workdir=tmp_path / "t", calibrate_options=OPTS, validation=val,
                            families=(top.family,), predictor_sets=(top.predictors,), iterations=0, mask_runs=0)
        assert len(again.candidates) == 1
        return
    passed = search.candidates[4]
    assert passed.name == f"{top.name.split('/')[0]}/pass" and passed.plan.budget.options["predictor_pass"] == "trajectory"
    assert passed.plan.budget.options["repredicted"] >= 1
    assert [u.actions for u in passed.plan.units] == [u.actions for u in top.plan.units]
    assert passed.plan.budget.realised == top.plan.budget.realised
    assert [u.compensation for u in passed.plan.units] != [u.compensation for u in top.plan.units]
    assert choose(tiny_digits, [passed], *val).validation_psnr == passed.validation_psnr  # same ops, same shapes
    _check_winner(search)
    again, _ = replan(tiny_digits, base, 0.4, passed.plan.budget.options, tmp_path / "again", OPTS)
    assert [u.actions for u in again.units] == [u.actions for u in passed.plan.units]
    assert [u.compensation for u in again.units] == [u.compensation for u in passed.plan.units]


def test_confirmation_rescores_the_best_on_fresh_seeds_and_picks_on_all_images(tiny_digits, base, tmp_path):
    """Stage 5: the top candidates on validation get one run each on the validation conditions repeated with
    seeds just above the validation seeds; the winner has the best mean PSNR over both sets together."""
    val = ([5, 6, 7], [100, 101, 102])
    search = search_plan(tiny_digits, base, 0.4, workdir=tmp_path / "s", calibrate_options=OPTS, validation=val,
                         families=("free", "step"), predictor_sets=("fitted",), iterations=0, mask_runs=0,
                         predictor_pass=False, confirm_top=0)
    assert search.confirmation is None and all(c.confirmation_psnr is None for c in search.candidates)
    scorer = Validation(tiny_digits, *val, 6, float(tiny_digits.default_guidance))
    for c in search.candidates:
        assert scorer.score(c.written) == c.validation_psnr  # same ops, same shapes
    best, rec = confirm(tiny_digits, search.candidates, scorer, top=2, repeats=2)
    assert rec["images"] == 6 and rec["first_seed"] == 103 and rec["runs"] == 2
    check = Validation(tiny_digits, [5, 6, 7, 5, 6, 7], list(range(103, 109)), 6, float(tiny_digits.default_guidance))
    for c in search.candidates:
        assert c.confirmation_psnr is not None
        assert check.score(c.written) == c.confirmation_psnr
        assert rec["psnr_db"][c.name] == pytest.approx((3 * c.validation_psnr + 6 * c.confirmation_psnr) / 9)
    assert best.name == max(rec["psnr_db"], key=lambda k: rec["psnr_db"][k])
    with pytest.raises(ValueError, match="top >= 1"):
        confirm(tiny_digits, search.candidates, scorer, top=0)
    late = Validation(tiny_digits, [5], [EVAL_SEED - 1], 6, float(tiny_digits.default_guidance))
    with pytest.raises(ValueError, match="evaluation seeds"):
        confirm(tiny_digits, search.candidates, late)
    with pytest.raises(ValueError, match="one seed per condition"):
        Validation(tiny_digits, [5, 6], [1], 6, 1.0)


def test_confirmation_can_overturn_validation_and_ties_go_to_the_better_on_validation(monkeypatch):
    """confirm() with stubbed scores: the top-k cut is by validation (NaN last), the winner by the image-weighted
    mean over both sets, a tie by validation."""
    import math
    from types import SimpleNamespace

    import cachec.refine as refine

    conf = {"a": 30.0, "b": 40.0, "c": 30.0, "d": 90.0, "n": 99.0}

    class Stub:
        def __init__(self, driver, conditions, seeds, steps, guidance, *, batch_size=50):
            self.images, self.seeds, self.runs = len(conditions), seeds, 0

        def score(self, plan):
            self.runs += 1
            return conf[plan]

    monkeypatch.setattr(refine, "Validation", Stub)
    val = SimpleNamespace(images=10, seeds=list(range(500000, 500010)), conditions=list(range(10)), steps=6,
                          guidance=1.0, batch_size=50)

    def cands(scores):
        return [SimpleNamespace(name=k, written=k, validation_psnr=v, confirmation_psnr=None) for k, v in scores.items()]

    cs = cands({"a": 45.0, "b": 44.0, "c": 35.0, "d": 20.0, "n": math.nan})
    best, rec = confirm(None, cs, val, top=3, repeats=2)
    assert best.name == "b" and set(rec["psnr_db"]) == {"a", "b", "c"} and rec["runs"] == 3  # d and NaN never run
    assert rec["psnr_db"]["b"] == pytest.approx((10 * 44 + 20 * 40) / 30) and rec["first_seed"] == 500010
    assert rec["images"] == 20 and cs[3].confirmation_psnr is None and cs[4].confirmation_psnr is None
    conf.update(a=40.0, b=40.5)  # a: (450 + 800) / 30 = b: (440 + 810) / 30, a tie: the better on validation
    best, rec = confirm(None, cands({"b": 44.0, "a": 45.0}), val, top=2, repeats=2)
    assert rec["psnr_db"]["a"] == pytest.approx(rec["psnr_db"]["b"]) and best.name == "a"
