"""cachec.runtime.attention_maps: the attention probability map as a child module (HGC map reuse).

Tiny random diffusers models built from configs: the materialised processors reproduce the originals to
float rounding, the child's output is what the attention uses, remove() restores the model exactly, a
foreign processor is refused without leaving anything behind, and the map's FLOPs are counted in the child.
"""

from __future__ import annotations

import pytest
import torch

from cachec.runtime.attention_maps import (
    MAP_CHILD,
    AttentionMap,
    MapAttnProcessor,
    MapJointAttnProcessor,
    map_paths,
    materialise,
)

DIT_MAPS = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
FLUX_MAPS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
TOL = dict(rtol=1e-5, atol=1e-5)


def _dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        norm_type="ada_norm_zero", num_embeds_ada_norm=1000,
    ).eval()


def _dit_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                class_labels=torch.randint(0, 1000, (2,), generator=g))


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    ).eval()


def _flux_inputs(seed: int, text: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten().float(), cols.flatten().float()], dim=-1)
    return dict(hidden_states=torch.randn(2, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(2, text, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.3, 0.9]),
                img_ids=img_ids, txt_ids=torch.zeros(text, 3))


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _processors(model) -> dict:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def _record_maps(model, paths, inputs) -> dict:
    """P of every materialised path for ``inputs`` (forward hooks on the children)."""
    maps = {}
    hooks = [model.get_submodule(f"{p}.{MAP_CHILD}").register_forward_hook(
        lambda mod, args, out, p=p: maps.__setitem__(p, out)) for p in paths]
    _run(model, inputs)
    for h in hooks:
        h.remove()
    return maps


def test_dit_matches_original():
    model = _dit()
    inputs = [_dit_inputs(1), _dit_inputs(2)]
    before = [_run(model, x) for x in inputs]
    with materialise(model, DIT_MAPS) as handle:
        assert handle.paths == tuple(DIT_MAPS)
        for path in DIT_MAPS:
            attn = model.get_submodule(path)
            assert isinstance(getattr(attn, MAP_CHILD), AttentionMap)
            assert isinstance(attn.processor, MapAttnProcessor)
        after = [_run(model, x) for x in inputs]
        maps = _record_maps(model, DIT_MAPS, inputs[0])
    assert not torch.allclose(before[0], before[1])
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, **TOL)
    p = maps[DIT_MAPS[0]]
    assert p.shape == (2, 2, 16, 16) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 16))
    print("DiT max abs diff", max(float((a - b).abs().max()) for a, b in zip(before, after)))


def test_flux_dual_and_single_match_original():
    model = _flux()
    inputs = [_flux_inputs(1), _flux_inputs(2)]
    before = [_run(model, x) for x in inputs]
    with materialise(model, FLUX_MAPS):
        assert all(isinstance(model.get_submodule(p).processor, MapJointAttnProcessor) for p in FLUX_MAPS)
        after = [_run(model, x) for x in inputs]
        maps = _record_maps(model, FLUX_MAPS, inputs[0])
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, **TOL)
    for path in FLUX_MAPS:  # text (5) + image (16) tokens, context first, in both kinds of block
        assert maps[path].shape == (2, 2, 21, 21)
    print("FLUX max abs diff", max(float((a - b).abs().max()) for a, b in zip(before, after)))


def test_16_bit():
    """bfloat16: P stays bfloat16 (softmax in float32), the output matches the original to bf16 rounding."""
    model = _dit().to(torch.bfloat16)
    inputs = _dit_inputs(1)
    inputs["hidden_states"] = inputs["hidden_states"].to(torch.bfloat16)
    before = _run(model, inputs)
    with materialise(model, DIT_MAPS):
        after = _run(model, inputs)
        maps = _record_maps(model, DIT_MAPS, inputs)
    assert maps[DIT_MAPS[0]].dtype == torch.bfloat16 and after.dtype == torch.bfloat16
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_child_output_is_used(family):
    model, paths, make = (_dit(), DIT_MAPS, _dit_inputs) if family == "dit" else (_flux(), FLUX_MAPS, _flux_inputs)
    a, b = make(1), make(2)
    with materialise(model, paths):
        maps_a, maps_b = _record_maps(model, paths, a), _record_maps(model, paths, b)
        plain_b = _run(model, b)
        for stored, same in ((maps_a, False), (maps_b, True)):
            if family == "dit":  # a forward hook replacing the output
                hooks = [model.get_submodule(f"{p}.{MAP_CHILD}").register_forward_hook(
                    lambda mod, args, out, p=p: stored[p]) for p in paths]
            else:  # the hook core's way: an instance `forward` on the child
                for p in paths:
                    model.get_submodule(f"{p}.{MAP_CHILD}").forward = lambda *args, p=p, **kw: stored[p]
            out = _run(model, b)
            for p in paths:
                child = model.get_submodule(f"{p}.{MAP_CHILD}")
                child.__dict__.pop("forward", None)
            if family == "dit":
                for h in hooks:
                    h.remove()
            assert torch.equal(out, plain_b) == same
        assert torch.equal(_run(model, b), plain_b)


def test_remove_restores_exactly():
    for model, paths, inputs in ((_dit(), DIT_MAPS, _dit_inputs(3)), (_flux(), FLUX_MAPS, _flux_inputs(3))):
        processors, keys, before = _processors(model), list(model.state_dict()), _run(model, inputs)
        handle = materialise(model, paths)
        assert any(MAP_CHILD in name for name, _ in model.named_modules())
        assert list(model.state_dict()) == keys  # the child holds no parameters and no cycle
        handle.remove()
        handle.remove()
        after = _processors(model)
        assert after.keys() == processors.keys() and all(after[k] is processors[k] for k in processors)
        assert not any(MAP_CHILD in name for name, _ in model.named_modules())
        assert not any(hasattr(model.get_submodule(p), MAP_CHILD) for p in paths)
        assert list(model.state_dict()) == keys
        assert torch.equal(_run(model, inputs), before)
        materialise(model, paths).remove()  # can be materialised again


def test_refusals_leave_nothing_behind():
    from diffusers.models.attention_processor import AttnProcessor

    model = _dit()
    foreign = AttnProcessor()
    model.get_submodule(DIT_MAPS[1]).set_processor(foreign)
    processors = _processors(model)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1.*AttnProcessor\b.*remove the other library"):
        materialise(model, DIT_MAPS)
    with pytest.raises(KeyError, match="transformer_blocks.7.attn1"):
        materialise(model, [DIT_MAPS[0], "transformer_blocks.7.attn1"])
    with pytest.raises(ValueError, match="not a diffusers attention"):
        materialise(model, [DIT_MAPS[0], "transformer_blocks.0.ff"])
    with pytest.raises(ValueError, match="already materialised"):
        materialise(model, [DIT_MAPS[0], DIT_MAPS[0]])
    after = _processors(model)
    assert all(after[k] is processors[k] for k in processors)
    assert not any(MAP_CHILD in name for name, _ in model.named_modules())
    with materialise(model, DIT_MAPS[:1]):
        with pytest.raises(ValueError, match="already materialised"):
            materialise(model, DIT_MAPS[:1])


def test_map_flops_are_counted_in_the_child():
    from cachec.runtime.flops import count_flops, relative_module_flops

    model, inputs = _dit(), _dit_inputs(1)
    batch, tokens, dim = 2, 16, 16  # (8/2)² patches, inner dim 2 heads × 8
    with materialise(model, DIT_MAPS), torch.no_grad():
        _, _, per_module = count_flops(model, **inputs)
    rel = relative_module_flops(per_module, model)
    child = rel["transformer_blocks.0.attn1.cachec_map"] / batch
    assert child == 2 * (2 * tokens * dim * dim) + 2 * tokens * tokens * dim  # Q, K projections + Q·Kᵀ
    assert rel["transformer_blocks.0.attn1"] / batch == 2 * child  # V, P·V, to_out: the other half


def test_masks_and_cross_attention():
    """Paths the tiny models do not take: a cross-attention with a mask, a FluxAttention with a 2-D mask."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(0)
    model = torch.nn.ModuleDict(dict(
        cross=Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8),
        flux=FluxAttention(query_dim=16, heads=2, dim_head=8, bias=True, added_kv_proj_dim=16)))
    x, ctx, ctx16 = torch.randn(2, 6, 16), torch.randn(2, 4, 12), torch.randn(2, 4, 16)
    keep = torch.tensor([[True] * 4, [True, True, False, False]])
    bias = torch.where(keep, 0.0, -10000.0)

    def calls():
        with torch.no_grad():
            return (model["cross"](x, ctx, attention_mask=bias), *model["flux"](x, ctx16),
                    *model["flux"](x, ctx16, attention_mask=torch.cat([keep, torch.ones(2, 6, dtype=torch.bool)], 1)))

    before = calls()
    assert not torch.allclose(before[3], before[1])  # the mask matters
    with torch.no_grad():
        assert not torch.allclose(before[0], model["cross"](x, ctx))
    with materialise(model, ["cross", "flux"]):
        after = calls()
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, **TOL)
    assert map_paths(["flux", "flux.cachec_map", "a.attn1.cachec_map"]) == ("flux", "a.attn1")
