"""``digits-mmdit-control``: a ControlNet beside the ``digits-mmdit`` transformer, and its sampling loop.

- :class:`ControlledFluxTransformer` — one ``nn.Module`` holding the ControlNet (``controlnet``, a diffusers
  ``FluxControlNetModel``: 2 dual-stream + 2 single-stream blocks) and the generator (``transformer``, the
  frozen ``FluxTransformer2DModel`` of ``digits-mmdit``). Each call runs the ControlNet on the packed control
  mask and passes its residuals (``controlnet_block_samples`` (2 × (B, 64, 128)),
  ``controlnet_single_block_samples`` (2 × (B, 64, 128))) to the generator, as diffusers'
  ``FluxControlNetPipeline`` does in one denoising step. cachec hooks this module as "the transformer", so
  its units are the ControlNet's blocks and the generator's branches together (registry entry
  ``digits-mmdit-control``), its FLOPs count both, and its weight fingerprint covers both.
- :class:`ControlDigitsPipeline` — :class:`~cachec.pipeline_prompt.PromptDigitsPipeline` whose conditions
  are (prompt, control mask) pairs written ``"PROMPT | SPLIT:K"`` (:mod:`cachec.control`); the mask is
  given to both CFG branches (the empty prompt's too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from .control import BASE, NAME, condition_set, masks_of, split_condition
from .pipeline import DigitsOutput
from .pipeline_prompt import PromptDigitsPipeline, load_pipeline as load_prompt_pipeline
from .reference_mmdit import encode, pack, position_ids

#: ControlNet depth: dual-stream and single-stream blocks (their residuals are added to the generator's
#: 4 dual blocks two by two and to its 8 single blocks four by four, diffusers' interval rule)
CONTROL_LAYERS = 2
CONTROL_SINGLE_LAYERS = 2


def make_controlnet(transformer):
    """A fresh ``FluxControlNetModel`` for ``transformer`` (float32): its embeddings and first
    :data:`CONTROL_LAYERS` dual / :data:`CONTROL_SINGLE_LAYERS` single blocks copied from the transformer,
    the control embedder and the residual projections zero-initialised (so it starts as a no-op)."""
    from diffusers import FluxControlNetModel

    cfg = transformer.config
    return FluxControlNetModel.from_transformer(
        transformer, num_layers=CONTROL_LAYERS, num_single_layers=CONTROL_SINGLE_LAYERS,
        attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads)


class ControlledFluxTransformer(torch.nn.Module):
    """A ``FluxTransformer2DModel`` driven by a ``FluxControlNetModel``, called as one transformer.

    Args:
        controlnet: the ``FluxControlNetModel``.
        transformer: the ``FluxTransformer2DModel`` (the generator).
        conditioning_scale: factor on the ControlNet residuals (1: as trained; 0: no control).
    """

    def __init__(self, controlnet, transformer, conditioning_scale: float = 1.0):
        super().__init__()
        self.controlnet = controlnet  # first: it runs first, and unit/parameter order follows execution
        self.transformer = transformer
        self.conditioning_scale = float(conditioning_scale)

    def forward(self, hidden_states: torch.Tensor, controlnet_cond: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor, img_ids: torch.Tensor,
                txt_ids: torch.Tensor, return_dict: bool = True):
        """One denoising call.

        Args:
            hidden_states: packed noisy image tokens (B, 64, 16).
            controlnet_cond: packed control mask (B, 64, 16), 0/1 in the model's dtype.
            encoder_hidden_states: (B, 8, 64) text states; pooled_projections: (B, 64).
            timestep: (B,) σ in [0, 1] (FLUX scales it by 1000 inside).
            img_ids, txt_ids: (64, 3) and (8, 3) position ids.

        Returns:
            The generator's output (``.sample``: (B, 64, 16) velocity), a tuple without ``return_dict``.
        """
        common = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids)
        blocks, single = self.controlnet(controlnet_cond=controlnet_cond, conditioning_scale=self.conditioning_scale,
                                         return_dict=False, **common)
        return self.transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                                return_dict=return_dict, **common)


class ControlDigitsPipeline(PromptDigitsPipeline):
    """Prompt + control-mask conditional sampling with classifier-free guidance (empty prompt, same mask).

    Args:
        transformer: a :class:`ControlledFluxTransformer`.
        scheduler, text_encoder, tokenizer, name: as :class:`PromptDigitsPipeline`.
    """

    def __init__(self, transformer, scheduler, text_encoder, tokenizer, name: str = NAME):
        super().__init__(transformer, scheduler, text_encoder, tokenizer, name)

    @property
    def prompt_sets(self) -> dict[str, list[str]]:
        """The shipped condition sets, ``{"calibration": 30, "held-out": 90 conditions}``
        (:func:`cachec.control.condition_set`): calibrate's and eval's defaults."""
        return {"calibration": condition_set("calibration"), "held-out": condition_set("held-out")}

    CONDITION_HELP = f"a condition: {NAME} takes 'PROMPT | SPLIT:K' strings"

    @staticmethod
    def check_condition(prompt: str) -> None:
        """Check one ``"PROMPT | SPLIT:K"`` pair: its prompt is in the grammar of :mod:`cachec.digit_prompts`
        and its mask exists (:func:`cachec.control.split_condition`).

        Raises:
            ValueError: a condition without a mask, a prompt outside the grammar or an unknown mask.
        """
        split_condition(prompt, require_mask=True)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], num_inference_steps: int = 25, guidance_scale: float = 3.0,
                 generator=None, cfg: str = "batched", callback: Callable[[int, int], None] | None = None
                 ) -> DigitsOutput:
        """Sample one image per ``"PROMPT | SPLIT:K"`` condition (other arguments as
        :meth:`PromptDigitsPipeline.__call__`).

        Raises:
            ValueError: a bad condition (see :meth:`check_prompts`), a non-positive step count or an unknown ``cfg``.
        """
        conditions = self.check_prompts(prompts)
        n = len(conditions)
        pairs = [split_condition(c, require_mask=True) for c in conditions]
        hidden, pooled = encode(self.tokenizer, self.text_encoder, [p for p, _ in pairs])
        e_hidden, e_pooled = encode(self.tokenizer, self.text_encoder, [""])
        control = pack(masks_of([m for _, m in pairs])).to(self.device, self.dtype)
        cond = {"encoder_hidden_states": hidden, "pooled_projections": pooled, "controlnet_cond": control}
        uncond = {"encoder_hidden_states": e_hidden.expand(n, -1, -1), "pooled_projections": e_pooled.expand(n, -1),
                  "controlnet_cond": control}
        self._ids = position_ids(self.device)
        return self._sample(n, cond, uncond, num_inference_steps, guidance_scale, generator, cfg, callback)


def load_pipeline(folder, name: str, device, dtype) -> ControlDigitsPipeline:
    """The :class:`ControlDigitsPipeline` of a saved control folder (``controlnet/`` + ``cachec_model.json``
    naming its ``base``, a shipped ``digits-mmdit``-style folder beside it), in ``dtype`` on ``device``, eval
    mode.

    Raises:
        FileNotFoundError: the base folder or the ControlNet weights are missing (one line naming the path).
    """
    import json

    from diffusers import FluxControlNetModel

    folder = Path(folder)
    card = json.loads((folder / "cachec_model.json").read_text())
    base_dir = folder.parent / card.get("base", BASE)
    if not (base_dir / "transformer").is_dir() or not (folder / "controlnet").is_dir():
        raise FileNotFoundError(f"{folder}: needs controlnet/ and its base model folder {base_dir}")
    base = load_prompt_pipeline(base_dir, card.get("base", BASE), device, dtype)
    controlnet = FluxControlNetModel.from_pretrained(str(folder / "controlnet"), dtype=dtype).to(device).eval()
    model = ControlledFluxTransformer(controlnet, base.transformer).eval()
    return ControlDigitsPipeline(model, base.scheduler, base.text_encoder, base.tokenizer, name=name)

