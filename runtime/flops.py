"""FLOP counting, the one implementation: what one call of a model (or a whole sampling loop) costs.

- :func:`count_flops` — total and per-module FLOPs (``FlopCounterMode``);
- :func:`count_total_flops` — the total only, with the same formulas in a bare dispatch mode (≈2× faster
  on a sampling loop: no module tracking, no re-dispatch of ops without a formula);
- :func:`unit_flops` — per-unit and whole-forward FLOPs of one transformer call, per sample (plans and
  calibration price units with it);
- :func:`relative_module_flops` — per-module keys as ``model.named_modules()`` paths.

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

__all__ = ["GLOBAL_KEY", "count_flops", "count_total_flops", "relative_module_flops", "unit_flops"]

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


def count_total_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn`` once and count its FLOPs with the formulas of ``torch.utils.flop_counter`` — the total of
    :func:`count_flops`, without its per-module attribution.

    ``FlopCounterMode`` tracks the module hierarchy (global module hooks) and re-dispatches ops it has no
    formula for through their decompositions; on our small DiT that made a counted sampling run about 2×
    (up to 5× on a loaded machine) slower than an uncounted one. This counter is a bare
    ``TorchDispatchMode`` that adds ``flop_registry[op](*args, out_val=out)`` for every executed aten op
    that has a formula (matmuls, convolutions, attention), inside ``sdpa_kernel(SDPBackend.MATH)`` as
    :func:`count_flops` does; ``tests/test_bench_peers.py`` checks the totals are equal on DiT.

    Returns:
        ``(result, total_flops)`` (int FLOPs, 2 per multiply-add).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    counter = _Counter()
    with sdpa_kernel(SDPBackend.MATH), counter:
        result = fn(*args, **kwargs)
    return result, int(counter.total)


def unit_flops(transformer, args: tuple = (), kwargs: dict | None = None) -> tuple[dict[str, float], float]:
    """FLOPs of one transformer forward, per unit and in total, per sample (divided by the batch size).

    Args:
        transformer: a registered transformer (compiled wrappers are unwrapped).
        args, kwargs: one forward's arguments (e.g. ``RunTrace.args``/``kwargs`` of
            :func:`cachec.runtime.manual.trace_run`).

    Returns:
        ``({unit name: FLOPs per sample}, total FLOPs per sample)``.

    Raises:
        UnsupportedModelError: the transformer class is not registered.
    """
    from .units import find_units, unwrap

    model = unwrap(transformer)
    kwargs = dict(kwargs or {})
    hs = kwargs.get("hidden_states", args[0] if args else None)
    batch = int(hs.shape[0])
    with torch.no_grad():
        _, total, per_module = count_flops(model, *args, **kwargs)
    rel = relative_module_flops(per_module, model)
    units = {u.name: float(rel.get(u.name, 0)) / batch for u in find_units(model)}
    return units, float(total) / batch
