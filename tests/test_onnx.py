"""ONNX export of a plan (``cachec export PLAN --onnx DIR``) and its onnxruntime sampling loop (docs/onnx.md).

The loop's images must equal the torch runtime's (``apply`` + the pipeline) within 1e-4 in float32, on the
tiny digits models (batched and split CFG, ``history: computed`` and ``used``, EOC factors, Euler and DDIM)
and on the shipped ``plans/digits-flow-40.yaml``; every graph passes ``onnx.checker`` (full check); the
manifest's FLOPs are the plan's accounting and the graphs' own FLOP count agrees on the units.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cachec.cli import main  # noqa: E402
from cachec.runtime import apply, full_plan, load_plan, with_actions, write_plan  # noqa: E402
from cachec.runtime.onnx_export import ExportError, export_plan  # noqa: E402
from cachec.runtime.onnx_loop import ManifestError, OnnxSampler  # noqa: E402
from cachec.runtime.plan import Compensation, realised_fraction  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
STEPS = 8


def _noise(driver, seeds):
    """The initial noise ``Driver.generate`` draws for these seeds (one generator per sample)."""
    return driver.pipe.initial_noise(len(seeds), [torch.Generator().manual_seed(s) for s in seeds]).numpy()


def _torch_images(driver, plan, labels, seeds, cfg="batched"):
    with apply(driver, plan):
        return driver.generate(labels, seeds, steps=plan.steps, guidance=plan.sampler.guidance.scale, cfg=cfg).numpy()


def _mixed_plan(driver, folder: Path):
    """Reuse, 2-coefficient extrapolation and EOC (a per-element and a per-token prior) on the tiny model."""
    base = full_plan(driver, steps=STEPS)
    plan = with_actions(base, {
        "transformer_blocks.0.attn1": "CC.C..C.",
        "transformer_blocks.0.ff": "C.C.C.C.",
        "transformer_blocks.1.attn1": "CCC..CC.",
    }, {
        "transformer_blocks.0.attn1": {4: [1.5, -0.5], 5: [2.0, -1.0], 7: [1.25, -0.25]},
        "transformer_blocks.1.attn1": {4: [1.5, -0.5], 7: [1.2, -0.2]},
    }, method="manual")
    comp = plan.unit("transformer_blocks.1.attn1").compensation  # EOC needs the sidecar: set after validation
    comp[4], comp[7] = Compensation([1.5, -0.5], eoc_alpha=0.25), Compensation([1.2, -0.2], eoc_alpha=0.1)
    rng = np.random.default_rng(0)
    sidecar = {"eoc/transformer_blocks.1.attn1/4": rng.normal(size=(64, 32)).astype(np.float32),
               "eoc/transformer_blocks.1.attn1/7": rng.normal(size=(64, 1)).astype(np.float32)}
    write_plan(plan, folder / "mixed.yaml", sidecar)
    return load_plan(folder / "mixed.yaml")


@pytest.fixture(scope="module")
def mixed(tiny_digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_mixed")
    plan = _mixed_plan(tiny_digits, folder)
    result = export_plan(tiny_digits.pipe, plan, folder / "out")
    return plan, result


def test_export_writes_one_checked_graph_per_step_signature(mixed):
    plan, result = mixed
    m = result.manifest_data
    out = result.folder
    # distinct signatures: which units compute, and each prediction's coefficients and EOC factor
    sigs = {tuple(u.actions[s] + (repr(u.compensation.get(s)) if u.actions[s] == "." else "") for u in plan.units)
            for s in range(plan.steps)}
    assert result.graphs == len(m["graphs"]) == len(sigs)
    assert [s["step"] for s in m["steps"]] == list(range(plan.steps))
    for g in [*m["graphs"].values(), m["uncached"]]:
        onnx.checker.check_model(str(out / g["file"]), full_check=True)
    g4 = m["graphs"][m["steps"][4]["graph"]]
    assert g4["predicts"]["transformer_blocks.0.attn1"] == {"coeffs": [1.5, -0.5], "eoc_alpha": 0.0, "reuse": False}
    assert "transformer_blocks.1.ff" in g4["computes"]
    # step 4 reads the two latest computed outputs of blocks.0.attn1 (steps 3 and 1); step 3 writes one
    assert m["steps"][4]["reads"]["cache_in.transformer_blocks.0.attn1.h1"] == "transformer_blocks.0.attn1@3"
    assert m["steps"][4]["reads"]["cache_in.transformer_blocks.0.attn1.h2"] == "transformer_blocks.0.attn1@1"
    assert m["steps"][3]["writes"]["cache_out.transformer_blocks.0.attn1"] == "transformer_blocks.0.attn1@3"
    # a unit that is never skipped is never cached; a cache tensor is freed after its last read
    assert not any("transformer_blocks.1.ff" in k for s in m["steps"] for k in s["writes"])
    assert "transformer_blocks.0.attn1@1" in m["steps"][5]["frees"]
    # the weights live once in weights.bin; the graphs name them w.<digest>
    size = sum(e["length"] for e in m["weights"]["tensors"].values())
    assert (out / "weights.bin").stat().st_size >= size
    model = onnx.load(str(out / m["graphs"]["g00"]["file"]), load_external_data=False)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]


def test_onnxruntime_reproduces_the_torch_runtime(tiny_digits, mixed):
    plan, result = mixed
    labels, seeds = [3, 7, 1], [0, 1, 2]  # batch 6 (the graphs were traced at batch 3)
    ref = _torch_images(tiny_digits, plan, labels, seeds)
    out = OnnxSampler(result.folder, threads=1)(labels, _noise(tiny_digits, seeds))
    assert out.images.shape == ref.shape
    assert np.abs(out.images - ref).max() <= TOL
    # without the plan: the uncached graph reproduces uncached torch sampling
    plain = tiny_digits.generate(labels, seeds, steps=STEPS, guidance=plan.sampler.guidance.scale).numpy()
    base = OnnxSampler(result.folder, uncached=True, threads=1, share_weights=False)(labels, _noise(tiny_digits, seeds))
    assert np.abs(base.images - plain).max() <= TOL
    assert np.abs(out.images - plain).max() > 10 * TOL  # the plan really changed something
    assert base.report.flops_fraction == 1.0


def test_manifest_flops_are_the_plans_accounting(mixed):
    plan, result = mixed
    m = result.manifest_data
    b = plan.budget
    step_flops = [s["flops"] for s in m["steps"]]
    for s, f in enumerate(step_flops):
        assert f == b.fixed_step_flops + sum(u.flops for u in plan.units if u.actions[s] == "C")
    fraction = sum(step_flops) / (plan.steps * b.full_step_flops)
    assert fraction == pytest.approx(realised_fraction(plan.units, plan.steps, b.full_step_flops, b.fixed_step_flops),
                                     rel=1e-12)
    assert fraction == pytest.approx(b.realised, rel=1e-6)
    out = OnnxSampler(result.folder, threads=1)([0, 5], np.zeros((2, 1, 32, 32), np.float32))
    assert out.report.flops_fraction == pytest.approx(fraction, rel=1e-12)
    assert out.report.flops == pytest.approx(sum(step_flops) * 2 * 2, rel=1e-12)  # 2 samples x 2 CFG branches
    # the graphs' own FLOP count: the units cost what the plan says, the whole forward within 0.5 %
    check = m["flops"]["onnx_check"]
    assert check["units_agree"]
    assert 0 <= check["uncached_gap"] <= 0.005 * b.full_step_flops


def test_split_cfg_and_used_history(tiny_digits, tmp_path):
    base = full_plan(tiny_digits, steps=STEPS, cfg="split")
    plan = with_actions(base, {"transformer_blocks.0.ff": "CC..C.C.", "transformer_blocks.1.attn1": "C.C..CC."},
                        {"transformer_blocks.0.ff": {2: [1.5, -0.5], 3: [1.5, -0.5], 5: [1.0]},
                         "transformer_blocks.1.attn1": {1: [1.0], 3: [1.0], 4: [2.0, -1.0], 7: [1.0]}},
                        history="used", method="manual")
    assert plan.sampler.guidance.mode == "split"
    write_plan(plan, tmp_path / "split.yaml")
    plan = load_plan(tmp_path / "split.yaml")
    result = export_plan(tiny_digits.pipe, plan, tmp_path / "out", flops=False)
    labels, seeds = [2, 9], [5, 6]
    ref = _torch_images(tiny_digits, plan, labels, seeds, cfg="split")
    out = OnnxSampler(result.folder, threads=1)(labels, _noise(tiny_digits, seeds))
    assert out.report.calls == 2 * STEPS
    assert np.abs(out.images - ref).max() <= TOL


def test_ddim_model(tiny_digits_ddim, tmp_path):
    base = full_plan(tiny_digits_ddim, steps=STEPS)
    plan = with_actions(base, {u.name: "CC.C.CC." for u in base.units},
                        {u.name: {2: [1.0], 4: [1.5, -0.5]} for u in base.units}, method="manual")
    result = export_plan(tiny_digits_ddim.pipe, plan, tmp_path / "out", flops=False)
    assert result.manifest_data["sampler"]["kind"] == "ddim"
    labels, seeds = [4], [11]
    ref = _torch_images(tiny_digits_ddim, plan, labels, seeds)
    out = OnnxSampler(result.folder, threads=1)(labels, _noise(tiny_digits_ddim, seeds))
    assert np.abs(out.images - ref).max() <= TOL


def test_export_leaves_the_model_as_it_was(tiny_digits, mixed, tmp_path):
    plan, _ = mixed
    model = tiny_digits.transformer
    before = tiny_digits.generate([1], [3], steps=STEPS).numpy()
    export_plan(tiny_digits.pipe, plan, tmp_path / "again", flops=False, check=False)
    assert not model.training
    assert "forward" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert np.array_equal(tiny_digits.generate([1], [3], steps=STEPS).numpy(), before)


def test_shipped_plan_digits_flow_40(tmp_path):
    """The issue's acceptance run: ``cachec export plans/digits-flow-40.yaml --onnx out/``, then onnxruntime."""
    from cachec.loading import load_model

    runner = CliRunner()
    res = runner.invoke(main, ["export", str(ROOT / "plans" / "digits-flow-40.yaml"), "--onnx", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "onnx.checker full check passed" in res.output
    assert "units agree with the plan's costs" in res.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    plan = load_plan(ROOT / "plans" / "digits-flow-40.yaml")
    assert sum(s["flops"] for s in m["steps"]) / (plan.steps * plan.budget.full_step_flops) == pytest.approx(
        plan.budget.realised, rel=1e-6)
    driver = load_model("digits-flow")
    labels, seeds = [0, 3, 8], [0, 1, 2]
    ref = _torch_images(driver, plan, labels, seeds)
    out = OnnxSampler(tmp_path / "out", threads=1)(labels, _noise(driver, seeds))
    assert np.abs(out.images - ref).max() <= TOL
    assert out.report.flops_fraction == pytest.approx(plan.budget.realised, rel=1e-6)


def test_bad_plan_model_pair_is_one_line(tiny_digits, tiny_digits_ddim, mixed, tmp_path):
    plan, _ = mixed
    runner = CliRunner()
    # the shipped plan on the tiny model: other weights
    res = runner.invoke(main, ["export", str(ROOT / "plans" / "digits-flow-40.yaml"), tiny_digits.name,
                               "--onnx", str(tmp_path / "a")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and res.output.count("\n") == 1, res.output
    assert "other weights" in res.output or "does not have" in res.output
    assert not (tmp_path / "a").exists()
    # the same weights with another scheduler
    res = runner.invoke(main, ["export", str(plan.source), tiny_digits_ddim.name, "--onnx", str(tmp_path / "b")])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "FlowMatchEulerDiscreteScheduler" in res.output and "DDIMScheduler" in res.output
    with pytest.raises(ExportError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        export_plan(tiny_digits.pipe, plan, tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_plan(tiny_digits.pipe, plan, tmp_path / "busy")
    with pytest.raises(ManifestError, match="holds no manifest.json"):
        OnnxSampler(tmp_path / "busy")


def test_cli_export_verify(tiny_digits, mixed, tmp_path):
    plan, _ = mixed
    res = CliRunner().invoke(main, ["export", str(plan.source), tiny_digits.name, "--onnx", str(tmp_path / "v"),
                                    "--no-flops", "--verify", "2"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("verify"))
    assert float(line.split("max abs diff ")[1].split(";")[0]) <= TOL
    # exporting while a plan is applied (its hooks would be traced) is refused
    with apply(tiny_digits, plan):
        with pytest.raises(ExportError, match="hooked"):
            export_plan(tiny_digits.pipe, plan, tmp_path / "w")


def test_loop_imports_no_torch():
    code = "import sys, cachec.runtime.onnx_loop, cachec.runtime.onnx_graph; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
