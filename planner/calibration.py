"""Read a calibration statistics file (docs/calibration-format.md) into a :class:`Calibration`.

numpy + safetensors.numpy only. The big per-element tensors (``prior_sum``, ``eoc_q``, ``eoc_m``) are
read one unit at a time and reduced at load to the few scalars the error model needs (the EOC inner
products of the contract's ``E(alpha)`` formula); the prior itself is re-read lazily, and only for the
(unit, step) pairs a plan corrects, when its sidecar is built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

FORMAT = "cachec-calibration"
FORMAT_VERSION = 1
METADATA_KEY = "cachec_calibration"

#: header keys required by format version 1 (docs/calibration-format.md, "Header")
HEADER_KEYS = (
    "format", "format_version", "created", "cachec_version", "model", "scheduler", "steps", "timesteps",
    "sigmas", "guidance", "resolution", "conditions", "samples_per_condition", "seed", "samples",
    "prior_count", "goc_count", "eoc_lags", "units", "flops", "sensitivity", "shards",
)
#: optional header keys, after the required ones when present (docs/calibration-format.md)
OPTIONAL_HEADER_KEYS = ("along_plan",)
UNIT_KEYS = ("name", "kind", "mode", "shapes", "numel")


class CalibrationError(ValueError):
    """A calibration file or in-memory statistics set that does not follow docs/calibration-format.md."""


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

    def prior(self, unit: int) -> np.ndarray:
        """The EOC prior of one unit, ``prior_sum / prior_count``.

        Args:
            unit: unit index in ``unit_names`` order.
        Returns:
            (S, D_u) float64 array.
        Raises:
            CalibrationError: the prior is not available (``prior_count`` is 0 or the tensor is missing).
        """
        count = int(self.header["prior_count"])
        if count <= 0:
            raise CalibrationError("prior_count is 0: the calibration has no EOC prior")
        if self._tensor is None:
            raise CalibrationError("this Calibration was built without access to its prior tensors")
        return np.asarray(self._tensor(f"prior_sum/{self.unit_names[unit]}"), dtype=np.float64) / count


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CalibrationError(msg)


def validate_header(header: object) -> dict:
    """Check a calibration header against format version 1.

    Args:
        header: the decoded JSON object of ``metadata["cachec_calibration"]``.
    Returns:
        The header (unchanged).
    Raises:
        CalibrationError: wrong format or version, a missing key, or inconsistent sizes (each message
            names the key).
    """
    _require(isinstance(header, dict), f"calibration header: expected a JSON object, got {type(header).__name__}")
    _require(header.get("format") == FORMAT, f"calibration header.format: expected {FORMAT!r}, got {header.get('format')!r}")
    _require(
        header.get("format_version") == FORMAT_VERSION,
        f"calibration header.format_version: expected {FORMAT_VERSION}, got {header.get('format_version')!r}",
    )
    for key in HEADER_KEYS:
        _require(key in header, f"calibration header.{key}: missing")
    S = header["steps"]
    _require(isinstance(S, int) and S >= 1, f"calibration header.steps: expected a positive int, got {S!r}")
    _require(len(header["timesteps"]) == S, f"calibration header.timesteps: expected {S} values, got {len(header['timesteps'])}")
    if header["sigmas"] is not None:
        _require(len(header["sigmas"]) == S, f"calibration header.sigmas: expected {S} values or null")
    g = header["guidance"]
    _require(isinstance(g, dict) and all(k in g for k in ("mode", "scale", "branches")),
             "calibration header.guidance: expected {mode, scale, branches}")
    _require(isinstance(g["branches"], int) and g["branches"] >= 1, "calibration header.guidance.branches: expected int >= 1")
    _require(isinstance(header["samples"], list) and len(header["samples"]) == 2,
             "calibration header.samples: expected [n_split0, n_split1]")
    _require(isinstance(header["eoc_lags"], int) and header["eoc_lags"] >= 0, "calibration header.eoc_lags: expected int >= 0")
    fl = header["flops"]
    _require(isinstance(fl, dict) and "full_step" in fl and "fixed_step" in fl,
             "calibration header.flops: expected {full_step, fixed_step, counter}")
    _require(float(fl["full_step"]) > 0, "calibration header.flops.full_step: expected > 0")
    _require(float(fl["fixed_step"]) >= 0, "calibration header.flops.fixed_step: expected >= 0")
    units = header["units"]
    _require(isinstance(units, list) and len(units) >= 1, "calibration header.units: expected a non-empty list")
    names = set()
    for i, u in enumerate(units):
        for key in UNIT_KEYS:
            _require(isinstance(u, dict) and key in u, f"calibration header.units[{i}].{key}: missing")
        _require(u["name"] not in names, f"calibration header.units[{i}].name: duplicate {u['name']!r}")
        names.add(u["name"])
        total = sum(int(np.prod(s)) for s in u["shapes"])
        _require(total == u["numel"],
                 f"calibration header.units[{i}].numel: {u['numel']} != {total} (sum of the shapes' sizes)")
    return header


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
        axes: one label per axis of ``arr``: ``unit``, ``branch``, ``split``, ``step``, ``lag``, ``element``.
        unit_names: names for the ``unit`` axis.
        nonnegative: also refuse values < 0.
    Raises:
        CalibrationError: one line naming the key and the entry's position (unit, branch, split, step(s),
            lag, element), e.g. ``calibration tensor gram/blocks.3.ff: non-finite value (nan) at branch 0,
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
            where the tensor has them, branch, split, lag and element).
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
        Dn = int(u["numel"])
        prior = _check(f"prior_sum/{n}", get(f"prior_sum/{n}"), (S, Dn))
        q = _check(f"eoc_q/{n}", get(f"eoc_q/{n}"), (2, S, Dn))
        m = _check(f"eoc_m/{n}", get(f"eoc_m/{n}"), (2, S, K, Dn))
        _check_values(f"prior_sum/{n}", prior, ("step", "element"))
        _check_values(f"eoc_q/{n}", q, ("split", "step", "element"))
        _check_values(f"eoc_m/{n}", m, ("split", "step", "lag", "element"))
        if count > 0 and K > 0:
            lin[i], quad[i] = _eoc_reduce(prior / count, q, m, K)
        del prior, q, m
    return Calibration(
        header=header, sha256=sha256, unit_names=names, gram=gram, unit_flops=flops.copy(),
        unit_latency_s=latency.copy(), sensitivity=sens.copy(), goc_rel_sum=rel.copy(), goc_cos_sum=cos.copy(),
        eoc_lin=lin, eoc_quad=quad, _tensor=tensor,
    )


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 16 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def load_calibration(path: str) -> Calibration:
    """Load a calibration ``.safetensors`` file (docs/calibration-format.md, format version 1).

    Args:
        path: file path.
    Returns:
        A :class:`Calibration`; the prior stays on disk and is re-read by ``Calibration.prior``.
    Raises:
        CalibrationError: not a safetensors file, no ``cachec_calibration`` metadata, wrong format or
            version, missing tensor or header key (named), wrong shape or dtype, a non-finite or
            out-of-range statistic (named with its unit and step).
        FileNotFoundError: no such file.
    """
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CalibrationError(f"{path}: not a readable safetensors file ({e})") from e
    if METADATA_KEY not in meta:
        raise CalibrationError(f"{path}: no {METADATA_KEY!r} metadata: not a cachec calibration file")
    try:
        header = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e

    def tensor(key: str) -> np.ndarray:
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(key)

    return calibration_from_tensors(header, tensor, keys, file_sha256(path))
