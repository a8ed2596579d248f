"""Conditions for a calibration run: class-label ranges, prompt files, and the global sample order.

A calibration samples ``samples_per_condition`` images per condition. Sample ``n`` (the *global sample
index*, condition-major) uses condition ``conditions[n // samples_per_condition]`` and seed ``seed + n``;
it belongs to split ``n % 2`` (docs/calibration-format.md). Batches are fixed slices of this order
(``batch b`` = samples ``[b·batch_size, (b+1)·batch_size)``), so shards, distributed ranks and resumed
runs all see exactly the same batches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

__all__ = ["parse_classes", "read_prompts", "sample_plan", "batch_samples", "num_batches"]

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def parse_classes(text: str, num_classes: int | None = None) -> list[int]:
    """Parse a class-label list such as ``"0-9,12"`` (ranges inclusive, order kept, duplicates kept).

    Args:
        text: comma-separated integers and inclusive ranges ``a-b`` (``a <= b``).
        num_classes: when given, every label must lie in ``[0, num_classes)``.

    Returns:
        The labels as a list of ints, in the order written.

    Raises:
        ValueError: empty text, a token that is not an int or a range, a reversed range, a negative label,
            or a label out of range (the message names the offending token).
    """
    if text is None or not str(text).strip():
        raise ValueError("no class labels given: expected e.g. '0-9' or '1,3,5'")
    labels: list[int] = []
    for token in str(text).split(","):
        if not token.strip():
            raise ValueError(f"empty item in class list {text!r}")
        m = _RANGE.match(token)
        if m is None:
            raise ValueError(f"cannot parse class item {token.strip()!r}: expected an int or a range like 0-9")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo < 0 or hi < 0:
            raise ValueError(f"class labels must be >= 0, got {token.strip()!r}")
        if hi < lo:
            raise ValueError(f"reversed class range {token.strip()!r}: write {hi}-{lo}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"class label {hi} is out of range: the model has classes 0..{num_classes - 1}")
        labels.extend(range(lo, hi + 1))
    return labels


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a UTF-8 text file, one per line (surrounding whitespace stripped, blank lines
    skipped).

    Args:
        path: the file.

    Returns:
        The prompts, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8, or it holds no prompt (empty or only blank lines).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(p)!r} holds no prompt (it is empty or blank)")
    return prompts


def sample_plan(conditions: Sequence, samples_per_condition: int, seed: int) -> tuple[list, list[int]]:
    """The global sample order.

    Returns:
        ``(sample_conditions, sample_seeds)``: for n = 0..N−1 (N = len(conditions) × samples_per_condition),
        ``conditions[n // samples_per_condition]`` and ``seed + n``.
    """
    conds = [c for c in conditions for _ in range(samples_per_condition)]
    return conds, [int(seed) + n for n in range(len(conds))]


def num_batches(n_samples: int, batch_size: int) -> int:
    """Number of batches of ``batch_size`` samples covering ``n_samples`` (the last may be short)."""
    return (n_samples + batch_size - 1) // batch_size


def batch_samples(batch: int, n_samples: int, batch_size: int) -> range:
    """Global sample indices of batch ``batch``."""
    return range(batch * batch_size, min((batch + 1) * batch_size, n_samples))
