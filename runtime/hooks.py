"""The tiny hook core shared by calibration (record every unit) and plan execution (skip units).

Each unit module's ``forward`` is wrapped (the instance attribute is replaced and restored on removal, the
way diffusers' ``hooks`` registry does it); the transformer gets a forward pre-hook and a forward hook so a
:class:`UnitHandler` can read the step from the ``timestep`` the transformer receives and the guidance
branch from the batch layout or the call order. Nothing else in the model is touched, except that
attention-map units (kind ``"attn_map"``) need their attention's probability map as a module of its own:
:func:`install` materialises those (:func:`cachec.runtime.attention_maps.materialise`) and :meth:`remove`
restores the original attention processors.

A *feature* is always a tuple of tensors (a single-tensor output is a 1-tuple): the module's return value
for ``mode="output"`` units, ``output − input`` part by part for ``mode="residual"`` units.

Locating the step, the same way in calibration and at run time: a received timestep *is* a recorded one
(a plan's or a calibration's first run's schedule) when :func:`same_timestep` says so; a call whose timestep
is exactly equal to the previous call's is another call of the same step (split CFG passes the very same
value twice, and exact equality cannot merge two neighbouring steps).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from .units import UnitSpec, unwrap

Feature = tuple[torch.Tensor, ...]
_ABSENT = object()


class UnitHandler(Protocol):
    """What the hook core asks of a calibration recorder or a plan executor."""

    def begin_call(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Called before every transformer forward with its arguments."""

    def end_call(self) -> None:
        """Called after every transformer forward."""

    def should_compute(self, index: int) -> bool:
        """Whether unit ``index`` runs its real computation in the current call."""

    def store(self, index: int, feature: Feature) -> None:
        """Receives the feature of a computed unit (detached tensors)."""

    def predict(self, index: int) -> Feature:
        """The feature to use instead of computing unit ``index``."""

    # Optional: ``substitute(index) -> Feature | None``, called right after ``store`` of a computed unit; a
    # feature returned there replaces the computed one downstream (shadow computation: calibration along a
    # plan's cached trajectory computes every unit but passes the plan's predictions on). Resolved once at
    # installation; handlers without it (the plan executor) are not affected.
    # Optional: ``stores(index) -> bool``, fixed per unit: False means ``store`` would drop the unit's
    # features, so the wrapper does not build them (no ``output − input`` of a residual unit). Without it
    # every computed feature is passed to ``store``.
    # Optional: ``wraps(index) -> bool``, fixed per unit: False means the handler never predicts nor records
    # the unit, so an attention-map unit is then neither materialised nor wrapped (its attention keeps its own
    # processor). Without it every unit is wrapped.
    # Optional: ``observer(index) -> Callable[[tuple, dict], None] | None``, resolved once per unit at
    # installation: a callable returned there is called with the unit's ``(args, kwargs)`` before
    # ``should_compute`` (the adaptive executor's decision point, :mod:`cachec.runtime.adaptive`; it should
    # be ``torch.compiler.disable``-d). Handlers without it (the static plan executor) trace no extra call.


def timestep_arg(args: tuple, kwargs: dict[str, Any], forward_signature: inspect.Signature):
    """The raw ``timestep`` argument of a transformer call (a tensor, a Python number, ...).

    Raises:
        ValueError: the call carries no ``timestep`` argument.
    """
    if "timestep" in kwargs and kwargs["timestep"] is not None:
        return kwargs["timestep"]
    try:
        t = forward_signature.bind_partial(*args, **kwargs).arguments.get("timestep")
    except TypeError:
        t = None
    if t is None:
        raise ValueError("the transformer was called without a `timestep`; cachec reads the step from it")
    return t


def timestep_and_dtype(
    args: tuple, kwargs: dict[str, Any], forward_signature: inspect.Signature
) -> tuple[float, torch.dtype | None]:
    """The scalar timestep of a transformer call (first element if a batch of timesteps is passed) and the
    dtype it was passed in (None: a Python number), for :func:`same_timestep`.

    Raises:
        ValueError: the call carries no ``timestep`` argument.
    """
    t = timestep_arg(args, kwargs, forward_signature)
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0].item()), t.dtype
    return float(t), None


def timestep_of(args: tuple, kwargs: dict[str, Any], forward_signature: inspect.Signature) -> float:
    """The scalar timestep of a transformer call (first element if a batch of timesteps is passed).

    Raises:
        ValueError: the call carries no ``timestep`` argument.
    """
    return timestep_and_dtype(args, kwargs, forward_signature)[0]


#: a received timestep matches a recorded one within this many units in the last place of float32
TIMESTEP_ULPS = 4


def same_timestep(ref: float, t: float, dtype: torch.dtype | None = None) -> bool:
    """Whether a received timestep ``t`` (passed in ``dtype``; None: a Python number) is the recorded ``ref``.

    Floating dtypes of 32 bits or more (and Python numbers): within ``TIMESTEP_ULPS`` units in the last
    place of float32, the precision plans and calibrations record (a scheduler run on another device may
    differ in the last bits); 16-bit dtypes (float16, bfloat16: FluxPipeline on GPU): within one unit in
    their last place (the recorded value rounded to the dtype); integer dtypes: equal. Both values are in
    the scheduler's timestep units.
    """
    if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
        return ref == t
    low = isinstance(dtype, torch.dtype) and dtype.itemsize <= 2
    eps = torch.finfo(dtype if low else torch.float32).eps
    return abs(ref - t) <= (1 if low else TIMESTEP_ULPS) * eps * max(abs(ref), abs(t), 1e-30)


def batch_size_of(args: tuple, kwargs: dict[str, Any]) -> int:
    """Batch size of a transformer call (leading dim of ``hidden_states``)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    return int(x.shape[0])


def _eager(fn):
    """``fn`` excluded from torch.compile tracing (it runs eagerly between compiled regions)."""
    return torch.compiler.disable(fn, reason="cachec resolves the plan step in eager Python")


def _rebuild(feature: Feature, as_tuple: bool):
    return tuple(feature) if as_tuple else feature[0]


class HookHandle:
    """Installed hooks on one transformer; :meth:`remove` restores the model exactly."""

    def __init__(self, transformer, units: list[UnitSpec], handler: UnitHandler):
        self.transformer = transformer
        self.units = units
        self.handler = handler
        self._removed = False
        model = unwrap(transformer)
        self._signature = inspect.signature(model.forward)
        self._patched: list[tuple[Any, Any]] = []  # (module, its own instance `forward` before, or _ABSENT)
        # The call hooks resolve the step in eager Python. They are excluded from torch.compile tracing so
        # that a transformer compiled *after* the hooks were installed (compile wraps the hooked module)
        # still runs them eagerly instead of failing inside dynamo.
        self._hooks = [
            transformer.register_forward_pre_hook(_eager(self._pre), with_kwargs=True),
            transformer.register_forward_hook(_eager(self._post), always_call=True),
        ]
        self._maps = None
        try:
            wraps = getattr(handler, "wraps", lambda index: True)
            maps = [u.name for i, u in enumerate(units) if u.kind == "attn_map" and wraps(i)]
            if maps:
                from .attention_maps import map_paths, materialise

                self._maps = materialise(model, map_paths(maps))
            modules = dict(model.named_modules())
            for index, spec in enumerate(units):
                if spec.kind == "attn_map" and not wraps(index):
                    continue
                if spec.name not in modules:
                    raise KeyError(f"unit {spec.name!r} not found in {type(model).__name__}")
                self._wrap(modules[spec.name], index, spec)
        except BaseException:
            self.remove()
            raise

    def _pre(self, module, args, kwargs):
        self.handler.begin_call(args, kwargs)

    def _post(self, module, args, output):
        # with always_call=True torch calls this hook with output None when the forward raised; a handler
        # that defines ``abort_call`` is told so (a partial call must not update its state)
        if output is None and hasattr(self.handler, "abort_call"):
            self.handler.abort_call()
        else:
            self.handler.end_call()

    def _wrap(self, module, index: int, spec: UnitSpec) -> None:
        original = module.forward
        previous = module.__dict__.get("forward", _ABSENT)  # another library's instance patch, kept
        handler = self.handler
        substitute = getattr(handler, "substitute", None)
        stores = getattr(handler, "stores", None)
        observer = getattr(handler, "observer", None)
        observe = observer(index) if observer is not None else None
        layout = {"as_tuple": None}

        if spec.mode == "output":

            def forward(*args, **kwargs):
                if observe is not None:
                    observe(args, kwargs)
                if handler.should_compute(index):
                    out = original(*args, **kwargs)
                    layout["as_tuple"] = isinstance(out, tuple)
                    if stores is None or stores(index):
                        handler.store(index, tuple(o.detach() for o in out) if layout["as_tuple"] else (out.detach(),))
                    if substitute is not None:
                        sub = substitute(index)
                        if sub is not None:
                            return _rebuild(sub, layout["as_tuple"])
                    return out
                if layout["as_tuple"] is None:
                    raise RuntimeError(f"unit {spec.name} was skipped before it was ever computed")
                return _rebuild(handler.predict(index), layout["as_tuple"])

        else:
            # positions of the residual inputs, resolved once (no inspect in the hot path: torch.compile traces it)
            params = list(inspect.signature(original).parameters)
            missing = [n for n in spec.residual_inputs if n not in params]
            if missing:
                raise KeyError(f"unit {spec.name!r}: forward has no argument(s) {missing} to take the residual of")
            where = tuple((n, params.index(n)) for n in spec.residual_inputs)

            def forward(*args, **kwargs):
                inputs = tuple(kwargs[n] if n in kwargs else args[i] for n, i in where)
                if observe is not None:
                    observe(args, kwargs)
                if handler.should_compute(index):
                    out = original(*args, **kwargs)
                    parts = out if isinstance(out, tuple) else (out,)
                    layout["as_tuple"] = isinstance(out, tuple)
                    if stores is None or stores(index):
                        handler.store(index, tuple((o - x).detach() for o, x in zip(parts, inputs)))
                    if substitute is not None:
                        sub = substitute(index)
                        if sub is not None:
                            return _rebuild(tuple(x + f for x, f in zip(inputs, sub)), layout["as_tuple"])
                    return out
                if layout["as_tuple"] is None:
                    raise RuntimeError(f"unit {spec.name} was skipped before it was ever computed")
                feature = handler.predict(index)
                return _rebuild(tuple(x + f for x, f in zip(inputs, feature)), layout["as_tuple"])

        module.forward = forward
        self._patched.append((module, previous))

    def remove(self) -> None:
        """Restore every wrapped module and remove the transformer hooks (idempotent)."""
        if self._removed:
            return
        for module, previous in reversed(self._patched):
            if previous is _ABSENT:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for h in self._hooks:
            h.remove()
        if self._maps is not None:
            self._maps.remove()
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def install(transformer, units: list[UnitSpec], handler: UnitHandler) -> HookHandle:
    """Wrap ``units`` of ``transformer`` so that ``handler`` decides, per call, compute or predict.

    Returns:
        A :class:`HookHandle`; ``handle.remove()`` (or leaving a ``with`` block) restores the model.

    Raises:
        KeyError: a unit name is not a module of the transformer.
    """
    return HookHandle(transformer, units, handler)
