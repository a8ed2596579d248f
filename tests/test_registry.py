"""The model registry: a new family needs one entry and nothing else; no other module names model classes.

The toy family is a renamed ``DiTTransformer2DModel`` (a subclass, so its class name is new) driven by a
toy pipeline with diffusers' calling convention that puts the *unconditional* half first in batched CFG and
needs a fixed extra call keyword. With only its registry entry added, units are found (with the entry's
layout), a full plan is traced, a skip plan runs, and calibration records the branches in the right order.
"""

from __future__ import annotations

import ast
import pathlib
import re
from types import SimpleNamespace

import pytest
import torch

from cachec.runtime import registry
from cachec.runtime.registry import ModelSpec, UnsupportedModelError, spec_for_pipeline, spec_for_transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("cachec", "calibrate", "planner", "runtime", "plans")  # the package's source folders
STEPS = 4


def _toy_classes():
    from diffusers import DiTTransformer2DModel

    class ToyDiT(DiTTransformer2DModel):
        """A DiT under a class name no registry entry knows."""

    class ToyPipeline:
        """diffusers' calling convention; batched CFG as ``[null, labels]`` (unconditional first)."""

        def __init__(self, transformer, scheduler):
            self.transformer, self.scheduler = transformer, scheduler

        @torch.no_grad()
        def __call__(self, class_labels, num_inference_steps, guidance_scale, generator, output_type, toy_flag=None):
            assert toy_flag == "on" and output_type == "pt"  # the entry's call_kwargs arrive
            cfg = self.transformer.config
            labels = torch.as_tensor(class_labels)
            null = torch.full_like(labels, cfg.num_embeds_ada_norm)
            n = labels.numel()
            shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
            x = torch.stack([torch.randn(shape, generator=g) for g in generator])
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                if guidance_scale > 1:
                    out = self.transformer(
                        hidden_states=torch.cat([x, x]), timestep=t.expand(2 * n), class_labels=torch.cat([null, labels])
                    ).sample
                    uncond, cond = out.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                else:
                    pred = self.transformer(hidden_states=x, timestep=t.expand(n), class_labels=labels).sample
                x = self.scheduler.step(pred, t, x).prev_sample
            return SimpleNamespace(images=(x.clamp(-1, 1) + 1) / 2)

    return ToyDiT, ToyPipeline


TOY_SPEC = ModelSpec(
    name="toy",
    transformers=("ToyDiT",),
    pipelines=("ToyPipeline",),
    blocks={"transformer_blocks": (("ff", "ff"),)},  # only the feed-forwards are units of this family
    cond_first=False,
    condition="class",
    call_kwargs={"toy_flag": "on"},
    step_callback=False,
    default_steps=STEPS,
    default_guidance=3.0,
)


@pytest.fixture
def toy_driver():
    """A Driver over the toy family, registered for the test only (the registry is restored after)."""
    from cachec.loading import Driver
    from cachec.reference import TRANSFORMER_CONFIG, make_scheduler

    before = registry.registered()
    ToyDiT, ToyPipeline = _toy_classes()
    torch.manual_seed(0)
    transformer = ToyDiT(**dict(TRANSFORMER_CONFIG, num_layers=2, num_attention_heads=2, attention_head_dim=16)).eval()
    pipe = ToyPipeline(transformer, make_scheduler("flow"))
    registry.register(TOY_SPEC)
    try:
        spec = spec_for_pipeline(pipe)
        size = transformer.config.sample_size
        yield Driver(pipe, "toy", spec.condition, transformer.config.num_embeds_ada_norm, spec.default_steps,
                     spec.default_guidance, (size, size))
    finally:
        registry.unregister(TOY_SPEC.name)
    assert registry.registered() == before
    with pytest.raises(UnsupportedModelError, match="ToyDiT"):
        spec_for_transformer(transformer)


def test_a_family_added_by_one_registry_entry_plans_runs_and_calibrates(toy_driver, tmp_path):
    from cachec.calibrate import calibrate, read_header
    from cachec.runtime import apply, find_units, full_plan, with_actions

    driver = toy_driver
    names = [u.name for u in find_units(driver.transformer)]
    assert names == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"]

    conds, seeds = [3, 7], [0, 1]
    plain = driver.generate(conds, seeds)
    assert plain.shape == (2, 1, 32, 32) and torch.isfinite(plain).all()
    base = full_plan(driver, steps=STEPS)
    assert base.model.cls == "ToyDiT" and base.steps == STEPS
    assert (base.sampler.guidance.mode, base.sampler.guidance.branches) == ("batched", 2)
    with apply(driver, base):
        assert torch.equal(driver.generate(conds, seeds), plain)  # the 100 % plan is a bitwise no-op
    skip = with_actions(base, {"transformer_blocks.1.ff": "CC.C"})
    with apply(driver, skip) as handle:
        cached = driver.generate(conds, seeds)
    assert handle.report.skipped == 1 and handle.report.complete
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)

    out = calibrate(driver, [1, 2], output=tmp_path / "toy.safetensors", steps=3, batch_size=2,
                    sensitivity="none", progress=False)
    h = read_header(out)
    assert h["guidance"] == {"mode": "batched", "scale": 3.0, "branches": 2}
    assert [u["name"] for u in h["units"]] == names
    with pytest.raises(ValueError, match="only runs batched CFG"):
        calibrate(driver, [1], output=tmp_path / "split.safetensors", steps=2, cfg="split", progress=False)


def test_calibration_reads_the_batched_cfg_half_order_from_the_entry(toy_driver):
    """Branch 0 is the conditional branch although the toy pipeline puts it second: at step 0 both runs see
    the same noise, so the guided run's branch 0 is the unguided run's only branch."""
    from cachec.calibrate.recorder import Recorder, StepTracker, batched_cond_first
    from cachec.calibrate.streaming import BatchRecord
    from cachec.runtime.hooks import install
    from cachec.runtime.units import find_units

    driver = toy_driver
    assert batched_cond_first(driver.pipe) is False
    units = find_units(driver.transformer)

    def record(guidance):
        tracker = StepTracker(driver.transformer, 2, batched_cond_first(driver.pipe))
        recorder = Recorder(units, tracker)
        recorder.record = BatchRecord(2, 0, "channel", sketch_dim=0)  # exact: the sketches are the features
        with install(driver.transformer, units, recorder):
            recorder.start_run(2)
            driver.generate([3, 7], [0, 1], steps=2, guidance=guidance)
            recorder.finish_run()
        return recorder.record.y

    guided, unguided = record(3.0), record(1.0)
    for u in range(len(units)):
        single = unguided[u][0][:, 0]
        assert torch.allclose(guided[u][0][:, 0], single, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(guided[u][1][:, 0], single, atol=1e-3)


def test_lookups_name_the_class_and_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"Linear.*DiTTransformer2DModel.*FluxTransformer2DModel"):
        spec_for_transformer(torch.nn.Linear(2, 2))

    class NotAPipeline:
        pass

    with pytest.raises(UnsupportedModelError, match=r"NotAPipeline.*DiTPipeline.*Flux\*Pipeline"):
        spec_for_pipeline(NotAPipeline())
    compiled = SimpleNamespace(_orig_mod=_named("SD3Transformer2DModel")())  # what torch.compile wraps
    assert spec_for_transformer(compiled).name == "sd3"
    assert spec_for_pipeline(_named("PixArtAlphaPipeline")()).call_kwargs["use_resolution_binning"] is False
    assert spec_for_pipeline(_named("FluxKontextPipeline")()).default_guidance == 3.5


def _named(name: str):
    return type(name, (), {})


def test_registry_entries_keep_the_families_behaviour():
    by_name = {s.name: s for s in registry.registered()}
    assert list(by_name) == ["dit", "pixart", "sd3", "flux", "digits", "digits-mmdit", "digits-mmdit-control"]
    # condition kind, batched-CFG half order, split CFG, defaults the front end used before the registry
    facts = {n: (s.condition, s.cond_first, s.split_cfg, s.default_steps, s.default_guidance, s.guidance_scale_is_cfg)
             for n, s in by_name.items()}
    assert facts == {
        "dit": ("class", True, False, 20, 4.0, True),
        "pixart": ("prompt", False, False, 20, 4.5, True),
        "sd3": ("prompt", False, False, 20, 4.5, True),
        "flux": ("prompt", False, False, 20, 3.5, False),
        "digits": ("class", True, True, None, None, True),
        "digits-mmdit": ("prompt", True, True, None, None, False),
        "digits-mmdit-control": ("prompt", True, True, None, None, False),
    }
    # neither DiTPipeline nor the PixArt pipelines call callback_on_step_end (PixArt swallows it in **kwargs)
    assert by_name["dit"].step_callback is False and by_name["pixart"].step_callback is False
    assert by_name["sd3"].step_callback is True and by_name["flux"].step_callback is True
    # sizes and evaluation: text families take a size, the digit metrics apply to the digit models only
    assert {n: (s.takes_size, s.digit_metrics, s.eval_samples) for n, s in by_name.items()} == {
        "dit": (False, False, 8), "pixart": (True, False, 8), "sd3": (True, False, 8), "flux": (True, False, 8),
        "digits": (False, True, 100), "digits-mmdit": (False, True, 90), "digits-mmdit-control": (False, True, 90)}
    # the DiT transformer answers with the first family that names it; both agree on its unit layout
    assert spec_for_transformer(_named("DiTTransformer2DModel")()).name == "dit"
    assert by_name["dit"].unit_layout() == by_name["digits"].unit_layout()
    # likewise the FLUX transformer: the prompt-conditioned digit model shares the flux family's layout
    assert spec_for_transformer(_named("FluxTransformer2DModel")()).name == "flux"
    assert by_name["flux"].unit_layout() == by_name["digits-mmdit"].unit_layout()


def test_register_refuses_a_taken_name_and_a_conflicting_layout():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TOY_SPEC.__class__(**{**TOY_SPEC.__dict__, "name": "dit"}))
    clash = ModelSpec(name="clash", transformers=("FluxTransformer2DModel",), pipelines=("ClashPipeline",),
                      blocks={"transformer_blocks": (("ff", "ff"),)})
    with pytest.raises(ValueError, match="differently"):
        registry.register(clash)
    assert "clash" not in {s.name for s in registry.registered()}


def _string_literals(path: pathlib.Path):
    """(line, text) of every string constant of a module that is not a docstring (f-string parts included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_only_the_registry_names_model_and_pipeline_classes():
    names = set()
    for spec in registry.registered():
        names.update(spec.transformers)
        names.update(p.split("*")[0] for p in spec.pipelines)  # a pattern's literal prefix: "Flux", "PixArt"
    # "our pipeline" probes (hasattr(pipe, "initial_noise")) are model knowledge too: use the entry's split_cfg
    pattern = re.compile("|".join(sorted(map(re.escape, names | {"initial_noise"}))))
    found = {}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            hits = [f"{line}: {text[:60]!r}" for line, text in _string_literals(path) if pattern.search(text)]
            if hits:
                found[str(path.relative_to(ROOT))] = hits
    assert "runtime/registry.py" in found  # the scan sees the names where they are
    del found["runtime/registry.py"]
    assert found == {}, f"model or pipeline class names outside runtime/registry.py: {found}"


class _Forward(torch.nn.Module):
    def forward(self, hidden_states, timestep=None):
        return hidden_states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, None])
def test_calibration_accepts_exactly_the_timesteps_plan_execution_accepts(dtype):
    """StepTracker (calibration) and PlanExecutor (runtime) both locate a step with hooks.same_timestep."""
    from cachec.calibrate.recorder import StepTracker
    from cachec.runtime.hooks import TIMESTEP_ULPS, same_timestep

    ref = 749.0 if dtype == torch.int64 else 0.7490234375 * 1000
    eps = torch.finfo(dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32).eps
    offsets = [0.0, 1.0, 1.0 - 1e-3, TIMESTEP_ULPS - 0.5, TIMESTEP_ULPS + 0.5, 64.0, -3.0, -5.0]
    candidates = [ref * (1 + k * eps) for k in offsets] + [ref + 1.0, ref - 1.0]
    x = torch.zeros(1, 2)
    outcomes = set()
    for t in candidates:
        passed = torch.tensor([t], dtype=dtype) if dtype is not None else t
        received = float(passed.reshape(-1)[0].item()) if dtype is not None else float(t)
        tracker = StepTracker(_Forward(), 1, schedule=[ref])
        tracker.start_run(1)
        try:
            tracker.on_call((), dict(hidden_states=x, timestep=passed))
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == same_timestep(ref, received, dtype), (t, dtype)
        outcomes.add(accepted)
    assert outcomes == {True, False}
