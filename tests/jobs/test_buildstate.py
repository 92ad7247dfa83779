"""The build key: what changes it (content of the source, its external data, options) and what does not (mtimes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bitnet_coreml.jobs.buildstate import BuildState
from bitnet_coreml.jobs.spec import load_pipeline

MODELS = Path(__file__).resolve().parents[2] / "models"


def _setup(tmp: Path, precision: str = "fp16") -> Path:
    for name in ("bitnet_external.onnx", "bitnet_external.onnx.data"):
        if not (tmp / name).exists():
            shutil.copy(MODELS / name, tmp / name)
    p = tmp / "p.toml"
    p.write_text(f'''
[[model]]
name = "m"
source = "bitnet_external.onnx"
precision = "{precision}"
targets = [{{ os = "macOS", min_os = "14" }}, {{ os = "iOS", min_os = "17" }}]
''')
    return p


def _keys(p: Path, state: BuildState) -> list[str]:
    spec = load_pipeline(p)
    m = spec.models[0]
    return [state.input_hash(m, t, p.parent) for t in m.targets]


def test_external_data_is_part_of_the_key(tmp_path: Path) -> None:
    p = _setup(tmp_path)
    state = BuildState(tmp_path / "out")
    first = _keys(p, state)
    assert first[0] != first[1]  # each target has its own key
    assert [f.name for f in state.input_files(load_pipeline(p).models[0])] == [
        "bitnet_external.onnx", "bitnet_external.onnx.data"]
    # New mtime, same bytes: same key (a fresh clone or `touch` does not rebuild).
    st = os.stat(tmp_path / "bitnet_external.onnx.data")
    os.utime(tmp_path / "bitnet_external.onnx.data", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _keys(p, state) == first
    # One byte of the external weights changed: both targets' keys change.
    data = bytearray((tmp_path / "bitnet_external.onnx.data").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bitnet_external.onnx.data").write_bytes(bytes(data))
    changed = _keys(p, state)
    assert changed[0] != first[0] and changed[1] != first[1]


def test_options_are_part_of_the_key_and_the_cache_survives_a_reload(tmp_path: Path) -> None:
    p = _setup(tmp_path)
    state = BuildState(tmp_path / "out")
    fp16 = _keys(p, state)
    state.save()
    reloaded = BuildState(tmp_path / "out")
    assert reloaded.stat_cache == state.stat_cache and _keys(p, reloaded) == fp16
    assert _keys(_setup(tmp_path, precision="fp32"), reloaded) != fp16


def test_damaged_manifest_only_costs_a_rebuild(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".bitnet-coreml-build.json").write_text("{not json")
    state = BuildState(tmp_path / "out")
    assert state.entries == {}


def test_checkpoint_folder_content_is_the_key(tmp_path: Path) -> None:
    shutil.copytree(MODELS / "hf" / "bitnet-tiny-packed", tmp_path / "ckpt")
    p = tmp_path / "p.toml"
    p.write_text('[[model]]\nname = "m"\nsource = "ckpt"\ntargets = [{ os = "macOS" }]\n')
    state = BuildState(tmp_path / "out")
    first = _keys(p, state)
    (tmp_path / "ckpt" / "notes.txt").write_text("an extra file is content too")
    second = _keys(p, state)
    assert second != first
    (tmp_path / "ckpt" / "notes.txt").unlink()
    assert _keys(p, state) == first
