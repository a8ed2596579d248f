"""The adaptive line of the peer benchmark (issue 15): cachec's SoftCap mode against the static plan solved at
exactly its realised FLOPs, cachec's shipped procedure at the ceiling and the best peer by the frontier rule,
with paired 95 % bootstrap intervals over the confirmation images (docs/softcap.md, docs/benchmarks.md).

Input: a configuration's result (``bench/compare.py``) with an ``adaptive_confirmation``
(:func:`bench.compare_configs.confirm_adaptive`) and, for the cachec/peer pairs, the headline's
``confirmation`` on the same images.
"""

from __future__ import annotations

from bench.compare_report import FRONTIER_SLACK, _num, confirmed, frontier_point, headline_pairs, paired_margin, verdict

#: the peers the issue names, each the best of its lines (method-name prefixes) by the frontier rule
PEER_FAMILIES = {"FBCache": ("FirstBlockCache",), "MagCache": ("MagCache",), "SeaCache": ("SeaCache",),
                 "TaylorSeer": ("TaylorSeerCache",), "DBCache": ("cache-dit DBCache",)}


def _pair(mine: dict, theirs: dict | None) -> dict | None:
    if not theirs or len(theirs.get("psnr_db_per_image") or []) != len(mine["psnr_db_per_image"]):
        return None
    m, lo, hi = paired_margin(mine, theirs)
    return {"psnr": theirs["psnr_db"], "flops": theirs["flops_fraction"], "label": theirs["label"],
            "margin_db": m, "margin_ci_low": lo, "margin_ci_high": hi, "verdict": verdict(lo, hi)}


def peer_families(cfg_res: dict, point: dict) -> dict:
    """``{family: pair}`` for each of :data:`PEER_FAMILIES` on the sweep's images: the family's best line point
    at ≤ the adaptive sweep ``point``'s realised FLOPs + slack (frontier rule), paired with ``point``; families
    without a point there are left out."""
    out = {}
    for fam, prefixes in PEER_FAMILIES.items():
        best = None
        for e in cfg_res["methods"]:
            if e["group"] == "cachec" or not e["method"].startswith(prefixes):
                continue
            r = frontier_point(e, point["flops_fraction"])
            if r is not None and (best is None or _num(r["psnr_db"]) > _num(best[1]["psnr_db"])):
                best = (e["method"], r)
        if best:
            pair = _pair(point, best[1])
            if pair:
                out[fam] = dict(pair, method=best[0])
    return out


def adaptive_comparison(cfg_res: dict) -> dict:
    """``{ceiling key: row}`` for every adaptive point of ``cfg_res["adaptive_confirmation"]``.

    A row: ``ceiling``, ``flops`` (realised fraction over the confirmation images, counted), ``run_flops_max``
    (the largest fraction of any single sampling call: counted, ``call_flops_fraction_max`` of
    :func:`bench.compare_sweeps.run_point`; results stored before it was recorded give the runtime report's
    own accounting), ``over_ceiling_points`` (``100·(run max − ceiling)``,
    ≤ 0 means never above), ``full_steps_mean``, ``psnr``, and per comparison (``static_matched``,
    ``cachec_at_ceiling``, ``best_peer``) the other point's PSNR, FLOPs, label and the paired margin
    adaptive − other with its interval and verdict (``ahead``/``behind`` when the interval excludes 0, else
    ``tie``). ``cachec_at_ceiling``/``best_peer`` are the headline's pair at the table budget equal to the
    ceiling (frontier rule), taken from its confirmation on the same images; None where absent. ``sweep``: the
    adaptive point on the sweep's images with ``peers`` (:func:`peer_families`: each named peer at ≤ its FLOPs).
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
               "flops": r["flops_fraction"],
               # counted per sampling call where the run recorded it, else the runtime report's accounting
               "run_flops_max": r.get("call_flops_fraction_max", info.get("run_flops_fraction_max")),
               "full_steps_mean": info.get("full_steps_mean"), "psnr": r["psnr_db"],
               "base_realised": info.get("base_realised")}
        if row["run_flops_max"] is not None:
            row["over_ceiling_points"] = 100 * (row["run_flops_max"] - c)
        static = next((s for s in pts if s.get("matches") == r["label"] and s["method"] != r["method"]), None)
        row["static_matched"] = _pair(r, static)
        mine, best = pairs.get(f"{c:.2f}", (None, None))
        sweep = next((p for e in cfg_res["methods"] if e["method"] == r["method"] for p in e["points"]
                      if p.get("label") == r["label"] and "error" not in p and p.get("psnr_db_per_image")), None)

        def against(name: str, point: dict) -> dict | None:
            """The pair on the confirmation images; on the sweep's images when the re-measured point moved above
            the ceiling + slack (an adaptive peer on the new images, as the headline's ``confirmation_rejected``)."""
            again = confirmed(cfg_res, name, point["label"])
            if again is not None and again["flops_fraction"] <= c + FRONTIER_SLACK:
                return _pair(r, again)
            if sweep is None:
                return None
            pair = _pair(sweep, point)
            if pair is not None:
                pair["images"] = len(sweep["psnr_db_per_image"])
                if again is not None:
                    pair["note"] = f"re-measured at {again['flops_fraction']:.1%} FLOPs (over the ceiling): sweep images"
            return pair

        row["cachec_at_ceiling"] = against("cachec", mine) if mine else None
        row["best_peer"] = against(best[0], best[1]) if best else None
        if row["best_peer"]:
            row["best_peer"]["method"] = best[0]
        if sweep is not None:
            row["sweep"] = {"images": len(sweep["psnr_db_per_image"]), "flops": sweep["flops_fraction"],
                            "psnr": sweep["psnr_db"], "peers": peer_families(cfg_res, sweep)}
        out[f"{c:.2f}"] = row
    return out
