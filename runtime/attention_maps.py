"""Attention probability maps as modules of their own, so that a unit hook can reuse them (HGC, docs/hgc.md).

diffusers computes attention with SDPA, which never materialises ``P = softmax(Q Kᵀ/√d)``. :func:`materialise`
gives each named attention module a child :class:`AttentionMap` at attribute :data:`MAP_CHILD` and installs a
cachec processor that calls the child *as a module* for P (so a forward hook, or a replaced instance
``forward`` as :mod:`cachec.runtime.hooks` does it, can substitute a stored P) and then computes V, ``P @ V``
and the output projections exactly as the original processor. Supported originals (diffusers 0.42):

- ``Attention`` with ``AttnProcessor2_0`` (DiT/PixArt ``attn1``; cross-attention without ``norm_cross``
  works too) -> :class:`MapAttnProcessor`;
- ``FluxAttention`` with ``FluxAttnProcessor`` (FLUX dual blocks, with ``encoder_hidden_states``, and
  single blocks, ``pre_only``, without) -> :class:`MapJointAttnProcessor`.

Where the FLOPs go (FLOPs as in :mod:`cachec.runtime.flops`, N tokens, D inner dim): the child holds the Q/K
projections, norms, RoPE, ``QKᵀ`` and softmax, ``4·N·D² + 2·N²·D`` of a self-attention's
``8·N·D² + 4·N²·D``; the processor around it keeps the V projection, ``P @ V`` and the output projection.
The explicit softmax is not SDPA's kernel: outputs match the original to float rounding, not bitwise.
:meth:`MapHandle.remove` restores the very same processor objects and deletes the children.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MAP_CHILD", "AttentionMap", "MapAttnProcessor", "MapJointAttnProcessor", "MapHandle", "map_paths",
           "materialise"]

from .units import MAP_CHILD, is_map_unit  # attribute name of the map child (and last part of a map unit's name)

_FIX = "remove the other library's processor first or plan without attention-map units"


def _diffusers():
    """``(Attention, AttnProcessor2_0, FluxAttention, FluxAttnProcessor)``, imported on first use."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    return Attention, AttnProcessor2_0, FluxAttention, FluxAttnProcessor


#: largest attention map (one sample, one branch, float32 bytes) a map unit may hold: a plan keeps one per unit and
#: branch in memory; 64 MiB admits DiT-XL/2 at 256² (4 MiB) and refuses FLUX.1 at 1024² (1944 MiB;
#: bench/bench_attention_map_scale.py). Checked before the map is computed.
MAP_LIMIT_BYTES = 64 * 2**20


def _check_size(query: torch.Tensor, key: torch.Tensor) -> None:
    """Raise ValueError (one line) when the map of ``query`` (B, H, N_q, d) and ``key`` (B, H, N_k, d) holds
    more than :data:`MAP_LIMIT_BYTES` per sample in float32."""
    size = 4 * query.shape[1] * query.shape[2] * key.shape[2]
    if size > MAP_LIMIT_BYTES:
        raise ValueError(
            f"an attention map of {query.shape[1]} heads x {query.shape[2]} x {key.shape[2]} tokens holds "
            f"{size / 2**20:.0f} MiB per sample, over the {MAP_LIMIT_BYTES // 2**20} MiB limit of attention-map units; "
            "calibrate and plan without --attention-maps at this resolution (docs/hgc.md, memory)")


def _probabilities(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(query·keyᵀ/√d + mask)``: query (B, H, N_q, d), key (B, H, N_k, d) -> (B, H, N_q, N_k) in the
    query's dtype. ``mask`` broadcasts to the scores with SDPA's meaning: bool True = attend, float = added.
    The scale is applied to Q before the product (as SDPA's math path does, safe in float16); the softmax
    runs in float32 for 16-bit inputs. Only the product counts FLOPs: ``2·B·H·N_q·N_k·d``."""
    _check_size(query, key)
    scores = torch.matmul(query * (1.0 / math.sqrt(query.shape[-1])), key.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.softmax(scores, dim=-1)


class AttentionMap(torch.nn.Module):
    """The probability map of one attention module, as a module (no parameters: it uses its parent's).

    ``forward(hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None) -> P``
    takes the attention module's own arguments and returns P, (B, heads, N_q, N_k), in the query's dtype:
    the Q/K projections (FLUX dual blocks also ``add_q_proj``/``add_k_proj``, context tokens first), the
    q/k norms, RoPE (FLUX), ``Q Kᵀ/√head_dim`` and the softmax (float32 for 16-bit inputs). The parent is
    held outside ``_modules`` (no cycle in ``named_modules``/``state_dict``).
    """

    def __init__(self, attn: torch.nn.Module, flux: bool):
        super().__init__()
        object.__setattr__(self, "_attn", attn)  # not a submodule
        self.flux = flux
        if flux:
            from diffusers.models.embeddings import apply_rotary_emb

            self._rope = apply_rotary_emb

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        attn = self._attn
        if self.flux:
            return _flux_map(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, self._rope)
        if image_rotary_emb is not None:
            raise NotImplementedError(f"cachec attention maps: image_rotary_emb is not supported for {type(attn).__name__}")
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = source.shape[0], source.shape[1]
        query, key = attn.to_q(hidden_states), attn.to_k(source)  # (B, N, D)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N_q, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:  # as AttnProcessor2_0: (B·H, 1 or N_q, N_k) -> (B, H, ., N_k)
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        return _probabilities(query, key, attention_mask)


def _flux_map(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, rope) -> torch.Tensor:
    """FluxAttnProcessor's path up to P: (B, N, D) projections -> (B, N, H, d), norms, context first, RoPE."""
    _flux_supported(attn, encoder_hidden_states is not None)
    query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
    if encoder_hidden_states is not None:
        context_q = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        context_k = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        query, key = torch.cat([context_q, query], dim=1), torch.cat([context_k, key], dim=1)
    if image_rotary_emb is not None:
        query = rope(query, image_rotary_emb, sequence_dim=1)
        key = rope(key, image_rotary_emb, sequence_dim=1)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, N, d)
    mask = attention_mask
    if mask is not None and mask.ndim == 2 and mask.shape == (query.shape[0], key.shape[2]):
        mask = mask[:, None, None, :]  # as diffusers' native backend: (B, N_k) -> (B, 1, 1, N_k)
    return _probabilities(query, key, mask)


def _flux_supported(attn, with_context: bool) -> None:
    if getattr(attn, "fused_projections", False):
        raise NotImplementedError("cachec attention maps: fused QKV projections (fuse_qkv_projections) are not "
                                  "supported; unfuse them first")
    if with_context != (attn.added_kv_proj_dim is not None):
        raise NotImplementedError(f"cachec attention maps: {type(attn).__name__} is supported with encoder_hidden_states "
                                  "exactly when it has context projections (dual blocks) and without (single blocks)")


class MapAttnProcessor:
    """``AttnProcessor2_0`` with P from ``attn.cachec_map``: ``hidden_states`` (B, N, query_dim) -> (B, N, out_dim).

    Holds the V projection, ``P @ V`` and ``to_out`` (``4·N·D² + 2·N²·D`` FLOPs of a self-attention).
    Not supported (NotImplementedError): 4-D inputs, ``spatial_norm``, ``group_norm``, ``norm_cross``.
    """

    def __init__(self, original):
        self.original = original  # the AttnProcessor2_0 object, restored by MapHandle.remove

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None or (
                encoder_hidden_states is not None and attn.norm_cross):
            raise NotImplementedError("cachec attention maps support 3-D inputs without spatial_norm, group_norm "
                                      "or norm_cross (transformer-block self-attention)")
        probs = getattr(attn, MAP_CHILD)(hidden_states, encoder_hidden_states, attention_mask)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        value = attn.to_v(source)
        batch, head_dim = source.shape[0], value.shape[-1] // attn.heads
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N_k, d)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out.to(probs.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class MapJointAttnProcessor:
    """``FluxAttnProcessor`` with P from ``attn.cachec_map``. Dual blocks: ``(hidden_states (B, N_img, D),
    encoder_hidden_states (B, N_txt, D_ctx))`` -> ``(image (B, N_img, D), context (B, N_txt, D_ctx))``;
    single blocks: ``hidden_states`` (B, N, D) -> (B, N, D) without output projection (``pre_only``).
    Holds the V projections, ``P @ V`` and ``to_out``/``to_add_out``."""

    def __init__(self, original):
        self.original = original  # the FluxAttnProcessor object, restored by MapHandle.remove

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        probs = getattr(attn, MAP_CHILD)(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))  # (B, N, H, d)
        if encoder_hidden_states is not None:
            context_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            value = torch.cat([context_v, value], dim=1)
        out = torch.matmul(probs, value.transpose(1, 2)).transpose(1, 2).flatten(2, 3).to(probs.dtype)
        if encoder_hidden_states is None:
            return out
        context, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(context.contiguous())


class MapHandle:
    """Materialised maps on one model; :meth:`remove` (idempotent; also on leaving a ``with`` block) restores
    the original processor objects and deletes the children. ``paths``: the attention modules' paths."""

    def __init__(self, installed: list[tuple[str, torch.nn.Module, object]]):
        self._installed = list(installed)  # (path, attention module, map processor)
        self.paths: tuple[str, ...] = tuple(path for path, _, _ in installed)

    def remove(self) -> None:
        while self._installed:
            _, attn, processor = self._installed.pop()
            if attn.processor is processor:  # a processor set since by someone else stays
                attn.processor = processor.original
            if MAP_CHILD in attn._modules:
                delattr(attn, MAP_CHILD)

    def __enter__(self) -> MapHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def map_paths(unit_names) -> tuple[str, ...]:
    """The attention paths of the map units among ``unit_names`` (``"a.b.attn1.cachec_map"`` -> ``"a.b.attn1"``)."""
    return tuple(name[: -len(MAP_CHILD) - 1] for name in unit_names if is_map_unit(name))


def materialise(model: torch.nn.Module, paths) -> MapHandle:
    """Give each attention module at ``paths`` (as in ``model.named_modules()``) its map child and processor.

    All or nothing: every path is checked before anything is changed.

    Raises:
        KeyError: a path names no module of ``model``.
        ValueError: a path is repeated or already materialised, is not a diffusers ``Attention`` or
            ``FluxAttention``, or its processor is not exactly ``AttnProcessor2_0``/``FluxAttnProcessor``.
        NotImplementedError: a supported processor on a configuration it is not built for (fused QKV
            projections, context parallelism, spatial/group norm).
    """
    from .units import unwrap

    model = unwrap(model)
    Attention, AttnProcessor2_0, FluxAttention, FluxAttnProcessor = _diffusers()
    modules = dict(model.named_modules())
    plan = []
    for path in paths:
        if path not in modules:
            raise KeyError(f"attention map: no module {path!r} in {type(model).__name__}")
        attn = modules[path]
        if any(p == path for p, _, _ in plan) or MAP_CHILD in attn._modules:
            raise ValueError(f"attention map: {path!r} is already materialised")
        flux = isinstance(attn, FluxAttention)
        if not flux and not isinstance(attn, Attention):
            raise ValueError(f"attention map: {path!r} is a {type(attn).__name__}, not a diffusers attention module")
        expected = FluxAttnProcessor if flux else AttnProcessor2_0
        found = type(attn.processor)
        if found is not expected:
            raise ValueError(f"attention map: {path!r} has processor {found.__name__}, not {expected.__name__}; {_FIX}")
        if flux:
            _flux_supported(attn, attn.added_kv_proj_dim is not None)
            if attn.processor._parallel_config is not None:
                raise NotImplementedError(f"attention map: {path!r} runs context-parallel; not supported")
        elif attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError(f"attention map: {path!r} has spatial_norm or group_norm; not supported")
        plan.append((path, attn, (MapJointAttnProcessor if flux else MapAttnProcessor)(attn.processor)))
    handle = MapHandle([])
    try:
        for path, attn, processor in plan:
            attn.add_module(MAP_CHILD, AttentionMap(attn, processor.__class__ is MapJointAttnProcessor))
            handle._installed.append((path, attn, processor))
            attn.processor = processor
    except BaseException:
        handle.remove()
        raise
    handle.paths = tuple(path for path, _, _ in plan)
    return handle
