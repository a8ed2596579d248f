"""Calibration statistics computed exactly from explicit features, and synthetic DiT-like trajectories.

For tests and benchmarks: the statistics follow docs/calibration-format.md to the letter (sums over the
samples of each split ``k = n mod 2``, branches summed), so they can be checked against brute force and
written to a real calibration file.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from cachec.calibrate.format import FORMAT, FORMAT_VERSION, METADATA_KEY, eoc_group_layout

from .calibration import Calibration, calibration_from_tensors

#: DiT-XL/2 at 256^2, FLOPs per image per forward (1.51 / 2.72 GMAC per block for attention / MLP, 118.6 GMAC
#: for the whole forward; 2 FLOPs per multiply-add)
DIT_XL_ATTN_FLOPS = 2 * 1.51e9
DIT_XL_FF_FLOPS = 2 * 2.72e9
DIT_XL_FULL_FLOPS = 2 * 118.6e9


def _group(v: np.ndarray, layout, grouping: str) -> np.ndarray:
    """Sum the last axis (flattened per-sample elements) of ``v`` into the EOC prior groups."""
    out, off = [], 0
    for _, groups, size in layout:
        part = v[..., off:off + groups * size]
        if size == 1:
            out.append(part)
        elif grouping == "channel":
            out.append(part.reshape(*v.shape[:-1], size, groups).sum(-2))
        else:
            out.append(part.reshape(*v.shape[:-1], groups, size).sum(-1))
        off += groups * size
    return np.concatenate(out, axis=-1)


def unit_statistics(F: np.ndarray, eoc_lags: int = 2, shapes=None, eoc_prior: str = "token") -> dict[str, np.ndarray]:
    """All per-unit tensors of the calibration format from one unit's features (exact Gram).

    Args:
        F: (N, B, S, D) float64 features F(u, n, b, s) of one unit (sample n in split n mod 2).
        eoc_lags: K.
        shapes: the unit's per-sample part shapes (default ``[[D]]``: then every grouping is per element).
        eoc_prior: grouping of the EOC statistics (docs/calibration-format.md).
    Returns:
        ``{"gram": (B,2,S,S), "prior_sum": (S,G), "eoc_q": (2,S,G), "eoc_m": (2,S,K,G),
        "goc_rel": (S,), "goc_cos": (S,)}`` float64 (sums, as stored; G groups).
    """
    F = np.asarray(F, dtype=np.float64)
    N, B, S, D = F.shape
    layout = eoc_group_layout(shapes or [[D]], eoc_prior)
    G = sum(g for _, g, _ in layout)
    gram = np.zeros((B, 2, S, S))
    eoc_q = np.zeros((2, S, G))
    eoc_m = np.zeros((2, S, eoc_lags, G))
    for k in range(2):
        Fk = F[k::2]
        if len(Fk) == 0:
            continue
        gram[:, k] = np.einsum("nbsd,nbtd->bst", Fk, Fk)
        eoc_q[k] = _group((Fk * Fk).sum(axis=(0, 1)), layout, eoc_prior)
        for j in range(1, eoc_lags + 1):
            if j < S:
                prev = Fk[:, :, :-j]
                eoc_m[k, j:, j - 1] = _group(((Fk[:, :, j:] - prev) * prev).sum(axis=(0, 1)), layout, eoc_prior)
    dF = np.diff(F, axis=2)  # (N, B, S-1, D): F_s - F_{s-1} for s = 1..S-1
    rel = np.zeros(S)
    cos = np.zeros(S)
    nrm = np.linalg.norm(F, axis=3)
    dn = np.linalg.norm(dF, axis=3)
    rel[1:] = (dn / np.maximum(nrm[:, :, 1:], 1e-300)).sum(axis=(0, 1))
    if S > 2:
        dots = (dF[:, :, 1:] * dF[:, :, :-1]).sum(axis=3)
        cos[2:] = (dots / np.maximum(dn[:, :, 1:] * dn[:, :, :-1], 1e-300)).sum(axis=(0, 1))
    prior = _group(F.sum(axis=(0, 1)), layout, eoc_prior)
    return {"gram": gram, "prior_sum": prior, "eoc_q": eoc_q, "eoc_m": eoc_m, "goc_rel": rel, "goc_cos": cos}


def calibration_tensors(
    features: dict[str, np.ndarray],
    unit_flops,
    full_step: float,
    fixed_step: float | None = None,
    sensitivity: np.ndarray | None = None,
    *,
    eoc_lags: int = 2,
    shapes: dict[str, list] | None = None,
    kinds: dict[str, str] | None = None,
    timesteps=None,
    sigmas=None,
    guidance_scale: float = 4.0,
    eoc_prior: str = "token",
) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and tensors of a calibration file computed from explicit features.

    Args:
        features: ``{unit name: (N, B, S, D_u) float64}`` in model order.
        unit_flops: (U,) FLOPs per call (one sample, one branch).
        full_step: FLOPs of one forward; ``fixed_step`` defaults to ``full_step - sum(unit_flops)``.
        sensitivity: (U, S) weights (default ones).
        eoc_lags: K.
        shapes: per unit the per-sample tuple-part shapes (default ``[[D_u]]``).
        kinds: per unit kind string (default from the name's last component).
        timesteps, sigmas: S values each (defaults: linspace(1000, 0) without the end, sigmas None).
        eoc_prior: grouping of the EOC statistics (with the default 1-d shapes every grouping is per element).
    Returns:
        ``(header, tensors)`` following docs/calibration-format.md.
    """
    names = list(features)
    F0 = features[names[0]]
    N, B, S, _ = F0.shape
    U = len(names)
    unit_flops = np.asarray(unit_flops, dtype=np.float64)
    if fixed_step is None:
        fixed_step = float(full_step) - float(unit_flops.sum())
    sens = np.ones((U, S)) if sensitivity is None else np.asarray(sensitivity, dtype=np.float64)
    if timesteps is None:
        timesteps = np.linspace(1000.0, 0.0, S, endpoint=False)
    tensors: dict[str, np.ndarray] = {}
    rel = np.zeros((U, S))
    cos = np.zeros((U, S))
    units = []
    for i, n in enumerate(names):
        D = features[n].shape[3]
        sh = (shapes or {}).get(n, [[D]])
        st = unit_statistics(features[n], eoc_lags, sh, eoc_prior)
        tensors[f"gram/{n}"] = st["gram"]
        tensors[f"prior_sum/{n}"] = st["prior_sum"]
        tensors[f"eoc_q/{n}"] = st["eoc_q"]
        tensors[f"eoc_m/{n}"] = st["eoc_m"]
        rel[i], cos[i] = st["goc_rel"], st["goc_cos"]
        units.append({"name": n, "kind": (kinds or {}).get(n, n.rsplit(".", 1)[-1]), "mode": "output",
                      "shapes": [list(map(int, s)) for s in sh], "numel": int(D), "sketch_dim": int(D),
                      "eoc_groups": int(st["prior_sum"].shape[1])})
    tensors["goc_rel_sum"] = rel
    tensors["goc_cos_sum"] = cos
    tensors["unit_flops"] = unit_flops.copy()
    tensors["unit_latency_s"] = unit_flops * 1e-12
    tensors["sensitivity"] = sens.copy()
    n0, n1 = (N + 1) // 2, N // 2
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": "2026-11-30T00:00:00Z",
        "cachec_version": "0.1.0",
        "model": {"class": "SyntheticDiT", "fingerprint": "sha256:" + "0" * 64, "source": "synthetic"},
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "config": {}},
        "steps": int(S),
        "timesteps": [float(t) for t in timesteps],
        "sigmas": None if sigmas is None else [float(x) for x in sigmas],
        "guidance": {"mode": "batched" if B == 2 else ("none" if B == 1 else "split"), "scale": float(guidance_scale), "branches": int(B)},
        "resolution": [256, 256],
        "conditions": list(range(N)),
        "samples_per_condition": 1,
        "seed": 0,
        "samples": [int(n0), int(n1)],
        "prior_count": int(N * B),
        "goc_count": int(N * B),
        "eoc_lags": int(eoc_lags),
        "eoc_prior": eoc_prior,
        "eoc_sample": 0,
        "gram_sketch": {"method": "exact", "dim": 0, "seed": 0},
        "units": units,
        "flops": {"full_step": float(full_step), "fixed_step": float(fixed_step), "counter": "synthetic"},
        "sensitivity": {"method": "synthetic", "samples": int(N), "seconds": 0.0},
        "shards": [],
    }
    return header, tensors


def encode_calibration(header: dict, tensors: dict[str, np.ndarray]) -> bytes:
    """safetensors bytes of a calibration file (header JSON in ``metadata["cachec_calibration"]``)."""
    from safetensors.numpy import save

    return save({k: tensors[k] for k in sorted(tensors)}, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def save_calibration(path: str, header: dict, tensors: dict[str, np.ndarray]) -> None:
    """Write a calibration file (for tests and benchmarks; ``calibrate/`` owns the real writer)."""
    with open(path, "wb") as f:
        f.write(encode_calibration(header, tensors))


def calibration_from_features(features: dict[str, np.ndarray], unit_flops, full_step: float, fixed_step: float | None = None,
                              sensitivity: np.ndarray | None = None, **kw) -> Calibration:
    """In-memory :class:`Calibration` from explicit features (see :func:`calibration_tensors`).

    Its ``sha256`` is that of :func:`encode_calibration` of the same header and tensors.
    """
    header, tensors = calibration_tensors(features, unit_flops, full_step, fixed_step, sensitivity, **kw)
    sha = hashlib.sha256(encode_calibration(header, tensors)).hexdigest()
    return calibration_from_tensors(header, tensors.__getitem__, set(tensors), sha)


def synthetic_features(blocks: int = 4, steps: int = 20, dim: int = 16, samples: int = 8, branches: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """DiT-like feature trajectories: units ``transformer_blocks.{l}.attn1`` and ``.ff`` per block.

    Each unit's output at step s is a per-sample static part plus a shared mean that drifts
    multiplicatively with the step (what EOC's prior captures), plus smooth oscillating modes with
    per-sample amplitudes and unit-specific rates, plus AR(1) noise whose size varies by unit.

    Returns:
        ``{name: (samples, branches, steps, dim) float64}``.
    """
    rng = np.random.default_rng(seed)
    tau = np.linspace(0.0, 1.0, steps) ** 0.7
    out = {}
    for l in range(blocks):
        for kind in ("attn1", "ff"):
            m = rng.normal(size=dim)
            z = 1.5 * rng.normal(size=(samples, branches, 1, dim))
            g = np.cos(np.pi * rng.uniform(0.3, 1.2) * tau + rng.uniform(0, np.pi))
            F = m * (1 + 0.5 * g[:, None]) + z
            rate = rng.uniform(0.5, 2.0)
            for _ in range(3):
                V = rng.normal(size=dim)
                f = rng.uniform(0.5, 2.5) * rate
                th = rng.uniform(0, 2 * np.pi)
                c = 1 + 0.3 * rng.normal(size=(samples, branches, 1, 1))
                F = F + c * np.cos(np.pi * f * tau + th)[:, None] * V
            sigma = rng.uniform(0.02, 0.2)
            rho = 0.9
            e = np.zeros((samples, branches, steps, dim))
            e[:, :, 0] = sigma * rng.normal(size=(samples, branches, dim))
            for s in range(1, steps):
                e[:, :, s] = rho * e[:, :, s - 1] + sigma * np.sqrt(1 - rho**2) * rng.normal(size=(samples, branches, dim))
            out[f"transformer_blocks.{l}.{kind}"] = F + e
    return out


def synthetic_sensitivity(names: list[str], steps: int, seed: int = 0) -> np.ndarray:
    """(U, S) sensitivities spanning ~1000x over steps (early steps matter most), deeper blocks a bit less."""
    rng = np.random.default_rng(seed + 1)
    tau = np.linspace(0.0, 1.0, steps)
    U = len(names)
    depth = np.linspace(0.0, 1.0, U)[:, None]
    return 10.0 ** (-3 * tau)[None, :] * (1.5 - 0.5 * depth) * np.exp(0.2 * rng.normal(size=(U, steps)))


def synthetic_calibration(blocks: int = 4, steps: int = 20, dim: int = 16, samples: int = 8, branches: int = 2, seed: int = 0,
                          eoc_lags: int = 2, attention_maps: bool = False) -> Calibration:
    """An in-memory DiT-XL/2-shaped calibration from :func:`synthetic_features` (2 units per block).

    FLOPs per unit are DiT-XL/2's (attention 3.02e9, MLP 5.44e9 per image per forward), the full step
    scaled so the fixed part is DiT-XL/2's share (~0.1%); sensitivity from :func:`synthetic_sensitivity`;
    sigmas linear from 1 to 1/S. ``attention_maps``: each ``attn1`` also holds a nested map unit
    (``….attn1.cachec_map``, trajectories of another draw) with half its FLOPs, as measured at DiT-XL/2 size
    (docs/hgc.md, "At full width").
    """
    feats = synthetic_features(blocks, steps, dim, samples, branches, seed)
    if attention_maps:
        other = synthetic_features(blocks, steps, dim, samples, branches, seed + 100)
        feats = {k: v for n, f in feats.items()
                 for k, v in ([(n, f)] + ([(f"{n}.cachec_map", other[n])] if n.endswith("attn1") else []))}
    names = list(feats)
    per = {"attn1": DIT_XL_ATTN_FLOPS / (2 if attention_maps else 1), "cachec_map": DIT_XL_ATTN_FLOPS / 2,
           "ff": DIT_XL_FF_FLOPS}
    flops = np.array([per[n.rsplit(".", 1)[-1]] for n in names])
    full = float(flops.sum()) * DIT_XL_FULL_FLOPS / (28 * (DIT_XL_ATTN_FLOPS + DIT_XL_FF_FLOPS))
    sens = synthetic_sensitivity(names, steps, seed)
    sig = np.linspace(1.0, 1.0 / steps, steps)
    return calibration_from_features(feats, flops, full, None, sens, eoc_lags=eoc_lags, timesteps=1000 * sig, sigmas=sig)
