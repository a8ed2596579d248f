"""Cacheable units: how a registered transformer splits into the things a plan can skip.

A *unit* is the smallest thing a plan can skip: one branch of one block whose output can be replaced by a
prediction. Branch outputs are taken **before** the adaLN gate (as FORA/EOC/GOC do); the gate and the
modulation are always recomputed. Where the branches are fused (FLUX single-stream blocks) the unit is the
whole block's residual ``output − input``. Unit names are module paths (``transformer_blocks.7.attn1``).

Which children of which blocks are units is declared per family in the model registry
(:attr:`cachec.runtime.registry.ModelSpec.blocks`); :func:`find_units` is the only entry point that reads it.

*Attention-map units* (kind ``"attn_map"``, asked for with ``attention_maps=True``; docs/hgc.md) are nested:
the probability map of an attention (:mod:`cachec.runtime.attention_maps`, child ``cachec_map``) inside a unit
that is skipped whole. A nested unit runs only when its *parent* (the unit whose name is the longest dotted
prefix of its name) computes; the parent's FLOPs are counted without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import UnsupportedModelError, spec_for_transformer, unwrap

__all__ = ["MAP_CHILD", "UnitSpec", "is_map_unit", "units_by_name", "UnsupportedModelError", "find_units", "parent_units", "unwrap"]


#: the attribute name of an attention's materialised probability-map child (:mod:`cachec.runtime.attention_maps`)
MAP_CHILD = "cachec_map"


def is_map_unit(name: str) -> bool:
    """Whether a unit name (a plan's or a calibration's) is an attention-map unit's."""
    return name.endswith(f".{MAP_CHILD}")


@dataclass(frozen=True)
class UnitSpec:
    """One cacheable unit.

    Attributes:
        name: module path inside the transformer, e.g. ``"transformer_blocks.7.attn1"``.
        kind: ``"attn"`` (self-attention), ``"cross_attn"``, ``"joint_attn"`` (SD3/FLUX joint attention,
            tuple output: image stream, context stream), ``"ff"``, ``"ff_context"``, ``"block"`` or
            ``"control_block"`` (a ControlNet block's residual, ``digits-mmdit-control``) or ``"attn_map"`` (an
            attention's probability map, nested in the unit ``parent``).
        mode: ``"output"`` — the feature is the module's return value (tensor or tuple of tensors);
            ``"residual"`` — the feature is ``output − input`` of the block, part by part.
        residual_inputs: for ``mode="residual"``: the names of the forward arguments that the output parts
            add to, in output order (FLUX single blocks return ``(encoder_hidden_states, hidden_states)``).
        parent: the name of the unit this one is nested in (``""``: none).
    """

    name: str
    kind: str
    mode: str = "output"
    residual_inputs: tuple[str, ...] = ()
    parent: str = ""


def parent_units(names) -> list[int | None]:
    """Per unit name, the index of its parent: the unit whose name is the longest dotted prefix of it
    (``"single_transformer_blocks.2"`` for ``"single_transformer_blocks.2.attn.cachec_map"``), None when no
    other name is. Plans and calibrations store names only; this is how both recover the nesting."""
    names = list(names)
    index = {n: i for i, n in enumerate(names)}
    out: list[int | None] = []
    for n in names:
        parts, found = n.split("."), None
        for k in range(len(parts) - 1, 0, -1):
            found = index.get(".".join(parts[:k]))
            if found is not None:
                break
        out.append(found)
    return out


def _block_list(model, path: str):
    """The block list at ``path`` (a child module, or a dotted path such as ``controlnet.transformer_blocks``;
    ``torch.nn.Module.get_submodule``); empty when the model has none there."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return []


def find_units(transformer, attention_maps: bool = False) -> list[UnitSpec]:
    """List the cacheable units of a transformer, in execution order.

    Args:
        transformer: a transformer whose class is registered (diffusers' ``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, or one added
            with :func:`cachec.runtime.registry.register`), possibly wrapped by ``torch.compile``.
        attention_maps: also list the attention-map units the registry declares
            (:attr:`~cachec.runtime.registry.ModelSpec.attention_maps`), each right after the unit it is nested
            in. Their modules exist only while hooks are installed (:func:`cachec.runtime.hooks.install`
            materialises them).

    Returns:
        The units, block by block, branch by branch.

    Raises:
        UnsupportedModelError: the class is not registered (the message names it and the supported ones),
            the model has no unit at all, or ``attention_maps`` is asked of a family that declares none.
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
    if attention_maps:
        units = _with_maps(model, spec, units)
    return units


def units_by_name(transformer, names) -> dict[str, UnitSpec]:
    """The model's units by name, attention-map units included when ``names`` (a plan's or a calibration's
    unit names) hold any. Raises as :func:`find_units`."""
    return {u.name: u for u in find_units(transformer, attention_maps=any(is_map_unit(n) for n in names))}


def _with_maps(model, spec, units: list[UnitSpec]) -> list[UnitSpec]:
    """``units`` with an ``attn_map`` unit after each unit that holds a declared attention (module docstring)."""
    if not spec.attention_maps:
        raise UnsupportedModelError(
            f"the {spec.name} family declares no attention-map units (its attention processors are not supported "
            "for map reuse); calibrate without attention maps")
    maps = [f"{list_name}.{i}.{child}" for list_name, children in spec.attention_maps.items()
            for i, block in enumerate(_block_list(model, list_name)) for child in children
            if getattr(block, child, None) is not None]
    names = [u.name for u in units]
    out = list(units)
    for path in maps:
        parent = parent_units(names + [f"{path}.{MAP_CHILD}"])[-1]
        if parent is None:
            continue  # an attention no unit contains is never skipped with its parent: not offered
        at = out.index(units[parent]) + 1
        while at < len(out) and out[at].parent == units[parent].name:
            at += 1
        out.insert(at, UnitSpec(f"{path}.{MAP_CHILD}", "attn_map", "output", (), units[parent].name))
    return out
