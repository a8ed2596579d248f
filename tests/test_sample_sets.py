"""Sample-set files (format 2 and the old digit format), the overwrite refusal, condition parsing errors and
held-out evaluation conditions, through the CLI a user sees (one-line errors) and the library."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cachec import samples
from cachec.cli import main
from test_cli import _assert_one_line_error


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from conftest import build_tiny_digits_folder

    return build_tiny_digits_folder(tmp_path_factory.mktemp("sets_digits"))


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _meta(**kw):
    return {"model": "m", "steps": 3, "guidance": 1.0, "flops_per_image": None, "wall_s": None, **kw}


# ------------------------------------------------------------------------------------------ the format


def test_any_shape_and_prompts_roundtrip(tmp_path):
    imgs = torch.rand(3, 3, 24, 40)
    samples.save_samples(tmp_path / "p.safetensors", imgs, ["a cat", "a dog", "a cat"], [5, 6, 7], _meta(plan=None))
    s = samples.load_samples(tmp_path / "p.safetensors")
    assert s.version == samples.FORMAT_VERSION == 2 and s.condition_kind == "prompt"
    assert torch.equal(s.images, imgs) and s.labels is None and s.prompts == ["a cat", "a dog", "a cat"]
    assert s.seeds.tolist() == [5, 6, 7] and s.meta == _meta(plan=None)
    samples.save_samples(tmp_path / "c.safetensors", torch.rand(2, 4, 16, 16), [999, 3], [0, 1], _meta())
    c = samples.load_samples(tmp_path / "c.safetensors")
    assert c.conditions == [999, 3] and c.images.shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="all class labels"):
        samples.save_samples(tmp_path / "m.safetensors", torch.rand(2, 1, 8, 8), [1, "x"], [0, 1], _meta())


def _raw(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def test_old_format_read_and_newer_refused(tmp_path):
    old = tmp_path / "old.safetensors"  # what cachec wrote before format versions: no version key
    imgs = torch.rand(2, 1, 32, 32)
    _raw(old, {"images": imgs, "labels": torch.tensor([3, 4]), "seeds": torch.tensor([0, 1])},
         {samples.SAMPLES_METADATA_KEY: json.dumps(_meta())})
    s = samples.load_samples(old)
    assert s.version == 1 and s.conditions == [3, 4] and torch.equal(s.images, imgs)
    bad_old = tmp_path / "bad_old.safetensors"
    _raw(bad_old, {"images": torch.rand(2, 3, 32, 32), "labels": torch.tensor([3, 4]), "seeds": torch.tensor([0, 1])},
         {samples.SAMPLES_METADATA_KEY: json.dumps(_meta())})
    with pytest.raises(ValueError, match="version-1 sample set holds"):
        samples.load_samples(bad_old)
    newer = tmp_path / "newer.safetensors"
    _raw(newer, {"images": imgs, "labels": torch.tensor([3, 4]), "seeds": torch.tensor([0, 1])},
         {samples.SAMPLES_METADATA_KEY: json.dumps(_meta()), samples.VERSION_KEY: "3"})
    with pytest.raises(ValueError, match="format version 3"):
        samples.load_samples(newer)
    code, out = run("eval", newer)
    _assert_one_line_error(code, out, "format version 3", str(newer))


# ------------------------------------------------------------------------------------------ overwrite refusal


def test_sample_never_replaces_another_kind_of_file(digits_dir, tmp_path):
    cal = tmp_path / "x.safetensors"
    _raw(cal, {"a": torch.zeros(1)}, {"cachec_calibration": "{}"})
    before = cal.read_bytes()
    args = ("sample", digits_dir, "--classes", "1", "--per-class", "1", "--steps", "2", "--out", tmp_path / "x.png")
    _assert_one_line_error(*run(*args), str(cal), "calibration", "--overwrite")
    assert cal.read_bytes() == before and not (tmp_path / "x.png").exists()  # refused before sampling
    _raw(tmp_path / "plan.eoc.safetensors", {"a": torch.zeros(1)}, {})
    _assert_one_line_error(*run(*args[:-1], tmp_path / "plan.eoc.png"), "plan.eoc.safetensors", "sidecar")
    (tmp_path / "notes.safetensors").write_text("my notes")
    _assert_one_line_error(*run(*args[:-1], tmp_path / "notes.png"), "notes.safetensors", "not a sample set")
    (tmp_path / "y.png").write_text("not an image")
    _assert_one_line_error(*run(*args[:-1], tmp_path / "y.png"), "y.png", "not a PNG")

    code, out = run(*args, "--overwrite")
    assert code == 0, out
    assert samples.load_samples(cal).conditions == [1]
    code, out = run(*args)  # replacing an older sample set is fine
    assert code == 0, out


# ------------------------------------------------------------------------------------------ conditions


def test_condition_errors_are_one_line(digits_dir, tiny_pipelines, tmp_path):
    out = ("--out", tmp_path / "s.png")
    d = ("sample", digits_dir, "--steps", "2", *out)
    _assert_one_line_error(*run(*d, "--classes", "5-2"), "reversed class range", "5-2")
    _assert_one_line_error(*run(*d, "--classes", "1,x"), "cannot parse class item", "'x'")
    _assert_one_line_error(*run(*d, "--classes", "1", "--prompt", "a cat"), "not both")
    _assert_one_line_error(*run(*d, "--prompt", "a cat"), "class-conditional", "--classes")
    _assert_one_line_error(*run(*d, "--resolution", "64x64"), "fixed 32x32")
    text = tiny_pipelines["pixart"].name
    t = ("sample", text, "--steps", "2", *out)
    _assert_one_line_error(*run(*t), "text-conditional", "--prompt")
    _assert_one_line_error(*run(*t, "--classes", "0-3"), "text-conditional", "not --classes")
    (tmp_path / "empty.txt").write_text("\n  \n")
    _assert_one_line_error(*run(*t, "--prompts", tmp_path / "empty.txt"), "holds no prompt")
    _assert_one_line_error(*run(*t, "--prompts", tmp_path / "missing.txt"), "does not exist")
    _assert_one_line_error(*run(*t, "--prompt", "a cat", "--resolution", "32by32"), "--resolution", "HxW")
    _assert_one_line_error(*run("calibrate", text, "--prompt", "a lighthouse on a cliff at sunset", "-o",
                                tmp_path / "c.safetensors"), "held-out prompts")
    _assert_one_line_error(*run("calibrate", digits_dir, "--seed", "499999", "--classes", "0-1", "-o",
                                tmp_path / "c.safetensors"), "calibration seeds", "500000")


def test_prompt_file_and_repeated_prompts(tiny_pipelines):
    from cachec.cli_common import conditions, parse_resolution

    drv = tiny_pipelines["sd3"]
    assert conditions(drv, None, ("a cat", " a dog ")) == ["a cat", "a dog"]
    assert parse_resolution("48x64") == (48, 64) and parse_resolution(None) is None
    dit = tiny_pipelines["dit"]
    assert conditions(dit, "0-2,999", ()) == [0, 1, 2, 999]
    assert conditions(dit, None, ()) == list(range(0, 1000, 100))  # 10 spread over 1000 classes


# ------------------------------------------------------------------------------------------ held out


def test_eval_conditions_are_held_out(tiny_pipelines, tiny_digits):
    from cachec.evaluation import (EVAL_SEED, HELD_OUT_PROMPTS, VALIDATION_SEED, check_calibration_conditions,
                                   held_out, held_out_set)

    conds, seeds = held_out_set(tiny_pipelines["flux"], 5)
    assert len(conds) == 5 and set(conds) <= set(HELD_OUT_PROMPTS) and min(seeds) >= EVAL_SEED
    for p in HELD_OUT_PROMPTS:  # calibration refuses every held-out prompt, however it is spaced or cased
        with pytest.raises(ValueError, match="held-out prompts"):
            check_calibration_conditions(["a fine prompt", "  " + p.upper()], 0, 2)
    check_calibration_conditions(list(range(10)), 0, VALIDATION_SEED)  # seeds 0..VALIDATION_SEED-1: fine
    with pytest.raises(ValueError, match="calibration seeds"):
        check_calibration_conditions([0], VALIDATION_SEED - 1, 2)
    with pytest.raises(ValueError, match="held-out seeds start at"):
        held_out_set(tiny_pipelines["dit"], 2, seed=3)
    # the digit models: the default 100 samples are exactly the former 10 per class, class-major
    assert held_out_set(tiny_digits) == held_out(tiny_digits, 10)
    assert held_out_set(tiny_pipelines["dit"], 4)[0] == [0, 250, 500, 750]


def test_compare_prompt_sets_without_digit_metrics(tmp_path):
    from cachec.cli_sampling import eval_summary
    from cachec.report import compare_sample_files

    ref = torch.rand(3, 3, 16, 16) * 0.9
    prompts, seeds = ["a", "b", "a"], [1_000_000, 1_000_001, 1_000_002]
    samples.save_samples(tmp_path / "ref.safetensors", ref, prompts, seeds, _meta(wall_s=2.0, family="flux"))
    samples.save_samples(tmp_path / "cand.safetensors", ref + 0.05, prompts, seeds, _meta(wall_s=1.0, family="flux"))
    res = compare_sample_files(tmp_path / "cand.safetensors", tmp_path / "ref.safetensors")
    assert res["class_accuracy"] is None and res["frechet_distance"] is None
    assert "class_accuracy" in res["not_measured"] and "lpips" in res["not_measured"]
    assert res["speedup"] == 2.0 and res["psnr_db"]["ci95"] is not None
    lo, hi = res["psnr_db"]["ci95"]
    assert lo <= res["psnr_db"]["mean"] <= hi
    text = eval_summary(res)
    assert "95% CI [" in text and "speed-up: 2.00x" in text and "not measured: frechet_distance" in text
    samples.save_samples(tmp_path / "other.safetensors", ref, ["a", "c", "a"], seeds, _meta(family="flux"))
    with pytest.raises(ValueError, match="prompts .* first difference at index 1"):
        compare_sample_files(tmp_path / "other.safetensors", tmp_path / "ref.safetensors")
