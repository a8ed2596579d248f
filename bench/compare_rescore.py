"""Everything of a peer-benchmark result (``bench/compare.py``) that is derived from its raw points, in one
place: the headline margins and the iso-quality table (:mod:`bench.compare_report`), the adaptive rows
(:mod:`bench.compare_adaptive`) and the control-fidelity rows (:mod:`bench.compare_control`).

:func:`derive` recomputes them for one configuration (a fresh run, ``--add`` and a re-score all call it, so
no derived table can go stale beside the points it comes from); :func:`write_results` writes the JSON, its
``.md`` and its ``.png``. ``python bench/compare_rescore.py [docs/benchmarks.json]`` re-scores a stored result
by the current rules without re-running anything.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare_adaptive import adaptive_comparison  # noqa: E402
from bench.compare_control import control_summary  # noqa: E402
from bench.compare_markdown import write_markdown, write_plot  # noqa: E402
from bench.compare_report import fmt, headline, iso_quality  # noqa: E402


def derive(cfg_res: dict) -> dict:
    """Set ``headline``, ``iso_quality`` and, where the configuration has what they need, ``adaptive`` (an
    ``adaptive_confirmation``) and ``control`` (points with a control IoU) of one configuration result from
    its points; returns ``cfg_res``. A derived table whose input is gone is removed."""
    cfg_res["headline"] = headline(cfg_res)
    cfg_res["iso_quality"] = iso_quality(cfg_res)
    for key, value in (("adaptive", adaptive_comparison(cfg_res) if cfg_res.get("adaptive_confirmation") else None),
                       ("control", control_summary(cfg_res))):
        if value:
            cfg_res[key] = value
        else:
            cfg_res.pop(key, None)
    return cfg_res


def write_results(results: dict, path: Path) -> None:
    """The result as JSON at ``path`` and its ``.md`` and ``.png`` beside it.

    Raises:
        OSError: a file cannot be written. ValueError: a NaN in ``results`` (the JSON convention writes +∞
        as the string ``"inf"``).
    """
    path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    png = path.with_suffix(".png")
    write_plot(results, png)
    write_markdown(results, path.with_suffix(".md"), path.name, png.name)


def summary_lines(results: dict) -> list[str]:
    """One line per headline margin and per adaptive row, for the console."""
    out = []
    for cfg in results["configs"]:
        for b, h in cfg["headline"].items():
            m = h.get("margin_db")
            out.append(f"{cfg['name']} @ {float(b):.0%}: cachec {fmt(h['cachec_psnr'])} dB vs {h['best_peer'] or '–'} "
                       f"{fmt(h['best_peer_psnr'])} dB: " + ("–" if m is None else
                       f"{m:+.2f} [{h['margin_ci_low']:+.2f}, {h['margin_ci_high']:+.2f}] {h['verdict']}"))
        for key, row in (cfg.get("adaptive") or {}).items():
            st = row.get("static_matched") or {}
            out.append(f"{cfg['name']} SoftCap @ {float(key):.0%}: {row['flops']:.1%} FLOPs, {fmt(row['psnr'])} dB; "
                       f"vs static at its FLOPs {fmt(st.get('margin_db'), '+.2f')} dB ({st.get('verdict', '–')})")
    return out


def main(argv=None) -> int:
    """``python bench/compare_rescore.py [docs/benchmarks.json]``: :func:`derive` every configuration of a
    stored result (nothing re-run), record the re-score and rewrite the JSON, ``.md`` and ``.png``."""
    args = sys.argv[1:] if argv is None else list(argv)
    path = Path(args[0] if args else "docs/benchmarks.json")
    results = json.loads(path.read_text(encoding="utf-8"))
    for cfg in results["configs"]:
        derive(cfg)
    results["rescored"] = {"by": "python bench/compare_rescore.py",
                           "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rule": "frontier"}
    write_results(results, path)
    print("\n".join(summary_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
