"""The plan schema (version 1): the typed :class:`Plan`, its constants and the FLOPs-fraction formula.

The dataclasses are the executable form of ``docs/plan-format.md``; :mod:`cachec.runtime.plan_parse` builds
them from YAML (strictly) and :mod:`cachec.runtime.plan_write` writes them (deterministically). Import
the public names from :mod:`cachec.runtime.plan`. No torch, no scipy: the planner builds plans with it on
machines without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
GUIDANCE_MODES = ("batched", "split", "none")
BUDGET_METHODS = ("cachec", "fora", "eoc-paper", "goc-paper", "uniform", "manual")
HISTORY_MODES = ("computed", "used")
COMPUTE, SKIP = "C", "."
#: relative tolerance of the ``budget.realised`` consistency check
REALISED_RTOL = 1e-6

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class PlanError(ValueError):
    """A plan file or plan dict does not follow the plan format; the message names the key path."""


# --------------------------------------------------------------------------------------------- dataclasses


@dataclass
class ModelInfo:
    """Identity of the transformer a plan was made for.

    Attributes:
        cls: transformer class name (YAML key ``class``), e.g. ``"DiTTransformer2DModel"``.
        fingerprint: ``"sha256:<64 hex>"`` from :func:`cachec.runtime.fingerprint.weights_fingerprint`.
        adapters: names of LoRA/adapters fused into the weights.
        source: where the model is loaded from (shipped name, folder or hub id), or None; used by
            ``cachec run``/``cachec eval`` when no model is given (YAML key ``source``, optional).
    """

    cls: str
    fingerprint: str
    adapters: list[str] = field(default_factory=list)
    source: str | None = None


@dataclass
class Guidance:
    """How classifier-free guidance was run during calibration.

    Attributes:
        mode: ``"batched"`` (all branches in one transformer call), ``"split"`` (one call per branch, in
            order) or ``"none"`` (one branch).
        scale: guidance scale.
        branches: number of guidance branches (1 for ``"none"``, >= 2 otherwise).
    """

    mode: str
    scale: float
    branches: int


@dataclass
class Sampler:
    """The sampling schedule a plan is indexed by.

    Attributes:
        scheduler: scheduler class name.
        steps: number of denoising steps S.
        timesteps: S floats, the ``timestep`` value the transformer receives at each step (for FLUX this is
            the scheduler timestep / 1000, as FluxPipeline passes it).
        sigmas: S floats or None.
        guidance: :class:`Guidance`.
        resolution: ``[H, W]`` in pixels.
    """

    scheduler: str
    steps: int
    timesteps: list[float]
    sigmas: list[float] | None
    guidance: Guidance
    resolution: list[int]


@dataclass
class Budget:
    """Budget target and what the schedule spends.

    Attributes:
        method: ``cachec | fora | eoc-paper | goc-paper | uniform | manual``.
        target: requested fraction of a full run's FLOPs, in (0, 1].
        realised: fraction this schedule spends (see :func:`realised_fraction`), in (0, 1].
        full_step_flops: FLOPs of one uncached forward, one sample, one branch (> 0).
        fixed_step_flops: never-cached FLOPs of that forward (>= 0).
        options: solver options (str keys; YAML scalars, lists and dicts as values).
    """

    method: str
    target: float
    realised: float
    full_step_flops: float
    fixed_step_flops: float
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Compensation:
    """How a skipped (unit, step) is predicted.

    Attributes:
        coeffs: non-empty list of floats; ``F̂ = Σ_j coeffs[j]·H_{j+1}`` (``H_1`` most recent history entry).
        eoc_alpha: EOC multiplicative correction ``F̂ ← F̂ ⊙ (1 + eoc_alpha·D)``; 0 = none. Non-zero values need
            a sidecar tensor ``eoc/{unit}/{step}`` (``.../{part}`` for tuple outputs).
    """

    coeffs: list[float]
    eoc_alpha: float = 0.0


@dataclass
class UnitPlan:
    """The schedule of one unit.

    Attributes:
        name: module path of the unit (``transformer_blocks.0.attn1``).
        flops: FLOPs of one call of the unit, one sample, one branch (>= 0).
        actions: S characters, ``C`` compute (and store) or ``.`` skip (predict).
        compensation: ``{step: Compensation}`` for exactly the skipped steps the unit runs at (a nested unit,
            docs/plan-format.md "Nested units", has none where its parent is skipped: it is *idle* there).
    """

    name: str
    flops: float
    actions: str
    compensation: dict[int, Compensation] = field(default_factory=dict)

    def idle(self, step: int) -> bool:
        """Whether the unit does not run at ``step`` (skipped without a compensation entry: a nested unit
        under a skipped parent, as the parser admits it only there)."""
        return self.actions[step] != COMPUTE and step not in self.compensation


@dataclass
class Sidecar:
    """Safetensors file holding the EOC prior tensors.

    Attributes:
        file: path relative to the plan YAML (no ``..``, not absolute).
        sha256: 64 lowercase hex digits of the file's bytes.
    """

    file: str
    sha256: str


@dataclass
class Provenance:
    """Where a plan comes from.

    Attributes:
        calibration_sha256: 64 hex digits of the calibration file, or None for plans made without one
            (manual/uniform plans).
        conditions: number of calibration conditions (0 without calibration).
        samples: number of calibration samples (0 without calibration).
        cachec_version: version of cachec that made the plan.
        created: creation time of the calibration (ISO 8601 string), or None.
    """

    calibration_sha256: str | None
    conditions: int
    samples: int
    cachec_version: str
    created: str | None


@dataclass
class Plan:
    """A cache plan (schema version 1); see ``docs/plan-format.md``.

    Attributes:
        model, sampler, budget, provenance: see the classes of the same names.
        predicted_error: planner-predicted sensitivity-weighted squared error, or None (manual plans).
        history: ``"computed"`` or ``"used"``.
        units: the unit schedules, in model order.
        sidecar: the EOC sidecar, or None.
        version: schema version (always 1).
        source: the YAML file this plan was loaded from, if any (not serialised); the sidecar is read relative
            to it.
    """

    model: ModelInfo
    sampler: Sampler
    budget: Budget
    predicted_error: float | None
    history: str
    units: list[UnitPlan]
    sidecar: Sidecar | None
    provenance: Provenance
    version: int = SCHEMA_VERSION
    source: Path | None = field(default=None, compare=False, repr=False)

    @property
    def steps(self) -> int:
        """Number of denoising steps S."""
        return self.sampler.steps

    def unit(self, name: str) -> UnitPlan:
        """The schedule of unit ``name``.

        Raises:
            KeyError: no such unit in the plan.
        """
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"unit {name!r} is not in the plan (units: {', '.join(u.name for u in self.units)})")

    def eoc_keys(self) -> list[tuple[str, int]]:
        """(unit, step) pairs with a non-zero ``eoc_alpha``."""
        return [(u.name, s) for u in self.units for s, c in sorted(u.compensation.items()) if c.eoc_alpha != 0.0]

    def sidecar_path(self) -> Path | None:
        """Absolute path of the sidecar file (None without a sidecar or for a plan not loaded from a file)."""
        if self.sidecar is None or self.source is None:
            return None
        return self.source.parent / self.sidecar.file

    def load_sidecar(self) -> dict[str, Any]:
        """The sidecar tensors as numpy arrays (``{}`` without a sidecar).

        Raises:
            PlanError: the plan has a sidecar but was not loaded from a file, or the file is missing.
        """
        if self.sidecar is None:
            return {}
        path = self.sidecar_path()
        if path is None:
            raise PlanError(
                "sidecar: this plan was not loaded from a file, so its sidecar cannot be found; "
                "use load_plan(path) or pass the tensors explicitly"
            )
        if not path.is_file():
            raise PlanError(f"sidecar.file: {path} does not exist (it must lie beside the plan YAML)")
        from safetensors.numpy import load_file

        return load_file(str(path))


# --------------------------------------------------------------------------------------------- helpers


def realised_fraction(units: list[UnitPlan], steps: int, full_step_flops: float, fixed_step_flops: float) -> float:
    """FLOPs fraction of a schedule relative to ``steps`` uncached forwards.

    ``Σ_s (fixed + Σ_u [actions_u[s] == 'C']·flops_u) / (S · full)``, as in the plan format.

    Raises:
        PlanError: ``full_step_flops <= 0`` or ``steps <= 0``.
    """
    if full_step_flops <= 0 or steps <= 0:
        raise PlanError("budget.full_step_flops and sampler.steps must be positive to compute a FLOPs fraction")
    spent = steps * fixed_step_flops + sum(u.flops * u.actions.count(COMPUTE) for u in units)
    return spent / (steps * full_step_flops)
