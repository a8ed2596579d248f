"""Which units belong to which transformer block: the block structure the ``group`` family and the
``fn_bn`` option of the step family (FBCache's/DBCache's shape) are built on (docs/planner.md).

numpy only. A unit's block is read from its name (:func:`unit_block`); blocks are numbered in order of first
appearance in the plan's unit order (execution order).
"""

from __future__ import annotations

import numpy as np


def unit_block(name: str) -> str:
    """The block a unit belongs to: the unit itself when its name ends in a block index (a whole-block
    residual unit such as ``single_transformer_blocks.3``), else its name without the last component
    (``transformer_blocks.3.attn1`` -> ``transformer_blocks.3``)."""
    if "." not in name:
        return name
    head, last = name.rsplit(".", 1)
    return name if last.isdigit() else head


def block_index(unit_names) -> tuple[list[str], np.ndarray]:
    """``(blocks, of_unit)``: the block names in order of first appearance and, per unit, its block's index
    ((U,) int64)."""
    blocks: list[str] = []
    of_unit = []
    for name in unit_names:
        b = unit_block(name)
        if b not in blocks:
            blocks.append(b)
        of_unit.append(blocks.index(b))
    return blocks, np.asarray(of_unit, dtype=np.int64)


def block_groups(unit_names, groups: int) -> np.ndarray:
    """Group ids of units for the ``group`` family: contiguous groups of whole blocks.

    Blocks (:func:`block_index`) are split into ``groups`` contiguous groups of (nearly) equal block counts,
    the earlier groups taking the remainder.

    Args:
        unit_names: U unit names in plan order.
        groups: number of groups, >= 1 (more than the number of blocks gives one group per block).
    Returns:
        (U,) int64 group ids in 0..G-1.
    Raises:
        ValueError: ``groups`` < 1 or not an int.
    """
    if int(groups) != groups or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    blocks, of_unit = block_index(unit_names)
    G = min(int(groups), len(blocks))
    size, extra = divmod(len(blocks), G)
    group_of_block = np.repeat(np.arange(G), [size + (g < extra) for g in range(G)])
    return group_of_block[of_unit].astype(np.int64)


def edge_blocks(unit_names, first: int, last: int) -> np.ndarray:
    """(U,) bool: the units of the first ``first`` and the last ``last`` blocks (:func:`block_index`) — the
    blocks that FBCache (``first=1``) and cache-dit's DBCache (``Fn``/``Bn``) compute at every step.

    Raises:
        ValueError: ``first``/``last`` not ints >= 0, or together all blocks (nothing left to cache).
    """
    for name, v in (("first", first), ("last", last)):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"fn_bn: {name} must be an int >= 0, got {v!r}")
    blocks, of_unit = block_index(unit_names)
    if int(first) + int(last) >= len(blocks):
        raise ValueError(f"fn_bn: {first} first + {last} last blocks leave none of the {len(blocks)} blocks to cache")
    edge = set(range(int(first))) | set(range(len(blocks) - int(last), len(blocks)))
    return np.array([b in edge for b in of_unit.tolist()], dtype=bool)
