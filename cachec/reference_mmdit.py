"""``digits-mmdit``: the prompt-conditioned reference model (a small FLUX-style MMDiT on MNIST digits).

A diffusers ``FluxTransformer2DModel`` — 4 dual-stream (joint text-image attention, image FFN, context FFN)
then 8 single-stream blocks, hidden 128 (4 heads × 32), RoPE axes (8, 12, 12) — in pixel space: a
1×32×32 digit is packed into 64 tokens of 4×4 pixels (16 channels), as FluxPipeline packs 2×2 latent
patches. Text: a 2-layer ``CLIPTextModel`` (hidden 64) over the word-level tokenizer of
:mod:`cachec.digit_prompts`, trained jointly; its last hidden states (B, 8, 64) are the transformer's
``encoder_hidden_states`` and its pooled output (B, 64) the ``pooled_projections``. Rectified flow
(``FlowMatchEulerDiscreteScheduler``, shift 1); CFG with the empty prompt, no distilled guidance embedding.

The sampling loop is :class:`cachec.pipeline_prompt.PromptDigitsPipeline`.
"""

from __future__ import annotations

from .digit_prompts import MAX_TOKENS, VOCAB

NAME = "digits-mmdit"
PATCH = 4
IMAGE_SIZE = 32
TOKENS_PER_SIDE = IMAGE_SIZE // PATCH  # 8 → 64 image tokens
TEXT_DIM = 64

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=PATCH * PATCH,
    out_channels=None,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

TEXT_CONFIG = dict(
    vocab_size=len(VOCAB),
    hidden_size=TEXT_DIM,
    intermediate_size=4 * TEXT_DIM,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_TOKENS,
    pad_token_id=VOCAB.index("[PAD]"),
    bos_token_id=VOCAB.index("[BOS]"),
    eos_token_id=VOCAB.index("[EOS]"),
)


def make_transformer():
    """A freshly initialised ``FluxTransformer2DModel`` (float32, CPU) with zero-initialised adaLN
    modulations and output projection (adaLN-Zero, DiT paper §3.2), about 4.6 M parameters."""
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    with torch.no_grad():
        zero = [b.norm1.linear for b in model.transformer_blocks]
        zero += [b.norm1_context.linear for b in model.transformer_blocks]
        zero += [b.norm.linear for b in model.single_transformer_blocks]
        zero += [model.norm_out.linear, model.proj_out]
        for layer in zero:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return model


def make_text_encoder():
    """A freshly initialised ``CLIPTextModel`` of :data:`TEXT_CONFIG` (float32, CPU)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def pack(x):
    """(N, 1, 32, 32) pixels → (N, 64, 16) tokens of 4×4 patches (row-major), as FluxPipeline packs."""
    n = x.shape[0]
    x = x.reshape(n, TOKENS_PER_SIDE, PATCH, TOKENS_PER_SIDE, PATCH)
    return x.permute(0, 1, 3, 2, 4).reshape(n, TOKENS_PER_SIDE * TOKENS_PER_SIDE, PATCH * PATCH)


def unpack(tokens):
    """(N, 64, 16) tokens → (N, 1, 32, 32) pixels; the inverse of :func:`pack`."""
    n = tokens.shape[0]
    x = tokens.reshape(n, TOKENS_PER_SIDE, TOKENS_PER_SIDE, PATCH, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE)


def position_ids(device=None):
    """``(img_ids, txt_ids)``: float32 (64, 3) with (0, row, col) per image token and zeros (8, 3) for the
    text tokens, as FluxPipeline builds them."""
    import torch

    r = torch.arange(TOKENS_PER_SIDE, dtype=torch.float32, device=device)
    img = torch.zeros(TOKENS_PER_SIDE, TOKENS_PER_SIDE, 3, device=device)
    img[..., 1] = r[:, None]
    img[..., 2] = r[None, :]
    return img.reshape(-1, 3), torch.zeros(MAX_TOKENS, 3, device=device)


def encode(tokenizer, text_encoder, prompts):
    """Prompts → ``(encoder_hidden_states (N, 8, 64), pooled_projections (N, 64))`` in the encoder's dtype.

    Raises:
        ValueError: a prompt longer than :data:`MAX_TOKENS` tokens.
    """
    import torch

    enc = tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=False,
                    return_tensors="pt")
    if enc.input_ids.shape[1] > MAX_TOKENS:
        raise ValueError(f"a prompt is longer than {MAX_TOKENS - 2} words: {max(prompts, key=len)!r}")
    ids = enc.input_ids.to(next(text_encoder.parameters()).device)
    out = text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.last_hidden_state, out.pooler_output

