"""Stage 1: uncached sampling that records the statistics the planner needs.

Owns the calibration file format (:mod:`.format`, torch-free: the planner reads files through it).
Names are imported lazily (module ``__getattr__``) so that ``import cachec.calibrate.format`` does not
import torch; the sampling entry points import torch when first used.

Public API:

- :func:`calibrate` — run the calibration of a :class:`cachec.loading.Driver` and write the statistics file
  (docs/calibration-format.md; method notes in docs/calibration.md);
- :func:`show` — a human-readable summary of a calibration file;
- :func:`merge` — exact merge of shard files;
- :func:`read_header`, :func:`read_tensors`, :func:`write_calibration`, :class:`CalibrationHeader`,
  :class:`CalibrationError` — the file format;
- :func:`parse_classes`, :func:`read_prompts`, :func:`parse_shard` — input helpers for the CLI.
"""

from __future__ import annotations

from cachec.runtime.lazy import lazy_exports

# name -> submodule that defines it
_EXPORTS = {
    "calibrate": "run",
    "CalibrationJob": "job",
    "parse_shard": "job",
    "partial_paths": "checkpoint",
    "show": "calfile",
    "merge": "calfile",
    "read_header": "format",
    "read_tensors": "format",
    "write_calibration": "format",
    "CalibrationHeader": "format",
    "CalibrationError": "format",
    "parse_classes": "conditions",
    "read_prompts": "conditions",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
