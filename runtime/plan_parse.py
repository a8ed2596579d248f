"""Strict plan parsing: raw YAML mapping → :class:`~cachec.runtime.plan_schema.Plan`, and plan files.

Every validation failure raises :class:`PlanError` whose message starts with the key path of the offending
value (``units[3].actions: ...``); unknown keys are named, with the known key they are close to.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .io import file_sha256
from .units import parent_units
from .plan_schema import (
    _HEX64,
    BUDGET_METHODS,
    COMPUTE,
    GUIDANCE_MODES,
    HISTORY_MODES,
    REALISED_RTOL,
    SCHEMA_VERSION,
    SKIP,
    Budget,
    Compensation,
    Guidance,
    ModelInfo,
    Plan,
    PlanError,
    Provenance,
    Sampler,
    Sidecar,
    UnitPlan,
    realised_fraction,
)


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
    _check_skips(units)
    if history == "used" and any(p is not None for p in parent_units([u.name for u in units])):
        raise PlanError("history: 'used' pushes every step's value, but a nested unit (attention map) does not run "
                        "where its parent is skipped; plans with nested units need history 'computed'")

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
    return UnitPlan(name, flops, actions, dict(sorted(compensation.items())))


def _check_skips(units: list[UnitPlan]) -> None:
    """Every skipped step of a unit has a compensation entry, except where the unit is nested (an
    attention-map unit, :func:`~cachec.runtime.units.parent_units`) and its parent is skipped: the nested unit
    does not run there at all, so it must be skipped and have no entry (docs/plan-format.md, "Nested units")."""
    parents = parent_units([u.name for u in units])
    for i, (u, p) in enumerate(zip(units, parents)):
        idle = set() if p is None else {s for s, a in enumerate(units[p].actions) if a == SKIP}
        running = [s for s in sorted(idle) if u.actions[s] == COMPUTE]
        if running:
            raise PlanError(f"units[{i}].actions: step(s) {running} are 'C' but the unit is nested in {units[p].name}, "
                            "which skips them; a nested unit runs only where its parent computes")
        stray = sorted(idle & set(u.compensation))
        if stray:
            raise PlanError(f"units[{i}].compensation: step(s) {stray} have an entry but the unit's parent "
                            f"{units[p].name} skips them, so it never runs there; remove the entries")
        missing = [s for s, a in enumerate(u.actions) if a == SKIP and s not in u.compensation and s not in idle]
        if missing:
            raise PlanError(f"units[{i}].compensation: skipped step(s) {missing} have no compensation entry")


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
    raw = path.read_bytes()
    if raw.startswith(b"\x89PNG") or (b"\x00" in raw[:8] and raw[8:9] == b"{"):  # PNG, or safetensors' header
        raise PlanError(f"{path}: is a binary (safetensors or PNG) file, not a plan YAML; a calibration becomes a "
                        "plan with `cachec plan CALIB --budget 40%`")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: not a plan YAML (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
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
        digest = file_sha256(sc)
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
