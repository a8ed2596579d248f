"""The calibration file format, defined once (its specification is docs/calibration-format.md).

A calibration file is one ``.safetensors`` file: the metadata entry :data:`METADATA_KEY` holds the JSON
header (:class:`CalibrationHeader`, keys :data:`HEADER_KEYS` in that order, then any of
:data:`OPTIONAL_HEADER_KEYS`) and every tensor is a float64 sum (keys :func:`tensor_keys_for`).

This module is the format's one owner: its identity and keys, the header's validation, the one reader
(:func:`read_header`, :func:`read_tensors`) and the one writer (:func:`write_calibration`, atomic through
:func:`cachec.runtime.io.atomic_write`). Every reader and validator raises :class:`CalibrationError`.
It imports numpy, json and safetensors only — never torch — so the planner, which reads calibrations on
machines without torch, imports it too.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cachec.runtime.io import atomic_write

FORMAT = "cachec-calibration"
FORMAT_VERSION = 2
METADATA_KEY = "cachec_calibration"

#: header keys required by format version 2, in file order (docs/calibration-format.md, "Header")
HEADER_KEYS = (
    "format", "format_version", "created", "cachec_version", "model", "scheduler", "steps", "timesteps",
    "sigmas", "guidance", "resolution", "conditions", "samples_per_condition", "seed", "samples",
    "prior_count", "goc_count", "eoc_lags", "eoc_prior", "eoc_sample", "gram_sketch", "units", "flops", "sensitivity", "shards",
)
#: optional header keys, after the required ones when present (docs/calibration-format.md)
OPTIONAL_HEADER_KEYS = ("along_plan",)
#: keys of one entry of ``header["units"]``
UNIT_KEYS = ("name", "kind", "mode", "shapes", "numel", "sketch_dim", "eoc_groups")
#: groupings of the EOC prior statistics (docs/calibration-format.md, "EOC prior"): one value per channel
#: (last axis of each output part), per token (all axes but the last), or per element (opt-in, large)
EOC_PRIORS = ("channel", "token", "element")
#: how ``gram/{unit}`` was computed: from the features themselves, or from a CountSketch of them
GRAM_METHODS = ("exact", "countsketch")
#: default sketch dimension r: units with more output elements per sample are sketched to r values
DEFAULT_SKETCH_DIM = 8192
#: default most elements per group the EOC sums read (a fixed random subset of the summed axis; 0: all)
DEFAULT_EOC_SAMPLE = 256
#: per-unit tensor kinds, stored as ``{kind}/{unit name}`` (docs/calibration-format.md, "Tensors")
PER_UNIT_TENSORS = ("gram", "prior_sum", "eoc_q", "eoc_m")
#: tensors over all units, (U,) or (U, S)
GLOBAL_TENSORS = ("goc_rel_sum", "goc_cos_sum", "unit_flops", "unit_latency_s", "sensitivity")

#: a written file larger than this draws a ``UserWarning`` (bytes)
WARN_BYTES = 500 * 1000**2


class CalibrationError(ValueError):
    """A calibration file or in-memory statistics set that does not follow docs/calibration-format.md."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise CalibrationError(msg)


# ---- header -------------------------------------------------------------------------------------------
def validate_header(header: object) -> dict:
    """Check a calibration header (a decoded JSON object) against format version 2.

    Keys outside the format are tolerated here (readers ignore them); :meth:`CalibrationHeader.from_dict`
    refuses them.

    Args:
        header: the decoded JSON object of ``metadata["cachec_calibration"]``.
    Returns:
        The header (unchanged).
    Raises:
        CalibrationError: wrong format or version, a missing key, or inconsistent sizes (each message
            names the key, e.g. ``calibration header.eoc_lags: missing``).
    """
    _require(isinstance(header, dict), f"calibration header: expected a JSON object, got {type(header).__name__}")
    _require(header.get("format") == FORMAT, f"calibration header.format: expected {FORMAT!r}, got {header.get('format')!r}")
    version = header.get("format_version")
    _require(
        version == FORMAT_VERSION,
        f"calibration header.format_version: this file has format version {version!r}, this cachec reads version "
        f"{FORMAT_VERSION} only"
        + (" (version 1 stored per-element statistics that grow with tokens × channels)" if version == 1 else "")
        + ": re-run cachec calibrate to make a new file",
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
    _require(header["eoc_prior"] in EOC_PRIORS,
             f"calibration header.eoc_prior: expected one of {list(EOC_PRIORS)}, got {header['eoc_prior']!r}")
    _require(isinstance(header["eoc_sample"], int) and header["eoc_sample"] >= 0,
             "calibration header.eoc_sample: expected an int >= 0")
    gs = header["gram_sketch"]
    _require(isinstance(gs, dict) and all(k in gs for k in ("method", "dim", "seed")),
             "calibration header.gram_sketch: expected {method, dim, seed}")
    _require(gs["method"] in GRAM_METHODS, f"calibration header.gram_sketch.method: expected one of {list(GRAM_METHODS)}")
    _require(isinstance(gs["dim"], int) and gs["dim"] >= 0, "calibration header.gram_sketch.dim: expected an int >= 0")
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
        want = sketch_dim(total, gs["dim"]) if gs["method"] == "countsketch" else total
        _require(u["sketch_dim"] == want,
                 f"calibration header.units[{i}].sketch_dim: {u['sketch_dim']} != {want} (numel {total}, sketch dim {gs['dim']})")
        groups = sum(g for _, g, _ in eoc_group_layout(u["shapes"], header["eoc_prior"]))
        _require(u["eoc_groups"] == groups,
                 f"calibration header.units[{i}].eoc_groups: {u['eoc_groups']} != {groups} ({header['eoc_prior']} grouping)")
    return header


def sketch_dim(numel: int, dim: int) -> int:
    """r_u, the length of the vectors a unit's Gram is computed from: ``numel`` itself when ``dim`` is 0
    or ``numel <= dim`` (exact), else ``dim`` (CountSketch)."""
    return int(numel) if dim <= 0 or numel <= dim else int(dim)


def eoc_group_layout(shapes: Sequence[Sequence[int]], grouping: str) -> list[tuple[tuple[int, ...], int, int]]:
    """How a unit's flattened output splits into the groups of its EOC prior statistics.

    Each tuple part of per-sample shape ``sh`` (flattened in C order, parts concatenated) contributes
    ``G_part`` groups, stored consecutively: ``channel`` — one group per index of the last axis (a group
    holds ``prod(sh[:-1])`` elements, every token of that channel); ``token`` — one group per index of the
    leading axes (``sh[-1]`` elements each); ``element`` — every element its own group. A 0-d part is one
    group of one element.

    Args:
        shapes: the unit's per-sample part shapes (header ``units[i].shapes``).
        grouping: one of :data:`EOC_PRIORS`.
    Returns:
        Per part ``(broadcast_shape, G_part, group_size)``: the shape a per-group tensor of the part takes
        to broadcast over the part (``(1, …, 1, C)`` per channel, ``(*sh[:-1], 1)`` per token, ``sh`` per
        element), its number of groups, and the elements per group.
    Raises:
        CalibrationError: an unknown grouping.
    """
    _require(grouping in EOC_PRIORS, f"EOC prior grouping {grouping!r}: expected one of {list(EOC_PRIORS)}")
    out = []
    for sh in shapes:
        sh = tuple(int(x) for x in sh)
        n = int(np.prod(sh)) if sh else 1
        if not sh or grouping == "element":
            out.append((sh, n, 1))
        elif grouping == "channel":
            out.append(((1,) * (len(sh) - 1) + (sh[-1],), sh[-1], n // max(sh[-1], 1)))
        else:
            out.append((sh[:-1] + (1,), n // max(sh[-1], 1), sh[-1]))
    return out


@dataclass(frozen=True, kw_only=True)
class CalibrationHeader:
    """The JSON header of a calibration file, one field per key (meanings: docs/calibration-format.md).

    Constructing one validates it (:func:`validate_header`). Values are plain JSON types; the dict and
    list fields are stored as given (not copied), so :meth:`to_dict` reproduces the writer's JSON exactly.

    Attributes:
        format, format_version: the format's identity, :data:`FORMAT` and :data:`FORMAT_VERSION`.
        created: ISO-8601 UTC time (str, seconds, ``Z`` suffix) of the run.
        cachec_version: package version (str).
        model: ``{"class", "fingerprint", "source"}``.
        scheduler: ``{"class", "config"}``.
        steps: S (int >= 1).
        timesteps: S floats, the ``timestep`` the transformer receives at each step.
        sigmas: S floats or None.
        guidance: ``{"mode": "batched" | "split" | "none", "scale": float, "branches": B}``.
        resolution: ``[H, W]`` pixels.
        conditions: class ints or prompt strings.
        samples_per_condition, seed: sampling setup (sample n uses seed ``seed + n``).
        samples: ``[n_split0, n_split1]``.
        prior_count, goc_count: (sample, branch) outputs summed in ``prior_sum`` / ``goc_*_sum``.
        eoc_lags: K (int >= 0).
        eoc_prior: grouping of the EOC prior statistics, one of :data:`EOC_PRIORS`.
        eoc_sample: most elements per group summed into the EOC statistics (0: all; docs/calibration-format.md).
        gram_sketch: ``{"method": "exact" | "countsketch", "dim": r, "seed": int}`` (how ``gram`` was made).
        units: U dicts with :data:`UNIT_KEYS`.
        flops: ``{"full_step", "fixed_step", "counter"}``, FLOPs of one forward for one sample, one branch.
        sensitivity: ``{"method", "samples", "seconds"}`` (plus ``copied_from`` when copied).
        shards: merged shard descriptors ``"i/n"`` (``[]`` for a single run).
        along_plan: the plan a trajectory calibration followed, or None (then absent from the file).

    Raises:
        CalibrationError: on construction, as :func:`validate_header`.
    """

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str
    cachec_version: str
    model: dict
    scheduler: dict
    steps: int
    timesteps: list
    sigmas: list | None
    guidance: dict
    resolution: list
    conditions: list
    samples_per_condition: int
    seed: int
    samples: list
    prior_count: int
    goc_count: int
    eoc_lags: int
    eoc_prior: str
    eoc_sample: int
    gram_sketch: dict
    units: list
    flops: dict
    sensitivity: dict
    shards: list
    along_plan: dict | None = None

    def __post_init__(self) -> None:
        validate_header(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The header as the file stores it: :data:`HEADER_KEYS` in order, then ``along_plan`` if set."""
        out = {k: getattr(self, k) for k in HEADER_KEYS}
        for k in OPTIONAL_HEADER_KEYS:
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_dict(cls, header: object) -> "CalibrationHeader":
        """A header from its JSON object (any key order).

        Raises:
            CalibrationError: not a dict; keys missing from or foreign to the format (both lists named:
                ``calibration header keys differ from format 2: missing [...], extra [...]``); or any
                check of :func:`validate_header` (naming the key).
        """
        _require(isinstance(header, dict), f"calibration header: expected a JSON object, got {type(header).__name__}")
        missing = [k for k in HEADER_KEYS if k not in header]
        extra = [k for k in header if k not in HEADER_KEYS + OPTIONAL_HEADER_KEYS]
        _require(not missing and not extra,
                 f"calibration header keys differ from format {FORMAT_VERSION}: missing {missing}, extra {extra}")
        validate_header(header)
        return cls(**header)

    def replace(self, **changes: Any) -> "CalibrationHeader":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ---- tensors ------------------------------------------------------------------------------------------
def tensor_keys_for(unit_names: Sequence[str]) -> list[str]:
    """The tensor keys a calibration of these units holds: per-unit kinds in order, then the global ones."""
    return [f"{kind}/{n}" for kind in PER_UNIT_TENSORS for n in unit_names] + list(GLOBAL_TENSORS)


# ---- reading ------------------------------------------------------------------------------------------
def _open(path: Path):
    """``safe_open`` of a calibration file; FileNotFoundError if missing, CalibrationError if unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CalibrationError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_header(path: str | Path) -> dict:
    """The validated JSON header of a calibration file (a dict in file key order).

    Args:
        path: the ``.safetensors`` file.
    Returns:
        The header as stored (use :meth:`CalibrationHeader.from_dict` for the typed view).
    Raises:
        FileNotFoundError: no such file.
        CalibrationError: not a safetensors file, no ``cachec_calibration`` metadata, invalid JSON, or a
            header that fails :func:`validate_header` (message prefixed with the path).
    """
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise CalibrationError(f"{path}: no {METADATA_KEY!r} metadata: not a cachec calibration file")
    try:
        header = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({exc})") from exc
    try:
        return validate_header(header)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def tensor_keys(path: str | Path) -> set[str]:
    """The tensor keys stored in a calibration file.

    Raises:
        FileNotFoundError: no such file.
        CalibrationError: not a readable safetensors file.
    """
    with _open(Path(path)) as f:
        return set(f.keys())


def read_tensors(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a calibration file as numpy arrays (float64 as stored): all, or only ``keys``.

    Args:
        path: the ``.safetensors`` file.
        keys: tensor keys to read (default: every tensor, in file order).
    Returns:
        ``{key: np.ndarray}``.
    Raises:
        FileNotFoundError: no such file.
        CalibrationError: not a readable safetensors file, or a requested key is missing (named).
    """
    with _open(Path(path)) as f:
        stored = list(f.keys())
        wanted = stored if keys is None else list(keys)
        present = set(stored)
        for k in wanted:
            _require(k in present, f"calibration tensor {k}: missing")
        return {k: f.get_tensor(k) for k in wanted}


# ---- writing ------------------------------------------------------------------------------------------
def write_calibration(path: str | Path, header: CalibrationHeader | dict, tensors: dict[str, np.ndarray]) -> Path:
    """Write a calibration file atomically; warn (``UserWarning``) when it exceeds :data:`WARN_BYTES`.

    The metadata is ``{METADATA_KEY: json.dumps(header.to_dict(), allow_nan=False)}``; the tensors are
    written by ``safetensors.numpy.save_file`` into a temporary file that replaces ``path``
    (:func:`cachec.runtime.io.atomic_write`), so a reader never sees a half-written file.

    Args:
        path: destination ``.safetensors`` file.
        header: a :class:`CalibrationHeader`, or its dict (checked with :meth:`CalibrationHeader.from_dict`).
        tensors: ``{key: float64 numpy array}``, exactly the keys of :func:`tensor_keys_for` of the
            header's units (shapes are the reader's to check, docs/calibration-format.md "Tensors").
    Returns:
        ``path`` as a Path.
    Raises:
        CalibrationError: header keys differ from the format's or fail validation; a tensor is missing,
            foreign to the format, not a numpy array or not float64 (named).
        OSError: the folder is not writable (nothing is left behind).
    """
    from safetensors.numpy import save_file

    h = header if isinstance(header, CalibrationHeader) else CalibrationHeader.from_dict(header)
    expected = tensor_keys_for([u["name"] for u in h.units])
    for k in expected:
        _require(k in tensors, f"calibration tensor {k}: missing")
    known = set(expected)
    for k, v in tensors.items():
        _require(k in known, f"calibration tensor {k}: not a tensor of format {FORMAT_VERSION}")
        _require(isinstance(v, np.ndarray), f"calibration tensor {k}: expected a numpy array, got {type(v).__name__}")
        _require(v.dtype == np.float64, f"calibration tensor {k}: expected float64, got {v.dtype}")
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata = {METADATA_KEY: json.dumps(h.to_dict(), allow_nan=False)}
    path = atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))
    size = path.stat().st_size
    if size > WARN_BYTES:
        warnings.warn(
            f"calibration file {path} is {size / 1e6:.0f} MB (> 500 MB): the EOC prior statistics grow with "
            "units × steps × groups (eoc_prior='element' stores every feature element; 'token' is the compact default)",
            stacklevel=2,
        )
    return path
