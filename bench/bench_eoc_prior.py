"""How much of EOC's fitted gain each compact prior keeps (issue 12: per channel, per token vs per element).

    python bench/bench_eoc_prior.py [--model digits-flow] [--calibration FILE]

Calibrates the model with the shipped-plan settings and ``eoc_prior="element"`` (or reads FILE, which must
have element grouping), then regroups the element-wise sums exactly into per-channel and per-token sums
(group sums are sums of element sums) and prints, for every grouping, EOC's error reduction on plain reuse
at lag 1: fitted on split 0 (alpha = lin / quad), judged on split 1,

    gain(u, s) = reuse error − E(alpha) = 2 alpha lin_judge − alpha² quad_judge   (docs/calibration-format.md)

summed over (unit, step) with the calibration's sensitivity weights, as a fraction of the sensitivity-
weighted reuse error (the share of plain reuse's error that EOC removes), and the fraction of the element
prior's gain kept.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from cachec.calibrate.format import eoc_group_layout, read_header, read_tensors


def _regroup(v: np.ndarray, shapes, grouping: str) -> np.ndarray:
    out, off = [], 0
    for (bshape, groups, size), sh in zip(eoc_group_layout(shapes, grouping), shapes):
        n = groups * size
        part = v[..., off:off + n]
        if grouping == "channel" and size > 1:
            part = part.reshape(*v.shape[:-1], size, groups).sum(-2)
        elif grouping == "token" and size > 1:
            part = part.reshape(*v.shape[:-1], groups, size).sum(-1)
        out.append(part)
        off += n
    return np.concatenate(out, -1)


def gains(path: str) -> dict[str, float]:
    h = read_header(path)
    if h["eoc_prior"] != "element":
        raise SystemExit(f"{path} has eoc_prior={h['eoc_prior']!r}; this bench needs an 'element' calibration")
    t = read_tensors(path)
    count = h["prior_count"]
    sens = t["sensitivity"]
    out = {}
    reuse_total = 0.0
    for grouping in ("element", "channel", "token"):
        total = 0.0
        reuse_total = 0.0
        for i, u in enumerate(h["units"]):
            n = u["name"]
            layout = eoc_group_layout(u["shapes"], grouping)
            sizes = np.concatenate([np.full(g, float(sz)) for _, g, sz in layout])
            P = _regroup(t[f"prior_sum/{n}"], u["shapes"], grouping) / (count * sizes)
            q = _regroup(t[f"eoc_q/{n}"], u["shapes"], grouping)
            m = _regroup(t[f"eoc_m/{n}"][:, :, 0], u["shapes"], grouping)  # lag 1
            G = t[f"gram/{n}"].sum(0)  # (2, S, S) summed over branches
            D = P[1:] - P[:-1]  # (S-1, G)
            lin = np.einsum("ksg,sg->ks", m[:, 1:], D)
            quad = np.einsum("ksg,sg->ks", q[:, :-1], D * D)
            alpha = np.where(quad[0] > 0, lin[0] / np.where(quad[0] > 0, quad[0], 1), 0.0)
            gain = 2 * alpha * lin[1] - alpha**2 * quad[1]
            d = np.diagonal(G[1], axis1=0, axis2=1)
            reuse = d[1:] - 2 * np.diagonal(G[1], offset=1) + d[:-1]
            total += float((sens[i, 1:] * gain).sum())
            reuse_total += float((sens[i, 1:] * reuse).sum())
        out[grouping] = total
    out["reuse"] = reuse_total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-flow")
    ap.add_argument("--calibration", default=None, help="an existing calibration with eoc_prior='element'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.calibration
        if path is None:
            from cachec.calibrate.run import calibrate
            from cachec.loading import load_model
            from cachec.shipped import CALIBRATION

            driver = load_model(args.model)
            path = str(calibrate(driver, list(range(driver.num_classes)), output=Path(tmp) / "c.safetensors",
                                 progress=False, **dict(CALIBRATION, eoc_prior="element")))
        g = gains(path)
    print(f"{args.model}: sensitivity-weighted EOC gain at lag 1 (judged on the held-out split)")
    print(f"{'prior':<9} {'gain / reuse error':>19} {'share of element gain':>22}")
    for k in ("element", "channel", "token"):
        print(f"{k:<9} {g[k] / g['reuse']:>18.2%} {g[k] / g['element']:>21.1%}")


if __name__ == "__main__":
    main()
