"""Attention-map units end to end (issue 16, docs/hgc.md): registry → calibration → nested planning → plan
format → execution, on synthetic calibrations and on the tiny pipelines of every family that declares them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cachec.planner import Planner, schedule_error
from cachec.planner.schedule import realised_fraction
from cachec.planner.synthetic import calibration_from_features, synthetic_features
from cachec.runtime.plan import PlanError, load_plan, parse_plan, to_dict, write_plan
from cachec.runtime.units import UnsupportedModelError, find_units, parent_units


def test_parent_units_is_the_longest_dotted_prefix():
    names = ["b.0", "b.0.attn.cachec_map", "t.1.attn1", "t.1.attn1.cachec_map", "t.1.attn10", "t.1.ff"]
    assert parent_units(names) == [None, 0, None, 2, None, None]


def _nested_calibration(map_drift: float, seed: int = 0, with_maps: bool = True):
    """Synthetic calibration: 4 blocks (attn1, ff); with maps each attn1 holds a map unit of 1/3 its FLOPs
    whose features drift by ``map_drift`` per step (0: constant, free to reuse)."""
    F = synthetic_features(blocks=4, steps=16, dim=16, seed=seed)
    rng = np.random.default_rng(seed)
    feats, flops = {}, []
    for n, f in F.items():
        if not with_maps:
            feats[n], flops = f, flops + [150.0 if n.endswith("attn1") else 100.0]
            continue
        feats[n], flops = f, flops + [100.0]
        if n.endswith("attn1"):
            base = rng.standard_normal(f.shape[:2] + (1, f.shape[3]))
            walk = map_drift * rng.standard_normal(f.shape).cumsum(axis=2)
            feats[n + ".cachec_map"], flops = base + walk, flops + [50.0]
    return calibration_from_features(feats, np.array(flops), full_step=sum(flops) * 1.1)


@pytest.mark.parametrize("family", ["free", "step", "group", "warmup"])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_nested_schedules_are_valid_and_spend_the_budget(family, budget, tmp_path):
    cal = _nested_calibration(0.01)
    planner = Planner(cal)
    sched = planner.schedule(budget, family=family)
    sched.validate()
    for u, p in enumerate(planner.parents):
        if p is not None:  # a map runs only where its block's attention computes
            assert not (sched.compute[u] & ~sched.compute[p]).any()
    r = realised_fraction(sched.compute, cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops)
    assert budget - max(cal.unit_flops) * 1.5 / (cal.steps * cal.full_step_flops) <= r <= budget * (1 + 1e-9)
    plan, side = planner.plan(budget, family=family)
    written = write_plan(plan, tmp_path / "p.yaml", side or None)
    assert to_dict(load_plan(tmp_path / "p.yaml")) == to_dict(written)


def test_cheap_maps_are_reused_and_their_flops_spent_elsewhere():
    """Constant maps cost nothing to reuse: the planner skips them and buys computes with the FLOPs, so it
    predicts less error than the same model without map units (attention FLOPs not split)."""
    with_maps = Planner(_nested_calibration(0.0))
    without = Planner(_nested_calibration(0.0, with_maps=False))
    for family in ("step", "free"):
        s = with_maps.schedule(0.4, family=family)
        assert s.options["map_skips"] > 0
        e_maps = schedule_error(with_maps.model, s, per_unit=True)
        e_plain = schedule_error(without.model, without.schedule(0.4, family=family), per_unit=True)
        assert e_maps.sum() < e_plain.sum()


def test_costly_maps_follow_their_parent():
    planner = Planner(_nested_calibration(50.0))
    s = planner.schedule(0.4, family="step")
    assert s.options["map_skips"] == 0
    for u, p in enumerate(planner.parents):
        if p is not None:
            assert (s.compute[u] == s.compute[p]).all()


def test_peer_methods_run_maps_with_their_block():
    planner = Planner(_nested_calibration(0.01))
    s = planner.schedule(None, method="fora", interval=2)
    s.validate()
    for u, p in enumerate(planner.parents):
        if p is not None:
            assert (s.compute[u] == s.compute[p]).all() and not s.coeffs[u]


def _plan_dict():
    planner = Planner(_nested_calibration(0.0))
    plan, _ = planner.plan(0.5, family="step", predictors="taylor")
    d = to_dict(plan)
    names = [u["name"] for u in d["units"]]
    return d, names.index("transformer_blocks.0.attn1"), names.index("transformer_blocks.0.attn1.cachec_map")


def test_plan_format_rules_for_nested_units():
    d, p, m = _plan_dict()
    parse_plan(d)
    idle = d["units"][p]["actions"].index(".")
    bad = {**d, "units": [dict(u) for u in d["units"]]}
    acts = list(bad["units"][m]["actions"])
    acts[idle] = "C"
    bad["units"][m]["actions"] = "".join(acts)
    with pytest.raises(PlanError, match=r"units\[1\].actions: step\(s\) \[\d+\] are 'C' but the unit is nested"):
        parse_plan(bad)
    bad = {**d, "units": [dict(u) for u in d["units"]]}
    bad["units"][m]["compensation"] = {**bad["units"][m]["compensation"], idle: {"coeffs": [1.0]}}
    with pytest.raises(PlanError, match="never runs there"):
        parse_plan(bad)


def test_families_without_supported_processors_refuse_maps(tiny_pipelines):
    with pytest.raises(UnsupportedModelError, match="declares no attention-map units"):
        find_units(tiny_pipelines["sd3"].transformer, attention_maps=True)


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


@pytest.mark.parametrize("name", ["digits", "dit", "pixart", "flux"])
def test_calibrate_plan_run_with_map_units(name, tiny_pipelines, tiny_digits, tmp_path):
    from cachec.calibrate.format import read_header
    from cachec.calibrate.run import calibrate
    from cachec.planner import load_calibration
    from cachec.runtime import apply
    from cachec.runtime.units import unwrap

    driver = tiny_digits if name == "digits" else tiny_pipelines[name]
    conds = [1, 2] if driver.condition_kind == "class" else ["a red car", "a blue sky"]
    kw = dict(steps=4, batch_size=2, sensitivity="none", progress=False)
    plain = read_header(calibrate(driver, conds, output=tmp_path / "plain.safetensors", **kw))
    cal_path = calibrate(driver, conds, output=tmp_path / "maps.safetensors", attention_maps=True, **kw)
    cal = load_calibration(str(cal_path))
    parents = parent_units(cal.unit_names)
    maps = [u for u, p in enumerate(parents) if p is not None]
    assert maps and all(cal.unit_names[u].endswith(".cachec_map") for u in maps)
    assert [u["kind"] for u in cal.units if u["name"].endswith(".cachec_map")] == ["attn_map"] * len(maps)
    # every FLOP in one unit: parent (without its map) + map = the parent counted whole
    whole = dict(zip([u["name"] for u in plain["units"]], _flops(tmp_path / "plain.safetensors")))
    for m in maps:
        parent = cal.unit_names[parents[m]]
        assert cal.unit_flops[parents[m]] + cal.unit_flops[m] == pytest.approx(whole[parent], rel=1e-9)
        h, w = cal.units[m]["shapes"][0][-2:]
        assert h == w  # (heads, N, N): a probability map
    assert cal.fixed_step_flops == pytest.approx(plain["flops"]["fixed_step"], rel=1e-9)

    model = unwrap(driver.transformer)
    before = _processors(model)
    seeds = [11, 12]
    ref = driver.generate(conds, seeds, steps=4)
    planner = Planner(cal)
    full, side = planner.plan(1.0, family="step")
    with apply(driver, write_plan(full, tmp_path / "full.yaml", side or None)):
        out = driver.generate(conds, seeds, steps=4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # explicit softmax vs SDPA: rounding only
    plan, side = planner.plan(0.5, family="free")
    with apply(driver, write_plan(plan, tmp_path / "half.yaml", side or None)) as handle:
        driver.generate(conds, seeds, steps=4)
        report = handle.reports[-1]
    assert report.complete and report.flops_fraction == pytest.approx(plan.budget.realised, rel=1e-6)
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(n.endswith("cachec_map") for n, _ in model.named_modules())
    assert torch.equal(driver.generate(conds, seeds, steps=4), ref)


def _flops(path):
    from safetensors.numpy import load_file

    return load_file(str(path))["unit_flops"].tolist()


@pytest.fixture(scope="module")
def map_plan(tiny_digits, tmp_path_factory):
    """A 50 % free-family plan with map units of the tiny digits model (6 steps), written to disk."""
    from cachec.calibrate.run import calibrate
    from cachec.planner import load_calibration

    folder = tmp_path_factory.mktemp("map_plan")
    cal = load_calibration(str(calibrate(tiny_digits, [1, 2, 3], output=folder / "c.safetensors", steps=6,
                                         batch_size=3, sensitivity="factored", sensitivity_samples=1, progress=False,
                                         attention_maps=True)))
    plan, side = Planner(cal).plan(0.5, family="step", predictors="taylor")
    plan = write_plan(plan, folder / "p.yaml", side or None)
    assert plan.budget.options["map_skips"] > 0
    assert any(u.name.endswith(".cachec_map") and u.compensation for u in plan.units)  # a map really reused
    return plan


def test_onnx_export_of_a_plan_with_map_units(tiny_digits, map_plan, tmp_path):
    """The exported step graphs run the materialised maps; onnxruntime reproduces the torch runtime."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from cachec.runtime import apply
    from cachec.runtime.onnx_export import export_plan
    from cachec.runtime.onnx_loop import OnnxSampler

    plan = map_plan
    result = export_plan(tiny_digits.pipe, plan, tmp_path / "onnx")
    labels, seeds = [3, 7], [0, 1]
    with apply(tiny_digits, plan):
        ref = tiny_digits.generate(labels, seeds, steps=6, guidance=plan.sampler.guidance.scale).numpy()
    noise = tiny_digits.pipe.initial_noise(2, [torch.Generator().manual_seed(s) for s in seeds]).numpy()
    out = OnnxSampler(result.folder, threads=1)(labels, noise)
    assert np.abs(out.images - ref).max() <= 1e-4


def test_softcap_runs_a_plan_with_map_units_under_its_ceiling(tiny_digits, map_plan):
    from dataclasses import replace

    from cachec.runtime import apply
    from cachec.runtime.adaptive import AdaptiveOptions
    from cachec.runtime.adaptive_calibrate import calibrate_profile

    ceiling = map_plan.budget.realised + 0.2
    opts = AdaptiveOptions(mode="softcap", ceiling=ceiling, probe_samples=2)
    opts = replace(opts, profile=calibrate_profile(tiny_digits, map_plan, opts))
    with apply(tiny_digits, map_plan, adaptive=opts) as handle:
        tiny_digits.generate([3, 7], [0, 1], steps=6)
    rep = handle.report
    assert rep.complete and map_plan.budget.realised - 1e-9 <= rep.flops_fraction <= ceiling + 1e-9


def test_parents_computed_off_the_plan_run_their_maps(tiny_digits, map_plan, tmp_path):
    """A parent that runs where the plan idles its map — a calibration along the plan (every unit computed in
    shadow), ``remap="nearest"`` with another step count, SpeCa's verification — computes the map too."""
    from dataclasses import replace

    from cachec.calibrate.format import read_header
    from cachec.calibrate.run import calibrate
    from cachec.runtime import apply
    from cachec.runtime.adaptive import AdaptiveOptions
    from cachec.runtime.adaptive_calibrate import calibrate_profile

    sens = tmp_path / "sens.safetensors"
    calibrate(tiny_digits, [1, 2, 3], output=sens, steps=6, batch_size=3, sensitivity="factored",
              sensitivity_samples=1, progress=False, attention_maps=True)
    along = calibrate(tiny_digits, [1, 2, 3], output=tmp_path / "along.safetensors", steps=6, batch_size=3,
                      sensitivity="none", progress=False, along=map_plan, sensitivity_from=sens)
    assert [u["name"] for u in read_header(along)["units"]] == [u.name for u in map_plan.units]
    with apply(tiny_digits, map_plan, remap="nearest") as handle:
        tiny_digits.generate([3, 7], [0, 1], steps=9)
    assert handle.report.complete and handle.report.calls == 9
    opts = AdaptiveOptions(mode="speca", ceiling=map_plan.budget.realised + 0.3, probe_samples=2)
    opts = replace(opts, profile=calibrate_profile(tiny_digits, map_plan, opts))
    with apply(tiny_digits, map_plan, adaptive=opts) as handle:
        tiny_digits.generate([3, 7], [0, 1], steps=6)
    assert handle.report.complete and handle.report.flops_fraction <= opts.ceiling + 1e-9


def test_maps_the_plan_never_reuses_are_not_materialised(tiny_digits, map_plan):
    from cachec.runtime import apply
    from cachec.runtime.units import unwrap

    model = unwrap(tiny_digits.transformer)
    reused = {u.name for u in map_plan.units if u.name.endswith(".cachec_map") and u.compensation}
    with apply(tiny_digits, map_plan):
        live = {n for n, _ in model.named_modules() if n.endswith(".cachec_map")}
    assert live == reused


def test_map_reuse_needs_a_measured_sensitivity_and_the_fill():
    cal = _nested_calibration(0.0)
    cal.header["sensitivity"] = {"method": "none", "samples": 0, "seconds": 0.0}
    s = Planner(cal).schedule(0.4, family="step")
    assert s.options["map_skips"] == 0 and s.options["map_reuse"] is False
    s = Planner(_nested_calibration(0.0)).schedule(0.4, family="step", fill=False)
    assert s.options["map_skips"] == 0


def test_nested_units_need_computed_history():
    d, _, _ = _plan_dict()
    with pytest.raises(PlanError, match="history: 'used'"):
        parse_plan({**d, "history": "used"})


def test_a_map_over_the_limit_is_refused_before_it_is_computed(tiny_digits, tmp_path, monkeypatch):
    from cachec.calibrate.run import calibrate
    from cachec.runtime import attention_maps

    monkeypatch.setattr(attention_maps, "MAP_LIMIT_BYTES", 1024)
    with pytest.raises(ValueError, match=r"MiB per sample, over the 0 MiB limit of attention-map units; calibrate"):
        calibrate(tiny_digits, [1], output=tmp_path / "c.safetensors", steps=2, sensitivity="none", progress=False,
                  attention_maps=True)


def test_a_processor_replaced_under_an_applied_plan_is_named(tiny_digits, map_plan):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from cachec.runtime import apply
    from cachec.runtime.executor import PlanScheduleError
    from cachec.runtime.units import unwrap

    name = next(u.name for u in map_plan.units if u.name.endswith(".cachec_map") and u.compensation)
    attn = unwrap(tiny_digits.transformer).get_submodule(name.rsplit(".", 1)[0])
    with apply(tiny_digits, map_plan):
        attn.set_processor(AttnProcessor2_0())  # the map child is no longer called
        with pytest.raises(PlanScheduleError, match=f"{name} is predicted at plan step .* processor replaced"):
            tiny_digits.generate([3], [0], steps=6)


def test_synthetic_calibration_with_maps_splits_the_attention():
    from cachec.planner import synthetic_calibration

    cal = synthetic_calibration(blocks=2, steps=6, attention_maps=True)
    parents = parent_units(cal.unit_names)
    assert cal.n_units == 6 and [p for p in parents if p is not None] == [0, 3]
    assert cal.unit_flops[1] == cal.unit_flops[0]  # the map holds half of its attention's FLOPs
    sched = Planner(cal).schedule(0.5, family="step")
    sched.validate()
    assert realised_fraction(sched.compute, cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops) <= 0.5 + 1e-12
