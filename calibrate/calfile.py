"""Calibration files as a whole: ``show`` (a human-readable summary) and ``merge`` (exact shard merge).

The format itself — identity, header, reading, atomic writing, :class:`CalibrationError` — is defined in
:mod:`cachec.calibrate.format`; this module builds on it (``merge`` adds the sums with torch).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Sequence

from .format import (
    HEADER_KEYS, OPTIONAL_HEADER_KEYS, CalibrationError, CalibrationHeader, read_header, read_tensors,
    write_calibration,
)


# ---------------------------------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.3g}"


def show(path: str | Path) -> str:
    """A human-readable summary of a calibration file (header facts, costs, per-unit table).

    Args:
        path: the calibration file.
    Returns:
        Several lines of text (no trailing newline): file, model, sampler, guidance, samples, FLOPs,
        sensitivity, then one row per unit (kind, numel, MFLOP per call, latency in ms, mean relative
        one-step change, mean cosine of consecutive changes, mean sensitivity).
    Raises:
        FileNotFoundError, CalibrationError: see :func:`cachec.calibrate.format.read_header`.
    """
    h = read_header(path)
    names = [u["name"] for u in h["units"]]
    t = read_tensors(path, ["unit_flops", "unit_latency_s", "sensitivity", "goc_rel_sum", "goc_cos_sum"])
    S = h["steps"]
    g = h["guidance"]
    size = Path(path).stat().st_size
    n0, n1 = h["samples"]
    fl = h["flops"]
    unit_total = float(t["unit_flops"].sum())
    lines = [
        f"{path}  ({size / 1e6:.1f} MB, format {h['format_version']}, cachec {h['cachec_version']}, created {h['created']})",
        f"model       {h['model']['class']} {h['model']['source']}  {h['model']['fingerprint'][:19]}…",
        f"sampler     {h['scheduler']['class']}, {S} steps, timesteps {_fmt(h['timesteps'][0])} … {_fmt(h['timesteps'][-1])}, "
        f"resolution {h['resolution'][0]}×{h['resolution'][1]}",
        f"guidance    {g['mode']}, scale {g['scale']}, {g['branches']} branch(es)",
        f"samples     {n0 + n1} ({n0} fit + {n1} held-out) from {len(h['conditions'])} conditions × "
        f"{h['samples_per_condition']}, seed {h['seed']}" + (f", shards {', '.join(h['shards'])}" if h["shards"] else ""),
        f"flops       {_fmt(fl['full_step'])} per step and branch-sample; units {100 * unit_total / fl['full_step']:.1f}%, "
        f"fixed {100 * fl['fixed_step'] / fl['full_step']:.1f}%  ({fl['counter']})",
        f"sensitivity {h['sensitivity']['method']}, {h['sensitivity']['samples']} samples, {h['sensitivity']['seconds']:.1f} s; "
        f"range {_fmt(float(t['sensitivity'].min()))} … {_fmt(float(t['sensitivity'].max()))}",
        f"eoc lags    {h['eoc_lags']}, prior per {h['eoc_prior']}; gram {h['gram_sketch']['method']}"
        + (f" (sketch dim {h['gram_sketch']['dim']})" if h["gram_sketch"]["method"] == "countsketch" else "")
        + f"; {len(names)} units",
        "",
        f"{'unit':<40} {'kind':<10} {'numel':>8} {'MFLOP':>9} {'latency ms':>10} {'rel Δ/step':>10} {'cos':>6} {'sens':>9}",
    ]
    count = max(int(h["goc_count"]), 1)
    for i, u in enumerate(h["units"]):
        rel = t["goc_rel_sum"][i, 1:].mean() / count if S > 1 else 0.0
        cos = t["goc_cos_sum"][i, 2:].mean() / count if S > 2 else 0.0
        lines.append(
            f"{u['name']:<40} {u['kind']:<10} {u['numel']:>8} {t['unit_flops'][i] / 1e6:>9.3f} "
            f"{1e3 * t['unit_latency_s'][i]:>10.3f} {rel:>10.4f} {cos:>6.2f} {_fmt(float(t['sensitivity'][i].mean())):>9}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
#: header entries that must agree for files to be merged
_MUST_MATCH = (
    ("model class", lambda h: h["model"]["class"]),
    ("model fingerprint", lambda h: h["model"]["fingerprint"]),
    ("scheduler", lambda h: h["scheduler"]["class"]),
    ("steps", lambda h: h["steps"]),
    ("timesteps", lambda h: h["timesteps"]),
    ("sigmas", lambda h: h["sigmas"]),
    ("guidance", lambda h: h["guidance"]),
    ("resolution", lambda h: h["resolution"]),
    ("units", lambda h: h["units"]),
    ("conditions", lambda h: h["conditions"]),
    ("samples_per_condition", lambda h: h["samples_per_condition"]),
    ("seed", lambda h: h["seed"]),
    ("eoc_lags", lambda h: h["eoc_lags"]),
    ("eoc_prior", lambda h: h["eoc_prior"]),
    ("eoc_sample", lambda h: h["eoc_sample"]),
    ("gram sketch", lambda h: h["gram_sketch"]),
    ("sensitivity method", lambda h: h["sensitivity"]["method"]),
    ("plan followed (along_plan)", lambda h: h.get("along_plan")),
)


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _describe_difference(name: str, a, b) -> str:
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{name} differ ({len(a)} vs {len(b)} entries)"
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return f"{name} differ at index {i} ({_short(a[i])} vs {_short(b[i])})"
    return f"{name} differ ({_short(a)} vs {_short(b)})"


def _parse_shard(desc: str) -> tuple[int, int]:
    i, n = desc.split("/")
    return int(i), int(n)


def check_mergeable(headers: list[dict], paths: list[str]) -> None:
    """Check that calibration headers can be merged.

    Args:
        headers: the files' headers (dicts, as :func:`read_header` returns them).
        paths: the files, for the messages (same order).
    Raises:
        CalibrationError: the first difference that forbids a merge (named), an unsharded file, a shard
            present twice, or shards of different partitions.
    """
    ref = headers[0]
    for h, p in zip(headers[1:], paths[1:]):
        for name, get in _MUST_MATCH:
            if get(h) != get(ref):
                raise CalibrationError(
                    f"cannot merge {paths[0]} and {p}: {_describe_difference(name, get(ref), get(h))}"
                )
        if not math.isclose(h["flops"]["full_step"], ref["flops"]["full_step"], rel_tol=1e-9):
            raise CalibrationError(f"cannot merge {paths[0]} and {p}: FLOPs per step differ")
    seen: dict[str, str] = {}
    parts = set()
    for h, p in zip(headers, paths):
        if not h["shards"]:
            raise CalibrationError(
                f"cannot merge {p}: it is a complete (unsharded) calibration, merging it would count samples twice"
            )
        for d in h["shards"]:
            if d in seen:
                raise CalibrationError(f"cannot merge: shard {d} is in both {seen[d]} and {p}")
            seen[d] = p
            parts.add(_parse_shard(d)[1])
    if len(parts) != 1:
        raise CalibrationError(f"cannot merge shards of different partitions ({', '.join(sorted(seen))})")


def merge(paths: Sequence[str | Path], output: str | Path) -> Path:
    """Merge shard calibration files into one by exact addition of the sums.

    Sums (``gram``, ``prior_sum``, ``eoc_q``, ``eoc_m``, ``goc_*``, sample counts) are added; ``unit_flops``
    must agree and is kept; ``unit_latency_s`` is the mean over the files; ``sensitivity`` is the average
    weighted by each file's sensitivity sample count (ones where no file measured it); ``created`` is the
    latest; ``shards`` lists every merged shard.

    Args:
        paths: two or more calibration files, shards of one partition (``i/n``) of the same calibration.
        output: the merged file (its folder must exist).

    Returns:
        ``output`` as a Path.

    Raises:
        ValueError: fewer than two paths.
        FileNotFoundError: an input or the output folder is missing.
        CalibrationError (a ValueError): an input is not a calibration file, the files differ (model fingerprint,
            steps, timesteps, guidance, units, conditions, …: the message names the difference), a shard is
            repeated, or a complete set of shards does not add up to all samples.
    """
    from safetensors import safe_open

    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ValueError("merge needs at least two calibration files")
    out = Path(output)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(out.parent)!r} does not exist")
    headers = [read_header(p) for p in paths]
    check_mergeable(headers, paths)
    ref = headers[0]
    shards = sorted({d for h in headers for d in h["shards"]}, key=_parse_shard)
    n_parts = _parse_shard(shards[0])[1]
    samples = [sum(h["samples"][k] for h in headers) for k in (0, 1)]
    total = len(ref["conditions"]) * ref["samples_per_condition"]
    if len(shards) == n_parts and sum(samples) != total:
        raise CalibrationError(
            f"the {n_parts} shards hold {sum(samples)} samples but the calibration has {total}: "
            "they were made with different batch sizes or overlap"
        )
    if sum(samples) > total:
        raise CalibrationError(f"the shards hold {sum(samples)} samples, more than the {total} of the calibration")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(p, framework="pt")) for p in paths]
        tensors = _merge_tensors(paths, handles, [float(h["sensitivity"]["samples"]) for h in headers])
    sens_w = [float(h["sensitivity"]["samples"]) for h in headers]
    header = dict(ref)
    header["created"] = max(h["created"] for h in headers)
    header["samples"] = samples
    header["prior_count"] = sum(int(h["prior_count"]) for h in headers)
    header["goc_count"] = sum(int(h["goc_count"]) for h in headers)
    header["sensitivity"] = {
        "method": ref["sensitivity"]["method"],
        "samples": int(sum(sens_w)),
        "seconds": float(sum(h["sensitivity"]["seconds"] for h in headers)),
    }
    header["shards"] = shards
    header = CalibrationHeader.from_dict({k: header[k] for k in HEADER_KEYS + OPTIONAL_HEADER_KEYS if k in header})
    return write_calibration(out, header, {k: v.numpy() for k, v in tensors.items()})


def _merge_tensors(paths: list[str], handles: list, sens_w: list[float]) -> dict:
    """Merge the tensors of open safetensors handles one key at a time (see :func:`merge`)."""
    import torch

    keys = list(handles[0].keys())
    for p, f in zip(paths[1:], handles[1:]):
        if set(f.keys()) != set(keys):
            raise CalibrationError(f"cannot merge {paths[0]} and {p}: they hold different tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key in keys:
        arrays = [f.get_tensor(key) for f in handles]
        if key == "unit_flops":
            for p, a in zip(paths[1:], arrays[1:]):
                if not torch.allclose(a, arrays[0], rtol=1e-9, atol=0):
                    raise CalibrationError(f"cannot merge {paths[0]} and {p}: unit FLOPs differ")
            tensors[key] = arrays[0]
        elif key == "unit_latency_s":
            tensors[key] = torch.stack(arrays).mean(0)
        elif key == "sensitivity":
            if sum(sens_w) > 0:
                tensors[key] = sum(w * a for w, a in zip(sens_w, arrays)) / sum(sens_w)
            else:
                tensors[key] = torch.ones_like(arrays[0])
        else:
            acc = arrays[0].clone()
            for a in arrays[1:]:
                acc += a
            tensors[key] = acc
        del arrays
    return tensors
