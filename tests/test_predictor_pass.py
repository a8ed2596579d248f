"""The predictor pass (planner/predictor_pass.py): each skipped step's predictor re-chosen under the
trajectory-coherent price, with the solver's computed steps fixed."""

from __future__ import annotations

import numpy as np
import pytest

from cachec.planner import Planner
from cachec.planner.error_model import PREDICTORS, schedule_error
from cachec.planner.predictor_pass import choose_predictors
from cachec.planner.schedule import Schedule
from cachec.refine import replan_options

from test_planner import brute_schedule_error, make_cal, random_features


def _planner(seed: int, U: int = 4, S: int = 12, predictors=PREDICTORS):
    feats = random_features(U=U, S=S, seed=seed)
    cal = make_cal(feats, seed=seed)
    return feats, cal, Planner(cal, predictors=predictors)


def _unit_price(model, sched, u):
    return schedule_error(model, sched, per_unit=True, coherence="trajectory")[u]


@pytest.mark.parametrize("family,predictors", [("step", "taylor"), ("free", "fitted"), ("group", "taylor"),
                                               ("warmup", "fitted")])
def test_pass_keeps_the_flops_and_lowers_every_units_trajectory_price(family, predictors):
    """Same computed steps; every unit's trajectory price is at most the solver's (the solver's choice is
    always a candidate), the total strictly lower somewhere across seeds, and the price agrees with a
    per-sample simulation from the features (so the pass optimises what it claims to)."""
    lowered = 0
    for seed in range(4):
        feats, cal, planner = _planner(seed)
        opts = dict(family=family, predictors=predictors, max_staleness=4)
        if family == "group":
            opts["groups"] = 2
        before = planner.schedule(0.45, "cachec", predictor_pass="none", **opts)
        after = planner.schedule(0.45, "cachec", predictor_pass="trajectory", **opts)
        model = planner.error_model(predictors)
        assert after.options["predictor_pass"] == "trajectory" and "predictor_pass" not in before.options
        assert (after.compute == before.compute).all()
        b = schedule_error(model, before, per_unit=True, coherence="trajectory")
        a = schedule_error(model, after, per_unit=True, coherence="trajectory")
        assert (a <= b * (1 + 1e-9) + 1e-12).all()
        lowered += int(a.sum() < b.sum() * (1 - 1e-6))
        if not any(after.eoc_alpha):  # (the simulation needs the EOC prior tensors otherwise)
            assert a.sum() == pytest.approx(brute_schedule_error(feats, cal, after, coherence="trajectory"), rel=1e-6)
        changed = sum(after.coeffs[u][s] != before.coeffs[u][s] for u in range(cal.n_units) for s in after.coeffs[u])
        assert after.options["repredicted"] == changed
    assert lowered >= 2


def test_pass_stops_at_a_local_optimum():
    """No single step's candidate (reuse, or the forecast from the same anchors) lowers its unit's
    trajectory price any further: the coordinate descent ran to its stopping rule."""
    _, cal, planner = _planner(7, predictors="taylor")
    sched = planner.schedule(0.4, "cachec", family="step", predictors="taylor", max_staleness=4,
                             predictor_pass="trajectory")
    model = planner.error_model("taylor")
    t = model.tgrid
    for u in range(cal.n_units):
        base = _unit_price(model, sched, u)
        comp = np.flatnonzero(sched.compute[u])
        for s, c in list(sched.coeffs[u].items()):
            prev = comp[comp < s][::-1]
            options = [(1.0,)]
            if len(prev) > 1:
                h = (t[s] - t[prev[0]]) / (t[prev[0]] - t[prev[1]])
                options.append((1.0 + h, -h))
            for o in options:
                sched.coeffs[u][s] = o
                # (coefficients are stored to 8 significant digits: a rounding-sized difference is no gain)
                assert _unit_price(model, sched, u) >= base * (1 - 1e-7) - 1e-12, (u, s, o)
            sched.coeffs[u][s] = c


def test_pass_leaves_used_histories_and_nested_units_alone():
    _, cal, planner = _planner(3)
    sched = planner.schedule(0.5, "cachec", family="step", predictor_pass="none", max_staleness=4)
    used = Schedule(sched.compute, sched.coeffs, sched.eoc_alpha, sched.eoc_ref, "used", {}, None)
    out = choose_predictors(planner.model, used)
    assert out.coeffs == used.coeffs and out is not used
    nested = Schedule(sched.compute, [dict(c) for c in sched.coeffs], history="computed",
                      parents=[None, 0, None, None])
    nested.compute[1] = nested.compute[0]
    s_map = int(np.flatnonzero(nested.compute[0])[1])  # the map reuses its value at its parent's second compute
    nested.compute[1, s_map] = False
    nested.coeffs[1] = {s_map: (1.0,)}
    out = choose_predictors(planner.model, nested)
    assert out.coeffs[1] == nested.coeffs[1]


def test_unknown_pass_is_refused_and_old_plans_replan_without_it():
    _, _, planner = _planner(1)
    with pytest.raises(ValueError, match="predictor_pass must be one of"):
        planner.schedule(0.5, "cachec", family="step", predictor_pass="global")
    assert planner.schedule(0.5, "cachec", family="step").options.get("predictor_pass") is None  # off by default
    assert replan_options({"fill": True})["predictor_pass"] == "none"
    assert replan_options({"predictor_pass": "trajectory"})["predictor_pass"] == "trajectory"


def test_rounding_alone_is_no_change():
    """The solver stores coefficients to 8 significant digits: the pass compares candidates the same way, so a
    forecast-set plan (one candidate per step) is never 'changed' and its plan is the solver's."""
    _, _, planner = _planner(2, predictors="forecast")
    for family in ("step", "warmup", "free"):
        a = planner.schedule(0.5, "cachec", family=family, predictors="forecast")
        b = planner.schedule(0.5, "cachec", family=family, predictors="forecast", predictor_pass="trajectory")
        assert b.options["repredicted"] == 0 and b.coeffs == a.coeffs


def test_units_hosting_attention_maps_keep_their_predictors_and_rebuild_exactly():
    """A parent's coefficients set its maps' propagation factors, which the map exchange priced: the pass leaves
    parents and maps alone (no unit's price rises, the total neither), and the options it records rebuild the
    same computed steps (free family and trimmed masks record ``fill`` too, so the map exchange stays on)."""
    from cachec.planner.synthetic import synthetic_calibration

    for seed in (2, 3):
        cal = synthetic_calibration(blocks=3, steps=10, seed=seed, attention_maps=True)
        planner = Planner(cal)
        hosts = {p for p in planner.parents if p is not None}
        assert hosts
        model = planner.error_model("fitted")
        for family, budget, extra in (("warmup", 0.3, {}), ("free", 0.3, {}), ("step", 0.4, {"mask": [0, 2, 4, 6, 8]})):
            a = planner.schedule(budget, "cachec", family=family, **extra)
            b = planner.schedule(budget, "cachec", family=family, predictor_pass="trajectory", **extra)
            ea = schedule_error(model, a, per_unit=True, coherence="trajectory")
            eb = schedule_error(model, b, per_unit=True, coherence="trajectory")
            assert (eb <= ea * (1 + 1e-9) + 1e-12).all()
            assert all(b.coeffs[u] == a.coeffs[u] for u in range(cal.n_units) if u in hosts or planner.parents[u] is not None)
            again = planner.schedule(budget, "cachec", family=b.options["family"], **replan_options(b.options))
            assert (again.compute == b.compute).all() and again.coeffs == b.coeffs
