"""A small onnx-ir graph builder for the checkpoint importer: typed values, unique names, fused ops.

Every value gets its dtype and static shape when it is created (the importer knows them), so the
model needs no shape inference before checking or lowering. Fused ops go through
``bitnet_coreml.passes.fused.make_node``, which also registers the model-local ONNX function that
lets ONNX Runtime run the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bitnet_coreml.passes.fused import DOMAIN, make_node


class GraphBuilder:
    """Append-only graph under construction; :meth:`model` wraps it in an ``ir.Model``."""

    def __init__(self) -> None:
        self.graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 18, DOMAIN: 1},
                              name="bitnet_checkpoint")
        # make_node registers functions on a model, so the model exists from the start
        self._model = ir.Model(self.graph, ir_version=10, producer_name="bitnet_coreml.hf_checkpoint")
        self._names: set[str] = set()
        self._n = 0
        self._ints: dict[tuple[int, ...], ir.Value] = {}

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return self._unique(f"{hint}_{self._n}")

    # --- values -----------------------------------------------------------------------------------

    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int]) -> ir.Value:
        v = ir.Value(name=self._unique(name), type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
        self.graph.inputs.append(v)
        return v

    def output(self, v: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[int]) -> None:
        self._names.discard(v.name or "")
        v.name = self._unique(name)
        v.type, v.shape = ir.TensorType(dtype), ir.Shape(list(shape))
        self.graph.outputs.append(v)

    def initializer(self, tensor: ir.TensorProtocol) -> ir.Value:
        """Register a (possibly lazy) tensor as an initializer named after it."""
        name = self._unique(tensor.name or self._fresh("const"))
        tensor.name = name
        v = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape.numpy()),
                     const_value=tensor)
        self.graph.register_initializer(v)
        return v

    def const(self, name: str, arr: np.ndarray) -> ir.Value:
        arr = np.array(arr, order="C")  # (ascontiguousarray would turn a 0-d scalar into shape [1])
        return self.initializer(ir.tensor(arr, name=name))

    def ints(self, values: Sequence[int]) -> ir.Value:
        """A shared int64 1-D constant (shapes, slice bounds), one initializer per distinct value."""
        key = tuple(int(v) for v in values)
        if key not in self._ints:
            label = "_".join(str(v).replace("-", "m") for v in key)
            self._ints[key] = self.const(f"i64_{label}", np.asarray(key, dtype=np.int64))
        return self._ints[key]

    # --- nodes ------------------------------------------------------------------------------------

    def _typed(self, node: ir.Node, shape: Sequence[int] | ir.Shape | None, dtype: ir.DataType) -> ir.Value:
        self.graph.append(node)
        out = node.outputs[0]
        out.name = self._fresh(node.name or node.op_type)
        out.type = ir.TensorType(dtype)
        if shape is not None:
            out.shape = ir.Shape(list(shape))
        return out

    def op(self, op_type: str, inputs: Sequence[ir.Value], attrs: dict[str, object] | None = None, *,
           shape: Sequence[int] | ir.Shape | None = None, name: str | None = None,
           dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
        node = ir.node(op_type, inputs=list(inputs), attributes=attrs or {},  # type: ignore[arg-type]
                       name=self._unique(name) if name else self._fresh(op_type))
        return self._typed(node, shape, dtype)

    def fused(self, op_type: str, inputs: Sequence[ir.Value], attrs: dict[str, object], name: str, *,
              shape: Sequence[int] | None = None) -> ir.Value:
        if shape is None:
            dims = [int(d) for d in (inputs[0].shape or [])]  # type: ignore[arg-type]
            if op_type == "BitLinear":
                dims[-1] = int(inputs[1].shape[0])  # type: ignore[index, arg-type]
            shape = dims
        node = make_node(self._model, op_type, list(inputs), attrs, name=self._unique(name))
        return self._typed(node, shape, ir.DataType.FLOAT)

    def reshape(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        return self.op("Reshape", [x, self.ints(shape)], shape=shape)

    def slice(self, x: ir.Value, start: int, end: int, shape: Sequence[int]) -> ir.Value:
        """``x[..., start:end]`` on the last axis."""
        return self.op("Slice", [x, self.ints([start]), self.ints([end]), self.ints([-1])], shape=shape)

    def model(self, opset: int, *, doc: str = "", metadata: dict[str, str] | None = None) -> ir.Model:
        self.graph.opset_imports[""] = opset
        self._model.doc_string = doc
        if metadata:
            self._model.metadata_props.update(metadata)
        return self._model
