"""The control reference model ``digits-mmdit-control`` (a FluxControlNetModel beside digits-mmdit on ink
masks): the control-fidelity metric (IoU), the (prompt, mask) conditions and their disjoint splits, its units
(ControlNet blocks beside the generator's), FLOPs that include the ControlNet (checked against
``torch.utils.flop_counter`` on one forward), the 100 % plan bitwise, the generator's injection points fed
when ControlNet blocks are skipped, the card's measured control, and the whole CLI chain from new processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cachec.control import (BASE, MASK_SPLITS, NAME, condition_masks, condition_set, control_iou, mask_split,
                            split_condition)
from cachec.digit_prompts import parse, prompt_set

STEPS = 4


def test_control_iou_of_a_mask_with_itself_its_complement_and_a_shift():
    masks, _ = mask_split("held-out")
    m = masks[:20]
    assert np.array_equal(control_iou(m, m), np.ones(20))
    assert np.array_equal(control_iou(1 - m, m), np.zeros(20))
    shifted = np.roll(m, 2, axis=-1)  # two pixels to the right
    iou = control_iou(shifted, m)
    assert np.all(iou < 1) and np.all(iou > 0)
    assert np.all(control_iou(np.roll(m, 4, axis=-1), m) < iou)  # further away, lower
    # images in [0, 1] are thresholded at 0.5; an empty image against an empty mask agrees
    assert control_iou(torch.from_numpy(0.4 + 0.2 * m), m).tolist() == [1.0] * 20
    assert control_iou(np.zeros((1, 1, 32, 32)), np.zeros((1, 1, 32, 32))).tolist() == [1.0]
    with pytest.raises(ValueError, match="differ in shape"):
        control_iou(m, m[:, :, :16])


def test_conditions_pair_prompts_with_masks_from_disjoint_held_out_splits():
    from cachec.data import split_digits

    (train, _), (held, _) = split_digits()
    cal_masks, cal_digits = mask_split("calibration")
    held_masks, held_digits = mask_split("held-out")
    assert cal_masks.shape == held_masks.shape == (250, 1, 32, 32) and set(np.unique(cal_masks)) == {0.0, 1.0}
    # the two splits are disjoint halves of the held-out digits, never the training digits
    key = lambda d: {x.tobytes() for x in (d[:, 0, 2:30, 2:30] * 255).round().astype(np.uint8)}  # noqa: E731
    assert not key(cal_digits) & key(held_digits)
    assert (key(cal_digits) | key(held_digits)) == {x.tobytes() for x in held}
    assert not (key(cal_digits) | key(held_digits)) & {x.tobytes() for x in train}
    cal, ho = condition_set("calibration"), condition_set("held-out")
    assert len(cal) == 30 and len(ho) == 90 and not set(cal) & set(ho)
    for name, conds in (("calibration", cal), ("held-out", ho)):
        refs = [split_condition(c, require_mask=True) for c in conds]
        assert {p for p, _ in refs} == set(prompt_set(name))
        assert all(r[0] == name and r[1] // 25 == parse(p)[0] for p, r in refs)  # a mask of the prompt's class
        assert len({r for _, r in refs}) == len(refs)  # no mask twice
    assert np.array_equal(condition_masks(ho[:2]), held_masks[[split_condition(c)[1][1] for c in ho[:2]]])
    assert condition_masks(["a thick seven"]) is None
    assert split_condition("a thick seven") == ("a thick seven", None)
    for bad, match in (("a thick seven | train:3", "no mask"), ("a thick seven | held-out:250", "no mask"),
                       ("a thick seven |", "needs a control mask"), ("a purple seven | held-out:1", "unexpected word")):
        with pytest.raises(ValueError, match=match):
            split_condition(bad)
    with pytest.raises(ValueError, match="needs a control mask"):
        split_condition("a thick seven", require_mask=True)
    assert MASK_SPLITS == ("calibration", "held-out")
    # calibration refuses a held-out mask or a held-out prompt, so eval never sees its calibration masks
    from cachec.evaluation import check_calibration_conditions

    check_calibration_conditions(cal, 0, 30)
    for leak in (f"{prompt_set('calibration')[0]} | held-out:5", f"{prompt_set('held-out')[0]} | calibration:5"):
        with pytest.raises(ValueError, match="held-out control mask or prompt"):
            check_calibration_conditions([leak], 0, 1)


@pytest.fixture(scope="module")
def control():
    from cachec.loading import load_model

    return load_model(NAME)


def test_driver_units_and_sampling_loop(control):
    from cachec.runtime.units import find_units

    assert control.spec.name == NAME and control.condition_kind == "prompt" and control.resolution == (32, 32)
    assert control.prompt_sets["held-out"] == condition_set("held-out")
    units = find_units(control.transformer)
    kinds = [u.kind for u in units]
    assert len(units) == 24 and kinds[:4] == ["control_block"] * 4  # 2 dual + 2 single ControlNet blocks first
    assert [u.name for u in units[:4]] == ["controlnet.transformer_blocks.0", "controlnet.transformer_blocks.1",
                                           "controlnet.single_transformer_blocks.0",
                                           "controlnet.single_transformer_blocks.1"]
    assert units[4].name == "transformer.transformer_blocks.0.attn" and len(units[4:]) == 20  # digits-mmdit's
    conds = condition_set("held-out")[:3]
    a = control.generate(conds, [3, 4, 5], steps=STEPS)
    b = control.generate(conds, [3, 4, 5], steps=STEPS, cfg="split")
    one = control.generate(conds[1:2], [4], steps=STEPS)
    assert a.shape == (3, 1, 32, 32) and torch.allclose(a, b, atol=1e-4) and torch.allclose(a[1:2], one, atol=1e-4)
    with pytest.raises(ValueError, match="needs a control mask"):
        control.generate(["a thick upright seven"], [0], steps=2)


def test_control_moves_the_ink_onto_the_mask(control):
    """Live, small: 6 held-out conditions at 10 steps, with the control and with it switched off."""
    conds, seeds = condition_set("held-out")[::15], list(range(6))
    masks = condition_masks(conds)
    on = control.generate(conds, seeds, steps=10)
    control.transformer.conditioning_scale = 0.0
    try:
        off = control.generate(conds, seeds, steps=10)
    finally:
        control.transformer.conditioning_scale = 1.0
    assert control_iou(on, masks).mean() > control_iou(off, masks).mean() + 0.15


def test_card_reports_control_well_above_no_control():
    from cachec.loading import MODELS_DIR

    card = json.loads((MODELS_DIR / NAME / "cachec_model.json").read_text())
    assert card["architecture"] == "mmdit-control" and card["base"] == BASE
    rows = {q["control"]: q for q in card["quality"] if q["conditions"] == "held-out"}
    assert rows["on"]["samples"] == rows["off"]["samples"] == 90
    assert rows["on"]["control_iou"] > rows["off"]["control_iou"] + 0.2
    assert rows["on"]["class_accuracy"] >= 0.9
    assert card["plan_100"]["n_identical"] == card["plan_100"]["samples"]
    size = sum(f.stat().st_size for f in (MODELS_DIR / NAME).rglob("*") if f.is_file())
    assert size <= 10 * 2 ** 20


def _one_forward(control, n=2):
    from cachec.runtime.manual import trace_run

    trace = trace_run(control, condition_set("calibration")[:n], steps=STEPS)
    return trace.kwargs, int(trace.batch)


def test_counted_flops_include_the_controlnet(control):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cachec.runtime.flops import unit_flops

    kwargs, batch = _one_forward(control)
    model = control.transformer

    def direct(fn, **kw):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            out = fn(**kw)
        return out, int(counter.get_total_flops())

    _, whole = direct(model, **kwargs)
    common = {k: v for k, v in kwargs.items() if k != "controlnet_cond"}
    (blocks, single), ctrl = direct(model.controlnet, controlnet_cond=kwargs["controlnet_cond"], return_dict=False,
                                    **common)
    _, gen = direct(model.transformer, controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                    **common)
    assert ctrl > 0.2 * gen and whole == ctrl + gen
    units, total = unit_flops(model, (), kwargs)
    assert total * batch == whole  # the repo's counter agrees with torch.utils.flop_counter on one forward
    control_units = sum(f for name, f in units.items() if name.startswith("controlnet."))
    assert 0.9 * ctrl <= control_units * batch < ctrl  # the ControlNet's blocks, less its embeddings


def test_full_plan_is_bitwise_and_skipped_control_blocks_still_feed_the_generator(control):
    from cachec.runtime import apply
    from cachec.runtime.manual import full_plan, with_actions

    conds, seeds = condition_set("held-out")[:2], [11, 12]
    ref = control.generate(conds, seeds, steps=STEPS)
    plan = full_plan(control, steps=STEPS, conditions=conds)
    assert plan.budget.full_step_flops > 0 and len(plan.units) == 24
    with apply(control, plan) as handle:
        got = control.generate(conds, seeds, steps=STEPS)
    assert torch.equal(got, ref) and handle.report.flops_fraction == 1.0
    # reuse every ControlNet block after step 0: the generator still gets all 4 residuals at every call
    skip = with_actions(plan, {u.name: "C" + "." * (STEPS - 1) for u in plan.units if u.name.startswith("controlnet.")})
    seen = []
    hook = control.transformer.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((len(kw["controlnet_block_samples"]), len(kw["controlnet_single_block_samples"]))),
        with_kwargs=True)
    try:
        with apply(control, skip):
            cached = control.generate(conds, seeds, steps=STEPS)
    finally:
        hook.remove()
    assert seen == [(2, 2)] * STEPS and not torch.equal(cached, ref)
    assert skip.budget.realised < 1.0


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "cachec.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_chain_from_new_processes(tmp_path):
    cal = condition_set("calibration")
    (tmp_path / "held-in.txt").write_text(f"{cal[0]}\n{cal[7]}\n")
    steps = ["--steps", str(STEPS)]
    r = _cli("calibrate", NAME, "--prompts", "held-in.txt", *steps, "--samples-per-condition", "1",
             "--sensitivity", "none", "-o", "calib.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ControlledFluxTransformer" in r.stdout and "24 units" in r.stdout
    for budget in ("100%", "40%"):
        r = _cli("plan", "calib.safetensors", "--budget", budget, "-o", f"p{budget[:-1]}.yaml", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    cond = condition_set("held-out")[5]
    r = _cli("run", "p40.yaml", NAME, "--prompt", cond, "--per-class", "2", "--out", "cached.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("sample", NAME, "--prompt", cond, "--per-class", "2", *steps, "--out", "uncached.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "cached.safetensors", "--reference", "uncached.safetensors", cwd=tmp_path)  # sample-set mode
    assert r.returncode == 0, r.stderr
    assert "control IoU" in r.stdout and "over 2 images" in r.stdout
    for budget in ("100", "40"):
        r = _cli("eval", f"p{budget}.yaml", NAME, "--samples", "3", "--json", f"e{budget}.json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "control IoU" in r.stdout and "PSNR vs uncached" in r.stdout
    e100, e40 = (json.loads((tmp_path / f"e{b}.json").read_text()) for b in ("100", "40"))
    assert e100["n_identical"] == 3 and e100["flops_fraction"] == 1.0  # the 100 % plan is bitwise
    iou = e100["control_iou"]
    assert iou["candidate"]["per_image"] == iou["reference"]["per_image"] and len(iou["reference"]["per_image"]) == 3
    assert 0.3 < e40["flops_fraction"] <= 0.405 and e40["n_identical"] < 3 and "control_iou" in e40
    assert set(e40["conditions"]) <= set(condition_set("held-out"))  # eval defaults to the held-out conditions
    # a held-out condition cannot be calibrated on; a prompt without a mask is refused in one line
    r = _cli("calibrate", NAME, "--prompt", condition_set("held-out")[0], "-o", "c2.safetensors", cwd=tmp_path)
    assert r.returncode != 0 and condition_set("held-out")[0] in r.stderr and "Traceback" not in r.stderr
    r = _cli("sample", NAME, "--prompt", "a thick upright seven", *steps, "--out", "x.png", cwd=tmp_path)
    assert r.returncode != 0 and "needs a control mask" in r.stderr and "Traceback" not in r.stderr
