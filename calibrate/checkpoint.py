"""Checkpoint and resume: the partial state of an interrupted calibration.

A run writes its state atomically (:func:`cachec.runtime.io.atomic_write`) beside the output:

- ``OUT.partial.safetensors`` — the float64 sums of the completed batches (keys as in the calibration
  file), ``state/lat_sum`` and ``state/lat_count`` (U,) float64 latency sums (seconds, calls), and under
  the metadata key :data:`PARTIAL_KEY` a JSON object ``{config, config_hash, created, completed,
  structure, samples}``;
- ``OUT.partial-sensitivity.safetensors`` — the probe results ``results`` (P, 2) and ``done`` (P,)
  float64 (1.0 = done), metadata ``{config_hash, seconds}``.

Under ``torchrun`` each rank has its own files (``.rank{r}`` before the suffix). A run resumes a state
only if the configuration hash (SHA-256 of the JSON of the run configuration, :func:`run_config`) is the
same; the completed batches are then not sampled again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cachec.runtime.io import atomic_write

from .format import FORMAT_VERSION
from .job import CalibrationJob, RunContext
from .stats import Accumulators

#: metadata key of the partial-state files
PARTIAL_KEY = "cachec_partial"


def partial_paths(output: str | Path, rank: int = 0, world: int = 1) -> tuple[Path, Path]:
    """The partial-state files of an output: ``(batches, sensitivity)``.

    ``calib.safetensors`` → ``calib.partial.safetensors`` and ``calib.partial-sensitivity.safetensors``
    (``.rank{r}`` before the suffix when running distributed).
    """
    out = Path(output)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    tag = f".rank{rank}" if world > 1 else ""
    return out.with_name(f"{stem}.partial{tag}.safetensors"), out.with_name(f"{stem}.partial-sensitivity{tag}.safetensors")


def utc_now() -> str:
    """The current UTC time as ISO-8601 to the second with a ``Z`` suffix (the header's ``created``)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def config_hash(config: dict) -> str:
    """Hex SHA-256 of ``json.dumps(config, sort_keys=True)`` (config: plain JSON values)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def config_difference(old: dict, new: dict) -> str:
    """``"seed: 0 → 5, conditions: 3 vs 4 entries"``: the keys whose values differ, for messages."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, list) and isinstance(b, list):
                diffs.append(f"{key}: {len(a)} vs {len(b)} entries" if len(a) != len(b) else f"{key}: differ")
            else:
                diffs.append(f"{key}: {a!r} → {b!r}")
    return ", ".join(diffs)


def run_config(job: CalibrationJob, ctx: RunContext, model_class: str, fingerprint: str) -> dict:
    """The configuration a partial state must match to be resumed (plain JSON; key order is stored).

    Args:
        job: the run's settings.
        ctx: its process context (rank, world, units, plan followed, copied sensitivity).
        model_class: class name of the unwrapped transformer.
        fingerprint: ``weights_fingerprint`` of the transformer (``"sha256:<hex>"``).
    """
    shard_i, shard_n = job.shard
    config = {
        "format_version": FORMAT_VERSION, "model_class": model_class, "fingerprint": fingerprint,
        "conditions": list(job.conditions), "samples_per_condition": job.samples_per_condition, "steps": job.steps,
        "guidance": job.guidance, "seed": job.seed, "batch_size": job.batch_size, "shard": f"{shard_i}/{shard_n}",
        "eoc_lags": job.eoc_lags, "eoc_prior": job.eoc_prior, "sketch_dim": job.sketch_dim,
        "sketch_seed": job.sketch_seed, "eoc_sample": job.eoc_sample, "sensitivity": job.sensitivity, "sensitivity_samples": job.sensitivity_samples,
        "cfg": job.cfg, "world": ctx.world, "rank": ctx.rank, "units": [u.name for u in ctx.units],
    }
    if ctx.along is not None:
        config["along"] = ctx.along.info
    if ctx.copied_sensitivity is not None:
        config["sensitivity_from"] = ctx.copied_sensitivity.sha256
    return config


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU torch tensors with string metadata to ``path`` atomically (safetensors)."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


class RunState:
    """Everything a run accumulates, saved to and restored from the partial file.

    Args:
        config: :func:`run_config` of the run.
        units: the UnitSpec list (names fix the tensor keys).

    Attributes:
        config, hash: the configuration and its :func:`config_hash`.
        names: U unit names.
        created: :func:`utc_now` of the first start (kept across resumes).
        completed: indices of the batches folded in, in order.
        structure: facts fixed by the first batch (schedule, guidance layout, unit shapes, FLOPs), or None.
        acc: the :class:`~.stats.Accumulators` (allocated with the structure), or None.
        lat_sum, lat_count: (U,) float64 unit latency sums (seconds) and call counts.
        consistent: False while a batch is being folded in (the sums are then not saved).
        reduced: True after the distributed all-reduce (the state is then never saved again).
    """

    def __init__(self, config: dict, units):
        self.config = config
        self.hash = config_hash(config)
        self.names = [u.name for u in units]
        self.created = utc_now()
        self.completed: list[int] = []
        self.structure: dict | None = None  # fixed by the first batch
        self.acc: Accumulators | None = None
        self.lat_sum = np.zeros(len(units))
        self.lat_count = np.zeros(len(units))
        self.consistent = True  # False while a batch is being folded in
        self.reduced = False  # True after the distributed all-reduce: never saved again

    def allocate(self, device) -> None:
        """Allocate zero sums for ``structure`` on ``device``."""
        st = self.structure
        self.acc = Accumulators([u["sketch_dim"] for u in st["units"]], [u["eoc_groups"] for u in st["units"]], st["steps"],
                                st["branches"], self.config["eoc_lags"], device)

    def save(self, path: Path) -> None:
        """Write the state to ``path`` atomically. Raises OSError if the folder is not writable."""
        tensors = self.acc.tensors(self.names) if self.acc is not None else {}
        tensors["state/lat_sum"] = torch.from_numpy(self.lat_sum.copy())
        tensors["state/lat_count"] = torch.from_numpy(self.lat_count.copy())
        meta = {
            "config": self.config, "config_hash": self.hash, "created": self.created, "completed": self.completed,
            "structure": self.structure, "samples": self.acc.samples if self.acc is not None else [0, 0],
        }
        _save(path, tensors, {PARTIAL_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, config: dict, units, device) -> "RunState":
        """Restore a state saved by :meth:`save` for the same configuration.

        Raises:
            ValueError: ``path`` is not a partial state, or it was made with another configuration (the
                differing keys are named; ``restart=True`` discards it).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get(PARTIAL_KEY)
        if meta_raw is None:
            raise ValueError(f"{path} is not a cachec partial calibration state; delete it or pass restart=True (--restart)")
        meta = json.loads(meta_raw)
        state = cls(config, units)
        if meta["config_hash"] != state.hash:
            raise ValueError(
                f"a partial calibration at {path} was made with a different configuration "
                f"({config_difference(meta['config'], config)}); run the same command to resume it, "
                "or pass restart=True (--restart) to discard it"
            )
        tensors = load_file(str(path))
        state.created = meta["created"]
        state.completed = [int(b) for b in meta["completed"]]
        state.structure = meta["structure"]
        state.lat_sum = tensors["state/lat_sum"].numpy().copy()
        state.lat_count = tensors["state/lat_count"].numpy().copy()
        if state.structure is not None:
            state.allocate(device)
            state.acc.load(state.names, tensors, meta["samples"])
        return state


def save_sensitivity_partial(path: Path, config_hash: str, results: np.ndarray, done: np.ndarray, seconds: float) -> None:
    """Write the probe results so far: ``results`` (P, 2) float64, ``done`` (P,) bool, ``seconds`` spent."""
    tensors = {"results": torch.from_numpy(results.copy()), "done": torch.from_numpy(done.astype(np.float64))}
    _save(path, tensors, {PARTIAL_KEY: json.dumps({"config_hash": config_hash, "seconds": seconds})})


def load_sensitivity_partial(path: Path, config_hash: str, n_jobs: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(results (P, 2) float64, done (P,) bool, seconds)`` saved for this configuration; zeros if no file.

    Raises:
        ValueError: the file belongs to another configuration or another probe list.
    """
    results, done = np.zeros((n_jobs, 2)), np.zeros(n_jobs, dtype=bool)
    if not path.exists():
        return results, done, 0.0
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get(PARTIAL_KEY, "{}"))
        if meta.get("config_hash") != config_hash:
            raise ValueError(f"the partial sensitivity state {path} belongs to another configuration; "
                             "pass restart=True (--restart) to discard it")
        stored = f.get_tensor("results")
        if stored.shape != results.shape:
            raise ValueError(f"the partial sensitivity state {path} does not match the probe list; pass restart=True")
        return stored.copy(), f.get_tensor("done") > 0.5, float(meta.get("seconds", 0.0))
