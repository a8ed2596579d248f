"""Streaming float64 accumulators of the calibration statistics (docs/calibration-format.md, "Tensors").

One batch of samples at a time, folded into sums that do not depend on the number of samples:

- from each unit's sketched trajectory ``Y`` — float32 (N, S, r_u): N samples of the batch, S steps, the
  r_u sketch values of :class:`~.streaming.CountSketch` (the features themselves when exact), one
  guidance branch — :meth:`Accumulators.add` folds
  - ``gram[u]`` (B, 2, S, S): ``Σ_{n in split k} Y[n] Y[n]ᵀ`` per branch b and split k;
  - ``goc_rel_sum`` (U, S): ``Σ_{n,b} ‖Y_s − Y_{s−1}‖ / ‖Y_s‖`` (0 at s = 0; a term is 0 where ‖Y_s‖ = 0);
  - ``goc_cos_sum`` (U, S): ``Σ_{n,b} cos(Y_s − Y_{s−1}, Y_{s−1} − Y_{s−2})`` (0 at s < 2; a term is 0
    where either difference is exactly zero);
- from a batch's EOC group sums (:class:`~.streaming.BatchRecord`, already summed over the batch's rows
  per split), :meth:`Accumulators.add_eoc` adds ``prior_sum[u]`` (S, G_u), ``eoc_q[u]`` (2, S, G_u) and
  ``eoc_m[u]`` (2, S, K, G_u).

Split k of a sample is its *global* index mod 2. All arithmetic is float64 on the trajectory's device;
the order of the additions is fixed (batch by batch, unit by unit, branch by branch, sample by sample),
so the same batches folded in the same order give bit-identical sums.
"""

from __future__ import annotations

import torch

F64 = torch.float64

#: tensor keys of the per-unit statistics, in file order
PER_UNIT = ("gram", "prior_sum", "eoc_q", "eoc_m")


class Accumulators:
    """The summed statistics of one calibration (or one shard / one rank of it).

    Args:
        dims: r_u per unit (U entries): the length of the vectors the Grams are computed from.
        groups: G_u per unit: the number of EOC prior groups.
        steps: S.
        branches: B (1 or 2).
        eoc_lags: K >= 0.
        device: where the sums live (the trajectory's device).

    Attributes:
        gram, prior_sum, eoc_q, eoc_m: lists of U float64 tensors with the shapes above.
        goc_rel_sum, goc_cos_sum: (U, S) float64.
        samples: [n_split0, n_split1] samples folded in (each with B branches).
    """

    def __init__(self, dims: list[int], groups: list[int], steps: int, branches: int, eoc_lags: int, device="cpu"):
        S, B, K = int(steps), int(branches), int(eoc_lags)
        self.numels = [int(d) for d in dims]
        self.groups = [int(g) for g in groups]
        self.S, self.B, self.K = S, B, K
        self.device = torch.device(device)
        z = dict(dtype=F64, device=self.device)
        self.gram = [torch.zeros(B, 2, S, S, **z) for _ in dims]
        self.prior_sum = [torch.zeros(S, g, **z) for g in self.groups]
        self.eoc_q = [torch.zeros(2, S, g, **z) for g in self.groups]
        self.eoc_m = [torch.zeros(2, S, K, g, **z) for g in self.groups]
        U = len(self.numels)
        self.goc_rel_sum = torch.zeros(U, S, **z)
        self.goc_cos_sum = torch.zeros(U, S, **z)
        self.samples = [0, 0]

    # ------------------------------------------------------------------------------------------------
    def add(self, unit: int, branch: int, X: torch.Tensor, first_sample: int) -> None:
        """Fold one unit's sketched trajectory for one branch of one batch into the Gram and GOC sums.

        Args:
            unit: unit index.
            branch: guidance branch b (0 conditional, 1 unconditional).
            X: float32 (or float64) tensor (N, S, r_u) on ``device``: X[i, s] is the sketch of the
                flattened feature of global sample ``first_sample + i`` at step s.
            first_sample: global index of the batch's first sample (fixes the splits).

        Raises:
            ValueError: wrong shape.
        """
        N, S, D = X.shape
        if S != self.S or D != self.numels[unit]:
            raise ValueError(f"trajectory of unit {unit} has shape {tuple(X.shape)}, expected (N, {self.S}, {self.numels[unit]})")
        X64, E = self._scratch(N, S, D, X.device)
        X64.copy_(X)
        # Per-sample Gram, computed in the difference basis E = [X_0, X_1 - X_0, ..., X_{S-1} - X_{S-2}]
        # (the difference of two float32 values is exact in float64): one matmul gives both the Gram of
        # the differences (GOC statistics, no cancellation) and, by two cumulative sums, the Gram of the
        # features, G[s, t] = sum_{a <= s, b <= t} <E_a, E_b>.
        E[:, 0] = X64[:, 0]
        torch.sub(X64[:, 1:], X64[:, :-1], out=E[:, 1:])
        GE = torch.bmm(E, E.transpose(1, 2))  # (N, S, S)
        G = GE.cumsum(1).cumsum(2)  # (N, S, S) per-sample Gram of X
        p0 = first_sample % 2
        gram = self.gram[unit]
        for k in (0, 1):
            rows = slice((k - p0) % 2, None, 2)
            if G[rows].shape[0]:
                gram[branch, k] += G[rows].sum(0)
        # GOC: relative one-step change and the cosine of consecutive changes, from the Gram of the
        # one-step differences (exact: a difference of two float32 values is exact in float64)
        if S > 1:
            fn = G.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()  # (N, S) ‖X_s‖
            GD = GE[:, 1:, 1:]  # (N, S-1, S-1) Gram of the one-step differences
            dn = GD.diagonal(dim1=1, dim2=2).sqrt()  # (N, S-1) ‖X_s - X_{s-1}‖, s = 1..S-1
            ok = fn[:, 1:] > 0
            rel = torch.where(ok, dn / torch.where(ok, fn[:, 1:], 1.0), 0.0)
            self.goc_rel_sum[unit, 1:] += rel.sum(0)
            if S > 2:
                dot = GD.diagonal(offset=-1, dim1=1, dim2=2)  # (N, S-2) <D_s, D_{s-1}>, s = 2..S-1
                den = dn[:, 1:] * dn[:, :-1]
                ok = den > 0
                cos = torch.where(ok, dot / torch.where(ok, den, 1.0), 0.0)
                self.goc_cos_sum[unit, 2:] += cos.sum(0)

    def _scratch(self, N: int, S: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Reusable float64 buffers (N, S, r), (N, S, r) — fresh large allocations page-fault on every
        batch, which costs as much as the arithmetic."""
        key = (N, S, D, str(device))
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        if key not in cache:
            if len(cache) >= 8:
                cache.clear()
            z = dict(dtype=F64, device=device)
            cache[key] = (torch.empty(N, S, D, **z), torch.empty(N, S, D, **z))
        return cache[key]

    def add_eoc(self, unit: int, prior: torch.Tensor, q: torch.Tensor, m: torch.Tensor) -> None:
        """Add one batch's EOC group sums of a unit (summed over its rows and branches).

        Args:
            unit: unit index.
            prior: (S, G_u) float64, ``Σ g(x_s)``.
            q: (2, S, G_u) float64, per split ``Σ g(x_s ⊙ x_s)``.
            m: (2, S, K, G_u) float64, per split and lag ``Σ g((x_s − x_{s−j}) ⊙ x_{s−j})``.
        Raises:
            ValueError: wrong shape.
        """
        if tuple(prior.shape) != tuple(self.prior_sum[unit].shape) or tuple(m.shape) != tuple(self.eoc_m[unit].shape):
            raise ValueError(f"EOC sums of unit {unit} have shapes {tuple(prior.shape)}, {tuple(m.shape)}; expected "
                             f"{tuple(self.prior_sum[unit].shape)}, {tuple(self.eoc_m[unit].shape)}")
        self.prior_sum[unit] += prior
        self.eoc_q[unit] += q
        self.eoc_m[unit] += m

    def count(self, first_sample: int, n: int) -> None:
        """Count ``n`` samples starting at global index ``first_sample`` into ``samples``."""
        for i in range(n):
            self.samples[(first_sample + i) % 2] += 1

    # ------------------------------------------------------------------------------------------------
    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The sums as ``{file key: float64 CPU tensor}`` (keys as in docs/calibration-format.md)."""
        out: dict[str, torch.Tensor] = {}
        for kind in PER_UNIT:
            for name, t in zip(names, getattr(self, kind)):
                out[f"{kind}/{name}"] = t.detach().to("cpu").contiguous()
        out["goc_rel_sum"] = self.goc_rel_sum.detach().to("cpu").contiguous()
        out["goc_cos_sum"] = self.goc_cos_sum.detach().to("cpu").contiguous()
        return out

    def load(self, names: list[str], tensors: dict[str, torch.Tensor], samples: list[int]) -> None:
        """Replace the sums by stored ones (resume). Raises ValueError on a missing key or wrong shape."""
        for kind in PER_UNIT:
            dst = getattr(self, kind)
            for i, name in enumerate(names):
                key = f"{kind}/{name}"
                if key not in tensors:
                    raise ValueError(f"partial calibration state lacks tensor {key!r}")
                if tuple(tensors[key].shape) != tuple(dst[i].shape):
                    raise ValueError(f"partial state tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(dst[i].shape)}")
                dst[i].copy_(tensors[key])
        self.goc_rel_sum.copy_(tensors["goc_rel_sum"])
        self.goc_cos_sum.copy_(tensors["goc_cos_sum"])
        self.samples = [int(samples[0]), int(samples[1])]

    def all_tensors(self) -> list[torch.Tensor]:
        """Every sum tensor (for in-place distributed all-reduce), in a fixed order."""
        return [*self.gram, *self.prior_sum, *self.eoc_q, *self.eoc_m, self.goc_rel_sum, self.goc_cos_sum]
