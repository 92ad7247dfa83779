"""Bad or unsupported input to a lowering raises the project's errors with a message naming the node."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from bitnet_coreml.errors import InputError, UnsupportedOpError
from bitnet_coreml.lower.program import BuildOptions, build_program
from tests.lower.conformance_onnx import single_node_model

X = np.zeros((2, 3), np.float32)


def _build(model: object, node_name: str) -> None:
    m = ir.from_proto(model)
    m.graph.node(0).name = node_name
    build_program(m, BuildOptions(precision="fp32", ios=17))


@pytest.mark.parametrize(("op", "inits", "attrs", "pattern"), [
    ("Gather", {"i": np.array([0, 3], np.int64)}, {"axis": 1}, r"index range \[0, 3\] out of bounds.*size 3"),
    ("Squeeze", {"axes": np.array([1], np.int64)}, {}, r"cannot squeeze axis 1 of size 3"),
    ("Transpose", {}, {"perm": [0, 2]}, r"axis 2 is out of range for rank 2"),
    ("Slice", {"s": np.array([0], np.int64), "e": np.array([2], np.int64), "a": np.array([0], np.int64),
               "st": np.array([0], np.int64)}, {}, r"step for axis 0 is 0"),
    ("Expand", {"shape": np.array([4, 3], np.int64)}, {}, r"does not broadcast with input shape \[2, 3\]"),
    ("Split", {"split": np.array([1, 1], np.int64)}, {"axis": 1}, r"split sizes \[1, 1\] do not cover axis 1"),
])
def test_bad_input_names_the_node_and_values(op: str, inits: dict[str, np.ndarray], attrs: dict[str, object],
                                             pattern: str) -> None:
    outputs = ("a", "b") if op == "Split" else ("y",)
    # ONNX's own shape inference rejects these models too: build them without it.
    model = single_node_model(op, {"x": X}, outputs=outputs, initializers=inits, infer=False, **attrs)
    with pytest.raises(InputError, match=rf"'bad_{op.lower()}'.*{pattern}"):
        _build(model, f"bad_{op.lower()}")


def test_int64_constant_beyond_int32_meeting_a_computed_value_is_unsupported() -> None:
    x = np.zeros(2, np.int64)
    model = single_node_model("Add", {"x": x}, initializers={"big": np.array([2**40, 1], np.int64)})
    with pytest.raises(UnsupportedOpError, match=r"does not fit int32"):
        _build(model, "add_big")


def test_cast_to_string_is_unsupported() -> None:
    import onnx

    model = single_node_model("Cast", {"x": X}, to=onnx.TensorProto.STRING)
    with pytest.raises(UnsupportedOpError, match=r"'to_text'.*cast to STRING"):
        _build(model, "to_text")
