"""Per-step streaming of unit features into what the statistics need (docs/calibration-format.md, "Memory").

A calibration never keeps a unit's feature trajectory. At each transformer call the recorder hands every
unit's output for one guidance branch — ``x``, float32 (n, D_u), the flattened per-sample output of the
batch's n samples — to :meth:`BatchRecord.push`, which keeps only

- ``y = R x``, the unit's **sketch** (n, r_u) float32 at this step (:class:`CountSketch`; ``R`` is the
  identity when ``D_u <= r``, so the Gram is exact there): the Gram and the GOC statistics are folded from
  these after the batch (:meth:`cachec.calibrate.stats.Accumulators.add`);
- the **EOC group sums** of this step, added at once into per-batch split sums (:func:`group_sums`):
  ``Σ_rows g(x)``, ``Σ_rows g(x ⊙ x)`` and, for lags j = 1..K, ``Σ_rows g((x − x_{s−j}) ⊙ x_{s−j})``;
- a window of the last K raw outputs per (unit, branch) for those lagged products — only the elements the
  EOC sums read: each group sums at most E = ``eoc_sample`` of its elements (:class:`EOCSubset`, a fixed
  random subset of the tokens for per-channel groups, of the channels for per-token groups, scaled by
  group size / E so the sums estimate the full ones; exact where a group has at most E elements).

Memory beyond plain sampling: the sketch maps, ``8 · D`` bytes per distinct sketched unit size D (shared by
the units of that size), and ``4 · n · B · Σ_u (S · r_u + K · E_u)`` bytes of buffers (E_u = the elements
the EOC sums read, ``min(D_u, G_u · E)``) plus the split sums ``8 · (1 + 2 + 2K) · S · Σ_u G_u`` bytes
(G_u groups, :func:`cachec.calibrate.format.eoc_group_layout`) — no term in S × D_u.
"""

from __future__ import annotations

import math

import torch

from .format import eoc_group_layout, sketch_dim

F64 = torch.float64


class CountSketch:
    """A fixed random linear map ``R``: (D,) → (r,), ``E[RᵀR] = I`` (Charikar et al., "Finding frequent
    items in data streams", 2002; balanced buckets).

    Element i goes, with sign ``σ_i = ±1``, into bucket ``π(i) mod r`` (π a random permutation), so each
    bucket sums ⌈D/r⌉ or ⌊D/r⌋ elements. For any fixed vector e, ``E‖Re‖² = ‖e‖²`` and the relative
    standard deviation of ``‖Re‖²`` is at most ``sqrt(2/r)`` (1.6 % at r = 8192); errors of linear
    predictors are such vectors (``e = x_s − Σ_j a_j x_{t_j}``), so the planner's errors keep this
    *relative* accuracy however small they are. ``D <= r`` (or ``dim = 0``) gives the identity.

    Args:
        numel: D.
        dim: r (0: never sketch).
        seed: the map's seed (the calibration's ``gram_sketch.seed``): the same seed gives the same map on
            every rank, shard and resumed run; units of the same size share one map (:meth:`shared`).
        device: where the map lives (the features' device).

    Memory: an int32 gather index and a float32 sign per input element (8 bytes × ⌈D/r⌉·r), once per
    distinct (D, r, seed, device) when built through :meth:`shared`.
    """

    _cache: dict = {}

    @classmethod
    def shared(cls, numel: int, dim: int, seed: int, device) -> "CountSketch":
        """The map for these arguments, built once per process (units of one size share it; a unit's Gram
        only involves its own map, so sharing changes no statistic's distribution)."""
        key = (int(numel), int(dim), int(seed), str(torch.device(device)))
        if key not in cls._cache:
            if len(cls._cache) >= 16:
                cls._cache.clear()
            cls._cache[key] = cls(numel, dim, seed, device)
        return cls._cache[key]

    def __init__(self, numel: int, dim: int, seed: int, device):
        self.numel = int(numel)
        self.dim = sketch_dim(numel, dim)
        self.identity = self.dim == self.numel
        if self.identity:
            return
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(self.numel, generator=g)
        sign = torch.randint(0, 2, (self.numel,), generator=g, dtype=torch.int64) * 2 - 1
        rows = math.ceil(self.numel / self.dim)
        # gather index (rows * r): bucket b holds the elements i with perm[i] = b + r*m; the padding index
        # numel points at an appended zero column
        slots = torch.full((rows * self.dim,), self.numel, dtype=torch.int64)
        slots[perm] = torch.arange(self.numel)
        self.index = slots.to(device=device, dtype=torch.int32)
        self.sign = sign.to(device=device, dtype=torch.float32)
        self.rows = rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for a batch of rows.

        Args:
            x: (n, D) float32 or float64.
        Returns:
            (n, r) float32: ``x`` itself (as float32) for the identity, else the sketch summed in float64
            (a fixed reduction order: deterministic on a given device).
        """
        if self.identity:
            return x.float()
        n = x.shape[0]
        signed = torch.nn.functional.pad(x.float() * self.sign, (0, 1))  # exact: the signs are ±1
        picked = torch.index_select(signed, 1, self.index).view(n, self.rows, self.dim)
        return picked.sum(1, dtype=F64).float()


class EOCSubset:
    """The elements of one unit's output its EOC sums read, and the factor that scales each group's sum.

    For every tuple part of per-sample shape ``(T, C)`` (leading axes flattened into T): per-channel
    groups read ``min(T, E)`` tokens (a random subset, the same for every channel, step and sample), per-token
    groups read ``min(C, E)`` channels; per-element groups read everything. A subsampled group's sums are
    multiplied by (group size / elements read): unbiased estimates of the full sums (a Monte-Carlo mean
    over the group's elements, relative error ~ CV / sqrt(E)).

    Args:
        shapes: the unit's per-sample part shapes.
        grouping: ``channel``, ``token`` or ``element``.
        sample: E (0: every element).
        seed: the subset's seed.
        device: where the index lives.

    Attributes:
        index: (E_u,) int64 positions in the flattened output, or None (every element, in order).
        layout: the group layout of the read elements (as :func:`~cachec.calibrate.format.eoc_group_layout`).
        scale: (G_u,) float64 factors per group, or None (all 1).
    """

    def __init__(self, shapes, grouping: str, sample: int, seed: int, device):
        full = eoc_group_layout(shapes, grouping)
        self.layout, self.index, self.scale = full, None, None
        if grouping == "element" or sample <= 0 or all(size <= sample for _, _, size in full):
            return
        g = torch.Generator().manual_seed(int(seed))
        idx, layout, scale, off = [], [], [], 0
        for sh, (bshape, groups, size) in zip(shapes, full):
            n = groups * size
            C = int(sh[-1]) if len(sh) else 1
            T = n // max(C, 1)
            if size <= sample:
                idx.append(torch.arange(off, off + n))
                layout.append((bshape, groups, size))
                scale.append(torch.ones(groups, dtype=F64))
            elif grouping == "channel":  # groups = channels, read `sample` tokens
                tok = torch.randperm(T, generator=g)[:sample].sort().values
                idx.append((off + tok[:, None] * C + torch.arange(C)[None]).reshape(-1))
                layout.append((bshape, groups, sample))
                scale.append(torch.full((groups,), size / sample, dtype=F64))
            else:  # groups = tokens, read `sample` channels
                ch = torch.randperm(C, generator=g)[:sample].sort().values
                idx.append((off + torch.arange(T)[:, None] * C + ch[None]).reshape(-1))
                layout.append((bshape, groups, sample))
                scale.append(torch.full((groups,), size / sample, dtype=F64))
            off += n
        self.index = torch.cat(idx).to(device)
        self.layout = layout
        self.scale = torch.cat(scale).to(device)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(n, E_u) the read elements of ``x`` (n, D_u)."""
        return x if self.index is None else x[:, self.index]

    def sums(self, v: torch.Tensor, grouping: str) -> torch.Tensor:
        """(n, G_u) scaled group sums of ``v`` (n, E_u) (values of the read elements)."""
        out = group_sums(v, self.layout, grouping)
        return out if self.scale is None else out * self.scale


def group_sums(v: torch.Tensor, layout, grouping: str) -> torch.Tensor:
    """Per-group sums of flattened per-sample outputs.

    Args:
        v: (n, D) tensor (any float dtype), rows = samples.
        layout: :func:`cachec.calibrate.format.eoc_group_layout` of the unit for ``grouping``.
        grouping: ``channel``, ``token`` or ``element``.
    Returns:
        (n, G) tensor of v's dtype, parts' groups concatenated in order.
    """
    n = v.shape[0]
    out = []
    off = 0
    for _, groups, size in layout:
        part = v[:, off:off + groups * size]
        if size == 1:
            out.append(part)
        elif grouping == "channel":  # C-order (tokens, C): the last axis is the group
            out.append(part.reshape(n, size, groups).sum(1))
        else:  # per token: the last axis is summed
            out.append(part.reshape(n, groups, size).sum(2))
        off += groups * size
    return out[0] if len(out) == 1 else torch.cat(out, 1)


class BatchRecord:
    """What one batch leaves behind for the statistics (see the module docstring).

    Args:
        steps: S.
        eoc_lags: K.
        eoc_prior: grouping of the EOC statistics (:data:`cachec.calibrate.format.EOC_PRIORS`).
        sketch_dim: r (0: exact Grams).
        sketch_seed: seed of the sketches (units of one size share a map) and, plus 1_000_003 + u, of unit
            u's EOC subset.
        eoc_sample: E, most elements per group the EOC sums read (0: all; :class:`EOCSubset`).

    Attributes (after the batch):
        y: ``y[u][b]`` (n, S, r_u) float32 sketches.
        prior: ``prior[u]`` (S, G_u) float64, ``Σ_{rows, b} g(x_s)``.
        q: ``q[u]`` (2, S, G_u) float64, per split k ``Σ_{rows in k, b} g(x_s ⊙ x_s)``.
        m: ``m[u]`` (2, S, K, G_u) float64, ``Σ_{rows in k, b} g((x_s − x_{s−j}) ⊙ x_{s−j})`` at index j−1
            (zero where s < j).
        layouts: per unit the group layout; ``sketch_dims``, ``groups``: r_u and G_u.
    """

    def __init__(self, steps: int, eoc_lags: int, eoc_prior: str, sketch_dim: int = 0, sketch_seed: int = 0,
                 eoc_sample: int = 0):
        self.S, self.K = int(steps), int(eoc_lags)
        self.eoc_sample = int(eoc_sample)
        self.subsets: dict[int, EOCSubset] = {}
        self.eoc_prior = eoc_prior
        self.sketch_dim, self.sketch_seed = int(sketch_dim), int(sketch_seed)
        self.sketches: dict[int, CountSketch] = {}  # kept across batches: the same map every batch
        self.layouts: dict[int, list] = {}
        self.y: dict[int, dict[int, torch.Tensor]] = {}
        self.window: dict[int, dict[int, torch.Tensor]] = {}
        self.prior: dict[int, torch.Tensor] = {}
        self.q: dict[int, torch.Tensor] = {}
        self.m: dict[int, torch.Tensor] = {}
        self.reset(0, 0)

    def reset(self, n_samples: int, first_sample: int) -> None:
        """Start a batch of ``n_samples`` samples whose first has global index ``first_sample``
        (split of row i: ``(first_sample + i) mod 2``). Buffers of the right size are reused."""
        self.n, self.first_sample = int(n_samples), int(first_sample)
        self._split_rows = None
        for d in (self.prior, self.q, self.m):
            for t in d.values():
                t.zero_()

    def unit_layout(self, unit: int, shapes) -> list:
        """The group layout of a unit (fixed by its first output's shapes)."""
        if unit not in self.layouts:
            self.layouts[unit] = eoc_group_layout(shapes, self.eoc_prior)
        return self.layouts[unit]

    def _rows(self, device) -> list[torch.Tensor]:
        if self._split_rows is None or self._split_rows[0].device != device:
            idx = torch.arange(self.n, device=device)
            self._split_rows = [idx[(self.first_sample + idx) % 2 == k] for k in (0, 1)]
        return self._split_rows

    def push(self, unit: int, branch: int, step: int, x: torch.Tensor, shapes) -> None:
        """Fold one unit's output of one branch at one step.

        Args:
            unit, branch, step: where the output belongs.
            x: (n, D_u) float32 (rows = the batch's samples, flattened parts concatenated).
            shapes: the unit's per-sample part shapes.
        """
        n, D = x.shape
        dev = x.device
        layout = self.unit_layout(unit, shapes)
        G = sum(g for _, g, _ in layout)
        sub = self.subsets.get(unit)
        if sub is None or (sub.index is not None and sub.index.device != dev):
            sub = self.subsets[unit] = EOCSubset(shapes, self.eoc_prior, self.eoc_sample,
                                                 self.sketch_seed + 1_000_003 + unit, dev)
        S, K = self.S, self.K
        sk = self.sketches.get(unit)
        if sk is None or sk.numel != D or (not sk.identity and sk.index.device != dev):
            sk = self.sketches[unit] = CountSketch.shared(D, self.sketch_dim, self.sketch_seed, dev)
        ys = self.y.setdefault(unit, {})
        buf = ys.get(branch)
        if buf is None or buf.shape[0] != n or buf.device != dev:
            buf = ys[branch] = torch.empty(n, S, sk.dim, dtype=torch.float32, device=dev)
        buf[:, step] = sk(x)
        if unit not in self.prior or self.prior[unit].device != dev:
            self.prior[unit] = torch.zeros(S, G, dtype=F64, device=dev)
            self.q[unit] = torch.zeros(2, S, G, dtype=F64, device=dev)
            self.m[unit] = torch.zeros(2, S, K, G, dtype=F64, device=dev)
        xe = sub.select(x)
        x64 = xe.to(F64)
        rows = self._rows(dev)
        self.prior[unit][step] += sub.sums(x64, self.eoc_prior).sum(0)
        sq = sub.sums(x64 * x64, self.eoc_prior)
        for k in (0, 1):
            if len(rows[k]):
                self.q[unit][k, step] += sq[rows[k]].sum(0)
        if K == 0:
            return
        wins = self.window.setdefault(unit, {})
        win = wins.get(branch)
        E = xe.shape[1]
        if win is None or win.shape[0] != n or win.device != dev or win.shape[2] != E:
            win = wins[branch] = torch.empty(n, K, E, dtype=torch.float32, device=dev)
        for j in range(1, min(K, step) + 1):
            prev = win[:, (step - j) % K].to(F64)
            prod = sub.sums((x64 - prev) * prev, self.eoc_prior)
            for k in (0, 1):
                if len(rows[k]):
                    self.m[unit][k, step, j - 1] += prod[rows[k]].sum(0)
        win[:, step % K].copy_(xe)

    def release_windows(self) -> None:
        """Free the raw-feature windows (between calibrations; a batch reuses them)."""
        self.window = {}
