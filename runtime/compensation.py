"""The compensation arithmetic of a predicted unit output (docs/plan-format.md, "How the runtime follows a plan").

One definition, shared by the plan executor and the ONNX export, which must reproduce it operation for
operation.
"""

from __future__ import annotations


def combine(hist, coeffs, eoc=None) -> tuple:
    """A linear prediction with optional EOC factor: per part p, ``Σ_j coeffs[p][j]·hist[j][p]`` accumulated
    left to right from ``hist[0]``, times ``eoc[p]``.

    The one definition of the compensation arithmetic, shared by the executor and the ONNX export (which
    must reproduce it operation for operation).

    Args:
        hist: history features, most recent first: ``hist[j]`` a tuple of part tensors (batch first).
        coeffs: per part, the coefficients (scalars or 0-d tensors in the part's dtype).
        eoc: per part, the factor ``1 + eoc_alpha·D`` broadcastable to the per-sample shape, or None.
    Returns:
        A tuple of part tensors.
    """
    out = []
    for p in range(len(hist[0])):
        c = coeffs[p]
        acc = c[0] * hist[0][p]
        for j in range(1, len(c)):
            acc = acc + c[j] * hist[j][p]
        if eoc is not None:
            acc = acc * eoc[p]
        out.append(acc)
    return tuple(out)
