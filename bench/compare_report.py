"""Tables, plot and margins of the peer benchmark (``bench/compare.py``), computed from its result dicts.

Nothing here runs a model: every function reads the plain-JSON results that :mod:`bench.compare_sweeps`
produces (``configs[*].methods[*].points[*]``, see :func:`bench.compare_sweeps.run_point`) and that
``benchmarks.json`` stores. A method's value at a FLOPs budget comes only from measured points
(:func:`at_budget`); :func:`headline` gives cachec's margin over the best peer;
:mod:`bench.compare_markdown` writes ``benchmarks.md`` and ``benchmarks.png`` from them and
:mod:`bench.compare_rescore` recomputes every derived table of a stored result.

FLOPs fractions are realised FLOPs ÷ uncached FLOPs of the same call (0..1); PSNR is in dB, where the
string ``"inf"`` stands for +∞ (identical images), as the results' JSON convention writes it.
"""

from __future__ import annotations

import math

#: FLOPs budgets (fractions of uncached) of the tables and of the headline margins
TABLE_BUDGETS = (0.25, 0.40, 0.60)
EXACT_TOL = 0.005  # a point within 0.5 % FLOPs of a budget is "at" it
CHECK_SIZE = 2  # samples on which the fast FLOP counter is checked against cachec.runtime.flops.count_flops
BELOW_TOL = 0.10  # without a bracket, a point at most this far below a budget is shown (marked)


# ------------------------------------------------------------------------------------- analysis


def _ok_points(entry: dict) -> list[dict]:
    return sorted((r for r in entry["points"] if "error" not in r and r.get("psnr_db") is not None),
                  key=lambda r: r["flops_fraction"])


def _num(v) -> float:
    if isinstance(v, str):
        return math.inf if v == "inf" else -math.inf
    return float(v)


def at_budget(entry: dict, b: float) -> dict:
    """Quality of a method at FLOPs budget ``b``, only from measured points.

    Returns ``{"psnr", "frechet", "how", "note"}``: ``how`` is ``exact`` (a point within 0.5 %),
    ``interp`` (linear between the two measured points that bracket ``b``), ``below`` (no bracket: the
    nearest point under the budget, at most 10 % below), or ``none`` (``note`` says why).
    """
    pts = [r for r in _ok_points(entry) if not entry.get("diagnostic")]
    if not pts:
        return {"psnr": None, "frechet": None, "how": "none", "note": "no measured point"}
    near = [r for r in pts if abs(r["flops_fraction"] - b) <= EXACT_TOL]
    if near:
        r = min(near, key=lambda r: abs(r["flops_fraction"] - b))
        return {"psnr": _num(r["psnr_db"]), "frechet": r["frechet"], "how": "exact",
                "note": f"{r['label']} at {r['flops_fraction']:.1%}"}
    lo = [r for r in pts if r["flops_fraction"] < b]
    hi = [r for r in pts if r["flops_fraction"] > b]
    if lo and hi:
        a, c = lo[-1], hi[0]
        pa, pc = _num(a["psnr_db"]), _num(c["psnr_db"])
        if math.isfinite(pa) and math.isfinite(pc) and a["frechet"] is not None and c["frechet"] is not None:
            w = (b - a["flops_fraction"]) / (c["flops_fraction"] - a["flops_fraction"])
            return {"psnr": pa + w * (pc - pa), "frechet": a["frechet"] + w * (c["frechet"] - a["frechet"]),
                    "how": "interp", "note": f"between {a['flops_fraction']:.1%} and {c['flops_fraction']:.1%}"}
    if lo and b - lo[-1]["flops_fraction"] <= BELOW_TOL:
        r = lo[-1]
        return {"psnr": _num(r["psnr_db"]), "frechet": r["frechet"], "how": "below",
                "note": f"nearest point below: {r['label']} at {r['flops_fraction']:.1%}"}
    if not lo:
        return {"psnr": None, "frechet": None, "how": "none",
                "note": f"not reached: lowest realised FLOPs {pts[0]['flops_fraction']:.1%}"}
    at = ", ".join(format(r["flops_fraction"], ".0%") for r in pts)
    return {"psnr": None, "frechet": None, "how": "none", "note": f"no point within {BELOW_TOL:.0%} below; points at {at}"}


def status_of(entry: dict) -> str:
    """One-line status: error, silent no-op, failed points."""
    if entry.get("error"):
        return f"did not run: {entry['error']}"
    pts = entry["points"]
    errs = [r for r in pts if "error" in r]
    ok = [r for r in pts if "error" not in r]
    parts = []
    if not ok and errs:
        return f"every point failed: {errs[0]['error']}"
    if ok and all(r["flops_fraction"] >= 0.999 for r in ok):
        parts.append("never skips (realised FLOPs 100%): silent no-op")
    if errs:
        parts.append(f"{len(errs)} point(s) failed: {errs[0]['error']}")
    if entry.get("leftovers"):
        parts.append(f"left state behind: {entry['leftovers'][0]}")
    return "; ".join(parts)


#: frontier rule: a method's quality at budget B is its best real point at ≤ B + this (0.5 point of FLOPs)
FRONTIER_SLACK = 0.005
#: a per-image PSNR of +∞ (bit-identical images) enters paired differences as this many dB (the cap of cachec's
#: closed-loop scores, :data:`cachec.evaluation.PSNR_CAP_DB`; kept equal by tests/test_bench_peers.py)
PSNR_CAP = 100.0


def frontier_point(entry: dict | None, b: float) -> dict | None:
    """The frontier rule: ``entry``'s best real operating point (highest mean PSNR) whose realised FLOPs are
    at most ``b + FRONTIER_SLACK``; None if it has none there (or is diagnostic / did not run)."""
    if not entry or entry.get("diagnostic") or entry.get("error"):
        return None
    pts = [r for r in _ok_points(entry) if r["flops_fraction"] <= b + FRONTIER_SLACK]
    return max(pts, key=lambda r: _num(r["psnr_db"])) if pts else None


def verdict(lo: float | None, hi: float | None) -> str:
    """``ahead`` / ``behind`` when a paired interval ``[lo, hi]`` of a margin excludes 0 on that side, else
    ``tie`` (also without an interval)."""
    return "tie" if lo is None else "ahead" if lo > 0 else "behind" if hi < 0 else "tie"


def paired_margin(mine: dict, theirs: dict) -> tuple[float, float | None, float | None]:
    """Mean per-image PSNR difference ``mine − theirs`` (dB) over the same images, with its paired 95 %
    bootstrap interval (:func:`cachec.metrics.paired_difference`, 10000 resamples, seed 0); +∞ PSNR counts
    as :data:`PSNR_CAP`.

    Raises:
        ValueError: the points were measured on different numbers of images.
    """
    from cachec.metrics import paired_difference

    return paired_difference([_num(v) for v in mine["psnr_db_per_image"]],
                             [_num(v) for v in theirs["psnr_db_per_image"]], cap=PSNR_CAP)


def headline_pairs(cfg_res: dict) -> dict:
    """``{budget key: (cachec point, (best peer name, its point))}`` by the frontier rule at each table budget
    (either side None when it has no point there); the peer is the one whose frontier point has the highest
    mean PSNR on the sweep's images."""
    out = {}
    ours = next((e for e in cfg_res["methods"] if e["method"] == "cachec"), None)
    for b in TABLE_BUDGETS:
        mine = frontier_point(ours, b)
        best = None
        for e in cfg_res["methods"]:
            if e["group"] == "cachec":
                continue
            r = frontier_point(e, b)
            if r is not None and (best is None or _num(r["psnr_db"]) > _num(best[1]["psnr_db"])):
                best = (e["method"], r)
        out[f"{b:.2f}"] = (mine, best)
    return out


def confirmed(cfg_res: dict, method: str, label: str, key: str = "confirmation") -> dict | None:
    """The re-measurement of ``method``'s point ``label`` on the confirmation images, if the run made one
    (``cfg_res[key]["points"]``: ``confirmation``, :func:`bench.compare_configs.confirm_headline`, or
    ``wide_confirmation``, :func:`bench.compare_configs.widen_confirmation`)."""
    conf = cfg_res.get(key) or {}
    return next((r for r in conf.get("points", []) if r["method"] == method and r["label"] == label
                 and "error" not in r and r.get("psnr_db_per_image")), None)


def confirmed_pair(cfg_res: dict, peer: str, mine: dict, theirs: dict, budget: float
                   ) -> tuple[dict | None, dict | None, list[str]]:
    """cachec's point ``mine`` and ``peer``'s point ``theirs`` re-measured on the same images: from the widened
    confirmation when it holds both, else from the confirmation. A pair whose re-measured FLOPs moved above
    ``budget`` + :data:`FRONTIER_SLACK` (an adaptive method on the new images) is not valid; the next one is
    tried. Returns ``(cachec record, peer record, reasons for the pairs rejected)``, the records None when no
    valid pair exists."""
    rejected = []
    for key in ("wide_confirmation", "confirmation"):
        cm, cp = confirmed(cfg_res, "cachec", mine["label"], key), confirmed(cfg_res, peer, theirs["label"], key)
        if not (cm and cp):
            continue
        over = [f"{n} realised {r['flops_fraction']:.1%}" for n, r in (("cachec", cm), (peer, cp))
                if r["flops_fraction"] > budget + FRONTIER_SLACK]
        if not over:
            return cm, cp, rejected
        rejected.append(f"re-measurement on {len(cm['psnr_db_per_image'])} images over the budget + slack: "
                        + ", ".join(over))
    return None, None, rejected


def headline(cfg_res: dict) -> dict:
    """cachec vs the best peer at each table budget by the frontier rule (:func:`headline_pairs`):
    ``margin_db`` is the mean per-image PSNR difference with its paired 95 % bootstrap interval
    ``margin_ci_low``/``margin_ci_high``; ``verdict`` is ``ahead`` / ``behind`` when the interval excludes 0,
    else ``tie``. The points are chosen on the sweep's images; when the run re-measured both on more images
    (``wide_confirmation``, else ``confirmation``: :func:`confirmed_pair`), the margin, interval and PSNRs are those of the re-measurement, and ``images`` says
    how many images the margin is over; a re-measured point whose realised FLOPs moved above the budget +
    slack (an adaptive method on the new images) voids that re-measurement (``confirmation_rejected`` says
    why): the next valid one stands, else the sweep's margin."""
    out = {}
    for key, (mine, best) in headline_pairs(cfg_res).items():
        b = float(key)
        rejected = None
        if mine and best:
            cm, cp, why = confirmed_pair(cfg_res, best[0], mine, best[1], b)
            if why:  # an adaptive method's FLOPs moved past the rule on the new images: not a valid pair
                rejected = "; ".join(why)
            if cm and cp:
                mine, best = cm, (best[0], cp)
        h = {"rule": f"best real point at <= {b:.1%} + {FRONTIER_SLACK:.1%} FLOPs",
             "cachec_psnr": _num(mine["psnr_db"]) if mine else None,
             "cachec_flops": mine["flops_fraction"] if mine else None,
             "cachec_point": mine["label"] if mine else None,
             "best_peer": best[0] if best else None,
             "best_peer_point": best[1]["label"] if best else None,
             "best_peer_psnr": _num(best[1]["psnr_db"]) if best else None,
             "best_peer_flops": best[1]["flops_fraction"] if best else None,
             "margin_db": None, "margin_ci_low": None, "margin_ci_high": None, "verdict": None}
        if mine and best and mine.get("psnr_db_per_image") and best[1].get("psnr_db_per_image"):
            m, lo, hi = paired_margin(mine, best[1])
            h.update(margin_db=m, margin_ci_low=lo, margin_ci_high=hi, images=len(mine["psnr_db_per_image"]),
                     verdict=verdict(lo, hi))
        if rejected:
            h["confirmation_rejected"] = rejected
        out[key] = h
    return out


#: a peer "reaches" a budget when it has a real point at most this far below it (and at most FRONTIER_SLACK above)
COVERAGE_BELOW = 0.02


def coverage(cfg_res: dict) -> dict:
    """``{budget key: [methods without a real point in [B - COVERAGE_BELOW, B + FRONTIER_SLACK]]}`` over the
    peers that ran (diagnostic lines excluded): where a sweep is too coarse, or its knob cannot reach B."""
    out = {}
    for b in TABLE_BUDGETS:
        miss = []
        for e in cfg_res["methods"]:
            if e["group"] == "cachec" or e.get("diagnostic") or e.get("error"):
                continue
            if not any(b - COVERAGE_BELOW <= r["flops_fraction"] <= b + FRONTIER_SLACK for r in _ok_points(e)):
                miss.append(e["method"])
        out[f"{b:.2f}"] = miss
    return out


def chosen_name(choice: dict) -> str:
    """The name (``family[+predictors]/refineK``, :attr:`cachec.refine.Candidate.name`) of the candidate cachec's
    plan search chose, from a point's ``info.family_choice`` (:func:`bench.peers.cachec_plans.choose_family`).

    Results that predate the recorded ``name`` give the winner as the first best validation score (the search's
    own rule) when that candidate is of the recorded family and refinement, else ``{chosen}/refine{refine}``.
    """
    if choice.get("name"):
        return str(choice["name"])
    fallback = f"{choice['chosen']}/refine{choice['refine']}"
    scores = choice.get("validation_psnr_db") or {}
    if not scores:
        return fallback
    best = max(scores, key=lambda k: _num(scores[k]))  # first of the best, as the search's choice
    fam, _, k = best.partition("/refine")
    return best if fam.split("+")[0] == choice["chosen"] and k == str(choice["refine"]) else fallback


#: budgets of the iso-quality table
ISO_BUDGETS = (0.40, 0.60)


def iso_quality(cfg_res: dict) -> dict:
    """FLOPs cachec needs to match the headline's best peer at each of :data:`ISO_BUDGETS`.

    cachec's PSNR between its measured points is interpolated linearly in realised FLOPs (its sweep is the
    table budgets); the needed FLOPs is the smallest fraction where that line reaches the peer's mean PSNR
    (sweep images). ``how`` is ``interp`` (between two measured points), ``at most`` (cachec's lowest point
    already beats the peer: the fraction is an upper bound) or ``not reached`` (above cachec's highest point).

    Returns:
        ``{budget key: {"peer", "peer_psnr", "peer_flops", "cachec_flops", "ratio", "how"}}`` (ratio =
        cachec FLOPs ÷ peer FLOPs; None when not reached or nothing to compare).
    """
    ours = next((e for e in cfg_res["methods"] if e["method"] == "cachec"), None)
    pts = sorted(((r["flops_fraction"], _num(r["psnr_db"])) for r in _ok_points(ours)), key=lambda x: x[0]) if ours else []
    out = {}
    pairs = headline_pairs(cfg_res)
    for b in ISO_BUDGETS:
        _, best = pairs[f"{b:.2f}"]
        if best is None or not pts:
            out[f"{b:.2f}"] = None
            continue
        name, r = best
        target, F = _num(r["psnr_db"]), r["flops_fraction"]
        need, how = None, "not reached"
        if pts[0][1] >= target:
            need, how = pts[0][0], "at most"
        else:
            for (f0, p0), (f1, p1) in zip(pts, pts[1:]):
                if p0 < target <= p1:
                    need, how = f0 + (target - p0) / (p1 - p0) * (f1 - f0), "interp"
                    break
        out[f"{b:.2f}"] = {"peer": name, "peer_point": r["label"], "peer_psnr": target, "peer_flops": F,
                           "cachec_flops": need, "ratio": None if need is None else need / F, "how": how}
    return out


# ------------------------------------------------------------------------------------- outputs


def fmt(v, spec: str = ".2f") -> str:
    """A table cell: ``–`` for None, ``∞`` for the string ``"inf"`` or an infinite float, other strings as
    they are, numbers formatted with ``spec``."""
    if v is None:
        return "–"
    if isinstance(v, str):
        return "∞" if v == "inf" else v
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v, spec)
