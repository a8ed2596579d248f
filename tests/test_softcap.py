"""SoftCap adaptive mode (issue 15, docs/softcap.md): ceiling guarantee, determinism, CFG consistency, the
all-Full limit, the SpeCa baseline, report contents, and that the static path is untouched.

Tiny random digits model (tests/conftest.py ``tiny_digits``), 8 steps, a hand-made step-family plan."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cachec.runtime import apply, full_plan, with_actions
from cachec.runtime.adaptive import (AdaptiveExecutor, AdaptiveOptions, AdaptiveProfile, AdaptiveRunReport,
                                     SoftBudgetController)
from cachec.runtime.adaptive_calibrate import calibrate_profile, step_floor
from cachec.runtime.executor import PlanExecutor, RunReport

STEPS = 8
ACTIONS = "CC.C..C."  # computed at 0, 1, 3, 6
COMP = {2: [1.0], 4: [1.5, -0.5], 5: [2.0, -1.0], 7: [1.0]}
_CACHE: dict = {}


def plan_for(driver, cfg="batched"):
    key = (id(driver), cfg)
    if key not in _CACHE:
        base = full_plan(driver, steps=STEPS, cfg=cfg)
        _CACHE[key] = with_actions(base, {u.name: ACTIONS for u in base.units},
                                   {u.name: COMP for u in base.units})
    return _CACHE[key]


def options(driver, plan, mode="softcap", ceiling=0.7, **kw):
    """Options with a profile calibrated on a 2-sample probe (cached per setting)."""
    key = (id(driver), id(plan), mode, ceiling, tuple(sorted(kw.items())))
    if key not in _CACHE:
        opts = AdaptiveOptions(mode=mode, ceiling=ceiling, probe_samples=2, **kw)
        _CACHE[key] = replace(opts, profile=calibrate_profile(driver, plan, opts))
    return _CACHE[key]


def run(driver, plan, opts, conds=(3, 7), seeds=(0, 1), cfg="batched"):
    with apply(driver, plan, adaptive=opts) as handle:
        out = driver.generate(list(conds), list(seeds), steps=STEPS, cfg=cfg)
    return out, handle.report, handle


@pytest.mark.parametrize("mode", ["softcap", "speca"])
@pytest.mark.parametrize("ceiling", [0.65, 0.8])
def test_realised_fraction_never_above_the_ceiling(tiny_digits, mode, ceiling):
    plan = plan_for(tiny_digits)
    assert plan.budget.realised < 0.53  # a skipped step costs ~5 % of a Full one here: 0.65 allows 1 Full step
    opts = options(tiny_digits, plan, mode, ceiling)
    for conds, seeds in (([3, 7], [0, 1]), ([0], [5]), ([1, 2, 9], [11, 12, 13]), ([4, 4], [100, 101])):
        _, rep, _ = run(tiny_digits, plan, opts, conds, seeds)
        assert rep.complete and rep.flops_fraction <= ceiling + 1e-9  # the issue allows 1 point; the guard is exact
        assert rep.flops_fraction >= plan.budget.realised - 1e-9  # adaptive mode only adds compute


def test_guard_holds_when_the_thresholds_always_say_full(tiny_digits):
    """τ = -1 everywhere wants every step Full; the hard guard stops at the ceiling (PI off too)."""
    plan = plan_for(tiny_digits)
    S, c = plan.steps, 0.75
    floor = step_floor(plan)
    profile = AdaptiveProfile("softcap", c, [-1.0] * S, [sum(floor[:s + 1]) / S for s in range(S)])
    opts = AdaptiveOptions(ceiling=c, profile=profile, kp=0.0, ki=0.0)
    _, rep, _ = run(tiny_digits, plan, opts)
    assert rep.full_steps and rep.flops_fraction <= c + 1e-12
    # one more Full step would have broken it
    extra = min(1.0 - floor[s] for s in range(S) if rep.decisions[s] == ".")
    assert rep.flops_fraction + extra / S > c


def test_counted_flops_match_the_report(tiny_digits):
    """The report's realised fraction is what torch's FLOP counter sees (softcap: exactly; speca counts a
    rejected forecast's whole fixed part, an upper bound)."""
    from cachec.runtime.flops import count_flops

    plan = plan_for(tiny_digits)
    _, ref, _ = count_flops(tiny_digits.generate, [3, 7], [0, 1], steps=STEPS)
    for mode in ("softcap", "speca"):
        opts = options(tiny_digits, plan, mode, 0.7)
        with apply(tiny_digits, plan, adaptive=opts) as handle:
            _, flops, _ = count_flops(tiny_digits.generate, [3, 7], [0, 1], steps=STEPS)
        rep = handle.report
        if mode == "softcap":
            assert flops / ref == pytest.approx(rep.flops_fraction, rel=1e-9)
        else:
            slack = rep.rejected_verifications * plan.budget.fixed_step_flops / plan.budget.full_step_flops / STEPS
            assert rep.flops_fraction - slack - 1e-9 <= flops / ref <= rep.flops_fraction + 1e-9


@pytest.mark.parametrize("mode", ["softcap", "speca"])
def test_decisions_are_deterministic(tiny_digits, mode):
    plan = plan_for(tiny_digits)
    opts = options(tiny_digits, plan, mode, 0.7)
    a, ra, _ = run(tiny_digits, plan, opts)
    b, rb, _ = run(tiny_digits, plan, opts)
    assert torch.equal(a, b)
    assert (ra.decisions, ra.risk, ra.tau, ra.flops_fraction) == (rb.decisions, rb.risk, rb.tau, rb.flops_fraction)
    # the same profile recalibrated from scratch is the same profile
    again = calibrate_profile(tiny_digits, plan, replace(opts, profile=None))
    assert again.tau == opts.profile.tau and again.reference == opts.profile.reference


@pytest.mark.parametrize("mode", ["softcap", "speca"])
def test_split_and_batched_cfg_decide_alike(tiny_digits, mode):
    """Split CFG decides at the first branch call and reuses it; batched CFG reads the first branch's rows:
    both see the same statistic, so they take the same Full steps."""
    plan = plan_for(tiny_digits)
    opts = options(tiny_digits, plan, mode, 0.7)
    batched, rb, _ = run(tiny_digits, plan, opts, cfg="batched")
    split, rs, _ = run(tiny_digits, plan, opts, cfg="split")
    assert rs.calls == 2 * rb.calls
    assert rb.decisions == rs.decisions and rb.full_steps == rs.full_steps
    assert rb.flops_fraction == pytest.approx(rs.flops_fraction, rel=1e-12)
    for x, y in zip(rb.risk, rs.risk):
        assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-4, abs=1e-7))
    assert torch.allclose(batched, split, atol=1e-4)


def test_split_cfg_branches_share_each_step_decision(tiny_digits):
    plan = plan_for(tiny_digits)
    opts = options(tiny_digits, plan, "softcap", 0.7)
    seen = []
    with apply(tiny_digits, plan, adaptive=opts) as handle:
        ex = handle.executor

        def post(module, args, output):
            seen.append((ex._run.step, ex._branch, ex._decision))

        hook = tiny_digits.transformer.register_forward_hook(post)
        try:
            tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg="split")
        finally:
            hook.remove()
    assert len(seen) == 2 * STEPS
    for (s0, b0, d0), (s1, b1, d1) in zip(seen[::2], seen[1::2]):
        assert s0 == s1 and (b0, b1) == (0, 1) and d0 == d1
    assert handle.report.full_steps  # the check is not vacuous


@pytest.mark.parametrize("cfg", ["batched", "split"])
def test_ceiling_one_is_every_step_full_and_bitwise_uncached(tiny_digits, cfg):
    plan = plan_for(tiny_digits, cfg)
    ref = tiny_digits.generate([3, 7], [0, 1], steps=STEPS, cfg=cfg)
    opts = options(tiny_digits, plan, "softcap", 1.0)
    out, rep, _ = run(tiny_digits, plan, opts, cfg=cfg)
    assert torch.equal(out, ref)
    assert set(rep.decisions) <= {"F", "C"} and rep.flops_fraction == pytest.approx(1.0) and rep.skipped == 0


def test_ceiling_at_the_plan_is_the_static_plan_bitwise(tiny_digits):
    plan = plan_for(tiny_digits)
    with apply(tiny_digits, plan) as handle:
        static = tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    out, rep, _ = run(tiny_digits, plan, options(tiny_digits, plan, "softcap", plan.budget.realised))
    assert torch.equal(out, static) and rep.full_steps == [] and rep.fallbacks == 0
    assert rep.flops_fraction == pytest.approx(handle.report.flops_fraction, rel=1e-12)


def test_report_contents(tiny_digits):
    plan = plan_for(tiny_digits)
    opts = options(tiny_digits, plan, "softcap", 0.7)
    _, rep, handle = run(tiny_digits, plan, opts)
    assert isinstance(rep, AdaptiveRunReport) and isinstance(handle.executor, AdaptiveExecutor)
    d = rep.as_dict()
    for key in ("adaptive", "ceiling", "decisions", "full_steps", "risk", "tau", "flops_fraction", "fallbacks"):
        assert key in d
    assert d["adaptive"] == "softcap" and d["ceiling"] == 0.7
    assert len(rep.decisions) == len(rep.risk) == len(rep.tau) == STEPS
    assert rep.full_steps == [s for s, c in enumerate(rep.decisions) if c == "F"]
    for s, c in enumerate(rep.decisions):
        assert c == ("C" if set(ACTIONS[s]) == {"C"} and c != "F" else c)
        if c == "F":
            assert rep.risk[s] > rep.tau[s] and rep.step_fractions[s] == pytest.approx(1.0)
    assert rep.risk[0] is None and all(r is not None for r in rep.risk[1:])
    assert all(t is None for s, t in enumerate(rep.tau) if ACTIONS[s] == "C")
    assert sum(rep.step_fractions) / STEPS == pytest.approx(rep.flops_fraction, rel=1e-12)
    assert rep.computed + rep.skipped == rep.calls * len(plan.units)


def test_speca_verifies_the_deepest_skipped_unit_and_reports_rejections(tiny_digits):
    plan = plan_for(tiny_digits)
    opts = options(tiny_digits, plan, "speca", 0.7)
    _, rep, handle = run(tiny_digits, plan, opts)
    assert handle.executor.verify == len(plan.units) - 1
    assert rep.adaptive == "speca" and rep.rejected_verifications == len(rep.full_steps)
    for s in rep.full_steps:  # a rejected forecast costs its partial forward on top of the Full step
        assert rep.step_fractions[s] > 1.0


def test_plan_coefficients_only_on_the_plan_history():
    """The predictor rule after a Full step (docs/softcap.md)."""
    h = ["h6", "h5", "h3", "h1"]
    entries = AdaptiveExecutor._plan_entries
    assert entries(h, [6, 5, 3, 1], (6, 5)) == ("h6", "h5")  # the plan's history: its coefficients
    assert entries(h, [6, 5, 3, 1], (6, 3)) == ("h6", "h3")  # a Full step at 5 only added an entry deeper down
    assert entries(h, [6, 5, 3, 1], (5, 3)) is None  # a fresher entry than the plan's H_1: plain reuse
    assert entries(h, [6, 5, 3, 1], (6, 0)) is None  # an assumed entry is gone


def test_controller_pi_law_and_guard():
    S = 10
    reference = [0.08 * (s + 1) for s in range(S)]  # a typical run spends 0.8 of a step per step
    c = SoftBudgetController([1.0] * S, reference, [0.5] * S, 0.6, 0.7, 0.2, 4.0)
    assert c.threshold(3) == 1.0
    c.spend(0, 1.0)  # 0.1 spent vs 0.08 reference: 0.2 Full-step equivalents over
    e = S * (0.1 - 0.08)
    assert c.u == pytest.approx(0.7 * e + 0.2 * e) and c.threshold(1) == pytest.approx(math.exp(0.9 * e))
    for s in range(1, 6):
        c.spend(s, 0.5)  # under-spending relaxes u back to 0 (τ to its reference), never below
        assert c.u == 0.0 and c.threshold(s + 1) == 1.0
    # guard: spent 0.35 after 6 steps, 4 steps left at 0.05 each -> 0.55; one Full step (+0.05) makes 0.6
    assert c.allows(6, 1.0) and not c.allows(6, 1.5)
    c.reset()
    assert (c.spent, c.integral, c.u) == (0.0, 0.0, 0.0)


def test_bad_ceilings_and_modes_are_refused(tiny_digits):
    plan = plan_for(tiny_digits)
    with pytest.raises(ValueError, match="below the plan's realised"):
        AdaptiveOptions(ceiling=plan.budget.realised - 0.05).resolved_ceiling(plan)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        AdaptiveOptions(ceiling=1.5).resolved_ceiling(plan)
    with pytest.raises(ValueError, match="adaptive mode must be one of"):
        apply(tiny_digits, plan, adaptive="teacache")
    with pytest.raises(TypeError, match="cachec Driver"):
        apply(tiny_digits.pipe, plan, adaptive=True)


def test_static_path_unchanged(tiny_digits):
    """Without ``adaptive`` the executor, its report and the hooks are the static ones (no observer)."""
    plan = plan_for(tiny_digits)
    with apply(tiny_digits, plan) as handle:
        tiny_digits.generate([3, 7], [0, 1], steps=STEPS)
    assert type(handle.executor) is PlanExecutor and type(handle.report) is RunReport
    assert not hasattr(handle.executor, "observer") and handle._undo is None
    assert "risk" not in handle.report.as_dict()


@pytest.mark.parametrize("mode", ["softcap", "speca"])
def test_torch_compile_in_adaptive_mode(tiny_digits, mode):
    """A ``torch.compile``-d transformer runs the adaptive mode: the decision point is the one graph break
    (``torch.compiler.disable``), and decisions, report and images equal the eager run's (backend ``eager``:
    the same kernels, so bitwise). A second run compiles no new graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    plan = plan_for(tiny_digits)
    opts = options(tiny_digits, plan, mode, 0.7)
    if mode == "speca":  # its calibrated thresholds accept every forecast here: reject all, up to the guard
        floor = step_floor(plan)
        S = plan.steps
        opts = replace(opts, profile=AdaptiveProfile("speca", 0.7, [-1.0] * S,
                                                     [sum(floor[:s + 1]) / S for s in range(S)]))
    eager, rep_eager, _ = run(tiny_digits, plan, opts)
    assert rep_eager.full_steps  # the comparison covers Full steps, not only plan steps
    original = tiny_digits.pipe.transformer
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # reset() keeps the counters of earlier tests
    tiny_digits.pipe.transformer = torch.compile(original, backend="eager")
    try:
        compiled, rep, _ = run(tiny_digits, plan, opts)
        graphs = counters["stats"]["unique_graphs"]
        again, _, _ = run(tiny_digits, plan, opts)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        tiny_digits.pipe.transformer = original
        torch._dynamo.reset()
    assert graphs > before  # dynamo traced the transformer (it did not fall back to eager for the whole call)
    assert (rep.decisions, rep.risk, rep.tau, rep.flops_fraction) == (
        rep_eager.decisions, rep_eager.risk, rep_eager.tau, rep_eager.flops_fraction)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def test_speca_wrapper_is_removed(tiny_digits):
    plan = plan_for(tiny_digits)
    model = tiny_digits.transformer
    with apply(tiny_digits, plan, adaptive=options(tiny_digits, plan, "speca", 0.7)):
        assert "forward" in model.__dict__
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_cli_run_and_eval_adaptive(tmp_path):
    """``cachec run/eval PLAN --adaptive`` on a tiny model folder: the report lines, ceiling kept, JSON."""
    import json

    from click.testing import CliRunner
    from conftest import build_tiny_digits_folder

    from cachec.cli import main
    from cachec.loading import load_model
    from cachec.runtime import write_plan

    folder = build_tiny_digits_folder(tmp_path / "m")
    plan = plan_for(load_model(folder))
    write_plan(plan, tmp_path / "p.yaml")
    common = (str(tmp_path / "p.yaml"), folder)
    res = CliRunner().invoke(main, ["run", *common, "--classes", "1,2", "--adaptive", "--ceiling", "0.7",
                                    "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert "adaptive softcap: ceiling 70.0%" in res.output and "risk:" in res.output and "tau:" in res.output
    res = CliRunner().invoke(main, ["eval", *common, "--samples", "3", "--adaptive", "--adaptive-mode", "speca",
                                    "--ceiling", "0.7", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["adaptive"] == "speca" and out["flops_fraction_max"] <= 0.7 + 1e-9 and out["n_images"] == 3
    res = CliRunner().invoke(main, ["run", *common, "--ceiling", "0.7", "--out", str(tmp_path / "d.png")])
    assert res.exit_code != 0 and "--ceiling applies to --adaptive" in res.output


def test_cli_adaptive_on_a_text_family_probes_the_run_prompts(tiny_pipelines, tmp_path):
    """A text model without its own calibration prompts (the tiny FLUX pipeline): ``cachec run/eval
    --adaptive`` calibrate the probe on the run's prompts (was: 'the adaptive probe of a text model needs
    prompts'), and the ceiling holds."""
    import json

    from click.testing import CliRunner

    from cachec.calibrate.run import calibrate
    from cachec.cli import main
    from cachec.planner import Planner, load_calibration
    from cachec.runtime import write_plan

    driver = tiny_pipelines["flux"]
    cal = calibrate(driver, ["a red car", "a small blue house"], output=tmp_path / "c.safetensors",
                    samples_per_condition=1, steps=4, sensitivity="none", progress=False)
    plan, side = Planner(load_calibration(str(cal))).plan(0.5, "cachec")
    write_plan(plan, tmp_path / "p.yaml", side or None)
    common = (str(tmp_path / "p.yaml"), driver.name)
    res = CliRunner().invoke(main, ["run", *common, "--prompt", "a green tree", "--per-class", "2", "--adaptive",
                                    "--out", str(tmp_path / "r.png")])
    assert res.exit_code == 0, res.output
    assert "adaptive softcap" in res.output
    res = CliRunner().invoke(main, ["eval", *common, "--samples", "2", "--adaptive", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["flops_fraction_max"] <= out["runtime_report"]["ceiling"] + 1e-9
