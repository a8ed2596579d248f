"""What one calibration run is: its validated settings (:class:`CalibrationJob`) and its process context.

:func:`cachec.calibrate.calibrate` checks its arguments once and freezes them into a
:class:`CalibrationJob`; everything downstream (the sampling loop, checkpoints, sensitivity, the header)
reads the settings from it. :class:`RunContext` holds the objects a process works with (the model, its
units, the device, its distributed rank, the plan it follows), which are not settings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conditions import batch_samples, num_batches, sample_plan
from .format import DEFAULT_EOC_SAMPLE, DEFAULT_SKETCH_DIM


def parse_shard(text: str | tuple | None) -> tuple[int, int]:
    """Parse ``"i/n"`` (0 <= i < n) or pass an ``(i, n)`` tuple through; None means ``(0, 1)``.

    Returns:
        ``(i, n)`` ints.
    Raises:
        ValueError: malformed text or i out of range.
    """
    if text is None:
        return (0, 1)
    if isinstance(text, str):
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"cannot parse shard {text!r}: expected i/n, e.g. 0/4") from None
    else:
        i, n = (int(x) for x in text)
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is out of range: expected 0 <= i < n")
    return i, n


@dataclass(frozen=True)
class CalibrationJob:
    """The validated settings of one :func:`cachec.calibrate.calibrate` call (meanings: its docstring).

    Attributes:
        output: the ``.safetensors`` file to write (its folder exists).
        conditions: class ints or prompt strings, as the model takes them (already checked).
        samples_per_condition: images per condition (>= 1).
        steps: S (>= 1).
        guidance: CFG scale (``<= 1``: one branch).
        seed: sample n uses seed ``seed + n``.
        batch_size: samples per pipeline call (>= 1).
        shard: ``(i, n)``, this process runs batches ``b % n == i``.
        eoc_lags: K (>= 0).
        eoc_prior: grouping of the EOC prior statistics (``channel``, ``token`` or ``element``).
        sketch_dim: r, the sketch dimension of the Gram statistics (0: exact, never sketched).
        sketch_seed: seed of unit 0's sketch (unit u: ``sketch_seed + u``).
        eoc_sample: most elements per group the EOC sums read (0: all).
        sensitivity: ``"full"``, ``"factored"``, ``"chain"`` or ``"none"`` (``auto`` is resolved before).
        sensitivity_samples: samples of the sensitivity probes (>= 1 unless ``"none"``).
        cfg: ``"batched"`` or ``"split"``.
        restart: discard existing partial state.
        checkpoint_every: seconds between partial-state writes (>= 0; 0: after every batch).
        overlap: fold a batch on a worker thread while the next one samples.
        progress: show progress bars (rank 0 only).
    """

    output: Path
    conditions: tuple
    samples_per_condition: int
    steps: int
    guidance: float
    seed: int
    batch_size: int
    shard: tuple[int, int]
    eoc_lags: int
    sensitivity: str
    sensitivity_samples: int
    cfg: str
    restart: bool
    checkpoint_every: float
    overlap: bool
    progress: bool
    eoc_prior: str = "token"
    sketch_dim: int = DEFAULT_SKETCH_DIM
    eoc_sample: int = DEFAULT_EOC_SAMPLE
    sketch_seed: int = 0

    @functools.cached_property
    def _samples(self) -> tuple[list, list[int]]:
        return sample_plan(list(self.conditions), self.samples_per_condition, self.seed)

    @property
    def sample_conditions(self) -> list:
        """Condition of each global sample n (``conditions[n // samples_per_condition]``)."""
        return self._samples[0]

    @property
    def sample_seeds(self) -> list[int]:
        """Seed of each global sample n (``seed + n``)."""
        return self._samples[1]

    @property
    def n_samples(self) -> int:
        """N = ``len(conditions) * samples_per_condition``."""
        return len(self._samples[0])

    @property
    def n_batches(self) -> int:
        """Number of fixed batches of ``batch_size`` samples covering the N samples (the last may be short)."""
        return num_batches(self.n_samples, self.batch_size)

    def batch(self, b: int) -> range:
        """Global sample indices of batch ``b``."""
        return batch_samples(b, self.n_samples, self.batch_size)

    def batches(self, rank: int = 0, world: int = 1) -> list[int]:
        """The batches of this shard that distributed rank ``rank`` of ``world`` runs (every world-th)."""
        i, n = self.shard
        return [b for b in range(self.n_batches) if b % n == i][rank::world]


@dataclass(frozen=True)
class RunContext:
    """The objects one process of a calibration works with.

    Attributes:
        driver: the :class:`cachec.loading.Driver`.
        units: the transformer's :class:`cachec.runtime.units.UnitSpec` list, model order.
        device: the transformer's ``torch.device``.
        rank, world: this process's place in a ``torchrun`` group (0, 1 when not distributed).
        along: the plan a trajectory calibration follows (:class:`~.along.AlongPlan`) or None.
        copied_sensitivity: sensitivity copied from another file (:class:`~.along.CopiedSensitivity`) or None.
    """

    driver: Any
    units: list
    device: Any
    rank: int = 0
    world: int = 1
    along: Any = None
    copied_sensitivity: Any = None

    @property
    def transformer(self):
        """The driver's transformer (possibly wrapped)."""
        return self.driver.transformer
