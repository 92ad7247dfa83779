"""Corrupt chunked model folders are refused with exit 2 and one line (missing piece, changed piece, a path
outside the folder, boundary tensors that disagree), by every command that opens one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.chunks.conftest import TINY, run_cli


@pytest.fixture()
def folder(tiny: dict[str, Path], tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(tiny["3"], d)
    return d


def _edit(folder: Path, fn: object) -> None:
    m = json.loads((folder / "model.json").read_text())
    fn(m)  # type: ignore[operator]
    (folder / "model.json").write_text(json.dumps(m))


def _refused(folder: Path, words: str) -> None:
    for args in (("inspect", folder), ("verify", TINY, folder)):
        code, out, err = run_cli(*args)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2, (args, code, out, err)
        assert len(lines) == 1 and words in lines[0], err
        assert "Traceback" not in err


def test_intact_copy_opens(folder: Path) -> None:
    code, _, err = run_cli("inspect", folder, "--json")
    assert code == 0, err


def test_missing_piece(folder: Path) -> None:
    shutil.rmtree(folder / "chunk_01.mlpackage")
    _refused(folder, "piece 1 chunk_01.mlpackage is missing")


def test_sha_mismatch(folder: Path) -> None:
    w = folder / "chunk_02.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    _refused(folder, "piece 2 chunk_02.mlpackage has sha256")


@pytest.mark.parametrize("path", ["../outside.mlpackage", "/tmp/abs.mlpackage"])
def test_path_outside_folder(folder: Path, path: str) -> None:
    def f(m: dict) -> None:  # type: ignore[type-arg]
        m["pieces"][1]["path"] = path
    _edit(folder, f)
    _refused(folder, "is not a plain path inside the folder")


def test_symlink_out_of_the_folder(folder: Path, tmp_path: Path) -> None:
    shutil.move(str(folder / "chunk_01.mlpackage"), tmp_path / "elsewhere.mlpackage")
    (folder / "chunk_01.mlpackage").symlink_to(tmp_path / "elsewhere.mlpackage")
    _refused(folder, "resolves outside")


def test_boundary_disagrees_with_manifest(folder: Path) -> None:
    def f(m: dict) -> None:  # type: ignore[type-arg]
        m["boundaries"][0]["shape"]["main"] = [1, 16, 32]
    _edit(folder, f)
    _refused(folder, "boundary hidden_states_0 (main) between pieces 0 and 1")


def test_pieces_swapped(folder: Path) -> None:
    """Two pieces exchanged (hashes updated, so only the boundaries can tell)."""
    def f(m: dict) -> None:  # type: ignore[type-arg]
        m["pieces"][0], m["pieces"][1] = m["pieces"][1], m["pieces"][0]
    _edit(folder, f)
    _refused(folder, "boundary hidden_states_0")
