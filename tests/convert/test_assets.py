"""Package assets: written as one registered Core ML package item, read back without touching the package."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from bitnet_coreml.convert import ConvertOptions, convert
from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.package.assets import assets_dir, read_asset, read_assets, write_assets
from tests.convert.graphs import chain_model


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("assets")
    src = d / "chain.onnx"
    m, _ = chain_model(seed=5, d=32, n=64)
    onnx.save(m, src)
    out = d / "c.mlpackage"
    convert(src, out, ConvertOptions(target="macos"))
    return out


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(package: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / package.name
    shutil.copytree(package, dst)
    return dst


def test_round_trip_and_core_ml_sees_a_valid_item(package: Path, tmp_path: Path) -> None:
    from coremltools.libmodelpackage import ModelPackage

    pkg = _copy(package, tmp_path)
    assert read_assets(pkg) == {}
    tok = b'{"model": {"type": "BPE"}}'
    write_assets(pkg, {"tokenizer.json": tok, "generation_config.json": b"{}"})
    assert read_assets(pkg) == {"generation_config.json": b"{}", "tokenizer.json": tok}
    assert read_asset(pkg, "tokenizer.json") == tok
    assert read_asset(pkg, "tokenizer_config.json") is None
    assert (pkg / "Data" / "com.bitnet-coreml" / "assets" / "tokenizer.json").read_bytes() == tok
    # Core ML's own package library (a copy, since it rewrites Manifest.json when opened) finds the item
    probe = _copy(pkg, tmp_path / "probe")
    assert ModelPackage.isValid(str(probe))
    item = ModelPackage(str(probe)).findItemByNameAuthor("assets", "com.bitnet-coreml")
    assert item is not None and Path(item.path()) == assets_dir(probe)
    # and the model still loads and runs
    x = np.random.default_rng(0).standard_normal((1, 8, 32)).astype(np.float32)
    a = ReferenceExecutor(package).predict({"x": x})
    b = ReferenceExecutor(pkg).predict({"x": x})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_replacing_keeps_other_assets_and_is_deterministic(package: Path, tmp_path: Path) -> None:
    p1 = _copy(package, tmp_path / "one")
    p2 = _copy(package, tmp_path / "two")
    for p in (p1, p2):
        write_assets(p, {"a.json": b"1", "b.json": b"2"})
        write_assets(p, {"a.json": b"3"})
    assert read_assets(p1) == {"a.json": b"3", "b.json": b"2"}
    assert (p1 / "Manifest.json").read_bytes() == (p2 / "Manifest.json").read_bytes()
    entries = json.loads((p1 / "Manifest.json").read_text())["itemInfoEntries"]
    assert sum(e["author"] == "com.bitnet-coreml" for e in entries.values()) == 1
    # no staging folders left behind
    assert sorted(os.listdir(p1 / "Data" / "com.bitnet-coreml")) == ["assets"]


def test_reading_never_writes(package: Path, tmp_path: Path) -> None:
    pkg = _copy(package, tmp_path)
    write_assets(pkg, {"tokenizer.json": b"{}"})
    before = _snapshot(pkg)
    read_assets(pkg)
    read_asset(pkg, "tokenizer.json")
    assert _snapshot(pkg) == before


def test_bad_names_and_non_packages(package: Path, tmp_path: Path) -> None:
    pkg = _copy(package, tmp_path)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(InputError, match="plain file name"):
            write_assets(pkg, {bad: b""})
    with pytest.raises(ModelLoadError, match="not an .mlpackage"):
        read_assets(tmp_path)
    assert read_assets(pkg) == {}
    target = tmp_path / "secret.txt"
    target.write_text("x")
    write_assets(pkg, {"t.json": b"{}"})
    (assets_dir(pkg) / "link.json").symlink_to(target)
    with pytest.raises(ModelLoadError, match="symbolic link"):
        read_assets(pkg)
