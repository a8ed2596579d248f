"""Streaming float64 accumulators of the calibration statistics (docs/calibration-format.md, "Tensors").

One batch of samples at a time, each unit's recorded trajectory ``X`` — float32 of shape (N, S, D_u): N
samples of the batch, S steps, D_u flattened feature elements, for one guidance branch — is folded into
sums that do not depend on the number of samples:

- ``gram[u]`` (B, 2, S, S): ``Σ_{n in split k} X[n] X[n]ᵀ`` per branch b and split k;
- ``prior_sum[u]`` (S, D_u): ``Σ_{n,b} X[n]``;
- ``eoc_q[u]`` (2, S, D_u): ``Σ_{n in k, b} X[n] ⊙ X[n]``;
- ``eoc_m[u]`` (2, S, K, D_u): lag j at index j−1, ``Σ_{n in k, b} (X[n,s] − X[n,s−j]) ⊙ X[n,s−j]``
  (zero where s < j). The difference of two float32 values is exact in float64;
- ``goc_rel_sum`` (U, S): ``Σ_{n,b} ‖X_s − X_{s−1}‖ / ‖X_s‖`` (0 at s = 0; a term is 0 where ‖X_s‖ = 0);
- ``goc_cos_sum`` (U, S): ``Σ_{n,b} cos(X_s − X_{s−1}, X_{s−1} − X_{s−2})`` (0 at s < 2; a term is 0
  where either difference is exactly zero).

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
        numels: D_u per unit (U entries).
        steps: S.
        branches: B (1 or 2).
        eoc_lags: K >= 0.
        device: where the sums live (the trajectory's device).

    Attributes:
        gram, prior_sum, eoc_q, eoc_m: lists of U float64 tensors with the shapes above.
        goc_rel_sum, goc_cos_sum: (U, S) float64.
        samples: [n_split0, n_split1] samples folded in (each with B branches).
    """

    def __init__(self, numels: list[int], steps: int, branches: int, eoc_lags: int, device="cpu"):
        S, B, K = int(steps), int(branches), int(eoc_lags)
        self.numels = [int(d) for d in numels]
        self.S, self.B, self.K = S, B, K
        self.device = torch.device(device)
        z = dict(dtype=F64, device=self.device)
        self.gram = [torch.zeros(B, 2, S, S, **z) for _ in numels]
        self.prior_sum = [torch.zeros(S, d, **z) for d in self.numels]
        self.eoc_q = [torch.zeros(2, S, d, **z) for d in self.numels]
        self.eoc_m = [torch.zeros(2, S, K, d, **z) for d in self.numels]
        U = len(self.numels)
        self.goc_rel_sum = torch.zeros(U, S, **z)
        self.goc_cos_sum = torch.zeros(U, S, **z)
        self.samples = [0, 0]

    # ------------------------------------------------------------------------------------------------
    def add(self, unit: int, branch: int, X: torch.Tensor, first_sample: int) -> None:
        """Fold one unit's trajectory for one branch of one batch into the sums.

        Args:
            unit: unit index.
            branch: guidance branch b (0 conditional, 1 unconditional).
            X: float32 (or float64) tensor (N, S, D_u) on ``device``: X[i, s] is the flattened feature of
                global sample ``first_sample + i`` at step s.
            first_sample: global index of the batch's first sample (fixes the splits).

        Raises:
            ValueError: wrong shape.
        """
        N, S, D = X.shape
        if S != self.S or D != self.numels[unit]:
            raise ValueError(f"trajectory of unit {unit} has shape {tuple(X.shape)}, expected (N, {self.S}, {self.numels[unit]})")
        X64, E, diff = self._scratch(N, S, D, X.device)
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
        self.prior_sum[unit] += X64.sum(0)
        lags = range(1, min(self.K, S - 1) + 1)
        q, m = self.eoc_q[unit], self.eoc_m[unit]
        for i in range(N):
            k = (first_sample + i) % 2
            x = X64[i]
            q[k].addcmul_(x, x)
            for j in lags:
                d = E[i, 1:] if j == 1 else torch.sub(x[j:], x[:-j], out=diff[: S - j])
                m[k, j:, j - 1].addcmul_(d, x[:-j])
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

    def _scratch(self, N: int, S: int, D: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reusable float64 buffers (N, S, D), (N, S, D), (S, D) — fresh large allocations page-fault on
        every batch, which costs as much as the arithmetic."""
        key = (N, S, D, str(device))
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        if key not in cache:
            if len(cache) >= 8:
                cache.clear()
            z = dict(dtype=F64, device=device)
            cache[key] = (torch.empty(N, S, D, **z), torch.empty(N, S, D, **z), torch.empty(S, D, **z))
        return cache[key]

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
