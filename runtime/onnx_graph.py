"""ONNX graph mechanics of the plan export (docs/onnx.md), torch-free: one weight file shared by every step
graph, the full ``onnx.checker`` check, and an analytic FLOP count of a graph.

- :class:`SharedWeights` moves each large initializer of a graph into one external-data file, deduplicated
  by content across all graphs of an export, and renames it ``w.<sha256 prefix>``: the same tensor has the
  same name and the same bytes (offset, length) in every graph, so a runtime can load it once and hand it to
  every session (onnxruntime ``SessionOptions.add_initializer``; TensorRT weight refit by name).
- :func:`check_graph` runs ``onnx.checker.check_model(path, full_check=True)`` (the structural check plus
  strict shape inference) on a saved graph, its external data included.
- :func:`graph_flops` counts what ``torch.utils.flop_counter`` counts (``cachec.runtime.flops``): 2 FLOPs per
  multiply-add of ``MatMul``, ``Gemm`` and ``Conv`` nodes (attention is ``MatMul`` after export), nothing for
  element-wise nodes, with every batch dimension set to 1 (one sample, one branch: the plan's unit).

Imports onnx (and numpy), never torch: the deployment side (``cachec.runtime.onnx_loop``) uses it too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

#: initializers of at least this many bytes go to the shared weight file; smaller ones (scalars such as the
#: compensation coefficients, short biases) stay inside each graph
EXTERNAL_MIN_BYTES = 1024
#: offsets of tensors in the weight file are multiples of this (page-aligned: a runtime may map them)
ALIGN = 4096


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a dependency
        raise ImportError("the ONNX export needs the onnx package: pip install 'cachec[onnx]'") from exc
    return onnx


class SharedWeights:
    """One external-data file for the large initializers of many graphs, deduplicated by content.

    Args:
        path: the weight file to write (``weights.bin`` beside the graphs).

    Use :meth:`share` on each graph before saving it beside ``path``, then :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.location = self.path.name
        self.table: dict[str, dict] = {}  # name -> {offset, length, dtype, dims}
        self._file = open(self.path, "wb")
        self._size = 0

    def share(self, model) -> int:
        """Move ``model``'s initializers of at least :data:`EXTERNAL_MIN_BYTES` into the file (each distinct
        tensor once) under the name ``w.<digest>``, renaming the node inputs that read them.

        Returns:
            The number of initializers moved.
        """
        onnx = _onnx()
        from onnx import numpy_helper

        graph = model.graph
        rename: dict[str, str] = {}
        kept, seen, moved = [], set(), 0
        for init in graph.initializer:
            arr = numpy_helper.to_array(init)
            data = np.ascontiguousarray(arr).tobytes()
            if len(data) < EXTERNAL_MIN_BYTES:
                kept.append(init)
                continue
            digest = hashlib.sha256(f"{init.data_type}:{list(init.dims)}:".encode() + data).hexdigest()
            name = f"w.{digest[:24]}"
            rename[init.name] = name
            moved += 1
            if name in seen:  # the same tensor twice in one graph: one initializer
                continue
            seen.add(name)
            entry = self.table.get(name)
            if entry is None:
                pad = (-self._size) % ALIGN
                self._file.write(b"\0" * pad)
                entry = {"offset": self._size + pad, "length": len(data), "dtype": str(arr.dtype),
                         "dims": [int(d) for d in init.dims]}
                self._file.write(data)
                self._size = entry["offset"] + len(data)
                self.table[name] = entry
            tensor = onnx.TensorProto()
            tensor.name, tensor.data_type = name, init.data_type
            tensor.dims.extend(init.dims)
            for key, value in (("location", self.location), ("offset", entry["offset"]), ("length", entry["length"])):
                field = tensor.external_data.add()
                field.key, field.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            kept.append(tensor)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        return moved

    def close(self) -> None:
        """Flush and close the weight file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def check_graph(path: str | os.PathLike) -> None:
    """``onnx.checker.check_model`` with ``full_check=True`` on a saved graph (its external data read from
    beside it).

    Raises:
        onnx.checker.ValidationError, onnx.shape_inference.InferenceError: the graph is invalid.
    """
    _onnx().checker.check_model(str(path), full_check=True)


_NP = {1: np.float32, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


def graph_flops(path: str | os.PathLike) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of the graph at batch 1, counted as :mod:`cachec.runtime.flops` counts them.

    ``MatMul``: 2·(broadcast batch)·M·K·N; ``Gemm``: 2·M·K·N; ``Conv``: 2·N·C_out·(C_in/groups)·prod(kernel)
    ·prod(output spatial). The shapes are measured: the graph runs once in ``onnx.reference`` (numpy) on
    zero inputs whose symbolic dims are 1, with every intermediate value kept (static shape inference cannot
    resolve the exporter's shape arithmetic, e.g. ``chunk`` as dynamic ``Slice``).

    Returns:
        ``(total, per_op_type)``.
    """
    onnx = _onnx()
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))  # with its external data
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        feeds[vi.name] = np.zeros(dims, dtype=_NP[tt.elem_type])
    values = ReferenceEvaluator(model).run(None, feeds, intermediate=True)
    values.update(feeds)
    for init in model.graph.initializer:
        values.setdefault(init.name, np.empty([int(d) for d in init.dims], dtype=np.uint8))

    per: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, b = (list(np.shape(values[n])) for n in node.input[:2])
        if node.op_type == "MatMul":
            a2, b2 = (a if len(a) > 1 else [1, *a]), (b if len(b) > 1 else [*b, 1])
            batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
            f = 2 * int(np.prod(batch, dtype=np.int64)) * a2[-2] * a2[-1] * b2[-1]
        elif node.op_type == "Gemm":
            attrs = {x.name: x.i for x in node.attribute}
            m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            f = 2 * m * k * (b[0] if attrs.get("transB") else b[1])
        else:  # Conv: weight (C_out, C_in/groups, *kernel)
            out = list(np.shape(values[node.output[0]]))
            f = 2 * out[0] * b[0] * b[1] * int(np.prod(b[2:])) * int(np.prod(out[2:]))
        per[node.op_type] = per.get(node.op_type, 0) + int(f)
    return sum(per.values()), per
