"""Cacheable units: how a registered transformer splits into the things a plan can skip.

A *unit* is the smallest thing a plan can skip: one branch of one block whose output can be replaced by a
prediction. Branch outputs are taken **before** the adaLN gate (as FORA/EOC/GOC do); the gate and the
modulation are always recomputed. Where the branches are fused (FLUX single-stream blocks) the unit is the
whole block's residual ``output − input``. Unit names are module paths (``transformer_blocks.7.attn1``).

Which children of which blocks are units is declared per family in the model registry
(:attr:`cachec.runtime.registry.ModelSpec.blocks`); :func:`find_units` is the only entry point that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import UnsupportedModelError, spec_for_transformer, unwrap

__all__ = ["UnitSpec", "UnsupportedModelError", "find_units", "unwrap"]


@dataclass(frozen=True)
class UnitSpec:
    """One cacheable unit.

    Attributes:
        name: module path inside the transformer, e.g. ``"transformer_blocks.7.attn1"``.
        kind: ``"attn"`` (self-attention), ``"cross_attn"``, ``"joint_attn"`` (SD3/FLUX joint attention,
            tuple output: image stream, context stream), ``"ff"``, ``"ff_context"``, ``"block"`` or
            ``"control_block"`` (a ControlNet block's residual, ``digits-mmdit-control``).
        mode: ``"output"`` — the feature is the module's return value (tensor or tuple of tensors);
            ``"residual"`` — the feature is ``output − input`` of the block, part by part.
        residual_inputs: for ``mode="residual"``: the names of the forward arguments that the output parts
            add to, in output order (FLUX single blocks return ``(encoder_hidden_states, hidden_states)``).
    """

    name: str
    kind: str
    mode: str = "output"
    residual_inputs: tuple[str, ...] = ()


def _block_list(model, path: str):
    """The block list at ``path`` (a child module, or a dotted path such as ``controlnet.transformer_blocks``;
    ``torch.nn.Module.get_submodule``); empty when the model has none there."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return []


def find_units(transformer) -> list[UnitSpec]:
    """List the cacheable units of a transformer, in execution order.

    Args:
        transformer: a transformer whose class is registered (diffusers' ``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, or one added
            with :func:`cachec.runtime.registry.register`), possibly wrapped by ``torch.compile``.

    Returns:
        The units, block by block, branch by branch.

    Raises:
        UnsupportedModelError: the class is not registered (the message names it and the supported ones),
            or the model has no unit at all.
    """
    model = unwrap(transformer)
    spec = spec_for_transformer(model)
    units: list[UnitSpec] = []
    for list_name, children in spec.blocks.items():
        for i, block in enumerate(_block_list(model, list_name)):
            for child, kind in children:
                if child == "":
                    units.append(UnitSpec(f"{list_name}.{i}", kind, "residual", spec.residual_inputs))
                elif getattr(block, child, None) is not None:
                    units.append(UnitSpec(f"{list_name}.{i}.{child}", kind))
    if not units:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformer blocks, so there is nothing to cache")
    return units
