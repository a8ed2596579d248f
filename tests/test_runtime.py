"""cachec.runtime: plan schema, plan execution on tiny models, apply() checks, torch.compile."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import numpy as np

import pytest
import torch
import yaml

from cachec.runtime import apply, full_plan, with_actions
from cachec.runtime.executor import PlanScheduleError
from cachec.runtime.handle import PlanMismatchError
from cachec.runtime.plan import (
    Compensation,
    PlanError,
    dump_plan,
    load_plan,
    parse_plan,
    to_dict,
    write_plan,
)

STEPS = 6
_PLANS: dict = {}


def base_plan(driver, steps=STEPS, cfg="batched"):
    """All-'C' plan of a driver (cached per driver/steps/cfg: one dry run each)."""
    key = (id(driver), steps, cfg)
    if key not in _PLANS:
        _PLANS[key] = full_plan(driver, steps=steps, cfg=cfg)
    return _PLANS[key]


def _conds(driver):
    return [3, 7] if driver.condition_kind == "class" else ["a red cat", "blue tree"]


# ------------------------------------------------------------------------------------ full plans: no-op


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_full_plan_is_bitwise_noop_on_diffusers_pipelines(tiny_pipelines, family):
    driver = tiny_pipelines[family]
    plan = base_plan(driver, steps=4)
    assert all(set(u.actions) == {"C"} for u in plan.units) and plan.budget.realised == 1.0
    ref = driver.generate(_conds(driver), [0, 1], steps=4)
    with apply(driver.pipe, plan) as handle:
        out = driver.generate(_conds(driver), [0, 1], steps=4)
    assert torch.equal(ref, out)
    assert handle.report.complete and handle.report.skipped == 0 and handle.report.flops_fraction == 1.0
    # removal restores the model exactly
    assert not any("forward" in m.__dict__ for m in driver.transformer.modules())
    assert torch.equal(ref, driver.generate(_conds(driver), [0, 1], steps=4))


@pytest.mark.parametrize("cfg", ["batched", "split"])
def test_full_plan_is_bitwise_noop_on_digits(tiny_digits, cfg):
    plan = base_plan(tiny_digits, cfg=cfg)
    assert plan.sampler.guidance.mode == cfg and plan.sampler.guidance.branches == 2
    ref = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg=cfg)
    with apply(tiny_digits, plan) as handle:
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg=cfg)
    assert torch.equal(ref, out)
    r = handle.report
    assert r.calls == STEPS * (2 if cfg == "split" else 1) and r.complete and r.wall_time_s > 0
    assert r.steps == list(range(STEPS)) and r.step_fractions == [1.0] * STEPS and r.computed == r.calls * 4
    assert len(handle.reports) == 1 and handle.reports[0] is r


@pytest.mark.parametrize("model", ["digits-flow", "digits-ddim"])
def test_full_plan_is_bitwise_noop_on_reference_models(model):
    """The 100 % plan of each shipped reference model at its default steps and guidance reproduces uncached
    sampling bit for bit (batched CFG, 3 samples)."""
    from cachec.loading import load_model

    driver = load_model(model)
    steps = driver.default_steps
    plan = full_plan(driver, steps=steps)
    assert plan.budget.realised == 1.0 and len(plan.units) == 24 and plan.sampler.steps == steps
    conds, seeds = [0, 4, 9], [11, 12, 13]
    ref = driver.generate(conds, seeds, steps=steps)
    with apply(driver, plan) as handle:
        out = driver.generate(conds, seeds, steps=steps)
    assert torch.equal(ref, out)
    assert handle.report.complete and handle.report.skipped == 0 and handle.report.computed == steps * 24


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_skip_plans_run_on_every_family(tiny_pipelines, family):
    """Every unit kind (tuple outputs of joint attention, FLUX residual blocks) can be skipped."""
    driver = tiny_pipelines[family]
    plan = base_plan(driver, steps=4)
    acts = {u.name: "CC.." for u in plan.units}
    comp = {u.name: {2: [1.5, -0.5], 3: [1.0]} for u in plan.units}
    skip = with_actions(plan, acts, comp)
    ref = driver.generate(_conds(driver), [0, 1], steps=4)
    with apply(driver.pipe, skip) as handle:
        out = driver.generate(_conds(driver), [0, 1], steps=4)
    assert torch.isfinite(out).all() and not torch.equal(ref, out)
    assert torch.equal(out, hand_rolled(driver, {n: c for n, c in comp.items()}, steps=4))
    r = handle.report
    assert r.skipped == 2 * len(plan.units) and r.compensated == len(plan.units) and r.forced == 0
    assert r.flops_fraction == pytest.approx(skip.budget.realised, rel=1e-12)


# ------------------------------------------------------------------------------------ exact semantics


def hand_rolled(driver, schedule, cfg="batched", history="computed", eoc=None, steps=STEPS):
    """Sample with plain forward hooks replacing unit outputs: {unit: {step: coeffs}} skipped steps.

    Steps and branches come from call counting (batched: 1 call per step, split: 2), independent of the
    runtime. Features are tuples (tuple outputs part by part); whole-block units (FLUX single blocks) use
    ``output − input``. ``eoc``: {(unit, step): (alpha, D)}.
    """
    from cachec.runtime.units import find_units

    model = driver.transformer
    modules = dict(model.named_modules())
    specs = {u.name: u for u in find_units(model)}
    state = {"call": 0}
    hist = {name: {0: [], 1: []} for name in schedule}
    per_step = 2 if cfg == "split" else 1

    def make(name):
        spec = specs[name]

        def hook(module, args, kwargs, output):
            step, branch = divmod(state["call"], per_step)
            h = hist[name][branch]
            as_tuple = isinstance(output, tuple)
            parts = output if as_tuple else (output,)
            inputs = tuple(kwargs[n] for n in spec.residual_inputs) if spec.mode == "residual" else None
            coeffs = schedule[name].get(step)
            if coeffs is None:
                feat = tuple(o - x for o, x in zip(parts, inputs)) if inputs else parts
                h.insert(0, tuple(f.detach() for f in feat))
                return output
            pred = []
            for p in range(len(parts)):
                acc = coeffs[0] * h[0][p]
                for j in range(1, len(coeffs)):
                    acc = acc + coeffs[j] * h[j][p]
                if eoc and (name, step) in eoc:
                    alpha, d = eoc[(name, step)]
                    acc = acc * (1.0 + alpha * d)
                pred.append(acc)
            if history == "used":
                h.insert(0, tuple(pred))
            if inputs:
                pred = [x + f for x, f in zip(inputs, pred)]
            return tuple(pred) if as_tuple else pred[0]

        return hook

    def count(module, args, output):
        state["call"] += 1

    handles = [modules[name].register_forward_hook(make(name), with_kwargs=True) for name in schedule]
    handles.append(model.register_forward_hook(count))
    try:
        if driver.spec.split_cfg:
            return driver.generate([3, 7], [0, 1], steps=steps, cfg=cfg)
        return driver.generate(_conds(driver), [0, 1], steps=steps)
    finally:
        for h in handles:
            h.remove()


SCHEDULE = {
    "transformer_blocks.0.attn1": {2: [1.5, -0.5], 4: [1.0]},
    "transformer_blocks.1.ff": {1: [1.0], 3: [2.0, -1.0], 5: [0.5, 0.25, 0.25]},
}


def schedule_plan(base, schedule, history="computed"):
    actions = {n: "".join("." if s in steps else "C" for s in range(STEPS)) for n, steps in schedule.items()}
    return with_actions(base, actions, schedule, history=history)


@pytest.mark.parametrize("cfg", ["batched", "split"])
def test_plan_matches_hand_rolled_loop_exactly(tiny_digits, cfg):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    expected = hand_rolled(tiny_digits, SCHEDULE, cfg)
    with apply(tiny_digits, plan) as handle:
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg=cfg)
    assert torch.equal(out, expected)
    assert handle.report.skipped == 5 * (2 if cfg == "split" else 1)


def test_choose_plan_prefers_the_closer_plan_and_scores_psnr(tiny_digits):
    from cachec.evaluation import PSNR_CAP_DB, choose_plan

    full = base_plan(tiny_digits)
    skip = schedule_plan(full, SCHEDULE)
    conds, seeds = [3, 7, 1], [5, 6, 7]
    pick, scores = choose_plan(tiny_digits, {"skip": skip, "full": full}, conds, seeds, batch_size=2)
    assert pick == "full" and scores["full"] == PSNR_CAP_DB  # identical images count as the cap, not +inf
    # the score is the mean per-image PSNR; the same batch split as choose_plan's (2 + 1): same ops on the same
    # shapes, so it is reproducible to rounding of the final mean (a 3-sample batch runs other kernels)
    split = [(conds[:2], seeds[:2]), (conds[2:], seeds[2:])]
    ref = torch.cat([tiny_digits.generate(c, s, steps=STEPS) for c, s in split]).double()
    with apply(tiny_digits, skip):
        out = torch.cat([tiny_digits.generate(c, s, steps=STEPS) for c, s in split]).double()
    per_image = [-10 * math.log10(float((out[i] - ref[i]).pow(2).mean())) for i in range(3)]
    assert scores["skip"] == pytest.approx(sum(per_image) / 3, rel=1e-9)
    pooled = -10 * math.log10(float((out - ref).pow(2).mean()))
    assert abs(scores["skip"] - pooled) > 1e-6  # not the PSNR of the pooled MSE (the score before 2026-12-07)
    # the score is insensitive to the batch split (another kernel) to well below what a wrong schedule changes
    with apply(tiny_digits, skip):
        whole = tiny_digits.generate(conds, seeds, steps=STEPS).double()
    whole_psnr = [-10 * math.log10(float((whole[i] - ref[i]).pow(2).mean())) for i in range(3)]
    assert scores["skip"] == pytest.approx(sum(whole_psnr) / 3, abs=0.05)
    with pytest.raises(ValueError, match="different"):
        choose_plan(tiny_digits, {"a": full, "b": base_plan(tiny_digits, steps=STEPS - 1)}, conds, seeds)
    with pytest.raises(ValueError, match="at least one"):
        choose_plan(tiny_digits, {}, conds, seeds)


def test_history_used_matches_hand_rolled_loop(tiny_digits):
    sched = {"transformer_blocks.0.ff": {2: [1.5, -0.5], 3: [1.5, -0.5], 5: [1.0]}}
    plan = schedule_plan(base_plan(tiny_digits), sched, history="used")
    expected = hand_rolled(tiny_digits, sched, "batched", history="used")
    computed_semantics = hand_rolled(tiny_digits, sched, "batched", history="computed")
    with apply(tiny_digits, plan):
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    assert torch.equal(out, expected)
    assert not torch.equal(out, computed_semantics)


def test_eoc_correction_from_sidecar(tiny_digits, tmp_path):
    name = "transformer_blocks.1.attn1"
    sched = {name: {3: [1.0], 4: [1.5, -0.5]}}
    base = schedule_plan(base_plan(tiny_digits), sched)
    d = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)  # per-sample unit output shape
    plan = copy.deepcopy(base)
    plan.unit(name).compensation[4] = Compensation([1.5, -0.5], eoc_alpha=0.25)
    plan = write_plan(plan, tmp_path / "eoc.yaml", {f"eoc/{name}/4": d})
    assert (tmp_path / "eoc.eoc.safetensors").is_file()
    plan = load_plan(tmp_path / "eoc.yaml")
    expected = hand_rolled(tiny_digits, sched, "batched", eoc={(name, 4): (0.25, torch.from_numpy(d))})
    with apply(tiny_digits, plan) as handle:
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    assert torch.equal(out, expected)
    assert handle.report.compensated == 1
    assert not torch.equal(out, hand_rolled(tiny_digits, sched, "batched"))
    # a prior of the wrong shape (plan made at another resolution) is a clear error
    plan = copy.deepcopy(base)
    plan.unit(name).compensation[4] = Compensation([1.5, -0.5], eoc_alpha=0.25)
    write_plan(plan, tmp_path / "bad.yaml", {f"eoc/{name}/4": d.T.copy()})
    with apply(tiny_digits, tmp_path / "bad.yaml"):
        with pytest.raises(PlanScheduleError, match=r"EOC prior .* has shape \[32, 64\].*\[64, 32\]"):
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS)


def test_split_cfg_keeps_one_history_per_branch(tiny_digits):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    with apply(tiny_digits, plan) as handle:
        batched = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg="batched")
        split = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg="split")
        history = handle.executor._run.history
    assert sorted(history) == [0, 1]
    # unit 0, most recent kept entry (no later step reads the last step's output: its slot is None), part 0
    assert history[0][0][0] is None and history[1][0][0] is None
    h0, h1 = (next(f for f in history[b][0] if f is not None)[0] for b in (0, 1))
    assert h0.shape == h1.shape == (2, 64, 32) and not torch.allclose(h0, h1)
    # the same computation batched or split: equal up to float reassociation (mixed branches would not be)
    assert torch.allclose(batched, split, atol=1e-4)
    assert [r.calls for r in handle.reports] == [STEPS, 2 * STEPS]


# ------------------------------------------------------------------------------------ FLOPs


def test_skipped_units_do_no_matmuls_and_flops_match_plan(tiny_digits):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    model = tiny_digits.transformer
    snapshots: list[dict] = []

    def run(with_plan):
        """Per transformer call: FLOPs by module path (differences of cumulative counter snapshots)."""
        snapshots.clear()
        handle = apply(tiny_digits, plan) if with_plan else None
        counter = FlopCounterMode(display=False, depth=None)

        def post(module, args, output):
            snapshots.append({k: sum(v.values()) for k, v in counter.get_flop_counts().items()})

        hook = model.register_forward_hook(post)
        try:
            with sdpa_kernel(SDPBackend.MATH), counter:
                tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
        finally:
            hook.remove()
            if handle:
                handle.remove()
        calls = []
        for i, snap in enumerate(snapshots):
            prev = snapshots[i - 1] if i else {}
            calls.append({k: v - prev.get(k, 0) for k, v in snap.items()})
        return calls, handle

    full, _ = run(False)
    cached, handle = run(True)
    root = type(model).__name__
    for name, skipped in SCHEDULE.items():
        for step in range(STEPS):
            got = cached[step].get(f"{root}.{name}", 0)
            assert (got == 0) == (step in skipped), (name, step, got)
    total_full = sum(c["Global"] for c in full)
    total_cached = sum(c["Global"] for c in cached)
    assert total_cached / total_full == pytest.approx(plan.budget.realised, rel=1e-9)
    assert handle.report.flops_fraction == pytest.approx(plan.budget.realised, rel=1e-12)
    for step in range(STEPS):
        assert handle.report.step_fractions[step] == pytest.approx(cached[step]["Global"] / full[step]["Global"])


# ------------------------------------------------------------------------------------ runs and schedules


def test_batch_change_mid_run_is_an_error(tiny_digits):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    model = tiny_digits.transformer
    ts = plan.sampler.timesteps
    x4, x2 = torch.randn(4, 1, 32, 32), torch.randn(2, 1, 32, 32)
    with apply(model, plan) as handle, torch.no_grad():
        model(hidden_states=x4, timestep=torch.full((4,), ts[0]), class_labels=torch.tensor([1, 2, 10, 10]))
        with pytest.raises(PlanScheduleError, match="batch 2.*earlier calls of this run had batch 4"):
            model(hidden_states=x2, timestep=torch.full((2,), ts[1]), class_labels=torch.tensor([1, 10]))
        # a fresh run with the new layout works
        for s in range(3):
            model(hidden_states=x2, timestep=torch.full((2,), ts[s]), class_labels=torch.tensor([1, 10]))
        assert handle.report.steps == [0, 1, 2]


@pytest.mark.parametrize("transformer_only", [False, True])
def test_aborted_run_does_not_leak(tiny_digits, transformer_only):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    target = tiny_digits.transformer if transformer_only else tiny_digits
    with apply(target, plan):
        clean = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)

        def boom(i, n):
            if i == 3:
                raise KeyboardInterrupt("user abort")

        with pytest.raises(KeyboardInterrupt):
            tiny_digits.generate([5, 1], [8, 9], steps=STEPS, callback=boom)
        again = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    assert torch.equal(clean, again)


def test_wrong_step_count_is_an_error(tiny_digits):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    with apply(tiny_digits, plan):
        with pytest.raises(PlanScheduleError, match="not in the plan's schedule.*num_inference_steps=6"):
            tiny_digits.generate([3, 7], [0, 1], steps=5)
        # the failed run leaves nothing behind
        assert torch.equal(
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS), hand_rolled(tiny_digits, SCHEDULE, "batched")
        )


def test_remap_nearest_and_off(tiny_digits):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    ref8 = tiny_digits.generate([3, 7], [0, 1], steps=8)
    with apply(tiny_digits, plan, remap="nearest") as handle:
        out = tiny_digits.generate([3, 7], [0, 1], steps=8)
    r = handle.report
    assert len(r.steps) == 8 and r.steps[0] == 0 and r.steps[-1] == STEPS - 1
    assert r.steps == sorted(r.steps) and r.skipped > 0 and r.off_plan_calls == 0
    assert torch.isfinite(out).all() and (out - ref8).abs().max() < 0.5
    with apply(tiny_digits, plan, remap="off") as handle:
        with pytest.warns(RuntimeWarning, match="computed in full"):
            out = tiny_digits.generate([3, 7], [0, 1], steps=8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning only
            tiny_digits.generate([3, 7], [0, 1], steps=8)
    assert torch.equal(out, ref8)
    assert handle.report.off_plan_calls > 0
    with pytest.raises(ValueError, match="remap must be one of"):
        apply(tiny_digits, plan, remap="closest")


# ------------------------------------------------------------------------------------ apply() checks


def test_plan_for_other_weights_is_refused_unless_forced(tiny_digits, tiny_digits_ddim):
    plan = copy.deepcopy(base_plan(tiny_digits))
    plan.model.fingerprint = "sha256:" + "0" * 64
    with pytest.raises(PlanMismatchError, match="other weights.*force=True"):
        apply(tiny_digits, plan)
    with pytest.warns(RuntimeWarning, match="force=True"):
        handle = apply(tiny_digits, plan, force=True)
    handle.remove()
    other = copy.deepcopy(base_plan(tiny_digits))
    other.model.cls = "PixArtTransformer2DModel"
    with pytest.raises(PlanMismatchError, match="plan is for a PixArtTransformer2DModel"):
        apply(tiny_digits, other)


def test_unknown_units_and_zero_flops_are_refused(tiny_digits):
    base = base_plan(tiny_digits)
    d = to_dict(base)
    d["units"][0]["name"] = "transformer_blocks.9.ff"
    d["units"][1]["name"] = "transformer_blocks.0.norm1"
    with pytest.raises(PlanMismatchError, match=r"9\.ff \(no such module\).*norm1 \(not a cacheable unit\)"):
        apply(tiny_digits, parse_plan(d))
    zero = copy.deepcopy(base)
    for u in zero.units:
        u.flops = 0.0
    zero.budget.fixed_step_flops = zero.budget.full_step_flops
    with pytest.raises(PlanMismatchError, match="cover 0 FLOPs"):
        apply(tiny_digits, zero)


def test_unsupported_model_and_double_apply(tiny_digits):
    from cachec.runtime import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        apply(torch.nn.Linear(2, 2), base_plan(tiny_digits))
    with apply(tiny_digits, base_plan(tiny_digits)):
        with pytest.raises(RuntimeError, match="already applied"):
            apply(tiny_digits, base_plan(tiny_digits))
    apply(tiny_digits, base_plan(tiny_digits)).remove()  # removed: can apply again


def test_apply_from_path(tiny_digits, tmp_path):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    write_plan(plan, tmp_path / "p.yaml")
    with apply(tiny_digits, str(tmp_path / "p.yaml")):
        out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    assert torch.equal(out, hand_rolled(tiny_digits, SCHEDULE, "batched"))


# ------------------------------------------------------------------------------------ torch.compile


def _count_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_recompiles_once_per_pattern(tiny_digits, backend):
    import torch._dynamo

    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    expected = hand_rolled(tiny_digits, SCHEDULE, "batched")
    original = tiny_digits.pipe.transformer
    torch._dynamo.reset()
    tiny_digits.pipe.transformer = torch.compile(original, fullgraph=True, backend=backend)
    try:
        with apply(tiny_digits, plan) as handle:
            before = _count_graphs()
            out = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            graphs = _count_graphs() - before
            again = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
            assert _count_graphs() - before == graphs  # a second run compiles nothing
        patterns = len(set(handle.executor.step_signatures()))
        assert graphs == patterns
    finally:
        tiny_digits.pipe.transformer = original
        torch._dynamo.reset()
    tol = 0 if backend == "eager" else 1e-4
    assert torch.allclose(out, expected, atol=tol, rtol=0) and torch.equal(out, again)


# ------------------------------------------------------------------------------------ plan files


def test_plan_round_trip_is_byte_identical(tiny_digits, tmp_path):
    plan = schedule_plan(base_plan(tiny_digits), SCHEDULE)
    plan.budget.options = {"max_staleness": 3, "family": "free", "nested": {"b": [1, 2.5], "a": None}}
    text = dump_plan(plan)
    assert text == dump_plan(plan)
    write_plan(plan, tmp_path / "a.yaml")
    assert (tmp_path / "a.yaml").read_text() == text
    loaded = load_plan(tmp_path / "a.yaml")
    assert loaded == plan
    write_plan(loaded, tmp_path / "b.yaml")
    assert (tmp_path / "b.yaml").read_bytes() == (tmp_path / "a.yaml").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plan_with_sidecar_round_trip_and_rejections(tiny_digits, tmp_path):
    name = "transformer_blocks.1.ff"
    plan = copy.deepcopy(schedule_plan(base_plan(tiny_digits), SCHEDULE))
    plan.unit(name).compensation[3] = Compensation([2.0, -1.0], eoc_alpha=0.01)
    tensors = {f"eoc/{name}/3": np.ones((64, 32), np.float32)}
    with pytest.raises(PlanError, match="pass sidecar_tensors"):
        write_plan(plan, tmp_path / "p.yaml")
    with pytest.raises(PlanError, match=r"compensation\[3\]\.eoc_alpha: non-zero but sidecar_tensors has no"):
        write_plan(plan, tmp_path / "p.yaml", {"eoc/other/3": np.ones(2, np.float32)})
    written = write_plan(plan, tmp_path / "p.yaml", tensors)
    assert written.sidecar.file == "p.eoc.safetensors"
    loaded = load_plan(tmp_path / "p.yaml")
    assert loaded.load_sidecar().keys() == tensors.keys()
    (tmp_path / "copy").mkdir()
    write_plan(loaded, tmp_path / "copy" / "p.yaml")  # sidecar copied from the source
    assert (tmp_path / "copy" / "p.yaml").read_bytes() == (tmp_path / "p.yaml").read_bytes()
    # tampered sidecar
    side = tmp_path / "p.eoc.safetensors"
    blob = side.read_bytes()
    side.write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(PlanError, match="sidecar.sha256: .*does not belong to this plan"):
        load_plan(tmp_path / "p.yaml")
    side.unlink()
    with pytest.raises(PlanError, match="sidecar.file: .*does not exist"):
        load_plan(tmp_path / "p.yaml")
    # a sidecar without the needed tensor
    import hashlib

    from safetensors.numpy import save

    blob = save({f"eoc/{name}/4": np.ones((64, 32), np.float32)})
    side.write_bytes(blob)
    d = to_dict(written)
    d["sidecar"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(PlanError, match=r"eoc_alpha: non-zero but the sidecar p.eoc.safetensors has no tensor"):
        load_plan(tmp_path / "p.yaml")


def _valid_dict():
    """A small valid plan dict (6 steps, 2 units) independent of any model."""
    return {
        "cachec_plan": 1,
        "model": {"class": "DiTTransformer2DModel", "fingerprint": "sha256:" + "ab" * 32, "adapters": []},
        "sampler": {
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "steps": 6,
            "timesteps": [1000.0, 800.0, 600.0, 400.0, 200.0, 1.0],
            "sigmas": None,
            "guidance": {"mode": "batched", "scale": 3.0, "branches": 2},
            "resolution": [32, 32],
        },
        "budget": {
            "method": "manual",
            "target": 0.8,
            "realised": 0.8,
            "full_step_flops": 100.0,
            "fixed_step_flops": 20.0,
            "options": {},
        },
        "predicted_error": 0.5,
        "history": "computed",
        "units": [
            {"name": "a", "flops": 40.0, "actions": "CCCCCC", "compensation": {}},
            {"name": "b", "flops": 40.0, "actions": "CC.C..", "compensation": {
                2: {"coeffs": [1.5, -0.5]}, 4: {"coeffs": [1.0]}, 5: {"coeffs": [1.0], "eoc_alpha": 0.0}}},
        ],
        "sidecar": None,
        "provenance": {
            "calibration_sha256": "cd" * 32,
            "conditions": 10,
            "samples": 20,
            "cachec_version": "0.1.0",
            "created": "2026-11-30T00:00:00Z",
        },
    }


def _set(path, value):
    def mutate(d):
        *head, last = path
        for k in head:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value

    return mutate


REJECTIONS = [
    (_set(["extra"], 1), r"<root>: unknown key\(s\) extra"),
    (_set(["model", "weights"], 1), r"model: unknown key\(s\) weights"),
    (_set(["units", 1, "compensation", 2, "gain"], 1.0), r"units\[1\]\.compensation\[2\]: unknown key\(s\) gain"),
    (_set(["budget", "target"], KeyError), r"budget\.target: missing required key"),
    (_set(["provenance"], KeyError), r"provenance: missing required key"),
    (_set(["units", 0, "actions"], 5), r"units\[0\]\.actions: expected str, got int"),
    (_set(["sampler", "steps"], "6"), r"sampler\.steps: expected int, got str"),
    (_set(["units", 0, "flops"], "1e6"), r"units\[0\]\.flops: expected a number.*write 1\.0e\+6"),
    (_set(["sampler", "guidance", "branches"], True), r"branches: expected int, got bool"),
    (_set(["cachec_plan"], 2), r"cachec_plan: unsupported plan schema version 2"),
    (_set(["cachec_plan"], KeyError), r"cachec_plan: missing required key"),
    (_set(["budget", "target"], 0.0), r"budget\.target: must be a fraction in \(0, 1\]"),
    (_set(["budget", "target"], -0.2), r"budget\.target: must be a fraction"),
    (_set(["budget", "target"], 1.5), r"budget\.target: must be a fraction"),
    (_set(["budget", "realised"], 0.7), r"budget\.realised: 0\.7 does not match the schedule"),
    (_set(["units", 0, "actions"], "CCCCC"), r"units\[0\]\.actions: expected 6 characters"),
    (_set(["units", 0, "actions"], "CCxCCC"), r"units\[0\]\.actions: only 'C' .* found 'x'"),
    (_set(["units", 0, "actions"], "CC-CCC"), r"only 'C'"),
    (_set(["units", 1, "actions"], ".C.C.."), r"units\[1\]\.actions: step 0 must be 'C'"),
    (_set(["units", 0, "compensation"], {3: {"coeffs": [1.0]}}), r"units\[0\]\.compensation\[3\]: step 3 is computed"),
    (_set(["units", 1, "compensation", 4], KeyError), r"units\[1\]\.compensation: skipped step\(s\) \[4\]"),
    (_set(["units", 1, "compensation", 2, "coeffs"], []), r"compensation\[2\]\.coeffs: expected a non-empty list"),
    (_set(["units", 1, "compensation", 2, "coeffs"], [1.0, 0.5, -0.5]), r"3 coefficients but only 2 computed"),
    (_set(["units", 1, "compensation", 9], {"coeffs": [1.0]}), r"compensation\[9\]: step 9 is out of range"),
    (_set(["units", 1, "compensation", 2, "eoc_alpha"], 0.1), r"eoc_alpha: non-zero but the plan has no sidecar"),
    (_set(["sampler", "timesteps"], [1.0, 2.0]), r"sampler\.timesteps: expected 6 values"),
    (_set(["sampler", "guidance", "mode"], "cfg"), r"sampler\.guidance\.mode: expected one of"),
    (_set(["sampler", "guidance", "branches"], 1), r"mode 'batched' needs >= 2 branches"),
    (_set(["history"], "predicted"), r"history: expected one of computed, used"),
    (_set(["budget", "method"], "magic"), r"budget\.method: expected one of"),
    (_set(["model", "fingerprint"], "abc"), r"model\.fingerprint: expected 'sha256:'"),
    (_set(["units", 1, "name"], "a"), r"units\[1\]\.name: unit 'a' appears twice"),
    (_set(["units"], []), r"units: expected a non-empty list"),
    (_set(["sidecar"], {"file": "../x.safetensors", "sha256": "0" * 64}), r"sidecar\.file: must be a relative path"),
    (_set(["budget", "full_step_flops"], 50.0), r"budget\.full_step_flops: fixed_step_flops \+ the units' flops"),
    (_set(["sampler", "timesteps", 2], float("nan")), r"sampler\.timesteps\[2\]: must be finite"),
]


@pytest.mark.parametrize("mutate,message", REJECTIONS, ids=[m for _, m in REJECTIONS])
def test_schema_rejections(mutate, message):
    parse_plan(_valid_dict())  # the base is valid
    d = _valid_dict()
    mutate(d)
    with pytest.raises(PlanError, match=message):
        parse_plan(d)


def test_schema_accepts_history_used_and_nulls():
    d = _valid_dict()
    d["history"] = "used"
    d["units"][1]["compensation"][4]["coeffs"] = [1.0, 1.0, -1.0]  # used: every earlier step is history
    d["predicted_error"] = None
    d["provenance"]["calibration_sha256"] = None
    plan = parse_plan(d)
    assert plan.units[1].compensation[5].eoc_alpha == 0.0
    assert parse_plan(yaml.safe_load(dump_plan(plan))) == plan


def test_load_plan_reports_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("cachec_plan: 1\nmodel: [\n")
    with pytest.raises(PlanError, match="bad.yaml: not valid YAML"):
        load_plan(tmp_path / "bad.yaml")
    d = _valid_dict()
    d["units"][0]["actions"] = "C"
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(PlanError, match=r"short.yaml: units\[0\]\.actions: expected 6 characters"):
        load_plan(tmp_path / "short.yaml")


def test_plan_module_imports_without_torch_and_runtime_without_scipy():
    code = (
        "import sys\n"
        "import cachec.runtime.plan, cachec.runtime\n"
        "from cachec.runtime import Plan, load_plan\n"
        "assert 'torch' not in sys.modules, 'plan imported torch'\n"
        "from cachec.runtime import apply, find_units, full_plan\n"
        "import cachec.runtime.executor, cachec.runtime.handle, cachec.runtime.manual\n"
        "assert callable(apply) and 'scipy' not in sys.modules, 'runtime imported scipy'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
