"""The closed-loop step-mask search (cachec/mask_search.py): its neighbours are valid one-move masks, it
climbs a score to its best mask within its run budget, takes only moves that gain more than ``min_gain``,
and every trial plan stays within the budget (masks over it are trimmed, under it filled)."""

import pytest

from cachec.mask_search import neighbours, search_mask
from cachec.planner import Planner
from cachec.planner.schedule import realised_fraction
from cachec.planner.synthetic import synthetic_calibration


@pytest.fixture(scope="module")
def planner():
    return Planner(synthetic_calibration(blocks=4, steps=12, seed=0))


def test_neighbours_are_the_valid_one_move_masks():
    got = neighbours([0, 3, 6, 9], steps=12, max_staleness=3)
    assert [0, 3, 6, 9] not in got and len({tuple(m) for m in got}) == len(got)
    assert [0, 2, 6, 9] in got and [0, 4, 6, 9] in got and [0, 3, 6, 10] in got  # shifts
    assert [0, 3, 6, 9, 11] in got and [0, 1, 3, 6, 9] in got  # additions
    assert [0, 3, 6] not in got  # dropping 9 leaves steps 7..11 skipped: a run of 5 > max_staleness
    assert [0, 3, 9] not in got and [0, 6, 9] not in got  # runs of 5
    assert all(m[0] == 0 and m == sorted(m) for m in got)
    # keep_last: the last step stays computed, so it is neither shifted nor dropped
    kept = neighbours([0, 4, 8, 11], steps=12, max_staleness=4, keep_last=1)
    assert all(m[-1] == 11 for m in kept) and [0, 4, 8] not in kept


def test_search_climbs_to_the_best_mask_within_its_runs(planner):
    target = [0, 2, 4, 7, 10]
    scores = []

    def score(m):  # closer to the target mask scores higher (a stand-in for validation PSNR)
        plan, _ = planner.plan(0.45, "cachec", family="step", mask=m)
        assert plan.budget.realised <= 0.45  # trimmed or filled into the budget
        scores.append(m)
        return -float(len(set(m) ^ set(target)))

    start = [0, 3, 6, 9]
    out = search_mask(planner, 0.45, start, score(start), score, max_runs=60, width=3)
    assert out.mask == target and out.psnr == 0.0 and out.moves[-1] == target
    assert out.runs == len(out.tried) == len(scores) - 1 <= 60
    assert len({tuple(m) for m, _ in out.tried}) == out.runs  # no mask scored twice
    # a run budget stops it early; a gain threshold above every gain takes no move
    few = search_mask(planner, 0.45, start, -7.0, score, max_runs=2, width=3)
    assert few.runs == 2
    none = search_mask(planner, 0.45, start, -7.0, score, max_runs=10, width=3, min_gain=5.0)
    assert none.moves == [] and none.mask == start and none.psnr == -7.0 and none.runs == 10
    with pytest.raises(ValueError, match="max_runs"):
        search_mask(planner, 0.45, start, 0.0, score, max_runs=-1)


def test_a_mask_over_the_budget_is_trimmed_by_least_error_per_flop(planner):
    cal = planner.cal
    sched = planner.schedule(0.45, "cachec", family="step", mask=list(range(12)), max_staleness=3)
    r = realised_fraction(sched.compute, cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops)
    assert 0.45 - max(cal.unit_flops) / (12 * cal.full_step_flops) < r <= 0.45 and sched.options["trimmed"] > 0
    assert sched.compute[:, 0].all() and (sched.compute[:, 1:].sum(axis=1) > 0).all()
    # only computes of the mask are skipped: a mask without step 5 never computes it
    part = planner.schedule(0.45, "cachec", family="step", mask=[s for s in range(12) if s != 5], max_staleness=3)
    assert not part.compute[:, 5].any()


def test_a_neighbour_the_planner_refuses_is_skipped_and_a_stuck_trim_says_why():
    """The greedy trim cannot rearrange computes, so a mask it cannot fit is refused with a message that says
    so (not a false 'every run at max_staleness'); the mask search skips such neighbours instead of dying."""
    stuck = Planner(synthetic_calibration(blocks=3, steps=12, seed=0))
    with pytest.raises(ValueError, match=r"the trim cannot skip .* max_staleness=2 .*give a mask with fewer steps"):
        stuck.schedule(0.3837, "cachec", family="step", mask=list(range(12)), max_staleness=2)
    pl = Planner(synthetic_calibration(blocks=2, steps=20, seed=0, samples=4, dim=8))
    b = 0.155
    st = pl.schedule(b, "cachec", family="step", fill=False)
    start = [s for s in range(20) if st.compute[:, s].all()]
    scored = []

    def score(m):  # more computed steps score higher: the search keeps adding steps until the trim refuses
        plan, _ = pl.plan(b, "cachec", family="step", mask=m)
        assert plan.budget.realised <= b
        scored.append(m)
        return float(len(m)) + 1e-3 * sum(m)

    out = search_mask(pl, b, start, 0.0, score, max_runs=30, width=4)
    assert out.runs == len(scored) == 30 and len(out.mask) > len(start)


def test_a_given_rank_orders_the_neighbours_it_scores(planner):
    """``rank`` replaces the price order: here masks with more steps first, so the first batch is additions."""
    start, scored = [0, 3, 6, 9], []

    def score(m):
        scored.append(m)
        return 0.0

    search_mask(planner, 0.45, start, 0.0, score, max_runs=3, width=3, rank=lambda m: -len(m))
    assert len(scored) == 3 and all(len(m) == len(start) + 1 for m in scored)


def test_starting_masks_are_scored_first_and_the_best_is_where_the_search_goes_on(planner):
    """``starts``: each accepted mask scored once (not counted against max_runs), the best one taken as a move
    when it beats the start by min_gain; masks the planner refuses (a run over max_staleness) are skipped."""
    target = [0, 2, 4, 7, 10]
    score = lambda m: -float(len(set(m) ^ set(target)))  # noqa: E731
    start = [0, 3, 6, 9]
    starts = [[0, 2, 4, 7, 9], [0, 3, 6, 9], [0, 11]]  # the second is the start, the third runs 10 steps stale
    out = search_mask(planner, 0.45, start, score(start), score, max_runs=0, starts=starts)
    assert out.start_runs == out.runs == 1 and out.tried == [([0, 2, 4, 7, 9], -2.0)]
    assert out.mask == [0, 2, 4, 7, 9] and out.moves == [[0, 2, 4, 7, 9]]
    on = search_mask(planner, 0.45, start, score(start), score, max_runs=4, starts=starts)
    assert on.runs - on.start_runs <= 4 and on.psnr >= -2.0
    worse = search_mask(planner, 0.45, target, 0.0, score, max_runs=0, starts=starts)
    assert worse.mask == target and worse.moves == []


def test_spaced_masks_follow_the_power_law_and_the_budget():
    from cachec.planner.spacing import SPACING_GAMMAS, spaced_mask, spaced_masks

    assert spaced_mask(25, 10, 1.0) == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23]  # uniform: round(2.5 k)
    assert spaced_mask(25, 10, 1.4) == [0, 1, 3, 5, 7, 9, 12, 15, 18, 22]  # denser early
    assert spaced_mask(6, 6, 2.0) == list(range(6))  # collisions pushed one step later
    assert spaced_mask(10, 3, 1.0, keep_last=2) == [0, 3, 7, 8, 9]
    with pytest.raises(ValueError, match="gamma"):
        spaced_mask(10, 11, 1.0)
    cal = synthetic_calibration(blocks=4, steps=20, seed=0)
    for budget in (0.25, 0.4, 0.6):
        masks = spaced_masks(cal, budget)
        assert 1 <= len(masks) <= len(SPACING_GAMMAS) and len({tuple(m) for m in masks}) == len(masks)
        total = float(cal.unit_flops.sum())
        paid = (budget * 20 * cal.full_step_flops - 20 * cal.fixed_step_flops) / total
        assert all(len(m) == round(paid) and m[0] == 0 for m in masks)  # the count nearest what the budget pays
