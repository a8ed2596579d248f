"""One loading function for every stage: a shipped reference name, a local diffusers folder or a hub id.

:func:`load_model` returns a :class:`Driver`, a uniform handle that every stage can drive with the same
call shape — conditions (class labels or prompts), steps, guidance, per-sample seeds → images — whether
underneath is our :class:`~cachec.pipeline.DigitsPipeline` or an ordinary diffusers pipeline
(``DiTPipeline``, ``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, …). What differs
between them (condition kind, call keywords, defaults, split CFG) is read from the pipeline's entry in the
model registry (:mod:`cachec.runtime.registry`); nothing here names a pipeline class.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .control import NAME as CONTROL_NAME
from .reference import DEFAULT_MODEL, REFERENCE_MODELS
from .reference_mmdit import NAME as MMDIT_NAME
from .runtime.registry import ModelSpec, spec_for_pipeline

MODELS_DIR = Path(__file__).parent / "models"
REFERENCE_CARD = "cachec_model.json"


class ModelLoadError(ValueError):
    """The model could not be found or is not a model cachec can drive."""


@dataclass
class Driver:
    """A loaded model with a uniform sampling call.

    Attributes:
        pipe: the underlying pipeline (``DigitsPipeline`` or a diffusers pipeline).
        name: what the user asked for (shipped name or path).
        condition_kind: ``"class"`` (integer labels) or ``"prompt"`` (strings).
        num_classes: number of valid class labels (class-conditional models), else None.
        default_steps: sampling steps the model is meant to be run with.
        default_guidance: guidance scale the model is meant to be run with.
        resolution: (H, W) of the generated images in pixels.
        info: extra facts (objective, training record) for reports.
        prompt_sets: the model's own prompt sets, ``{"calibration": [...], "held-out": [...]}`` (the shipped
            prompt-conditioned reference model); empty for other models (``cachec eval`` then uses
            :data:`cachec.evaluation.HELD_OUT_PROMPTS` on text models).
    """

    pipe: Any
    name: str
    condition_kind: str
    num_classes: int | None
    default_steps: int
    default_guidance: float
    resolution: tuple[int, int]
    info: dict = field(default_factory=dict)
    prompt_sets: dict = field(default_factory=dict)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def spec(self) -> ModelSpec:
        """The pipeline's model registry entry.

        Raises:
            UnsupportedModelError: the pipeline class is not registered.
        """
        return spec_for_pipeline(self.pipe)

    def set_resolution(self, resolution: Sequence[int] | None) -> None:
        """Sample at ``resolution`` = (H, W) pixels from now on (None: keep the current one).

        Raises:
            ValueError: not two positive ints, or a size other than the current one for a family whose
                pipeline takes no size (registry ``takes_size``: DiT, the digit models).
        """
        if resolution is None:
            return
        h, w = (int(x) for x in resolution)
        if h <= 0 or w <= 0:
            raise ValueError(f"resolution must be positive, got {h}x{w}")
        if (h, w) != tuple(self.resolution) and not self.spec.takes_size:
            r = self.resolution
            raise ValueError(f"{self.name} samples at a fixed {r[0]}x{r[1]} ({type(self.pipe).__name__} takes no "
                             f"size): cannot sample at {h}x{w}")
        self.resolution = (h, w)

    def check_conditions(self, conditions: Sequence) -> list:
        """Validate conditions for this model.

        Raises:
            ValueError: empty, a class label out of range, or the wrong kind (prompt vs class).
        """
        conditions = list(conditions)
        if not conditions:
            raise ValueError("no conditions given: pass class labels (e.g. --classes 0-9) or prompts")
        if self.condition_kind == "class":
            for c in conditions:
                if isinstance(c, bool) or not isinstance(c, int):
                    raise ValueError(f"{self.name} is class-conditional: condition {c!r} is not a class label")
                if not 0 <= c < (self.num_classes or 0):
                    raise ValueError(
                        f"class label {c} is out of range: {self.name} has classes 0..{(self.num_classes or 1) - 1}"
                    )
        else:
            for c in conditions:
                if not isinstance(c, str):
                    raise ValueError(f"{self.name} is text-conditional: condition {c!r} is not a prompt")
        return conditions

    def generate(
        self,
        conditions: Sequence,
        seeds: Sequence[int],
        steps: int | None = None,
        guidance: float | None = None,
        cfg: str = "batched",
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Sample one image per (condition, seed) pair, uncached unless hooks are installed.

        Args:
            conditions: N class labels or prompts.
            seeds: N seeds; sample i uses ``torch.Generator().manual_seed(seeds[i])`` for its noise.
            steps: sampling steps (default: the model's).
            guidance: CFG scale (default: the model's).
            cfg: ``"batched"`` or ``"split"`` (only pipelines whose registry entry has ``split_cfg``, the
                reference pipeline, can split).
            callback: ``callback(step_index, num_steps)`` after each step.

        Returns:
            float32 (N, C, H, W) images in [0, 1], on CPU.

        Raises:
            ValueError: bad conditions, mismatched lengths, non-positive steps, ``cfg="split"`` for a pipeline
                that runs batched CFG only.
            UnsupportedModelError: the pipeline class is not registered.
        """
        conditions = self.check_conditions(conditions)
        if len(seeds) != len(conditions):
            raise ValueError(f"got {len(seeds)} seeds for {len(conditions)} conditions")
        steps = self.default_steps if steps is None else int(steps)
        if steps <= 0:
            raise ValueError(f"the number of steps must be positive, got {steps}")
        guidance = self.default_guidance if guidance is None else float(guidance)
        spec = self.spec
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if spec.split_cfg:  # cachec's own sampling loop
            return self.pipe(conditions, steps, guidance, gens, cfg=cfg, callback=callback).images.cpu()
        if cfg != "batched":
            raise ValueError(f"{type(self.pipe).__name__} only runs batched CFG")
        kwargs: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pt")
        if callback is not None and spec.step_callback:
            kwargs["callback_on_step_end"] = lambda p, i, t, kw: (callback(i, steps), kw)[1]
        kwargs["generator"] = gens
        if spec.condition == "class":
            kwargs["class_labels"] = conditions
        else:
            kwargs["prompt"] = conditions
        if spec.takes_size:
            h, w = self.resolution
            kwargs.update(height=h, width=w)
        kwargs.update(spec.call_kwargs)
        out = self.pipe(**kwargs)
        images = out.images
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images)
        if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        return images.float().cpu()


@contextlib.contextmanager
def quiet_diffusers():
    """Within the block, diffusers' and transformers' loading bars, info/warning logs and their
    FutureWarning/DeprecationWarning are silenced (cachec prints its own progress). Errors are not hidden:
    exceptions propagate and error-level logs still print. Previous settings are restored afterwards."""
    import warnings

    from diffusers.utils import logging as dlog

    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - transformers is a dependency
        tlog = None
    saved = [(dlog, dlog.get_verbosity(), dlog.is_progress_bar_enabled())]
    if tlog is not None:
        saved.append((tlog, tlog.get_verbosity(), tlog.is_progress_bar_enabled()))
    try:
        for mod, _, _ in saved:
            mod.set_verbosity_error()
            mod.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for mod, level, bars in saved:
            mod.set_verbosity(level)
            (mod.enable_progress_bar if bars else mod.disable_progress_bar)()


def shipped_models() -> list[str]:
    """Names of the reference models shipped inside the package."""
    return sorted({*REFERENCE_MODELS, MMDIT_NAME, CONTROL_NAME})


def _load_reference(folder: Path, name: str, device, dtype) -> Driver:
    """A shipped-style reference folder: a class-conditional digit DiT, (card ``architecture: mmdit``) the
    prompt-conditioned ``digits-mmdit``, or (``mmdit-control``) its ControlNet model ``digits-mmdit-control``."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from .pipeline import DigitsPipeline
    from .pipeline_prompt import load_pipeline

    card = json.loads((folder / REFERENCE_CARD).read_text())
    with quiet_diffusers():
        if card.get("architecture") == "mmdit":
            pipe = load_pipeline(folder, name, device, dtype)
        elif card.get("architecture") == "mmdit-control":
            from .pipeline_control import load_pipeline as load_control_pipeline

            pipe = load_control_pipeline(folder, name, device, dtype)
        else:
            transformer = DiTTransformer2DModel.from_pretrained(str(folder / "transformer"), dtype=dtype)
            transformer.to(device).eval()
            sched_cls = FlowMatchEulerDiscreteScheduler if card["objective"] == "flow" else DDIMScheduler
            pipe = DigitsPipeline(transformer, sched_cls.from_pretrained(str(folder / "scheduler")), name=name)
    spec = spec_for_pipeline(pipe)
    side = pipe.sample_shape[-1]
    return Driver(
        pipe=pipe,
        name=name,
        condition_kind=spec.condition,
        num_classes=pipe.num_classes if spec.condition == "class" else None,
        default_steps=int(card["default_steps"]),
        default_guidance=float(card["default_guidance"]),
        resolution=(side, side),
        info=card,
        prompt_sets=dict(getattr(pipe, "prompt_sets", {})),
    )


def _load_diffusers(source: str, name: str, device, dtype) -> Driver:
    import diffusers

    try:
        with quiet_diffusers():
            pipe = diffusers.DiffusionPipeline.from_pretrained(source, dtype=dtype)
    except Exception as exc:  # diffusers raises many types for "not a pipeline" / offline hub
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load a diffusers pipeline from {source!r}: {first}") from exc
    if getattr(pipe, "transformer", None) is None:
        raise ModelLoadError(f"{source!r} is a {type(pipe).__name__} without a transformer: cachec caches DiTs")
    spec = spec_for_pipeline(pipe)
    if spec.default_steps is None or spec.default_guidance is None:
        raise ModelLoadError(f"registry entry {spec.name!r} ({type(pipe).__name__}) has no default steps/guidance")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    cls = type(pipe).__name__
    vae = getattr(pipe, "vae", None)
    vae_factor = getattr(pipe, "vae_scale_factor", None)
    if vae_factor is None:
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    latent_size = getattr(pipe, "default_sample_size", None) or getattr(transformer.config, "sample_size", None)
    if latent_size is None:
        raise ModelLoadError(
            f"cannot tell the default resolution of {cls} from {source!r}: set driver.resolution = (H, W) after loading"
        )
    # the registry's default, else the pipelines' own (height = width = default latent size x VAE scale factor)
    size = tuple(spec.default_resolution or (int(latent_size) * int(vae_factor),) * 2)
    num_classes = int(transformer.config.num_embeds_ada_norm) if spec.condition == "class" else None
    return Driver(
        pipe, name, spec.condition, num_classes, int(spec.default_steps), float(spec.default_guidance),
        size, {"pipeline": cls},
    )


def load_model(name_or_path: str | None = None, device: str | torch.device = "cpu", dtype=torch.float32) -> Driver:
    """Load a model every cachec stage can drive.

    Args:
        name_or_path: a shipped reference name (``"digits-flow"``, ``"digits-ddim"``; default
            ``"digits-flow"``), a local folder (a shipped-style reference folder with ``cachec_model.json``, or
            a diffusers pipeline folder with ``model_index.json``), or a Hugging Face hub id (needs the
            weights in the local hub cache: nothing is downloaded when offline).
        device: torch device for the transformer.
        dtype: torch dtype of the transformer (float32 on CPU).

    Returns:
        A :class:`Driver`.

    Raises:
        ModelLoadError: unknown name, a folder that is not a diffusers model, or a load failure; the message
            says what was tried.
        UnsupportedModelError: a diffusers pipeline whose class has no model registry entry (the message
            names the supported ones).
    """
    name = name_or_path or DEFAULT_MODEL
    path = Path(name)
    if name in shipped_models():
        folder = MODELS_DIR / name
        if not (folder / REFERENCE_CARD).exists():
            raise ModelLoadError(f"the shipped model {name!r} is missing from this install ({folder}); reinstall cachec")
        return _load_reference(folder, name, device, dtype)
    if path.is_dir():
        if (path / REFERENCE_CARD).exists():
            return _load_reference(path, str(path), device, dtype)
        if (path / "model_index.json").exists():
            return _load_diffusers(str(path), str(path), device, dtype)
        raise ModelLoadError(
            f"{str(path)!r} is not a diffusers model folder (no model_index.json or {REFERENCE_CARD} in it)"
        )
    if path.exists():
        raise ModelLoadError(f"{str(path)!r} is a file, not a model folder or a shipped model name")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _load_diffusers(name, name, device, dtype)
    raise ModelLoadError(
        f"unknown model {name!r}: use a shipped name ({', '.join(shipped_models())}), a diffusers folder or a hub id"
    )
