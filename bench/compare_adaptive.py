"""The adaptive line of the peer benchmark (issue 15): cachec's SoftCap mode against the static plan solved at
exactly its realised FLOPs, cachec's shipped procedure at the ceiling and the best peer by the frontier rule,
with paired 95 % bootstrap intervals over the confirmation images (docs/softcap.md, docs/benchmarks.md).

Input: a configuration's result (``bench/compare.py``) with an ``adaptive_confirmation``
(:func:`bench.compare_sweeps.confirm_adaptive`) and, for the cachec/peer pairs, the headline's
``confirmation`` on the same images.
"""

from __future__ import annotations

from bench.compare_report import FRONTIER_SLACK, confirmed, fmt, headline_pairs, paired_margin


def _verdict(lo, hi) -> str:
    return "tie" if lo is None else "ahead" if lo > 0 else "behind" if hi < 0 else "tie"


def _pair(mine: dict, theirs: dict | None) -> dict | None:
    if not theirs or len(theirs.get("psnr_db_per_image") or []) != len(mine["psnr_db_per_image"]):
        return None
    m, lo, hi = paired_margin(mine, theirs)
    return {"psnr": theirs["psnr_db"], "flops": theirs["flops_fraction"], "label": theirs["label"],
            "margin_db": m, "margin_ci_low": lo, "margin_ci_high": hi, "verdict": _verdict(lo, hi)}


def adaptive_comparison(cfg_res: dict) -> dict:
    """``{ceiling key: row}`` for every adaptive point of ``cfg_res["adaptive_confirmation"]``.

    A row: ``ceiling``, ``flops`` (realised fraction over the confirmation images, counted), ``run_flops_max``
    (the largest fraction of any single sampling run), ``over_ceiling_points`` (``100·(run max − ceiling)``,
    ≤ 0 means never above), ``full_steps_mean``, ``psnr``, and per comparison (``static_matched``,
    ``cachec_at_ceiling``, ``best_peer``) the other point's PSNR, FLOPs, label and the paired margin
    adaptive − other with its interval and verdict (``ahead``/``behind`` when the interval excludes 0, else
    ``tie``). ``cachec_at_ceiling``/``best_peer`` are the headline's pair at the table budget equal to the
    ceiling (frontier rule), taken from its confirmation on the same images; None where absent.
    """
    conf = cfg_res.get("adaptive_confirmation") or {}
    pts = [r for r in conf.get("points", []) if "error" not in r and r.get("psnr_db_per_image")]
    pairs = headline_pairs(cfg_res)
    out = {}
    for r in pts:
        if "matches" in r:
            continue
        info = r.get("info") or {}
        c = float(info.get("ceiling", r["param"]))
        row = {"method": r["method"], "label": r["label"], "ceiling": c, "images": len(r["psnr_db_per_image"]),
               "flops": r["flops_fraction"], "run_flops_max": info.get("run_flops_fraction_max"),
               "full_steps_mean": info.get("full_steps_mean"), "psnr": r["psnr_db"],
               "base_realised": info.get("base_realised")}
        if row["run_flops_max"] is not None:
            row["over_ceiling_points"] = 100 * (row["run_flops_max"] - c)
        static = next((s for s in pts if s.get("matches") == r["label"] and s["method"] != r["method"]), None)
        row["static_matched"] = _pair(r, static)
        mine, best = pairs.get(f"{c:.2f}", (None, None))
        row["cachec_at_ceiling"] = _pair(r, confirmed(cfg_res, "cachec", mine["label"])) if mine else None
        if best:
            row["best_peer"] = _pair(r, confirmed(cfg_res, best[0], best[1]["label"]))
            if row["best_peer"]:
                row["best_peer"]["method"] = best[0]
        else:
            row["best_peer"] = None
        out[f"{c:.2f}"] = row
    return out

