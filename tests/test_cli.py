"""CLI behaviour a user sees: help everywhere, version, and one-line errors (exit != 0, no traceback)."""

import pytest
from click.testing import CliRunner

from cachec import __version__
from cachec.cli import main


@pytest.fixture(scope="module")
def tiny_digits_dir(tmp_path_factory):
    from conftest import build_tiny_digits_folder

    return build_tiny_digits_folder(tmp_path_factory.mktemp("cli_digits"))


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_version_and_help():
    code, out = run("--version")
    assert code == 0 and __version__ in out
    for cmd in ([], ["sample"], ["calibrate"], ["calibrate", "show"], ["calibrate", "merge"], ["plan"], ["inspect"],
                ["eval"]):
        code, out = run(*cmd, "--help")
        assert code == 0, (cmd, out)
        assert "Usage:" in out


def _assert_one_line_error(code, out, *needles):
    assert code != 0
    assert "Traceback" not in out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), out
    for n in needles:
        assert n in lines[0], (n, out)


def test_unknown_model_name(tmp_path):
    _assert_one_line_error(*run("sample", "no-such-model", "--out", str(tmp_path / "x.png")), "unknown model", "no-such-model")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "junk.txt").write_text("hello")
    _assert_one_line_error(*run("sample", str(tmp_path), "--out", str(tmp_path / "x.png")), "not a diffusers model folder")


def test_class_out_of_range(tiny_digits_dir, tmp_path):
    _assert_one_line_error(*run("sample", str(tiny_digits_dir), "--classes", "3,12", "--out", str(tmp_path / "x.png")),
                           "out of range", "12")


def test_negative_steps(tiny_digits_dir, tmp_path):
    _assert_one_line_error(*run("sample", str(tiny_digits_dir), "--steps", "-3", "--out", str(tmp_path / "x.png")),
                           "steps", "-3")


def test_output_folder_missing(tmp_path):
    _assert_one_line_error(*run("sample", "--out", str(tmp_path / "missing" / "x.png")), "does not exist")


def test_sample_writes_grid_and_raw_samples(tiny_digits_dir, tmp_path):
    from cachec.samples import load_samples

    out = tmp_path / "grid.png"
    code, text = run("sample", str(tiny_digits_dir), "--classes", "0-2", "--per-class", "2", "--steps", "3",
                     "--out", str(out))
    assert code == 0, text
    assert out.stat().st_size > 0
    s = load_samples(out.with_suffix(".safetensors"))
    assert s.images.shape == (6, 1, 32, 32)
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.seeds.tolist() == [0, 1, 2, 3, 4, 5]
    assert s.meta["flops_per_image"] > 0


@pytest.mark.parametrize("budget", ["-5%", "0", "abc"])
def test_plan_rejects_bad_budget(tmp_path, budget):
    cal = tmp_path / "c.safetensors"
    cal.write_bytes(b"")
    code, out = run("plan", str(cal), "--budget", budget, "-o", str(tmp_path / "p.yaml"))
    assert code != 0 and "Traceback" not in out


def test_plan_warmup_interval_predictors_and_no_fill_are_wired(tmp_path):
    """cachec plan --family warmup [--interval N] --predictors taylor --no-fill, --ridge/--shrink on a synthetic
    calibration: the options reach the planner and are recorded; --interval is refused for the DP families and
    --shrink outside the fitted set."""
    import numpy as np

    from cachec.planner.synthetic import calibration_tensors, save_calibration, synthetic_features
    from cachec.runtime.plan import load_plan

    feats = synthetic_features(blocks=2, steps=12, seed=0)
    header, tensors = calibration_tensors(feats, np.ones(len(feats)), len(feats) * 1.05, None, np.ones((len(feats), 12)))
    cal = str(tmp_path / "cal.safetensors")
    save_calibration(cal, header, tensors)
    out = str(tmp_path / "p.yaml")
    code, text = run("plan", cal, "--budget", "60%", "--family", "warmup", "--interval", "2", "--predictors", "taylor",
                     "--no-fill", "-o", out)
    assert code == 0, text
    o = load_plan(out).budget.options
    assert (o["family"], o["interval"], o["predictors"]) == ("warmup", 2, ["reuse", "taylor"]) and "fill" not in o
    assert load_plan(out).units[0].actions == "C" * o["warmup"] + "".join(
        "C" if (s - o["warmup"] + 1) % 2 == 0 else "." for s in range(o["warmup"], 12))
    code, text = run("plan", cal, "--budget", "50%", "--family", "warmup", "-o", out, "--overwrite")
    assert code == 0, text
    o = load_plan(out).budget.options  # default interval: 2 does not fit 50 % here (6 of 12 steps + fixed), 3 does
    assert o["interval"] == 3 and o["fill"] is True and len(o["predictors"]) == 6
    code, text = run("plan", cal, "--budget", "50%", "--family", "step", "--interval", "2", "-o", out, "--overwrite")
    _assert_one_line_error(code, text, "--interval")
    code, text = run("plan", cal, "--budget", "50%", "--family", "step", "--ridge", "10", "--shrink", "taylor", "-o", out,
                     "--overwrite")
    assert code == 0, text
    o = load_plan(out).budget.options
    assert (o["ridge"], o["shrink"]) == (10.0, "taylor")
    code, text = run("plan", cal, "--budget", "50%", "--predictors", "forecast", "--shrink", "taylor", "-o", out, "--overwrite")
    _assert_one_line_error(code, text, "--predictors fitted")
    code, text = run("plan", cal, "--budget", "40%", "--family", "step", "--predictor-pass", "trajectory", "-o", out,
                     "--overwrite")
    assert code == 0, text
    o = load_plan(out).budget.options
    assert o["predictor_pass"] == "trajectory" and o["repredicted"] >= 0
    code, text = run("plan", cal, "--budget", "40%", "--method", "fora", "--predictor-pass", "trajectory", "-o", out,
                     "--overwrite")
    _assert_one_line_error(code, text, "--method cachec")


def test_compile_then_plan_and_inspect_end_to_end(tiny_digits_dir, tmp_path):
    """The main job on a tiny model folder, then the stage commands on its calibration."""
    import json

    from cachec.runtime import load_plan

    out = tmp_path / "job"
    code, text = run("compile", tiny_digits_dir, "--budget", "50%", "--samples-per-condition", "1", "--per-class", "1",
                     "--out-dir", str(out))
    assert code == 0, text
    assert "PSNR" in text and "realised" in text.lower()
    result = json.loads((out / "eval.json").read_text())
    plan = load_plan(out / "plan.yaml")
    assert result["family"] == plan.budget.options["family"] in ("free", "step", "group", "warmup")
    cands = result["candidates"]
    first = {(c["family"], c["predictors"]) for c in cands if c["refine"] == 0 and not c["variant"]}
    assert first == {(f, p) for f in ("free", "step", "group", "warmup") for p in ("fitted", "taylor")}
    refined = [c for c in cands if c["refine"] > 0]  # the 2 best first-stage plans, 2 refinements each
    assert sorted(c["refine"] for c in refined) == [1, 1, 2, 2]
    assert {(c["family"], c["predictors"]) for c in refined} <= first
    # stage 3: the mask search from the best step/warmup plan, at most 16 validation runs, one candidate if it moved
    ms, masked = result["mask_search"], [c for c in cands if c["variant"] == "mask"]
    assert 1 <= ms["runs"] <= 16 and len(masked) == (1 if ms["moves"] else 0)
    assert all(c["family"] == "step" and c["validation_psnr"] == ms["psnr_db"] for c in masked)
    assert plan.budget.options.get("refine", 0) == result["refine"]
    key = (result["family"], result["predictors"], result["refine"], result["variant"])
    # stage 5: the 3 best on validation re-scored on 2 x 30 fresh seeds just above the 30 validation seeds; the
    # winner is the best over all 90 images
    cf, chosen = result["confirmation"], next(c for c in cands if (c["family"], c["predictors"], c["refine"],
                                                                     c["variant"]) == key)
    top3 = sorted(cands, key=lambda c: -c["validation_psnr"])[:3]
    assert cf["images"] == 60 and cf["first_seed"] == 500030 and cf["runs"] == 3
    assert sorted(c["confirmation_psnr"] for c in top3) == sorted(
        c["confirmation_psnr"] for c in cands if c["confirmation_psnr"] is not None)
    assert chosen["confirmation_psnr"] is not None
    assert cf["psnr_db"][max(cf["psnr_db"], key=cf["psnr_db"].get)] == pytest.approx(
        (30 * chosen["validation_psnr"] + 60 * chosen["confirmation_psnr"]) / 90)
    assert len(list((out / "candidates").glob("calib-*-along-r*.safetensors"))) == 4
    assert 0.49 <= plan.budget.realised <= 0.5
    assert abs(result["flops_fraction"] - plan.budget.realised) < 0.01  # counted FLOPs agree with the plan
    assert (out / "side_by_side.png").stat().st_size > 0

    calib = str(out / "calib.safetensors")
    code, text = run("plan", calib, "--budget", "40%", "--family", "group", "--groups", "2", "--no-fill",
                     "-o", str(tmp_path / "g.yaml"))
    assert code == 0, text
    g = load_plan(tmp_path / "g.yaml")
    assert g.budget.options["family"] == "group" and g.budget.options["groups"] == 2 and "fill" not in g.budget.options
    group_step = max(sum(u.flops for u in g.units[:2]), sum(u.flops for u in g.units[2:])) / (g.steps * g.budget.full_step_flops)
    assert 0.4 - group_step <= g.budget.realised <= 0.4  # within one group-step of the budget
    assert len({u.actions for u in g.units}) <= 2  # one mask per block group
    code, text = run("plan", calib, "--budget", "40%", "--family", "group", "--groups", "2", "-o", str(tmp_path / "gf.yaml"))
    assert code == 0, text
    gf = load_plan(tmp_path / "gf.yaml")  # the budget fill adds single unit computes into the slack
    unit_step = max(u.flops for u in gf.units) / (gf.steps * gf.budget.full_step_flops)
    assert gf.budget.options["fill"] is True and g.budget.realised <= gf.budget.realised <= 0.4
    assert 0.4 - unit_step <= gf.budget.realised or gf.budget.options["filled"] == 0
    code, text = run("inspect", str(tmp_path / "g.yaml"))
    assert code == 0 and "group" in text, text
    code, text = run("plan", calib, "--budget", "40%", "--groups", "2", "-o", str(tmp_path / "x.yaml"))
    _assert_one_line_error(code, text, "--groups", "--family group")

    # trajectory calibration from the command line, then a plan from it
    traj = str(tmp_path / "traj.safetensors")
    code, text = run("calibrate", "run", tiny_digits_dir, "--along", str(out / "plan.yaml"), "--samples-per-condition", "1",
                     "-o", traj)
    _assert_one_line_error(code, text, "--along needs --sensitivity-from")
    code, text = run("calibrate", "run", tiny_digits_dir, "--along", str(out / "plan.yaml"), "--sensitivity-from", calib,
                     "--samples-per-condition", "1", "-o", traj)
    assert code == 0, text
    from cachec.calibrate import read_header

    assert read_header(traj)["along_plan"]["realised"] == plan.budget.realised
    code, text = run("plan", traj, "--budget", "50%", "-o", str(tmp_path / "refined.yaml"))
    assert code == 0, text


def test_run_with_another_step_count_needs_remap(tiny_digits_dir, tmp_path):
    from cachec.loading import load_model
    from cachec.runtime import full_plan, write_plan

    plan = full_plan(load_model(str(tiny_digits_dir)), steps=6)
    write_plan(plan, tmp_path / "p.yaml")
    args = ("run", str(tmp_path / "p.yaml"), str(tiny_digits_dir), "--classes", "1,2", "--out", str(tmp_path / "c.png"))
    _assert_one_line_error(*run(*args, "--steps", "3"), "not in the plan's schedule", "remap='nearest'")
    code, out = run(*args, "--steps", "3", "--remap", "off")
    assert code == 0 and "FLOPs 100.0%" in out, out
    code, out = run(*args, "--steps", "6")
    assert code == 0 and "skipped 0" in out, out


def test_plan_and_calibrate_outputs_never_replace_other_kinds_of_file(tiny_digits_dir, tmp_path):
    calib = tmp_path / "c.safetensors"
    from cachec.calibrate import calibrate
    from cachec.loading import load_model

    calibrate(load_model(str(tiny_digits_dir)), [0, 1], output=calib, steps=3, sensitivity="none", progress=False)
    before = calib.read_bytes()
    _assert_one_line_error(*run("plan", str(calib), "--budget", "50%", "-o", str(calib)), "a plan is a YAML file")
    (tmp_path / "p.eoc.safetensors").write_bytes(before)  # a calibration under the plan's sidecar name
    _assert_one_line_error(*run("plan", str(calib), "--budget", "50%", "-o", str(tmp_path / "p.yaml")),
                           "p.eoc.safetensors", "cachec calibration file", "--overwrite")
    (tmp_path / "notes.yaml").write_text("shopping: [milk]\n")
    _assert_one_line_error(*run("plan", str(calib), "--budget", "50%", "-o", str(tmp_path / "notes.yaml")),
                           "not a cachec plan", "--overwrite")
    code, out = run("plan", str(calib), "--budget", "50%", "-o", str(tmp_path / "q.yaml"))
    assert code == 0, out
    code, out = run("plan", str(calib), "--budget", "60%", "-o", str(tmp_path / "q.yaml"))  # a plan: replaced
    assert code == 0, out
    _assert_one_line_error(*run("calibrate", "run", str(tiny_digits_dir), "--classes", "0-1", "--steps", "3",
                                "--sensitivity", "none", "-o", str(tmp_path / "q.yaml")),
                           "q.yaml", "refusing to replace it with a calibration", "--overwrite")
    assert calib.read_bytes() == before and (tmp_path / "notes.yaml").read_text() == "shopping: [milk]\n"
