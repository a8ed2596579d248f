"""The plan schema (version 1): strict parsing, deterministic writing, sidecar hashing.

This module is the executable form of ``docs/plan-format.md``. It imports no torch (the planner imports it
to build and write plans on machines without torch) and no scipy; it needs ``pyyaml``, ``numpy`` and, for
plans with an EOC sidecar, ``safetensors``.

Entry points:

- :func:`parse_plan` (dict → :class:`Plan`), :func:`load_plan` (YAML file → :class:`Plan`, sidecar checked);
- :func:`dump_plan` (:class:`Plan` → YAML text, deterministic), :func:`write_plan` (atomic file write with
  the optional safetensors sidecar);
- :func:`realised_fraction` (the FLOPs fraction a schedule spends, the formula of the format).

Every validation failure raises :class:`PlanError` whose message starts with the key path of the offending
value (``units[3].actions: ...``).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

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
        compensation: ``{step: Compensation}`` for exactly the skipped steps.
    """

    name: str
    flops: float
    actions: str
    compensation: dict[int, Compensation] = field(default_factory=dict)

    def computed_steps(self) -> list[int]:
        """Indices of the steps at which the unit is computed."""
        return [s for s, a in enumerate(self.actions) if a == COMPUTE]


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


class _Reader:
    """Typed access to one mapping of the raw YAML, with the key path for messages.

    The mapping's keys are declared once, at construction: ``required`` and ``optional``. Construction
    checks them all, so a misspelt key is reported as what it is (an unknown key, with the known key it is
    close to) rather than as the required key it leaves missing.

    Raises:
        PlanError: ``data`` is not a mapping, has a key that is not a str, an unknown key or a missing
            required key.
    """

    def __init__(self, data: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()):
        where = path or "<root>"
        if not isinstance(data, dict):
            raise PlanError(f"{where}: expected a mapping, got {_tname(data)}")
        self.data = data
        self.path = path
        self.known = required + optional
        for k in data:
            if not isinstance(k, str):
                raise PlanError(
                    f"{where}: keys must be strings, got {'null' if k is None else f'{_tname(k)} {k!r}'} (YAML reads "
                    "unquoted true/false/yes/no/on/off, null/~ and numbers as such: quote the key)"
                )
        missing = [k for k in required if k not in data]
        unknown = sorted(k for k in data if k not in self.known)
        if unknown:
            absent = [k for k in self.known if k not in data]
            names, suggested = [], set()
            for k in unknown:
                close = difflib.get_close_matches(k, absent, n=1)
                suggested.update(close)
                names.append(f"{_keyname(k)} (did you mean {close[0]!r}?)" if close else _keyname(k))
            rest = [k for k in missing if k not in suggested]
            also = f"; missing required key(s) {', '.join(rest)}" if rest else ""
            raise PlanError(f"{where}: unknown key(s) {', '.join(names)}{also}")
        if missing:
            raise PlanError(f"{self.key(missing[0])}: missing required key")

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def get(self, k: str, default: Any = None) -> Any:
        """The value of declared key ``k`` (``default`` when an optional key is absent)."""
        assert k in self.known, f"{self.key(k)} is not declared"
        return self.data.get(k, default)


def _keyname(k: str) -> str:
    """``k`` as written in messages: bare when it is a plain name, quoted otherwise (spaces, empty, ...)."""
    return k if re.fullmatch(r"[A-Za-z0-9_.-]+", k) else repr(k)


def _tname(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _str(v: Any, path: str, nullable: bool = False) -> str | None:
    if v is None and nullable:
        return None
    if not isinstance(v, str):
        raise PlanError(f"{path}: expected str, got {_tname(v)}")
    return v


def _int(v: Any, path: str, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{path}: expected int, got {_tname(v)}")
    if minimum is not None and v < minimum:
        raise PlanError(f"{path}: must be >= {minimum}, got {v}")
    return v


def _float(v: Any, path: str, nullable: bool = False) -> float | None:
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        hint = ""
        if isinstance(v, str):
            try:
                float(v)
                hint = " (YAML 1.1 reads an exponent without a sign or dot as text: write 1.0e+6, not 1e6)"
            except ValueError:
                pass
        raise PlanError(f"{path}: expected a number, got {_tname(v)} {v!r}{hint}")
    try:
        v = float(v)
    except OverflowError:  # YAML ints have no bound
        raise PlanError(f"{path}: must be finite, got an int too large for a float") from None
    if not math.isfinite(v):
        raise PlanError(f"{path}: must be finite, got {v}")
    return v


def _float_list(v: Any, path: str, length: int | None = None) -> list[float]:
    if not isinstance(v, list):
        raise PlanError(f"{path}: expected a list of numbers, got {_tname(v)}")
    if length is not None and len(v) != length:
        raise PlanError(f"{path}: expected {length} values (sampler.steps), got {len(v)}")
    return [_float(x, f"{path}[{i}]") for i, x in enumerate(v)]


def _plain(v: Any, path: str, _within: frozenset[int] = frozenset()) -> Any:
    """Validate a free-form YAML value (options): str-keyed dicts, lists, str/int/float/bool/null.

    Raises:
        PlanError: another type, a key that is not a str, a non-finite float, or a value that contains
            itself (a YAML alias cycle such as ``&a [*a]``).
    """
    if isinstance(v, (dict, list)):
        if id(v) in _within:
            raise PlanError(f"{path}: the value contains itself (a YAML alias cycle)")
        _within = _within | {id(v)}
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise PlanError(f"{path}: option keys must be str, got {_tname(k)} {k!r}")
            out[k] = _plain(x, f"{path}.{_keyname(k)}", _within)
        return out
    if isinstance(v, list):
        return [_plain(x, f"{path}[{i}]", _within) for i, x in enumerate(v)]
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise PlanError(f"{path}: must be finite, got {v}")
        return v
    raise PlanError(f"{path}: unsupported value type {_tname(v)}")


def _sha(v: Any, path: str, nullable: bool = False) -> str | None:
    v = _str(v, path, nullable)
    if v is not None and not _HEX64.match(v):
        raise PlanError(f"{path}: expected 64 lowercase hex digits (a sha256), got {v!r}")
    return v


# --------------------------------------------------------------------------------------------- parsing


def parse_plan(data: Any) -> Plan:
    """Validate a raw plan mapping (as read by ``yaml.safe_load``) and build a :class:`Plan`.

    Args:
        data: the mapping.

    Returns:
        The plan (``source`` is None).

    Raises:
        PlanError: the first violation found, in one line prefixed by the key path (``<root>`` for the top
            level). An unknown key is named with the known key of its mapping it is close to (``model: unknown
            key(s) fingerprnt (did you mean 'fingerprint'?)``); a key that is not a str, an int too large for
            a float and a ``budget.options`` value that contains itself are PlanErrors too.
    """
    root = _Reader(
        data,
        "",
        ("cachec_plan", "model", "sampler", "budget", "predicted_error", "history", "units", "sidecar", "provenance"),
    )
    version = root.get("cachec_plan")
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise PlanError(
            f"cachec_plan: unsupported plan schema version {version!r}; this cachec reads version {SCHEMA_VERSION}"
        )

    m = _Reader(root.get("model"), "model", ("class", "fingerprint", "adapters"), ("source",))
    adapters_raw = m.get("adapters")
    if not isinstance(adapters_raw, list):
        raise PlanError(f"model.adapters: expected a list of str, got {_tname(adapters_raw)}")
    model = ModelInfo(
        cls=_str(m.get("class"), "model.class"),
        fingerprint=_str(m.get("fingerprint"), "model.fingerprint"),
        adapters=[_str(a, f"model.adapters[{i}]") for i, a in enumerate(adapters_raw)],
        source=_str(m.get("source"), "model.source", nullable=True),
    )
    if not model.cls:
        raise PlanError("model.class: must not be empty")
    fp = model.fingerprint
    if not (fp.startswith("sha256:") and _HEX64.match(fp[7:])):
        raise PlanError(f"model.fingerprint: expected 'sha256:' + 64 hex digits, got {fp!r}")

    s = _Reader(
        root.get("sampler"), "sampler", ("scheduler", "steps", "timesteps", "sigmas", "guidance", "resolution")
    )
    steps = _int(s.get("steps"), "sampler.steps", minimum=1)
    g = _Reader(s.get("guidance"), "sampler.guidance", ("mode", "scale", "branches"))
    guidance = Guidance(
        mode=_str(g.get("mode"), "sampler.guidance.mode"),
        scale=_float(g.get("scale"), "sampler.guidance.scale"),
        branches=_int(g.get("branches"), "sampler.guidance.branches", minimum=1),
    )
    if guidance.mode not in GUIDANCE_MODES:
        raise PlanError(f"sampler.guidance.mode: expected one of {', '.join(GUIDANCE_MODES)}, got {guidance.mode!r}")
    if (guidance.mode == "none") != (guidance.branches == 1):
        raise PlanError(
            f"sampler.guidance.branches: mode {guidance.mode!r} needs "
            f"{'1 branch' if guidance.mode == 'none' else '>= 2 branches'}, got {guidance.branches}"
        )
    sigmas_raw = s.get("sigmas")
    res_raw = s.get("resolution")
    if not isinstance(res_raw, list) or len(res_raw) != 2:
        raise PlanError(f"sampler.resolution: expected [H, W], got {res_raw!r}")
    sampler = Sampler(
        scheduler=_str(s.get("scheduler"), "sampler.scheduler"),
        steps=steps,
        timesteps=_float_list(s.get("timesteps"), "sampler.timesteps", steps),
        sigmas=None if sigmas_raw is None else _float_list(sigmas_raw, "sampler.sigmas", steps),
        guidance=guidance,
        resolution=[_int(r, f"sampler.resolution[{i}]", minimum=1) for i, r in enumerate(res_raw)],
    )

    b = _Reader(
        root.get("budget"),
        "budget",
        ("method", "target", "realised", "full_step_flops", "fixed_step_flops", "options"),
    )
    options = b.get("options")
    if not isinstance(options, dict):
        raise PlanError(f"budget.options: expected a mapping, got {_tname(options)}")
    budget = Budget(
        method=_str(b.get("method"), "budget.method"),
        target=_float(b.get("target"), "budget.target"),
        realised=_float(b.get("realised"), "budget.realised"),
        full_step_flops=_float(b.get("full_step_flops"), "budget.full_step_flops"),
        fixed_step_flops=_float(b.get("fixed_step_flops"), "budget.fixed_step_flops"),
        options=_plain(options, "budget.options"),
    )
    if budget.method not in BUDGET_METHODS:
        raise PlanError(f"budget.method: expected one of {', '.join(BUDGET_METHODS)}, got {budget.method!r}")
    for key in ("target", "realised"):
        v = getattr(budget, key)
        if not 0.0 < v <= 1.0:
            raise PlanError(f"budget.{key}: must be a fraction in (0, 1] of a full run's FLOPs, got {v}")
    if budget.full_step_flops <= 0:
        raise PlanError(f"budget.full_step_flops: must be > 0, got {budget.full_step_flops}")
    if budget.fixed_step_flops < 0:
        raise PlanError(f"budget.fixed_step_flops: must be >= 0, got {budget.fixed_step_flops}")

    history = _str(root.get("history"), "history")
    if history not in HISTORY_MODES:
        raise PlanError(f"history: expected one of {', '.join(HISTORY_MODES)}, got {history!r}")
    predicted_error = _float(root.get("predicted_error"), "predicted_error", nullable=True)

    units_raw = root.get("units")
    if not isinstance(units_raw, list) or not units_raw:
        raise PlanError(f"units: expected a non-empty list, got {_tname(units_raw)}")
    units = [_parse_unit(u, f"units[{i}]", steps, history) for i, u in enumerate(units_raw)]
    seen: set[str] = set()
    for i, u in enumerate(units):
        if u.name in seen:
            raise PlanError(f"units[{i}].name: unit {u.name!r} appears twice")
        seen.add(u.name)

    sc_raw = root.get("sidecar")
    sidecar = None
    if sc_raw is not None:
        sc = _Reader(sc_raw, "sidecar", ("file", "sha256"))
        sidecar = Sidecar(file=_str(sc.get("file"), "sidecar.file"), sha256=_sha(sc.get("sha256"), "sidecar.sha256"))
        _check_relative(sidecar.file, "sidecar.file")

    p = _Reader(
        root.get("provenance"),
        "provenance",
        ("calibration_sha256", "conditions", "samples", "cachec_version", "created"),
    )
    provenance = Provenance(
        calibration_sha256=_sha(p.get("calibration_sha256"), "provenance.calibration_sha256", nullable=True),
        conditions=_int(p.get("conditions"), "provenance.conditions", minimum=0),
        samples=_int(p.get("samples"), "provenance.samples", minimum=0),
        cachec_version=_str(p.get("cachec_version"), "provenance.cachec_version"),
        created=_str(p.get("created"), "provenance.created", nullable=True),
    )

    plan = Plan(model, sampler, budget, predicted_error, history, units, sidecar, provenance)
    _check_consistency(plan)
    return plan


def _check_relative(file: str, path: str) -> None:
    pure = Path(file)
    if not file or pure.is_absolute() or ".." in pure.parts or "\\" in file:
        raise PlanError(f"{path}: must be a relative path beside the plan without '..', got {file!r}")


def _parse_unit(raw: Any, path: str, steps: int, history: str) -> UnitPlan:
    r = _Reader(raw, path, ("name", "flops", "actions", "compensation"))
    name = _str(r.get("name"), f"{path}.name")
    if not name:
        raise PlanError(f"{path}.name: must not be empty")
    flops = _float(r.get("flops"), f"{path}.flops")
    if flops < 0:
        raise PlanError(f"{path}.flops: must be >= 0, got {flops}")
    actions = _str(r.get("actions"), f"{path}.actions")
    if len(actions) != steps:
        raise PlanError(f"{path}.actions: expected {steps} characters (sampler.steps), got {len(actions)}")
    bad = sorted(set(actions) - {COMPUTE, SKIP})
    if bad:
        raise PlanError(f"{path}.actions: only 'C' (compute) and '.' (skip) are allowed, found {''.join(bad)!r}")
    if actions[0] != COMPUTE:
        raise PlanError(f"{path}.actions: step 0 must be 'C' (there is nothing to reuse before the first step)")
    comp_raw = r.get("compensation")
    if not isinstance(comp_raw, dict):
        raise PlanError(f"{path}.compensation: expected a mapping step -> {{coeffs: [...]}}, got {_tname(comp_raw)}")
    compensation: dict[int, Compensation] = {}
    for step, c_raw in comp_raw.items():
        cpath = f"{path}.compensation[{step!r}]"
        if isinstance(step, bool) or not isinstance(step, int):
            raise PlanError(f"{cpath}: step keys must be int, got {_tname(step)}")
        if not 0 <= step < steps:
            raise PlanError(f"{cpath}: step {step} is out of range 0..{steps - 1}")
        if actions[step] == COMPUTE:
            raise PlanError(f"{cpath}: step {step} is computed ('C'), so it must have no compensation")
        c = _Reader(c_raw, cpath, ("coeffs",), ("eoc_alpha",))
        coeffs_raw = c.get("coeffs")
        if not isinstance(coeffs_raw, list) or not coeffs_raw:
            raise PlanError(f"{cpath}.coeffs: expected a non-empty list of numbers, got {coeffs_raw!r}")
        comp = Compensation(
            coeffs=[_float(x, f"{cpath}.coeffs[{i}]") for i, x in enumerate(coeffs_raw)],
            eoc_alpha=_float(c.get("eoc_alpha", 0.0), f"{cpath}.eoc_alpha"),
        )
        available = actions[:step].count(COMPUTE) if history == "computed" else step
        if len(comp.coeffs) > available:
            raise PlanError(
                f"{cpath}.coeffs: {len(comp.coeffs)} coefficients but only {available} "
                f"{'computed ' if history == 'computed' else ''}outputs precede step {step}"
            )
        compensation[step] = comp
    missing = [s for s, a in enumerate(actions) if a == SKIP and s not in compensation]
    if missing:
        raise PlanError(f"{path}.compensation: skipped step(s) {missing} have no compensation entry")
    return UnitPlan(name, flops, actions, dict(sorted(compensation.items())))


def _check_consistency(plan: Plan) -> None:
    b = plan.budget
    total = b.fixed_step_flops + sum(u.flops for u in plan.units)
    if total > b.full_step_flops * (1 + REALISED_RTOL):
        raise PlanError(
            f"budget.full_step_flops: fixed_step_flops + the units' flops ({total:.6g}) exceed "
            f"full_step_flops ({b.full_step_flops:.6g})"
        )
    expected = realised_fraction(plan.units, plan.steps, b.full_step_flops, b.fixed_step_flops)
    if not math.isfinite(expected):  # inf/inf: the FLOPs overflow a float, and no realised value matches
        raise PlanError(
            f"budget.full_step_flops: {b.full_step_flops!r} × {plan.steps} steps overflows a float; "
            "the realised fraction cannot be checked"
        )
    if abs(expected - b.realised) > REALISED_RTOL * max(expected, 1e-12):
        raise PlanError(
            f"budget.realised: {b.realised!r} does not match the schedule, which spends {expected!r} "
            "(Σ_s (fixed_step_flops + Σ_u [C]·flops_u) / (S·full_step_flops))"
        )
    if plan.eoc_keys() and plan.sidecar is None:
        unit, step = plan.eoc_keys()[0]
        raise PlanError(
            f"units[{[u.name for u in plan.units].index(unit)}].compensation[{step}].eoc_alpha: non-zero but the "
            "plan has no sidecar with the EOC prior tensors"
        )


def _check_sidecar_tensors(plan: Plan, names: set[str], where: str) -> None:
    index = {u.name: i for i, u in enumerate(plan.units)}
    for unit, step in plan.eoc_keys():
        key = f"eoc/{unit}/{step}"
        if key not in names and not any(n.startswith(key + "/") for n in names):
            raise PlanError(
                f"units[{index[unit]}].compensation[{step}].eoc_alpha: non-zero but {where} has no tensor {key!r}"
            )


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan YAML file (``yaml.safe_load`` only) and its sidecar.

    Args:
        path: the plan file.

    Returns:
        The :class:`Plan`, with ``source`` set to the absolute path.

    Raises:
        PlanError: not valid YAML, schema violations, a missing sidecar file, a sidecar whose sha256 differs
            from the one recorded in the plan, or an EOC tensor missing from the sidecar.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path).absolute()
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from exc
    try:
        plan = parse_plan(data)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None
    plan.source = path
    if plan.sidecar is not None:
        sc = plan.sidecar_path()
        if not sc.is_file():
            raise PlanError(f"{path}: sidecar.file: {sc} does not exist (it must lie beside the plan YAML)")
        digest = hashlib.sha256(sc.read_bytes()).hexdigest()
        if digest != plan.sidecar.sha256:
            raise PlanError(
                f"{path}: sidecar.sha256: {sc.name} has sha256 {digest}, the plan records {plan.sidecar.sha256}; "
                "the sidecar does not belong to this plan (re-run `cachec plan` or copy the matching file)"
            )
        from safetensors import safe_open

        with safe_open(str(sc), framework="numpy") as f:
            names = set(f.keys())
        try:
            _check_sidecar_tensors(plan, names, f"the sidecar {sc.name}")
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
    return plan


# --------------------------------------------------------------------------------------------- writing


def to_dict(plan: Plan) -> dict:
    """The plan as a plain mapping in the canonical key order of the format (floats as Python floats)."""
    s, b, p = plan.sampler, plan.budget, plan.provenance
    units = []
    for u in plan.units:
        comp = {}
        for step in sorted(u.compensation):
            c = u.compensation[step]
            entry: dict[str, Any] = {"coeffs": [float(x) for x in c.coeffs]}
            if c.eoc_alpha != 0.0:
                entry["eoc_alpha"] = float(c.eoc_alpha)
            comp[int(step)] = entry
        units.append({"name": u.name, "flops": float(u.flops), "actions": u.actions, "compensation": comp})
    return {
        "cachec_plan": int(plan.version),
        "model": {
            "class": plan.model.cls,
            "fingerprint": plan.model.fingerprint,
            "adapters": list(plan.model.adapters),
            "source": plan.model.source,
        },
        "sampler": {
            "scheduler": s.scheduler,
            "steps": int(s.steps),
            "timesteps": [float(t) for t in s.timesteps],
            "sigmas": None if s.sigmas is None else [float(x) for x in s.sigmas],
            "guidance": {
                "mode": s.guidance.mode,
                "scale": float(s.guidance.scale),
                "branches": int(s.guidance.branches),
            },
            "resolution": [int(r) for r in s.resolution],
        },
        "budget": {
            "method": b.method,
            "target": float(b.target),
            "realised": float(b.realised),
            "full_step_flops": float(b.full_step_flops),
            "fixed_step_flops": float(b.fixed_step_flops),
            "options": _sorted_plain(b.options),
        },
        "predicted_error": None if plan.predicted_error is None else float(plan.predicted_error),
        "history": plan.history,
        "units": units,
        "sidecar": None if plan.sidecar is None else {"file": plan.sidecar.file, "sha256": plan.sidecar.sha256},
        "provenance": {
            "calibration_sha256": p.calibration_sha256,
            "conditions": int(p.conditions),
            "samples": int(p.samples),
            "cachec_version": p.cachec_version,
            "created": p.created,
        },
    }


def _sorted_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _sorted_plain(v[k]) for k in sorted(v)}
    if isinstance(v, (list, tuple)):
        return [_sorted_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars from the planner
        return v.item()
    return v


class _Dumper(yaml.SafeDumper):
    """SafeDumper that never emits aliases (shared lists would otherwise become &id001 anchors) and writes
    text with U+0085 double-quoted (PyYAML writes it raw in single quotes, where YAML reads it as a line
    break folded to a space: the text would not load back)."""

    def ignore_aliases(self, data):
        return True

    def choose_scalar_style(self):
        if "\x85" in self.event.value:
            return '"'
        return super().choose_scalar_style()


def dump_plan(plan: Plan) -> str:
    """Serialise a plan to YAML text, deterministically.

    The plan is validated first (the text always loads back). Keys follow the order of the format, floats
    are written at ``repr`` precision, leaf lists in flow style; nothing depends on the time of writing.

    Raises:
        PlanError: the plan object violates the schema.
    """
    data = to_dict(plan)
    parse_plan(data)  # never write what cannot be read back
    header = f"# cachec plan (schema {SCHEMA_VERSION}); format: docs/plan-format.md\n"
    body = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100, allow_unicode=True
    )
    return header + body


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_plan(plan: Plan, path: str | os.PathLike, sidecar_tensors: dict[str, Any] | None = None) -> Plan:
    """Write a plan YAML (and its sidecar) atomically (temporary file + ``os.replace``).

    Args:
        plan: the plan. Its ``sidecar`` entry is (re)computed here: the file name is kept if set, else
            ``<plan stem>.eoc.safetensors``; the sha256 is that of the bytes written.
        path: destination YAML path.
        sidecar_tensors: ``{"eoc/{unit}/{step}[/{part}]": numpy array}`` (per-sample shape of the unit
            output, float32). None: the plan must need no sidecar, or it was loaded from a file whose sidecar
            is copied.

    Returns:
        The plan as written (a copy with ``sidecar`` and ``source`` updated).

    Raises:
        PlanError: the plan violates the schema, a non-zero ``eoc_alpha`` has no tensor, or tensors are given
            for a plan that needs none.
    """
    path = Path(path).absolute()
    if sidecar_tensors is None and plan.sidecar is not None:
        sidecar_tensors = plan.load_sidecar()
    needed = plan.eoc_keys()
    sidecar = None
    if sidecar_tensors:
        if not needed:
            raise PlanError("sidecar: tensors were given but no compensation has a non-zero eoc_alpha")
        import numpy as np
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v) for k, v in sorted(sidecar_tensors.items())}
        _check_sidecar_tensors(plan, set(tensors), "sidecar_tensors")
        blob = save(tensors)
        name = plan.sidecar.file if plan.sidecar is not None else f"{path.stem}.eoc.safetensors"
        _check_relative(name, "sidecar.file")
        sidecar = Sidecar(file=name, sha256=hashlib.sha256(blob).hexdigest())
    elif needed:
        unit, step = needed[0]
        raise PlanError(f"sidecar: eoc_alpha of {unit} at step {step} is non-zero: pass sidecar_tensors")
    out = replace(plan, sidecar=sidecar)
    text = dump_plan(out)
    if sidecar is not None:
        _atomic_write(path.parent / sidecar.file, blob)
    _atomic_write(path, text.encode("utf-8"))
    out.source = path
    return out
