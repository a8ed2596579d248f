"""``benchmarks.md`` and ``benchmarks.png`` of the peer benchmark (``bench/compare.py``), written from its
result dicts (the analysis, margins and table values, is :mod:`bench.compare_report`'s).

:func:`write_markdown` writes the protocol, per configuration the table at the budgets, the headline
margins with their paired intervals, the adaptive (:func:`adaptive_lines`) and control-fidelity
(:func:`control_lines`) tables and every measured point; :func:`write_plot` draws PSNR (dB) against
realised FLOPs (% of uncached). Nothing here runs a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.compare_report import (CHECK_SIZE, FRONTIER_SLACK, ISO_BUDGETS, TABLE_BUDGETS, _num, _ok_points, at_budget,
                                  chosen_name, coverage, fmt, iso_quality, status_of)


def _bisected(entry: dict) -> bool:
    """Whether a method's parameter was extended and bisected until its FLOPs bracket the budgets (stored
    results before ``bisect`` was recorded: every adaptive line but one swept by ceiling, SoftCap's)."""
    return bool(entry.get("bisect", entry.get("adaptive") and entry.get("knob") != "ceiling"))


def write_plot(results: dict, path: Path) -> None:
    """PNG plot of PSNR (dB) vs realised FLOPs (% of uncached), one panel per configuration, at ``path``.

    Raises:
        OSError: ``path`` cannot be written. KeyError: ``results`` lacks the fields the benchmark writes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = results["configs"]
    fig, axes = plt.subplots(1, len(cfgs), figsize=(6.5 * len(cfgs), 5.6), squeeze=False)
    names = []
    for cfg in cfgs:
        for e in cfg["methods"]:
            if e["method"] not in names and not e.get("diagnostic"):
                names.append(e["method"])
    cmap = plt.get_cmap("tab20")
    groups = {e["method"]: e["group"] for cfg in cfgs for e in cfg["methods"]}
    marker = {"cachec": "o-", "planner baseline": "o-", "diffusers": "s--", "cache-dit": "^:"}
    adaptive_cachec = {e["method"] for cfg in cfgs for e in cfg["methods"] if e["group"] == "cachec" and e.get("adaptive")}
    style = {n: (cmap(i % 20), "D-" if n in adaptive_cachec else marker.get(groups.get(n), "x-."))
             for i, n in enumerate(names)}
    for ax, cfg in zip(axes[0], cfgs):
        for e in cfg["methods"]:
            if e.get("diagnostic"):
                continue
            pts = [r for r in _ok_points(e) if math.isfinite(_num(r["psnr_db"]))]
            if not pts:
                continue
            color, fmt = style[e["method"]]
            lw = 2.6 if e["method"] == "cachec" else 1.3
            ax.plot([100 * r["flops_fraction"] for r in pts], [_num(r["psnr_db"]) for r in pts], fmt, color=color,
                    lw=lw, ms=4, label=e["method"])
        for b in TABLE_BUDGETS:
            ax.axvline(100 * b, color="0.75", lw=0.8, ls=":")
        ax.set_xlim(0, 102)
        ax.set_xlabel("realised FLOPs (% of uncached, counted)")
        ax.set_ylabel("PSNR vs uncached (dB, mean over images)")
        ax.set_title(f"{cfg['name']} ({cfg['n_images']} images)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    ncol = max(2, min(6, 2 * len(cfgs)))
    rows = math.ceil(len(labels) / ncol)
    fig.set_figheight(5.0 + 0.22 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("cachec vs peer caching methods: PSNR vs realised FLOPs (higher-left is better)", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.22 * rows / fig.get_figheight(), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def counter_note(results: dict) -> str:
    """How FLOPs were counted, and whether the fast counter agreed with ``cachec.runtime.flops.count_flops``."""
    found = []  # (what, check) for every check made
    for cfg in results["configs"]:
        found.append((f"{cfg['name']} reference", cfg.get("flop_counter_check_reference")))
        found += [(f"{cfg['name']} {e['method']}", r.get("flop_counter_check")) for e in cfg["methods"] for r in e["points"]]
    found = [(what, c) for what, c in found if c]
    checks, bad = len(found), [what for what, c in found if not c["equal"]]
    if not checks:
        return "counted with `cachec.runtime.flops.count_flops`."
    if not bad:
        return (f"a bare dispatch-mode counter with those formulas was used and matched `cachec.runtime.flops.count_flops` "
                f"exactly in all {checks} checks (the uncached run and the first point of every method, on the first "
                f"{CHECK_SIZE} samples).")
    return (f"a bare dispatch-mode counter was checked against `cachec.runtime.flops.count_flops` ({checks} checks); where it "
            f"disagreed ({', '.join(bad)}) everything of that method was recounted with `count_flops`.")


def adaptive_lines(cfg_res: dict) -> list[str]:
    """Markdown lines of the adaptive table of one configuration from its ``adaptive`` rows
    (:func:`bench.compare_adaptive.adaptive_comparison`); empty without them."""
    rows = cfg_res.get("adaptive")
    if not rows:
        return []

    def cell(p: dict | None, who: str = "") -> str:  # noqa: E306
        if not p:
            return "–"
        name = f"{who} " if who else ""
        return (f"{name}{fmt(p['psnr'])} dB at {p['flops']:.1%}: **{p['margin_db']:+.2f}** "
                f"[{p['margin_ci_low']:+.2f}, {p['margin_ci_high']:+.2f}] ({p['verdict']}"
                + (f"; {p['note']}, {p['images']}" if p.get("note") else "") + ")")

    n = next(iter(rows.values()))["images"]
    L = [f"**Adaptive mode (SoftCap, `adaptive: true`)** on {n} images, one sampling call per image (per-image "
         "decisions); base plan 5 points under the ceiling (cachec's chosen family and predictors at the ceiling, "
         "unrefined); margins = adaptive − other, paired 95 % bootstrap interval over the images. "
         "'static at its FLOPs' = the same family and predictors solved at exactly the adaptive point's realised "
         f"fraction; 'cachec' and 'best peer' = the headline's pair at the ceiling (frontier rule, ≤ ceiling + "
         f"{FRONTIER_SLACK:.1%}):", "",
         "| ceiling | realised (max run) | Full steps | PSNR dB | vs static at its FLOPs | vs cachec at the ceiling | vs best peer |",
         "|---|---:|---:|---:|---|---|---|"]
    for key in sorted(rows):
        r = rows[key]
        bp = r.get("best_peer")
        L.append(f"| {r['ceiling']:.0%} | {r['flops']:.1%} ({fmt(r['run_flops_max'], '.1%')}) | "
                 f"{fmt(r['full_steps_mean'], '.2f')} | {fmt(r['psnr'])} | {cell(r['static_matched'])} | "
                 f"{cell(r['cachec_at_ceiling'])} | {cell(bp, bp.get('method', '') if bp else '')} |")
    L.append("")
    sweeps = [(k, rows[k]["sweep"]) for k in sorted(rows) if rows[k].get("sweep")]
    if sweeps:
        fams = sorted({f for _, sw in sweeps for f in sw["peers"]})
        L.append(f"The named peers at ≤ the adaptive point's realised FLOPs (+ {FRONTIER_SLACK:.1%}) on the sweep's "
                 f"{sweeps[0][1]['images']} images (each peer's best line by the frontier rule; adaptive − peer):")
        L.append("")
        L.append("| ceiling | adaptive (sweep) | " + " | ".join(fams) + " |")
        L.append("|---|---:|" + "---|" * len(fams))
        for k, sw in sweeps:
            cells = []
            for f in fams:
                p = sw["peers"].get(f)
                cells.append("–" if not p else f"{p['method']} {p['label']}: {fmt(p['psnr'])} dB at {p['flops']:.1%}, "
                             f"**{p['margin_db']:+.2f}** [{p['margin_ci_low']:+.2f}, {p['margin_ci_high']:+.2f}]")
            L.append(f"| {float(k):.0%} | {fmt(sw['psnr'])} dB at {sw['flops']:.1%} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def control_lines(cfg_res: dict) -> list[str]:
    """Markdown lines of the control-fidelity table (:func:`bench.compare_control.control_summary`, stored as
    ``cfg_res["control"]``); empty without it."""
    c = cfg_res.get("control")
    if not c:
        return []
    budgets = sorted({k for row in c["methods"].values() for k in row["at"]})

    def at(p):
        return "–" if not p else (f"{fmt(p['psnr'])} dB, IoU {p['control_iou']:.3f} "
                                  f"({-100 * p['control_fidelity_loss']:+.1f} %) at {p['flops']:.1%}")

    L = [f"**Control fidelity** (IoU of the generated ink with the control mask; uncached images: "
         f"{c['reference_iou']:.3f}; loss = relative IoU change vs uncached). Operating point = the fewest FLOPs "
         f"with at most {100 * c['fidelity_loss_limit']:.1f} % fidelity loss (HGC's; '≥': the method's cheapest "
         f"measured point, so the reduction is a lower bound); uncached "
         f"{c['reference_macs_per_image'] / 1e9:.2f} GMACs per image (MACs = FLOPs / 2, generator + ControlNet):", "",
         "| method | " + " | ".join(f"@{float(b):.0%} (frontier)" for b in budgets)
         + " | operating point (≤ loss limit) | MACs/image | MACs reduction |",
         "|---|" + "---|" * len(budgets) + "---|---:|---:|"]
    for name, row in c["methods"].items():
        op = row["operating_point"]
        L.append(f"| {name} | " + " | ".join(at(row["at"].get(b)) for b in budgets) + " | "
                 + ("none" if not op else f"{op['label']}: {at(op)}") + " | "
                 + ("–" if not op else f"{op['macs_per_image'] / 1e9:.2f} G") + " | "
                 + ("–" if not op else ("≥ " if op.get("lowest_point") else "") + f"{op['macs_reduction']:.1%}") + " |")
    L.append("")
    return L


def write_markdown(results: dict, path: Path, json_name: str, png_name: str) -> None:
    """``benchmarks.md`` at ``path``: protocol, per configuration the table at :data:`TABLE_BUDGETS`, the
    headline margin and every measured point; method settings; timings. ``json_name``/``png_name`` are the
    links to the raw results and the plot.

    Raises:
        OSError: ``path`` cannot be written. KeyError: ``results`` lacks the fields the benchmark writes.
    """
    L: list[str] = []
    env = results["environment"]
    L.append("# Benchmarks: cachec vs peer caching methods at matched FLOPs")
    L.append("")
    L.append(f"Generated by `{results['command']}` on {results['finished']} "
             f"({env['cpu_threads']} CPU threads, torch {env['torch']}, diffusers {env['diffusers']}, "
             f"cache-dit {env['cache_dit']}); total {results['seconds'] / 60:.1f} min. Raw results: "
             f"[`{json_name}`]({json_name}); plot: [`{png_name}`]({png_name}). This file is generated: do not edit."
             + "".join(f" Lines added by `{a['command']}` on {a['finished']} ({a['seconds'] / 60:.0f} min)."
                       for a in results.get("added", []))
             + "".join(f" Intervals widened by `{a['command']}` on {a['finished']} ({a['seconds'] / 60:.0f} min)."
                       for a in results.get("widened", []))
             + (f" Headlines recomputed from the raw points by `{results['rescored']['by']}` on "
                f"{results['rescored']['at']} (nothing re-run)." if results.get("rescored") else ""))
    L.append("")
    L.append("Protocol: every method runs through the same `Driver.generate` call on the same model, held-out "
             "conditions and seeds (disjoint from the calibration seeds). FLOPs are counted over the whole call "
             "with the formulas of `torch.utils.flop_counter` (attention counted via the math SDPA kernel), never "
             "taken from a method's claim; " + counter_note(results) + " PSNR (dB, mean over images) and SSIM compare with the uncached images of the same seeds; "
             "Fréchet distance is in the digit classifier's features against 500 held-out real digits (not FID; "
             "with few images it is biased upwards, compare only within a table). Wall ratio: seconds of one "
             "uncounted `generate` call on the timing batch divided by the mean of the uncached timings of the same "
             "batch taken right before and right after that method (interleaved; noisy on a shared machine). "
             "Table values at a budget are "
             "a measured point within 0.5 % (=), linear interpolation between the two measured points that "
             "bracket the budget (~), or, where nothing brackets it, the nearest point at most 10 % below the "
             "budget (≤, marked); '–' = the method has no point there.")
    L.append("")
    L.append(f"![PSNR vs realised FLOPs]({png_name})")
    L.append("")
    for cfg in results["configs"]:
        ref = cfg["reference"]
        L.append(f"## {cfg['name']}")
        L.append("")
        L.append(f"{cfg['n_images']} images ({cfg['eval_conditions']}, seeds {cfg['eval_seeds'][0]}–{cfg['eval_seeds'][1]}, "
                 f"batch {cfg['batch_size']}), guidance {cfg['guidance']}. Uncached: "
                 f"{ref['flops_per_image'] / 1e9:.3f} GFLOP/image, class accuracy {ref['class_accuracy']:.3f}, "
                 f"Fréchet {ref['frechet']:.1f}, {ref['wall_s_timing_batch']:.2f} s per timing batch of {ref['timing_batch']}. Calibration (cachec and "
                 f"MagCache): {cfg['calibration_samples']} samples, seeds {cfg['calibration_seeds'][0]}–"
                 f"{cfg['calibration_seeds'][1]}, cachec sensitivity `{cfg['calibration_sensitivity']}`"
                 + (f", {cfg['calibration_seconds']:.0f} s" if cfg.get("calibration_seconds") else "")
                 + f". Configuration run time {cfg['seconds'] / 60:.1f} min.")
        L.append("")
        hdr = ["method"]
        for b in TABLE_BUDGETS:
            hdr += [f"PSNR @{b:.0%}", f"Fréchet @{b:.0%}"]
        hdr += ["points", "notes"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "|".join(["---"] + ["---:"] * (2 * len(TABLE_BUDGETS)) + ["---:", "---"]) + "|")
        mark = {"exact": "=", "interp": "~", "below": "≤"}
        for e in cfg["methods"]:
            row = [e["method"]]
            notes = []
            not_reached = None
            for b in TABLE_BUDGETS:
                v = at_budget(e, b)
                if v["psnr"] is None:
                    row += ["–", "–"]
                    if v["note"].startswith("not reached"):
                        not_reached = v["note"].split(": ", 1)[1]
                    elif v["note"] and not e.get("diagnostic") and not e.get("error"):
                        notes.append(f"@{b:.0%}: {v['note']}")
                else:
                    m = mark[v["how"]]
                    row += [f"{m}{fmt(v['psnr'])}", f"{m}{fmt(v['frechet'], '.1f')}"]
                    if v["how"] == "below":
                        notes.append(f"@{b:.0%}: {v['note']}")
            if not_reached and not e.get("diagnostic") and not e.get("error"):
                notes.insert(0, not_reached)
            ok = _ok_points(e)
            row.append(str(len(e["points"])))
            st = status_of(e)
            if e.get("diagnostic") and ok:
                st = (st + "; " if st else "") + f"diagnostic (first batch): realised FLOPs {ok[0]['flops_fraction']:.1%}"
            if st:
                notes.insert(0, st)
            row.append("; ".join(notes).replace("|", "/"))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        hl = cfg["headline"]
        parts = []
        for b in TABLE_BUDGETS:
            h = hl[f"{b:.2f}"]
            if h.get("margin_db") is None:
                parts.append(f"at {b:.0%}: no comparison (cachec {fmt(h['cachec_psnr'])} dB, best peer "
                             f"{h['best_peer'] or '–'} {fmt(h['best_peer_psnr'])} dB)")
            else:
                parts.append(f"at {b:.0%}: cachec {fmt(h['cachec_psnr'])} dB at {h['cachec_flops']:.1%} vs "
                             f"{h['best_peer']} ({h['best_peer_point']}) {fmt(h['best_peer_psnr'])} dB at "
                             f"{h['best_peer_flops']:.1%}: **{h['margin_db']:+.2f} dB** [{h['margin_ci_low']:+.2f}, "
                             f"{h['margin_ci_high']:+.2f}] ({h['verdict']}, {h.get('images', cfg['n_images'])} images"
                             + (f"; not the {h['confirmation_rejected']}" if h.get("confirmation_rejected") else "")
                             + ")")
        conf = cfg.get("confirmation")
        L.append("**cachec vs the best peer** by the frontier rule (each side's best real point at ≤ the budget "
                 f"+ {FRONTIER_SLACK:.1%} FLOPs, chosen on the sweep's images; margin = mean per-image PSNR "
                 "difference with its paired 95 % bootstrap interval over the images; 'tie' when the interval "
                 "contains 0"
                 + (f"; both points re-measured on {conf['n_images']} images, seeds {conf['eval_seeds'][0]}–"
                    f"{conf['eval_seeds'][1]}, for the margin" if conf else "")
                 + _widened_text(cfg.get("wide_confirmation"))
                 + "): " + "; ".join(parts) + ".")
        L.append("")
        cov = coverage(cfg)
        L.append("Peers without a real point within 2 points below the budget (their sweep or knob does not reach "
                 "it; the frontier rule then uses their best point further below): "
                 + "; ".join(f"{float(k):.0%}: {', '.join(v) if v else 'none'}" for k, v in cov.items()) + ".")
        L.append("")
        L += adaptive_lines(cfg)
        L += control_lines(cfg)
        iso = cfg.get("iso_quality") or iso_quality(cfg)
        rows = []
        for b in ISO_BUDGETS:
            q = iso.get(f"{b:.2f}")
            if not q:
                continue
            need = ("–" if q["cachec_flops"] is None else
                    f"{'≤ ' if q['how'] == 'at most' else ''}{q['cachec_flops']:.1%}")
            ratio = "–" if q["ratio"] is None else f"{'≤ ' if q['how'] == 'at most' else ''}{q['ratio']:.2f}×"
            rows.append(f"| {b:.0%} | {q['peer']} ({q['peer_point']}) | {fmt(q['peer_psnr'])} | {q['peer_flops']:.1%} | "
                        f"{need} | {ratio} |")
        if rows:
            L.append("Iso-quality (FLOPs cachec needs for the best peer's PSNR; cachec's PSNR interpolated linearly "
                     "between its measured points, '≤' = its lowest point already matches):")
            L.append("")
            L.append("| budget | best peer | peer PSNR dB | peer FLOPs | cachec FLOPs | ratio |")
            L.append("|---|---|---:|---:|---:|---:|")
            L += rows
            L.append("")
        L.append("<details><summary>Every measured operating point</summary>")
        L.append("")
        L.append("| method | setting | realised FLOPs | PSNR dB | SSIM | class acc. | Fréchet | wall ratio | note |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for e in cfg["methods"]:
            if e.get("error"):
                L.append(f"| {e['method']} | – | – | – | – | – | – | – | did not run: {e['error'].replace('|', '/')} |")
                continue
            for r in sorted(e["points"], key=lambda r: r.get("flops_fraction", 2.0)):
                if "flops_fraction" not in r:
                    L.append(f"| {e['method']} | {r['label']} | – | – | – | – | – | – | {r.get('error', '').replace('|', '/')} |")
                    continue
                note = r.get("error", "")
                if r.get("evaluated_on", "").startswith("first"):
                    note = (note + "; " if note else "") + "first batch only"
                claim = (r.get("info") or {}).get("plan_realised_claim")
                if claim is not None:
                    note = (note + "; " if note else "") + f"plan claims {claim:.1%}"
                choice = (r.get("info") or {}).get("family_choice")
                if choice:
                    sc = " / ".join(f"{k} {fmt(v)}" for k, v in choice["validation_psnr_db"].items())
                    note += (f"; chosen {chosen_name(choice)} (validation PSNR on "
                             f"{choice['validation_images']} images: {sc} dB")
                    cf = choice.get("confirmation")
                    if cf:
                        cs = " / ".join(f"{k} {fmt(v)}" for k, v in cf["psnr_db"].items())
                        note += f"; with {cf['images']} confirmation images: {cs} dB"
                    note += ")"
                L.append(f"| {e['method']} | {r['label']} | {r['flops_fraction']:.1%} | {fmt(r.get('psnr_db'))} | "
                         f"{fmt(r.get('ssim'), '.4f')} | {fmt(r.get('class_accuracy'), '.3f')} | "
                         f"{fmt(r.get('frechet'), '.1f')} | {fmt(r.get('wall_ratio'), '.2f')} | {note.replace('|', '/')} |")
        L.append("")
        L.append("</details>")
        L.append("")
    L.append("## Method settings")
    L.append("")
    seen = set()
    for cfg in results["configs"]:
        for e in cfg["methods"]:
            if e["method"] in seen:
                continue
            seen.add(e["method"])
            st = {k: v for k, v in (e.get("settings") or {}).items() if k != "mag_ratios"}
            L.append(f"- **{e['method']}** ({e['group']}; sweep: {e['knob']}"
                     + ("; threshold swept until the FLOPs bracket 25/40/60 %" if _bisected(e) else "")
                     + f"): `{json.dumps(st, ensure_ascii=False)}`")
    L.append("")
    L.append("## Timings")
    L.append("")
    L.append("| configuration | total | reference | calibration (cachec) | slowest method |")
    L.append("|---|---:|---:|---:|---|")
    for cfg in results["configs"]:
        slow = max(cfg["methods"], key=lambda e: e.get("seconds", 0.0)) if cfg["methods"] else None
        L.append(f"| {cfg['name']} | {cfg['seconds']:.0f} s | {cfg['reference']['seconds']:.0f} s | "
                 f"{fmt(cfg.get('calibration_seconds'), '.0f')} s | "
                 + (f"{slow['method']} ({slow.get('seconds', 0):.0f} s)" if slow else "–") + " |")
    L.append("")
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


def _widened_text(wide: dict | None) -> str:
    """The protocol clause of a widened confirmation (``bench/compare.py --widen``), or ''."""
    if not wide:
        return ""
    check = wide.get("prefix_check")
    keys = ", ".join(f"{float(k):.0%}" for k in wide["budgets"])
    return (f"; the pairs at {keys}, whose intervals were wider than ±{wide['target_half_width']:g} dB, re-measured "
            f"again on {wide['n_images']} images, seeds {wide['eval_seeds'][0]}–{wide['eval_seeds'][1]} "
            f"(`--widen`, {wide['seconds'] / 60:.0f} min"
            + (f"; their first {check['images']} per-image PSNRs reproduce the confirmation's within "
               f"{check['max_abs_diff_db']:.2g} dB" if check and check.get("points") else "") + ")")
