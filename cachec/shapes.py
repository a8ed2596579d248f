"""Full-width random pipelines of the four public DiT families, built offline (issue 12: real-size shapes).

:func:`build_pipeline` returns an ordinary diffusers pipeline (``DiTPipeline``, ``PixArtSigmaPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``) whose transformer has the published config of the family's
reference checkpoint (:attr:`cachec.runtime.registry.ModelSpec.published`: width, heads, text and pooled
widths, patch size, channels) but only ``depth`` blocks and random weights (seeded). What surrounds it is
as small as the shapes allow, so that a CPU can sample at the real image sizes:

- a small ``AutoencoderKL`` with the family's latent channels, scaling and shift factors, and a real 8×
  scale factor (4 levels of ``channels`` channels, no mid-block attention, so a 1024² decode is cheap);
- tiny text encoders (1–2 layers, a few heads) whose *output widths* are the transformer's:
  T5 ``d_model`` = ``caption_channels`` (PixArt) / ``joint_attention_dim`` (SD3, FLUX); SD3's two CLIPs
  have hidden = projection = 768 and 1280 (sum = ``pooled_projection_dim`` 2048); FLUX's CLIP has hidden
  ``pooled_projection_dim`` (768). Sequence lengths are the pipelines' own (T5: PixArt-Σ 300, SD3 256,
  FLUX 512 tokens; CLIP 77);
- tokenizers built in memory (no download): a Unigram T5 tokenizer and a character-level CLIP BPE
  tokenizer over a small vocabulary (:func:`t5_text_encoder`, :func:`clip_text_encoder`, also used by the
  tiny test fixtures).

FLUX's depth is ``depth`` double-stream blocks plus ``single_depth`` (default ``depth``) single-stream
blocks. ``save_pretrained`` + :func:`cachec.loading.load_model` round-trips the result
(:func:`build_folder`).

:func:`predicted_file_bytes` (exact, from the format's tensor table), :func:`documented_file_bytes` and
:func:`predicted_extra_bytes` evaluate the size and memory formulas of docs/calibration-format.md
("Memory and size") from a calibration header, for the scale benchmark
(``bench/bench_scale.py``) and ``tests/test_full_width_families.py``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

FAMILIES = ("dit", "pixart", "sd3", "flux")

#: latent facts of each family's published VAE (``vae/config.json`` of the reference checkpoints:
#: DiT — stabilityai/sd-vae-ft-ema, PixArt-Σ — the SDXL VAE, SD3-medium and FLUX.1-dev their own):
#: latent channels, scaling factor, shift factor (None: the pipeline reads none), quant convs
VAE_LATENTS: dict[str, dict[str, Any]] = {
    "dit": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=None, use_quant_conv=True),
    "pixart": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=None, use_quant_conv=True),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False),
}

_WORDS = "a photo of the cat dog red blue green small big tree house car sky on in with".split()


def t5_text_encoder(d_model: int = 32, *, d_kv: int = 8, d_ff: int = 32, num_heads: int = 2, num_layers: int = 1):
    """A T5 tokenizer (Unigram over a 17-word + a–z vocabulary, built in memory) and a random
    ``T5EncoderModel``.

    Args:
        d_model: output width of the encoder (the transformer's text width, e.g. 4096).
        d_kv, d_ff, num_heads, num_layers: inner sizes (tiny: the cost is ~``tokens · d_model · (4 d_kv
            num_heads + 2 d_ff)`` multiply-adds per layer).
    Returns:
        ``(T5Tokenizer, T5EncoderModel in eval mode)``; weights from torch's global generator.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(_WORDS)]
    vocab += [(c, -50.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    cfg = T5Config(
        vocab_size=len(vocab), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_heads=num_heads,
        decoder_start_token_id=0,
    )
    return tok, T5EncoderModel(cfg).eval()


def clip_text_encoder(hidden: int = 8, projection: int | None = None, *, intermediate: int = 16, heads: int = 2,
                      layers: int = 2):
    """A CLIP BPE tokenizer (characters only, no merges, 77 tokens) and a random text encoder.

    Args:
        hidden: hidden width (the width of the hidden states SD3 reads, and of FLUX's pooled output).
        projection: with a value, a ``CLIPTextModelWithProjection`` whose ``text_embeds`` (SD3's pooled
            output) have this width; None: a plain ``CLIPTextModel``.
        intermediate, heads, layers: inner sizes (SD3 reads the second-to-last hidden state: ``layers >= 2``).
    Returns:
        ``(CLIPTokenizer, model in eval mode)``; weights from torch's global generator.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(
        vocab=vocab, merges=[], unk_token="<unk>", pad_token="<|endoftext|>", model_max_length=77
    )
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return tok, model.eval()


def small_vae(latent_channels: int, *, levels: int = 4, channels: int = 8, sample_size: int = 1024,
              scaling_factor: float = 0.18215, shift_factor: float | None = None, use_quant_conv: bool = True):
    """A random ``AutoencoderKL`` with ``levels`` levels of ``channels`` channels (one resnet per level, no
    mid-block attention): scale factor ``2 ** (levels - 1)`` (8 for 4 levels), ``latent_channels`` latents.

    Returns:
        ``AutoencoderKL`` in eval mode; weights from torch's global generator.
    Raises:
        ValueError: ``channels`` not divisible by 4 (the group norms use 4 groups).
    """
    from diffusers import AutoencoderKL

    if channels % 4:
        raise ValueError(f"channels must be a multiple of 4 (4 norm groups), got {channels}")
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(channels,) * levels, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=sample_size, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=use_quant_conv, use_post_quant_conv=use_quant_conv,
        mid_block_add_attention=False,
    ).eval()


def _spec(family: str):
    from cachec.runtime.registry import registered

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return {s.name: s for s in registered()}[family]


def published_config(family: str) -> dict:
    """A copy of the family's published transformer config (registry ``ModelSpec.published``).

    Raises:
        ValueError: not one of :data:`FAMILIES`.
    """
    return dict(_spec(family).published)


def transformer_config(family: str, depth: int, *, single_depth: int | None = None, sample_size: int | None = None,
                       overrides: Mapping[str, Any] | None = None) -> dict:
    """The constructor arguments of a full-width, reduced-depth transformer of ``family``.

    Args:
        family: ``dit``, ``pixart``, ``sd3`` or ``flux``.
        depth: blocks (``num_layers``; FLUX: double-stream blocks).
        single_depth: FLUX only: single-stream blocks (``num_single_layers``; default ``depth``).
        sample_size: latent side the transformer is built for (DiT's image size is fixed by it: 32 latents =
            256 px; default the published one). Not for FLUX (its size comes from the call).
        overrides: further config entries to replace (e.g. ``{"guidance_embeds": False}`` for
            FLUX.1-schnell).
    Returns:
        A new dict.
    Raises:
        ValueError: unknown family, ``depth < 1`` (or ``single_depth < 0``), ``single_depth`` or
            ``sample_size`` where the family has none, an override key the config does not have.
    """
    cfg = published_config(family)
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    cfg["num_layers"] = int(depth)
    if family == "flux":
        sd = int(depth) if single_depth is None else int(single_depth)
        if sd < 0:
            raise ValueError(f"single_depth must be >= 0, got {single_depth}")
        cfg["num_single_layers"] = sd
        if sample_size is not None:
            raise ValueError("the FLUX transformer has no sample_size: pass the size to the pipeline call")
    elif single_depth is not None:
        raise ValueError(f"single_depth is for FLUX only, not {family!r}")
    if sample_size is not None:
        cfg["sample_size"] = int(sample_size)
    for k, v in (overrides or {}).items():
        if k not in cfg:
            raise ValueError(f"{family} transformer config has no key {k!r}")
        cfg[k] = v
    return cfg


def build_pipeline(family: str, depth: int, *, seed: int = 0, single_depth: int | None = None,
                   sample_size: int | None = None, vae_channels: int = 8, overrides: Mapping[str, Any] | None = None):
    """A diffusers pipeline of ``family`` at full width and ``depth`` blocks, with random weights.

    Args:
        family: ``dit`` (``DiTPipeline``, ``DDIMScheduler``), ``pixart`` (``PixArtSigmaPipeline``,
            ``DPMSolverMultistepScheduler``), ``sd3`` (``StableDiffusion3Pipeline``, flow-matching Euler,
            shift 3), ``flux`` (``FluxPipeline``, flow-matching Euler with FLUX.1-dev's dynamic shifting).
        depth, single_depth, sample_size, overrides: the transformer, as :func:`transformer_config`.
        seed: every weight (transformer, VAE, text encoders) is drawn from ``torch.manual_seed(seed)``
            inside :func:`torch.random.fork_rng`: the same seed gives the same pipeline, and the caller's
            global generator is left as it was.
        vae_channels: channels of each of the VAE's 4 levels (a multiple of 4).
    Returns:
        The pipeline (float32, CPU, eval mode). DiT's images are ``sample_size · 8`` px square (256 at the
        published size); the text pipelines take ``height``/``width`` in pixels (multiples of 16).
    Raises:
        ValueError: as :func:`transformer_config`, or a bad ``vae_channels``.
    """
    import diffusers as d
    import torch

    cfg = transformer_config(family, depth, single_depth=single_depth, sample_size=sample_size, overrides=overrides)
    transformer_cls = getattr(d, _spec(family).transformers[0])  # the registry's transformer class
    lat = VAE_LATENTS[family]
    px = 8 * int(cfg.get("sample_size", 128))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        vae = small_vae(lat["latent_channels"], channels=vae_channels, sample_size=px,
                        scaling_factor=lat["scaling_factor"], shift_factor=lat["shift_factor"],
                        use_quant_conv=lat["use_quant_conv"])
        if family == "dit":
            tr = transformer_cls(**cfg).eval()
            return d.DiTPipeline(transformer=tr, vae=vae, scheduler=d.DDIMScheduler(clip_sample=False))
        if family == "pixart":
            tok, enc = t5_text_encoder(cfg["caption_channels"])
            tr = transformer_cls(**cfg).eval()
            return d.PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=tr,
                                         scheduler=d.DPMSolverMultistepScheduler())
        if family == "sd3":
            pooled = int(cfg["pooled_projection_dim"])  # CLIP-L + CLIP-G pooled widths: 768 + 1280 = 2048
            w1 = pooled * 3 // 8
            w2 = pooled - w1
            if w1 + w2 > cfg["joint_attention_dim"]:
                raise ValueError(f"SD3: CLIP widths {w1} + {w2} exceed joint_attention_dim "
                                 f"{cfg['joint_attention_dim']}")
            tok1, enc1 = clip_text_encoder(w1, w1, heads=2 if w1 % 2 == 0 else 1)
            tok2, enc2 = clip_text_encoder(w2, w2, heads=2 if w2 % 2 == 0 else 1)
            tok3, enc3 = t5_text_encoder(cfg["joint_attention_dim"])
            tr = transformer_cls(**cfg).eval()
            return d.StableDiffusion3Pipeline(
                transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
                text_encoder_3=enc3, tokenizer_3=tok3,
            )
        # flux
        hidden = int(cfg["pooled_projection_dim"])
        tok1, enc1 = clip_text_encoder(hidden, heads=2 if hidden % 2 == 0 else 1)
        tok2, enc2 = t5_text_encoder(cfg["joint_attention_dim"])
        tr = transformer_cls(**cfg).eval()
        sched = d.FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return d.FluxPipeline(scheduler=sched, vae=vae, text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2,
                              tokenizer_2=tok2, transformer=tr)


def build_folder(family: str, depth: int, folder: str | os.PathLike, **kwargs) -> str:
    """:func:`build_pipeline` and ``save_pretrained`` it into ``folder`` (created); the pipeline object is
    dropped before returning, so only the reloaded copy (:func:`cachec.loading.load_model`) costs memory.

    Args:
        family, depth, **kwargs: as :func:`build_pipeline`.
        folder: where to write (a diffusers pipeline folder with ``model_index.json``). Size ≈ 4 bytes per
            parameter (FLUX at depth 1: ≈ 1.9 GB; DiT-XL/2 width at depth 1: ≈ 0.2 GB).
    Returns:
        ``str(folder)``.
    """
    pipe = build_pipeline(family, depth, **kwargs)
    os.makedirs(folder, exist_ok=True)
    pipe.save_pretrained(str(folder))
    del pipe
    return str(folder)


# ---- the formulas of docs/calibration-format.md "Memory and size" ---------------------------------------


def _unit_terms(header: Mapping) -> tuple[int, int, int, list[dict]]:
    return int(header["steps"]), int(header["guidance"]["branches"]), int(header["eoc_lags"]), list(header["units"])


def predicted_file_bytes(header: Mapping) -> int:
    """Tensor bytes of a calibration file: ``8 · Σ_u (2 B S² + (1 + 2 + 2K) S G_u) + 8 · (3 U S + 2 U)``.

    The per-unit part is the Gram (B, 2, S, S) plus ``prior_sum`` (S, G_u), ``eoc_q`` (2, S, G_u) and
    ``eoc_m`` (2, S, K, G_u); the rest is ``goc_rel_sum``, ``goc_cos_sum``, ``sensitivity`` (U, S each) and
    ``unit_flops``, ``unit_latency_s`` (U,), all float64 (docs/calibration-format.md, "Tensors").
    The file adds its JSON header and 8 length bytes (safetensors).

    Args:
        header: a calibration header (:func:`cachec.calibrate.read_header`).
    Returns:
        Bytes.
    """
    S, B, K, units = _unit_terms(header)
    U = len(units)
    per_unit = sum(2 * B * S * S + (1 + 2 + 2 * K) * S * int(u["eoc_groups"]) for u in units)
    return 8 * per_unit + 8 * (3 * U * S + 2 * U)


def documented_file_bytes(header: Mapping) -> int:
    """The size formula of docs/calibration-format.md ("Memory and size"):
    ``8 · Σ_u (2 B S² + (1 + 2 + 2K) S G_u) + 8 · (3 U S + 2 U)`` bytes: the tensor bytes of
    :func:`predicted_file_bytes` without the JSON header and the safetensors table.

    Args:
        header: a calibration header.
    Returns:
        Bytes.
    """
    S, B, K, units = _unit_terms(header)
    U = len(units)
    return 8 * sum(2 * B * S * S + (1 + 2 + 2 * K) * S * int(u["eoc_groups"]) for u in units) + 8 * (3 * U * S + 2 * U)


def _eoc_read(u: Mapping, grouping: str, sample: int) -> int:
    """E_u: the elements of unit ``u``'s output its EOC sums read (each group at most ``sample`` of its own;
    0 reads all), from the part shapes (:func:`cachec.calibrate.format.eoc_group_layout`)."""
    from cachec.calibrate.format import eoc_group_layout

    layout = eoc_group_layout(u["shapes"], grouping)
    if grouping == "element" or sample <= 0:
        return int(u["numel"])
    return sum(groups * min(size, sample) for _, groups, size in layout)


def predicted_extra_bytes(header: Mapping, batch: int) -> dict[str, int]:
    """Memory calibration holds beyond plain sampling of a batch of ``batch`` samples (calibrate/streaming.py).

    Args:
        header: a calibration header (its ``units``, ``steps``, ``eoc_lags``, ``eoc_prior``, ``eoc_sample``,
            guidance branches).
        batch: n, samples per pipeline call.
    Returns:
        Bytes, ``{"buffers": 4 · n · B · Σ_u (S · r_u + K · E_u), "sums": 2 · 8 · (1 + 2 + 2K) · S · Σ_u G_u,
        "maps": ...}``: the documented per-batch buffers (sketches of every step, the last K outputs of the
        E_u elements the EOC sums read) and EOC sums (held twice: batch and partial state), and what the
        documented formula leaves out — the CountSketch maps (an int64 gather index of ``⌈D_u/r⌉ · r`` and a
        float64 sign per element of each sketched unit) and the EOC subset indices (int64, E_u per
        subsampled unit).
    """
    S, B, K, units = _unit_terms(header)
    n = int(batch)
    grouping, sample = header["eoc_prior"], int(header.get("eoc_sample", 0))
    reads = [_eoc_read(u, grouping, sample) for u in units]
    buffers = 4 * n * B * sum(S * int(u["sketch_dim"]) + K * e for u, e in zip(units, reads))
    sums = 2 * 8 * (1 + 2 + 2 * K) * S * sum(int(u["eoc_groups"]) for u in units)
    maps = 0
    for u, e in zip(units, reads):
        D, r = int(u["numel"]), int(u["sketch_dim"])
        if r < D:
            maps += 8 * (-(-D // r) * r) + 8 * D
        if e < D:
            maps += 8 * e
    return {"buffers": buffers, "sums": sums, "maps": maps}
