"""File mechanics every stage shares: atomic writes, file hashes, plain-JSON conversion.

The lowest layer that writes files is the runtime (plans and their sidecars), so the one implementation of
each mechanism lives here; calibrate/, planner/ and the cachec front end import it. Imports neither torch
nor scipy (the planner uses it on machines without torch); numpy and torch values are recognised by duck
typing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

#: chunk size of :func:`file_sha256` (bytes)
HASH_CHUNK = 1 << 24


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[Path], Any]) -> Path:
    """Write a file so that readers see the old file or the complete new one, never a partial one.

    The content goes to a temporary file in the destination folder (created if missing), is flushed to
    disk, and replaces ``path`` with ``os.replace``; on any error the temporary file is removed and
    ``path`` is left as it was.

    Args:
        path: destination.
        data: the bytes to write, or ``write(tmp_path)``: a function that writes the whole file at
            ``tmp_path`` (for writers that take a path: ``safetensors.save_file``, ``plt.imsave``); the
            temporary name keeps the destination's suffix so such writers pick the right format.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=str(path.parent))
    try:
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in ``HASH_CHUNK`` chunks).

    Raises:
        FileNotFoundError: no such file.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """A (nested) value as plain JSON types, for reports, headers and config hashes.

    dict keys → str; tuples/lists → lists; tensors and arrays → (nested) lists; numpy/torch scalars →
    Python numbers; bools stay bools; NaN → ``None``; ±inf → ``"inf"``/``"-inf"``; dataclass instances →
    dicts; ``Path`` and any other object → ``str(obj)``. The result always passes
    ``json.dumps(..., allow_nan=False)``.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return to_jsonable(tolist())
    return str(obj)
