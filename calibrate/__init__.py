"""Stage 1: uncached sampling that records the statistics the planner needs.

Public API:

- :func:`calibrate` — run the calibration of a :class:`cachec.loading.Driver` and write the statistics file
  (docs/calibration-format.md; method notes in docs/calibration.md);
- :func:`show` — a human-readable summary of a calibration file;
- :func:`merge` — exact merge of shard files;
- :func:`parse_classes`, :func:`read_prompts`, :func:`parse_shard` — input helpers for the CLI.
"""

from .calfile import CalibrationFileError, merge, read_header, show
from .conditions import parse_classes, read_prompts
from .run import calibrate, parse_shard, partial_paths

__all__ = [
    "calibrate", "show", "merge", "read_header", "parse_classes", "read_prompts", "parse_shard", "partial_paths",
    "CalibrationFileError",
]
