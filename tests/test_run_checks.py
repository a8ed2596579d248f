"""Runs that do not fit the plan are refused or reported, never followed silently (issue 10).

Each test here fails on a runtime that matches each timestep on its own, ignores the guidance layout and
checks the weights only at ``apply()``: another step count that shares the plan's timesteps, timesteps a
little off or out of order, another number of guidance calls or another guidance scale, weights changed
after ``apply()``, ``torch.compile`` after ``apply()``, and the same sequence rule in calibration along a plan.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from cachec.runtime import apply, full_plan, with_actions
from cachec.runtime.executor import PlanScheduleError
from cachec.runtime.handle import PlanMismatchError

STEPS = 6
SKIPS = {"transformer_blocks.0.attn1": {2: [1.0], 4: [1.5, -0.5]}, "transformer_blocks.1.ff": {3: [1.0], 5: [1.0]}}
_PLANS: dict = {}


def skip_plan(driver, cfg="batched", steps=STEPS):
    key = (id(driver), cfg, steps)
    if key not in _PLANS:
        base = full_plan(driver, steps=steps, cfg=cfg)
        actions = {n: "".join("." if s in sk else "C" for s in range(steps)) for n, sk in SKIPS.items()}
        _PLANS[key] = with_actions(base, actions, SKIPS)
    return _PLANS[key]


def _call(model, t, n=2, dtype=None):
    """One transformer call at timestep ``t`` (batched CFG layout of ``n`` samples)."""
    x = torch.randn(2 * n, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    ts = torch.full((2 * n,), float(t), dtype=dtype or torch.float32)
    labels = torch.tensor([1] * n + [10] * n)
    with torch.no_grad():
        return model(hidden_states=x, timestep=ts, class_labels=labels).sample


# ------------------------------------------------------------------------------------ the step sequence


def test_another_step_count_sharing_the_plans_timesteps_is_refused(tiny_digits_ddim):
    driver = tiny_digits_ddim
    plan = skip_plan(driver)
    driver.scheduler.set_timesteps(3)
    three = [float(t) for t in driver.scheduler.timesteps]
    assert set(three) <= set(plan.sampler.timesteps)  # every value of the 3-step run is a plan timestep
    with apply(driver, plan):
        with pytest.raises(PlanScheduleError, match=r"step 1 received timestep 666, which is the plan's step 2"):
            driver.generate([3, 7], [0, 1], steps=3)
        ok = driver.generate([3, 7], [0, 1], steps=STEPS)  # the failed run leaves nothing behind
    with apply(driver, plan, remap="off") as handle:
        with pytest.warns(RuntimeWarning, match="left the plan's timestep sequence at its step 1"):
            off = driver.generate([3, 7], [0, 1], steps=3)
        assert handle.report.steps == [0, -1, -1] and handle.report.skipped == 0
    assert torch.equal(off, driver.generate([3, 7], [0, 1], steps=3))  # computed in full after step 0 (all 'C')
    with apply(driver, plan, remap="nearest") as handle:
        driver.generate([3, 7], [0, 1], steps=3)
        assert handle.report.steps == [0, 2, 4] and handle.report.skipped > 0
    with apply(driver, plan):
        assert torch.equal(driver.generate([3, 7], [0, 1], steps=STEPS), ok)


def test_timesteps_a_little_off_or_out_of_order_are_refused(tiny_digits):
    plan = skip_plan(tiny_digits)
    ts = plan.sampler.timesteps
    model = tiny_digits.transformer
    with apply(model, plan) as handle:
        _call(model, ts[0])
        with pytest.raises(PlanScheduleError, match="not in the plan's schedule"):
            _call(model, ts[1] * (1 + 2e-5))  # 0.02 off at ~800: a custom schedule, not rounding
        _call(model, ts[0])
        with pytest.raises(PlanScheduleError, match="which is the plan's step 2, not its step 1"):
            _call(model, ts[2])
        for s in range(STEPS):  # the plan's own sequence, then again (a second run from step 0)
            _call(model, ts[s])
        for s in range(STEPS):
            _call(model, ts[s])
        assert [r.steps for r in handle.reports[-2:]] == [list(range(STEPS))] * 2
        assert handle.reports[-1].complete and handle.reports[-1].skipped == 2 * len(SKIPS)
        with pytest.raises(PlanScheduleError, match="plan has only 6 steps"):
            _call(model, ts[-1] / 2)


def test_low_precision_timesteps_match_the_plan_rounded_to_their_dtype(tiny_digits):
    plan = skip_plan(tiny_digits)
    model = tiny_digits.transformer
    with apply(model, plan) as handle:
        for t in plan.sampler.timesteps:  # as FluxPipeline passes them on GPU
            _call(model, torch.tensor(t).to(torch.bfloat16).item(), dtype=torch.bfloat16)
        assert handle.report.steps == list(range(STEPS)) and handle.report.complete


# ------------------------------------------------------------------------------------ guidance


def test_another_number_of_guidance_calls_is_an_error(tiny_digits):
    plan = skip_plan(tiny_digits)  # 2 branches: 1 call per step (batched) or 2 (split), the same in a run
    ts = plan.sampler.timesteps
    model = tiny_digits.transformer
    with apply(model, plan):  # a bare transformer: a call at step 0 after all its calls is a new run
        for t in (ts[0], ts[0], ts[1], ts[1]):  # split CFG: branch 0, branch 1
            _call(model, t)
        with pytest.raises(PlanScheduleError, match=r"3 transformer call\(s\) at timestep .* at most 2"):
            _call(model, ts[1])
        for t in (ts[0], ts[0], ts[1]):
            _call(model, t)
        with pytest.raises(PlanScheduleError, match=r"1 transformer call\(s\) at timestep .* first step made 2"):
            _call(model, ts[2])
    unguided = full_plan(tiny_digits, steps=STEPS, guidance=1.0)  # 1 branch: exactly 1 call per step
    assert unguided.sampler.guidance.branches == 1
    with apply(model, unguided):
        _call(model, ts[0])
        _call(model, ts[1])
        with pytest.raises(PlanScheduleError, match=r"2 transformer call\(s\) .* 1 guidance branch"):
            _call(model, ts[1])
    with apply(tiny_digits, unguided):
        with pytest.raises(PlanScheduleError, match=r"guidance scale 3 \(CFG, 2 branches\).*1 branch"):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg="split")
    split = skip_plan(tiny_digits, cfg="split")
    with apply(tiny_digits, split) as handle:  # batched and split CFG compute the same: both run
        batched = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg="batched")
        assert handle.report.skipped == 2 * len(SKIPS)
        with pytest.raises(PlanScheduleError, match="no CFG, 1 branch"):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS, guidance=1.0)
    with apply(tiny_digits, plan):
        assert torch.allclose(batched, tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg="split"), atol=1e-4)


def test_guidance_scale_is_checked_against_the_plan(tiny_digits):
    plan = skip_plan(tiny_digits)
    scale = plan.sampler.guidance.scale
    assert scale > 1 and plan.sampler.guidance.mode == "batched"
    with apply(tiny_digits, plan) as handle:
        with pytest.warns(RuntimeWarning, match=rf"guidance scale 5 but the plan was calibrated at {scale:g}"):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS, guidance=5.0)
        assert handle.report.guidance_scale == 5.0 and handle.report.complete
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per scale, and none at the plan's scale
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS, guidance=5.0)
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
        assert handle.report.guidance_scale == scale
        with pytest.raises(PlanScheduleError, match=r"guidance scale 1 \(no CFG, 1 branch\).*2 branch"):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS, guidance=1.0)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_guidance_scale_is_read_from_diffusers_pipelines(tiny_pipelines, family):
    driver = tiny_pipelines[family]
    plan = full_plan(driver, steps=4)
    conds = [3, 7] if driver.condition_kind == "class" else ["a red cat", "blue tree"]
    with apply(driver.pipe, plan) as handle:
        driver.generate(conds, [0, 1], steps=4)
        assert handle.report.guidance_scale == plan.sampler.guidance.scale == driver.default_guidance
        with pytest.warns(RuntimeWarning, match=r"guidance scale 7 but the plan was calibrated"):
            driver.generate(conds, [0, 1], steps=4, guidance=7.0)
        if family == "flux":  # an embedded guidance, not CFG: another value is only a warning
            with pytest.warns(RuntimeWarning, match=r"guidance scale 1 but the plan was calibrated"):
                driver.generate(conds, [0, 1], steps=4, guidance=1.0)
            assert handle.report.complete
        else:
            with pytest.raises(PlanScheduleError, match="no CFG, 1 branch"):
                driver.generate(conds, [0, 1], steps=4, guidance=1.0)


# ------------------------------------------------------------------------------------ weights after apply()


def test_weight_changes_after_apply_are_caught_before_the_next_run(tiny_digits, monkeypatch):
    import cachec.runtime.handle as handle_mod

    plan = skip_plan(tiny_digits)
    model = tiny_digits.transformer
    original = copy.deepcopy(model.state_dict())
    other = {k: v + 0.01 for k, v in original.items()}
    hashes = []
    real = handle_mod.weights_fingerprint
    monkeypatch.setattr(handle_mod, "weights_fingerprint", lambda m: hashes.append(1) or real(m))
    try:
        with apply(tiny_digits, plan):
            assert len(hashes) == 1
            ref = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            assert len(hashes) == 1  # unchanged weights: no re-hash per run
            model.load_state_dict(other)
            with pytest.raises(PlanMismatchError, match="other weights.*force=True"):
                tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            model.load_state_dict(original)  # the plan's weights again: accepted (fingerprint re-checked once)
            assert torch.equal(tiny_digits.generate([3, 7], [0, 1], steps=STEPS), ref)
            w = model.transformer_blocks[0].ff.net[2].weight
            w.data += 1e-3 * torch.randn_like(w)  # a LoRA fusion writes through .data (no version bump)
            with pytest.raises(PlanMismatchError, match="other weights"):
                tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            with torch.no_grad():
                model.pos_embed.proj.weight.mul_(1.5)  # in-place under no_grad
            with pytest.raises(PlanMismatchError, match="other weights"):
                tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
        with apply(tiny_digits, plan, force=True):  # force: a warning, and it runs
            with pytest.warns(RuntimeWarning, match="force=True"):
                model.load_state_dict(original)
                model.load_state_dict(other)
                tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    finally:
        model.load_state_dict(original)


# ------------------------------------------------------------------------------------ torch.compile after apply()


def test_torch_compile_after_apply_runs_the_plan(tiny_digits):
    import torch._dynamo

    plan = skip_plan(tiny_digits)
    with apply(tiny_digits, plan):
        expected = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    plain = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    original = tiny_digits.pipe.transformer
    torch._dynamo.reset()
    handle = apply(tiny_digits, plan)
    try:
        tiny_digits.pipe.transformer = torch.compile(original, fullgraph=True, backend="eager")
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
        assert handle.report.complete and handle.report.skipped == 2 * len(SKIPS)
        handle.remove()
        after = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)  # the compiled module, hooks removed
    finally:
        handle.remove()
        tiny_digits.pipe.transformer = original
        torch._dynamo.reset()
    assert torch.equal(out, expected) and torch.equal(after, plain)


# ------------------------------------------------------------------------------------ calibration along a plan


def test_calibration_along_a_plan_follows_the_same_sequence_rule(tiny_digits_ddim, tmp_path):
    from cachec.calibrate import calibrate

    plan = copy.deepcopy(skip_plan(tiny_digits_ddim))
    ts = plan.sampler.timesteps
    plan.sampler.timesteps = [ts[0], ts[2], ts[1]] + ts[3:]  # the same values, another order
    with pytest.raises(PlanScheduleError, match="which is the plan's step 2, not its step 1"):
        calibrate(tiny_digits_ddim, [0], output=tmp_path / "a.safetensors", steps=STEPS, along=plan,
                  sensitivity="none", progress=False)


# ------------------------------------------------------------------------------------ found by a critic


@pytest.mark.parametrize("scale", [np.float32(1.0), torch.tensor(1.0)])
def test_guidance_scale_of_any_numeric_type_is_checked(tiny_digits, scale):
    plan = skip_plan(tiny_digits)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with apply(tiny_digits, plan):
        with pytest.raises(PlanScheduleError, match="no CFG, 1 branch"):
            tiny_digits.pipe([3, 7], STEPS, scale, gens)


def test_remove_restores_other_instance_patches(tiny_digits):
    plan = skip_plan(tiny_digits)
    ff = tiny_digits.transformer.transformer_blocks[1].ff
    sched = tiny_digits.scheduler
    orig_ff, orig_st = ff.forward, sched.set_timesteps
    calls = []

    def patched_ff(*a, **k):
        calls.append(1)
        return orig_ff(*a, **k)

    def patched_st(*a, **k):
        return orig_st(*a, **k)

    ff.forward, sched.set_timesteps = patched_ff, patched_st
    try:
        with apply(tiny_digits, plan):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
        assert ff.__dict__["forward"] is patched_ff and sched.__dict__["set_timesteps"] is patched_st
        before = len(calls)
        tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
        assert len(calls) == before + STEPS  # the other library's patch still runs
    finally:
        del ff.forward, sched.set_timesteps


def test_a_binary_file_is_not_a_plan(tmp_path):
    from cachec.runtime.plan import PlanError, load_plan

    f = tmp_path / "calib.safetensors"
    f.write_bytes((20).to_bytes(8, "little") + b'{"__metadata__":{}}' + b"\x00" * 8)
    with pytest.raises(PlanError, match="not a plan YAML.*cachec plan"):
        load_plan(f)
    g = tmp_path / "junk.yaml"
    g.write_bytes(b"\xc0\xff junk")
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(g)
