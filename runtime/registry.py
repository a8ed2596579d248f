"""The model registry: everything cachec knows about a model family, in one declarative entry per family.

A :class:`ModelSpec` says which transformer and pipeline classes form the family (by class *name*, so the
registry imports neither diffusers nor cachec's own front end), how the transformer splits into cacheable
units (read by :func:`cachec.runtime.units.find_units`), how its pipelines lay out guidance, and how the
front end (:class:`cachec.loading.Driver`) calls them. Adding a family is one :func:`register` call; no other
module names model or pipeline classes.

Lookups: :func:`spec_for_transformer` (the unit layout and guidance semantics of a transformer) and
:func:`spec_for_pipeline` (everything else). Both raise :class:`UnsupportedModelError` naming the class and
the supported ones. Classes are matched by their own name, not by inheritance: a subclass of a registered
transformer is a new family until it is registered.

No torch, no diffusers here (the registry is read by the torch-free parts of the runtime too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

CONDITIONS = ("class", "prompt")


class UnsupportedModelError(ValueError):
    """The model's transformer or pipeline class has no entry in the model registry."""


@dataclass(frozen=True)
class ModelSpec:
    """Declarative description of one model family.

    Attributes:
        name: short family name (``"dit"``, ``"pixart"``, ``"sd3"``, ``"flux"``, ``"digits"``), unique.
        transformers: transformer class names of the family (``type(model).__name__``, compared exactly).
        pipelines: pipeline class names of the family; shell-style patterns (``"Flux*Pipeline"``) match a
            class name as :func:`fnmatch.fnmatchcase` does.
        blocks: the unit layout, ``{block_list_attribute: ((child_attribute, kind), ...)}``: the children of
            every block in the list that are units, with their kind (see
            :attr:`cachec.runtime.units.UnitSpec.kind`). A child that is ``None`` on a given block (e.g.
            SD3's last ``ff_context``) is not a unit; a child name of ``""`` makes the whole block a residual
            unit (``output − input``).
        residual_inputs: for whole-block units, the forward arguments the block's output parts add to, in
            output order (see :attr:`cachec.runtime.units.UnitSpec.residual_inputs`).
        guidance_scale_is_cfg: the pipelines' ``guidance_scale`` switches classifier-free guidance (two
            branches when ``> 1``). False for FLUX, whose ``guidance_scale`` is an embedded (distilled)
            guidance and whose CFG (``true_cfg_scale``) is always split calls.
        cond_first: a batched-CFG transformer call holds the conditional half first (``[labels, null]``);
            False where the pipeline concatenates ``[negative, prompt]`` and splits the output as
            ``uncond, cond`` (the text pipelines).
        condition: ``"class"`` (integer class labels, passed as ``class_labels=``) or ``"prompt"`` (strings,
            passed as ``prompt=`` together with ``height=``/``width=`` in pixels).
        call_kwargs: fixed extra keyword arguments of every pipeline call (e.g. PixArt's
            ``use_resolution_binning=False``).
        step_callback: the pipeline accepts diffusers' ``callback_on_step_end`` (used for progress).
        split_cfg: the pipeline is cachec's own sampling loop, called as ``pipe(conditions, steps,
            guidance, generators, cfg=..., callback=...)``; the only kind that can run split CFG (two
            transformer calls per step). The diffusers pipelines run batched CFG only.
        default_steps: sampling steps the family is meant to be run with (None: the model folder's own
            card gives it).
        default_guidance: guidance scale the family is meant to be run with (None: from the model card).
        takes_size: the pipeline call takes ``height=``/``width=`` in pixels (so ``--resolution HxW`` applies);
            False where the size is fixed by the transformer (DiT, the digit models). None (the default):
            True for text (``"prompt"``) families, False for class-conditional ones.
        default_resolution: ``(H, W)`` pixels the family samples at by default; None: the pipeline's own
            default, its default latent size (``default_sample_size`` or the transformer's
            ``sample_size``) times the VAE scale factor.
        digit_metrics: the digit classifier (class accuracy, Fréchet distance in its features) applies to
            the family's images (1×32×32 digits, classes 0..9).
        eval_samples: default number of held-out samples of ``cachec eval`` (a count that finishes in
            minutes on a CPU at the family's usual size).
        reference: the hub id of the family's reference checkpoint (``""``: none, e.g. the digit models).
        attention_maps: where attention-map units can be (docs/hgc.md, "Fine grain"): ``{block_list_attribute:
            (attention_child_attribute, ...)}``; each such attention of each block gets a child unit of kind
            ``"attn_map"`` (its probability map, :mod:`cachec.runtime.attention_maps`) when a calibration asks
            for them. Empty: the family's attention processors are not supported for map reuse.
        published: the transformer constructor arguments of that checkpoint (its ``transformer/config.json``
            without the ``_class_name``/``_diffusers_version`` bookkeeping), as data: what
            :func:`cachec.shapes.build_pipeline` builds full-width random models from. Read-only
            information; nothing else in the registry depends on it.
    """

    name: str
    transformers: tuple[str, ...]
    pipelines: tuple[str, ...]
    blocks: Mapping[str, tuple[tuple[str, str], ...]]
    residual_inputs: tuple[str, ...] = ()
    guidance_scale_is_cfg: bool = True
    cond_first: bool = False
    condition: str = "prompt"
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    step_callback: bool = True
    split_cfg: bool = False
    default_steps: int | None = 20
    default_guidance: float | None = 4.5
    takes_size: bool | None = None
    default_resolution: tuple[int, int] | None = None
    digit_metrics: bool = False
    eval_samples: int = 8
    reference: str = ""
    attention_maps: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    published: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.takes_size is None:
            object.__setattr__(self, "takes_size", self.condition == "prompt")

    def matches_pipeline(self, class_name: str) -> bool:
        """Whether a pipeline class name belongs to this family."""
        return any(fnmatchcase(class_name, p) for p in self.pipelines)

    def unit_layout(self) -> tuple:
        """What :func:`~cachec.runtime.units.find_units` reads: ``(blocks, residual_inputs,
        guidance_scale_is_cfg)``; families sharing a transformer class must agree on it."""
        return (dict(self.blocks), tuple(self.residual_inputs), self.guidance_scale_is_cfg, dict(self.attention_maps))


# Published transformer configs of each family's reference checkpoint, copied from the hub's
# ``transformer/config.json`` files (keys the installed diffusers constructors take; lists as tuples).
DIT_XL_2_256 = {  # facebook/DiT-XL-2-256
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
PIXART_SIGMA_XL_2_1024_MS = {  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 128,
    "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": 2,
    "use_additional_conditions": False, "caption_channels": 4096, "attention_type": "default",
}
SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
FLUX_1_DEV = {  # black-forest-labs/FLUX.1-dev (FLUX.1-schnell: the same with guidance_embeds False)
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
FLUX_1_SCHNELL = dict(FLUX_1_DEV, guidance_embeds=False)  # black-forest-labs/FLUX.1-schnell

_DIT_BLOCKS = {"transformer_blocks": (("attn1", "attn"), ("attn2", "cross_attn"), ("ff", "ff"))}
_FLUX_BLOCKS = {
    "transformer_blocks": (("attn", "joint_attn"), ("ff", "ff"), ("ff_context", "ff_context")),
    "single_transformer_blocks": (("", "block"),),
}
_FLUX_RESIDUALS = ("encoder_hidden_states", "hidden_states")
# attention-map units: the self-attention of DiT/PixArt blocks (AttnProcessor2_0), FLUX's joint and single attention
_DIT_MAPS = {"transformer_blocks": ("attn1",)}
_FLUX_MAPS = {"transformer_blocks": ("attn",), "single_transformer_blocks": ("attn",)}

#: family name -> spec, in lookup order (the first family naming a transformer class answers for it)
_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a family to the registry.

    Returns:
        ``spec``.

    Raises:
        ValueError: the name is taken, the condition kind is unknown, or a transformer class it names is
            already registered with another unit layout (:meth:`ModelSpec.unit_layout`).
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"a model family named {spec.name!r} is already registered")
    if spec.condition not in CONDITIONS:
        raise ValueError(f"family {spec.name!r}: condition must be one of {CONDITIONS}, got {spec.condition!r}")
    if not spec.transformers or not spec.pipelines:
        raise ValueError(f"family {spec.name!r} names no transformer or no pipeline class")
    for other in _REGISTRY.values():
        shared = set(spec.transformers) & set(other.transformers)
        if shared and other.unit_layout() != spec.unit_layout():
            raise ValueError(
                f"family {spec.name!r} describes {', '.join(sorted(shared))} differently from family {other.name!r}"
            )
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> ModelSpec:
    """Remove a family (tests that register a temporary one restore the registry with it).

    Raises:
        KeyError: no family of that name.
    """
    return _REGISTRY.pop(name)


def registered() -> tuple[ModelSpec, ...]:
    """All registered families, in lookup order."""
    return tuple(_REGISTRY.values())


def unwrap(transformer):
    """The underlying ``nn.Module`` of a (possibly ``torch.compile``-wrapped) transformer."""
    return getattr(transformer, "_orig_mod", transformer)


def spec_for_transformer(transformer) -> ModelSpec:
    """The registry entry of a (possibly compiled) transformer, by its class name.

    Raises:
        UnsupportedModelError: no family names the class (the message names it and the supported ones).
    """
    cls = type(unwrap(transformer)).__name__
    for spec in _REGISTRY.values():
        if cls in spec.transformers:
            return spec
    supported = sorted({t for s in _REGISTRY.values() for t in s.transformers})
    raise UnsupportedModelError(
        f"cachec has no unit registry entry for {cls}; supported transformer classes: {', '.join(supported)}"
    )


def spec_for_pipeline(pipe) -> ModelSpec:
    """The registry entry of a pipeline (a diffusers pipeline or cachec's ``DigitsPipeline``), by its class
    name.

    Raises:
        UnsupportedModelError: no family names the class (the message names it and the supported ones).
    """
    cls = type(pipe).__name__
    for spec in _REGISTRY.values():
        if spec.matches_pipeline(cls):
            return spec
    supported = [p for s in _REGISTRY.values() for p in s.pipelines]
    raise UnsupportedModelError(f"cachec cannot drive a {cls}; supported pipeline classes: {', '.join(supported)}")


register(ModelSpec(
    name="dit",
    transformers=("DiTTransformer2DModel",),
    pipelines=("DiTPipeline",),
    blocks=_DIT_BLOCKS,
    cond_first=True,  # latent_model_input = cat([latents] * 2), class_labels = cat([labels, null])
    condition="class",
    step_callback=False,  # DiTPipeline has no callback_on_step_end
    default_guidance=4.0,
    takes_size=False,  # DiTPipeline samples at the transformer's sample_size
    reference="facebook/DiT-XL-2-256",
    published=DIT_XL_2_256,
    attention_maps=_DIT_MAPS,
))
register(ModelSpec(
    name="pixart",
    transformers=("PixArtTransformer2DModel",),
    pipelines=("PixArt*Pipeline",),
    blocks=_DIT_BLOCKS,
    # binning would resize to the aspect-ratio bins; clean_caption needs bs4/ftfy and only warns without them
    call_kwargs={"use_resolution_binning": False, "clean_caption": False},
    step_callback=False,  # PixArtSigmaPipeline swallows callback_on_step_end into **kwargs (never calls it)
    reference="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    published=PIXART_SIGMA_XL_2_1024_MS,
    attention_maps=_DIT_MAPS,
))
register(ModelSpec(
    name="sd3",
    transformers=("SD3Transformer2DModel",),
    pipelines=("StableDiffusion3*Pipeline",),
    blocks={
        "transformer_blocks": (
            ("attn", "joint_attn"),
            ("attn2", "attn"),
            ("ff", "ff"),
            ("ff_context", "ff_context"),
        )
    },
    reference="stabilityai/stable-diffusion-3-medium-diffusers",
    published=SD3_MEDIUM,
))
register(ModelSpec(
    name="flux",
    transformers=("FluxTransformer2DModel",),
    pipelines=("Flux*Pipeline",),
    blocks=_FLUX_BLOCKS,
    residual_inputs=_FLUX_RESIDUALS,
    guidance_scale_is_cfg=False,
    default_guidance=3.5,
    reference="black-forest-labs/FLUX.1-dev",
    published=FLUX_1_DEV,
    attention_maps=_FLUX_MAPS,
))
register(ModelSpec(
    name="digits",  # cachec's reference models: cachec.pipeline.DigitsPipeline over a diffusers DiT
    transformers=("DiTTransformer2DModel",),
    pipelines=("DigitsPipeline",),
    blocks=_DIT_BLOCKS,
    cond_first=True,
    condition="class",
    step_callback=False,
    split_cfg=True,
    default_steps=None,  # the reference folder's cachec_model.json
    default_guidance=None,
    takes_size=False,
    digit_metrics=True,
    eval_samples=100,  # 10 per class, as the shipped plans and the README's main job are evaluated
    attention_maps=_DIT_MAPS,
))
register(ModelSpec(
    name="digits-mmdit",  # cachec's prompt-conditioned reference: cachec.pipeline_prompt.PromptDigitsPipeline
    transformers=("FluxTransformer2DModel",),
    pipelines=("PromptDigitsPipeline",),
    blocks=_FLUX_BLOCKS,
    residual_inputs=_FLUX_RESIDUALS,
    guidance_scale_is_cfg=False,  # the transformer's family (flux) decides; this loop's CFG is real CFG
    cond_first=True,  # batched CFG: conditional rows first
    condition="prompt",
    step_callback=False,
    split_cfg=True,
    default_steps=None,  # the reference folder's cachec_model.json
    default_guidance=None,
    takes_size=False,
    digit_metrics=True,
    eval_samples=90,  # the 30 held-out prompts 3 times each
    attention_maps=_FLUX_MAPS,
))
register(ModelSpec(
    name="digits-mmdit-control",  # digits-mmdit + a ControlNet on ink masks: cachec.pipeline_control
    transformers=("ControlledFluxTransformer",),  # the ControlNet and the generator, called as one transformer
    pipelines=("ControlDigitsPipeline",),
    blocks={  # execution order: the ControlNet's blocks run first; their residuals feed the generator's blocks
        "controlnet.transformer_blocks": (("", "control_block"),),
        "controlnet.single_transformer_blocks": (("", "control_block"),),
        **{f"transformer.{k}": v for k, v in _FLUX_BLOCKS.items()},
    },
    residual_inputs=_FLUX_RESIDUALS,  # dual and single FLUX blocks both return (encoder_hidden_states, hidden_states)
    guidance_scale_is_cfg=False,
    cond_first=True,
    condition="prompt",  # "PROMPT | SPLIT:K" strings: a prompt and a control mask (cachec.control)
    step_callback=False,
    split_cfg=True,
    default_steps=None,
    default_guidance=None,
    takes_size=False,
    digit_metrics=True,
    eval_samples=90,  # the 90 held-out (prompt, mask) conditions once each
    attention_maps={f"{p}{k}": v for p in ("controlnet.", "transformer.") for k, v in _FLUX_MAPS.items()},
))
