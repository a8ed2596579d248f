"""``PromptDigitsPipeline``: the sampling loop of ``digits-mmdit`` (prompts → digit images).

It drives a diffusers ``FluxTransformer2DModel`` as FluxPipeline does — packed image tokens
(``hidden_states`` (B, 64, 16)), text states (``encoder_hidden_states`` (B, 8, 64)),
``pooled_projections`` (B, 64), ``timestep`` = scheduler timestep / 1000, ``img_ids``/``txt_ids`` — so
cachec's hooks see the calls they see inside FluxPipeline, but with real classifier-free guidance against
the empty prompt (batched: one call with the conditional rows first; or split: two calls per step) and no
VAE (pixel space). The loop itself is :class:`cachec.pipeline.DigitsPipeline`'s.

What the rest of cachec needs to know about it is its ``"digits-mmdit"`` entry in
:mod:`cachec.runtime.registry`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .digit_prompts import parse, prompt_set
from .pipeline import DigitsOutput, DigitsPipeline
from .reference_mmdit import IMAGE_SIZE, encode, pack, position_ids, unpack


class PromptDigitsPipeline(DigitsPipeline):
    """Text-conditional pixel-space sampling with classifier-free guidance (empty-prompt branch).

    Args:
        transformer: the ``FluxTransformer2DModel`` of :mod:`cachec.reference_mmdit`.
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        text_encoder: its ``CLIPTextModel``.
        tokenizer: its word-level tokenizer (:func:`cachec.digit_prompts.make_tokenizer`).
        name: a display name.
    """

    def __init__(self, transformer, scheduler, text_encoder, tokenizer, name: str = "digits-mmdit"):
        super().__init__(transformer, scheduler, name)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._ids = None  # (img_ids, txt_ids) of the call in progress, on the pipeline's device

    num_classes = 10
    #: the shipped prompt sets (``calibration``, ``held-out``; :func:`cachec.digit_prompts.prompt_set`)
    prompt_sets = {"calibration": prompt_set("calibration"), "held-out": prompt_set("held-out")}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (1, IMAGE_SIZE, IMAGE_SIZE)

    def to(self, device=None, dtype=None) -> PromptDigitsPipeline:
        self.transformer.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=dtype)
        return self

    #: what a condition is, for the error that names a non-string one
    CONDITION_HELP = "a prompt: digits-mmdit is text-conditional"

    @staticmethod
    def check_condition(prompt: str) -> None:
        """Check one prompt against the grammar of :mod:`cachec.digit_prompts`.

        Raises:
            ValueError: a prompt outside the grammar (the message names it).
        """
        parse(prompt)

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> list[str]:
        """The conditions as a list, each a string passing :meth:`check_condition`.

        Raises:
            ValueError: a non-string, or as :meth:`check_condition` raises.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"{p!r} is not {cls.CONDITION_HELP}")
            cls.check_condition(p)
        return prompts

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        cfg: str = "batched",
        callback: Callable[[int, int], None] | None = None,
    ) -> DigitsOutput:
        """Sample one image per prompt (arguments as :meth:`DigitsPipeline.__call__`, prompts for labels).

        Raises:
            ValueError: a prompt outside the grammar, a non-positive step count or an unknown ``cfg``.
        """
        prompts = self.check_prompts(prompts)
        n = len(prompts)
        hidden, pooled = encode(self.tokenizer, self.text_encoder, prompts)
        e_hidden, e_pooled = encode(self.tokenizer, self.text_encoder, [""])
        cond = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": e_hidden.expand(n, -1, -1), "pooled_projections": e_pooled.expand(n, -1)}
        self._ids = position_ids(self.device)
        return self._sample(n, cond, uncond, num_inference_steps, guidance_scale, generator, cfg, callback)

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t / 1000.0  # FluxPipeline's convention: the transformer scales by 1000 inside

    def _predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        img_ids, txt_ids = self._ids
        out = self.transformer(hidden_states=pack(x).to(self.dtype), timestep=timestep.to(self.dtype),
                               img_ids=img_ids, txt_ids=txt_ids, **cond).sample
        return unpack(out.float())


def load_pipeline(folder, name: str, device, dtype) -> PromptDigitsPipeline:
    """The :class:`PromptDigitsPipeline` of a saved ``digits-mmdit`` folder (``transformer/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``), transformer and text encoder in ``dtype`` on
    ``device``, in eval mode."""
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    folder = Path(folder)
    transformer = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"), dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))
    transformer.to(device).eval()
    text_encoder.to(device).eval()
    return PromptDigitsPipeline(transformer, scheduler, text_encoder, tokenizer, name=name)
