"""Reference model definitions: the two small class-conditional DiTs shipped with cachec.

Both are diffusers ``DiTTransformer2DModel`` in pixel space (MNIST digits padded 28→32, one channel),
12 blocks, hidden size 128 (4 heads × 32), patch 4 (64 tokens), 10 classes plus a null class (index 10)
for classifier-free guidance. They differ only in the objective and the sampler:

- ``digits-flow``: rectified flow, velocity target ``v = noise − x0``, ``FlowMatchEulerDiscreteScheduler``
  (as SD3/FLUX);
- ``digits-ddim``: DDPM with v-prediction on a cosine (``squaredcos_cap_v2``) schedule, sampled with
  ``DDIMScheduler`` (as DiT-XL/2 in the EOC/GOC papers).
"""

from __future__ import annotations

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the classifier-free-guidance null label
IMAGE_SIZE = 32

TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    num_layers=12,
    sample_size=IMAGE_SIZE,
    patch_size=4,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
)

FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
DDIM_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=False,
    set_alpha_to_one=False,
    timestep_spacing="trailing",
)

#: shipped model name -> (objective, default number of sampling steps)
REFERENCE_MODELS = {
    "digits-flow": ("flow", 25),
    "digits-ddim": ("ddim", 50),
}
DEFAULT_MODEL = "digits-flow"


def make_transformer():
    """A freshly initialised reference transformer with DiT's zero-initialised adaLN and output layer.

    Returns:
        ``diffusers.DiTTransformer2DModel`` (float32, CPU), about 4.5 M parameters.
    """
    import torch
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**TRANSFORMER_CONFIG)
    with torch.no_grad():
        for block in model.transformer_blocks:
            torch.nn.init.zeros_(block.norm1.linear.weight)
            torch.nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return model


def make_scheduler(objective: str):
    """The sampling scheduler of a reference objective (``"flow"`` or ``"ddim"``).

    Raises:
        ValueError: unknown objective.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if objective == "flow":
        return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)
    if objective == "ddim":
        return DDIMScheduler(**DDIM_SCHEDULER_CONFIG)
    raise ValueError(f"unknown objective {objective!r}; expected 'flow' or 'ddim'")
