"""Calibration at real widths (issue 12): file size, peak memory and throughput (run by hand, not a test).

    python bench/bench_scale.py                          # the four families, full width, depths 1 and 2
    python bench/bench_scale.py --case dit-xl2-2blocks   # the issue's must-show (below)
    python bench/bench_scale.py --case flux-1024         # FLUX.1-dev width at 1024², 1 + 1 blocks
    python bench/bench_scale.py --families sd3 --depths 1,2 --px 512 --steps 2 --samples 1
    python bench/bench_scale.py --report a.json b.json      # one table from rows saved with --json

Models come from :func:`cachec.shapes.build_pipeline`: the published transformer config of each family's
reference checkpoint (DiT-XL/2-256, PixArt-Σ-XL/2-1024-MS, SD3-medium, FLUX.1-dev) at full width with a
few blocks (FLUX: ``depth`` double + ``depth`` single blocks), random weights, a small 8× VAE and tiny text
encoders of the real output widths. Each model is built once into ``--workdir``; then every measurement is
a fresh subprocess that loads it and runs either plain uncached sampling (``Driver.generate``) or
``calibrate(..., sensitivity="none")`` on the same conditions, seeds (0..n-1), steps and batch (all samples
in one batch), with calibrate()'s EOC grouping (``--eoc-prior``, ``--eoc-sample``; the case name ends in
``to``/``ch``/``el``). Per case the table shows:

- ``file MB``: the calibration file; ``pred`` = 8 length bytes + JSON header + the tensor bytes of the
  format's tensor table (:func:`cachec.shapes.predicted_file_bytes`, exact); ``doc`` = header + the size
  formula of docs/calibration-format.md ("Memory and size"), an upper bound;
- ``plain MB`` / ``calib MB``: peak RSS (``ru_maxrss``) of the whole process; ``ratio`` (target <= 1.3);
- ``extra MB``: calib − plain peak; ``pred`` = the documented buffers + EOC sums
  (:func:`cachec.shapes.predicted_extra_bytes`) and ``+maps`` with what the documented formula leaves out
  added: the CountSketch maps (16 bytes per element of each sketched unit) and the EOC subset indices;
- ``thr``: calibration ÷ plain-sampling throughput (samples/s; target >= 0.9) in wall time, ``thrCPU`` in
  process CPU time (a shared machine disturbs CPU time less), ``thr-fl`` / ``CPU-fl`` the same without the
  FLOP-count pass;
- ``flops s`` / ``pre-flops MB``: seconds of calibration's FLOP-count pass (one more transformer forward on
  the MATH attention kernel, :mod:`cachec.calibrate.costs`) and the calibration process's peak RSS just
  before it (a peak above it was set by that pass or later).

Below the table, for each family with two depths: the per-block increments of file size and extra memory,
measured vs predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6

#: the default sweep: family -> (pixels, steps, samples)
SWEEP = {"dit": (256, 2, 1), "pixart": (512, 2, 1), "sd3": (512, 2, 1), "flux": (1024, 2, 1)}

#: named presets: (family, depths, pixels, steps, samples)
CASES = {
    # the must-show: DiT-XL/2 width, 2 of 28 blocks, 10 DDIM steps, 2 samples, 256x256
    "dit-xl2-2blocks": ("dit", (2,), 256, 10, 2),
    # FLUX.1-dev width at 1024x1024 (4096 image + 512 text tokens), 1 double + 1 single block
    "flux-1024": ("flux", (1,), 1024, 2, 1),
}
TARGETS = {"file_mb": 4.0, "rss_ratio": 1.3, "throughput": 0.9}

_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]
_PROMPTS = ["a photo of a red car", "a small blue house", "a big tree in the sky", "a green dog on the car"]


def _conditions(family: str, n: int) -> list:
    pool = _CLASSES if family == "dit" else _PROMPTS
    return [pool[i % len(pool)] for i in range(n)]


_MALLOC: dict[str, str] = {}  # extra environment of the workers (--malloc-mmap-threshold)


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), **_MALLOC)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KB on Linux


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- subprocess workers -------------------------------------------------------------------------------


def _worker(a) -> None:
    """One measurement in this (fresh) process; prints one JSON line prefixed ``RESULT``."""
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "build":
        from cachec.shapes import build_folder

        t0 = time.perf_counter()
        build_folder(a.family, a.depth, a.folder, seed=0, sample_size=a.px // 8 if a.family == "dit" else None)
        Path(a.folder, "bench_scale.json").write_text(json.dumps(dict(family=a.family, depth=a.depth, px=a.px)))
        print("RESULT " + json.dumps(dict(seconds=time.perf_counter() - t0, rss_mb=_maxrss_mb())), flush=True)
        return
    from cachec.loading import load_model, quiet_diffusers

    with quiet_diffusers():
        driver = load_model(a.folder)
    if a.family != "dit":
        driver.set_resolution((a.px, a.px))
    conds = _conditions(a.family, a.samples)
    out = dict(rss_loaded_mb=_maxrss_mb())
    with torch.no_grad():
        if a.worker == "plain":
            c0, t0 = _cpu_s(), time.perf_counter()
            driver.generate(conds, list(range(a.samples)), steps=a.steps)
            out.update(seconds=time.perf_counter() - t0, cpu_s=_cpu_s() - c0)
        else:
            import cachec.calibrate.sampling as sampling
            from cachec.calibrate import calibrate

            inner = sampling.count_unit_flops

            def timed(*args, **kwargs):  # instrumentation only: time the FLOP-count pass, peak before it
                out["pre_flops_rss_mb"] = _maxrss_mb()
                t, c = time.perf_counter(), _cpu_s()
                r = inner(*args, **kwargs)
                out["flops_s"], out["flops_cpu_s"] = time.perf_counter() - t, _cpu_s() - c
                return r

            sampling.count_unit_flops = timed
            c0, t0 = _cpu_s(), time.perf_counter()
            eoc = {k: v for k, v in (("eoc_prior", a.eoc_prior), ("eoc_sample", a.eoc_sample)) if v is not None}
            calibrate(driver, conds, output=a.output, steps=a.steps, sensitivity="none", batch_size=a.samples,
                      progress=False, checkpoint_every=1e9, **eoc)
            out.update(seconds=time.perf_counter() - t0, cpu_s=_cpu_s() - c0)
    out["rss_mb"] = _maxrss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def _run(args: list[str], threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    p = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")


# ---- one case -----------------------------------------------------------------------------------------


def measure(family: str, depth: int, px: int, steps: int, samples: int, workdir: Path, threads: int,
            timeout: float, eoc: tuple[str, ...] = ()) -> dict:
    """Build (once), then plain sampling and calibration in fresh subprocesses; returns the row's numbers.

    Raises:
        RuntimeError: a subprocess failed (its stderr tail is in the message).
        subprocess.TimeoutExpired: one ran over ``timeout`` seconds.
    """
    from cachec.calibrate.format import read_header
    from cachec.shapes import documented_file_bytes, predicted_extra_bytes, predicted_file_bytes

    # DiT's image size is its transformer's sample_size: one folder per size; the text models take any size
    folder = workdir / (f"{family}-d{depth}-{px}" if family == "dit" else f"{family}-d{depth}")
    base = ["--family", family, "--depth", str(depth), "--px", str(px), "--folder", str(folder)]
    built = None
    if not (folder / "bench_scale.json").exists():
        built = _run(["--worker", "build", *base], threads, timeout)
    run = [*base, "--steps", str(steps), "--samples", str(samples), "--threads", str(threads)]
    plain = _run(["--worker", "plain", *run], threads, timeout)
    output = workdir / f"{family}-d{depth}-{px}-s{steps}-n{samples}{''.join(eoc[1::2])}.safetensors"
    cal = _run(["--worker", "calibrate", *run, *eoc, "--output", str(output)], threads, timeout)
    h = read_header(output)
    with open(output, "rb") as f:
        head = 8 + int.from_bytes(f.read(8), "little")
    extra = predicted_extra_bytes(h, samples)
    return dict(
        family=family, depth=depth, px=px, steps=steps, samples=samples, branches=h["guidance"]["branches"],
        eoc_prior=h["eoc_prior"], eoc_sample=h["eoc_sample"],
        units=len(h["units"]), numel=sum(u["numel"] for u in h["units"]),
        sketched=sum(u["sketch_dim"] < u["numel"] for u in h["units"]),
        file_mb=output.stat().st_size / MB, file_pred_mb=(head + predicted_file_bytes(h)) / MB,
        file_doc_mb=(head + documented_file_bytes(h)) / MB,
        plain_rss_mb=plain["rss_mb"], calib_rss_mb=cal["rss_mb"], loaded_rss_mb=plain["rss_loaded_mb"],
        rss_ratio=cal["rss_mb"] / plain["rss_mb"], extra_mb=cal["rss_mb"] - plain["rss_mb"],
        extra_doc_mb=(extra["buffers"] + extra["sums"]) / MB,
        extra_maps_mb=(extra["buffers"] + extra["sums"] + extra["maps"]) / MB,
        plain_s=plain["seconds"], calib_s=cal["seconds"], plain_cpu_s=plain["cpu_s"], calib_cpu_s=cal["cpu_s"],
        flops_s=cal.get("flops_s", float("nan")), flops_cpu_s=cal.get("flops_cpu_s", float("nan")),
        pre_flops_rss_mb=cal.get("pre_flops_rss_mb", float("nan")),
        build=built, threads=threads,
    )


# ---- report -------------------------------------------------------------------------------------------


def _derived(r: dict) -> dict:
    """The row with its throughput ratios (computed here, so rows saved by older versions print too)."""
    nan = float("nan")
    r = dict(r)
    r["throughput"] = r["plain_s"] / r["calib_s"]
    r["throughput_cpu"] = r["plain_cpu_s"] / r["calib_cpu_s"]
    r["throughput_no_flops"] = r["plain_s"] / (r["calib_s"] - r.get("flops_s", nan))
    r["throughput_cpu_no_flops"] = r["plain_cpu_s"] / (r["calib_cpu_s"] - r.get("flops_cpu_s", nan))
    return r


def table(rows: list[dict]) -> str:
    """The printed table (one line per case) and the per-block check."""
    rows = [_derived(r) for r in rows]
    hdr = (f"{'case':<20}{'S':>3}{'n':>3}{'B':>3}{'U':>4} {'file MB':>8}{'pred':>8}{'doc':>8} {'plain MB':>9}"
           f"{'calib MB':>9}{'ratio':>7} {'extra MB':>9}{'pred':>8}{'+maps':>8} {'plain s':>8}{'calib s':>8}"
           f"{'thr':>6}{'thrCPU':>7}{'thr-fl':>7}{'CPU-fl':>7} {'flops s':>8}{'pre-flops MB':>13}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        name = f"{r['family']} d{r['depth']} {r['px']}² {r.get('eoc_prior', 'channel')[:2]}"
        lines.append(
            f"{name:<20}{r['steps']:>3}{r['samples']:>3}{r['branches']:>3}{r['units']:>4} {r['file_mb']:>8.3f}"
            f"{r['file_pred_mb']:>8.3f}{r['file_doc_mb']:>8.3f} {r['plain_rss_mb']:>9.0f}{r['calib_rss_mb']:>9.0f}"
            f"{r['rss_ratio']:>7.2f} {r['extra_mb']:>9.0f}{r['extra_doc_mb']:>8.0f}{r['extra_maps_mb']:>8.0f}"
            f" {r['plain_s']:>8.1f}{r['calib_s']:>8.1f}{r['throughput']:>6.2f}{r['throughput_cpu']:>7.2f}"
            f"{r['throughput_no_flops']:>7.2f}"
            f"{r['throughput_cpu_no_flops']:>7.2f}"
            f" {r['flops_s']:>8.1f}{r['pre_flops_rss_mb']:>13.0f}"
        )
    by = {}
    for r in rows:
        key = (r["family"], r["px"], r["steps"], r["samples"], r.get("eoc_prior", "channel"))
        by.setdefault(key, {})[r["depth"]] = r
    checks = []
    for (fam, px, _, _, eoc), d in by.items():
        if len(d) < 2:
            continue
        lo, hi = sorted(d)[:2]
        a, b = d[lo], d[hi]
        k = hi - lo
        checks.append(
            f"{fam} {px}² ({eoc} EOC groups): per block (d{lo}→d{hi}): file "
            f"{1e3 * (b['file_mb'] - a['file_mb']) / k:.1f} kB measured, "
            f"{1e3 * (b['file_pred_mb'] - a['file_pred_mb']) / k:.1f} kB predicted; extra memory "
            f"{(b['extra_mb'] - a['extra_mb']) / k:.0f} MB measured, "
            f"{(b['extra_doc_mb'] - a['extra_doc_mb']) / k:.0f} MB "
            f"documented, {(b['extra_maps_mb'] - a['extra_maps_mb']) / k:.0f} MB with sketch maps "
            f"({(b['pre_flops_rss_mb'] - b['plain_rss_mb'] - a['pre_flops_rss_mb'] + a['plain_rss_mb']) / k:.0f} MB "
            f"measured before the FLOP-count pass)"
        )
    if checks:
        lines += ["", *checks]
    lines += ["", f"targets: file <= {TARGETS['file_mb']} MB (dit-xl2-2blocks), "
                  f"peak RSS ratio <= {TARGETS['rss_ratio']}, "
                  f"throughput >= {TARGETS['throughput']}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(CASES), help="a named preset instead of the sweep")
    p.add_argument("--families", default=",".join(SWEEP), help="families of the sweep, comma-separated")
    p.add_argument("--depths", default="1,2", help="blocks per case (FLUX: double = single), comma-separated")
    p.add_argument("--px", type=int, help="image side in pixels (default per family: %s)" %
                   ", ".join(f"{f} {v[0]}" for f, v in SWEEP.items()))
    p.add_argument("--steps", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--eoc-prior", choices=("token", "channel", "element"),
                   help="calibrate()'s eoc_prior (default: its default)")
    p.add_argument("--eoc-sample", type=int, help="calibrate()'s eoc_sample (default: its default)")
    p.add_argument("--workdir", help="where models and calibration files go (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per subprocess")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print the table of rows saved with --json (several "
                                                               "files: one table, e.g. two depths run apart)")
    p.add_argument("--malloc-mmap-threshold", type=int,
                   help="bytes: set glibc's MALLOC_MMAP_THRESHOLD_ in the workers (a fixed threshold returns freed "
                        "large blocks to the system at once: shows how much of a peak is allocator retention)")
    # worker mode (internal)
    p.add_argument("--worker", choices=("build", "plain", "calibrate"), help=argparse.SUPPRESS)
    p.add_argument("--family", choices=sorted(SWEEP), help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a)
    if a.report:
        print(table([r for f in a.report for r in json.loads(Path(f).read_text())]))
        return
    if a.malloc_mmap_threshold:
        _MALLOC["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    if a.case:
        fam, depths, px, steps, samples = CASES[a.case]
        plan = [(fam, d, px, steps, samples) for d in depths]
    else:
        depths = [int(x) for x in a.depths.split(",")]
        plan = [(f, d, a.px or SWEEP[f][0], a.steps or SWEEP[f][1], a.samples or SWEEP[f][2])
                for f in a.families.split(",") for d in depths]
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_scale_")
        workdir = Path(tmp.name)
    rows = []
    try:
        for fam, d, px, steps, samples in plan:
            print(f"[bench_scale] {fam} depth {d} {px}² steps {steps} samples {samples} ...", file=sys.stderr,
                  flush=True)
            eoc = tuple(x for k in ("eoc_prior", "eoc_sample") if getattr(a, k) is not None
                        for x in (f"--{k.replace('_', '-')}", str(getattr(a, k))))
            rows.append(measure(fam, d, px, steps, samples, workdir, a.threads, a.timeout, eoc))
            print(table(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
