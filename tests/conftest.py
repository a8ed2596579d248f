"""Shared test fixtures: tiny random-initialised pipelines, built offline and reloaded through cachec.

Every fixture is session-scoped (``import diffusers`` and the builds cost a few seconds once) and returns a
:class:`cachec.loading.Driver` obtained from :func:`cachec.loading.load_model` on a folder written with
``save_pretrained``, so the same loading path users take is exercised.

- ``tiny_pipelines``: ``{"dit", "pixart", "sd3", "flux"}`` → Driver over ``DiTPipeline``,
  ``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``; 2 blocks (FLUX: 1 double + 1
  single), hidden 16, 32×32 images through a 3-level tiny ``AutoencoderKL`` (latents 8×8×4, 16 tokens).
- ``tiny_digits``: Driver over :class:`cachec.pipeline.DigitsPipeline`, a random-init 2-layer hidden-32 DiT
  with the reference config otherwise (32×32×1, patch 4, 10 classes), flow matching.
- ``tiny_digits_ddim``: the same transformer weights with ``DDIMScheduler`` (v-prediction).

Nothing here touches the network: tokenizers are built in memory (transformers 5) and saved; the tokenizer
and text-encoder builders are shared with the full-width models (:mod:`cachec.shapes`).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from cachec.shapes import clip_text_encoder, t5_text_encoder

# The tiny models gain nothing from intra-op threads, and on a loaded 2-core machine multi-threaded kernels
# are several times slower (measured 7x on the tiny SD3 pipeline). CACHEC_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("CACHEC_TEST_THREADS", "1")))

TINY_SIZE = 32  # pixels
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 8, 8),  # scale factor 4: 32x32 images <-> 8x8 latents
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=TINY_SIZE,
    shift_factor=0.0,  # SD3/FLUX read it
)


def _seeded(seed: int):
    torch.manual_seed(seed)


def _t5(d_model: int = 32):
    """A tiny T5 tokenizer (Unigram, built in memory) and encoder (:func:`cachec.shapes.t5_text_encoder`)."""
    return t5_text_encoder(d_model)


def _clip(hidden: int = 8, projection: int | None = None):
    """A tiny CLIP BPE tokenizer (no merges) and text encoder (with projection when ``projection``)
    (:func:`cachec.shapes.clip_text_encoder`)."""
    return clip_text_encoder(hidden, projection)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**TINY_VAE).eval()


def build_tiny_pipeline(family: str):
    """A tiny random-init diffusers pipeline of ``family`` (``dit``, ``pixart``, ``sd3``, ``flux``)."""
    import diffusers as d

    _seeded({"dit": 1, "pixart": 2, "sd3": 3, "flux": 4}[family])
    if family == "dit":
        tr = d.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
        )
        return d.DiTPipeline(transformer=tr, vae=_vae(), scheduler=d.DDIMScheduler())
    if family == "pixart":
        tok, enc = _t5(32)
        tr = d.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=32, norm_num_groups=4,
        )
        return d.PixArtSigmaPipeline(
            tokenizer=tok, text_encoder=enc, vae=_vae(), transformer=tr, scheduler=d.DPMSolverMultistepScheduler()
        )
    if family == "sd3":
        tok1, enc1 = _clip(8, 8)
        tok2, enc2 = _clip(8, 8)
        tok3, enc3 = _t5(32)
        tr = d.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=16,
        )
        return d.StableDiffusion3Pipeline(
            transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(),
            text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
            text_encoder_3=enc3, tokenizer_3=tok3,
        )
    if family == "flux":
        tok1, enc1 = _clip(16)
        tok2, enc2 = _t5(32)
        tr = d.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
        sched = d.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256
        )
        return d.FluxPipeline(
            scheduler=sched, vae=_vae(), text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
            transformer=tr,
        )
    raise ValueError(f"unknown tiny family {family!r}")


def build_tiny_digits_folder(folder, objective: str = "flow", num_layers: int = 2, seed: int = 0) -> str:
    """Write a reference-style model folder (transformer/, scheduler/, cachec_model.json) with a random-init
    small digits DiT (hidden 32 = 2 heads × 16, reference config otherwise). The default random init of
    diffusers is kept (adaLN and output not zeroed) so every unit changes the output.

    Returns:
        The folder path as a string.
    """
    from diffusers import DiTTransformer2DModel

    from cachec.reference import TRANSFORMER_CONFIG, make_scheduler

    cfg = dict(TRANSFORMER_CONFIG, num_layers=num_layers, num_attention_heads=2, attention_head_dim=16)
    _seeded(seed)
    tr = DiTTransformer2DModel(**cfg)
    os.makedirs(folder, exist_ok=True)
    tr.save_pretrained(os.path.join(folder, "transformer"))
    make_scheduler(objective).save_pretrained(os.path.join(folder, "scheduler"))
    card = dict(objective=objective, default_steps=8, default_guidance=3.0)
    with open(os.path.join(folder, "cachec_model.json"), "w") as f:
        json.dump(card, f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """{"dit", "pixart", "sd3", "flux"} → cachec Driver over a tiny random pipeline (reloaded from disk)."""
    from cachec.loading import load_model

    root = tmp_path_factory.mktemp("tiny_pipelines")
    out = {}
    for family in ("dit", "pixart", "sd3", "flux"):
        folder = root / family
        build_tiny_pipeline(family).save_pretrained(str(folder))
        driver = load_model(str(folder))
        if family == "flux":
            # FluxPipeline's own default is 128 latents × vae factor; the tiny tests run at 32×32
            driver.resolution = (TINY_SIZE, TINY_SIZE)
        out[family] = driver
    return out


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """Driver over DigitsPipeline with a random-init 2-layer hidden-32 DiT (flow matching)."""
    from cachec.loading import load_model

    return load_model(build_tiny_digits_folder(tmp_path_factory.mktemp("tiny_digits"), "flow"))


@pytest.fixture(scope="session")
def tiny_digits_ddim(tmp_path_factory):
    """Driver over DigitsPipeline with the same random-init DiT sampled with DDIMScheduler (v-prediction)."""
    from cachec.loading import load_model

    return load_model(build_tiny_digits_folder(tmp_path_factory.mktemp("tiny_digits_ddim"), "ddim"))
