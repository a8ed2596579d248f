"""Sample from an exported plan (``cachec export PLAN --onnx DIR``) with onnxruntime and numpy, no PyTorch.

:class:`OnnxSampler` reads ``manifest.json`` (docs/onnx.md), opens one onnxruntime session per step graph
and runs cachec's sampling loop (:class:`cachec.pipeline.DigitsPipeline`) in numpy: per step, the step's
graph is fed the sample (both CFG halves in one batch, conditional first, or one call per branch for a
split-CFG plan), the timestep and the class labels plus the cache tensors the manifest says it reads; the
cache tensors it writes are kept (per guidance branch) until the step the manifest frees them at. Then the
CFG combine ``uncond + g·(cond − uncond)`` and the scheduler step, with the per-step float32 scalars the
export computed from the scheduler (Euler: ``x + dt·v``; DDIM, eta 0: ``√ᾱ_prev·x̂₀ + c·ε̂``) in the same
operation order as diffusers, so the only difference to the torch runtime is the transformer's kernels.

``OnnxSampler(DIR, uncached=True)`` runs ``uncached.onnx`` at every step: the uncached baseline of the same
loop (what ``bench/bench_onnx.py`` measures the speed-up against).

Imports numpy and onnxruntime (``pip install 'cachec[onnx]'``), never torch. Initial noise is an input:
pass the noise the torch pipeline would draw to reproduce its images (``torch.randn`` per sample seed), or
use :func:`numpy_noise` (numpy's generator: other images than torch's for the same seed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """The folder holds no manifest this loop can run (missing, another format version, bad inputs)."""


@dataclass
class LoopReport:
    """What one sampling run through the ONNX graphs did.

    Attributes:
        steps: sampling steps run.
        calls: graph calls (steps × calls per step).
        graph_calls: calls per graph name.
        flops: FLOPs of the run from the manifest (the plan's accounting: per step the fixed part plus the
            computed units, times samples × guidance branches).
        uncached_flops: the same run with every unit computed.
        flops_fraction: ``flops / uncached_flops`` (equals the plan's ``budget.realised``).
        wall_time_s: seconds of the sampling loop (graph calls and numpy steps; sessions already open).
        cache_peak: most cache tensors one guidance branch held at once.
    """

    steps: int = 0
    calls: int = 0
    graph_calls: dict[str, int] = field(default_factory=dict)
    flops: float = 0.0
    uncached_flops: float = 0.0
    flops_fraction: float = 0.0
    wall_time_s: float = 0.0
    cache_peak: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LoopOutput:
    """``images``: float32 (N, C, H, W) in [0, 1]; ``samples``: the raw final samples; ``report``."""

    images: np.ndarray
    samples: np.ndarray
    report: LoopReport


def load_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an export folder.

    Raises:
        ManifestError: no ``manifest.json``, not JSON, or another format version.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} holds no {MANIFEST}: export a plan first (cachec export PLAN --onnx {folder})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is not a readable JSON manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("cachec_onnx") != FORMAT_VERSION:
        got = manifest.get("cachec_onnx") if isinstance(manifest, dict) else None
        raise ManifestError(f"{path} is not a cachec ONNX manifest of version {FORMAT_VERSION} (cachec_onnx: {got!r})")
    return manifest


def numpy_noise(seeds: Sequence[int], sample_shape: Sequence[int]) -> np.ndarray:
    """Initial noise from numpy's generator, one ``default_rng(seed)`` per sample (not torch's numbers)."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(tuple(sample_shape), dtype=np.float32)
                     for s in seeds])


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("the ONNX sampling loop needs onnxruntime: pip install 'cachec[onnx]'") from exc
    return onnxruntime


class OnnxSampler:
    """onnxruntime sessions for an exported plan, and its sampling loop.

    Args:
        folder: the export folder (``manifest.json``, the graphs, ``weights.bin``).
        uncached: run ``uncached.onnx`` at every step instead of the plan (the baseline).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        threads: intra-op threads per session (None: onnxruntime's default).
        share_weights: load ``weights.bin`` once and give its tensors to every session
            (``SessionOptions.add_initializer``) instead of each session reading its own copy.

    Raises:
        ManifestError: see :func:`load_manifest`. ImportError: onnxruntime is not installed.
    """

    def __init__(self, folder: str | os.PathLike, *, uncached: bool = False, providers: Sequence[str] | None = None,
                 threads: int | None = None, share_weights: bool = True):
        ort = _ort()
        self.folder = Path(folder)
        self.manifest = m = load_manifest(folder)
        self.uncached = uncached
        self.sample_shape = tuple(m["model"]["sample_shape"])
        self.num_classes = int(m["model"]["num_classes"])
        self.guidance = m["guidance"]
        self.sampler = m["sampler"]
        self.steps = m["steps"]
        names = ["uncached"] if uncached else sorted({s["graph"] for s in self.steps})
        files = {n: (m["uncached"] if n == "uncached" else m["graphs"][n])["file"] for n in names}
        self._shared = self._load_weights(ort) if share_weights else {}
        self.sessions = {}
        for name, file in files.items():
            so = ort.SessionOptions()
            if threads is not None:
                so.intra_op_num_threads = int(threads)
                so.inter_op_num_threads = 1
            for w, value in self._shared.items():  # names a graph lacks are ignored by onnxruntime
                so.add_initializer(w, value)
            self.sessions[name] = ort.InferenceSession(str(self.folder / file), so,
                                                       providers=list(providers or ["CPUExecutionProvider"]))

    def _load_weights(self, ort) -> dict:
        """``{name: OrtValue}`` of every tensor in ``weights.bin`` (one copy in memory for all sessions)."""
        w = self.manifest["weights"]
        raw = np.fromfile(self.folder / w["file"], dtype=np.uint8)
        out = {}
        for name, e in w["tensors"].items():
            arr = raw[e["offset"]:e["offset"] + e["length"]].view(np.dtype(e["dtype"])).reshape(e["dims"])
            out[name] = ort.OrtValue.ortvalue_from_numpy(arr)
        self._raw = raw  # the OrtValues borrow this buffer
        return out

    # ------------------------------------------------------------------ the loop

    def _check(self, class_labels, noise) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(class_labels)
        if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"class labels: expected a non-empty 1-D sequence of ints, got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            bad = int(labels[(labels < 0) | (labels >= self.num_classes)][0])
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{self.num_classes - 1}")
        noise = np.asarray(noise, dtype=np.float32)
        if noise.shape != (labels.size, *self.sample_shape):
            raise ValueError(f"noise has shape {list(noise.shape)}, expected {[labels.size, *self.sample_shape]}")
        return labels.astype(np.int64), noise

    def _scheduler_step(self, i: int, pred: np.ndarray, x: np.ndarray) -> np.ndarray:
        p = self.sampler
        if p["kind"] == "euler":
            return x + np.float32(p["dt"][i]) * pred
        sa, sb, sap, c = (np.float32(v) for v in p["per_step"][i])
        kind = p["prediction_type"]
        if kind == "v_prediction":
            x0 = sa * x - sb * pred
            eps = sa * pred + sb * x
        elif kind == "epsilon":
            x0 = (x - sb * pred) / sa
            eps = pred
        else:  # sample
            x0 = pred
            eps = (x - sa * x0) / sb
        if p.get("clip_sample") is not None:
            r = np.float32(p["clip_sample"])
            x0 = np.clip(x0, -r, r)
        return sap * x0 + c * eps

    def __call__(self, class_labels: Sequence[int], noise: np.ndarray,
                 callback: Callable[[int, int], None] | None = None) -> LoopOutput:
        """Sample one image per class label from ``noise`` (N, C, H, W).

        Raises:
            ValueError: labels out of range or not ints; noise of the wrong shape.
        """
        labels, x = self._check(class_labels, noise)
        n = labels.size
        g = self.guidance
        mode, scale = g["mode"], np.float32(g["scale"])
        cond_first = self.manifest["model"]["cond_first"]
        null = np.full(n, int(self.manifest["model"]["null_class"]), dtype=np.int64)
        pair = [labels, null] if cond_first else [null, labels]
        branches = 2 if mode == "split" else 1
        caches: list[dict[str, np.ndarray]] = [{} for _ in range(branches)]
        report = LoopReport()
        self._held = 0
        fl = self.manifest["flops"]
        width = n * g["branches"]
        t0 = time.perf_counter()
        x = x * np.float32(self.sampler["init_noise_sigma"])
        for i, step in enumerate(self.steps):
            t = np.float32(self.sampler["timesteps"][i])
            name = "uncached" if self.uncached else step["graph"]
            sess = self.sessions[name]
            if mode == "batched":
                calls = [(np.concatenate([x, x]), np.concatenate(pair))]
            elif mode == "split":
                calls = [(x, pair[0]), (x, pair[1])]
            else:
                calls = [(x, labels)]
            outs = []
            for b, (inp, lab) in enumerate(calls):
                outs.append(self._call(sess, step, caches[b], inp, np.full(len(inp), t, dtype=np.float32), lab))
            report.cache_peak = max(report.cache_peak, self._held)
            if mode == "batched":
                first, second = outs[0][:n], outs[0][n:]
            elif mode == "split":
                first, second = outs
            if mode == "none":
                pred = outs[0]
            else:
                cond, uncond = (first, second) if cond_first else (second, first)
                pred = uncond + scale * (cond - uncond)
            x = self._scheduler_step(i, pred, x)
            report.steps += 1
            report.calls += len(calls)
            report.graph_calls[name] = report.graph_calls.get(name, 0) + len(calls)
            report.flops += (fl["full_step"] if self.uncached else step["flops"]) * width
            report.uncached_flops += fl["full_step"] * width
            if callback is not None:
                callback(i, len(self.steps))
        report.wall_time_s = time.perf_counter() - t0
        report.flops_fraction = report.flops / report.uncached_flops
        images = (np.clip(x, -1.0, 1.0) + np.float32(1.0)) / np.float32(2.0)
        return LoopOutput(images=images.astype(np.float32), samples=x, report=report)

    def _call(self, sess, step: dict, cache: dict, inp: np.ndarray, t: np.ndarray, labels: np.ndarray) -> np.ndarray:
        feeds = {"hidden_states": inp, "timestep": t, "class_labels": labels}
        if self.uncached:
            return sess.run(["sample"], feeds)[0]
        for name, key in step["reads"].items():
            feeds[name] = cache[key]
        names = ["sample", *step["writes"]]
        out = sess.run(names, feeds)
        for name, value in zip(names[1:], out[1:]):
            cache[step["writes"][name]] = value
        self._held = max(self._held, len(cache))
        for key in step["frees"]:
            cache.pop(key, None)
        return out[0]


def sample(folder: str | os.PathLike, class_labels: Sequence[int], noise: np.ndarray, **kwargs) -> LoopOutput:
    """One run: ``OnnxSampler(folder, **kwargs)(class_labels, noise)``."""
    return OnnxSampler(folder, **kwargs)(class_labels, noise)


def _classes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cachec.runtime.onnx_loop DIR [--classes 0-9] [--seed 0] [--uncached] [--out images.npy]``:
    one run with numpy noise (:func:`numpy_noise`, seeds SEED + i); prints the report as JSON."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cachec.runtime.onnx_loop", description=main.__doc__)
    ap.add_argument("folder")
    ap.add_argument("--classes", default="0-9", help="labels and ranges, e.g. 0-9 or 1,3,5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--uncached", action="store_true", help="run uncached.onnx at every step (the baseline)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the images (N, C, H, W) float32 to this .npy file")
    args = ap.parse_args(argv)
    try:
        sampler = OnnxSampler(args.folder, uncached=args.uncached, threads=args.threads)
        labels = _classes(args.classes)
        noise = numpy_noise([args.seed + i for i in range(len(labels))], sampler.sample_shape)
        out = sampler(labels, noise)
    except (ManifestError, ValueError) as exc:
        print(f"Error: {str(exc).splitlines()[0]}")
        return 1
    if args.out:
        np.save(args.out, out.images)
    print(json.dumps(out.report.as_dict()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
