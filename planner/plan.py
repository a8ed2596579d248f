"""Build plans (docs/plan-format.md) from a calibration: cachec's solved schedule or a baseline.

The planner returns the runtime's typed :class:`cachec.runtime.plan.Plan` (torch-free) plus the EOC
sidecar tensors (a dict of float32 numpy arrays). The returned plan has no ``sidecar`` entry yet:
:func:`cachec.runtime.plan.write_plan` names the sidecar file (after the plan file) and records its sha256
when it writes both, so the plan format is written and hashed in one place.
"""

from __future__ import annotations

import numpy as np

from cachec.runtime.units import parent_units
from cachec.runtime.plan import (
    Budget, Compensation, Guidance, ModelInfo, Plan, Provenance, Sampler, UnitPlan,
)

from .baselines import eoc_paper, fora, goc_paper, uniform
from .calibration import Calibration
from .error_model import PREDICTORS, ErrorModel, SegmentTable, resolve_predictors, schedule_error, segment_table
from .nesting import folded_flops
from .predictor_pass import PASSES, choose_predictors
from .schedule import Schedule, follow_parents, realised_fraction, round_sig
from .blocks import block_groups, edge_blocks
from .solver import DEFAULT_GROUPS, FAMILIES, Frontier, frontier, group_costs, solve

#: families whose computed steps follow a peer's schedule shape instead of the DP: ``warmup`` = TaylorSeer's
#: and SeaCache's realised shape (the first W steps computed, then every ``interval``-th; W as large as the
#: budget allows; by default the smallest interval that fits), run step-synchronously with cachec's
#: predictors and the budget fill
SHAPED_FAMILIES = ("warmup",)


def _warmup_fit(cal: Calibration, budget: float, interval: int, keep_last: int) -> tuple[list[int], int] | None:
    """``(computed steps, W)`` of the longest warm-up W whose warm-up + ``interval`` mask fits ``budget``
    (step-synchronous FLOPs, :func:`realised_fraction`'s accounting), or None when not even W = 1 fits."""
    S, total = cal.steps, float(np.sum(cal.unit_flops))
    best = None
    for W in range(1, S + 1):
        c = sorted(set(range(W)) | set(range(W - 1 + interval, S, interval)) | set(range(S - keep_last, S)))
        if (S * cal.fixed_step_flops + len(c) * total) / (S * cal.full_step_flops) <= budget * (1 + 1e-12):
            best = (c, W)
    return best


def warmup_mask(cal: Calibration, budget: float, interval: int | None, max_staleness: int, keep_last: int = 0
                ) -> tuple[list[int], dict]:
    """Computed steps of the ``warmup`` family: steps 0..W-1, then every ``interval``-th step after W-1, and
    the last ``keep_last`` steps, with the largest warm-up W whose step-synchronous FLOPs fit ``budget``.

    Args:
        interval: N in 1..max_staleness+1, or None: the smallest N (2, 3, ...) at which W = 1 fits the budget
            (the densest sampling after the warm-up, then as long a warm-up as the budget allows).
    Returns:
        ``(steps, {"interval": N, "warmup": W})``.
    Raises:
        ValueError: interval outside 1..max_staleness+1, or not even W = 1 fits the budget.
    """
    if interval is not None and not 1 <= interval <= max_staleness + 1:
        raise ValueError(f"interval must be in 1..max_staleness+1 = {max_staleness + 1}, got {interval}")
    for n in ([interval] if interval is not None else range(2, max_staleness + 2)):
        fit = _warmup_fit(cal, budget, n, keep_last)
        if fit is not None:
            return fit[0], {"interval": int(n), "warmup": int(fit[1])}
    n = interval if interval is not None else max_staleness + 1
    S = cal.steps
    least = (S * cal.fixed_step_flops + len(set(range(0, S, n)) | set(range(S - keep_last, S)))
             * float(np.sum(cal.unit_flops))) / (S * cal.full_step_flops)
    raise ValueError(f"budget {budget:.6g} is below the warmup family's minimum {least:.6g} at interval {n}; "
                     "raise the budget or the interval")


METHODS = ("cachec", "fora", "eoc-paper", "goc-paper", "uniform")
DEFAULT_MAX_STALENESS = 8

_METHOD_OPTIONS = {
    "cachec": {"family", "groups", "max_staleness", "keep_last", "ridge", "predictors", "fill", "mask", "interval",
               "fn_bn", "shrink", "predictor_pass"},
    "fora": {"interval"},
    "eoc-paper": {"interval", "alpha"},
    "goc-paper": {"interval", "lam"},
    "uniform": set(),
}


def _version() -> str:
    try:
        from cachec import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - the package always defines it
        return "unknown"


class Planner:
    """Plans for one calibration, caching error models, segment tables and frontiers across budgets.

    Args:
        cal: the calibration.
        ridge: default relative ridge of the fitted predictors (see :class:`ErrorModel`).
        predictors: default candidate predictors of the cachec solver (names from ``PREDICTORS``); a plan
            may ask for another set with the ``predictors`` option (e.g. :data:`PREDICTOR_SETS` ``taylor``).
            Without ``reuse`` among them plain reuse is only the fallback where none of them applies
            (:class:`ErrorModel`; the ``forecast`` set).
    """

    def __init__(self, cal: Calibration, ridge: float = 1e-3, predictors=PREDICTORS):
        self.cal = cal
        preds = resolve_predictors(predictors)
        self.model = ErrorModel(cal, ridge=ridge, predictors=preds)
        #: error models by request (ridge, predictor names as asked, shrink target)
        self._models: dict[tuple, ErrorModel] = {(self.model.ridge, tuple(preds), self.model.shrink): self.model}
        self._tables: dict[tuple, SegmentTable] = {}
        self._fronts: dict[tuple, Frontier] = {}
        #: per unit the index of the unit it is nested in (attention maps, docs/hgc.md), or None
        self.parents = parent_units(cal.unit_names)
        self.nested = any(p is not None for p in self.parents)
        #: map reuse is only priced with a measured sensitivity: without one a map's ‖ΔP‖² would be weighed
        #: 1:1 against activation errors (a map's measured sensitivity is an order of magnitude above its parent's)
        self.map_reuse = cal.header.get("sensitivity", {}).get("method", "none") != "none"
        self._primary = [u for u, p in enumerate(self.parents) if p is None]

    def error_model(self, predictors=None, ridge: float | None = None, shrink: str | None = None) -> ErrorModel:
        """The error model with these predictors, ridge and ridge target (the defaults when None; built once).

        Raises:
            ValueError: an unknown predictor name or ``shrink``, a negative ridge.
        """
        if predictors is None and ridge is None and shrink is None:
            return self.model
        preds = tuple(self.model.predictors) if predictors is None else tuple(resolve_predictors(predictors))
        r = self.model.ridge if ridge is None else float(ridge)
        key = (r, preds, self.model.shrink if shrink is None else shrink)
        if key not in self._models:
            self._models[key] = ErrorModel(self.cal, ridge=key[0], predictors=key[1], shrink=key[2])
        return self._models[key]

    def table(self, max_staleness: int, model: ErrorModel | None = None) -> SegmentTable:
        """Segment costs for ``max_staleness`` under ``model`` (default :attr:`model`; computed once)."""
        model = model or self.model
        K = int(min(max_staleness, self.cal.steps - 1))
        key = (K,) + model.key
        if key not in self._tables:
            self._tables[key] = segment_table(model, K)
        return self._tables[key]

    def groups(self, n_groups: int):
        """Group ids of the ``group`` family with ``n_groups`` block groups (:func:`block_groups`), one per
        primary (not nested) unit."""
        return block_groups([self.cal.unit_names[u] for u in self._primary], n_groups)

    def primary_flops(self) -> np.ndarray:
        """FLOPs per call of each primary unit, its nested units' included (what the solver's first stage
        budgets, :func:`cachec.planner.nesting.folded_flops`)."""
        return folded_flops(self.cal.unit_flops, self.parents)[self._primary]

    def frontier(self, max_staleness: int, keep_last: int, family: str, n_groups: int = DEFAULT_GROUPS,
                 model: ErrorModel | None = None) -> Frontier:
        """Frontier of the DP for the table, ``keep_last`` and family (computed once)."""
        model = model or self.model
        tab = self.table(max_staleness, model)
        key = (tab.max_staleness, int(keep_last), family, int(n_groups) if family == "group" else 0) + model.key
        if key not in self._fronts:
            if self.nested:  # the solver's first stage: the primary units (cachec.planner.nesting)
                tab = tab.rows(self._primary)
            if family == "step":
                cost = tab.cost.sum(axis=0, keepdims=True)
            elif family == "group":
                cost = group_costs(tab.cost, self.primary_flops(), self.groups(n_groups))[0]
            else:
                cost = tab.cost
            self._fronts[key] = frontier(cost, int(keep_last))
        return self._fronts[key]

    def _model_for(self, method: str, options: dict) -> ErrorModel:
        if method != "cachec":
            return self.model
        return self.error_model(options.get("predictors"), options.get("ridge"), options.get("shrink"))

    def schedule(self, budget: float | None, method: str = "cachec", **options) -> Schedule:
        """The schedule of ``method`` at ``budget`` (see :func:`make_plan` for the options).

        Raises:
            ValueError: unknown method or option, invalid budget, budget below the method's minimum.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        unknown = set(options) - _METHOD_OPTIONS[method]
        if unknown:
            raise ValueError(f"unknown options for method {method!r}: {sorted(unknown)}")
        if budget is not None and not (0.0 < float(budget) <= 1.0):
            raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
        cal = self.cal
        if method == "cachec":
            if budget is None:
                raise ValueError("method 'cachec' needs a budget")
            family = options.get("family", "free")
            if family not in FAMILIES + SHAPED_FAMILIES:
                raise ValueError(f"family must be one of {FAMILIES + SHAPED_FAMILIES}, got {family!r}")
            K = int(options.get("max_staleness", DEFAULT_MAX_STALENESS))
            keep_last = int(options.get("keep_last", 0))
            if K < 0 or keep_last < 0:
                raise ValueError("max_staleness and keep_last must be >= 0")
            n_groups = options.get("groups", DEFAULT_GROUPS)
            if "groups" in options and family != "group":
                raise ValueError(f"option groups is only used by family 'group', not {family!r}")
            if isinstance(n_groups, bool) or not isinstance(n_groups, (int, np.integer)) or n_groups < 1:
                raise ValueError(f"groups must be an int >= 1, got {n_groups!r}")
            model = self._model_for(method, options)
            fill = bool(options.get("fill", True))
            ppass = options.get("predictor_pass", "none")
            if ppass not in PASSES:
                raise ValueError(f"predictor_pass must be one of {PASSES}, got {ppass!r}")
            if "interval" in options and family != "warmup":
                raise ValueError(f"option interval is only used by family 'warmup', not {family!r}")
            mask, extra = options.get("mask"), {}
            fn_bn = options.get("fn_bn")
            always = None
            if fn_bn is not None:
                if family != "step":
                    raise ValueError(f"option fn_bn is only used by family 'step', not {family!r}")
                if not isinstance(fn_bn, (list, tuple)) or len(fn_bn) != 2:
                    raise ValueError(f"fn_bn must be [first, last] block counts, got {fn_bn!r}")
                always = edge_blocks([cal.unit_names[u] for u in self._primary], fn_bn[0], fn_bn[1])
            if family == "warmup":
                if mask is not None:
                    raise ValueError("family 'warmup' makes its own mask; use family 'step' for a given mask")
                iv = options.get("interval")
                mask, extra = warmup_mask(cal, float(budget), None if iv is None else int(iv), K, keep_last)
            sched = solve(
                self.table(K, model), cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops, float(budget),
                family="step" if family == "warmup" else family, keep_last=keep_last,
                front=None if mask is not None or always is not None else self.frontier(K, keep_last, family, n_groups, model),
                groups=self.groups(n_groups) if family == "group" else None, fill=fill, mask=mask, always=always,
                parents=self.parents if self.nested else None, map_reuse=self.map_reuse and fill,
            )
            if fill:  # recorded for every family (the free family and trimmed masks too): replan passes it back
                sched.options.setdefault("fill", True)
            if ppass == "trajectory":
                sched = choose_predictors(model, sched)
                sched.options["predictor_pass"] = ppass
            if fn_bn is not None:
                sched.options["fn_bn"] = [int(fn_bn[0]), int(fn_bn[1])]
            if family == "warmup":
                sched.options.pop("mask")
                sched.options.update(family="warmup", **extra)
            sched.options.update(ridge=model.ridge, predictors=list(model.predictors))
            if model.shrink != "reuse":  # recorded only where it differs from the default (older plans lack it)
                sched.options["shrink"] = model.shrink
            return sched
        if method == "uniform":
            if budget is None:
                raise ValueError("method 'uniform' needs a budget")
            sched = uniform(cal, float(budget))
            return follow_parents(sched, self.parents) if self.nested else sched
        kw = {"interval": options.get("interval")}
        if method == "fora":
            sched = fora(cal, budget, **kw)
        elif method == "eoc-paper":
            sched = eoc_paper(cal, budget, alpha=float(options.get("alpha", 0.01)), **kw)
        else:
            sched = goc_paper(cal, budget, lam=float(options.get("lam", 1.2)), **kw)
        if self.nested:  # peers know no attention maps: a map runs with its block
            sched = follow_parents(sched, self.parents)
        if budget is not None:
            r = realised_fraction(sched.compute, cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops)
            if r > float(budget) * (1 + 1e-12):
                raise ValueError(f"interval {sched.options['interval']} spends {r:.6g} of a full run, over the budget {budget}")
        return sched

    def plan(self, budget: float | None, method: str = "cachec", **options) -> tuple[Plan, dict[str, np.ndarray]]:
        """``(plan, sidecar)`` of ``method`` at ``budget``; see :func:`make_plan`."""
        sched = self.schedule(budget, method, **options)
        return build_plan(self.cal, self._model_for(method, options), sched, method, budget)


def sidecar_arrays(cal: Calibration, schedule: Schedule) -> dict[str, np.ndarray]:
    """EOC tensors ``D = P_s - P_ref`` of every (unit, step) with a non-zero ``eoc_alpha``.

    Each part's tensor has the broadcast shape of the calibration's prior grouping
    (:meth:`Calibration.prior_layout`: ``(1, …, 1, C)`` per channel, ``(*tokens, 1)`` per token, the part's
    per-sample shape per element); the runtime broadcasts it over the part. float32 for the compact
    groupings, float16 for ``element`` (the opt-in full prior, stored only for the corrected pairs).
    Tuple outputs are split into ``eoc/{unit}/{s}/{part}`` (part = 0, 1, ...), single outputs are
    ``eoc/{unit}/{s}``.

    Returns:
        dict key -> float32 (or float16) array.
    Raises:
        CalibrationError: the calibration has no prior.
    """
    out = {}
    dtype = np.float16 if cal.header["eoc_prior"] == "element" else np.float32
    for u, name in enumerate(cal.unit_names):
        pairs = schedule.eoc_alpha[u]
        if not pairs:
            continue
        P = cal.prior(u)
        layout = cal.prior_layout(u)
        for s in sorted(pairs):
            D = P[s] - P[schedule.eoc_ref[u][s]]
            if len(layout) == 1:
                out[f"eoc/{name}/{s}"] = D.reshape(layout[0][0]).astype(dtype)
            else:
                off = 0
                for part, (bshape, groups, _) in enumerate(layout):
                    out[f"eoc/{name}/{s}/{part}"] = D[off:off + groups].reshape(bshape).astype(dtype)
                    off += groups
        del P
    return out


def build_plan(cal: Calibration, model: ErrorModel, schedule: Schedule, method: str,
               target: float | None) -> tuple[Plan, dict[str, np.ndarray]]:
    """Turn a schedule into a typed plan (docs/plan-format.md) and its EOC sidecar arrays.

    Args:
        cal: calibration (model, sampler and provenance sections come from its header).
        model: the error model pricing ``predicted_error``.
        schedule: the schedule.
        method: ``budget.method``.
        target: requested FLOPs fraction in (0, 1], or None (then the realised fraction is the target).
    Returns:
        ``(plan, sidecar)``: the :class:`cachec.runtime.plan.Plan` (floats of coefficients, EOC alphas,
        realised fraction and predicted error rounded to 8 significant digits; ``sidecar`` None, for
        :func:`cachec.runtime.plan.write_plan` to fill in) and ``{key: float32 array}`` (empty when no
        compensation has an EOC correction).
    Raises:
        CalibrationError: the schedule has EOC corrections but the calibration has no prior.
    """
    h = cal.header
    realised = round_sig(realised_fraction(schedule.compute, cal.unit_flops, cal.full_step_flops, cal.fixed_step_flops))
    units = []
    for u, name in enumerate(cal.unit_names):
        comp = {}
        for s in sorted(schedule.coeffs[u]):
            al = schedule.eoc_alpha[u].get(s, 0.0)
            comp[int(s)] = Compensation(coeffs=[round_sig(a) for a in schedule.coeffs[u][s]],
                                        eoc_alpha=round_sig(al) if al else 0.0)
        units.append(UnitPlan(name=name, flops=float(cal.unit_flops[u]),
                              actions="".join("C" if c else "." for c in schedule.compute[u]), compensation=comp))
    sig = h["sigmas"]
    g = h["guidance"]
    plan = Plan(
        model=ModelInfo(cls=str(h["model"]["class"]), fingerprint=str(h["model"]["fingerprint"]),
                        adapters=[str(a) for a in h["model"].get("adapters", [])], source=h["model"].get("source")),
        sampler=Sampler(
            scheduler=str(h["scheduler"]["class"]),
            steps=int(cal.steps),
            timesteps=[float(t) for t in h["timesteps"]],
            sigmas=None if sig is None else [float(x) for x in sig],
            guidance=Guidance(mode=str(g["mode"]), scale=float(g["scale"]), branches=int(g["branches"])),
            resolution=[int(x) for x in h["resolution"]],
        ),
        budget=Budget(
            method=method,
            target=realised if target is None else float(target),
            realised=realised,
            full_step_flops=float(cal.full_step_flops),
            fixed_step_flops=float(cal.fixed_step_flops),
            options={k: schedule.options[k] for k in sorted(schedule.options)},
        ),
        predicted_error=round_sig(schedule_error(model, schedule)),
        history=schedule.history,
        units=units,
        sidecar=None,
        provenance=Provenance(
            calibration_sha256=cal.sha256,
            conditions=len(h["conditions"]),
            samples=int(sum(cal.samples)),
            cachec_version=_version(),
            created=str(h["created"]),
        ),
    )
    return plan, sidecar_arrays(cal, schedule)


def make_plan(calibration: Calibration, budget: float | None, method: str = "cachec", *, ridge: float = 1e-3,
              predictors=PREDICTORS, **options) -> tuple[Plan, dict[str, np.ndarray]]:
    """Compile a plan for ``calibration`` at a FLOPs ``budget`` with ``method``.

    Args:
        calibration: loaded statistics (:func:`cachec.planner.load_calibration`).
        budget: fraction (0, 1] of a full run's FLOPs, fixed (never-cached) FLOPs included; may be None
            for FORA-based methods with an explicit ``interval``.
        method: ``cachec`` | ``fora`` | ``eoc-paper`` | ``goc-paper`` | ``uniform``.
        ridge, predictors: error-model options (cachec's candidate predictors: names of ``PREDICTORS`` or a
            set name of ``PREDICTOR_SETS``; also accepted per plan as options; without ``reuse`` among the
            names plain reuse is only the fallback where none of them applies).
        **options: cachec: ``family`` ("free" | "step" | "group" | "warmup"), ``groups`` (block groups of the
            ``group`` family, default 4), ``max_staleness`` (default 8), ``keep_last`` (default 0),
            ``fill`` (default True: the step/group families add single unit computes into the FLOPs their
            shared masks leave unspent; plans made before it record no ``fill`` and mean False),
            ``mask`` (step family: the computed step indices, e.g. a peer's pattern, instead of the DP's),
            ``interval`` (warmup family: N, default the smallest that fits; :func:`warmup_mask`),
            ``fn_bn`` (step family: ``[F, B]``, the first F and last B blocks computed at every step, the
            FBCache/DBCache shape, the shared mask solved for the other blocks; :func:`edge_blocks`),
            ``shrink`` (``reuse`` | ``taylor``: the target of the fitted coefficients' ridge, :class:`ErrorModel`),
            ``predictor_pass`` (``none``, the default: the solver's per-segment choice; ``trajectory``: each
            skipped step's predictor re-chosen under the trajectory-coherent price after the solve,
            :func:`~cachec.planner.predictor_pass.choose_predictors`, recorded as ``predictor_pass``);
            fora/eoc-paper/goc-paper: ``interval``; eoc-paper: ``alpha`` (0.01); goc-paper: ``lam`` (1.2).
    Returns:
        ``(plan, sidecar)``: the typed :class:`cachec.runtime.plan.Plan` (no ``sidecar`` entry until
        :func:`cachec.runtime.plan.write_plan` writes it) and ``{key: float32 array}`` (see :func:`build_plan`).
    Raises:
        ValueError: unknown method/option, budget outside (0, 1], budget below the method's minimum
            (the message names the minimum).
    """
    return Planner(calibration, ridge=ridge, predictors=predictors).plan(budget, method, **options)


def sweep(calibration: Calibration, budgets, method: str = "cachec", *, ridge: float = 1e-3, predictors=PREDICTORS,
          **options) -> list[tuple[Plan, dict[str, np.ndarray]]]:
    """Plans at several budgets (fractions in (0, 1], or None as :func:`make_plan` allows), sharing the
    error model, segment table and frontier.

    Returns:
        ``[(plan, sidecar), ...]`` in the order of ``budgets`` (as :func:`make_plan`).
    Raises:
        ValueError: as :func:`make_plan`, for the first failing budget.
    """
    planner = Planner(calibration, ridge=ridge, predictors=predictors)
    return [planner.plan(b, method, **options) for b in budgets]
