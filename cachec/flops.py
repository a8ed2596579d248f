"""FLOP counting for cache plans: what one call of a model (or a whole sampling loop) costs.

Counts come from PyTorch's :class:`torch.utils.flop_counter.FlopCounterMode`, which attaches an analytic
formula to each ATen op with a known cost (matrix products, convolutions, attention kernels). Units are
**FLOPs, not MACs**: one multiply-add counts as 2 FLOPs, so ``nn.Linear(in, out)`` on a batch of ``B``
rows counts ``2 · B · in · out`` (the bias add and all element-wise ops — norms, activations, softmax,
adaLN modulation — count 0). Sources: ``torch/utils/flop_counter.py`` (formulas ``mm_flop``,
``conv_flop``, ``sdpa_flop``) and the PyTorch docs for ``FlopCounterMode``.

Attention on CPU: ``F.scaled_dot_product_attention`` dispatches on CPU to a fused kernel that has no FLOP
formula registered and would count 0. :func:`count_flops` therefore runs the function inside
``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, whose decomposition into two ``bmm`` calls is
counted: ``4 · B · H · L_q · L_kv · D`` FLOPs per attention call (Q·Kᵀ and P·V).

Module-path keys (measured with torch 2.13): :meth:`FlopCounterMode.get_flop_counts` returns a dict keyed
by ``"Global"`` (everything) and by dotted module paths that begin with the **class name** of each
top-level module that was called, e.g. ``"DiTTransformer2DModel"``,
``"DiTTransformer2DModel.transformer_blocks.0.attn1"``, ``"DiTTransformer2DModel.transformer_blocks.0.ff.net.2"``.
A parent's count includes its children. Counts are attributed by *call*, not by ownership, and repeated
calls accumulate: diffusers' DiT calls ``transformer_blocks[0].norm1.emb`` a second time for the output
layer's conditioning, so that path shows twice the cost of the same path in block 1.
:func:`relative_module_flops` strips the class-name prefix to give paths as in ``model.named_modules()``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["GLOBAL_KEY", "count_flops", "relative_module_flops"]

#: key of the total over everything counted, in ``FlopCounterMode.get_flop_counts()``
GLOBAL_KEY = "Global"


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` once and count the FLOPs it spends.

    The call runs inside ``sdpa_kernel(SDPBackend.MATH)`` (so attention is counted on CPU, see the module
    docstring) and inside ``FlopCounterMode(display=False, depth=None)``. It does not switch gradients
    off: wrap the call (or ``fn``) in ``torch.no_grad()`` for inference; a backward pass run inside
    ``fn`` would be counted too. The math attention backend is slower than the fused one, so time
    nothing inside this function.

    Args:
        fn: any callable (an ``nn.Module``, a bound ``forward``, a whole sampling loop).
        *args, **kwargs: passed to ``fn``.

    Returns:
        ``(result, total_flops, per_module)``: ``result`` is what ``fn`` returned; ``total_flops`` the
        int total (FLOPs, 2 per multiply-add); ``per_module`` maps each key of ``get_flop_counts()``
        (``"Global"`` plus class-name-prefixed module paths, see the module docstring) to its int FLOPs
        summed over ops. Modules with zero counted FLOPs do not appear.

    Raises:
        Whatever ``fn`` raises.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with sdpa_kernel(SDPBackend.MATH), counter:
        result = fn(*args, **kwargs)
    per_module = {
        str(key): int(sum(int(v) for v in ops.values())) for key, ops in counter.get_flop_counts().items()
    }
    total = int(counter.get_total_flops())
    return result, total, per_module


def relative_module_flops(per_module: dict[str, int], root: str | torch.nn.Module | None = None) -> dict[str, int]:
    """Re-key a ``per_module`` dict from :func:`count_flops` to paths relative to one root module.

    ``"DiTTransformer2DModel.transformer_blocks.0.attn1"`` becomes ``"transformer_blocks.0.attn1"`` and
    the root itself becomes ``""`` — the same names as ``root.named_modules()``. ``"Global"`` and the
    keys of other top-level modules (e.g. a VAE called in the same sampling loop) are dropped.

    Args:
        per_module: ``{key: flops}`` as returned by :func:`count_flops`.
        root: the root's class name (``"DiTTransformer2DModel"``), the root module itself (its class name
            is used), or ``None`` to infer it when exactly one top-level module was counted.

    Returns:
        ``{relative_path: flops}`` (int FLOPs), in the order of ``per_module``.

    Raises:
        ValueError: ``root`` is ``None`` and zero or several top-level modules were counted, or the
            given root does not occur in ``per_module``.
    """
    tops = []
    for key in per_module:
        if key == GLOBAL_KEY:
            continue
        top = key.split(".", 1)[0]
        if top not in tops:
            tops.append(top)
    if root is None:
        if len(tops) != 1:
            raise ValueError(
                f"cannot infer the root module: top-level modules counted are {tops}; pass root=<class name or module>"
            )
        name = tops[0]
    elif isinstance(root, torch.nn.Module):
        name = type(root).__name__
    else:
        name = str(root)
    if name not in tops:
        raise ValueError(f"root {name!r} not among the counted top-level modules {tops}")
    out: dict[str, int] = {}
    prefix = name + "."
    for key, flops in per_module.items():
        if key == name:
            out[""] = flops
        elif key.startswith(prefix):
            out[key[len(prefix):]] = flops
    return out
