"""The planner's in-memory view of a calibration (docs/calibration-format.md): :class:`Calibration`.

numpy only. The file itself — format identity, header keys and validation, reading, and the one exception
type :class:`CalibrationError` (re-exported here as ``cachec.planner.CalibrationError``) — is owned by
:mod:`cachec.calibrate.format` (torch-free). The EOC group tensors (``prior_sum``, ``eoc_q``, ``eoc_m``:
per channel by default) are read one unit at a time and reduced at load to the few scalars the error
model needs (the EOC inner products of the contract's ``E(alpha)`` formula); the prior itself is re-read
lazily, and only for the (unit, step) pairs a plan corrects, when its sidecar is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cachec.calibrate.format import (
    CalibrationError, eoc_group_layout, read_header, read_tensors, tensor_keys, validate_header,
)
from cachec.runtime.io import file_sha256


@dataclass
class Calibration:
    """Calibration statistics, reduced to what the planner needs.

    Shapes: U units (order of ``header["units"]``), S steps, B guidance branches, K = ``eoc_lags``.

    Attributes:
        header: the raw JSON header (dict), kept for the plan's model/sampler/provenance sections.
        sha256: hex SHA-256 of the calibration file bytes (for in-memory statistics: of their
            safetensors serialisation).
        unit_names: U names.
        gram: (U, B, 2, S, S) float64, ``G[u,b,k,s,t] = sum_{n in split k} <F_s, F_t>``.
        unit_flops: (U,) float64 FLOPs of one call, one sample, one branch.
        unit_latency_s: (U,) float64 seconds.
        sensitivity: (U, S) float64, dimensionless (squared final-sample change per squared local error).
        goc_rel_sum, goc_cos_sum: (U, S) float64 sums over ``goc_count`` (sample, branch) outputs.
        eoc_lin: (U, 2, S, K) float64, ``<eoc_m[k, s, j-1], D>`` with ``D = P_s - P_{s-j}`` (lag j at
            index j-1; 0 where s - j < 0).
        eoc_quad: (U, 2, S, K) float64, ``<eoc_q[k, s-j], D * D>`` with the same D.
    """

    header: dict
    sha256: str
    unit_names: list[str]
    gram: np.ndarray
    unit_flops: np.ndarray
    unit_latency_s: np.ndarray
    sensitivity: np.ndarray
    goc_rel_sum: np.ndarray
    goc_cos_sum: np.ndarray
    eoc_lin: np.ndarray
    eoc_quad: np.ndarray
    _tensor: Callable[[str], np.ndarray] = field(repr=False, default=None)

    # ---- header shortcuts -------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """S, the number of sampling steps."""
        return int(self.header["steps"])

    @property
    def branches(self) -> int:
        """B, the number of guidance branches."""
        return int(self.header["guidance"]["branches"])

    @property
    def n_units(self) -> int:
        """U, the number of units."""
        return len(self.unit_names)

    @property
    def eoc_lags(self) -> int:
        """K, the number of lags of the EOC inner products."""
        return int(self.header["eoc_lags"])

    @property
    def samples(self) -> tuple[int, int]:
        """(n_split0, n_split1), samples per split (each with B branches)."""
        a, b = self.header["samples"]
        return int(a), int(b)

    @property
    def full_step_flops(self) -> float:
        """FLOPs of one uncached forward, one sample, one branch."""
        return float(self.header["flops"]["full_step"])

    @property
    def fixed_step_flops(self) -> float:
        """Never-cached FLOPs of one forward, one sample, one branch."""
        return float(self.header["flops"]["fixed_step"])

    @property
    def timesteps(self) -> np.ndarray:
        """(S,) float64 timestep values the transformer receives."""
        return np.asarray(self.header["timesteps"], dtype=np.float64)

    @property
    def units(self) -> list[dict]:
        """The header's unit descriptors (name, kind, mode, shapes, numel)."""
        return self.header["units"]

    def prior_layout(self, unit: int) -> list[tuple[tuple[int, ...], int, int]]:
        """Per tuple part of the unit: ``(broadcast shape, groups, elements per group)`` of its EOC prior
        (:func:`cachec.calibrate.format.eoc_group_layout` for the header's ``eoc_prior``)."""
        return eoc_group_layout(self.units[unit]["shapes"], self.header["eoc_prior"])

    def prior(self, unit: int) -> np.ndarray:
        """The EOC prior of one unit: per group, the mean over the (sample, branch) outputs and over the
        group's elements, ``prior_sum / (prior_count · group size)``.

        Args:
            unit: unit index in ``unit_names`` order.
        Returns:
            (S, G_u) float64 array (G_u = ``units[unit]["eoc_groups"]``; parts' groups concatenated, see
            :meth:`prior_layout`).
        Raises:
            CalibrationError: the prior is not available (``prior_count`` is 0 or the tensor is missing).
        """
        count = int(self.header["prior_count"])
        if count <= 0:
            raise CalibrationError("prior_count is 0: the calibration has no EOC prior")
        if self._tensor is None:
            raise CalibrationError("this Calibration was built without access to its prior tensors")
        return np.asarray(self._tensor(f"prior_sum/{self.unit_names[unit]}"), dtype=np.float64) / (count * _group_sizes(self.prior_layout(unit)))


def _group_sizes(layout) -> np.ndarray:
    """(G,) float64 elements per group of a unit's EOC prior, parts concatenated."""
    return np.concatenate([np.full(groups, float(size)) for _, groups, size in layout])


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CalibrationError(msg)


def _check(name: str, arr: np.ndarray, shape: tuple) -> np.ndarray:
    _require(tuple(arr.shape) == tuple(shape), f"calibration tensor {name}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")
    _require(arr.dtype == np.float64, f"calibration tensor {name}: expected float64, got {arr.dtype}")
    return arr


#: the remedy every non-finite-statistic message ends with
_REMEDY = "the calibration run diverged or the file is damaged; re-run cachec calibrate"


def _where(axes: tuple[str, ...], index: tuple[int, ...], unit_names: list[str] | tuple[str, ...]) -> str:
    """``"branch 0, split 1, steps (4, 7)"``: one entry's position, by axis meaning.

    Axis labels: ``unit`` (printed as the name in ``unit_names``), ``lag`` (stored at j - 1, printed as
    j), ``step`` (adjacent ``step`` axes print together as ``steps (s, t)``), anything else verbatim.
    """
    parts = []
    i = 0
    while i < len(axes):
        ax, v = axes[i], int(index[i])
        if ax == "step" and i + 1 < len(axes) and axes[i + 1] == "step":
            parts.append(f"steps ({v}, {int(index[i + 1])})")
            i += 2
            continue
        if ax == "unit":
            parts.append(f"unit {unit_names[v]}")
        elif ax == "lag":
            parts.append(f"lag {v + 1}")
        else:
            parts.append(f"{ax} {v}")
        i += 1
    return ", ".join(parts)


def _check_values(key: str, arr: np.ndarray, axes: tuple[str, ...], unit_names: list[str] | tuple[str, ...] = (),
                  nonnegative: bool = False) -> None:
    """Refuse a calibration tensor with a non-finite (or, with ``nonnegative``, a negative) entry.

    Cheap when the tensor is valid (one ``isfinite(...).all()`` pass, plus one ``< 0`` pass with
    ``nonnegative``); the first offending entry (C order) is located only on failure.

    Args:
        key: the tensor's key (``gram/{unit}``, ``sensitivity``, ...), named in the message.
        arr: the tensor, already shape-checked.
        axes: one label per axis of ``arr``: ``unit``, ``branch``, ``split``, ``step``, ``lag``, ``group``.
        unit_names: names for the ``unit`` axis.
        nonnegative: also refuse values < 0.
    Raises:
        CalibrationError: one line naming the key and the entry's position (unit, branch, split, step(s),
            lag, group), e.g. ``calibration tensor gram/blocks.3.ff: non-finite value (nan) at branch 0,
            split 1, steps (4, 7): the calibration run diverged ...``.
    """
    if not np.isfinite(arr).all():
        idx = np.unravel_index(int(np.argmax(~np.isfinite(arr))), arr.shape)
        raise CalibrationError(
            f"calibration tensor {key}: non-finite value ({float(arr[idx])}) at {_where(axes, idx, unit_names)}: {_REMEDY}"
        )
    if nonnegative:
        neg = arr < 0
        if neg.any():
            idx = np.unravel_index(int(np.argmax(neg)), arr.shape)
            raise CalibrationError(
                f"calibration tensor {key}: negative value ({float(arr[idx])!r}) at {_where(axes, idx, unit_names)}: "
                f"expected values >= 0; the file is damaged; re-run cachec calibrate"
            )


def _eoc_reduce(prior: np.ndarray, eoc_q: np.ndarray, eoc_m: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(2, S, K) lin and quad EOC inner products of one unit (see Calibration.eoc_lin/eoc_quad)."""
    S = prior.shape[0]
    lin = np.zeros((2, S, K))
    quad = np.zeros((2, S, K))
    for j in range(1, K + 1):
        if j >= S:
            break
        D = prior[j:] - prior[:-j]  # (S-j, D): D for s = j..S-1
        lin[:, j:, j - 1] = np.einsum("ksd,sd->ks", eoc_m[:, j:, j - 1], D)
        quad[:, j:, j - 1] = np.einsum("ksd,sd->ks", eoc_q[:, :-j], D * D)
    return lin, quad


def calibration_from_tensors(header: dict, tensor: Callable[[str], np.ndarray], keys: set[str], sha256: str) -> Calibration:
    """Build a :class:`Calibration` from a header and a tensor accessor (shared by file and memory paths).

    Args:
        header: calibration header (validated here).
        tensor: ``tensor(key) -> np.ndarray`` returning one stored tensor.
        keys: the set of stored tensor keys.
        sha256: hex digest identifying the statistics.
    Raises:
        CalibrationError: invalid header, missing tensor (named), wrong shape or dtype; a non-finite
            statistic, or a negative ``sensitivity`` / ``unit_flops`` (named with its unit, step(s) and,
            where the tensor has them, branch, split, lag and EOC prior group).
    """
    validate_header(header)
    S = header["steps"]
    B = header["guidance"]["branches"]
    K = header["eoc_lags"]
    units = header["units"]
    U = len(units)
    names = [u["name"] for u in units]

    def get(key: str) -> np.ndarray:
        _require(key in keys, f"calibration tensor {key}: missing")
        return np.asarray(tensor(key))

    grams = []
    for n in names:
        g = _check(f"gram/{n}", get(f"gram/{n}"), (B, 2, S, S))
        _check_values(f"gram/{n}", g, ("branch", "split", "step", "step"))
        grams.append(g)
    gram = np.stack(grams)
    del grams
    flops = _check("unit_flops", get("unit_flops"), (U,))
    latency = _check("unit_latency_s", get("unit_latency_s"), (U,))
    sens = _check("sensitivity", get("sensitivity"), (U, S))
    rel = _check("goc_rel_sum", get("goc_rel_sum"), (U, S))
    cos = _check("goc_cos_sum", get("goc_cos_sum"), (U, S))
    _check_values("unit_flops", flops, ("unit",), names, nonnegative=True)
    _check_values("unit_latency_s", latency, ("unit",), names)
    _check_values("sensitivity", sens, ("unit", "step"), names, nonnegative=True)
    _check_values("goc_rel_sum", rel, ("unit", "step"), names)
    _check_values("goc_cos_sum", cos, ("unit", "step"), names)
    lin = np.zeros((U, 2, S, K))
    quad = np.zeros((U, 2, S, K))
    count = int(header["prior_count"])
    for i, (n, u) in enumerate(zip(names, units)):
        Gn = int(u["eoc_groups"])
        prior = _check(f"prior_sum/{n}", get(f"prior_sum/{n}"), (S, Gn))
        q = _check(f"eoc_q/{n}", get(f"eoc_q/{n}"), (2, S, Gn))
        m = _check(f"eoc_m/{n}", get(f"eoc_m/{n}"), (2, S, K, Gn))
        _check_values(f"prior_sum/{n}", prior, ("step", "group"))
        _check_values(f"eoc_q/{n}", q, ("split", "step", "group"))
        _check_values(f"eoc_m/{n}", m, ("split", "step", "lag", "group"))
        if count > 0 and K > 0:
            sizes = _group_sizes(eoc_group_layout(u["shapes"], header["eoc_prior"]))
            lin[i], quad[i] = _eoc_reduce(prior / (count * sizes), q, m, K)
        del prior, q, m
    return Calibration(
        header=header, sha256=sha256, unit_names=names, gram=gram, unit_flops=flops.copy(),
        unit_latency_s=latency.copy(), sensitivity=sens.copy(), goc_rel_sum=rel.copy(), goc_cos_sum=cos.copy(),
        eoc_lin=lin, eoc_quad=quad, _tensor=tensor,
    )


def load_calibration(path: str) -> Calibration:
    """Load a calibration ``.safetensors`` file (docs/calibration-format.md, format version 2).

    Args:
        path: file path.
    Returns:
        A :class:`Calibration`; the prior stays on disk and is re-read by ``Calibration.prior``.
    Raises:
        CalibrationError: not a safetensors file, no ``cachec_calibration`` metadata, wrong format or
            version, missing tensor or header key (named), wrong shape or dtype, a non-finite or
            out-of-range statistic (named with its unit and step); header errors are prefixed with the path.
        FileNotFoundError: no such file.
    """
    path = str(path)
    header = read_header(path)
    keys = tensor_keys(path)

    def tensor(key: str) -> np.ndarray:
        return read_tensors(path, [key])[key]

    return calibration_from_tensors(header, tensor, keys, file_sha256(path))
