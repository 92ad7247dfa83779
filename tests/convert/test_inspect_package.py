"""``inspect PKG.mlpackage`` (issue 19 item 9): I/O with dtypes and shapes, functions and states,
metadata, weight bytes by kind, deployment target.

Oracles: the ONNX graph's own input/output shapes and its ternary parameter count (2 bits each),
the package's files on disk, and a stateful MIL program built here with coremltools' builder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "bitnet.mlpackage"
    r = CliRunner().invoke(main, ["convert", str(ROOT / "models" / "bitnet_offline.onnx"), "-o", str(out),
                                  "--min-os", "iOS17", "--json"])
    assert r.exit_code == 0, r.output
    return out


def test_inspect_package_json(package: Path) -> None:
    r = CliRunner().invoke(main, ["inspect", str(package), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    g = onnx.load(str(ROOT / "models" / "bitnet_offline.onnx"), load_external_data=False).graph
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (g.input[0], g.output[0])]
    assert [(f["name"], f["dtype"], f["shape"]) for f in doc["inputs"]] == [(g.input[0].name, "int32", dims[0])]
    assert [(f["name"], f["dtype"], f["shape"]) for f in doc["outputs"]] == [(g.output[0].name, "float32", dims[1])]
    assert doc["states"] == [] and doc["functions"] == []
    assert doc["deployment_target"] == "iOS17" and doc["spec_version"] == 8
    manifest = json.loads((ROOT / "models" / "MANIFEST.json").read_text())["onnx"]["bitnet_offline"]["spec"]
    layers = manifest["layers"]
    h, inter = manifest["hidden"], manifest["intermediate"]
    kv = h // manifest["heads"] * manifest["kv_heads"]
    ternary = layers * (h * h * 2 + h * kv * 2 + h * inter * 3)  # q, o, k, v, gate, up, down
    assert doc["weight_bytes_by_kind"]["constexpr_lut_to_dense"] == ternary * 2 // 8
    weight_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert doc["weight_bytes"] == weight_file.stat().st_size
    assert sum(doc["weight_bytes_by_kind"].values()) <= doc["weight_bytes"]
    assert doc["metadata"]["bitnet_coreml.precision"] == "fp16"
    human = CliRunner().invoke(main, ["inspect", str(package)])
    assert human.exit_code == 0 and "input_ids" in human.stdout and "iOS17" in human.stdout


def test_inspect_shows_states_of_a_stateful_package(tmp_path: Path) -> None:
    from coremltools.converters.mil import Builder as mb

    from bitnet_coreml._quiet import coremltools

    ct = coremltools()

    @mb.program(input_specs=[mb.TensorSpec((1, 4), dtype=ct.converters.mil.mil.types.fp16),
                             mb.StateTensorSpec((1, 4), dtype=ct.converters.mil.mil.types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, cache):  # type: ignore[no-untyped-def]
        old = mb.read_state(input=cache)
        new = mb.add(x=old, y=x)
        mb.coreml_update_state(state=cache, value=new)
        return mb.mul(x=new, y=np.float16(2.0), name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    path = tmp_path / "stateful.mlpackage"
    model.save(str(path))
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(s["name"], s["dtype"], s["shape"]) for s in doc["states"]] == [("cache", "float16", [1, 4])]
    assert doc["deployment_target"] == "iOS18 / macOS15" and doc["program_functions"] == ["main"]


def test_a_checkpoint_without_seq_len_gets_a_stated_default() -> None:
    ckpt = str(ROOT / "models" / "hf" / "bitnet-tiny-packed")
    r = CliRunner().invoke(main, ["check", ckpt, "--json"])
    assert r.exit_code == 0, r.output
    assert "no --seq-len given; the graph takes 64 tokens" in r.stderr
    assert any("takes 64 tokens" in n for n in json.loads(r.stdout)["notes"])
    quiet = CliRunner().invoke(main, ["check", ckpt, "--seq-len", "16", "--json"])
    assert quiet.exit_code == 0 and "seq-len" not in quiet.stderr
