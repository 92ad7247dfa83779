"""The safe-reading rules of ``bitnet_coreml._files`` that the corpus does not reach through the CLI.

Oracles: the documented rules (a Hugging Face cache snapshot may link into its own repository's
``blobs/`` and nowhere else; the budget is what ``BITNET_COREML_MEMORY_BUDGET`` says), and a checkpoint
loaded from its plain folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bitnet_coreml._files import check_budget, memory_budget
from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint

CKPT = Path(__file__).resolve().parents[2] / "models" / "hf" / "bitnet-tiny-packed"


def _hf_cache(root: Path) -> Path:
    """``models--org--tiny/{blobs,snapshots/rev}`` with every snapshot file a symlink into blobs/, as the hub writes."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in CKPT.iterdir():
        blob = blobs / f"sha-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def test_hf_cache_snapshot_links_into_its_blobs(tmp_path: Path) -> None:
    snap = _hf_cache(tmp_path)
    plain = load_checkpoint(CKPT, seq_len=8)
    cached = load_checkpoint(snap, seq_len=8)
    assert [v.name for v in cached.graph.initializers.values()] == [v.name for v in plain.graph.initializers.values()]


def test_hf_cache_snapshot_link_outside_its_blobs_is_refused(tmp_path: Path) -> None:
    snap = _hf_cache(tmp_path / "cache")
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copyfile(CKPT / "model.safetensors", other / "model.safetensors")
    (snap / "model.safetensors").unlink()
    os.symlink(other / "model.safetensors", snap / "model.safetensors")
    with pytest.raises(ModelLoadError, match="resolves outside"):
        load_checkpoint(snap, seq_len=8)


def test_memory_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITNET_COREML_MEMORY_BUDGET", "1000")
    assert memory_budget() == 1000
    check_budget(1000, "x")
    with pytest.raises(InputError, match=r"^y needs 1001 B, over the memory budget of 1000 B"):
        check_budget(1001, "y")
    monkeypatch.setenv("BITNET_COREML_MEMORY_BUDGET", "lots")
    with pytest.raises(InputError, match="BITNET_COREML_MEMORY_BUDGET"):
        memory_budget()
