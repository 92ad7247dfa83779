"""``verify`` and ``report`` parse a package's specification once (``package.reader.read_package_spec``).

Their readers (the metadata, the reference executor, each unit's run) used to parse and check the same
``model.mlmodel`` three or four times per command. The oracle is a count of real parses
(``_parse_package_spec`` calls) and, for the cache's invalidation, the files themselves: a package
rewritten on disk (its weights truncated, its specification swapped for another package's) is read
afresh, and what the fresh read says is what a first read of those files says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.package import reader
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "bitnet_offline.onnx"
OTHER = ROOT / "models" / "bitnet_online.onnx"
SPEC = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


@pytest.fixture
def package(converted: PackageCache, tmp_path: Path) -> Path:
    pkg = tmp_path / "m.mlpackage"
    shutil.copytree(converted.get(MODEL, check=False), pkg)  # a fresh path: nothing of it parsed yet
    return pkg


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = reader._parse_package_spec

    def counted(pkg: Path, spec_file: Path) -> reader.PackageSpec:
        seen.append(pkg)
        return real(pkg, spec_file)

    monkeypatch.setattr(reader, "_parse_package_spec", counted)
    return seen


def test_verify_parses_the_package_once(package: Path, parses: list[Path]) -> None:
    from bitnet_coreml.verify import verify

    report = verify(MODEL, package, raise_on_failure=False)
    assert report.comparisons and report.passed
    assert parses == [package]


def test_report_parses_the_package_once(package: Path, parses: list[Path]) -> None:
    from bitnet_coreml.report.data import collect

    data = collect(package, MODEL)
    assert data["package"] == str(package)
    assert parses == [package]


def test_a_package_rewritten_on_disk_is_read_again(package: Path, converted: PackageCache, tmp_path: Path,
                                                    parses: list[Path]) -> None:
    first = reader.read_package_spec(package)
    assert reader.read_package_spec(package).spec is first.spec and len(parses) == 1
    # the specification replaced by another model's: the new one is what a read returns
    other = converted.get(OTHER, check=False)
    shutil.copyfile(other / SPEC, package / SPEC)
    shutil.copytree(other / SPEC.parent / "weights", package / SPEC.parent / "weights", dirs_exist_ok=True)
    again = reader.read_package_spec(package)
    assert len(parses) == 2
    from coremltools.proto import Model_pb2

    assert again.spec == Model_pb2.Model.FromString((other / SPEC).read_bytes()) != first.spec
    # truncated weights: refused as on a first read
    weights = package / SPEC.parent / "weights" / "weight.bin"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match="truncated package"):
        reader.read_package_spec(package)
