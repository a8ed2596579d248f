"""Quality modules: pixel metrics (cachec.metrics), the digit classifier (cachec.classifier), Fréchet distance
(cachec.frechet), reports (cachec.report) and sample-set files (cachec.samples)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from cachec import classifier, frechet, metrics, report, samples
from cachec.data import split_digits, to_model_space


@pytest.fixture(scope="module")
def held_out():
    """200 held-out real digits (20 per class) as (N, 1, 32, 32) in [0, 1], with their labels."""
    _, (images, labels) = split_digits()
    idx = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)])
    x = ((to_model_space(images[idx]) + 1.0) / 2.0).clamp(0.0, 1.0)
    return x, torch.from_numpy(labels[idx])


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g) * 0.8  # leaves room to add 0.1


# ------------------------------------------------------------------------------------------ PSNR / SSIM


def test_identical_sets_psnr_inf_ssim_one():
    x = _images()
    p, s = metrics.psnr(x, x.clone()), metrics.ssim(x, x.clone())
    assert p.shape == (3,) and s.shape == (3,)
    assert torch.isinf(p).all() and (p > 0).all()
    assert torch.equal(s, torch.ones(3, dtype=torch.float64))


def test_psnr_of_known_patch_perturbation():
    ref = torch.full((2, 1, 32, 32), 0.25)
    cand = ref.clone()
    cand[1, :, 8:12, 8:12] += 0.1
    p = metrics.psnr(cand, ref)
    mse = 16 * 0.01 / 1024  # 16 pixels off by 0.1 out of 1024
    assert math.isinf(p[0].item())
    assert p[1].item() == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-5)  # 28.0618 dB
    # data_range scales as 20·log10
    assert metrics.psnr(cand * 255, ref * 255, data_range=255.0)[1].item() == pytest.approx(p[1].item(), abs=1e-4)


def _naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Direct per-window SSIM (Wang et al. 2004) of two 2-d images: loops over every valid 11×11 window."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_symmetric_below_one_and_matches_direct_windows():
    ref = _images(2, seed=1)
    cand = ref.clone()
    cand[0, :, 8:12, 8:12] += 0.1
    cand[1] = (cand[1] + 0.05 * torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    s_ab, s_ba = metrics.ssim(cand, ref), metrics.ssim(ref, cand)
    assert torch.equal(s_ab, s_ba)
    assert (s_ab < 1).all() and (s_ab > 0).all()
    for k in range(2):
        assert s_ab[k].item() == pytest.approx(_naive_ssim(cand[k, 0].double().numpy(), ref[k, 0].double().numpy()), abs=1e-10)


def test_metric_input_errors():
    x = _images()
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(x, x[:2])
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(TypeError):
        metrics.ssim(x.numpy(), x)


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_accuracy_on_held_out_digits(held_out):
    x, labels = held_out
    pred, feats = classifier.classify(x)
    assert pred.dtype == torch.int64 and pred.shape == (200,)
    assert feats.dtype == torch.float32 and feats.shape == (200, 256)
    assert (pred == labels).double().mean().item() >= 0.99
    # 28×28 input (already cropped) gives the same answer
    pred28, feats28 = classifier.classify(x[:, :, 2:30, 2:30])
    assert torch.equal(pred28, pred) and torch.allclose(feats28, feats)


def test_classifier_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "digit_recognizer" else real_find_spec(name, *a)
    )
    classifier.load_classifier.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install --no-deps digit-recognizer-py"):
            classifier.load_classifier()
    finally:
        classifier.load_classifier.cache_clear()


def test_classify_rejects_model_space_images(held_out):
    x, _ = held_out
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier.classify(x * 2 - 1)


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_self_zero_and_noise_large(held_out):
    real = classifier.reference_features()
    assert real.shape == (500, 256)
    assert frechet.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    _, noise_feats = classifier.classify(torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    _, digit_feats = classifier.classify(held_out[0])
    d_noise = frechet.frechet_distance(noise_feats, real)
    d_digits = frechet.frechet_distance(digit_feats, real)  # subset of the same digits: small
    assert d_noise > 1000 and d_noise > 20 * d_digits
    # the default eigen route and the classic scipy.linalg.sqrtm route agree: two LAPACK algorithms on
    # singular covariances (dead ReLU features) differ by ~5e-7 relative, more on other CPUs; a biased
    # covariance or a missing clamp/transpose changes the distance by > 1e-3
    assert frechet.frechet_distance(noise_feats, real, method="sqrtm") == pytest.approx(d_noise, rel=1e-4)
    assert frechet.frechet_distance(digit_feats, real, method="sqrtm") == pytest.approx(d_digits, rel=1e-4)
    # symmetric
    assert frechet.frechet_distance(real, noise_feats) == pytest.approx(d_noise, rel=1e-7)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet.frechet_distance(real, real[:, :10])
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.frechet_distance(real[:1], real)


# ------------------------------------------------------------------------------------------ evaluate / table


def test_evaluate_report_and_table(held_out):
    x, labels = held_out
    ref, lab = x[:20], labels[:20]
    same = report.evaluate(ref, ref.clone(), lab, flops_per_image=123_000_000, wall_s=1.5, name="uncached")
    json.dumps(same, allow_nan=False)  # JSON-ready: inf written as "inf"
    assert same["n_images"] == 20 and same["n_identical"] == 20
    assert same["psnr_db"]["mean"] == "inf" and same["psnr_db"]["per_image"] == ["inf"] * 20
    assert same["psnr_db"]["std"] is None
    assert same["ssim"]["mean"] == 1.0 and same["ssim"]["std"] == 0.0
    assert same["class_accuracy"]["candidate"] == same["class_accuracy"]["reference"] >= 0.95
    assert same["class_agreement"] == 1.0
    fd = same["frechet_distance"]
    assert fd["candidate"] == fd["reference"] and fd["candidate_vs_reference"] == pytest.approx(0.0, abs=1e-6)
    assert fd["real_set_size"] == 500 and "Fréchet" in fd["name"]
    assert same["flops_per_image"] == 123_000_000 and same["wall_s"] == 1.5

    cand = ref.clone()
    cand[0, :, 8:12, 8:12] = (cand[0, :, 8:12, 8:12] + 0.1).clamp(0, 1)
    cand[1:] = (cand[1:] + 0.02).clamp(0, 1)
    diff = report.evaluate(cand, ref, lab, name="cached")
    assert diff["n_identical"] == 0
    assert diff["psnr_db"]["per_image"] == pytest.approx(metrics.psnr(cand, ref).tolist())
    assert diff["ssim"]["mean"] < 1.0 and diff["psnr_db"]["std"] > 0
    assert diff["psnr_of_mean_mse_db"] == pytest.approx(10 * math.log10(1 / diff["mse_mean"]))

    table = report.format_table([same, diff])
    lines = table.splitlines()
    assert len(lines) == 4 and "PSNR dB" in lines[0] and "Fréchet" in lines[0]
    assert lines[2].startswith("uncached") and " inf " in lines[2] and "0.123" in lines[2]
    assert lines[3].startswith("cached") and "±" in lines[3]
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert report.format_table(diff).splitlines()[2].startswith("cached")


def test_evaluate_input_errors(held_out):
    x, labels = held_out
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        report.evaluate(x[:4] * 2 - 1, x[:4], labels[:4])
    with pytest.raises(ValueError, match="labels must have shape"):
        report.evaluate(x[:4], x[:4], labels[:3])
    with pytest.raises(ValueError, match="0..9"):
        report.evaluate(x[:4], x[:4], torch.tensor([0, 1, 2, 10]))


# ------------------------------------------------------------------------------------------ sample files


def _meta(**kw):
    meta = {"model": "digits-flow", "steps": 25, "guidance": 3.0, "flops_per_image": 2_000_000, "wall_s": 0.5}
    meta.update(kw)
    return meta


def test_save_load_roundtrip_is_atomic(tmp_path, held_out):
    x, labels = held_out
    seeds = torch.arange(100, 120)
    path = tmp_path / "sub" / "ref.safetensors"
    samples.save_samples(path, x[:20], labels[:20], seeds, _meta(wall_s=float("inf"), extra="kept"))
    assert os.listdir(path.parent) == ["ref.safetensors"]  # no temporary file left behind
    s = samples.load_samples(path)
    assert torch.equal(s.images, x[:20]) and torch.equal(s.labels, labels[:20]) and torch.equal(s.seeds, seeds)
    assert s.labels.dtype == s.seeds.dtype == torch.int64
    assert s.meta == _meta(wall_s="inf", extra="kept")
    with pytest.raises(ValueError, match="lacks the keys"):
        samples.save_samples(path, x[:2], labels[:2], seeds[:2], {"model": "m"})
    with pytest.raises(ValueError, match="int64"):
        samples.save_samples(path, x[:2], labels[:2], seeds[:3], _meta())
    with pytest.raises(ValueError, match="not a readable safetensors"):
        (tmp_path / "junk.safetensors").write_bytes(b"not a file")
        samples.load_samples(tmp_path / "junk.safetensors")


def test_compare_sample_files(tmp_path, held_out):
    x, labels = held_out
    x, lab, seeds = x[::20], labels[::20], torch.arange(10)  # one digit per class
    cand_img = (x + 0.01).clamp(0, 1)
    samples.save_samples(tmp_path / "ref.safetensors", x, lab, seeds, _meta(flops_per_image=4_000_000))
    samples.save_samples(tmp_path / "cand.safetensors", cand_img, lab, seeds, _meta(flops_per_image=1_000_000, wall_s=0.2))
    res = report.compare_sample_files(tmp_path / "cand.safetensors", tmp_path / "ref.safetensors", name="fbc")
    assert res["name"] == "fbc" and res["n_images"] == 10
    assert res["flops_per_image"] == 1_000_000 and res["wall_s"] == 0.2 and res["flops_fraction"] == 0.25
    assert res["psnr_db"]["per_image"] == pytest.approx(metrics.psnr(cand_img, x).tolist())
    json.dumps(res, allow_nan=False)

    samples.save_samples(tmp_path / "bad_seeds.safetensors", cand_img, lab, seeds + (seeds == 3), _meta())
    with pytest.raises(ValueError, match=r"seeds .* first at index 3"):
        report.compare_sample_files(tmp_path / "bad_seeds.safetensors", tmp_path / "ref.safetensors")
    samples.save_samples(tmp_path / "bad_labels.safetensors", cand_img, lab.flip(0), seeds, _meta())
    with pytest.raises(ValueError, match="labels"):
        report.compare_sample_files(tmp_path / "bad_labels.safetensors", tmp_path / "ref.safetensors")
    samples.save_samples(tmp_path / "short.safetensors", cand_img[:5], lab[:5], seeds[:5], _meta())
    with pytest.raises(ValueError, match="lengths 5 vs 10"):
        report.compare_sample_files(tmp_path / "short.safetensors", tmp_path / "ref.safetensors")
    samples.save_samples(tmp_path / "other.safetensors", cand_img, lab, seeds, _meta(model="digits-ddim"))
    with pytest.raises(ValueError, match="model differs"):
        report.compare_sample_files(tmp_path / "other.safetensors", tmp_path / "ref.safetensors")
