"""Export a cache plan as ONNX step graphs plus a manifest, for runtimes without PyTorch (docs/onnx.md).

A plan is static: a run that follows it from step 0 computes, at each step, a fixed set of units and
predicts the others from fixed cached outputs with fixed coefficients. So a cached run is a small set of
distinct *step graphs*; :func:`export_plan` writes one ONNX graph per distinct step signature — which units
compute, and for each predicted unit its coefficients and EOC factor (``Σ_j coeffs[j]·H_j ⊙ (1 + α·D)``,
baked in as constants) — with the cached unit outputs as named graph inputs (``cache_in.{unit}.h{j}``, j = 1
most recent) and outputs (``cache_out.{unit}``), and a dynamic batch dimension. ``manifest.json`` maps each
step to its graph, the timestep it feeds, the cache tensors it reads and writes (``{unit}@{step}``: the output
unit ``unit`` produced at ``step``), the ones it frees, and its FLOPs in the plan's accounting; it also holds
the sampler arithmetic (per-step float32 scalars) that :mod:`cachec.runtime.onnx_loop` applies in numpy.

The step graphs are traced from the model with the plan's own arithmetic: a small
:class:`~cachec.runtime.hooks.UnitHandler` (installed with :func:`cachec.runtime.hooks.install`) computes a
unit or returns the prediction from the graph inputs, in the order and float32 rounding of
:meth:`cachec.runtime.executor.PlanExecutor.predict`. Large weights go to one ``weights.bin`` shared by all
graphs (:class:`~cachec.runtime.onnx_graph.SharedWeights`); ``uncached.onnx`` is the plain transformer, the
baseline a deployment compares against.

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter: it works offline with
torch 2.13 and needs no onnxscript). Scope: cachec's own sampling loop (registry ``split_cfg`` and class
conditions: the digit reference models) in float32, with ``FlowMatchEulerDiscreteScheduler`` (Euler, no
stochastic sampling) or ``DDIMScheduler`` (eta 0, no thresholding); anything else is refused in one line.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .compensation import combine
from .handle import plan_executor
from .hooks import install, same_timestep
from .io import atomic_write, file_sha256
from .onnx_graph import SharedWeights, check_graph, graph_flops
from .plan import COMPUTE, Plan, load_plan
from .registry import spec_for_pipeline
from .units import unwrap

MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
UNCACHED = "uncached.onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
SUPPORTED_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler")


class ExportError(ValueError):
    """The plan, the model or the scheduler cannot be exported (one line: what and why)."""


@dataclass
class ExportResult:
    """What :func:`export_plan` wrote.

    Attributes:
        folder: the output folder.
        manifest: path of ``manifest.json``; ``manifest_data`` its content.
        graphs: number of step graphs (``uncached.onnx`` not counted).
        seconds: wall time of the export (tracing, saving, checking, counting).
    """

    folder: Path
    manifest: Path
    manifest_data: dict
    graphs: int
    seconds: float


class _StepHandler:
    """The :class:`~cachec.runtime.hooks.UnitHandler` of one step graph while it is traced.

    ``compute[u]`` True computes unit u; otherwise ``predictors[u] = (coeffs, eoc, plain)`` predicts it from
    ``history[u]`` (tuple of features, H_1 first) exactly as :meth:`PlanExecutor.predict`: plain reuse returns
    H_1; else ``c_0·H_1 + c_1·H_2 + …`` left to right with 0-dim float32 coefficients, times the EOC factor.
    Features a later step reads (computed, or predicted under ``history: used``) are collected in ``stored``.
    """

    def __init__(self, keep: list[int], push_predictions: bool):
        self.keep, self.push = keep, push_predictions
        self.compute: list[bool] = [True] * len(keep)
        self.predictors: dict[int, tuple] = {}
        self.history: dict[int, tuple] = {}
        self.stored: dict[int, tuple] = {}
        self.store_all = False

    def begin_call(self, args, kwargs) -> None:
        self.stored = {}

    def end_call(self) -> None:
        pass

    def abort_call(self) -> None:
        pass

    def should_compute(self, index: int) -> bool:
        return self.compute[index]

    def stores(self, index: int) -> bool:
        return self.store_all or self.keep[index] > 0

    def store(self, index: int, feature) -> None:
        self.stored[index] = feature

    def predict(self, index: int):
        coeffs, eoc, plain = self.predictors[index]
        hist = self.history[index]
        feature = hist[0] if plain else combine(hist, [coeffs] * len(hist[0]), eoc)
        if self.push:
            self.stored[index] = feature
        return feature


class _StepGraph(torch.nn.Module):
    """The traced module of one step signature: (hidden_states, timestep, class_labels, *cache inputs) →
    (sample, *cache outputs)."""

    def __init__(self, transformer, handler: _StepHandler, reads: list[tuple[int, int]], writes: list[int],
                 parts: list[int]):
        super().__init__()
        self.transformer = transformer
        self.handler, self.reads, self.writes, self.parts = handler, reads, writes, parts

    def forward(self, hidden_states, timestep, class_labels, *cache):
        it = iter(cache)
        self.handler.history = {u: tuple(tuple(next(it) for _ in range(self.parts[u])) for _ in range(k))
                                for u, k in self.reads}
        out = self.transformer(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels,
                               return_dict=False)[0]
        stored = self.handler.stored
        return (out, *[stored[u][p] for u in self.writes for p in range(self.parts[u])])


def _part_name(base: str, p: int, parts: int) -> str:
    return base if parts == 1 else f"{base}.p{p}"


def _cache_key(unit: str, step: int, p: int, parts: int) -> str:
    return f"{unit}@{step}" if parts == 1 else f"{unit}@{step}/{p}"


def _sampler_program(scheduler, plan: Plan) -> dict:
    """The scheduler's step as per-step float32 scalars, computed with the scheduler's own tensors and
    torch's float32 arithmetic so that numpy reproduces ``scheduler.step`` bit for bit.

    Raises:
        ExportError: another scheduler class or configuration, or timesteps other than the plan's.
    """
    name, S = type(scheduler).__name__, plan.steps
    if name != plan.sampler.scheduler:
        raise ExportError(f"the plan was made with {plan.sampler.scheduler} but the model's scheduler is {name}")
    if name not in SUPPORTED_SCHEDULERS:
        raise ExportError(f"the ONNX sampling loop reproduces {' and '.join(SUPPORTED_SCHEDULERS)} only, not {name}")
    sch = copy.deepcopy(scheduler)
    cfg = sch.config
    sch.set_timesteps(S, device="cpu")
    ts = sch.timesteps
    if len(ts) != S:
        raise ExportError(f"the scheduler gives {len(ts)} timesteps for {S} steps; the plan has {S}")
    for k, (want, got) in enumerate(zip(plan.sampler.timesteps, ts)):
        if not same_timestep(float(want), float(got), ts.dtype):
            raise ExportError(f"the model's scheduler gives timestep {float(got):g} at step {k}, the plan {want:g}: "
                              "the plan was made for another schedule")
    f32 = lambda x: float(torch.as_tensor(x, dtype=torch.float32))  # noqa: E731
    prog: dict[str, Any] = {"scheduler": name, "timesteps": [f32(t) for t in ts],
                            "init_noise_sigma": float(getattr(sch, "init_noise_sigma", 1.0))}
    if name == "FlowMatchEulerDiscreteScheduler":
        if cfg.get("stochastic_sampling", False):
            raise ExportError("FlowMatchEulerDiscreteScheduler with stochastic_sampling is not reproduced by the ONNX loop")
        sig = sch.sigmas
        prog.update(kind="euler", dt=[f32(sig[i + 1] - sig[i]) for i in range(S)])
        return prog
    if cfg.get("thresholding", False):
        raise ExportError("DDIMScheduler with thresholding is not reproduced by the ONNX loop")
    pt = cfg.prediction_type
    if pt not in ("epsilon", "v_prediction", "sample"):
        raise ExportError(f"DDIMScheduler prediction_type {pt!r} is not reproduced by the ONNX loop")
    rows = []
    for t in ts:  # diffusers' DDIMScheduler.step with eta = 0 (what the pipeline calls), its 0-dim tensors
        t = int(t)
        prev = t - cfg.num_train_timesteps // sch.num_inference_steps
        a_t = sch.alphas_cumprod[t]
        a_prev = sch.alphas_cumprod[prev] if prev >= 0 else sch.final_alpha_cumprod
        b_t = 1 - a_t
        std = 0.0 * sch._get_variance(t, prev) ** 0.5
        rows.append([f32(a_t ** 0.5), f32(b_t ** 0.5), f32(a_prev ** 0.5), f32((1 - a_prev - std ** 2) ** 0.5)])
    prog.update(kind="ddim", prediction_type=pt, clip_sample=float(cfg.clip_sample_range) if cfg.clip_sample else None,
                coefficients=["sqrt_alpha", "sqrt_beta", "sqrt_alpha_prev", "direction"], per_step=rows)
    return prog


def _schedule(plan: Plan, keep: list[int]) -> list[dict]:
    """Per step: reads ``{(u, j): key}`` (j = 1 most recent), writes ``{u: step}`` and frees, for a run that
    follows the plan from step 0 (the executor's static schedule)."""
    used = plan.history == "used"
    hist: list[list[int]] = [[] for _ in plan.units]  # per unit: steps of its history entries, newest first
    out = []
    for s in range(plan.steps):
        reads, writes = {}, []
        for u, unit in enumerate(plan.units):
            if unit.actions[s] != COMPUTE and not unit.idle(s):
                for j, src in enumerate(hist[u][:len(unit.compensation[s].coeffs)]):
                    reads[(u, j + 1)] = src
        for u, unit in enumerate(plan.units):
            if keep[u] and (unit.actions[s] == COMPUTE or used):
                writes.append(u)
                hist[u].insert(0, s)
                del hist[u][keep[u]:]
        out.append({"reads": reads, "writes": writes})
    last: dict[tuple[int, int], int] = {}
    for s, rec in enumerate(out):
        for (u, _), src in rec["reads"].items():
            last[(u, src)] = s
    for s, rec in enumerate(out):
        rec["writes"] = [u for u in rec["writes"] if (u, s) in last]  # only outputs a later step reads
        rec["frees"] = sorted((u, src) for (u, src), s_last in last.items() if s_last == s)
    return out


def _signature(plan: Plan, s: int, eoc: dict[str, np.ndarray]) -> tuple:
    sig = []
    for unit in plan.units:
        if unit.actions[s] == COMPUTE:
            sig.append(None)
            continue
        if unit.idle(s):  # a nested unit whose parent is skipped: not run
            sig.append("idle")
            continue
        c = unit.compensation[s]
        digest = None
        if c.eoc_alpha != 0.0:
            h = hashlib.sha256()
            for k in sorted(k for k in eoc if k == f"eoc/{unit.name}/{s}" or k.startswith(f"eoc/{unit.name}/{s}/")):
                h.update(k.encode() + np.ascontiguousarray(eoc[k], dtype=np.float32).tobytes())
            digest = h.hexdigest()
        sig.append((tuple(float(x) for x in c.coeffs), float(c.eoc_alpha), digest))
    return tuple(sig)


def _predictors(plan: Plan, s: int, parts: list[int], shapes: list[list[tuple]], eoc: dict[str, np.ndarray]) -> dict:
    """``{u: (coeffs, eoc factors, plain)}`` of step ``s``, as the executor builds them (float32 0-dim
    coefficients; ``(1 + α·D)`` computed in float32)."""
    preds = {}
    for u, unit in enumerate(plan.units):
        if unit.actions[s] == COMPUTE or unit.idle(s):
            continue
        c = unit.compensation[s]
        plain = c.eoc_alpha == 0.0 and [float(x) for x in c.coeffs] == [1.0]
        coeffs = tuple(torch.tensor(float(x), dtype=torch.float32) for x in c.coeffs)
        factors = None
        if c.eoc_alpha != 0.0:
            base = f"eoc/{unit.name}/{s}"
            keys = [base] if parts[u] == 1 and base in eoc else [f"{base}/{p}" for p in range(parts[u])]
            missing = [k for k in keys if k not in eoc]
            if missing:
                raise ExportError(f"{unit.name} at step {s} has eoc_alpha {c.eoc_alpha} but the sidecar lacks {missing}")
            factors = []
            for p, k in enumerate(keys):
                d, want = torch.as_tensor(eoc[k], dtype=torch.float32), shapes[u][p]
                if d.ndim != len(want) or any(a not in (1, b) for a, b in zip(d.shape, want)):
                    raise ExportError(f"the EOC prior of {unit.name} at step {s} has shape {list(d.shape)}, which does "
                                      f"not broadcast to the unit's output shape {list(want)}")
                factors.append((1.0 + c.eoc_alpha * d).to(torch.float32))
            factors = tuple(factors)
        preds[u] = (coeffs, factors, plain)
    return preds


def _export(module, args, names_in, names_out, opset) -> Any:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(args), buf, dynamo=False, input_names=names_in, output_names=names_out,
                          dynamic_axes={n: {0: "batch"} for n in names_in + names_out}, opset_version=opset,
                          do_constant_folding=True)
    return onnx.load_model_from_string(buf.getvalue())


def _prepare_folder(out: Path, overwrite: bool) -> Path:
    """Create ``out``, or clear the files of an earlier export in it (its manifest lists them).

    Raises:
        ExportError: ``out`` is a file, or a folder with other files and no cachec manifest (without
            ``overwrite``).
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: give --onnx a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            old = json.loads((out / MANIFEST).read_text())
            ours = isinstance(old, dict) and "cachec_onnx" in old
        except (OSError, ValueError):
            old, ours = None, False
        if ours:
            files = [g.get("file") for g in old.get("graphs", {}).values()] + [UNCACHED, WEIGHTS, MANIFEST]
            for f in files:
                if isinstance(f, str) and "/" not in f and "\\" not in f:
                    (out / f).unlink(missing_ok=True)
        elif not overwrite:
            raise ExportError(f"{out} is not empty and holds no cachec ONNX export: refusing to write into it "
                              "(choose an empty folder or pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_plan(pipe, plan: Plan | str, out_dir: str | Path, *, force: bool = False, opset: int = DEFAULT_OPSET,
                flops: bool = True, check: bool = True, overwrite: bool = False,
                log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``plan`` applied to ``pipe``'s transformer as ONNX step graphs + ``manifest.json`` in ``out_dir``.

    Args:
        pipe: cachec's sampling pipeline (``Driver.pipe`` of a digit reference model): ``transformer``,
            ``scheduler``, ``num_classes``; the transformer in float32.
        plan: a :class:`Plan` or a plan YAML path.
        out_dir: output folder: created, or empty, or an earlier export (whose files are replaced).
        force: export even if the weight fingerprint differs from the plan's (as ``apply(force=True)``).
        opset: ONNX opset of the graphs.
        flops: count each graph's FLOPs from the ONNX graph (:func:`graph_flops`) into the manifest.
        check: run ``onnx.checker`` with ``full_check=True`` on every graph written.
        overwrite: write into a non-empty folder that holds no earlier export.
        log: progress messages.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: an unsupported pipeline, scheduler, dtype or plan layout, or timesteps that are not the
            plan's. PlanMismatchError: the plan is for another model (class, units, weights). PlanError: an
            invalid plan file.
    """
    import onnx

    t0 = time.perf_counter()
    say = log or (lambda m: None)
    plan = load_plan(plan) if not isinstance(plan, Plan) else plan
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ExportError(f"expected cachec's sampling pipeline (a Driver's .pipe), got {type(pipe).__name__}")
    spec = spec_for_pipeline(pipe)
    if not (spec.split_cfg and spec.condition == "class"):
        raise ExportError(f"the ONNX export drives cachec's own class-conditional sampling loop (the digit "
                          f"models); {type(pipe).__name__} is not supported")
    model = unwrap(transformer)
    if model is not transformer:
        raise ExportError("export the eager transformer, not a torch.compile-d one")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ExportError(f"the ONNX export is float32: load the model with dtype float32 (it is {dtype})")
    _, units = plan_executor(model, plan, force=force, warn_stacklevel=3)  # class, units, FLOPs, fingerprint
    modules = dict(model.named_modules())
    if any(u.name in modules and "forward" in modules[u.name].__dict__ for u in units):  # (maps: not yet made)
        raise ExportError("the transformer's units are hooked (a cache plan is applied?): remove it before exporting")
    cfg = model.config
    sample_shape = [int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)]
    if list(plan.sampler.resolution) != sample_shape[1:]:
        raise ExportError(f"the plan is for resolution {plan.sampler.resolution}, the model samples at {sample_shape[1:]}")
    guidance = plan.sampler.guidance
    sampler = _sampler_program(pipe.scheduler, plan)
    eoc = plan.load_sidecar() if plan.eoc_keys() else {}
    keep = [max((len(c.coeffs) for c in u.compensation.values()), default=0) for u in plan.units]
    U, S = len(plan.units), plan.steps
    out = _prepare_folder(Path(out_dir), overwrite)

    handler = _StepHandler(keep, plan.history == "used")
    B = 3  # example batch (any: the graphs take a dynamic batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((B, *sample_shape), generator=gen)
    t = torch.full((B,), float(sampler["timesteps"][S // 2]), dtype=torch.float32)
    y = torch.tensor([i % (pipe.num_classes + 1) for i in range(B)], dtype=torch.long)
    was_training = model.training
    model.eval()
    hooks = install(model, units, handler)
    done, step_graph = False, []
    try:
        with torch.no_grad():  # probe: every unit computed once (feature parts and shapes)
            handler.store_all = True
            model(hidden_states=x, timestep=t, class_labels=y, return_dict=False)
            handler.store_all = False
        probe = handler.stored
        parts = [len(probe[u]) for u in range(U)]
        shapes = [[tuple(f.shape[1:]) for f in probe[u]] for u in range(U)]
        schedule = _schedule(plan, keep)

        sigs: dict[tuple, str] = {}
        for s in range(S):
            sig = _signature(plan, s, eoc)
            if sig not in sigs:
                sigs[sig] = f"g{len(sigs):02d}"
            step_graph.append(sigs[sig])
        say(f"{S} steps -> {len(sigs)} distinct step graphs")

        weights = SharedWeights(out / WEIGHTS)
        graphs: dict[str, dict] = {}
        try:
            for sig, gname in sigs.items():
                s = step_graph.index(gname)  # first step with this signature
                reads = sorted({(u, j) for (u, j) in schedule[s]["reads"]})
                read_units = sorted({u for u, _ in reads})
                k_of = {u: max(j for v, j in reads if v == u) for u in read_units}
                writes = [u for u in range(U) if keep[u] and (sig[u] is None or (plan.history == "used" and sig[u] != "idle"))]
                handler.compute = [c is None for c in sig]
                handler.predictors = _predictors(plan, s, parts, shapes, eoc)
                names_in = ["hidden_states", "timestep", "class_labels"]
                hist_args = []
                for u in read_units:
                    for j in range(1, k_of[u] + 1):
                        for p in range(parts[u]):
                            names_in.append(_part_name(f"cache_in.{plan.units[u].name}.h{j}", p, parts[u]))
                            hist_args.append(probe[u][p].clone())
                names_out = ["sample"] + [_part_name(f"cache_out.{plan.units[u].name}", p, parts[u])
                                          for u in writes for p in range(parts[u])]
                module = _StepGraph(model, handler, [(u, k_of[u]) for u in read_units], writes, parts).eval()
                proto = _export(module, [x, t, y, *hist_args], names_in, names_out, opset)
                weights.share(proto)
                path = out / f"{gname}.onnx"
                onnx.save(proto, str(path))
                steps_here = [i for i, g in enumerate(step_graph) if g == gname]
                graphs[gname] = {
                    "file": path.name, "steps": steps_here,
                    "computes": [plan.units[u].name for u in range(U) if sig[u] is None],
                    "predicts": {plan.units[u].name: {"coeffs": list(sig[u][0]), "eoc_alpha": sig[u][1],
                                                      "reuse": handler.predictors[u][2]}
                                 for u in range(U) if sig[u] not in (None, "idle")},
                    "inputs": names_in, "outputs": names_out,
                    "flops": plan.budget.fixed_step_flops + sum(plan.units[u].flops for u in range(U) if sig[u] is None),
                }
                say(f"{gname}: steps {steps_here}, {sum(c is None for c in sig)}/{U} units computed -> {path.name}")
            handler.compute, handler.predictors = [True] * U, {}
            uncached = _StepGraph(model, handler, [], [], parts).eval()
            proto = _export(uncached, [x, t, y], ["hidden_states", "timestep", "class_labels"], ["sample"], opset)
            weights.share(proto)
            onnx.save(proto, str(out / UNCACHED))
        finally:
            weights.close()
        done = True
    finally:
        hooks.remove()
        model.train(was_training)  # the exporter restores the wrapper's mode on the transformer too
        if not done:  # no half-written export left behind (it has no manifest yet)
            for f in [*{f"{g}.onnx" for g in step_graph}, UNCACHED, WEIGHTS]:
                (out / f).unlink(missing_ok=True)

    steps = []
    for s in range(S):
        rec = schedule[s]
        g = graphs[step_graph[s]]
        reads = {_part_name(f"cache_in.{plan.units[u].name}.h{j}", p, parts[u]): _cache_key(plan.units[u].name, src, p, parts[u])
                 for (u, j), src in sorted(rec["reads"].items()) for p in range(parts[u])}
        writes = {_part_name(f"cache_out.{plan.units[u].name}", p, parts[u]): _cache_key(plan.units[u].name, s, p, parts[u])
                  for u in rec["writes"] for p in range(parts[u])}
        frees = [_cache_key(plan.units[u].name, src, p, parts[u]) for u, src in rec["frees"] for p in range(parts[u])]
        steps.append({"step": s, "timestep": sampler["timesteps"][s], "graph": step_graph[s], "reads": reads,
                      "writes": writes, "frees": frees, "flops": g["flops"]})
    b = plan.budget
    manifest = {
        "cachec_onnx": FORMAT_VERSION,
        "plan": {"file": plan.source.name if plan.source else None,
                 "sha256": file_sha256(plan.source) if plan.source else None,
                 "method": b.method, "target": b.target, "realised": b.realised, "history": plan.history},
        "model": {"class": plan.model.cls, "fingerprint": plan.model.fingerprint, "source": plan.model.source,
                  "sample_shape": sample_shape, "num_classes": int(pipe.num_classes),
                  "null_class": int(pipe.num_classes), "cond_first": bool(spec.cond_first), "dtype": "float32"},
        "guidance": {"mode": guidance.mode, "scale": guidance.scale, "branches": guidance.branches},
        "sampler": sampler,
        "flops": {"full_step": b.full_step_flops, "fixed_step": b.fixed_step_flops,
                  "units": {u.name: u.flops for u in plan.units}, "unit": "per sample, per guidance branch"},
        "opset": opset,
        "weights": {"file": WEIGHTS, "tensors": weights.table},
        "uncached": {"file": UNCACHED, "flops": b.full_step_flops},
        "graphs": graphs,
        "steps": steps,
    }
    if check:
        for f in [*(g["file"] for g in graphs.values()), UNCACHED]:
            check_graph(out / f)
        manifest["checked"] = "onnx.checker full_check"
    if flops:
        for g in [*graphs.values(), manifest["uncached"]]:
            g["onnx_flops"] = graph_flops(out / g["file"])[0]
        gap = b.full_step_flops - manifest["uncached"]["onnx_flops"]
        manifest["flops"]["onnx_check"] = {  # the plan's cost model against a count on the graphs themselves
            "uncached_gap": gap,  # plan − ONNX for the whole forward: the never-cached part's difference
            "units_agree": all(g["flops"] - g["onnx_flops"] == gap for g in graphs.values()),
        }
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    seconds = time.perf_counter() - t0
    say(f"exported {len(graphs)} step graphs + {UNCACHED} in {seconds:.1f} s -> {out / MANIFEST}")
    return ExportResult(out, out / MANIFEST, manifest, len(graphs), seconds)
