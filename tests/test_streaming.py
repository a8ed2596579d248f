"""Streaming calibration statistics (calibrate/streaming.py, docs/calibration-format.md "Gram sketch"):
the CountSketch, EOC group sums, sketched-vs-exact Grams on a real (tiny) calibration, memory that does not
hold trajectories, and refusal of format-1 files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cachec.calibrate import CalibrationError, calibrate, read_header
from cachec.calibrate.format import eoc_group_layout, read_tensors
from cachec.calibrate.streaming import BatchRecord, CountSketch, EOCSubset, group_sums


def test_countsketch_identity_below_dim_and_exact_bucket_map():
    x = torch.randn(3, 100)
    sk = CountSketch(100, 128, seed=0, device="cpu")
    assert sk.identity and torch.equal(sk(x), x)
    sk = CountSketch(1000, 64, seed=3, device="cpu")
    assert not sk.identity and sk.dim == 64
    # every element lands in exactly one bucket with sign ±1: R has one ±1 per column
    R = torch.stack([sk(torch.eye(1000, dtype=torch.float64)[i:i + 1])[0] for i in range(1000)], 1)  # (64, 1000)
    assert torch.equal((R != 0).sum(0), torch.ones(1000, dtype=torch.long))
    assert set(R[R != 0].tolist()) <= {-1.0, 1.0}
    counts = (R != 0).sum(1)
    assert counts.max() - counts.min() <= 1  # balanced buckets
    # deterministic in the seed, different for another seed
    again = CountSketch(1000, 64, seed=3, device="cpu")
    other = CountSketch(1000, 64, seed=4, device="cpu")
    v = torch.randn(2, 1000)
    assert torch.equal(sk(v), again(v)) and not torch.equal(sk(v), other(v))


def test_countsketch_preserves_squared_norms_relatively():
    """E||Rx||^2 = ||x||^2 with relative std <= sqrt(2/r): over 400 maps, mean within 3 standard errors and
    the spread below 1.3 sqrt(2/r). A wrong sign or bucket map (e.g. all +1) breaks the mean on these
    correlated vectors; summing without the signs doubles the spread."""
    D, r = 4096, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(D, generator=g, dtype=torch.float64) + 0.5  # a non-zero mean: signs matter
    ratios = np.array([float(CountSketch(D, r, seed=s, device="cpu")(x[None])[0].double().pow(2).sum() / x.pow(2).sum())
                       for s in range(400)])
    bound = np.sqrt(2 / r)
    assert abs(ratios.mean() - 1) < 3 * bound / np.sqrt(len(ratios))
    assert ratios.std() < 1.3 * bound


@pytest.mark.parametrize("grouping", ["channel", "token", "element"])
def test_group_sums_match_reshaped_sums(grouping):
    shapes = [(4, 3), (5,)]
    v = torch.randn(2, 17, dtype=torch.float64)
    layout = eoc_group_layout(shapes, grouping)
    got = group_sums(v, layout, grouping)
    a = v[:, :12].reshape(2, 4, 3)
    b = v[:, 12:]
    if grouping == "channel":
        want = torch.cat([a.sum(1), b], 1)
    elif grouping == "token":
        want = torch.cat([a.sum(2), b.sum(1, keepdim=True)], 1)
    else:
        want = v
    assert torch.allclose(got, want, rtol=1e-14, atol=0)
    assert [bs for bs, _, _ in layout] == {"channel": [(1, 3), (5,)], "token": [(4, 1), (1,)],
                                          "element": [(4, 3), (5,)]}[grouping]


def test_batch_record_holds_no_trajectory():
    """The per-batch buffers are the sketches (S × r), a K-step window of raw outputs and group sums: never
    (S × D) per unit."""
    S, K, D, r, n = 20, 2, 5000, 64, 3
    rec = BatchRecord(S, K, "channel", sketch_dim=r, eoc_sample=10)
    rec.reset(n, 0)
    for s in range(S):
        rec.push(0, 0, s, torch.randn(n, D), [(50, 100)])
    assert tuple(rec.y[0][0].shape) == (n, S, r)
    assert tuple(rec.window[0][0].shape) == (n, K, 10 * 100)  # 10 of the 50 tokens, every channel
    assert tuple(rec.prior[0].shape) == (S, 100) and tuple(rec.m[0].shape) == (2, S, K, 100)
    held = sum(t.numel() for t in [rec.y[0][0], rec.window[0][0], rec.prior[0], rec.q[0], rec.m[0]])
    assert held < 0.2 * n * S * D


@pytest.mark.parametrize("grouping", ["channel", "token"])
def test_eoc_subset_is_exact_for_small_groups_and_unbiased_for_large(grouping):
    shapes = [(400, 6)] if grouping == "channel" else [(6, 400)]
    assert EOCSubset(shapes, grouping, 400, 0, "cpu").index is None  # every group fits: exact
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2400, generator=g, dtype=torch.float64) + torch.linspace(0, 3, 2400, dtype=torch.float64)
    layout = eoc_group_layout(shapes, grouping)
    full = group_sums(x, layout, grouping)[0]
    subsets = [EOCSubset(shapes, grouping, 40, seed, "cpu") for seed in range(300)]
    est = torch.stack([sub.sums(sub.select(x), grouping)[0] for sub in subsets])
    sub = subsets[0]
    assert sub.index.numel() == 6 * 40 and len(set(sub.index.tolist())) == 240
    # unbiased: the mean over 300 subsets within 4 standard errors of the full sum
    se = est.std(0) / 300 ** 0.5
    assert ((est.mean(0) - full).abs() < 4 * se + 1e-9).all()
    # the spread is that of sampling 40 of 400 elements without replacement (x 400 / 40): a wrong scale
    # factor or a subset that is not random breaks it
    elems = x[0].reshape(400, 6).T if grouping == "channel" else x[0].reshape(6, 400)
    sigma = elems.std(1, unbiased=False)
    theory = 400 * sigma * ((400 - 40) / (40 * 399)) ** 0.5
    ratio = est.std(0) / theory
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio


def _reuse_errors(gram):
    """(B, 2, S-1): ||F_s - F_{s-1}||^2 summed per split and branch, from a Gram (B, 2, S, S)."""
    d = np.diagonal(gram, axis1=2, axis2=3)
    off = np.diagonal(gram, offset=1, axis1=2, axis2=3)
    return d[..., 1:] - 2 * off + d[..., :-1]


def test_sketched_gram_matches_exact_on_a_calibration(tiny_digits, tmp_path):
    """Tiny digits units have D = 64 tokens × 32 channels = 2048 elements: sketch them to r = 512 and compare
    every reuse error and a two-anchor extrapolation error with the exact calibration of the same samples.
    Expected relative error per entry ~ sqrt(2/r) / sqrt(samples) (6.3 % / 2); the bound 30 % fails for a
    broken sketch (a wrong map gives O(1) errors on the small one-step differences)."""
    kw = dict(steps=6, guidance=3.0, seed=3, batch_size=2, sensitivity="none", progress=False, eoc_sample=0)
    exact = calibrate(tiny_digits, [0, 1, 2, 3], output=tmp_path / "exact.safetensors", sketch_dim=0, **kw)
    sk = calibrate(tiny_digits, [0, 1, 2, 3], output=tmp_path / "sk.safetensors", sketch_dim=512, **kw)
    he, hs = read_header(exact), read_header(sk)
    assert he["gram_sketch"]["method"] == "exact" and hs["gram_sketch"] == {"method": "countsketch", "dim": 512, "seed": 0}
    assert all(u["sketch_dim"] == 512 < u["numel"] for u in hs["units"])
    te, ts = read_tensors(exact), read_tensors(sk)
    rels = []
    for u in he["units"]:
        ge, gs = te[f"gram/{u['name']}"], ts[f"gram/{u['name']}"]
        re_, rs = _reuse_errors(ge), _reuse_errors(gs)
        rels.append(np.abs(rs - re_) / re_)
        # linear extrapolation 2 F_{s-1} - F_{s-2}: c = e_s - 2 e_{s-1} + e_{s-2}
        for s in range(2, 6):
            c = np.zeros(6)
            c[s], c[s - 1], c[s - 2] = 1, -2, 1
            e = np.einsum("s,bkst,t->bk", c, ge, c)
            g = np.einsum("s,bkst,t->bk", c, gs, c)
            rels.append((np.abs(g - e) / e).ravel())
        # EOC sums do not depend on the sketch: bitwise equal
        for key in ("prior_sum", "eoc_q", "eoc_m"):
            assert np.array_equal(te[f"{key}/{u['name']}"], ts[f"{key}/{u['name']}"])
    rel = np.concatenate([r.ravel() for r in rels])
    assert rel.max() < 0.3 and np.median(rel) < 0.08


def test_format_1_files_are_refused_with_the_remedy(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "old.safetensors"
    save_file({"x": np.zeros(1)}, str(path), metadata={"cachec_calibration": json.dumps({"format": "cachec-calibration",
                                                                                         "format_version": 1})})
    with pytest.raises(CalibrationError, match=r"format version 1.*re-run cachec calibrate"):
        read_header(path)
