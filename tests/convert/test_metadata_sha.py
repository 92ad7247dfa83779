"""What a package's metadata promises: the check summary the runtime reads, and a source hash over all its data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from bitnet_coreml.check import Target, run_check
from bitnet_coreml.convert import ConvertOptions, convert, external_data_files, source_sha256
from bitnet_coreml.errors import InputError
from bitnet_coreml.frontend import load
from bitnet_coreml.passes import run_default_passes
from bitnet_coreml.runtime.capability import CHECK_METADATA_KEY, _from_metadata
from bitnet_coreml.runtime.package_io import read_package
from tests.convert.graphs import chain_model


@pytest.fixture(scope="module")
def chain_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("src") / "chain.onnx"
    m, _ = chain_model(seed=3, d=64, n=128)
    onnx.save(m, p)
    return p


def test_check_summary_has_fallback_plan_and_unit_counts(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.mlpackage"
    convert(chain_onnx, out, ConvertOptions(target="macos"))
    info = read_package(out)
    summary = json.loads(info.metadata[CHECK_METADATA_KEY])
    # oracle: the check stage run on its own over the same source
    model = load(chain_onnx)
    run_default_passes(model)
    report = run_check(model, Target(platform="macos"), precision="fp16", source=str(chain_onnx))
    assert summary["fallback_plan"] == report.to_dict()["fallback_plan"]
    assert summary["unit_counts"] == report.to_dict()["unit_counts"]
    assert summary["fallback_plan"], "a convertible model has at least one unit in its plan"
    assert sum(summary["unit_counts"].values()) == len(report.units) > 0
    # the runtime's reader rules out exactly the units the plan leaves out
    listed = {step["compute_units"] for step in summary["fallback_plan"]}
    ruled_out = _from_metadata(info)
    expected = {u for u, cu in (("ane", "CPU_AND_NE"), ("gpu", "CPU_AND_GPU"), ("cpu", "CPU_ONLY")) if cu not in listed}
    assert set(ruled_out) == expected


def _external_model(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """chain_model saved with each initializer of >= 1 KiB in one of ``names`` (round robin)."""
    m, _ = chain_model(seed=5, d=32, n=48)
    big = [t for t in m.graph.initializer if len(t.raw_data or b"") >= 1024 or t.ByteSize() >= 1024]
    assert len(big) >= len(names)
    for i, t in enumerate(big):
        onnx.external_data_helper.set_external_data(t, location=names[i % len(names)])
    path = tmp_path / "ext.onnx"
    # write the external files the way onnx does (it appends each tensor at its recorded offset)
    from onnx.external_data_helper import write_external_data_tensors

    m = write_external_data_tensors(m, str(tmp_path))
    onnx.save_model(m, path)
    return path


def _oracle(path: Path, names: list[str]) -> str:
    h = hashlib.sha256(path.read_bytes())
    for n in sorted(names):
        h.update(b"\0" + n.encode() + b"\0" + (path.parent / n).read_bytes())
    return h.hexdigest()


def test_source_sha256_covers_external_data(tmp_path: Path) -> None:
    path = _external_model(tmp_path, ("w_b.data", "w_a.data"))
    assert [f.name for f in external_data_files(path)] == ["w_a.data", "w_b.data"]
    before = source_sha256(path)
    assert before == _oracle(path, ["w_a.data", "w_b.data"])
    assert before != hashlib.sha256(path.read_bytes()).hexdigest()
    # the loaded model names the same files without parsing the file again
    assert source_sha256(path, load(path)) == before
    # one changed byte in a .data file (the .onnx is untouched) changes the hash
    data = tmp_path / "w_b.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    after = source_sha256(path)
    assert after != before and after == _oracle(path, ["w_a.data", "w_b.data"])


def test_source_sha256_without_external_data_is_the_file_hash(chain_onnx: Path) -> None:
    assert source_sha256(chain_onnx) == hashlib.sha256(chain_onnx.read_bytes()).hexdigest()
    assert external_data_files(chain_onnx) == [] == external_data_files(chain_onnx, load(chain_onnx))


def test_source_sha256_missing_external_file(tmp_path: Path) -> None:
    path = _external_model(tmp_path, ("w.data",))
    (tmp_path / "w.data").unlink()
    with pytest.raises(InputError, match="w.data"):
        source_sha256(path)


def test_converted_package_hash_covers_external_data(tmp_path: Path) -> None:
    path = _external_model(tmp_path, ("weights.data",))
    out = tmp_path / "e.mlpackage"
    r = convert(path, out, ConvertOptions(check=False, precision="fp32"))
    assert r.source_sha256 == _oracle(path, ["weights.data"])
    assert read_package(out).metadata["bitnet_coreml.source_sha256"] == r.source_sha256
