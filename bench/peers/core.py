"""The benchmark's core: the configuration context, sessions, the method interface, error and leftover-state
reporting. Every technique module of :mod:`bench.peers` builds on these."""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters), for tables."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_location(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame that raised ``exc``."""
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return ""
    fr = tb[-1]
    return f"{fr.filename}:{fr.lineno} in {fr.name}"


@dataclass
class BenchContext:
    """What the methods need to know about one benchmark configuration (model + sampler).

    Attributes:
        driver: the loaded model (:func:`cachec.loading.load_model`).
        steps: sampling steps S.
        guidance: classifier-free guidance scale.
        calib_conditions, calib_seeds: the calibration samples (disjoint from the evaluation seeds); used by
            cachec's calibration and by MagCache's calibrate mode.
        workdir: scratch folder (calibration file, plans).
        batch_size: samples per ``generate`` call.
        sensitivity: cachec calibration sensitivity method (``full`` | ``factored`` | ``none``).
        sensitivity_samples: samples of cachec's sensitivity probes.
        validation_per_class: validation samples per class of cachec's closed-loop family choice.
        refine: trajectory refinements per family of cachec's plan search.
        mask_runs: validation runs of the mask search, the plan search's third stage (0: none).
        log: progress printer.
        cache: per-configuration results shared between methods (the calibration file, MagCache ratios).
        module_order: the transformer's module paths in ``named_modules()`` order when the context was made
            (:func:`leftover_state` reports a method that changed it).
    """

    driver: Any
    steps: int
    guidance: float
    calib_conditions: list
    calib_seeds: list
    workdir: str
    batch_size: int = 10
    sensitivity: str = "factored"
    sensitivity_samples: int = 4
    validation_per_class: int = 2
    refine: int = 1
    mask_runs: int = 0
    log: Callable[[str], None] = print
    cache: dict = field(default_factory=dict)
    module_order: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.module_order = module_order(self.driver)

    def generate(self, conditions: Sequence, seeds: Sequence[int]) -> torch.Tensor:
        return self.driver.generate(conditions, seeds, steps=self.steps, guidance=self.guidance)

    def calib_batches(self) -> list[tuple[list, list]]:
        bs = self.batch_size
        c, s = list(self.calib_conditions), list(self.calib_seeds)
        return [(c[i : i + bs], s[i : i + bs]) for i in range(0, len(c), bs)]


def module_order(driver) -> list[str]:
    """The transformer's module paths in ``named_modules()`` order (code that walks the model, e.g. diffusers'
    SeaCache choosing its leader and tail blocks, depends on it)."""
    return [name for name, _ in driver.transformer.named_modules()]


def leftover_state(driver, order: list[str] | None = None) -> list[str]:
    """Anything a method left installed on the model or pipeline class, and, given ``order``
    (:func:`module_order` before the method), a changed module order (empty list: clean)."""
    problems = []
    if order is not None and module_order(driver) != list(order):
        problems.append("the transformer's module order changed")
    for name, m in driver.transformer.named_modules():
        where = name or "<transformer>"
        reg = m.__dict__.get("_diffusers_hook")
        if reg is not None and reg.hooks:
            problems.append(f"{where}: diffusers hooks {list(reg.hooks)}")
        if "forward" in m.__dict__:
            problems.append(f"{where}: forward is patched")
        if m._forward_hooks or m._forward_pre_hooks:
            problems.append(f"{where}: torch forward hooks remain")
    cls = type(driver.pipe)
    if "_original_call" in cls.__dict__ or cls.__dict__.get("_is_cached"):
        problems.append(f"{cls.__name__}.__call__ is still patched (cache-dit)")
    return problems


class Session:
    """One operating point of a method, installed on the model.

    ``begin()``/``end()`` bracket every ``generate`` call (hooks that keep per-run state are applied fresh
    there); ``close()`` removes whatever the session installed. ``info`` holds facts for the results
    (e.g. a plan's own FLOPs claim).
    """

    info: dict
    #: samples per ``generate`` call this session needs (None: the configuration's batch size; 1: an adaptive
    #: method deciding per image)
    call_batch: int | None = None

    def __init__(self) -> None:
        self.info = {}

    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass


class Method:
    """A caching method and its operating points.

    Attributes:
        name: the line in the table and the plot.
        group: ``cachec`` | ``planner baseline`` | ``diffusers`` | ``cache-dit``.
        knob: what the sweep parameter is.
        adaptive: a threshold method (the benchmark extends/bisects its parameter until the realised FLOPs
            bracket each target budget); larger parameter = fewer FLOPs.
        bisect: extend/bisect the parameter as for ``adaptive`` methods (None: as ``adaptive``; False for an
            adaptive method whose parameter is itself the FLOP target, e.g. a ceiling).
        diagnostic: a configuration measured on the first batch only to show it does nothing (no-op).
        settings: fixed configuration facts reported with the results.
    """

    name = ""
    group = ""
    knob = ""
    adaptive = False
    bisect: bool | None = None
    diagnostic = False

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def prepare(self, ctx: BenchContext) -> None:
        """One-time work per configuration (calibration, imports). Raising marks every point failed."""

    def grid(self, ctx: BenchContext, quick: bool = False) -> list:
        """Initial operating points."""
        raise NotImplementedError

    def label(self, p) -> str:
        return f"{self.knob}={p:.4g}" if isinstance(p, float) else f"{self.knob}={p}"

    def session(self, ctx: BenchContext, p) -> Session:
        raise NotImplementedError

    # adaptive search (only for ``adaptive`` methods)
    def more(self, p: float) -> float:
        """A more aggressive parameter than ``p``."""
        return p * 2.0

    def less(self, p: float) -> float:
        """A less aggressive parameter than ``p``."""
        return p / 2.0

    def between(self, a: float, b: float) -> float:
        return math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2
