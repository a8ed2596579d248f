"""Tests of cachec.calibrate: exact statistics, shards/merge, torchrun, resume, sensitivity, errors.

The reference statistics are recomputed here from features captured with plain ``register_forward_hook``
hooks on the unit modules (not through cachec's hook core), batch by batch with the same batches, so the
recorded features are bit-identical and the streamed float64 sums must agree to rounding (1e-10).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cachec.calibrate import (
    CalibrationError, calibrate, merge, parse_classes, parse_shard, partial_paths, read_header, read_prompts, show,
)
from cachec.calibrate.format import HEADER_KEYS
from cachec.calibrate.recorder import StepTracker
from cachec.runtime.units import find_units


def _load(path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-300)
    return float(np.abs(a - b).max() / scale)


# ---- independent feature capture ---------------------------------------------------------------------
def _capture(driver, conds, seeds, steps, guidance, cfg, batch_size):
    """F[u] float64 (N, B, S, D) from plain forward hooks; batches as calibrate cuts them."""
    tr = driver.transformer
    units = find_units(tr)
    mods = dict(tr.named_modules())
    calls = {u.name: [] for u in units}
    hooks = [mods[u.name].register_forward_hook(lambda m, a, o, n=u.name: calls[n].append(o.detach().clone()))
             for u in units]
    feats = {u.name: [] for u in units}
    try:
        for start in range(0, len(conds), batch_size):
            c, s = conds[start:start + batch_size], seeds[start:start + batch_size]
            n = len(c)
            for v in calls.values():
                v.clear()
            driver.generate(c, s, steps=steps, guidance=guidance, cfg=cfg)
            for name, outs in calls.items():
                x = [o.reshape(o.shape[0], -1).double() for o in outs]
                if cfg == "split" and guidance > 1:  # calls alternate cond, uncond
                    per_step = [torch.stack([x[2 * i], x[2 * i + 1]], 1) for i in range(steps)]
                elif guidance > 1:  # batched, conditional half first (DigitsPipeline)
                    per_step = [torch.stack([xi[:n], xi[n:]], 1) for xi in x]
                else:
                    per_step = [xi[:, None] for xi in x]
                feats[name].append(torch.stack(per_step, 2))  # (n, B, S, D)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in feats.items()}


def _grouped(v, shapes, grouping):
    """Sum the last axis of v (a unit's flattened elements) into EOC prior groups, part by part."""
    out, off = [], 0
    for sh in shapes:
        n = int(np.prod(sh))
        part = v[..., off:off + n].reshape(*v.shape[:-1], *sh)
        if grouping == "channel":
            part = part.reshape(*v.shape[:-1], -1, sh[-1]).sum(-2)
        elif grouping == "token":
            part = part.sum(-1).reshape(*v.shape[:-1], -1)
        else:
            part = part.reshape(*v.shape[:-1], -1)
        out.append(part)
        off += n
    return np.concatenate(out, -1)


def _direct_stats(F, K, shapes=None, grouping="element"):
    """Statistics of docs/calibration-format.md computed directly from F (N, B, S, D) float64 (the EOC
    tensors summed into ``grouping``'s groups of the parts ``shapes``)."""
    N, B, S, D = F.shape
    split = np.arange(N) % 2
    gram = np.zeros((B, 2, S, S))
    q = np.zeros((2, S, D))
    m = np.zeros((2, S, K, D))
    for k in (0, 1):
        Fk = F[split == k]
        gram[:, k] = np.einsum("nbsd,nbtd->bst", Fk, Fk)
        q[k] = (Fk**2).sum((0, 1))
        for j in range(1, K + 1):
            if j < S:
                m[k, j:, j - 1] = ((Fk[:, :, j:] - Fk[:, :, :-j]) * Fk[:, :, :-j]).sum((0, 1))
    prior = F.sum((0, 1))
    rel = np.zeros(S)
    cos = np.zeros(S)
    for s in range(1, S):
        d = F[:, :, s] - F[:, :, s - 1]
        rel[s] = (np.linalg.norm(d, axis=-1) / np.linalg.norm(F[:, :, s], axis=-1)).sum()
        if s >= 2:
            e = F[:, :, s - 1] - F[:, :, s - 2]
            cos[s] = ((d * e).sum(-1) / (np.linalg.norm(d, axis=-1) * np.linalg.norm(e, axis=-1))).sum()
    if grouping != "element":
        prior, q, m = (_grouped(a, shapes, grouping) for a in (prior, q, m))
    return gram, prior, q, m, rel, cos


# ---- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,guidance,grouping", [("batched", 3.0, "channel"), ("split", 3.0, "token"),
                                                   ("batched", 1.0, "element")])
def test_streamed_statistics_equal_direct(tiny_digits, tmp_path, cfg, guidance, grouping):
    conds, steps, bs, K = [0, 1, 2, 3, 4], 5, 2, 2
    out = calibrate(tiny_digits, conds, output=tmp_path / "c.safetensors", steps=steps, guidance=guidance, seed=7,
                    batch_size=bs, cfg=cfg, sensitivity="none", progress=False, eoc_lags=K, eoc_prior=grouping)
    h = read_header(out)
    t = _load(out)
    B = 1 if guidance <= 1 else 2
    assert tuple(h) == HEADER_KEYS
    assert h["eoc_prior"] == grouping and h["gram_sketch"]["method"] == "exact"
    assert h["guidance"] == {"mode": "none" if B == 1 else cfg, "scale": guidance, "branches": B}
    assert h["samples"] == [3, 2] and h["prior_count"] == 5 * B and h["goc_count"] == 5 * B
    assert h["steps"] == steps and len(h["timesteps"]) == steps and h["shards"] == []
    assert [u["name"] for u in h["units"]] == [u.name for u in find_units(tiny_digits.transformer)]
    F = _capture(tiny_digits, conds, [7 + n for n in range(5)], steps, guidance, cfg, bs)
    for i, u in enumerate(h["units"]):
        Fu = F[u["name"]]
        assert Fu.shape[-1] == u["numel"] and Fu.shape[1] == B
        assert u["sketch_dim"] == u["numel"]  # small units: exact Grams
        gram, prior, q, m, rel, cos = _direct_stats(Fu, K, u["shapes"], grouping)
        assert prior.shape[-1] == u["eoc_groups"]
        assert _rel(t[f"gram/{u['name']}"], gram) < 1e-10
        assert _rel(t[f"prior_sum/{u['name']}"], prior) < 1e-10
        assert _rel(t[f"eoc_q/{u['name']}"], q) < 1e-10
        assert _rel(t[f"eoc_m/{u['name']}"], m) < 1e-10
        assert _rel(t["goc_rel_sum"][i], rel) < 1e-10
        assert _rel(t["goc_cos_sum"][i], cos) < 1e-10
        assert t[f"eoc_m/{u['name']}"][:, 0].max() == 0 and t[f"eoc_m/{u['name']}"][:, 1, 1].max() == 0
    assert all(v.dtype == np.float64 for v in t.values())
    assert t["sensitivity"].shape == (len(h["units"]), steps) and (t["sensitivity"] == 1).all()
    assert (t["unit_flops"] > 0).all() and (t["unit_latency_s"] > 0).all()
    assert h["flops"]["full_step"] > t["unit_flops"].sum() > 0.5 * h["flops"]["full_step"]


def test_flops_per_sample_branch(tiny_digits, tmp_path):
    """unit_flops/full_step are for ONE sample of ONE branch: compare with a 1-row forward."""
    from cachec.runtime.flops import count_flops, relative_module_flops

    out = calibrate(tiny_digits, [0, 1, 2], output=tmp_path / "c.safetensors", steps=2, batch_size=3,
                    sensitivity="none", progress=False)
    h, t = read_header(out), _load(out)
    tr = tiny_digits.transformer
    with torch.no_grad():
        _, total, per = count_flops(tr, hidden_states=torch.randn(1, 1, 32, 32), timestep=torch.tensor([500.0]),
                                    class_labels=torch.tensor([1]))
    rel = relative_module_flops(per, tr)
    assert h["flops"]["full_step"] == pytest.approx(total)
    for i, u in enumerate(h["units"]):
        assert t["unit_flops"][i] == pytest.approx(rel[u["name"]])
    assert h["flops"]["fixed_step"] == pytest.approx(total - t["unit_flops"].sum())


def test_all_tiny_pipelines(tiny_pipelines, tiny_digits_ddim, tmp_path):
    from cachec.planner.calibration import load_calibration

    drivers = dict(tiny_pipelines, digits_ddim=tiny_digits_ddim)
    expect_b = {"dit": 2, "pixart": 2, "sd3": 2, "flux": 1, "digits_ddim": 2}
    for name, driver in drivers.items():
        conds = [1, 2, 3] if driver.condition_kind == "class" else ["a red car", "a blue sky", "a small dog"]
        out = calibrate(driver, conds, output=tmp_path / f"{name}.safetensors", steps=3, batch_size=2,
                        sensitivity="factored" if name == "sd3" else "none", sensitivity_samples=1, progress=False)
        h = read_header(out)
        assert [u["name"] for u in h["units"]] == [u.name for u in find_units(driver.transformer)], name
        assert h["guidance"]["branches"] == expect_b[name], name
        assert h["steps"] == 3 and h["samples"] == [2, 1]
        cal = load_calibration(str(out))  # the planner's reader accepts it
        assert cal.gram.shape[1:] == (expect_b[name], 2, 3, 3)
        assert np.isfinite(cal.sensitivity).all()
        assert all(u["numel"] > 0 for u in h["units"])


# ---- shards, merge, torchrun ----------------------------------------------------------------------------
def _assert_same(a_path, b_path, exact=False, skip=("unit_latency_s",)):
    a, b = _load(a_path), _load(b_path)
    assert set(a) == set(b)
    for k in a:
        if k in skip:
            continue
        if exact:
            assert np.array_equal(a[k], b[k]), k
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12 * max(np.abs(b[k]).max(), 1.0), err_msg=k)


def test_shards_merge_equal_single_run(tiny_digits, tmp_path):
    kw = dict(samples_per_condition=2, steps=4, batch_size=2, seed=3, sensitivity="factored", sensitivity_samples=2,
              progress=False)
    conds = [0, 5, 9]
    single = calibrate(tiny_digits, conds, output=tmp_path / "single.safetensors", **kw)
    s0 = calibrate(tiny_digits, conds, output=tmp_path / "s0.safetensors", shard=(0, 2), **kw)
    s1 = calibrate(tiny_digits, conds, output=tmp_path / "s1.safetensors", shard="1/2", **kw)
    h0, h1 = read_header(s0), read_header(s1)
    assert h0["shards"] == ["0/2"] and h1["shards"] == ["1/2"]
    assert h0["samples"] == [2, 2] and h1["samples"] == [1, 1]  # batches {0, 2} and {1}
    assert h1["sensitivity"]["samples"] == 0 and h0["sensitivity"]["samples"] == 2
    merged = merge([s1, s0], tmp_path / "merged.safetensors")
    hm, hs = read_header(merged), read_header(single)
    assert hm["samples"] == hs["samples"] and hm["prior_count"] == hs["prior_count"]
    assert hm["shards"] == ["0/2", "1/2"] and hm["sensitivity"]["samples"] == 2
    for key in ("units", "timesteps", "flops", "guidance", "conditions"):
        assert hm[key] == hs[key]
    _assert_same(merged, single)
    assert np.array_equal(_load(merged)["sensitivity"], _load(single)["sensitivity"])

    with pytest.raises(CalibrationError, match="shard 0/2 is in both"):
        merge([s0, s0], tmp_path / "x.safetensors")
    with pytest.raises(CalibrationError, match="complete"):
        merge([single, s0], tmp_path / "x.safetensors")
    other = calibrate(tiny_digits, conds, output=tmp_path / "o1.safetensors", shard=(1, 2), **dict(kw, seed=4))
    with pytest.raises(CalibrationError, match="seed differ"):
        merge([s0, other], tmp_path / "x.safetensors")
    other = calibrate(tiny_digits, conds, output=tmp_path / "o2.safetensors", shard=(1, 2), **dict(kw, steps=3))
    with pytest.raises(CalibrationError, match="steps differ"):
        merge([s0, other], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="at least two"):
        merge([s0], tmp_path / "x.safetensors")


def test_torchrun_two_ranks_equal_single_run(tiny_digits, tmp_path):
    model = tiny_digits.name  # a reference-style folder written by the fixture
    args = ["--model", model, "--classes", "0-4", "--steps", "3", "--batch-size", "1", "--sensitivity", "factored",
            "--sensitivity-samples", "2", "--no-progress"]
    out = tmp_path / "dist.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the single run's thread count: same kernels
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cachec.calibrate",
         *args, "-o", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = calibrate(tiny_digits, [0, 1, 2, 3, 4], output=tmp_path / "single.safetensors", steps=3, batch_size=1,
                       sensitivity="factored", sensitivity_samples=2, progress=False)
    hd, hs = read_header(out), read_header(single)
    assert hd["samples"] == hs["samples"] == [3, 2] and hd["shards"] == []
    assert hd["sensitivity"]["samples"] == 2
    _assert_same(out, single)
    assert not partial_paths(out, 0, 2)[0].exists() and not partial_paths(out, 1, 2)[0].exists()


# ---- resume -------------------------------------------------------------------------------------------
class _Boom(RuntimeError):
    pass


def _fail_after(monkeypatch, driver, n_ok):
    real = driver.generate
    count = [0]

    def generate(*a, **k):
        count[0] += 1
        if count[0] > n_ok:
            raise _Boom(f"interrupted at call {count[0]}")
        return real(*a, **k)

    monkeypatch.setattr(driver, "generate", generate)


@pytest.mark.parametrize("n_ok,every,overlap", [(2, 0.0, False), (2, 1e9, False), (3, 0.0, True), (6, 0.0, False)])
def test_resume_is_bit_identical(tiny_digits, tmp_path, monkeypatch, n_ok, every, overlap):
    """Interrupted after 2-3 batches (checkpoint each batch / only on the exception; folds inline or on the
    worker thread) or during the sensitivity probes (4 batches + reference run + 1 probe), then resumed."""
    kw = dict(steps=4, batch_size=2, seed=1, sensitivity="full", sensitivity_samples=2, progress=False)
    conds = [0, 1, 2, 3, 4, 5, 6]
    clean = calibrate(tiny_digits, conds, output=tmp_path / "clean.safetensors", **kw)
    out = tmp_path / "resumed.safetensors"
    _fail_after(monkeypatch, tiny_digits, n_ok)
    with pytest.raises(_Boom):
        calibrate(tiny_digits, conds, output=out, checkpoint_every=every, overlap=overlap, **kw)
    assert partial_paths(out)[0].exists() and not out.exists()
    monkeypatch.undo()
    calls = [0]
    real = tiny_digits.generate
    monkeypatch.setattr(tiny_digits, "generate", lambda *a, **k: (calls.__setitem__(0, calls[0] + 1), real(*a, **k))[1])
    calibrate(tiny_digits, conds, output=out, checkpoint_every=every, overlap=overlap, **kw)
    n_batches, n_probes = 4, 3 * 4
    if n_ok < n_batches:
        assert calls[0] == n_batches - n_ok + 1 + n_probes  # remaining batches + reference run + probes
    _assert_same(out, clean, exact=True)
    ha, hb = read_header(out), read_header(clean)
    for k in HEADER_KEYS:
        if k not in ("created", "sensitivity"):
            assert ha[k] == hb[k], k
    assert not partial_paths(out)[0].exists() and not partial_paths(out)[1].exists()


def test_overlapped_fold_gives_the_same_file(tiny_digits, tmp_path):
    kw = dict(steps=3, batch_size=2, seed=2, sensitivity="none", progress=False)
    a = calibrate(tiny_digits, [0, 1, 2, 3, 4], output=tmp_path / "a.safetensors", overlap=False, **kw)
    b = calibrate(tiny_digits, [0, 1, 2, 3, 4], output=tmp_path / "b.safetensors", overlap=True, **kw)
    _assert_same(a, b, exact=True)


def test_resume_refuses_other_config(tiny_digits, tmp_path, monkeypatch):
    kw = dict(steps=3, batch_size=1, sensitivity="none", progress=False, checkpoint_every=0)
    out = tmp_path / "c.safetensors"
    _fail_after(monkeypatch, tiny_digits, 1)
    with pytest.raises(_Boom):
        calibrate(tiny_digits, [0, 1, 2], output=out, seed=0, **kw)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"different configuration \(seed: 0 → 5\).*restart"):
        calibrate(tiny_digits, [0, 1, 2], output=out, seed=5, **kw)
    calibrate(tiny_digits, [0, 1, 2], output=out, seed=5, restart=True, **kw)
    assert read_header(out)["seed"] == 5 and not partial_paths(out)[0].exists()


# ---- sensitivity --------------------------------------------------------------------------------------
def test_sensitivity_full_matches_direct_perturbation(tiny_digits, tmp_path):
    steps = 4
    out = calibrate(tiny_digits, [3, 8], output=tmp_path / "c.safetensors", steps=steps, batch_size=2,
                    sensitivity="full", sensitivity_samples=2, progress=False)
    h, t = read_header(out), _load(out)
    sens = t["sensitivity"]
    U = len(h["units"])
    assert sens.shape == (U, steps) and np.isfinite(sens).all() and (sens >= 0).all()
    assert np.array_equal(sens[:, 0], sens[:, 1]) and h["sensitivity"]["samples"] == 2
    assert h["sensitivity"]["method"] == "full" and h["sensitivity"]["seconds"] > 0
    # direct: a plain forward hook replaces unit u's output at step s by its step s-1 output, full recompute
    tr, seeds = tiny_digits.transformer, [0, 1]
    mods = dict(tr.named_modules())
    for u_i, s in [(0, 2), (U - 1, 1), (1, steps - 1)]:
        name = h["units"][u_i]["name"]
        outs = []
        hk = mods[name].register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
        ref = tiny_digits.generate([3, 8], seeds, steps=steps)
        hk.remove()
        calls = [0]

        def swap(m, a, o):
            calls[0] += 1
            return outs[s - 1] if calls[0] - 1 == s else o

        hk = mods[name].register_forward_hook(swap)
        pert = tiny_digits.generate([3, 8], seeds, steps=steps)
        hk.remove()
        d = float(((pert.double() - ref.double()) ** 2).sum())
        e = float(((outs[s].double() - outs[s - 1].double()) ** 2).sum())
        assert sens[u_i, s] == pytest.approx(d / e, rel=1e-4, abs=1e-12)


def test_sensitivity_factored_and_none(tiny_digits, tmp_path):
    kw = dict(steps=5, batch_size=2, progress=False, sensitivity_samples=2)
    f = _load(calibrate(tiny_digits, [1, 2], output=tmp_path / "f.safetensors", sensitivity="factored", **kw))
    full = _load(calibrate(tiny_digits, [1, 2], output=tmp_path / "u.safetensors", sensitivity="full", **kw))
    mid = 5 // 2
    np.testing.assert_allclose(f["sensitivity"][:, mid], full["sensitivity"][:, mid], rtol=1e-12)
    assert np.array_equal(f["sensitivity"][:, 0], f["sensitivity"][:, 1]) and (f["sensitivity"] >= 0).all()
    out = calibrate(tiny_digits, [1, 2], output=tmp_path / "n.safetensors", sensitivity="none", **kw)
    assert (_load(out)["sensitivity"] == 1).all() and read_header(out)["sensitivity"]["samples"] == 0


# ---- input validation, helpers, show ----------------------------------------------------------------
def test_bad_inputs(tiny_digits, tmp_path):
    ok = dict(output=tmp_path / "c.safetensors", steps=2, progress=False, sensitivity="none")
    with pytest.raises(ValueError, match="steps must be positive"):
        calibrate(tiny_digits, [0], **dict(ok, steps=0))
    with pytest.raises(FileNotFoundError, match="output folder"):
        calibrate(tiny_digits, [0], **dict(ok, output=tmp_path / "missing" / "c.safetensors"))
    with pytest.raises(ValueError, match="no conditions"):
        calibrate(tiny_digits, [], **ok)
    with pytest.raises(ValueError, match="out of range"):
        calibrate(tiny_digits, [10], **ok)
    with pytest.raises(ValueError, match="text-conditional|not a prompt|class-conditional"):
        calibrate(tiny_digits, ["a cat"], **ok)
    with pytest.raises(ValueError, match="no batch"):
        calibrate(tiny_digits, [0], **dict(ok, shard="1/2"))
    with pytest.raises(ValueError, match="out of range"):
        calibrate(tiny_digits, [0], **dict(ok, shard=(2, 2)))
    with pytest.raises(ValueError, match="sensitivity method"):
        calibrate(tiny_digits, [0], **dict(ok, sensitivity="magic"))
    with pytest.raises(ValueError, match="batch_size"):
        calibrate(tiny_digits, [0], **dict(ok, batch_size=0))
    with pytest.raises(ValueError, match="cfg"):
        calibrate(tiny_digits, [0], **dict(ok, cfg="interleaved"))
    assert not any(tmp_path.iterdir())  # nothing written on errors


def test_split_cfg_refused_for_diffusers_pipelines(tiny_pipelines, tmp_path):
    with pytest.raises(ValueError, match="only runs batched CFG"):
        calibrate(tiny_pipelines["dit"], [1], output=tmp_path / "c.safetensors", steps=2, cfg="split",
                  sensitivity="none", progress=False)


def test_parse_helpers(tmp_path):
    assert parse_classes("0-3,7, 9") == [0, 1, 2, 3, 7, 9]
    assert parse_classes("5") == [5]
    for bad, msg in [("", "no class"), ("3-1", "reversed"), ("a", "cannot parse"), ("1,,2", "empty item"),
                     ("-1", "cannot parse|>= 0")]:
        with pytest.raises(ValueError, match=msg):
            parse_classes(bad)
    with pytest.raises(ValueError, match="out of range"):
        parse_classes("0-10", 10)
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    assert read_prompts(p) == ["a cat", "a dog"]
    p.write_text(" \n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(p)
    p.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(p)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "nope.txt")
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    with pytest.raises(ValueError, match="cannot parse shard"):
        parse_shard("1-4")


def test_step_tracker_rules(tiny_digits):
    tr = tiny_digits.transformer
    x2, x4 = torch.zeros(2, 1, 32, 32), torch.zeros(4, 1, 32, 32)
    st = StepTracker(tr, 2, cond_first=False)
    st.start_run(2)
    info = st.on_call((), dict(hidden_states=x4, timestep=torch.tensor([900.0] * 4)))
    assert (info.step, info.parts) == (0, [(1, slice(0, 2)), (0, slice(2, 4))])
    with pytest.raises(ValueError, match="second-order"):
        st.on_call((), dict(hidden_states=x4, timestep=torch.tensor([900.0] * 4)))
    st = StepTracker(tr, 2, schedule=[900.0, 500.0])
    st.start_run(2)
    assert st.on_call((), dict(hidden_states=x2, timestep=900.0)).parts == [(0, slice(0, 2))]
    assert st.on_call((), dict(hidden_states=x2, timestep=900.0)).parts == [(1, slice(0, 2))]  # split CFG
    with pytest.raises(ValueError, match="received timestep 400"):
        st.on_call((), dict(hidden_states=x2, timestep=400.0))
    st = StepTracker(tr, 1)
    st.start_run(2)
    with pytest.raises(ValueError, match="3 rows"):
        st.on_call((), dict(hidden_states=torch.zeros(3, 1, 32, 32), timestep=1.0))
    st = StepTracker(tr, 3)
    st.start_run(2)
    st.on_call((), dict(hidden_states=x2, timestep=1.0))
    with pytest.raises(ValueError, match="made 1 transformer steps but steps=3"):
        st.finish_run()


def test_show_and_size_warning(tiny_digits, tmp_path, monkeypatch):
    import cachec.calibrate.format as calformat

    monkeypatch.setattr(calformat, "WARN_BYTES", 1000)
    with pytest.warns(UserWarning, match="MB"):
        out = calibrate(tiny_digits, [0, 1], output=tmp_path / "c.safetensors", steps=3, sensitivity="none",
                        progress=False)
    text = show(out)
    for needle in ("DiTTransformer2DModel", "3 steps", "batched", "transformer_blocks.1.ff", "2 (1 fit + 1 held-out)"):
        assert needle in text
    with pytest.raises(CalibrationError, match="not a readable safetensors|no 'cachec_calibration'"):
        (tmp_path / "junk.safetensors").write_bytes(b"0" * 64)
        show(tmp_path / "junk.safetensors")
    assert math.isfinite(read_header(out)["flops"]["full_step"])


def test_probe_replay_reproduces_the_reference_exactly(tiny_pipelines, tiny_digits):
    """A probe that perturbs nothing replays steps < s from the recorded transformer outputs and must give
    the reference images bit for bit (multistep schedulers included: PixArt uses DPMSolver++)."""
    from cachec.calibrate import sensitivity as sm
    from cachec.calibrate.recorder import StepTracker, Switch, batched_cond_first
    from cachec.runtime.hooks import install

    for driver in (tiny_digits, tiny_pipelines["pixart"], tiny_pipelines["flux"]):
        conds = [1, 2] if driver.condition_kind == "class" else ["a red car", "a dog"]
        units, steps = find_units(driver.transformer), 4
        guidance = driver.default_guidance
        first = StepTracker(driver.transformer, steps, batched_cond_first(driver.pipe))
        switch = Switch()
        with install(driver.transformer, units, switch):
            feats, outputs, ref = sm.reference_run(driver, switch, first, len(units), conds, [5, 6], steps, guidance,
                                                   "batched")

            def tracker():
                t = StepTracker(driver.transformer, steps, batched_cond_first(driver.pipe), schedule=first.schedule)
                t.mode = first.mode
                return t

            for s in (1, steps - 1):
                d = sm.run_probe(driver, switch, tracker(), feats, outputs, ref, (), s, conds, [5, 6], steps, guidance,
                                 "batched")
                assert d == 0.0, (driver.name, s)
            assert sm.run_probe(driver, switch, tracker(), feats, outputs, ref, (0,), 2, conds, [5, 6], steps, guidance,
                                "batched") > 0


# ---- calibration along a plan (trajectory calibration) ----------------------------------------------
def test_along_full_plan_equals_plain_calibration_and_copies_sensitivity(tiny_digits, tmp_path):
    from cachec.runtime import full_plan

    kw = dict(steps=5, batch_size=2, seed=3, progress=False)
    base = calibrate(tiny_digits, [0, 1, 2], output=tmp_path / "base.safetensors", sensitivity="factored",
                     sensitivity_samples=2, **kw)
    along = calibrate(tiny_digits, [0, 1, 2], output=tmp_path / "along.safetensors", sensitivity="none",
                      along=full_plan(tiny_digits, steps=5), sensitivity_from=base, **kw)
    _assert_same(along, base, exact=True)  # sensitivity included: copied
    h = read_header(along)
    assert tuple(h) == HEADER_KEYS + ("along_plan",)
    assert h["along_plan"]["realised"] == 1.0 and len(h["along_plan"]["plan_sha256"]) == 64
    assert h["sensitivity"]["method"] == "factored" and len(h["sensitivity"]["copied_from"]) == 64


def test_along_skip_plan_follows_the_cached_trajectory(tiny_digits, tmp_path, monkeypatch):
    from cachec.runtime import apply, full_plan, with_actions

    steps, conds, seeds = 5, [0, 1, 2], [3, 4, 5]
    plan = with_actions(full_plan(tiny_digits, steps=steps), {"transformer_blocks.0.ff": "CC..C"},
                        {"transformer_blocks.0.ff": {2: [1.5, -0.5], 3: [1.0]}})
    with apply(tiny_digits, plan):
        cached = tiny_digits.generate(conds, seeds, steps=steps)
    plain = tiny_digits.generate(conds, seeds, steps=steps)
    images = []
    original = tiny_digits.generate

    def generate(*a, **k):
        images.append(original(*a, **k))
        return images[-1]

    monkeypatch.setattr(tiny_digits, "generate", generate)
    kw = dict(steps=steps, batch_size=3, seed=3, progress=False, sensitivity="none")
    along = calibrate(tiny_digits, conds, output=tmp_path / "along.safetensors", along=plan, **kw)
    base = calibrate(tiny_digits, conds, output=tmp_path / "base.safetensors", **kw)
    assert torch.equal(images[0], cached) and torch.equal(images[1], plain)  # shadow run == the plan's run
    a, b = _load(along), _load(base)
    ff0 = "gram/transformer_blocks.0.ff"
    assert np.array_equal(a[ff0][:, :, :3, :3], b[ff0][:, :, :3, :3])  # identical up to the first skip
    assert not np.allclose(a[ff0][:, :, 3, 3], b[ff0][:, :, 3, 3])  # step 3 sees the perturbed input of step 2
    assert (np.diagonal(a[ff0], axis1=2, axis2=3) > 0).all()  # skipped steps are recorded (shadow compute)
    last = "gram/transformer_blocks.1.ff"
    assert not np.allclose(a[last][:, :, 4, 4], b[last][:, :, 4, 4])


def test_along_rejects_mismatches(tiny_digits, tmp_path):
    import copy

    from cachec.runtime import full_plan
    from cachec.runtime.handle import PlanMismatchError

    plan = full_plan(tiny_digits, steps=4)
    with pytest.raises(ValueError, match="sensitivity"):  # measured probes need the uncached trajectory
        calibrate(tiny_digits, [0], output=tmp_path / "a.safetensors", steps=4, along=plan, sensitivity="full",
                  progress=False)
    with pytest.raises(ValueError, match="4 steps"):
        calibrate(tiny_digits, [0], output=tmp_path / "a.safetensors", steps=5, along=plan, sensitivity="none",
                  progress=False)
    other = copy.deepcopy(plan)
    other.model.fingerprint = "sha256:" + "0" * 64
    with pytest.raises(PlanMismatchError, match="other weights"):
        calibrate(tiny_digits, [0], output=tmp_path / "a.safetensors", steps=4, along=other, sensitivity="none",
                  progress=False)
    assert not (tmp_path / "a.partial.safetensors").exists()  # refused before any sampling
    base = calibrate(tiny_digits, [0], output=tmp_path / "b.safetensors", steps=4, sensitivity="none", progress=False)
    with pytest.raises(ValueError, match="other units or steps"):
        calibrate(tiny_digits, [0], output=tmp_path / "c.safetensors", steps=5, sensitivity="none",
                  sensitivity_from=base, progress=False)
    with pytest.raises(ValueError, match="copies the sensitivity"):
        calibrate(tiny_digits, [0], output=tmp_path / "c.safetensors", steps=4, sensitivity="full",
                  sensitivity_from=base, progress=False)


def test_along_shards_merge_only_when_they_followed_the_same_plan(tiny_digits, tmp_path):
    from cachec.runtime import full_plan, with_actions

    full = full_plan(tiny_digits, steps=4)
    a = with_actions(full, {"transformer_blocks.0.ff": "CC.C"})
    b = with_actions(full, {"transformer_blocks.1.ff": "CC.C"})
    kw = dict(steps=4, batch_size=1, sensitivity="none", progress=False)
    s0 = calibrate(tiny_digits, [0, 1], output=tmp_path / "s0.safetensors", shard="0/2", along=a, **kw)
    s1 = calibrate(tiny_digits, [0, 1], output=tmp_path / "s1.safetensors", shard="1/2", along=a, **kw)
    s1b = calibrate(tiny_digits, [0, 1], output=tmp_path / "s1b.safetensors", shard="1/2", along=b, **kw)
    whole = calibrate(tiny_digits, [0, 1], output=tmp_path / "whole.safetensors", along=a, **kw)
    merged = merge([s0, s1], tmp_path / "m.safetensors")
    _assert_same(merged, whole)
    assert read_header(merged)["along_plan"] == read_header(whole)["along_plan"]
    with pytest.raises(CalibrationError, match="along_plan"):
        merge([s0, s1b], tmp_path / "bad.safetensors")
