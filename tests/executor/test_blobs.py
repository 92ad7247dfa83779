"""Weights read from the package file when compiled (``executor/blobs.py``), not by coremltools' loader.

Oracle: the same package run through coremltools' own proto loader (every weight read by it), and
the package files' bytes (nothing written).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.convert import ConvertOptions, convert
from bitnet_coreml.executor import blobs, loader
from bitnet_coreml.executor.stateful import StatefulRun
from tests.executor._helpers import MB, build_program

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "hf" / "bitnet-tiny-packed"


def _files(pkg: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pkg)): p.read_bytes() for p in sorted(pkg.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_lazy_load_gives_the_plain_loads_results(precision: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "lazy.mlpackage"
    convert(TINY, pkg, ConvertOptions(stateful=True, context=32, prefill=8, precision=precision, check=False))
    plain_pkg = tmp_path / "plain.mlpackage"
    shutil.copytree(pkg, plain_pkg)
    before = _files(pkg)
    monkeypatch.setattr(blobs, "MIN_LAZY_BYTES", 256)  # the tiny model's weights (2-bit and float) become lazy
    ids = np.random.default_rng(0).integers(0, 256, 11)
    lazy = StatefulRun(pkg, fp32=precision == "fp32")
    held = lazy.executors["decode"]._shared.blobs
    assert held is not None and len(held) > 0
    got = lazy.feed(ids)  # 8 through prefill, 3 through decode
    monkeypatch.setattr(loader, "load_lazily", lambda *a: None)  # coremltools reads every weight
    plain = StatefulRun(plain_pkg, fp32=precision == "fp32")
    assert plain.executors["decode"]._shared.blobs is None
    want = plain.feed(ids)
    np.testing.assert_array_equal(got, want)
    assert _files(pkg) == before  # read-only


def test_a_used_stand_in_falls_back() -> None:
    """Zeros of a stand-in copied or computed with at load are detected (the caller then loads plainly)."""
    stand_in = np.broadcast_to(np.zeros((), np.float32), (1, 64))  # what LazyBlobs.stand_in hands out

    def reads(x):  # type: ignore[no-untyped-def]
        return MB.add(x=x, y=MB.const(val=stand_in))

    def folds(x):  # type: ignore[no-untyped-def]
        return MB.add(x=x, y=MB.add(x=MB.const(val=stand_in), y=np.ones((1, 64), np.float32)))

    held = blobs.LazyBlobs(Path("."))
    inputs = {"x": np.zeros((1, 64), np.float32)}
    assert not held.consistent(build_program(reads, inputs))  # a memoryless array nobody registered
    held._entries[id(stand_in)] = (stand_in, "@model_path/weights/weight.bin", 64, None, (1, 64))
    assert held.consistent(build_program(reads, inputs))  # registered, only read at run time
    assert not held.consistent(build_program(folds, inputs))  # a value computed from its zeros at load
