"""The tiny fixtures load through cachec.loading, sample, and split into the expected units."""

from __future__ import annotations

import pytest
import torch

from cachec.runtime.units import UnsupportedModelError, find_units

EXPECTED_UNITS = {
    # DiT has no cross-attention (attn2 is None)
    "dit": [f"transformer_blocks.{i}.{c}" for i in range(2) for c in ("attn1", "ff")],
    "pixart": [f"transformer_blocks.{i}.{c}" for i in range(2) for c in ("attn1", "attn2", "ff")],
    # the last SD3 block is context_pre_only: no ff_context
    "sd3": [
        "transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
        "transformer_blocks.1.attn", "transformer_blocks.1.ff",
    ],
    "flux": [
        "transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
        "single_transformer_blocks.0",
    ],
    "digits": [f"transformer_blocks.{i}.{c}" for i in range(2) for c in ("attn1", "ff")],
}


def _conditions(driver, n=2):
    return list(range(n)) if driver.condition_kind == "class" else ["a red cat", "blue tree"][:n]


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_tiny_pipeline_generates_and_units(tiny_pipelines, family):
    driver = tiny_pipelines[family]
    images = driver.generate(_conditions(driver), [0, 1], steps=4)
    assert images.shape == (2, 3, 32, 32)
    assert images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert [u.name for u in find_units(driver.transformer)] == EXPECTED_UNITS[family]
    # same seeds -> same images; a different seed changes them
    assert torch.equal(images, driver.generate(_conditions(driver), [0, 1], steps=4))
    assert not torch.equal(images, driver.generate(_conditions(driver), [0, 2], steps=4))


@pytest.mark.parametrize("fixture", ["tiny_digits", "tiny_digits_ddim"])
def test_tiny_digits_generates_and_units(request, fixture):
    driver = request.getfixturevalue(fixture)
    assert driver.condition_kind == "class" and driver.num_classes == 10
    for cfg in ("batched", "split"):
        images = driver.generate([3, 7], [0, 1], steps=4, cfg=cfg)
        assert images.shape == (2, 1, 32, 32)
        assert torch.isfinite(images).all()
    assert [u.name for u in find_units(driver.transformer)] == EXPECTED_UNITS["digits"]
    residual = [u for u in find_units(driver.transformer) if u.mode != "output"]
    assert residual == []


def test_flux_single_block_is_a_residual_unit(tiny_pipelines):
    units = {u.name: u for u in find_units(tiny_pipelines["flux"].transformer)}
    single = units["single_transformer_blocks.0"]
    assert single.mode == "residual" and single.kind == "block"
    assert single.residual_inputs == ("encoder_hidden_states", "hidden_states")
    assert units["transformer_blocks.0.attn"].kind == "joint_attn"


def test_unknown_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="supported transformer classes"):
        find_units(torch.nn.Linear(2, 2))
