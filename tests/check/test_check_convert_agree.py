"""``check`` and ``convert`` agree: what the converter refuses before lowering is a ``check`` violation,
in the same words (one definition: bitnet_coreml/lower/support.py reading the lowering registry)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from bitnet_coreml.cli import main


def _model(tmp_path: Path, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[str], inits: list[onnx.TensorProto] | None = None) -> Path:
    g = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                      inits or [])
    p = tmp_path / "m.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10), p)
    return p


X = oh.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])


def _graphs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (model, words each refusal must contain)."""
    return {
        # several ops without a lowering, one of them twice, next to ops that lower
        "unsupported_ops": (_model(tmp_path / "a", [
            oh.make_node("Det", ["x"], ["d"], name="det_a"), oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Det", ["r"], ["d2"], name="det_b"), oh.make_node("Unique", ["x"], ["u"], name="uniq"),
            oh.make_node("Hardmax", ["x"], ["h"], name="hm"),
            oh.make_node("GridSample", ["x4", "g4"], ["gs"], name="grid")],  # a valid GridSample (load checks shapes)
            [X, oh.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 3, 3]),
             oh.make_tensor_value_info("g4", TensorProto.FLOAT, [1, 3, 3, 2])], ["d", "d2", "u", "h", "gs"]),
            ["3 unsupported op type(s)", "Det (nodes 'det_a', 'det_b')",
             "GridSample (node 'grid')", "Unique (node 'uniq')"]),
        # a graph input where a lowering needs a constant, and a weight a conv_transpose needs fixed
        "const_inputs": (_model(tmp_path / "b", [
            oh.make_node("Reshape", ["x", "s"], ["y"], name="rs"),
            oh.make_node("ConvTranspose", ["x4", "w"], ["ct"], name="deconv")],
            [X, oh.make_tensor_value_info("s", TensorProto.INT64, [1]),
             oh.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 2, 3, 3]),
             oh.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2, 3, 3])], ["y", "ct"]),
            ["node 'rs' (Reshape): input 1 ('s') must be a compile-time constant",
             "node 'deconv' (ConvTranspose): input 1 ('w') must be a compile-time constant"]),
        # an element type a Core ML model cannot declare, read by a node that lowers
        "input_dtype": (_model(tmp_path / "c", [oh.make_node("Cast", ["x8"], ["y"], to=TensorProto.FLOAT, name="c")],
                               [oh.make_tensor_value_info("x8", TensorProto.DOUBLE, [3])], ["y"]),
                        ["graph input 'x8' (read by node 'c'): dtype DOUBLE is not supported"]),
        # what a lowering refuses from attributes alone, and bit ops on runtime values
        "attributes": (_model(tmp_path / "e", [
            oh.make_node("MaxPool", ["x4"], ["mp"], kernel_shape=[2, 2], dilations=[2, 2], name="pool"),
            oh.make_node("BitwiseAnd", ["i", "i"], ["ba"], name="band")],
            [oh.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 2, 5, 5]),
             oh.make_tensor_value_info("i", TensorProto.INT32, [4])], ["mp", "ba"]),
            ["node 'pool' (MaxPool): dilated pooling is not supported",
             "node 'band' (BitwiseAnd): input 0 ('i') must be a compile-time constant for Core ML (it has no bitwise "
             "ops)"]),
        # a rank-6 value (not a DepthToSpace chain)
        "rank": (_model(tmp_path / "d", [oh.make_node("Reshape", ["x", "s6"], ["y"], name="up")], [X], ["y"],
                        [nh.from_array(np.array([1, 1, 1, 1, 3, 3], np.int64), "s6")]),
                 ["node 'up' (Reshape): output 'y' has rank 6 > 5"]),
    }


@pytest.mark.parametrize("case", ["unsupported_ops", "const_inputs", "input_dtype", "attributes", "rank"])
def test_check_and_convert_refuse_with_the_same_words(case: str, tmp_path: Path) -> None:
    for d in "abcde":
        (tmp_path / d).mkdir()
    src, words = _graphs(tmp_path)[case]
    r = CliRunner().invoke(main, ["check", str(src), "--target", "macos", "--chip", "M1", "--json"])
    assert r.exit_code == 1, r.output
    rep = json.loads(r.output)
    assert rep["score"] == 0.0 and not rep["ok"]
    msgs = [v["message"] for v in rep["violations"] if v["rule"] in ("lowering", "rank_over_5")]
    assert msgs, rep["violations"]
    out = tmp_path / "m.mlpackage"
    c = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--no-check"])
    assert c.exit_code == 2 and "Traceback" not in c.output and not out.exists()
    for w in words:
        assert any(w in m for m in msgs), (w, msgs)
        assert w in c.output, (w, c.output)
    for m in msgs:  # every check violation of these rules is convert's message, word for word
        assert m in " ".join(c.output.split()), (m, c.output)
