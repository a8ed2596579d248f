"""Every stage on every family, as a new user runs them: ``calibrate → plan → sample → run → eval``, each
command in a new process (``python -m cachec.cli``), on saved folders of the four tiny public pipelines.

The four chains run concurrently (one thread each, the commands of one chain in order) so that the
interpreter start-up and the diffusers import of 20 processes overlap; each family's test then checks its
own chain.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

FAMILIES = ("dit", "pixart", "sd3", "flux")
MAP_FAMILIES = ("dit", "flux")  # the two attention processors map units replace (DiT/PixArt's and FLUX's)
CAL_PROMPTS = ("a red car on the road", "a small blue house")


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "cachec.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _chain(family: str, folder: str, work, maps: bool = False) -> dict:
    """Run the five commands of one family (``maps``: calibrating attention-map units too); stop at the first
    failure. Returns {command: CompletedProcess}."""
    work.mkdir()
    text = family != "dit"
    conds = [a for p in CAL_PROMPTS for a in ("--prompt", p)] if text else ["--classes", "0,999"]
    size = ["--resolution", "32x32"] if text else []
    steps = ["--steps", "3"]
    cmds = {
        "calibrate": ["calibrate", folder, *conds, *size, *steps, "--samples-per-condition", "1", "--sensitivity",
                      *(["factored", "--sensitivity-samples", "1", "--attention-maps"] if maps else ["none"]),
                      "-o", "calib.safetensors"],
        "plan": ["plan", "calib.safetensors", "--budget", "60%", "-o", "plan.yaml"],
        "sample": ["sample", folder, *(["--prompt", "a green tree"] if text else ["--classes", "7"]), *size, *steps,
                   "--per-class", "2", "--out", "uncached.png"],
        "run": ["run", "plan.yaml", folder, *(["--prompt", "a green tree"] if text else ["--classes", "7"]),
                "--per-class", "2", "--out", "cached.png"],
        "eval": ["eval", "plan.yaml", folder, "--samples", "2", "--json", "eval.json"],
    }
    out = {}
    for name, args in cmds.items():
        out[name] = _cli(*args, cwd=work)
        if out[name].returncode != 0:
            break
    return out


@pytest.fixture(scope="module")
def chains(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("families_cli")
    with ThreadPoolExecutor(len(FAMILIES) + len(MAP_FAMILIES)) as pool:
        futures = {f: pool.submit(_chain, f, tiny_pipelines[f].name, root / f) for f in FAMILIES}
        for f in MAP_FAMILIES:
            futures[f"{f}+maps"] = pool.submit(_chain, f, tiny_pipelines[f].name, root / f"{f}+maps", True)
        return {f: (fut.result(), root / f) for f, fut in futures.items()}


@pytest.mark.parametrize("family", MAP_FAMILIES)
def test_attention_map_units_from_a_new_process(chains, family):
    """The chain with ``calibrate --attention-maps`` (docs/hgc.md): the plan carries map units nested in their
    blocks, and run/eval follow it."""
    from cachec.runtime.plan import load_plan
    from cachec.runtime.units import parent_units

    runs, work = chains[f"{family}+maps"]
    for name in ("calibrate", "plan", "sample", "run", "eval"):
        assert name in runs and runs[name].returncode == 0, (name, runs[list(runs)[-1]].stderr)
    plan = load_plan(work / "plan.yaml")
    names = [u.name for u in plan.units]
    nested = [n for n, p in zip(names, parent_units(names)) if p is not None]
    assert nested and all(n.endswith((".attn.cachec_map", ".attn1.cachec_map")) for n in nested)
    # measured sensitivity: the planner weighed map reuse (it records map_reuse: false where it could not)
    assert "map_skips" in plan.budget.options and "map_reuse" not in plan.budget.options
    assert re.search(r"PSNR vs uncached: [\d.]+ dB", runs["eval"].stdout)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_from_a_new_process(chains, family):
    from cachec.calibrate.format import read_header
    from cachec.evaluation import EVAL_SEED, HELD_OUT_PROMPTS
    from cachec.runtime.io import file_sha256
    from cachec.runtime.plan import load_plan
    from cachec.samples import load_samples

    runs, work = chains[family]
    for name in ("calibrate", "plan", "sample", "run", "eval"):
        assert name in runs and runs[name].returncode == 0, (name, runs[list(runs)[-1]].stdout, runs[list(runs)[-1]].stderr)
    ev = runs["eval"].stdout
    assert re.search(r"PSNR vs uncached: [\d.]+ dB, 95% CI \[[\d.]+, [\d.]+\]", ev), ev
    assert re.search(r"SSIM vs uncached: [\d.]+, 95% CI \[[-\d.]+, [-\d.]+\]", ev), ev
    assert re.search(r"wall-clock speed-up: [\d.]+x", ev), ev
    assert "not measured: class_accuracy" in ev  # the digit classifier does not apply to these models
    for stream in (runs[n].stderr for n in runs):  # diffusers' loading bars and deprecation warnings are silenced
        assert "Loading pipeline components" not in stream and "torch_dtype" not in stream, stream

    # the sample sets: any image shape, the conditions, and the plan's identity for the cached one
    plan = load_plan(work / "plan.yaml")
    unc, cac = load_samples(work / "uncached.safetensors"), load_samples(work / "cached.safetensors")
    assert unc.images.shape == cac.images.shape == (2, 3, 32, 32)
    assert unc.meta["plan"] is None and unc.meta["family"] == family
    assert cac.meta["plan"]["sha256"] == file_sha256(work / "plan.yaml")
    assert cac.meta["plan"]["realised"] == plan.budget.realised and cac.meta["plan"]["method"] == "cachec"
    assert unc.conditions == cac.conditions == (["a green tree"] * 2 if family != "dit" else [7, 7])

    # held out: eval's seeds and prompts are never the calibration ones
    h = read_header(work / "calib.safetensors")
    cal_seeds = set(range(h["seed"], h["seed"] + sum(h["samples"])))
    result = json.loads((work / "eval.json").read_text())
    assert len(result["seeds"]) == 2 and not cal_seeds & set(result["seeds"]) and min(result["seeds"]) >= EVAL_SEED
    if family != "dit":
        assert set(h["conditions"]) == set(CAL_PROMPTS)
        assert set(result["conditions"]) <= set(HELD_OUT_PROMPTS) and not set(result["conditions"]) & set(CAL_PROMPTS)
