"""Smoke test of the peer-comparison benchmark (bench/peers/, bench/compare.py) on a tiny random DiT.

Every adapter runs one operating point on two samples; its FLOPs are counted over the whole ``generate``
call and compared with the uncached count; nothing may stay installed afterwards. Also: the cache-context
wrapper's step/branch bookkeeping, error capture, and the table's "interpolate only between measured points"
rule.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import compare, peers  # noqa: E402

STEPS = 6
CONDS, SEEDS = [1, 7], [123, 456]


@pytest.fixture(scope="module")
def ctx(tiny_digits, tmp_path_factory):
    return peers.BenchContext(
        driver=tiny_digits, steps=STEPS, guidance=3.0, calib_conditions=[0, 1, 2, 3], calib_seeds=[0, 1, 2, 3],
        workdir=str(tmp_path_factory.mktemp("bench")), batch_size=4, sensitivity="none", log=lambda m: None,
    )


@pytest.fixture(scope="module")
def reference(ctx):
    from cachec.runtime.flops import count_flops

    images, flops, _ = count_flops(ctx.generate, CONDS, SEEDS)
    return images, flops


def _methods():
    return peers.all_methods(STEPS, quick=True, families=True)


@pytest.mark.parametrize("method", _methods(), ids=lambda m: m.name)
def test_each_adapter_runs_and_is_counted(ctx, reference, method):
    from cachec.runtime.flops import count_flops

    ref_images, ref_flops = reference
    if isinstance(method, peers.CacheDitMethod) and not peers.cache_dit_status()[0]:
        with pytest.raises(RuntimeError, match="cache-dit"):
            method.prepare(ctx)
        return
    method.prepare(ctx)
    p = method.grid(ctx, quick=True)[-1]
    if isinstance(method, peers.SoftCapMethod):  # builds on cachec's plan choice at the ceiling
        ctx.cache[("chosen options", round(float(p), 6))] = {"family": "step", "fill": True}
    session = method.session(ctx, p)
    try:
        session.begin()
        try:
            images, flops, _ = count_flops(ctx.generate, CONDS, SEEDS)
        finally:
            session.end()
    finally:
        session.close()
    assert images.shape == ref_images.shape and torch.isfinite(images).all()
    frac = flops / ref_flops
    assert 0.0 < frac <= 1.0 + 1e-9, f"{method.name}: realised FLOPs fraction {frac}"
    if method.diagnostic:
        assert frac == pytest.approx(1.0)  # the no-op configurations really do nothing here
        assert torch.equal(images, ref_images)
    elif not isinstance(method, peers.FirstBlockCacheMethod):
        assert frac < 1.0, f"{method.name} skipped nothing at {method.label(p)}"
    if isinstance(method, peers.SoftCapMethod):  # a soft ceiling, never exceeded (docs/softcap.md)
        assert frac <= float(p) + 1e-9, f"{method.name}: {frac} over its ceiling {p}"
    assert peers.leftover_state(ctx.driver, ctx.module_order) == []
    again, flops2, _ = count_flops(ctx.generate, CONDS, SEEDS)
    assert flops2 == ref_flops and torch.equal(again, ref_images)


def test_fast_counter_matches_count_flops(ctx, reference):
    from cachec.runtime.flops import count_flops, count_total_flops

    images, flops = count_total_flops(ctx.generate, CONDS, SEEDS)
    assert flops == reference[1] and torch.equal(images, reference[0])
    m = peers.FirstBlockCacheMethod()
    s = m.session(ctx, 0.3)
    s.begin()
    try:
        _, fast = count_total_flops(ctx.generate, CONDS, SEEDS)
    finally:
        s.end()
    s.begin()
    try:
        _, slow, _ = count_flops(ctx.generate, CONDS, SEEDS)
    finally:
        s.end()
    s.close()
    assert fast == slow


def test_cache_context_wrapper_names_steps_and_branches(ctx):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    seen = []
    sess = peers.HookSession(ctx, lambda tr, w: apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=0.0)))
    sess.begin()
    try:
        ctx.generate(CONDS, SEEDS)
        seen = list(sess.wrapper.contexts)
    finally:
        sess.close()
    assert seen == [("cond_uncond", i) for i in range(STEPS)]
    assert peers.leftover_state(ctx.driver) == []


def test_sigma_is_a_noise_level(ctx, tiny_digits_ddim):
    flow = ctx.driver.scheduler
    flow.set_timesteps(STEPS)
    s0 = peers._scheduler_sigma(flow, 0, float(flow.timesteps[0]))
    assert s0 == pytest.approx(float(flow.sigmas[0]))
    ddim = tiny_digits_ddim.scheduler
    ddim.set_timesteps(STEPS)
    sig = [peers._scheduler_sigma(ddim, i, float(t)) for i, t in enumerate(ddim.timesteps)]
    assert all(0.0 <= s <= 1.0 for s in sig) and sig == sorted(sig, reverse=True)


def test_magcache_ratios_are_parsed():
    text = "noise\n\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):\n[1.0, 0.98, 1.02]\n\n"
    assert peers.parse_magcache_ratios(text + text) == [[1.0, 0.98, 1.02]] * 2


def test_a_raising_method_is_recorded_not_raised(ctx, reference):
    class Broken(peers.Method):
        name, group, knob = "broken", "test", "x"

        def grid(self, ctx, quick=False):
            return [1]

        def session(self, ctx, p):
            raise ValueError("this peer cannot run here\nsecond line")

    cfg = compare.Config.__new__(compare.Config)
    cfg.ctx, cfg.driver, cfg.counter, cfg.timing_size = ctx, ctx.driver, "fast", 2
    cfg.batches = [(CONDS, SEEDS)]
    cfg.eval_conditions = CONDS
    rec = compare.run_point(cfg, Broken(), 1, {"images": reference[0], "flops": reference[1], "flops_batch0": reference[1]})
    assert rec["error"] == "ValueError: this peer cannot run here"


def _entry(points, diagnostic=False):
    return {"method": "m", "group": "diffusers", "diagnostic": diagnostic,
            "points": [{"label": f"p{i}", "flops_fraction": f, "psnr_db": p, "frechet": d}
                       for i, (f, p, d) in enumerate(points)]}


def test_table_interpolates_only_between_measured_points():
    e = _entry([(0.2, 20.0, 10.0), (0.3, 30.0, 5.0), (0.52, 35.0, 4.0), (1.0, "inf", 3.0)])
    v = compare.at_budget(e, 0.25)
    assert v["how"] == "interp" and v["psnr"] == pytest.approx(25.0) and v["frechet"] == pytest.approx(7.5)
    assert compare.at_budget(e, 0.30)["how"] == "exact"
    v = compare.at_budget(e, 0.60)  # bracketed by an infinite PSNR: no interpolation, nearest point below
    assert v["how"] == "below" and v["psnr"] == 35.0
    v = compare.at_budget(_entry([(0.5, 30.0, 1.0)]), 0.25)
    assert v["psnr"] is None and "lowest realised FLOPs 50.0%" in v["note"]
    assert compare.at_budget(_entry([(0.1, 30.0, 1.0)]), 0.6)["psnr"] is None
    assert compare.at_budget(_entry([(1.0, "inf", 1.0)], diagnostic=True), 0.6)["psnr"] is None


def test_flux_layout_adapters():
    """On a FLUX-layout transformer (the digits-mmdit config): TaylorSeer's swept identifiers match every
    dual-block attention/FFN/context-FFN and single-block attention/MLP input; SeaCache's adapter turns
    packed tokens (N, 64, 16) into (16, 1, 8, 8) latents."""
    import re

    from bench.peers.sea_cache import dit_raw_vision
    from bench.peers.taylorseer_cache import taylor_identifiers
    from cachec.reference_mmdit import make_transformer

    tr = make_transformer()
    ids = taylor_identifiers(tr)
    hit = [n for n, _ in tr.named_modules() if any(re.fullmatch(p, n) for p in ids)]
    assert len(hit) == 4 * 3 + 8 * 2
    x = torch.randn(2, 64, 16)
    lat = dit_raw_vision(None, (), {"hidden_states": x})
    assert len(lat) == 2 and lat[0].shape == (16, 1, 8, 8)
    assert torch.equal(lat[1][:, 0].reshape(16, 64).T, x[1])


def test_headline_uses_the_frontier_rule_with_paired_intervals():
    """A peer point with more PSNR at fewer FLOPs than the budget counts (it dropped out of the old
    interpolated headline); cachec's under-spent real plan counts at its own FLOPs; the margin is the mean
    per-image difference with a paired bootstrap interval, 'tie' when it contains 0."""
    from bench.compare_report import headline

    rng = torch.Generator().manual_seed(0)
    base = 30 + torch.randn(20, generator=rng)

    def pt(label, flops, shift, noise=0.0):
        per = (base + shift + noise * torch.randn(20, generator=rng)).tolist()
        return {"label": label, "flops_fraction": flops, "psnr_db": sum(per) / 20, "psnr_db_per_image": per,
                "frechet": 1.0}

    cfg = {"methods": [
        {"method": "cachec", "group": "cachec", "points": [pt("b25", 0.25, 1.0, noise=2.0), pt("b40", 0.37, 3.0),
                                                          pt("b60", 0.60, 8.0)]},
        {"method": "peer", "group": "diffusers", "points": [pt("p1", 0.23, 1.0), pt("p2", 0.41, 9.0),
                                                            pt("p3", 0.58, 5.0)]},
    ]}
    h = headline(cfg)
    assert h["0.25"]["best_peer_point"] == "p1" and h["0.25"]["verdict"] == "tie"
    assert h["0.25"]["margin_ci_low"] < 0 < h["0.25"]["margin_ci_high"]
    # p2 is 0.6 points over 40 % (beyond the 0.5 point slack): at 40 % the peer's frontier is p1
    assert h["0.40"]["best_peer_point"] == "p1" and h["0.40"]["cachec_flops"] == 0.37
    assert h["0.40"]["margin_db"] == pytest.approx(2.0) and h["0.40"]["verdict"] == "ahead"
    # at 60 % the peer's best real point is p2 (more PSNR at fewer FLOPs), not p3 near the budget
    assert h["0.60"]["best_peer_point"] == "p2" and h["0.60"]["margin_db"] == pytest.approx(-1.0)
    assert h["0.60"]["verdict"] == "behind" and h["0.60"]["margin_ci_high"] < 0
    # a re-measurement of both chosen points on more images replaces the sweep's margin
    per = [1.0] * 60
    cfg["confirmation"] = {"n_images": 60, "points": [
        {"method": "cachec", "label": "b60", "flops_fraction": 0.6, "psnr_db": 41.0, "psnr_db_per_image": [41.0] * 60},
        {"method": "peer", "label": "p2", "flops_fraction": 0.41, "psnr_db": 40.5,
         "psnr_db_per_image": [40.5 + 0.1 * (i % 3) for i, _ in enumerate(per)]}]}
    h = headline(cfg)
    assert h["0.60"]["images"] == 60 and h["0.60"]["cachec_psnr"] == 41.0
    assert h["0.60"]["margin_db"] == pytest.approx(0.4) and h["0.60"]["verdict"] == "ahead"
    assert h["0.40"]["images"] == 20  # p1/b40 were not re-measured


def test_widening_asks_for_enough_images_and_the_headline_prefers_the_wider_pair():
    """``--widen``: a half-width h over n images needs n·(h/(0.9·0.5))² images for ±0.5 dB (whole batches,
    capped); margins already narrow enough ask for nothing; the headline takes a pair from the widened
    confirmation only when it holds both points, else from the confirmation."""
    from bench.compare_configs import widen_images
    from bench.compare_report import headline

    hl = {"0.25": {"margin_ci_low": 1.0, "margin_ci_high": 1.8, "images": 100},   # ±0.40: narrow enough
          "0.40": {"margin_ci_low": 1.0, "margin_ci_high": 2.8, "images": 100},   # ±0.90: 100·4 = 400
          "0.60": {"margin_ci_low": 1.0, "margin_ci_high": 2.2, "images": 100}}   # ±0.60: 177.8 -> 180
    assert widen_images(hl, 100, 10) == (400, ["0.40", "0.60"])
    assert widen_images(hl, 100, 10, cap=300) == (300, ["0.40", "0.60"])
    assert widen_images({"0.40": hl["0.60"]}, 100, 10) == (180, ["0.40"])
    assert widen_images({"0.25": hl["0.25"]}, 100, 10) == (100, [])
    assert widen_images({"0.40": dict(hl["0.40"], images=20)}, 100, 10) == (100, [])  # not over the confirmation

    def pt(method, label, flops, per):
        return {"method": method, "label": label, "flops_fraction": flops, "psnr_db": sum(per) / len(per),
                "psnr_db_per_image": per}

    sweep = [30.0 + 0.1 * i for i in range(20)]
    cfg = {"methods": [{"method": "cachec", "group": "cachec", "points": [pt("cachec", "b40", 0.40, sweep)]},
                       {"method": "peer", "group": "diffusers", "points": [pt("peer", "p", 0.39, [v - 1 for v in sweep])]}],
           "confirmation": {"n_images": 4, "points": [pt("cachec", "b40", 0.40, [31.0] * 4),
                                                      pt("peer", "p", 0.39, [30.0, 30.2, 30.1, 29.9])]}}
    assert headline(cfg)["0.40"]["images"] == 4
    cfg["wide_confirmation"] = {"n_images": 6, "points": [pt("cachec", "b40", 0.40, [31.0] * 6)]}
    assert headline(cfg)["0.40"]["images"] == 4  # the peer's point is not in it: the confirmation's pair stands
    cfg["wide_confirmation"]["points"].append(pt("peer", "p", 0.39, [30.5, 30.4, 30.6, 30.5, 30.5, 30.5]))
    h = headline(cfg)["0.40"]
    assert h["images"] == 6 and h["margin_db"] == pytest.approx(0.5) and h["verdict"] == "ahead"
    # a widened peer point over the budget + slack (an adaptive peer on the new images) falls back to the
    # confirmation's valid pair, not to the sweep
    cfg["wide_confirmation"]["points"][1]["flops_fraction"] = 0.43
    h = headline(cfg)["0.40"]
    assert h["images"] == 4 and "on 6 images over the budget + slack: peer realised 43.0%" in h["confirmation_rejected"]


def test_widening_refuses_points_that_do_not_reproduce_the_confirmation(monkeypatch):
    """``--widen`` on a class model: the widened points' first images are the confirmation's images, so their
    per-image PSNRs must match it; a difference over the reproduction tolerance refuses the run."""
    import contextlib

    from bench import compare_configs as cc

    def pt(method, label, flops, per):
        return {"method": method, "label": label, "flops_fraction": flops, "psnr_db": sum(per) / len(per),
                "psnr_db_per_image": per, "param": 0.4 if method == "cachec" else 1.2}

    conf_c, conf_p = [31.0, 32.0, 33.0, 34.0], [30.0, 30.5, 29.0, 31.0]
    stored = {"methods": [{"method": "cachec", "group": "cachec", "points": [pt("cachec", "b40", 0.40, [30.0] * 2)]},
                          {"method": "peer", "group": "diffusers", "points": [pt("peer", "p", 0.39, [29.0] * 2)]}],
              "confirmation": {"n_images": 4, "points": [pt("cachec", "b40", 0.40, conf_c), pt("peer", "p", 0.39, conf_p)]}}
    stored["headline"] = {}  # widening reads the confirmation's intervals, not a stored (maybe widened) headline
    shift = {"v": 0.0}

    class Cfg:
        name, batch_size, counter, confirm_images = "cfg", 2, "fast", 0
        eval_conditions = list(range(8))
        eval_seeds = list(range(8))
        driver = type("D", (), {"prompt_sets": None})()
        ctx = type("C", (), {"cache": {}})()

    monkeypatch.setattr(cc, "confirmation_images", lambda cfg: contextlib.nullcontext(({}, 1.0)))
    monkeypatch.setattr(cc, "_confirmed", lambda cfg, m, param, ref, counter: pt(
        m.name, "b40" if m.name == "cachec" else "p", 0.4,
        [v + shift["v"] for v in (conf_c if m.name == "cachec" else conf_p)] + [35.0] * 4))
    methods = [type("M", (), {"name": "cachec"})(), type("M", (), {"name": "peer"})()]
    wide = cc.widen_confirmation(Cfg(), stored, methods, target=0.5, cap=400)
    assert "0.40" in wide["budgets"] and wide["prefix_check"]["max_abs_diff_db"] == 0.0
    shift["v"] = 0.01
    with pytest.raises(RuntimeError, match="does not reproduce the stored result"):
        cc.widen_confirmation(Cfg(), stored, methods, target=0.5, cap=400)


def test_iso_quality_interpolates_cachec_between_its_points():
    from bench.compare_report import iso_quality

    def pt(label, flops, psnr):
        return {"label": label, "flops_fraction": flops, "psnr_db": psnr, "psnr_db_per_image": [psnr] * 4, "frechet": 1.0}

    cfg = {"methods": [
        {"method": "cachec", "group": "cachec", "points": [pt("b25", 0.25, 30.0), pt("b40", 0.40, 36.0), pt("b60", 0.60, 44.0)]},
        {"method": "peer", "group": "diffusers", "points": [pt("p1", 0.40, 33.0), pt("p2", 0.58, 46.0)]},
    ]}
    iso = iso_quality(cfg)
    assert iso["0.40"]["how"] == "interp" and iso["0.40"]["cachec_flops"] == pytest.approx(0.325)
    assert iso["0.40"]["ratio"] == pytest.approx(0.325 / 0.40)
    assert iso["0.60"]["how"] == "not reached" and iso["0.60"]["ratio"] is None
    cfg["methods"][1]["points"] = [pt("p0", 0.40, 20.0)]
    assert iso_quality(cfg)["0.40"]["how"] == "at most" and iso_quality(cfg)["0.40"]["cachec_flops"] == 0.25


def test_family_choice_note_names_the_chosen_candidate_with_its_predictor_set():
    """The point table's note names the candidate the search chose, predictor set included: a Taylor-set
    winner is not reported as its family's fitted-set candidate."""
    from bench.compare_report import chosen_name

    scores = {"step/refine0": 30.0, "warmup/refine0": 31.0, "warmup+taylor/refine0": 32.0,
              "warmup+taylor/refine1": 33.0, "warmup/refine1": 31.5}
    # results written before the choice recorded its name: the winner is the first best score
    assert chosen_name({"chosen": "warmup", "refine": 1, "validation_psnr_db": scores}) == "warmup+taylor/refine1"
    assert chosen_name({"chosen": "warmup", "refine": 1, "name": "warmup+taylor/refine1",
                        "validation_psnr_db": scores}) == "warmup+taylor/refine1"
    # older results (fitted set only, no scores of that family): family/refine as recorded
    assert chosen_name({"chosen": "group", "refine": 2, "validation_psnr_db": {}}) == "group/refine2"


def test_confirmation_counts_each_point_with_the_counter_its_sweep_settled_on(monkeypatch):
    """A method whose fast FLOP count disagreed with count_flops in its sweep was counted with count_flops
    from then on; re-measuring its headline point on the confirmation images must do the same (the fast
    count is known to be wrong for it), and the confirmation runs on the larger image set and restores the
    sweep's afterwards."""
    from bench import compare_configs as cs

    def pt(label, param, flops, psnr, counter):
        return {"label": label, "param": param, "flops_fraction": flops, "psnr_db": psnr, "flop_counter": counter,
                "psnr_db_per_image": [psnr] * 2}

    results = [
        {"method": "cachec", "group": "cachec", "points": [pt("budget 40%", 0.4, 0.40, 30.0, "fast")]},
        {"method": "peer", "group": "diffusers", "points": [pt("t=0.1", 0.1, 0.39, 29.0, "torch")]},
    ]

    class Cfg:
        confirm_images, counter = 4, "fast"
        eval_conditions, eval_seeds, batches, condition_text = [0, 1], [10, 11], [([0, 1], [10, 11])], "2"

        def set_eval(self, n):
            self.eval_conditions, self.eval_seeds = list(range(n)), list(range(10, 10 + n))
            self.batches = [(self.eval_conditions, self.eval_seeds)]

    class M:
        def __init__(self, name):
            self.name = name

    calls = []
    monkeypatch.setattr(cs, "counted_generate", lambda cfg, s, b, per_batch=None, counter="fast": (
        per_batch.append(1) if per_batch is not None else None, (torch.zeros(len(cfg.eval_conditions)), 1))[1])
    monkeypatch.setattr(cs, "run_point", lambda cfg, m, p, ref, check: calls.append(
        (m.name, p, check.get("counter"), len(cfg.eval_conditions))) or {"method": m.name, "label": "x"})
    cfg = Cfg()
    conf = cs.confirm_headline(cfg, [M("cachec"), M("peer")], results)
    assert conf["n_images"] == 4
    assert sorted(calls) == [("cachec", 0.4, "fast", 4), ("peer", 0.1, "torch", 4)]
    assert cfg.eval_conditions == [0, 1]  # the sweep's set is restored


def test_confirmation_over_the_budget_is_rejected():
    """An adaptive peer whose re-measured FLOPs jump above the budget + slack (e.g. it stopped skipping on the
    new images) does not replace the sweep's pair."""
    from bench.compare_report import headline

    def pt(label, flops, psnr, n=20):
        return {"label": label, "flops_fraction": flops, "psnr_db": psnr, "psnr_db_per_image": [psnr + 0.01 * (i % 2) for i in range(n)],
                "frechet": 1.0}

    cfg = {"methods": [{"method": "cachec", "group": "cachec", "points": [pt("b40", 0.40, 40.0)]},
                       {"method": "peer", "group": "diffusers", "points": [pt("p", 0.401, 41.0)]}],
           "confirmation": {"n_images": 100, "points": [dict(pt("b40", 0.40, 40.5, 100), method="cachec"),
                                                        dict(pt("p", 1.0, float("inf"), 100), method="peer")]}}
    h = headline(cfg)["0.40"]
    assert h["images"] == 20 and h["best_peer_flops"] == 0.401 and h["margin_db"] == pytest.approx(-1.0)
    assert "peer realised 100.0%" in h["confirmation_rejected"]


def test_sessions_split_generate_calls_to_their_call_batch():
    from bench.compare_sweeps import split_calls

    batches = [([0, 1, 2], [10, 11, 12]), ([3], [13])]
    assert split_calls(None, batches) == batches
    one = peers.Session()
    one.call_batch = 1
    assert split_calls(one, batches) == [([0], [10]), ([1], [11]), ([2], [12]), ([3], [13])]
    assert peers.SoftCapSession.call_batch == 1  # the adaptive line decides per image


def test_softcap_without_a_plan_choice_says_what_to_run(ctx):
    with pytest.raises(KeyError, match="run the 'cachec' line first"):
        peers.SoftCapMethod().base_plan(ctx, 0.55)


def test_adaptive_rows_pair_the_adaptive_point_with_its_static_match_and_the_headline_pair():
    """The adaptive row of a ceiling pairs image by image with the static plan at its realised FLOPs and with
    the headline's confirmed cachec and best-peer points at the same table budget; a margin whose interval
    holds 0 is a tie; the ceiling check reads the largest single run."""
    from bench.compare_adaptive import adaptive_comparison

    def pt(method, label, flops, base, n=30, **kw):
        return dict({"method": method, "label": label, "flops_fraction": flops, "psnr_db": base,
                     "psnr_db_per_image": [base + 0.3 * ((7 * i) % 5 - 2) for i in range(n)], "frechet": 1.0}, **kw)

    soft = pt("cachec SoftCap", "ceiling 40%", 0.385, 40.0, param=0.4,
              info={"ceiling": 0.4, "run_flops_fraction_max": 0.398, "full_steps_mean": 1.5})
    cfg = {"methods": [{"method": "cachec", "group": "cachec", "points": [pt("cachec", "budget 40%", 0.40, 39.0, 20)]},
                       {"method": "peer", "group": "diffusers", "points": [pt("peer", "t", 0.401, 38.0, 20)]}],
           "confirmation": {"n_images": 30, "points": [pt("cachec", "budget 40%", 0.40, 41.0),
                                                       pt("peer", "t", 0.401, 38.0)]},
           "adaptive_confirmation": {"n_images": 30, "points": [
               soft, pt("cachec static (at SoftCap's FLOPs)", "budget 38.50%", 0.385, 40.0, matches="ceiling 40%")]}}
    cfg["methods"] += [
        {"method": "cachec SoftCap", "group": "cachec", "points": [pt("cachec SoftCap", "ceiling 40%", 0.386, 33.0, 20)]},
        {"method": "SeaCache", "group": "diffusers", "points": [pt("SeaCache", "a", 0.38, 31.0, 20),
                                                                pt("SeaCache", "b", 0.45, 36.0, 20)]},
        {"method": "SeaCache (no consecutive limit)", "group": "diffusers", "points": [pt("SeaCache", "c", 0.30, 32.0, 20)]},
        {"method": "MagCache", "group": "diffusers", "points": [pt("MagCache", "d", 0.50, 39.0, 20)]}]
    row = adaptive_comparison(cfg)["0.40"]
    sea = row["sweep"]["peers"]["SeaCache"]  # the best SeaCache line at <= 38.6 % + slack: not the 45 % point
    assert (sea["method"], sea["label"], sea["margin_db"]) == ("SeaCache (no consecutive limit)", "c", pytest.approx(1.0))
    assert "MagCache" not in row["sweep"]["peers"]  # no MagCache point at these FLOPs
    assert row["flops"] == 0.385 and row["over_ceiling_points"] == pytest.approx(-0.2)
    assert row["static_matched"]["margin_db"] == pytest.approx(0.0) and row["static_matched"]["verdict"] == "tie"
    assert row["cachec_at_ceiling"]["margin_db"] == pytest.approx(-1.0)
    assert row["cachec_at_ceiling"]["verdict"] == "behind"
    assert row["best_peer"]["method"] == "peer" and row["best_peer"]["verdict"] == "ahead"
    assert row["best_peer"]["margin_db"] == pytest.approx(2.0)
    # a best peer that stopped skipping on the confirmation images is paired on the sweep's images instead
    cfg["confirmation"]["points"][1] = pt("peer", "t", 1.0, 100.0)
    row = adaptive_comparison(cfg)["0.40"]
    assert row["best_peer"]["images"] == 20 and row["best_peer"]["margin_db"] == pytest.approx(33.0 - 38.0)
    assert "over the ceiling" in row["best_peer"]["note"]


def test_hooks_go_on_the_generator_of_a_controlnet_model(tiny_digits):
    """diffusers' hooks are applied where FLUX ControlNet users apply them: the generator transformer (the
    ControlNet runs uncached); any other model is hooked as it is."""
    from cachec.loading import load_model

    control = load_model("digits-mmdit-control")
    assert peers.hook_target(control) is control.transformer.transformer
    assert type(peers.hook_target(control)).__name__ == "FluxTransformer2DModel"
    assert peers.hook_target(tiny_digits) is tiny_digits.transformer


def test_adding_a_line_checks_reproduction_and_keeps_the_adaptive_confirmation(monkeypatch):
    """``bench/compare.py --add``: a stored planner-baseline point must be reproduced per image before anything
    is added (EOC, else FORA; none stored or a mismatch is refused), and adding a line that is not adaptive
    keeps the stored adaptive confirmation instead of erasing it."""
    from bench import compare_configs as cc

    class M:
        adaptive = False

        def __init__(self, name):
            self.name = name

        def prepare(self, ctx):
            pass

    class Cfg:
        name, steps, confirm_images = "cfg", 4, 0
        eval_conditions = [0, 1]

        class ctx:
            cache: dict = {}

    per_image = {"value": [30.0, "inf"]}
    monkeypatch.setattr(cc, "measure_reference", lambda cfg: ({"images": None}, {"flops_per_image": 100.0, "seconds": 1.0},
                                                              None, [1.0]))
    monkeypatch.setattr(cc.peers, "all_methods", lambda steps, only=None, **kw: [M(only[0].lstrip("="))])
    monkeypatch.setattr(cc, "run_point", lambda cfg, m, p, ref, *a: {"method": m.name, "label": "x",
                                                                      "psnr_db_per_image": per_image["value"]})
    monkeypatch.setattr(cc, "run_methods", lambda cfg, methods, *a, **kw: [{"method": m.name, "points": []} for m in methods])

    def stored(baseline="FORA"):
        return {"reference": {"flops_per_image": 100.0},
                "methods": [{"method": baseline, "points": [{"label": "N=2", "param": 2, "psnr_db_per_image": [30.0, "inf"]}]}],
                "adaptive_confirmation": {"n_images": 100, "points": ["kept"]}}

    out = cc.add_to_config(Cfg(), stored(), [M("FirstBlockCache")], quick=True, max_extra=0)
    assert out["adaptive_confirmation"] == {"n_images": 100, "points": ["kept"]}
    assert out["additions"][-1]["reproduction_check"] == {"point": "FORA N=2", "max_abs_psnr_diff_db": 0.0}
    assert [e["method"] for e in out["methods"]] == ["FORA", "FirstBlockCache"]
    with pytest.raises(RuntimeError, match="has no EOC \\(paper\\) or FORA point"):
        cc.add_to_config(Cfg(), stored("MagCache"), [M("FirstBlockCache")], quick=True, max_extra=0)
    per_image["value"] = [30.5, "inf"]
    with pytest.raises(RuntimeError, match="does not reproduce"):
        cc.add_to_config(Cfg(), stored(), [M("FirstBlockCache")], quick=True, max_extra=0)
    per_image["value"] = [30.0, 40.0]  # a finite image where the stored one was identical (+inf)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        cc.add_to_config(Cfg(), stored(), [M("FirstBlockCache")], quick=True, max_extra=0)
    per_image["value"] = [30.0, float("inf")]  # +inf as a float (fresh run) against "inf" (stored JSON)
    assert cc.add_to_config(Cfg(), stored(), [M("FirstBlockCache")], quick=True,
                            max_extra=0)["additions"][-1]["reproduction_check"]["max_abs_psnr_diff_db"] == 0.0
    per_image["value"] = [30.0]
    with pytest.raises(RuntimeError, match="another image count"):
        cc.add_to_config(Cfg(), stored(), [M("FirstBlockCache")], quick=True, max_extra=0)


def test_budgets_with_a_percent_sign_are_percents():
    from bench.compare import parse_budgets

    assert parse_budgets("15,25%,0.4,1%") == pytest.approx([0.15, 0.25, 0.4, 0.01])
    with pytest.raises(SystemExit):
        parse_budgets("150")


def test_cache_context_steps_of_a_flux_style_schedule_whose_last_timestep_is_1():
    """FLUX-style transformers receive the scheduler timestep / 1000; digits-mmdit's last scheduler timestep is
    1.0, exactly what step 0 receives. The wrapper fixes the scale at a run's first call, so step 0 is step 0
    (it was read as the last step, which sent SeaCache into its fail-open path at every run)."""
    from types import SimpleNamespace

    from bench.peers.context import CacheContextWrapper

    class Net(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return hidden_states

    timesteps = torch.tensor([1000.0, 500.0, 1.0])
    driver = SimpleNamespace(transformer=Net(), scheduler=SimpleNamespace(timesteps=timesteps))
    for scale in (1000.0, 1.0):  # FLUX-style, and a transformer that receives the scheduler's timesteps
        w = CacheContextWrapper(driver, steps=3)
        w.install()
        try:
            for t in timesteps:
                driver.transformer(torch.zeros(1), timestep=t / scale)
        finally:
            w.remove()
        assert w.contexts == [("cond_uncond", 0), ("cond_uncond", 1), ("cond_uncond", 2)], scale
    assert "forward" not in driver.transformer.__dict__


@pytest.mark.skipif(not peers.cache_dit_status()[0], reason="cache-dit is not installed (pip install -e '.[bench]')")
def test_cache_dit_leaves_the_flux_module_order_and_seacache_after_it_still_skips(tmp_path):
    """cache-dit re-inserts the block lists it caches at the end of the transformer's children; on a FLUX-layout
    model the single blocks then came before the dual blocks, and diffusers' SeaCache, which takes its leader
    and tail blocks from that order, ran every later step in full. The session restores the order."""
    from cachec.loading import load_model
    from cachec.runtime.flops import count_total_flops

    driver = load_model("digits-mmdit")
    c = peers.BenchContext(driver=driver, steps=8, guidance=3.0, calib_conditions=[], calib_seeds=[],
                           workdir=str(tmp_path), batch_size=2, sensitivity="none", log=lambda m: None)
    conds, seeds = ["a thin upright seven", "a thick two"], [1000000, 1000001]
    _, full = count_total_flops(c.generate, conds, seeds)

    def sea_fraction():
        s = peers.SeaCacheMethod().session(c, 1.2)
        s.begin()
        try:
            return count_total_flops(c.generate, conds, seeds)[1] / full
        finally:
            s.end()
            s.close()

    before = sea_fraction()
    assert before < 1.0
    session = peers.CacheDitMethod(taylorseer=False).session(c, 0.4)
    session.begin()
    try:
        c.generate(conds, seeds)
    finally:
        session.end()
        session.close()
    assert peers.leftover_state(driver, c.module_order) == []
    assert sea_fraction() == before


def test_the_benchmarks_psnr_cap_is_the_closed_loop_scores_cap():
    """An identical image counts the same in the search's closed-loop scores and in the headline's margins."""
    from bench.compare_report import PSNR_CAP
    from cachec.evaluation import PSNR_CAP_DB

    assert PSNR_CAP == PSNR_CAP_DB == 100.0
