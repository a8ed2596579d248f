"""Planner tests: error formulas vs brute force on explicit features, solver vs enumeration, budgets,
baselines, plan shape, determinism. numpy only; each test runs in well under a second."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from cachec.planner import (
    CalibrationError, ErrorModel, Planner, Schedule, load_calibration, make_plan, minimum_budget, schedule_error,
    segment_table, sweep,
)
from cachec.planner.calibration import calibration_from_tensors
from cachec.runtime.plan import Plan, load_plan, write_plan
from cachec.planner.error_model import EOC, LS2, PREDICTORS, eoc_error, predictor_error
from cachec.planner.blocks import block_groups
from cachec.planner.schedule import realised_fraction
from cachec.planner.solver import allocate
from cachec.planner.synthetic import (
    calibration_from_features, calibration_tensors, save_calibration, synthetic_calibration, synthetic_features,
)

RTOL = 1e-9


# ---- helpers -------------------------------------------------------------------------------------
def random_features(U=3, N=6, B=2, S=7, D=5, seed=0, smooth=True):
    rng = np.random.default_rng(seed)
    out = {}
    for u in range(U):
        if smooth:  # random walk: consecutive steps correlated, as real features are
            F = np.cumsum(rng.normal(size=(N, B, S, D)) * 0.3, axis=2) + rng.normal(size=(N, B, 1, D))
        else:
            F = rng.normal(size=(N, B, S, D))
        out[f"blocks.{u}.ff"] = F
    return out


def make_cal(feats, flops=None, sens=None, seed=0, **kw):
    names = list(feats)
    S = feats[names[0]].shape[2]
    rng = np.random.default_rng(seed + 100)
    flops = np.asarray(flops if flops is not None else rng.uniform(1.0, 3.0, len(names)))
    sens = sens if sens is not None else rng.uniform(0.2, 2.0, (len(names), S))
    return calibration_from_features(feats, flops, float(flops.sum()) * 1.05, None, sens, **kw)


def split(F, k):
    return F[k::2]


def brute_schedule_error(feats, cal, sched: Schedule, prior=None, coherence="run"):
    """sum over held-out outputs of ||sum_run sqrt(w_s)(F_s - F_hat_s)||^2 / (n1 * B), simulated per sample
    (``coherence="trajectory"``: one sum over all of a unit's skipped steps)."""
    names = list(feats)
    total = 0.0
    for u, n in enumerate(names):
        F = split(feats[n], 1)  # (N1, B, S, D)
        S = F.shape[2]
        used = np.zeros_like(F)
        computed = []
        run = None
        for s in range(S):
            if sched.compute[u, s]:
                used[:, :, s] = F[:, :, s]
                computed.insert(0, s)
                if run is not None and coherence == "run":
                    total += float((run**2).sum())
                    run = None
                continue
            a = sched.coeffs[u][s]
            if sched.history == "computed":
                pred = sum(aj * F[:, :, computed[j]] for j, aj in enumerate(a))
            else:
                pred = sum(aj * used[:, :, s - 1 - j] for j, aj in enumerate(a))
            al = sched.eoc_alpha[u].get(s, 0.0)
            if al:
                D = prior[u][s] - prior[u][sched.eoc_ref[u][s]]
                pred = pred * (1 + al * D)
            used[:, :, s] = pred
            delta = np.sqrt(cal.sensitivity[u, s]) * (F[:, :, s] - pred)
            run = delta if run is None else run + delta
        if run is not None:
            total += float((run**2).sum())
    N1, B = feats[names[0]][1::2].shape[:2]
    return total / (N1 * B)


def enumerate_masks(S, K, keep_last=0):
    """All per-unit compute masks with step 0 computed, runs of skipped steps <= K, last steps computed."""
    out = []
    for bits in itertools.product([True, False], repeat=S - 1):
        m = np.array((True,) + bits)
        if keep_last and not m[S - keep_last:].all():
            continue
        run, ok = 0, True
        for c in m:
            run = 0 if c else run + 1
            ok &= run <= K
        if ok:
            out.append(m)
    return out


def mask_cost(table, u, m):
    """Sum of segment costs of a mask from the table (independent of the DP)."""
    S = len(m)
    comp = np.flatnonzero(m)
    total = 0.0
    for i, p in enumerate(comp):
        d = 0 if i == 0 else p - comp[i - 1]
        nxt = comp[i + 1] if i + 1 < len(comp) else S
        total += table.cost[u, p, d, nxt - p - 1]
    return total


# ---- error formulas vs brute force ---------------------------------------------------------------
def test_predictor_error_matches_features():
    feats = random_features(smooth=False)
    cal = make_cal(feats)
    G = cal.gram.sum(axis=1)
    rng = np.random.default_rng(1)
    for u, n in enumerate(feats):
        for k in range(2):
            F = split(feats[n], k)
            for s, steps in [(3, [2]), (5, [3, 1]), (6, [4, 2, 0]), (1, [0])]:
                a = rng.normal(size=len(steps))
                brute = float(((F[:, :, s] - sum(aj * F[:, :, t] for aj, t in zip(a, steps))) ** 2).sum())
                assert predictor_error(G[u, k], s, steps, a) == pytest.approx(brute, rel=RTOL)


def test_eoc_error_and_alpha_match_features():
    feats = random_features(smooth=True, seed=3)
    cal = make_cal(feats, eoc_prior="element")  # the brute force below uses the per-element prior
    for u, n in enumerate(feats):
        F = feats[n]
        P = F.mean(axis=(0, 1))
        for s, j in [(2, 1), (4, 2), (6, 1)]:
            p = s - j
            D = P[s] - P[p]
            Gk = cal.gram.sum(axis=1)[u]
            for k in range(2):
                Fk = split(F, k)
                reuse = predictor_error(Gk[k], s, [p], [1.0])
                for alpha in (0.0, 0.37, -1.3):
                    brute = float(((Fk[:, :, s] - Fk[:, :, p] * (1 + alpha * D)) ** 2).sum())
                    got = eoc_error(reuse, cal.eoc_lin[u, k, s, j - 1], cal.eoc_quad[u, k, s, j - 1], alpha)
                    assert got == pytest.approx(brute, rel=RTOL)
            # closed-form alpha on split 0 is the least-squares optimum
            F0 = split(F, 0)
            X = (F0[:, :, p] * D).ravel()
            y = (F0[:, :, s] - F0[:, :, p]).ravel()
            a_ls = float(X @ y / (X @ X))
            model = ErrorModel(cal)
            a1, a2, al, ok = model.fit_candidates(np.array(u), np.array(s), np.array(p), np.array(p), np.array(False))
            assert ok[EOC] and al[EOC] == pytest.approx(a_ls, rel=RTOL)


def test_least_squares_candidate_matches_lstsq():
    feats = random_features(smooth=True, seed=5)
    cal = make_cal(feats)
    model = ErrorModel(cal, ridge=0.0)
    u, s, p, q = 1, 6, 4, 2
    F0 = split(feats[list(feats)[u]], 0)
    X = np.stack([F0[:, :, p].ravel(), F0[:, :, q].ravel()], axis=1)
    coef = np.linalg.lstsq(X, F0[:, :, s].ravel(), rcond=None)[0]
    a1, a2, al, ok = model.fit_candidates(np.array(u), np.array(s), np.array(p), np.array(q), np.array(True))
    assert ok[LS2]
    np.testing.assert_allclose([a1[LS2], a2[LS2]], coef, rtol=1e-8)


def test_coherent_schedule_error_matches_simulation():
    feats = random_features(U=3, S=9, seed=7)
    cal = make_cal(feats)
    model = ErrorModel(cal)
    prior = [cal.prior(u) for u in range(cal.n_units)]
    rng = np.random.default_rng(8)
    S = 9
    for history in ("computed", "used"):
        compute = np.zeros((3, S), dtype=bool)
        compute[:, 0] = True
        compute[0, [3, 6]] = True
        compute[1, [1, 2, 5]] = True
        compute[2, [4]] = True
        coeffs, alphas, refs = [], [], []
        for u in range(3):
            c, a, r = {}, {}, {}
            ncomp = 0
            for s in range(S):
                if compute[u, s]:
                    ncomp += 1
                    continue
                depth = ncomp if history == "computed" else s
                m = int(rng.integers(1, min(2, depth) + 1))
                c[s] = tuple(rng.normal(size=m) * 0.5 + (1.0 if m == 1 else 0.0))
            coeffs.append(c)
            alphas.append(a)
            refs.append(r)
        if history == "computed":  # before any EOC correction: the trajectory price is exact
            plain_sched = Schedule(compute=compute.copy(), coeffs=[dict(c) for c in coeffs], eoc_alpha=[{} for _ in range(3)],
                                   eoc_ref=[{} for _ in range(3)], history=history)
            assert schedule_error(model, plain_sched, coherence="trajectory") == pytest.approx(
                brute_schedule_error(feats, cal, plain_sched, prior, "trajectory"), rel=RTOL)
        # one isolated EOC-corrected step on plain reuse (single-step run: exact)
        if history == "computed":
            coeffs[1][3] = (1.0,)
            compute[1, 4] = True
            coeffs[1].pop(4, None)
            alphas[1][3], refs[1][3] = 0.8, 2
        sched = Schedule(compute=compute, coeffs=coeffs, eoc_alpha=alphas, eoc_ref=refs, history=history)
        got = schedule_error(model, sched)
        assert got == pytest.approx(brute_schedule_error(feats, cal, sched, prior), rel=RTOL)
        if history == "used":  # no EOC correction here: the trajectory price is exact too
            traj = schedule_error(model, sched, coherence="trajectory")
            assert traj == pytest.approx(brute_schedule_error(feats, cal, sched, prior, "trajectory"), rel=RTOL)
            assert not np.isclose(traj, got)  # the cross-run terms are there
    with pytest.raises(ValueError, match="coherence must be"):
        schedule_error(model, sched, coherence="global")


def test_segment_table_prices_solved_schedules_consistently():
    cal = synthetic_calibration(blocks=3, steps=12, seed=2)
    planner = Planner(cal)
    for b in (0.3, 0.5):
        sched = planner.schedule(b, "cachec", max_staleness=4, predictor_pass="none")
        tab = planner.table(4)
        table_total = sum(mask_cost(tab, u, sched.compute[u]) for u in range(cal.n_units))
        assert schedule_error(planner.model, sched) == pytest.approx(table_total, rel=1e-6)


def test_compensation_only_where_it_beats_reuse_on_held_out():
    cal = synthetic_calibration(blocks=3, steps=12, seed=4)
    model = ErrorModel(cal)
    tab = segment_table(model, 4)
    # every chosen single-step compensation has held-out error <= plain reuse
    U, S = model.U, model.S
    for u in range(U):
        for p in range(1, S - 1):
            for d in range(1, min(p, 5) + 1):
                if tab.use_reuse[u, p, d, 1] or not np.isfinite(tab.cost[u, p, d, 1]):
                    continue
                (k, a, al), = tab.run(u, p, d, 1)
                steps = [p] if len(a) == 1 else [p, p - d]
                e = model.step_error(u, p + 1, steps, a, al)
                assert e <= model.step_error(u, p + 1, [p], [1.0]) * (1 + 1e-12)


# ---- solver vs enumeration ------------------------------------------------------------------------
def test_handmade_known_optimum():
    """Unit 0 jumps at step 3, unit 1 is constant: one extra compute must go to unit 0 at step 3."""
    S, N, B, D = 6, 4, 1, 3
    a = np.ones((N, B, 1, D))
    jump = np.concatenate([np.repeat(a, 3, axis=2), np.repeat(5 * a, 3, axis=2)], axis=2)
    feats = {"b.0.ff": jump, "b.1.ff": np.repeat(2 * a, S, axis=2)}
    cal = calibration_from_features(feats, [1.0, 1.0], 2.0, 0.0, np.ones((2, S)))
    plan, _ = make_plan(cal, 3 / 12, "cachec", max_staleness=5, predictors=("reuse",))
    assert [u.actions for u in plan.units] == ["C..C..", "C....."]
    assert plan.predicted_error == 0.0
    assert plan.budget.realised == 0.25
    # with only step 0 affordable the jump is paid: 3 steps * ||4a||^2 coherently = (3 * 4)^2 * D
    plan, _ = make_plan(cal, 2 / 12, "cachec", max_staleness=5, predictors=("reuse",))
    assert plan.predicted_error == pytest.approx((3 * 4) ** 2 * D)


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.7])
def test_solver_matches_brute_force_reuse_only(budget):
    feats = random_features(U=2, S=6, seed=11)
    cal = make_cal(feats, flops=[1.0, 2.0], seed=11)
    planner = Planner(cal, predictors=("reuse",))
    sched = planner.schedule(budget, "cachec", max_staleness=5)
    masks = enumerate_masks(6, 5)
    cap = budget * 6 * cal.full_step_flops - 6 * cal.fixed_step_flops
    best = np.inf
    for m0, m1 in itertools.product(masks, masks):
        if m0.sum() * 1.0 + m1.sum() * 2.0 > cap:
            continue
        coeffs = [{int(s): (1.0,) for s in np.flatnonzero(~m)} for m in (m0, m1)]
        s = Schedule(compute=np.stack([m0, m1]), coeffs=coeffs)
        best = min(best, brute_schedule_error(feats, cal, s))
    assert schedule_error(planner.model, sched) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("family", ["free", "step"])
def test_solver_matches_enumeration_of_table_costs(family):
    feats = random_features(U=3, S=7, seed=13)
    cal = make_cal(feats, flops=[1.0, 1.5, 2.5], seed=13)
    planner = Planner(cal)
    K = 3
    tab = planner.table(K)
    masks = enumerate_masks(7, K)
    costs = np.array([[mask_cost(tab, u, m) for m in masks] for u in range(3)])
    cnt = np.array([m.sum() for m in masks])
    for budget in (0.35, 0.45, 0.6, 0.8):
        cap = budget * 7 * cal.full_step_flops * (1 - 1e-12) - 7 * cal.fixed_step_flops
        sched = planner.schedule(budget, "cachec", max_staleness=K, family=family, fill=False)
        got = sum(mask_cost(tab, u, sched.compute[u]) for u in range(3))
        if family == "step":
            ok = cnt * cal.unit_flops.sum() <= cap
            best = costs.sum(axis=0)[ok].min()
            assert (sched.compute == sched.compute[0]).all()
        else:
            tot_c = cnt[:, None, None] * 1.0 + cnt[None, :, None] * 1.5 + cnt[None, None, :] * 2.5
            tot_e = costs[0][:, None, None] + costs[1][None, :, None] + costs[2][None, None, :]
            best = tot_e[tot_c <= cap].min()
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12)


def two_block_planner(seed: int, K: int = 3):
    """(calibration, planner, segment table at max_staleness K) of 3 units in 2 blocks ({0}, {1, 2}),
    7 steps, unit FLOPs 1, 1.5, 2.5."""
    feats = random_features(U=3, S=7, seed=seed)
    feats = {n: f for n, f in zip(["blocks.0.attn1", "blocks.1.attn1", "blocks.1.ff"], feats.values())}
    cal = make_cal(feats, flops=[1.0, 1.5, 2.5], seed=seed)
    planner = Planner(cal)
    return cal, planner, planner.table(K)


@pytest.mark.parametrize("family", ["step", "group"])
def test_budget_fill_prices_exactly_and_leaves_no_fitting_gain(family):
    """The fill pass (single unit computes into the slack of shared masks): its bookkeeping equals the table
    cost of the final masks, it never raises the predicted error, it stays under the budget, and no single
    further compute that fits would lower the error (greedy's stopping rule)."""
    cal, planner, tab = two_block_planner(seed=5)
    K = tab.max_staleness
    opts = dict(max_staleness=K, family=family, **({"groups": 2} if family == "group" else {}))
    for budget in (0.35, 0.45, 0.6, 0.8):
        cap = budget * 7 * cal.full_step_flops * (1 + 1e-12) - 7 * cal.fixed_step_flops
        plain = planner.schedule(budget, "cachec", fill=False, predictor_pass="none", **opts)
        filled = planner.schedule(budget, "cachec", predictor_pass="none", **opts)
        e_plain = sum(mask_cost(tab, u, plain.compute[u]) for u in range(3))
        e_fill = sum(mask_cost(tab, u, filled.compute[u]) for u in range(3))
        assert e_fill <= e_plain + 1e-12
        assert filled.options["fill"] is True and filled.options["filled"] == int(filled.compute.sum() - plain.compute.sum())
        assert (filled.compute >= plain.compute).all()  # only adds computes
        spent = float((filled.compute.sum(axis=1) * cal.unit_flops).sum())
        assert spent <= cap
        for u in range(3):
            if spent + cal.unit_flops[u] > cap:
                continue
            for s in np.flatnonzero(~filled.compute[u]):
                m = filled.compute[u].copy()
                m[s] = True
                assert mask_cost(tab, u, m) >= mask_cost(tab, u, filled.compute[u]) - 1e-12, (u, s)
        # the plan's recorded error is the table's price of the final masks
        assert schedule_error(planner.model, filled) == pytest.approx(e_fill, rel=1e-9, abs=1e-12)


def test_step_mask_option_runs_the_given_steps():
    feats = random_features(U=3, S=7, seed=2)
    cal = make_cal(feats, flops=[1.0, 1.5, 2.5], seed=2)
    planner = Planner(cal)
    tab = planner.table(3)
    sched = planner.schedule(1.0, "cachec", family="step", mask=[0, 2, 4, 6], fill=False, max_staleness=3,
                             predictor_pass="none")
    assert sched.compute.tolist() == [[True, False, True, False, True, False, True]] * 3
    assert sched.options["mask"] == [0, 2, 4, 6]
    assert schedule_error(planner.model, sched) == pytest.approx(
        sum(mask_cost(tab, u, sched.compute[u]) for u in range(3)), rel=1e-9)
    plan, _ = planner.plan(1.0, "cachec", family="step", mask=[0, 3], max_staleness=3)  # filled up to the budget
    assert plan.budget.realised == 1.0
    with pytest.raises(ValueError, match="include step 0"):
        planner.schedule(1.0, "cachec", family="step", mask=[1, 3])
    with pytest.raises(ValueError, match="max_staleness=3"):
        planner.schedule(1.0, "cachec", family="step", mask=[0, 5], max_staleness=3)
    # a mask over the budget is trimmed: its least useful (unit, step) computes skipped until it fits
    full_mask = [0, 1, 2, 3, 4, 5, 6]
    trimmed = planner.schedule(0.5, "cachec", family="step", mask=full_mask, max_staleness=3)
    r = realised_fraction(trimmed.compute, planner.cal.unit_flops, planner.cal.full_step_flops, planner.cal.fixed_step_flops)
    assert 0.5 - max(planner.cal.unit_flops) / (7 * planner.cal.full_step_flops) < r <= 0.5
    assert trimmed.options["mask"] == full_mask and trimmed.options["trimmed"] > 0 and "filled" not in trimmed.options
    assert trimmed.compute[:, 0].all() and not trimmed.compute.all()
    at_min = planner.schedule(0.5918368, "cachec", family="step", mask=full_mask, max_staleness=1)  # the minimum
    assert (at_min.compute.sum(axis=1) == 4).all()
    with pytest.raises(ValueError, match="only used by family 'step'"):
        planner.schedule(1.0, "cachec", family="free", mask=[0, 2])


def test_fn_bn_blocks_computed_at_every_step(synth_planner, synth):
    """The FBCache/DBCache shape (option fn_bn = [F, B]): the units of the first F and last B blocks compute at
    every step, the other units share one DP mask that fits what is left of the budget, and the fill tops it
    up; [0, 0] is the plain step family; other families, too many blocks and too small a budget are refused."""
    from cachec.planner.blocks import edge_blocks, unit_block

    names = synth.unit_names
    blocks = list(dict.fromkeys(unit_block(n) for n in names))
    for fb in ([1, 0], [1, 1], [2, 1]):
        on = edge_blocks(names, *fb)
        assert sorted({unit_block(n) for n, o in zip(names, on) if o}) == sorted(blocks[:fb[0]] + blocks[len(blocks) - fb[1]:])
        plain = synth_planner.schedule(0.6, "cachec", family="step", fn_bn=fb, fill=False)
        assert plain.compute[on].all()
        rest = plain.compute[~on]
        assert (rest == rest[0]).all() and not rest[0].all()
        assert plain.options["fn_bn"] == fb
        filled, _ = synth_planner.plan(0.6, "cachec", family="step", fn_bn=fb)
        assert 0.59 <= filled.budget.realised <= 0.6 and filled.budget.options["fn_bn"] == fb
    same = synth_planner.schedule(0.4, "cachec", family="step", fn_bn=[0, 0])
    assert (same.compute == synth_planner.schedule(0.4, "cachec", family="step").compute).all()
    with pytest.raises(ValueError, match="only used by family 'step'"):
        synth_planner.schedule(0.6, "cachec", family="group", fn_bn=[1, 0])
    with pytest.raises(ValueError, match="leave none"):
        synth_planner.schedule(0.6, "cachec", family="step", fn_bn=[4, 4])
    with pytest.raises(ValueError, match=r"below the minimum .* \(fn_bn\) blocks"):
        synth_planner.schedule(0.2, "cachec", family="step", fn_bn=[3, 3])


def test_warmup_family_and_predictor_sets(synth_planner, synth):
    """The warm-up + interval family (TaylorSeer's shape): the first W steps, then every N-th, W as large as the
    budget allows before the fill; the Taylor predictor set only ever uses reuse or the Taylor forecast."""
    from cachec.planner.error_model import resolve_predictors

    S = synth.steps
    total = float(synth.unit_flops.sum())
    for budget, N in ((0.6, 2), (0.6, 3), (0.4, 3)):
        plain = synth_planner.schedule(budget, "cachec", family="warmup", interval=N, fill=False)
        W = plain.options["warmup"]
        want = sorted(set(range(W)) | set(range(W - 1 + N, S, N)))
        assert (plain.compute == plain.compute[0]).all() and np.flatnonzero(plain.compute[0]).tolist() == want
        frac = lambda n: (S * synth.fixed_step_flops + n * total) / (S * synth.full_step_flops)  # noqa: E731
        assert frac(len(want)) <= budget
        bigger = set(range(W + 1)) | set(range(W + N, S, N))
        assert frac(len(bigger)) > budget  # W is the largest warm-up that fits
        filled, _ = synth_planner.plan(budget, "cachec", family="warmup", interval=N)
        assert budget - 0.01 <= filled.budget.realised <= budget
        assert filled.budget.options["family"] == "warmup" and filled.budget.options["interval"] == N
    with pytest.raises(ValueError, match="interval must be in"):
        synth_planner.schedule(0.5, "cachec", family="warmup", interval=20)
    with pytest.raises(ValueError, match="warmup family's minimum"):
        synth_planner.schedule(0.4, "cachec", family="warmup", interval=2)  # 10 of 20 steps at least
    auto = synth_planner.schedule(0.4, "cachec", family="warmup")  # the smallest interval that fits: 3
    assert auto.options["interval"] == 3
    with pytest.raises(ValueError, match="warmup family's minimum"):
        synth_planner.schedule(0.12, "cachec", family="warmup")
    with pytest.raises(ValueError, match="makes its own mask"):
        synth_planner.schedule(0.5, "cachec", family="warmup", mask=[0, 2])
    with pytest.raises(ValueError, match="only used by family 'warmup'"):
        synth_planner.schedule(0.5, "cachec", family="free", interval=2)
    taylor, _ = synth_planner.plan(0.4, "cachec", family="step", predictors="taylor")
    assert taylor.budget.options["predictors"] == ["reuse", "taylor"]
    comps = [c for u in taylor.units for c in u.compensation.values()]
    assert comps and all(c.eoc_alpha == 0.0 for c in comps)
    assert all(c.coeffs == [1.0] or (len(c.coeffs) == 2 and abs(sum(c.coeffs) - 1.0) < 1e-7) for c in comps)
    assert any(len(c.coeffs) == 2 for c in comps)  # the Taylor forecast is used somewhere
    fitted, _ = synth_planner.plan(0.4, "cachec", family="step")
    assert fitted.budget.options["predictors"] == list(resolve_predictors("fitted"))
    with pytest.raises(ValueError, match="unknown set 'bogus'"):
        synth_planner.plan(0.4, "cachec", predictors="bogus")


def test_forecast_set_always_forecasts_where_it_can(synth_planner, synth):
    """The ``forecast`` set (TaylorSeer's and SeaCache's predictor): every skipped step of a unit after its
    second computed output uses the first-order forecast on the time grid, the steps before it plain reuse;
    the ``taylor`` set chooses between the two by the judged error and picks reuse somewhere on this
    calibration, so the sets differ."""
    t = np.asarray(synth.header.get("sigmas") or synth.header["timesteps"], dtype=np.float64)

    def check(plan, forced):
        reuse_after_two = 0
        for u in plan.units:
            computed = [s for s, a in enumerate(u.actions) if a == "C"]
            for s, c in u.compensation.items():
                before = [k for k in computed if k < s]
                if len(before) < 2:
                    assert c.coeffs == [1.0]
                    continue
                p, q = before[-1], before[-2]
                h = (t[s] - t[p]) / (t[p] - t[q])
                if len(c.coeffs) == 1:
                    reuse_after_two += 1
                    assert not forced, f"{u.name} step {s}: reuse where the forecast applies"
                else:
                    assert c.coeffs == pytest.approx([1 + h, -h], rel=1e-6, abs=1e-7)  # stored as float32
        return reuse_after_two

    forecast, _ = synth_planner.plan(0.4, "cachec", family="step", predictors="forecast")
    assert forecast.budget.options["predictors"] == ["taylor"]
    check(forecast, forced=True)
    taylor, _ = synth_planner.plan(0.4, "cachec", family="step", predictors="taylor")
    assert check(taylor, forced=False) > 0
    warm, _ = synth_planner.plan(0.4, "cachec", family="warmup", predictors="forecast")
    check(warm, forced=True)


def test_block_groups_hand_cases():
    names = [f"transformer_blocks.{i}.{b}" for i in range(5) for b in ("attn1", "ff")]
    assert block_groups(names, 2).tolist() == [0] * 6 + [1] * 4  # 5 blocks -> 3 + 2
    assert block_groups(names, 1).tolist() == [0] * 10
    assert block_groups(names, 9).tolist() == [i // 2 for i in range(10)]  # capped at one group per block
    flux = ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
            "single_transformer_blocks.0.attn", "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.attn"]
    assert block_groups(flux, 3).tolist() == [0, 0, 0, 1, 1, 2]
    # whole-block residual units (FLUX single blocks, ControlNet blocks) are one block each, not one block
    # per block list
    residual = ["transformer_blocks.0.attn", "transformer_blocks.0.ff"] + [f"single_transformer_blocks.{i}" for i in range(5)]
    assert block_groups(residual, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert block_groups(residual, 9).tolist() == [0, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="groups"):
        block_groups(names, 0)


def test_group_family_matches_enumeration_and_keeps_groups_in_sync():
    """Two groups of units (blocks {0}, {1, 2}) share masks; the solver's choice is the enumerated optimum."""
    cal, planner, tab = two_block_planner(seed=21)
    K = tab.max_staleness
    masks = enumerate_masks(7, K)
    cnt = np.array([m.sum() for m in masks])
    g0 = np.array([mask_cost(tab, 0, m) for m in masks])
    g1 = np.array([mask_cost(tab, 1, m) + mask_cost(tab, 2, m) for m in masks])
    for budget in (0.4, 0.55, 0.7):
        cap = budget * 7 * cal.full_step_flops * (1 - 1e-12) - 7 * cal.fixed_step_flops
        sched = planner.schedule(budget, "cachec", max_staleness=K, family="group", groups=2, fill=False)
        assert (sched.compute[1] == sched.compute[2]).all()
        assert sched.options["groups"] == 2
        got = sum(mask_cost(tab, u, sched.compute[u]) for u in range(3))
        tot_c = cnt[:, None] * 1.0 + cnt[None, :] * 4.0
        best = (g0[:, None] + g1[None, :])[tot_c <= cap].min()
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="only used by family 'group'"):
        planner.schedule(0.5, "cachec", family="free", groups=2)
    with pytest.raises(ValueError, match="groups must be an int"):
        planner.schedule(0.5, "cachec", family="group", groups=0)


def test_lagrangian_allocation_close_to_exact():
    """The large-problem path (Lagrangian + repair + local knapsack) against exact enumeration."""
    for seed in range(3):
        cal = synthetic_calibration(blocks=3, steps=8, seed=seed)
        front = Planner(cal).frontier(4, 0, "free")
        U = cal.n_units
        for budget in (0.3, 0.4, 0.55, 0.7, 0.85):
            cap = budget * 8 * cal.full_step_flops - 8 * cal.fixed_step_flops
            exact = allocate(front.err, cal.unit_flops, cap, exact_limit=10**9)
            fast = allocate(front.err, cal.unit_flops, cap, exact_limit=0)
            assert (fast * cal.unit_flops).sum() <= cap
            assert front.err[np.arange(U), fast].sum() == pytest.approx(front.err[np.arange(U), exact].sum(), rel=1e-12)


# ---- budgets ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth():
    return synthetic_calibration(blocks=8, steps=20, seed=0)


@pytest.fixture(scope="module")
def synth_planner(synth):
    return Planner(synth)


@pytest.mark.parametrize("budget", [0.25, 0.40, 0.60])
def test_realised_within_one_percent_below_budget(synth_planner, budget):
    plan, _ = synth_planner.plan(budget, "cachec")
    assert budget - 0.01 <= plan.budget.realised <= budget
    assert plan.budget.target == budget


def test_predicted_error_decreases_with_budget(synth):
    plans = sweep(synth, [0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
    errs = [plan.predicted_error for plan, _ in plans]
    assert all(b < a for a, b in zip(errs, errs[1:-1]))
    assert errs[-1] == 0.0


def test_cachec_beats_every_baseline_at_their_realised_flops(synth_planner):
    baselines = [("fora", {"interval": n}) for n in (2, 3, 4, 6)]
    baselines += [("eoc-paper", {"interval": 2}), ("eoc-paper", {"interval": 3}), ("goc-paper", {"interval": 2}),
                  ("goc-paper", {"interval": 3})]
    baselines += [("uniform", {"budget": b}) for b in (0.3, 0.5)]
    for method, opt in baselines:
        b = opt.pop("budget", None)
        plan, _ = synth_planner.plan(b, method, **opt)
        r = plan.budget.realised
        mine, _ = synth_planner.plan(r, "cachec")
        assert mine.budget.realised <= r
        assert mine.predicted_error <= plan.predicted_error, (method, opt, r)


def test_budget_below_floor_names_minimum(synth):
    minb = minimum_budget(synth.unit_flops, synth.full_step_flops, synth.fixed_step_flops, synth.steps, 8)
    with pytest.raises(ValueError, match=f"minimum {minb:.6g}"):
        make_plan(synth, minb * 0.99, "cachec")
    plan, _ = make_plan(synth, minb, "cachec")
    assert plan.budget.realised <= minb
    with pytest.raises(ValueError, match="minimum"):
        make_plan(synth, 0.01, "fora")
    with pytest.raises(ValueError, match="minimum"):
        make_plan(synth, 0.01, "uniform")


def test_constraints_staleness_keep_last_and_step_family(synth_planner):
    sched = synth_planner.schedule(0.4, "cachec", max_staleness=3, keep_last=2)
    for row in sched.compute:
        assert row[0] and row[-2:].all()
        run = 0
        for c in row:
            run = 0 if c else run + 1
            assert run <= 3
    plan, _ = synth_planner.plan(0.3, "cachec", family="step", fill=False)
    assert len({u.actions for u in plan.units}) == 1
    assert plan.budget.realised <= 0.3
    assert plan.budget.options["family"] == "step"


# ---- baselines ------------------------------------------------------------------------------------------
def test_fora_interval_from_budget(synth):
    plan, _ = make_plan(synth, 0.4, "fora")
    # N=3 spends ~35%, N=2 ~50%: the closest schedule at or under 40% is N=3
    assert plan.budget.options == {"interval": 3}
    assert plan.units[0].actions == "C..C..C..C..C..C..C."
    plan2, _ = make_plan(synth, None, "fora", interval=3)
    assert plan2.units == plan.units and plan2.budget.target == plan2.budget.realised


def test_paper_baselines(synth):
    goc, side = make_plan(synth, None, "goc-paper", interval=2)
    assert goc.history == "used" and side == {}
    from cachec.planner.baselines import goc_gate

    gate = goc_gate(synth)
    for s, c in goc.units[0].compensation.items():
        assert c.coeffs == ([2.2, -1.2] if gate[s] else [1.0])
    eoc, side = make_plan(synth, None, "eoc-paper", interval=2)
    assert eoc.history == "used"
    skipped = [(u.name, s) for u in eoc.units for s in u.compensation]
    assert sorted(side) == sorted(f"eoc/{n}/{s}" for n, s in skipped)
    assert all(c.eoc_alpha == 0.01 for u in eoc.units for c in u.compensation.values())
    P = synth.prior(0)
    name = synth.unit_names[0]
    np.testing.assert_allclose(side[f"eoc/{name}/3"], (P[3] - P[2]).astype(np.float32))
    uni, _ = make_plan(synth, 0.5, "uniform")
    per_step = np.array([[c == "C" for c in u.actions] for u in uni.units]).sum(axis=0)
    assert per_step[0] == synth.n_units and per_step[1:].max() - per_step[1:].min() <= 1


# ---- plan shape, files, determinism -------------------------------------------------------------------
def test_plan_shape_and_tuple_sidecar(tmp_path):
    feats = random_features(U=2, S=6, D=10, seed=21)
    shapes = {"blocks.0.ff": [[2, 3], [4]], "blocks.1.ff": [[5, 2]]}
    cal = make_cal(feats, shapes=shapes)
    plan, side = make_plan(cal, None, "eoc-paper", interval=3)
    assert isinstance(plan, Plan) and plan.budget.method == "eoc-paper"
    assert plan.sampler.steps == 6 and len(plan.sampler.timesteps) == 6
    assert plan.provenance.calibration_sha256 == cal.sha256 and plan.provenance.samples == 6
    for u in plan.units:
        assert u.actions[0] == "C" and len(u.actions) == 6
        assert sorted(u.compensation) == [s for s, c in enumerate(u.actions) if c == "."]
    # per-token prior (the default): one value per token of each part, broadcast over its channels
    assert side["eoc/blocks.0.ff/1/0"].shape == (2, 1) and side["eoc/blocks.0.ff/1/1"].shape == (1,)
    assert side["eoc/blocks.1.ff/2"].shape == (5, 1) and side["eoc/blocks.1.ff/2"].dtype == np.float32
    ch = make_cal(feats, shapes=shapes, eoc_prior="channel")
    _, side_c = make_plan(ch, None, "eoc-paper", interval=3)
    assert side_c["eoc/blocks.0.ff/1/0"].shape == (1, 3) and side_c["eoc/blocks.0.ff/1/1"].shape == (4,)
    # the planner leaves the sidecar entry to the writer, which names it after the plan file and hashes it
    assert plan.sidecar is None
    written = write_plan(plan, tmp_path / "p.yaml", side)
    sc = tmp_path / "p.eoc.safetensors"
    assert written.sidecar.file == sc.name and written.sidecar.sha256 == hashlib.sha256(sc.read_bytes()).hexdigest()
    assert load_plan(tmp_path / "p.yaml") == written
    P = cal.prior(0)
    assert P.shape == (6, 2 + 1)
    np.testing.assert_allclose(side["eoc/blocks.0.ff/2/1"], (P[2] - P[1])[2:].astype(np.float32))
    F = feats["blocks.0.ff"]  # (N, B, S, 10): the token prior is the mean over samples, branches, channels
    np.testing.assert_allclose(P[:, :2], F[..., :6].reshape(*F.shape[:3], 2, 3).mean(axis=(0, 1, 4)), rtol=1e-12)
    Pc = ch.prior(0)  # per channel: the mean over samples, branches, tokens
    np.testing.assert_allclose(Pc[:, :3], F[..., :6].reshape(*F.shape[:3], 2, 3).mean(axis=(0, 1, 3)), rtol=1e-12)
    # the full per-element prior is opt-in, stored as float16 in the per-sample shape
    full = make_cal(feats, shapes=shapes, eoc_prior="element")
    _, side_e = make_plan(full, None, "eoc-paper", interval=3)
    assert side_e["eoc/blocks.0.ff/1/0"].shape == (2, 3) and side_e["eoc/blocks.1.ff/2"].shape == (5, 2)
    assert side_e["eoc/blocks.1.ff/2"].dtype == np.float16
    spent = 6 * cal.fixed_step_flops + sum(u.actions.count("C") * u.flops for u in plan.units)
    realised = spent / (6 * cal.full_step_flops)
    assert plan.budget.realised == pytest.approx(realised, rel=1e-7)


def test_determinism(tmp_path):
    feats = synthetic_features(blocks=3, steps=12, seed=9)
    names = list(feats)
    flops = np.array([3.0 if n.endswith("attn1") else 5.0 for n in names])
    header, tensors = calibration_tensors(feats, flops, 8.0 * 3 * 1.01, None, np.ones((6, 12)))
    path = tmp_path / "cal.safetensors"
    save_calibration(str(path), header, tensors)
    outs = []
    for i in range(2):
        cal = load_calibration(str(path))
        for method in ("cachec", "eoc-paper"):
            plan, side = make_plan(cal, 0.45, method)
            write_plan(plan, tmp_path / str(i) / f"{method}.yaml", side or None)
        outs.append({f.name: f.read_bytes() for f in sorted((tmp_path / str(i)).iterdir())})
    assert outs[0] == outs[1] and "eoc-paper.eoc.safetensors" in outs[0]


def test_load_calibration_roundtrip_and_errors(tmp_path):
    feats = random_features(U=2, S=5, seed=31)
    flops = np.array([1.0, 2.0])
    header, tensors = calibration_tensors(feats, flops, 3.5, None, np.ones((2, 5)), eoc_prior="element")
    path = tmp_path / "c.safetensors"
    save_calibration(str(path), header, tensors)
    cal = load_calibration(str(path))
    mem = calibration_from_features(feats, flops, 3.5, None, np.ones((2, 5)), eoc_prior="element")
    assert cal.sha256 == mem.sha256
    np.testing.assert_array_equal(cal.gram, mem.gram)
    np.testing.assert_array_equal(cal.eoc_lin, mem.eoc_lin)
    np.testing.assert_allclose(cal.prior(1), feats["blocks.1.ff"].mean(axis=(0, 1)), rtol=1e-12)

    def broken(h=None, drop=None, **changes):
        hh = json.loads(json.dumps(header))
        hh.update(changes)
        if h:
            h(hh)
        tt = {k: v for k, v in tensors.items() if k != drop}
        return calibration_from_tensors(hh, tt.__getitem__, set(tt), "x")

    with pytest.raises(CalibrationError, match="format_version"):
        broken(format_version=3)
    with pytest.raises(CalibrationError, match="format version 1.*re-run cachec calibrate"):
        broken(format_version=1)
    with pytest.raises(CalibrationError, match="header.format"):
        broken(format="other")
    with pytest.raises(CalibrationError, match="gram/blocks.1.ff: missing"):
        broken(drop="gram/blocks.1.ff")
    with pytest.raises(CalibrationError, match="header.eoc_lags: missing"):
        broken(h=lambda hh: hh.pop("eoc_lags"))
    with pytest.raises(CalibrationError, match=r"sensitivity: expected shape"):
        t2 = dict(tensors, sensitivity=np.ones((2, 4)))
        calibration_from_tensors(header, t2.__getitem__, set(t2), "x")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError):
        load_calibration(str(bad))
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CalibrationError, match="not a cachec calibration"):
        load_calibration(str(tmp_path / "plain.safetensors"))


def test_options_validation(synth):
    with pytest.raises(ValueError, match="unknown options"):
        make_plan(synth, 0.4, "fora", family="step")
    with pytest.raises(ValueError, match="method"):
        make_plan(synth, 0.4, "magic")
    with pytest.raises(ValueError, match="budget"):
        make_plan(synth, 1.5, "cachec")
    with pytest.raises(ValueError, match="family"):
        make_plan(synth, 0.4, "cachec", family="blocks")
    with pytest.raises(ValueError, match="predictors"):
        make_plan(synth, 0.4, "cachec", predictors=("magic",))
    assert set(PREDICTORS) >= {"reuse", "ls2", "eoc"}


def test_planner_never_imports_torch():
    code = "import sys, cachec.planner as p; p.synthetic_calibration(blocks=1, steps=4); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cachec_eoc_sidecar_is_prior_difference_from_last_computed(synth_planner, synth):
    sched = synth_planner.schedule(0.3, "cachec")
    plan, side = synth_planner.plan(0.3, "cachec")
    pairs = [(u, s) for u in range(synth.n_units) for s in sched.eoc_alpha[u]]
    assert pairs, "the synthetic calibration has steps where EOC beats the other predictors"
    assert sorted(side) == sorted(f"eoc/{synth.unit_names[u]}/{s}" for u, s in pairs)
    for u, s in pairs[:5]:
        p = max(t for t in range(s) if sched.compute[u, t])
        assert sched.eoc_ref[u][s] == p and sched.coeffs[u][s] == (1.0,)
        P = synth.prior(u)
        np.testing.assert_allclose(side[f"eoc/{synth.unit_names[u]}/{s}"], (P[s] - P[p]).astype(np.float32))
        comp = plan.units[u].compensation[s]
        assert comp.coeffs == [1.0] and comp.eoc_alpha == sched.eoc_alpha[u][s]
    # plans without EOC have no sidecar
    plan, side = make_plan(synth, 0.3, "cachec", predictors=("reuse", "ls2"))
    assert side == {} and plan.sidecar is None


def test_sweep_table_matches_plans(synth):
    plans = sweep(synth, [0.3, 0.5], family="step")
    assert [plan.budget.target for plan, _ in plans] == [0.3, 0.5]
    planner = Planner(synth)
    for (plan, _), b in zip(plans, [0.3, 0.5]):
        alone, _ = planner.plan(b, "cachec", family="step")
        assert plan == alone and plan.budget.realised <= b
        assert plan.budget.options["family"] == "step"


def test_explicit_interval_over_budget_is_an_error(synth):
    with pytest.raises(ValueError, match="over the budget"):
        make_plan(synth, 0.3, "fora", interval=2)
    plan, _ = make_plan(synth, 0.6, "goc-paper", interval=2)
    assert plan.budget.target == 0.6 and plan.budget.options["interval"] == 2


def test_shrink_towards_the_forecast(synth):
    """``shrink: taylor``: with a huge ridge the two-anchor fits (GOC, LS2) become the first-order forecast,
    with ``shrink: reuse`` plain reuse; the default model is unchanged by the option's existence, and a plan
    records ``shrink`` only where it is not the default (and rebuilds from its recorded options)."""
    from cachec.planner.error_model import GOC, LS2, TAYLOR, ErrorModel
    from cachec.refine import replan_options

    s, p, q = np.array([5]), np.array([4]), np.array([2])
    u, has_q = np.array([0]), np.array([True])
    for target, want in (("taylor", None), ("reuse", (1.0, 0.0))):
        m = ErrorModel(synth, ridge=1e9, shrink=target)
        a1, a2, _, valid = m.fit_candidates(u, s, p, q, has_q)
        goal = (a1[TAYLOR][0], a2[TAYLOR][0]) if want is None else want
        for k in (GOC, LS2):
            assert valid[k][0] and (a1[k][0], a2[k][0]) == pytest.approx(goal, abs=1e-6)
    # the default (shrink towards reuse) is the ridge regression towards [1, 0], computed here by hand
    plain = ErrorModel(synth)
    U, S = synth.n_units, synth.steps
    uu, ss, pp, qq = (a.ravel() for a in np.meshgrid(np.arange(U), np.arange(2, S), np.arange(1, S), np.arange(S), indexing="ij"))
    keep = (pp < ss) & (qq < pp)
    uu, ss, pp, qq = uu[keep], ss[keep], pp[keep], qq[keep]
    a1, a2, _, _ = plain.fit_candidates(uu, ss, pp, qq, np.ones_like(uu, dtype=bool))
    G = plain.G_fit
    Gsp, Gsq, Gpp, Gpq, Gqq = G[uu, ss, pp], G[uu, ss, qq], G[uu, pp, pp], G[uu, pp, qq], G[uu, qq, qq]
    rho = plain.ridge * 0.5 * (Gpp + Gqq)
    lam = (Gsp - Gsq - Gpp + Gpq) / np.maximum(Gpp - 2 * Gpq + Gqq + rho, 1e-300)
    assert np.array_equal(a1[GOC], 1.0 + lam) and np.array_equal(a2[GOC], -lam)
    m11, m12, m22, b1, b2 = Gpp + rho, Gpq, Gqq + rho, Gsp + rho, Gsq
    det = m11 * m22 - m12 * m12
    ok = det > 1e-12 * m11 * m22
    assert np.allclose(a1[LS2][ok], ((m22 * b1 - m12 * b2) / det)[ok], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="shrink must be one of"):
        ErrorModel(synth, shrink="goc")
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="ridge must be a finite number"):
            ErrorModel(synth, ridge=bad)
    planner = Planner(synth)
    assert planner.error_model() is planner.model
    # the same ridge with either target: two models, two plans (the target is part of the cache keys)
    towards_reuse, _ = planner.plan(0.4, "cachec", family="step", ridge=10.0)
    towards_taylor, _ = planner.plan(0.4, "cachec", family="step", ridge=10.0, shrink="taylor")
    assert planner.error_model(ridge=10.0, shrink="taylor").shrink == "taylor"
    assert planner.error_model(ridge=10.0).shrink == "reuse"
    assert towards_reuse.predicted_error != towards_taylor.predicted_error
    default, _ = planner.plan(0.4, "cachec", family="step")
    assert "shrink" not in default.budget.options
    shrunk, _ = planner.plan(0.4, "cachec", family="step", ridge=10.0, shrink="taylor")
    assert shrunk.budget.options["shrink"] == "taylor" and shrunk.budget.options["ridge"] == 10.0
    again, _ = planner.plan(0.4, "cachec", family="step", **replan_options(shrunk.budget.options))
    assert again.predicted_error == shrunk.predicted_error
    assert [u.compensation for u in again.units] == [u.compensation for u in shrunk.units]
