"""Bad ONNX input: exit code 2, one line naming the problem, no traceback, nothing read outside."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as h
import onnx.numpy_helper as nh
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from tests.passes.graphs import mlp_block


def _inspect(path: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def _one_line_error(out: str, *needles: str) -> None:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: ")
    assert "Traceback" not in out
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _external_model(folder: Path, location: str, data: bytes | None = None) -> Path:
    """A model whose initializer 'w' (2x3 float) lives in external data at ``location``."""
    w = nh.from_array(np.ones((2, 3), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": "0", "length": "24"}.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    g = h.make_graph([h.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    p = folder / "m.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, str(p), "empty")


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "rand.onnx"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, str(p))


def test_truncated_file(tmp_path: Path) -> None:
    data = mlp_block().SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, str(p))


def test_missing_file(tmp_path: Path) -> None:
    code, out = _inspect(tmp_path / "nope.onnx")
    assert code == 2
    _one_line_error(out, "no such file")


def test_missing_external_data(tmp_path: Path) -> None:
    code, out = _inspect(_external_model(tmp_path, "weights.bin"))
    assert code == 2
    _one_line_error(out, "'w'", "weights.bin", "not found")


def test_short_external_data(tmp_path: Path) -> None:
    p = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, "truncated")


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "ABSOLUTE"])
def test_external_data_escaping_folder(tmp_path: Path, location: str) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(6, np.float32).tobytes())
    if location == "ABSOLUTE":
        location = str(secret)
    code, out = _inspect(_external_model(model_dir, location))
    assert code == 2
    _one_line_error(out, "is absolute" if location.startswith("/") else "'..'")


def test_external_data_symlink_escape(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(6, np.float32).tobytes())
    os.symlink(secret, model_dir / "weights.bin")
    code, out = _inspect(_external_model(model_dir, "weights.bin"))
    assert code == 2
    _one_line_error(out, "outside", "symlink")


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    p = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    from bitnet_coreml.frontend import load

    m = load(p)
    np.testing.assert_array_equal(m.graph.initializers["w"].const_value.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))


def _tiny(nodes: list[onnx.NodeProto], opset: int = 18, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    ops = [h.make_opsetid("", opset)] + [h.make_opsetid(d, 1) for d in domains]
    return h.make_model(h.make_graph(nodes, "g", [x], [y]), opset_imports=ops)


def test_unknown_domain(tmp_path: Path) -> None:
    p = tmp_path / "dom.onnx"
    p.write_bytes(_tiny([h.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="n0")], domains=("com.example",)).SerializeToString())
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, "'Frobnicate'", "com.example", "'n0'")


def test_opset_too_old(tmp_path: Path) -> None:
    p = tmp_path / "old.onnx"
    p.write_bytes(_tiny([h.make_node("Relu", ["x"], ["y"])], opset=9).SerializeToString())
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, "opset 9", ">= 13")


def test_cycle(tmp_path: Path) -> None:
    nodes = [h.make_node("Add", ["x", "b"], ["a"], name="n1"), h.make_node("Relu", ["a"], ["b"], name="n2"),
             h.make_node("Identity", ["a"], ["y"], name="n3")]
    p = tmp_path / "cycle.onnx"
    p.write_bytes(_tiny(nodes).SerializeToString())
    code, out = _inspect(p)
    assert code == 2
    _one_line_error(out, "cycle")


def test_cli_subprocess_has_no_traceback_or_coreml_noise(tmp_path: Path) -> None:
    p = tmp_path / "rand.onnx"
    p.write_bytes(b"\x08\x07garbage" * 100)
    res = subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", "inspect", str(p)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    assert "Traceback" not in res.stderr and "_MLModelProxy" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
