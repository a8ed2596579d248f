"""Control fidelity in the peer benchmark (issue 16, HGC): on the ControlNet reference model
(``digits-mmdit-control``, cachec/control.py) every point carries the IoU of its generated ink with the control
masks beside PSNR (:func:`bench.compare_sweeps.summarise`). This module turns those points into the rows the
report prints: each method at 25 % and 40 % of the full (generator + ControlNet) FLOPs by the frontier rule,
and HGC's operating point — the fewest FLOPs (and MACs = FLOPs / 2) at which a method loses at most
:data:`FIDELITY_LOSS` of the uncached images' IoU.
"""

from __future__ import annotations

from bench.compare_report import _num, _ok_points, frontier_point

#: HGC's operating point: at most this relative loss of control fidelity (1.5 %, as a fraction)
FIDELITY_LOSS = 0.015
CONTROL_BUDGETS = (0.25, 0.40)


def _brief(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"label": r["label"], "flops": r["flops_fraction"], "psnr": _num(r["psnr_db"]),
            "control_iou": r["control_iou"], "control_fidelity_loss": r["control_fidelity_loss"]}


def control_summary(cfg_res: dict) -> dict | None:
    """``{"reference_iou", "reference_macs_per_image", "fidelity_loss_limit", "methods": {name: row}}`` for a
    configuration whose points carry ``control_iou``; None otherwise.

    A row: ``at`` (``{budget key: frontier point or None}``: label, realised FLOPs fraction, PSNR dB, IoU,
    relative fidelity loss) and ``operating_point``: the method's lowest-FLOPs point with fidelity loss ≤
    :data:`FIDELITY_LOSS`, with ``macs_per_image`` (FLOPs / 2), ``macs_reduction`` (``1 − fraction``) and
    ``lowest_point`` (it is the method's cheapest point: the reduction is a lower bound); None when no point
    qualifies.
    """
    pts = [r for e in cfg_res["methods"] for r in _ok_points(e) if r.get("control_iou") is not None]
    if not pts:
        return None
    ref_iou = pts[0]["control_iou_reference"]
    ref_macs = cfg_res["reference"]["flops_per_image"] / 2
    methods = {}
    for e in cfg_res["methods"]:
        ok = [r for r in _ok_points(e) if r.get("control_iou") is not None]
        if not ok or e.get("diagnostic"):
            continue
        good = [r for r in ok if r["control_fidelity_loss"] is not None and r["control_fidelity_loss"] <= FIDELITY_LOSS]
        op = min(good, key=lambda r: r["flops_fraction"]) if good else None
        methods[e["method"]] = {
            "at": {f"{b:.2f}": _brief(frontier_point(e, b)) for b in CONTROL_BUDGETS},
            "operating_point": None if op is None else dict(
                _brief(op), macs_per_image=op["flops_per_image"] / 2, macs_reduction=1.0 - op["flops_fraction"],
                lowest_point=op is min(ok, key=lambda r: r["flops_fraction"])),
        }
    return {"reference_iou": ref_iou, "reference_macs_per_image": ref_macs, "fidelity_loss_limit": FIDELITY_LOSS,
            "methods": methods}
