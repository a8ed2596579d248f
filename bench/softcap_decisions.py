"""Where SoftCap's Full steps fell: per adaptive point of benchmark results, how many sampling runs decided a
Full step at each step, and the share of all Full steps in the last quarter of the steps (docs/softcap.md).

Reads the ``decisions`` strings (one per sampling run, one character per step, ``F`` = Full step) that
``bench/compare.py`` stores in each ``cachec SoftCap`` point's ``info`` of the adaptive confirmation.

Usage::

    python bench/softcap_decisions.py docs/benchmarks.json docs/benchmarks-mmdit.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="benchmarks JSON files")
    args = ap.parse_args(argv)
    full = late = 0
    for path in args.files:
        with open(path, encoding="utf-8") as fh:
            results = json.load(fh)
        for cfg in results["configs"]:
            steps = int(cfg["steps"])
            for point in (cfg.get("adaptive_confirmation") or {}).get("points", []):
                decisions = (point.get("info") or {}).get("decisions")
                if not decisions:
                    continue
                at = Counter(s for run in decisions for s, c in enumerate(run) if c == "F")
                full += sum(at.values())
                late += sum(n for s, n in at.items() if s >= 0.75 * steps)
                print(f"{cfg['name']}, {point['label']}: {len(decisions)} runs; Full steps at "
                      + (", ".join(f"step {s}: {n}" for s, n in sorted(at.items())) or "none"))
    if full:
        print(f"{late} of {full} Full steps ({late / full:.0%}) in the last quarter of the steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
