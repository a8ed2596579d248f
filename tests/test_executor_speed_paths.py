"""The executor's fast paths (issue 12): plain reuse returns the cached tensor, outputs no later step reads
are not kept, units without a history build no feature, compensation runs in the model dtype, and EOC
priors may broadcast to the per-sample shape. No timings: what is checked is what is (not) computed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cachec.runtime import apply, with_actions
from cachec.runtime.executor import PlanScheduleError
from cachec.runtime.plan import Compensation, load_plan, write_plan

from test_runtime import STEPS, base_plan, hand_rolled, schedule_plan

A0 = "transformer_blocks.0.attn1"
# computed at 0, 1, 3; step 2 reuses step 1, step 4 extrapolates from 3 and 1, step 5 reuses 3: no step
# reads step 0's output
MIXED = {A0: {2: [1.0], 4: [2.0, -1.0], 5: [1.0]}}


def _history_snapshots(driver, plan, remap="error", cfg="batched"):
    """Run ``plan``; after every transformer call, per branch, which history slots of unit 0 hold None."""
    snaps = []
    with apply(driver, plan, remap=remap) as handle:
        def post(module, args, output):
            hist = handle.executor._run.history
            snaps.append({b: [f is None for f in h[0]] for b, h in sorted(hist.items())})

        hook = driver.transformer.register_forward_hook(post)
        try:
            out = driver.generate([3, 7], [0, 1], steps=STEPS, cfg=cfg)
        finally:
            hook.remove()
    return out, snaps, handle


@pytest.mark.parametrize("cfg", ["batched", "split"])
def test_outputs_no_later_step_reads_are_not_kept(tiny_digits, cfg):
    plan = schedule_plan(base_plan(tiny_digits, cfg=cfg), MIXED)
    out, snaps, handle = _history_snapshots(tiny_digits, plan, cfg=cfg)
    # slots most recent first; True = None. Step 0's output is never read, the others are
    want = [[True], [False, True], [False, True], [False, False], [False, False], [False, False]]
    per_call = snaps if cfg == "batched" else snaps[1::2]
    assert [s[0] for s in per_call] == want
    if cfg == "split":
        assert all(s[1] == w for s, w in zip(per_call, want))  # branch 1: the same, in its own history
    assert [p for p in handle.executor._steps[0].pushes if p[0] == 0] == [(0, False)]
    # the same samples as keeping everything (remap="nearest" keeps every feature) and as the hand-rolled loop
    kept, snaps_all, _ = _history_snapshots(tiny_digits, plan, remap="nearest", cfg=cfg)
    assert not any(any(s[0]) for s in snaps_all)
    assert torch.equal(out, kept) and torch.equal(out, hand_rolled(tiny_digits, MIXED, cfg))


def test_history_used_keeps_only_what_is_read(tiny_digits):
    sched = {"transformer_blocks.0.ff": {2: [1.5, -0.5], 3: [1.5, -0.5], 5: [1.0]}}
    plan = schedule_plan(base_plan(tiny_digits), sched, history="used")
    out, _, handle = _history_snapshots(tiny_digits, plan)
    ff = 1  # plan unit index of transformer_blocks.0.ff
    kept = [dict(rec.pushes).get(ff) for rec in handle.executor._steps]
    # every step pushes; steps 3 (read by no later step: 4 computes, 5 reuses 4) and 5 (the last) are dropped
    assert kept == [True, True, True, False, True, False]
    with apply(tiny_digits, plan, remap="nearest"):
        assert torch.equal(out, tiny_digits.generate([3, 7], [0, 1], steps=STEPS))
    assert torch.equal(out, hand_rolled(tiny_digits, sched, "batched", history="used"))


def test_plain_reuse_returns_the_cached_tensor_itself(tiny_digits):
    plan = schedule_plan(base_plan(tiny_digits), MIXED)
    module = dict(tiny_digits.transformer.named_modules())[A0]
    outs = []
    hook = module.register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        with apply(tiny_digits, plan) as handle:
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    finally:
        hook.remove()
    assert len(outs) == STEPS
    # steps 2 and 5 reuse steps 1 and 3: the very same storage, no copy; step 4 is a new tensor
    assert outs[2].data_ptr() == outs[1].data_ptr() and outs[5].data_ptr() == outs[3].data_ptr()
    assert outs[4].data_ptr() not in {o.data_ptr() for o in outs[:4]}
    assert torch.equal(outs[4], 2.0 * outs[3] - outs[1])
    assert handle.report.skipped == 3 and handle.report.compensated == 1


def test_units_without_history_build_no_feature(tiny_pipelines, tiny_digits):
    """A 100 % plan keeps nothing, so the hook core never builds a feature (no ``output − input`` for FLUX's
    residual units); a unit skipped somewhere still stores its computed outputs."""
    for driver in (tiny_pipelines["flux"], tiny_digits):
        plan = base_plan(driver, steps=4)
        with apply(driver.pipe, plan) as handle:
            assert not any(handle.executor.stores(i) for i in range(len(plan.units)))

            def fail(index, feature):
                raise AssertionError(f"store called for unit {index}")

            handle.executor.store = fail
            driver.generate([3, 7] if driver.condition_kind == "class" else ["a", "b"], [0, 1], steps=4)
    plan = schedule_plan(base_plan(tiny_digits), MIXED)
    with apply(tiny_digits, plan) as handle:
        assert [handle.executor.stores(i) for i in range(4)] == [True, False, False, False]


def test_compensation_runs_in_the_model_dtype(tmp_path):
    """A float64 model's predictions are computed in float64 (bitwise the float64 hand-rolled loop; through
    float32, as before, they would differ), and the features keep the model dtype."""
    from conftest import build_tiny_digits_folder

    from cachec.loading import load_model

    driver = load_model(build_tiny_digits_folder(tmp_path / "f64", "flow"), dtype=torch.float64)
    sched = {A0: {2: [1.5, -0.5], 4: [1.0]}, "transformer_blocks.1.ff": {3: [2.0, -1.0], 5: [0.5, 0.25, 0.25]}}
    plan = schedule_plan(base_plan(driver), sched)
    module = dict(driver.transformer.named_modules())[A0]
    dtypes = []
    hook = module.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    try:
        with apply(driver, plan):
            out = driver.generate([3, 7], [0, 1], steps=STEPS)
    finally:
        hook.remove()
    assert dtypes == [torch.float64] * STEPS
    assert torch.equal(out, hand_rolled(driver, sched, "batched"))


@pytest.mark.parametrize("shape", [(1, 32), (64, 1), (1, 1), (64, 32)])
def test_eoc_prior_may_broadcast_to_the_per_sample_shape(tiny_digits, tmp_path, shape):
    name = "transformer_blocks.1.attn1"  # output per sample (64 tokens, 32 channels)
    sched = {name: {3: [1.0], 4: [1.5, -0.5]}}
    plan = copy.deepcopy(schedule_plan(base_plan(tiny_digits), sched))
    plan.unit(name).compensation[4] = Compensation([1.5, -0.5], eoc_alpha=0.25)
    d = np.random.default_rng(1).normal(size=shape).astype(np.float32)  # e.g. a per-channel prior
    write_plan(plan, tmp_path / "eoc.yaml", {f"eoc/{name}/4": d})
    expected = hand_rolled(tiny_digits, sched, "batched", eoc={(name, 4): (0.25, torch.from_numpy(d))})
    with apply(tiny_digits, load_plan(tmp_path / "eoc.yaml")) as handle:
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    assert torch.equal(out, expected) and handle.report.compensated == 1


@pytest.mark.parametrize("shape", [(2, 32), (32,), (1, 64, 32), (32, 64)])
def test_eoc_prior_that_does_not_broadcast_is_a_clear_error(tiny_digits, tmp_path, shape):
    name = "transformer_blocks.1.attn1"
    plan = copy.deepcopy(schedule_plan(base_plan(tiny_digits), {name: {3: [1.0], 4: [1.5, -0.5]}}))
    plan.unit(name).compensation[4] = Compensation([1.5, -0.5], eoc_alpha=0.25)
    write_plan(plan, tmp_path / "bad.yaml", {f"eoc/{name}/4": np.ones(shape, np.float32)})
    with apply(tiny_digits, tmp_path / "bad.yaml"):
        with pytest.raises(PlanScheduleError, match=rf"has shape \[{', '.join(map(str, shape))}\].*\[64, 32\] "
                                                    r"and the prior neither has it nor broadcasts to it"):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS)


def test_plain_reuse_is_its_own_compiled_pattern(tiny_digits):
    """Plain reuse and a single scaled coefficient are different graphs; step_signatures says so, and a
    compiled run makes exactly that many."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    plan = with_actions(base_plan(tiny_digits), {A0: "CC.C.."}, {A0: {2: [1.0], 4: [0.5], 5: [1.0]}})
    sigs = None
    original = tiny_digits.pipe.transformer
    torch._dynamo.reset()
    tiny_digits.pipe.transformer = torch.compile(original, fullgraph=True, backend="eager")
    try:
        with apply(tiny_digits, plan) as handle:
            sigs = handle.executor.step_signatures()
            before = counters["stats"]["unique_graphs"]
            out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            graphs = counters["stats"]["unique_graphs"] - before
    finally:
        tiny_digits.pipe.transformer = original
        torch._dynamo.reset()
    assert sigs[2][0] == (1, False, True) and sigs[4][0] == (1, False, False)
    assert graphs == len(set(sigs)) == 3
    assert torch.equal(out, hand_rolled(tiny_digits, {A0: {2: [1.0], 4: [0.5], 5: [1.0]}}, "batched"))
