"""The unit registry: how each supported transformer family splits into cacheable units.

A *unit* is the smallest thing a plan can skip: one branch of one block whose output can be replaced by a
prediction. Branch outputs are taken **before** the adaLN gate (as FORA/EOC/GOC do); the gate and the
modulation are always recomputed. Where the branches are fused (FLUX single-stream blocks) the unit is the
whole block's residual ``output − input``. Unit names are module paths (``transformer_blocks.7.attn1``).

The registry is declarative: one :class:`FamilySpec` per transformer class, listing for each block list the
child modules that are units. :func:`find_units` is the only entry point.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The model class has no entry in the unit registry."""


@dataclass(frozen=True)
class UnitSpec:
    """One cacheable unit.

    Attributes:
        name: module path inside the transformer, e.g. ``"transformer_blocks.7.attn1"``.
        kind: ``"attn"`` (self-attention), ``"cross_attn"``, ``"joint_attn"`` (SD3/FLUX joint attention,
            tuple output: image stream, context stream), ``"ff"``, ``"ff_context"`` or ``"block"``.
        mode: ``"output"`` — the feature is the module's return value (tensor or tuple of tensors);
            ``"residual"`` — the feature is ``output − input`` of the block, part by part.
        residual_inputs: for ``mode="residual"``: the names of the forward arguments that the output parts
            add to, in output order (FLUX single blocks return ``(encoder_hidden_states, hidden_states)``).
    """

    name: str
    kind: str
    mode: str = "output"
    residual_inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one transformer family.

    Attributes:
        blocks: ``{block_list_attribute: ((child_attribute, kind), ...)}``; a child that is ``None`` on a
            given block (e.g. SD3's last ``ff_context``) is not a unit. A child name of ``""`` makes the
            whole block a residual unit.
        residual_inputs: for whole-block units, see :attr:`UnitSpec.residual_inputs`.
        guidance_scale_is_cfg: the pipelines' ``guidance_scale`` switches classifier-free guidance (CFG
            branches when ``> 1``, as in DiT, PixArt, SD3). False for FLUX, whose ``guidance_scale`` is an
            embedded (distilled) guidance and whose CFG (``true_cfg_scale``) is always split calls.
    """

    blocks: dict[str, tuple[tuple[str, str], ...]]
    residual_inputs: tuple[str, ...] = ()
    guidance_scale_is_cfg: bool = True


_DIT_LIKE = FamilySpec(blocks={"transformer_blocks": (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "ff"))})

#: transformer class name -> family description
REGISTRY: dict[str, FamilySpec] = {
    "DiTTransformer2DModel": _DIT_LIKE,
    "PixArtTransformer2DModel": _DIT_LIKE,
    "SD3Transformer2DModel": FamilySpec(
        blocks={
            "transformer_blocks": (
                ("attn", "joint_attn"),
                ("attn2", "attn"),
                ("ff", "ff"),
                ("ff_context", "ff_context"),
            )
        }
    ),
    "FluxTransformer2DModel": FamilySpec(
        blocks={
            "transformer_blocks": (("attn", "joint_attn"), ("ff", "ff"), ("ff_context", "ff_context")),
            "single_transformer_blocks": (("", "block"),),
        },
        residual_inputs=("encoder_hidden_states", "hidden_states"),
        guidance_scale_is_cfg=False,
    ),
}


def unwrap(transformer):
    """The underlying ``nn.Module`` of a (possibly ``torch.compile``-wrapped) transformer."""
    return getattr(transformer, "_orig_mod", transformer)


def family_spec(transformer) -> FamilySpec:
    """The registry entry of a (possibly compiled) transformer.

    Raises:
        UnsupportedModelError: the class is not registered (the message names it and the supported ones).
    """
    cls = type(unwrap(transformer)).__name__
    family = REGISTRY.get(cls)
    if family is None:
        raise UnsupportedModelError(
            f"cachec has no unit registry entry for {cls}; supported transformer classes: {', '.join(sorted(REGISTRY))}"
        )
    return family


def find_units(transformer) -> list[UnitSpec]:
    """List the cacheable units of a transformer, in execution order.

    Args:
        transformer: a diffusers transformer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``), possibly wrapped by ``torch.compile``.

    Returns:
        The units, block by block, branch by branch.

    Raises:
        UnsupportedModelError: the class is not registered (the message names it and the supported ones).
    """
    model = unwrap(transformer)
    cls = type(model).__name__
    family = family_spec(model)
    units: list[UnitSpec] = []
    for list_name, children in family.blocks.items():
        for i, block in enumerate(getattr(model, list_name, None) or []):
            for child, kind in children:
                if child == "":
                    units.append(UnitSpec(f"{list_name}.{i}", kind, "residual", family.residual_inputs))
                elif getattr(block, child, None) is not None:
                    units.append(UnitSpec(f"{list_name}.{i}.{child}", kind))
    if not units:
        raise UnsupportedModelError(f"{cls} has no transformer blocks, so there is nothing to cache")
    return units
