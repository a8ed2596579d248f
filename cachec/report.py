"""Quality report: how far a cached sampler's images are from the uncached ones.

A caching method is judged on sample *pairs*: the candidate (cached) image and the reference (uncached)
image made from the same class label, guidance scale and seed. :func:`evaluate` reports

- **PSNR** (dB) and **SSIM** per image pair (:mod:`cachec.metrics`) — pixel-level faithfulness to the
  uncached output;
- **class accuracy** — the fraction of images that the pretrained digit classifier
  (:mod:`cachec.classifier`) assigns to the requested class, for candidate and reference;
- **Fréchet distance (digit-classifier features)** (:mod:`cachec.frechet`) — between Gaussians fitted to
  the classifier's 256-d features of a sample set and of the 500 held-out real digits
  (:func:`cachec.data.split_digits`). Not FID, and never to be called FID.

:func:`format_table` prints such results; :func:`compare_sample_files` evaluates two sample-set files
(:mod:`cachec.samples`). Images follow the convention of :mod:`cachec.metrics`.

JSON convention: :func:`evaluate` returns a JSON-ready dict. PSNR of identical images is +∞; in that dict
±∞ is written as the *string* ``"inf"`` / ``"-inf"`` and NaN as ``null`` (as
:func:`cachec.runtime.io.to_jsonable` writes them), so ``json.dumps(..., allow_nan=False)`` succeeds and
the meaning survives.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from .attributes import adherence
from .classifier import classify, reference_features
from .control import condition_masks, control_iou, prompt_of
from .digit_prompts import parse
from .frechet import FRECHET_NAME, frechet_distance
from .metrics import IMAGE_SHAPE, as_image_batch, as_labels, check_unit_range, mean_ci, psnr, ssim
from .runtime.io import to_jsonable
from .samples import load_samples

__all__ = ["compare_sample_files", "evaluate", "format_table"]


def _json_float(v: Any) -> float | str | None:
    """``v`` as a float in the JSON convention: None → None, NaN → None, ±inf → ``"inf"``/``"-inf"``.

    Ints (and 0-d tensors, numpy scalars) become floats first, so ``wall_s=3`` is written as ``3.0``.

    Raises:
        TypeError / ValueError: ``v`` has no float value.
    """
    return None if v is None else to_jsonable(float(v))


#: what no cachec report measures, and why (keys of ``not_measured``)
NEVER_MEASURED = {
    "lpips": "LPIPS needs pretrained network weights, which cachec does not ship and never downloads",
    "fid": "FID needs Inception weights, which cachec does not ship and never downloads",
}
#: why the digit-classifier metrics are left out for other models
NOT_DIGITS = "the digit classifier is trained on 1x32x32 MNIST digits (classes 0..9): its score means nothing here"


def _summary(values: torch.Tensor) -> dict[str, Any]:
    """mean/std(population)/min/max of a float64 vector and ``ci95``, the paired bootstrap 95 % interval of
    the mean (:func:`cachec.metrics.mean_ci`; null for N < 2 or a non-finite score); any +inf makes the
    mean inf and the std NaN."""
    v = values.to(torch.float64)
    if v.numel() == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "ci95": None, "per_image": []}
    std = float(v.std(unbiased=False)) if bool(torch.isfinite(v).all()) else float("nan")
    ci = mean_ci(v)
    return {
        "mean": _json_float(float(v.mean())),
        "ci95": [_json_float(ci[0]), _json_float(ci[1])] if ci is not None else None,
        "std": _json_float(std),
        "min": _json_float(float(v.min())),
        "max": _json_float(float(v.max())),
        "per_image": [_json_float(x) for x in v.tolist()],
    }


def evaluate(
    candidate: torch.Tensor,
    reference: torch.Tensor,
    labels: Any,
    *,
    flops_per_image: float | None = None,
    wall_s: float | None = None,
    name: str | None = None,
    digit_metrics: bool = True,
) -> dict[str, Any]:
    """Compare candidate (cached) samples with reference (uncached) samples of the same conditions and seeds.

    Args:
        candidate, reference: float tensors (N, C, H, W) with values in [0, 1] ((N, 1, 32, 32) with
            ``digit_metrics``); row i of both must come from the same condition, guidance and seed.
        labels: int (N,) requested digit classes 0..9 (tensor, array or sequence), or N prompts of the
            prompt-conditioned digit model (:mod:`cachec.digit_prompts`: the class is parsed from each, and
            ``attribute_adherence`` is added), or N ``"PROMPT | SPLIT:K"`` conditions of the control model
            (``control_iou`` is added too); only read with ``digit_metrics`` (any value, e.g. None, otherwise).
        digit_metrics: also measure class accuracy and the Fréchet distance in digit-classifier features
            (the digit models); False for any other model: those entries are null and ``not_measured``
            says why.
        flops_per_image: passed through (FLOPs of the candidate sampler per image; see :mod:`cachec.runtime.flops`).
        wall_s: passed through (candidate wall-clock seconds, the caller's choice of scope).
        name: optional row name for :func:`format_table`.

    Returns:
        A JSON-ready dict (±inf as ``"inf"``/``"-inf"``, NaN as ``None``)::

            name, n_images,
            psnr_db:  {mean, std, min, max, per_image}   # dB, "inf" for identical images;
                                                          # mean "inf" and std null if any image is identical
            ssim:     {mean, std, min, max, per_image}   # std is the population std
            mse_mean                                      # mean over all pixels of all images
            psnr_of_mean_mse_db                           # 10·log10(1 / mse_mean): finite unless all identical
            n_identical                                   # image pairs that are bit-identical
            max_abs_diff                                  # largest pixel difference
            not_measured: {metric: why}                   # what this report leaves out, and why
            class_accuracy: {candidate, reference}        # fraction judged the requested label
            class_agreement                               # fraction where the classifier gives both the same label
            attribute_adherence: {thickness|slant|both: {candidate, reference}, n, chance}   # prompts only
            control_iou: {candidate, reference}: {mean, std, min, max, ci95, per_image}   # conditions with a
                # control mask ("PROMPT | SPLIT:K", cachec.control) only: IoU of the ink with the mask
            frechet_distance: {name, candidate, reference, candidate_vs_reference, real_set_size}
                # d² to the 500 held-out real digits (and between the two sample sets); null if N < 2
            flops_per_image, wall_s                       # pass-through

    Raises:
        TypeError / ValueError: shapes differ (or are not (N, 1, 32, 32) with ``digit_metrics``), values
            outside [0, 1] or non-finite, labels not (N,) integers in 0..9 (``digit_metrics``).
        RuntimeError: classifier or digit data package missing (``digit_metrics``).
    """
    cand = as_image_batch(candidate, "candidate").to("cpu", torch.float32)
    ref = as_image_batch(reference, "reference").to("cpu", torch.float32)
    for t, what in ((cand, "candidate"), (ref, "reference")):
        if digit_metrics and tuple(t.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"{what} must have shape (N, 1, 32, 32), got {tuple(t.shape)}")
        check_unit_range(t, what)
    if cand.shape != ref.shape:
        raise ValueError(f"candidate and reference shapes differ: {tuple(cand.shape)} vs {tuple(ref.shape)}")
    n = cand.shape[0]
    if not digit_metrics:
        return _pixel_report(cand, ref, n, name, flops_per_image, wall_s)
    prompts = _prompts(labels)
    masks = condition_masks(prompts) if prompts is not None else None  # "PROMPT | SPLIT:K" conditions
    if prompts is not None:
        prompts = [prompt_of(p) for p in prompts]
    lab = as_labels([parse(p)[0] for p in prompts] if prompts is not None else labels, n)

    cand_pred, cand_feat = classify(cand)
    ref_pred, ref_feat = classify(ref)
    if n >= 2:
        real = reference_features()
        fd = {
            "candidate": frechet_distance(cand_feat, real),
            "reference": frechet_distance(ref_feat, real),
            "candidate_vs_reference": frechet_distance(cand_feat, ref_feat),
        }
        real_n = int(real.shape[0])
    else:
        fd = {"candidate": None, "reference": None, "candidate_vs_reference": None}
        real_n = None

    def frac(mask: torch.Tensor) -> float | None:
        return float(mask.double().mean()) if n else None

    return {
        "name": name,
        "n_images": n,
        **_pixel_part(cand, ref, n),
        "not_measured": dict(NEVER_MEASURED),
        "class_accuracy": {"candidate": frac(cand_pred == lab), "reference": frac(ref_pred == lab)},
        "class_agreement": frac(cand_pred == ref_pred),
        "frechet_distance": {"name": FRECHET_NAME, **{k: _json_float(v) for k, v in fd.items()}, "real_set_size": real_n},
        **({} if prompts is None else {"attribute_adherence": _adherence(cand, ref, prompts)}),
        **({} if masks is None else {"control_iou": {"candidate": _summary(torch.from_numpy(control_iou(cand, masks))),
                                                     "reference": _summary(torch.from_numpy(control_iou(ref, masks)))}}),
        "flops_per_image": to_jsonable(flops_per_image),
        "wall_s": _json_float(wall_s),
    }


def _prompts(labels: Any) -> list[str] | None:
    """``labels`` as a list of prompts when they are strings (the prompt-conditioned digit model), else None."""
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(x, str) for x in labels):
        return list(labels)
    return None


def _adherence(cand: torch.Tensor, ref: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
    """``{attribute: {candidate, reference}, n, chance}`` from :func:`cachec.attributes.adherence`."""
    targets = [parse(p) for p in prompts]
    c, r = adherence(cand, targets), adherence(ref, targets)
    out = {k: {"candidate": c[k], "reference": r[k]} for k in ("thickness", "slant", "both")}
    out.update(n=c["n"], chance=c["chance"])
    return out


def _pixel_part(cand: torch.Tensor, ref: torch.Tensor, n: int) -> dict[str, Any]:
    p = psnr(cand, ref)
    sq = (cand.double() - ref.double()).pow(2)
    mse_mean = float(sq.mean()) if n else float("nan")
    psnr_mean_mse = float("nan") if not n else (math.inf if mse_mean == 0.0 else 10.0 * math.log10(1.0 / mse_mean))
    return {
        "psnr_db": _summary(p),
        "ssim": _summary(ssim(cand, ref)),
        "mse_mean": _json_float(mse_mean),
        "psnr_of_mean_mse_db": _json_float(psnr_mean_mse),
        "n_identical": int(torch.isinf(p).sum()),
        "max_abs_diff": _json_float(float((cand - ref).abs().max())) if n else None,
    }


def _pixel_report(cand, ref, n, name, flops_per_image, wall_s) -> dict[str, Any]:
    """:func:`evaluate` without the digit-classifier metrics (null, with the reason in ``not_measured``)."""
    return {
        "name": name,
        "n_images": n,
        **_pixel_part(cand, ref, n),
        "not_measured": {"class_accuracy": NOT_DIGITS, "frechet_distance": NOT_DIGITS, **NEVER_MEASURED},
        "class_accuracy": None,
        "class_agreement": None,
        "frechet_distance": None,
        "flops_per_image": to_jsonable(flops_per_image),
        "wall_s": _json_float(wall_s),
    }


def _fmt_num(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v  # "inf" / "-inf"
    return format(v, spec)


def _fmt_pm(d: dict | None, spec: str) -> str:
    if not d or d.get("mean") is None:
        return "-"
    mean = _fmt_num(d["mean"], spec)
    if d.get("std") is None:
        return mean
    ci = d.get("ci95")
    tail = f" [{_fmt_num(ci[0], spec)}, {_fmt_num(ci[1], spec)}]" if ci else ""
    return f"{mean} ± {_fmt_num(d['std'], spec)}{tail}"


def format_table(results: dict | Sequence[dict]) -> str:
    """A fixed-width text table of one or more :func:`evaluate` results, one row each.

    Columns: name (or the row index), N, PSNR dB mean ± std [95 % interval of the mean], PSNR of the mean
    MSE (dB), SSIM mean ± std [95 % interval], class accuracy candidate (reference), Fréchet distance (digit-classifier features) to held-out real
    digits candidate (reference), GFLOP per image, wall seconds. Missing values print as ``-``.

    Raises:
        TypeError: ``results`` is not a dict or a sequence of dicts.
    """
    rows = [results] if isinstance(results, dict) else list(results)
    if not all(isinstance(r, dict) for r in rows):
        raise TypeError("format_table expects an evaluate() dict or a list of them")
    header = ["name", "N", "PSNR dB", "PSNR(mean MSE)", "SSIM", "acc cand (ref)", "Fréchet cand (ref)", "GFLOP/img", "wall s"]
    body = []
    for i, r in enumerate(rows):
        acc = r.get("class_accuracy") or {}
        fd = r.get("frechet_distance") or {}
        flops = r.get("flops_per_image")
        gflops = flops / 1e9 if isinstance(flops, (int, float)) else flops
        body.append([
            str(r.get("name") or i),
            _fmt_num(r.get("n_images"), "d"),
            _fmt_pm(r.get("psnr_db"), ".2f"),
            _fmt_num(r.get("psnr_of_mean_mse_db"), ".2f"),
            _fmt_pm(r.get("ssim"), ".4f"),
            f"{_fmt_num(acc.get('candidate'), '.3f')} ({_fmt_num(acc.get('reference'), '.3f')})",
            f"{_fmt_num(fd.get('candidate'), '.2f')} ({_fmt_num(fd.get('reference'), '.2f')})",
            _fmt_num(gflops, ".3f"),
            _fmt_num(r.get("wall_s"), ".2f"),
        ])  # fmt: skip
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

# --------------------------------------------------------------------------------------------------------
# sample-set files


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"lengths {a.shape[0]} vs {b.shape[0]}"
    idx = torch.nonzero(a != b).flatten()
    i = int(idx[0])
    return f"{idx.numel()} positions differ, first at index {i}: {int(a[i])} vs {int(b[i])}"


def compare_sample_files(
    candidate_path: str | os.PathLike, reference_path: str | os.PathLike, *, name: str | None = None
) -> dict[str, Any]:
    """Evaluate a candidate sample-set file against a reference file of the same labels and seeds.

    Calls :func:`evaluate` with the candidate's ``flops_per_image`` and ``wall_s`` from its metadata and
    adds ``candidate_file``, ``reference_file``, ``candidate_meta``, ``reference_meta``,
    ``reference_flops_per_image``, ``reference_wall_s`` and ``flops_fraction`` (candidate / reference
    FLOPs per image, null when either is unknown).

    The digit-classifier metrics are measured only where they apply (a sample set of the digit models:
    format version 1, a ``family`` whose registry entry has ``digit_metrics``, or, without a family, 1×32×32
    images of classes 0..9); otherwise they are null and ``not_measured`` says why. ``speedup`` is the
    reference's ``wall_s`` over the candidate's (null when either is unknown; the two were timed by
    separate commands, so machine load can differ between them).

    Raises:
        ValueError: conditions (labels or prompts), seeds or set sizes differ (the message names which and
            the first differing index), the two files name different models, or anything :func:`load_samples`
            raises.
    """
    cand = load_samples(candidate_path)
    ref = load_samples(reference_path)
    if cand.condition_kind != ref.condition_kind:
        raise ValueError(f"{cand.path} holds {cand.condition_kind} conditions, {ref.path} {ref.condition_kind} ones")
    if cand.prompts is not None and cand.prompts != ref.prompts:
        i = next((k for k, (a, b) in enumerate(zip(cand.prompts, ref.prompts)) if a != b), min(len(cand.prompts), len(ref.prompts)))
        raise ValueError(f"prompts of {cand.path} and {ref.path} do not match (lengths {len(cand.prompts)} vs "
                         f"{len(ref.prompts)}, first difference at index {i}); samples must be paired by prompt and seed")
    for what in ("labels", "seeds") if cand.prompts is None else ("seeds",):
        a, b = getattr(cand, what), getattr(ref, what)
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(
                f"{what} of {cand.path} and {ref.path} do not match ({_first_mismatch(a, b)}); "
                "samples must be paired by label and seed"
            )
    if cand.meta.get("model") != ref.meta.get("model"):
        raise ValueError(f"model differs: {cand.meta.get('model')!r} ({cand.path}) vs {ref.meta.get('model')!r} ({ref.path})")
    result = evaluate(
        cand.images,
        ref.images,
        ref.prompts if ref.prompts is not None else ref.labels,
        flops_per_image=cand.meta.get("flops_per_image"),
        wall_s=cand.meta.get("wall_s"),
        name=name,
        digit_metrics=_digit_set(ref),
    )
    cf, rf = cand.meta.get("flops_per_image"), ref.meta.get("flops_per_image")
    cw, rw = cand.meta.get("wall_s"), ref.meta.get("wall_s")
    result.update(
        candidate_file=cand.path,
        reference_file=ref.path,
        candidate_meta=to_jsonable(cand.meta),
        reference_meta=to_jsonable(ref.meta),
        reference_flops_per_image=to_jsonable(rf),
        reference_wall_s=_json_float(ref.meta.get("wall_s")) if isinstance(ref.meta.get("wall_s"), (int, float)) else None,
        flops_fraction=(cf / rf) if isinstance(cf, (int, float)) and isinstance(rf, (int, float)) and rf > 0 else None,
        speedup=(rw / cw) if isinstance(cw, (int, float)) and isinstance(rw, (int, float)) and cw > 0 else None,
    )
    return result


def _digit_set(s) -> bool:
    """Whether the digit classifier applies to a sample set (see :func:`compare_sample_files`)."""
    from .runtime.registry import registered

    if s.version == 1:
        return True
    family = s.meta.get("family")
    if family is not None:
        return any(spec.name == family and spec.digit_metrics for spec in registered())
    return (s.labels is not None and tuple(s.images.shape[1:]) == IMAGE_SHAPE
            and (not len(s.labels) or int(s.labels.max()) <= 9))
