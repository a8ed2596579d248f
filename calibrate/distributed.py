"""``torchrun`` support: process-group setup and the exact all-reduce of a run's sums.

Rank r of W takes every W-th batch of its shard (:meth:`~.job.CalibrationJob.batches`); after sampling
the float64 sums, sample counts and latency sums are all-reduced (summed) in place, and rank 0 writes the
file. Sensitivity probes are dealt round-robin and their results summed the same way.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def setup(device: torch.device) -> tuple[int, int, bool]:
    """Join or create the process group of a distributed run.

    Initialises ``torch.distributed`` from the environment when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on
    CUDA, after ``torch.cuda.set_device(device)``); an already initialised group is used as is.

    Returns:
        ``(rank, world, created_here)``; ``(0, 1, False)`` when not distributed.
    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but this torch build has no ``torch.distributed``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def teardown() -> None:
    """Destroy the process group created by :func:`setup`."""
    import torch.distributed as dist

    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank."""
    import torch.distributed as dist

    dist.barrier()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (same shapes and dtypes on every rank)."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def gather(state, device) -> None:
    """All-reduce a rank's sums in place; ranks without a batch take the structure of rank 0.

    Args:
        state: the rank's :class:`~.checkpoint.RunState` (marked ``reduced``: never saved afterwards).
        device: where a rank without a batch allocates its (zero) sums.
    Raises:
        RuntimeError: this rank recorded another schedule or unit layout than rank 0.
    """
    import torch.distributed as dist

    box = [state.structure]
    dist.broadcast_object_list(box, src=0)
    if state.structure is None:
        state.structure = box[0]
        state.allocate(device)
    elif state.structure["timesteps"] != box[0]["timesteps"] or state.structure["units"] != box[0]["units"]:
        raise RuntimeError(f"rank {dist.get_rank()} recorded a different schedule or unit layout than rank 0")
    acc = state.acc
    counts = torch.tensor(acc.samples, dtype=torch.float64, device=acc.device)
    lat = torch.from_numpy(np.stack([state.lat_sum, state.lat_count])).to(acc.device)
    state.reduced = True
    all_reduce_sum([*acc.all_tensors(), counts, lat])
    acc.samples = [int(round(float(c))) for c in counts.cpu()]
    lat = lat.cpu().numpy()
    state.lat_sum, state.lat_count = lat[0].copy(), lat[1].copy()
