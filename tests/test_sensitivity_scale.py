"""Sensitivity at scale (issue 12): what the probes keep in memory, the ``chain`` method against ``full``,
the cost formula against counted transformer steps, determinism, and the ``auto`` rule.

All on the tiny random digit DiT (2 blocks, 4 units) of conftest, a few steps, two samples.
"""

from __future__ import annotations

import numpy as np
import pytest

from cachec.calibrate import calibrate, read_header
from cachec.calibrate import sensitivity as sm
from cachec.calibrate.recorder import Recorder, StepTracker, Switch, batched_cond_first
from cachec.runtime.hooks import install
from cachec.runtime.units import find_units

CONDS, SEEDS = [3, 8], [0, 1]


def _measure(driver, methods, steps, cfg="batched", units=None, mine=None, conds=CONDS, guidance=3.0):
    """``{method: (results (P, 2), sensitivity (U, S))}`` with hooks on ``units`` (default: all)."""
    units = find_units(driver.transformer) if units is None else units
    cond_first = batched_cond_first(driver.pipe)
    first = StepTracker(driver.transformer, steps, cond_first)
    switch = Switch()
    out = {}
    with install(driver.transformer, units, switch):
        learn = Recorder(units, first)  # without a record it only teaches the tracker the schedule
        switch.target = learn
        learn.start_run(len(conds))
        driver.generate(conds, SEEDS, steps=steps, guidance=guidance, cfg=cfg)
        learn.finish_run()
        switch.target = None

        def make_tracker():
            t = StepTracker(driver.transformer, steps, cond_first, schedule=first.schedule)
            t.mode = first.mode
            return t

        for m in methods:
            jl = sm.jobs(m, len(units), steps)
            res, done = np.zeros((len(jl), 2)), np.zeros(len(jl), dtype=bool)
            for part in (mine or [lambda j: True]):
                sm.measure(driver, switch, make_tracker, len(units), m, conds, SEEDS, steps, guidance, cfg, res, done,
                           mine=part)
            assert done.all()
            out[m] = (res, sm.compose(m, len(units), steps, jl, res))
    return out


@pytest.mark.parametrize("cfg", ["batched", "split"])
def test_chain_equals_full_for_a_single_unit(tiny_digits, cfg):
    """With one unit the joint probe *is* the unit's probe, so κ_s·‖Δx(u)‖²/e = Δ/e exactly: the two
    latent changes are the same computation (bit-identical), leaving only the float64 rounding of
    (a/b)·(b/c) against a/c (a few ulp), hence rtol 1e-12. A latent taken at the wrong step, κ of the
    wrong step, a cache holding another step's features or the joint and unit probes disagreeing in any
    way moves values by O(1) relative amounts."""
    steps = 5
    unit = find_units(tiny_digits.transformer)[1:2]
    r = _measure(tiny_digits, ("full", "chain"), steps, cfg, units=unit)
    full, chain = r["full"][1], r["chain"][1]
    assert full.shape == (1, steps) and np.all(full[:, 1:] > 0)
    np.testing.assert_allclose(chain, full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_chain_equals_full_for_a_single_unit_on_diffusers_pipelines(tiny_pipelines, family):
    """The same identity through diffusers pipelines: PixArt (DPMSolver++ multistep, batched CFG, the
    scheduler's SchedulerOutput) and FLUX (FlowMatch Euler, packed latents, ``return_dict=False`` tuples)."""
    driver = tiny_pipelines[family]
    unit = find_units(driver.transformer)[:1]
    r = _measure(driver, ("full", "chain"), 4, units=unit, conds=["a red car", "a dog"],
                 guidance=driver.default_guidance)
    assert np.all(r["full"][1][:, 1:] > 0)
    np.testing.assert_allclose(r["chain"][1], r["full"][1], rtol=1e-12, atol=0)


def test_chain_against_full_with_all_units(tiny_digits):
    """Where chain runs full's very probes it gives full's numbers bit for bit (the middle and the last
    step; the joint probes are factored's), elsewhere it is an approximation whose ranks must agree."""
    from scipy.stats import spearmanr

    steps = 5
    r = _measure(tiny_digits, ("full", "factored", "chain"), steps)
    full, chain = r["full"][1], r["chain"][1]
    U = full.shape[0]
    assert np.array_equal(chain[:, steps - 1], full[:, steps - 1])
    assert np.array_equal(chain[:, steps // 2], full[:, steps // 2])
    n_joint = steps - 2
    np.testing.assert_array_equal(r["chain"][0][:n_joint, 0], r["factored"][0][:n_joint, 0])  # same final Δ
    assert np.isfinite(chain).all() and (chain > 0).all() and np.array_equal(chain[:, 0], chain[:, 1])
    # latent probes: the latent change of a unit is positive and the local error is full's
    kinds = sm.probe_kinds("chain", U, steps)
    lat = [j for j, k in enumerate(kinds) if k == "latent"]
    assert len(lat) == U * (steps - 2) and (r["chain"][0][lat] > 0).all()
    rho = spearmanr(full[:, 1:].ravel(), chain[:, 1:].ravel())[0]
    assert rho > 0.9, rho  # random-init model, 5 steps: measured 0.99 (factored: 0.88)


def test_probes_keep_one_step_of_unit_outputs(tiny_digits, monkeypatch):
    """Memory: the reference run holds each unit's previous-step output only, the probes a cache of one
    step's outputs (at most U × calls features, all of one step), the state nothing per (unit, step)."""
    steps = 5
    units = find_units(tiny_digits.transformer)
    U, calls = len(units), 2  # split CFG: two calls per step
    seen = {"ref": 0, "cache": 0, "steps": set()}
    ref_store, put = sm._RefHandler.store, sm.StepCache.put

    def checked_store(self, index, feature):
        ref_store(self, index, feature)
        held = sum(len(p) for p in self.prev)
        assert held <= U * calls and all(len(p) <= calls for p in self.prev)
        seen["ref"] = max(seen["ref"], held)

    def checked_put(self, index, call, feature):
        put(self, index, call, feature)
        assert len(self.feats) <= U * calls
        seen["cache"] = max(seen["cache"], len(self.feats))

    fill = sm._ProbeHandler.store

    def checked_fill(self, index, feature):
        if self.fill and self.tracker.info.step == self.step - 1:
            seen["steps"].add((id(self.cache), self.step - 1, self.cache.step))
        fill(self, index, feature)

    monkeypatch.setattr(sm._RefHandler, "store", checked_store)
    monkeypatch.setattr(sm.StepCache, "put", checked_put)
    monkeypatch.setattr(sm._ProbeHandler, "store", checked_fill)
    for method in ("full", "chain"):
        _measure(tiny_digits, (method,), steps, "split")
    assert seen["ref"] == U * calls and seen["cache"] == U * calls
    assert all(cached is None for _, _, cached in seen["steps"])  # a fill starts from an emptied cache

    # what the reference run hands to the probes: latent-sized tensors per step, no unit feature
    tr = tiny_digits.transformer
    first = StepTracker(tr, steps, True)
    switch = Switch()
    with install(tr, units, switch):
        state, outputs, images = sm.reference_run(tiny_digits, switch, first, U, CONDS, SEEDS, steps, 3.0, "batched",
                                                  latents=True)
    assert set(vars(state)) == {"local", "latents", "cache"} and state.cache.feats == {} and state.cache.step is None
    assert state.local.shape == (U, steps) and state.local.dtype == np.float64
    assert sorted(outputs) == [(s, 0) for s in range(steps)] and sorted(state.latents) == list(range(steps))
    assert all(tuple(x.shape) == (len(CONDS), 1, 32, 32) for x in state.latents.values())
    assert all(tuple(o.sample.shape) == (2 * len(CONDS), 1, 32, 32) for o in outputs.values())


@pytest.mark.parametrize("method", ["full", "factored", "chain"])
def test_cost_is_the_counted_transformer_steps(tiny_digits, method):
    """sensitivity.cost (the docs' formulas) against the transformer executions really made (replayed calls
    do not run the patch embedding; batched CFG: one call per step)."""
    steps = 4
    count = [0]
    hook = tiny_digits.transformer.pos_embed.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    try:
        units = find_units(tiny_digits.transformer)
        before = count[0]
        _measure(tiny_digits, (method,), steps)
        learn = steps  # _measure's schedule-learning run
    finally:
        hook.remove()
    assert count[0] - before - learn == sm.cost(method, len(units), steps)


def test_deterministic_and_independent_of_probe_split(tiny_digits):
    """Two measurements agree bit for bit, and so does one split over two 'ranks' (each rank fills its own
    step cache from a live step, where the single run reuses the cache: the paths must not differ)."""
    steps = 4
    a = _measure(tiny_digits, ("chain",), steps)["chain"]
    b = _measure(tiny_digits, ("chain",), steps)["chain"]
    c = _measure(tiny_digits, ("chain",), steps, mine=[lambda j: j % 2 == 0, lambda j: j % 2 == 1])["chain"]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(a[0], c[0])


def test_chain_through_calibrate(tiny_digits, tmp_path):
    """``calibrate(sensitivity="chain")`` writes the method; with S = 2 chain is full (one-step probes)."""
    kw = dict(steps=2, batch_size=2, progress=False, sensitivity_samples=2)
    c = calibrate(tiny_digits, [1, 2], output=tmp_path / "c.safetensors", sensitivity="chain", **kw)
    f = calibrate(tiny_digits, [1, 2], output=tmp_path / "f.safetensors", sensitivity="full", **kw)
    from safetensors import safe_open

    with safe_open(str(c), framework="numpy") as fc, safe_open(str(f), framework="numpy") as ff:
        assert np.array_equal(fc.get_tensor("sensitivity"), ff.get_tensor("sensitivity"))
    assert read_header(c)["sensitivity"]["method"] == "chain"


def test_compose_chain_formula_and_undefined_values():
    """c(u, s) = κ_s · L(u, s) / e(u, s) with κ_s = Δ/‖Δx‖² of the joint probe, rescaled per unit so that
    the middle step m holds full's value; c alone where c(u, m) is undefined; the last step as full;
    values still undefined take the step's median."""
    U, S = 2, 4  # m = 2
    jl = sm.jobs("chain", U, S)
    assert jl[:2] == [((0, 1), 1), ((0, 1), 2)] and jl[-2:] == [((0,), 2), ((1,), 2)] and len(jl) == 2 + U * S
    res = np.array([[6.0, 2.0], [1.0, 4.0],  # joint: κ_1 = 3, κ_2 = 0.25
                    [2.0, 1.0], [4.0, 1.0],  # step 1 latent probes: L/e = 2, 4 -> c = 6, 12
                    [8.0, 2.0], [3.0, 0.0],  # step 2: c = 1, undefined
                    [5.0, 1.0], [1.0, 2.0],  # step 3 (final probes): 5, 0.5
                    [10.0, 2.0], [6.0, 0.0]])  # full probes at m: 5 (unit 0: scale 5), undefined (unit 1: c alone)
    sens = sm.compose("chain", U, S, jl, res)
    np.testing.assert_allclose(sens[:, 1], [30.0, 12.0])
    np.testing.assert_allclose(sens[:, 2], [5.0, 5.0])  # full's value; the undefined one: the step's median
    np.testing.assert_allclose(sens[:, 3], [5.0, 0.5])
    np.testing.assert_array_equal(sens[:, 0], sens[:, 1])
    assert sm.probe_kinds("chain", U, S) == ["joint", "joint"] + ["latent"] * 4 + ["final"] * 4
    assert sm.cost("chain", U, S) == S + (3 + 2) + U * 2 + U * 1 + U * 2 + (S - 1)
    assert sm.cost("full", 56, 50) == 50 + 56 * 50 * 49 // 2 + 49 and sm.cost("none", 56, 50) == 0
    assert [sm.cost("chain", *m) for m in ((56, 50), (76, 28))] == [5467, 3548]


def test_auto_rule():
    assert sm.resolve("auto", 24, 25) == "full" and sm.resolve("auto", 24, 50) == "full"  # the digit models
    assert sm.resolve("auto", 56, 50) == "chain" and sm.resolve("auto", 76, 28) == "chain"  # DiT-XL/2, FLUX.1
    assert sm.resolve("auto", 24, 25, small="factored") == "factored"
    assert sm.resolve("factored", 56, 50) == "factored"
    with pytest.raises(ValueError, match="unknown sensitivity method"):
        sm.resolve("magic", 2, 2)
    with pytest.raises(ValueError, match="unknown sensitivity method"):
        sm.jobs("auto", 2, 2)
