"""The prompt-conditioned reference model ``digits-mmdit``: its prompt language, the measured attributes,
its sampling loop and the whole CLI chain on it from new processes (calibrate on prompts → plan → run →
eval, the 100 % plan bitwise, attribute adherence in the report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cachec.attributes import adherence, bins, slant, thickness
from cachec.data import split_digits
from cachec.digit_prompts import CLASS_WORDS, SLANT, THICKNESS, compose, make_tokenizer, parse, prompt_set
from cachec.shipped import PLANS_DIR


def test_grammar_round_trip_and_refusals():
    for d in range(10):
        for t in (None, 0, 1, 2):
            for s in (None, 0, 1, 2):
                for first in (False, True):
                    assert parse(compose(d, t, s, slant_first=first)) == (d, t, s)
    for bad in ("", "seven a", "a seven", "a purple seven", "a thick thin seven", "thick seven", "a thick 7"):
        with pytest.raises(ValueError):
            parse(bad)


def test_prompt_sets_disjoint_and_shipped_files_match():
    cal, held = prompt_set("calibration"), prompt_set("held-out")
    assert len(cal) == len(held) == 30 and not set(cal) & set(held)
    for name, prompts in (("calibration", cal), ("held-out", held)):
        assert sorted(parse(p)[0] for p in prompts) == sorted(list(range(10)) * 3)
        text = (PLANS_DIR / f"digits-mmdit-prompts-{name}.txt").read_text().split("\n")
        assert [p for p in text if p] == prompts
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_set("train")


def test_tokenizer_is_word_level_with_pooling_eos():
    tok = make_tokenizer()
    ids = tok(["a thick upright seven", ""], padding="max_length", max_length=8).input_ids
    assert ids[0][:6] == [tok.bos_token_id, *tok.convert_tokens_to_ids(["a", "thick", "upright", "seven"]), tok.eos_token_id]
    assert ids[1][:2] == [tok.bos_token_id, tok.eos_token_id] and tok.eos_token_id != 2  # CLIP's legacy argmax pooling


def test_attribute_bins_are_terciles_and_respond_to_the_image():
    (x, y), (hx, hy) = split_digits()
    b = bins(x.astype(np.float32) / 255, y)
    for name in ("thickness", "slant"):
        for c in range(10):
            frac = np.bincount(b[name][y == c], minlength=3) / (y == c).sum()
            assert np.all(np.abs(frac - 1 / 3) < 0.02), (name, c, frac)  # ties in the discrete widths
    img = hx[:50].astype(np.float32) / 255
    # thicker strokes: a 3x3 max filter widens every stroke
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    dil = np.max([pad[:, i:i + 28, j:j + 28] for i in range(3) for j in range(3)], axis=0)
    assert np.all(thickness(dil) > thickness(img))
    # shear the rows: row r moves (14 - r) // 4 pixels right, so the top leans right
    sheared = np.stack([np.stack([np.roll(im[r], (14 - r) // 4) for r in range(28)]) for im in img])
    assert np.mean(slant(sheared) > slant(img)) > 0.95
    prompts = [compose(int(c), int(t), int(s)) for c, t, s in zip(hy[:50], bins(img, hy[:50])["thickness"],
                                                                 bins(img, hy[:50])["slant"])]
    a = adherence(torch.from_numpy(img)[:, None], [parse(p) for p in prompts])
    assert a["thickness"] == a["slant"] == a["both"] == 1.0 and a["chance"]["both"] == pytest.approx(1 / 9)
    assert THICKNESS[0] == "thin" and SLANT[2] == "right-leaning"
    # generated images are 32x32 (the digit padded by 2 px): the bins do not depend on the padding
    padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))
    for name in ("thickness", "slant"):
        assert np.array_equal(bins(padded, hy[:50])[name], bins(img, hy[:50])[name])


@pytest.fixture(scope="module")
def mmdit():
    from cachec.loading import load_model

    return load_model("digits-mmdit")


def test_driver_and_sampling_loop(mmdit):
    assert mmdit.condition_kind == "prompt" and mmdit.spec.name == "digits-mmdit" and mmdit.resolution == (32, 32)
    prompts = ["a thick upright seven", "two", "a thin right-leaning four"]
    a = mmdit.generate(prompts, [3, 4, 5], steps=4)
    b = mmdit.generate(prompts, [3, 4, 5], steps=4, cfg="split")
    one = mmdit.generate(prompts[1:2], [4], steps=4)
    assert a.shape == (3, 1, 32, 32) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a[1:2], one, atol=1e-4)
    assert not torch.allclose(a[0], a[2], atol=1e-2)  # different prompts, different images
    with pytest.raises(ValueError, match="digit word"):
        mmdit.generate(["a red bicycle"], [0], steps=2)


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "cachec.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_chain_on_prompts_from_new_processes(tmp_path):
    (tmp_path / "held-in.txt").write_text("a thick upright seven\na thin left-leaning two\n")
    steps = ["--steps", "4"]
    r = _cli("calibrate", "digits-mmdit", "--prompts", "held-in.txt", *steps, "--samples-per-condition", "1",
             "--sensitivity", "none", "-o", "calib.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "FluxTransformer2DModel" in r.stdout and "20 units" in r.stdout
    for budget in ("100%", "40%"):
        r = _cli("plan", "calib.safetensors", "--budget", budget, "-o", f"p{budget[:-1]}.yaml", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = _cli("run", "p40.yaml", "digits-mmdit", "--prompt", "a medium upright three", "--per-class", "2",
             "--out", "cached.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("sample", "digits-mmdit", "--prompt", "a medium upright three", "--per-class", "2", *steps,
             "--out", "uncached.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "cached.safetensors", "--reference", "uncached.safetensors", cwd=tmp_path)  # sample-set mode
    assert r.returncode == 0, r.stderr
    assert "attribute adherence" in r.stdout and "over 2" in r.stdout
    for budget in ("100", "40"):
        r = _cli("eval", f"p{budget}.yaml", "digits-mmdit", "--samples", "3", "--json", f"e{budget}.json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "attribute adherence" in r.stdout
    e100, e40 = (json.loads((tmp_path / f"e{b}.json").read_text()) for b in ("100", "40"))
    assert e100["n_identical"] == 3 and e100["flops_fraction"] == 1.0  # the 100 % plan is bitwise
    assert 0.3 < e40["flops_fraction"] <= 0.405 and e40["n_identical"] < 3
    assert set(e40["conditions"]) <= set(prompt_set("held-out"))  # eval defaults to the held-out set
    assert e40["attribute_adherence"]["chance"]["thickness"] == pytest.approx(1 / 3)
    # calibrating on a held-out prompt is refused, naming it
    r = _cli("calibrate", "digits-mmdit", "--prompt", prompt_set("held-out")[0], "-o", "c2.safetensors", cwd=tmp_path)
    assert r.returncode != 0 and prompt_set("held-out")[0] in r.stderr and "Traceback" not in r.stderr
    assert CLASS_WORDS[7] == "seven"
