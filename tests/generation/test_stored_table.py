"""The stored decode table (``executor/fused_store.py``): generation without coremltools or a MIL program.

Oracles: the interpreter's own ``prefill`` and ``decode`` (numpy, op by op) on the same package; the
stored table replaces the interpreter's prefill by decode steps, so its logits are compared with the
interpreter's prefill within the bounds ``tests/generation/test_fused.py`` states for the fused decode
(fp16: one fp16 step of the step's largest |logit|; fp32: 16 float32 steps), and greedy tokens must
be the interpreter's. A table whose specification or weights changed is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.errors import InputError
from bitnet_coreml.executor.fused_store import ASSET, open_table, table_bytes
from bitnet_coreml.generation import GenerationSession
from bitnet_coreml.generation.engines import ReferenceEngine
from bitnet_coreml.package.assets import assets_dir
from tests.generation.conftest import TINY
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
LM = ROOT / "models" / "example-lm"
IDS = [int(i) for i in np.load(TINY / "logits.npz")["input_ids"][0]]
# libraries the stored-table path must not load (numba / llvmlite: see test_no_numba_once_the_kernel_is_c)
HEAVY = ("coremltools", "onnx", "onnxruntime", "onnx_ir", "onnxscript", "matplotlib", "rich", "torch")


@pytest.fixture(scope="module")
def lm_fp16(converted: PackageCache) -> Path:
    if not (LM / "config.json").is_file():
        pytest.skip("bundled example LM missing (make models)")
    return converted.get(LM, stateful=True, context=128, prefill=16, precision="fp16", check=False)


def _bound(prec: str, ref: np.ndarray) -> float:
    m = float(np.max(np.abs(ref)))
    return float(np.spacing(np.float16(m))) if prec == "fp16" else 16 * float(np.spacing(np.float32(m)))


def _prefill_rows(pkg: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Logits of each prompt position: the stored table's decode steps and the interpreter's prefill."""
    stored = ReferenceEngine(pkg, decode_engine="stored")
    assert stored.decode_engine == "stored"
    got = np.stack([stored.call("decode", np.array([t]), i)[-1] for i, t in enumerate(ids)])
    # a prefill call on the stored engine is those steps: the last row, bit for bit
    again = ReferenceEngine(pkg, decode_engine="stored").call("prefill", np.array(ids), 0)
    assert again.shape == (1, got.shape[-1]) and np.array_equal(again[0], got[-1])
    interp = ReferenceEngine(pkg, decode_engine="interpreter")
    return got, interp.call("prefill", np.array(ids), 0)


@pytest.mark.parametrize("prec", ["fp16", "fp32"])
def test_prefill_as_decode_steps_follows_the_interpreters_prefill(tiny_packages: dict[str, Path], prec: str) -> None:
    got, ref = _prefill_rows(tiny_packages[prec], IDS[:8])
    assert got.shape == ref.shape == (8, ref.shape[-1])
    for g, r in zip(got, ref, strict=True):
        assert int(np.argmax(g)) == int(np.argmax(r))
        np.testing.assert_allclose(g, r, rtol=0, atol=_bound(prec, r))


def test_prefill_as_decode_steps_on_the_example_lm(lm_fp16: Path) -> None:
    ids = (IDS * 2)[:16]
    got, ref = _prefill_rows(lm_fp16, ids)
    for g, r in zip(got, ref, strict=True):
        assert int(np.argmax(g)) == int(np.argmax(r))
        np.testing.assert_allclose(g, r, rtol=0, atol=_bound("fp16", r))


@pytest.mark.parametrize("prec", ["fp16", "last"])
def test_greedy_tokens_are_the_interpreters(tiny_packages: dict[str, Path], lm_fp16: Path, prec: str) -> None:
    """Prompts longer than P (chunks, a partial last chunk) and a package whose prefill returns one row."""
    for pkg in (tiny_packages[prec], lm_fp16):
        runs = {}
        for engine in ("stored", "interpreter"):
            s = GenerationSession(pkg, units=["reference"], decode_engine=engine)
            runs[engine] = list(s.generate(IDS[:19], max_new_tokens=24))
            assert s.stats.decode_engine == engine
        assert runs["stored"] == runs["interpreter"]


def test_session_facts_come_from_the_table(tiny_packages: dict[str, Path]) -> None:
    pkg = tiny_packages["fp16"]
    table = open_table(pkg)
    assert table is not None
    s = GenerationSession(pkg, units=["reference"], decode_engine="interpreter")
    from bitnet_coreml.package.stateful import stateful_info

    assert table.stateful_info() == stateful_info(pkg) == s.info
    assert table.vocab_size == 512  # the tiny checkpoint's vocabulary (config.json)
    assert json.loads((TINY / "config.json").read_text())["vocab_size"] == table.vocab_size


def test_the_table_is_deterministic_and_references_weight_bin(tiny_packages: dict[str, Path]) -> None:
    pkg = tiny_packages["fp16"]
    stored = (assets_dir(pkg) / ASSET).read_bytes()
    again, _ = table_bytes(pkg)
    assert again == stored
    header = open_table(pkg).header  # type: ignore[union-attr]
    assert header["package"]["weights"][0]["path"] == "Data/com.apple.CoreML/weights/weight.bin"
    wb = (pkg / header["package"]["weights"][0]["path"]).read_bytes()
    for t in header["decode"]["terns"]:  # 2-bit codes at their offset in weight.bin: no value 3 (the LUT's pad)
        codes = np.frombuffer(wb, np.uint8, int(np.prod(t["shape"])), t["offset"])
        assert not np.any(codes & (codes >> 1) & 0x55)
    layers = json.loads((TINY / "config.json").read_text())["num_hidden_layers"]
    assert len(header["decode"]["terns"]) == 7 * layers  # q, k, v, o, gate, up, down per layer


def _copy(pkg: Path, tmp_path: Path) -> Path:
    out = tmp_path / pkg.name
    shutil.copytree(pkg, out)
    return out


def test_changed_weights_are_refused_with_the_reason(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    pkg = _copy(tiny_packages["fp16"], tmp_path)
    table = open_table(pkg)
    assert table is not None
    t = table.header["decode"]["terns"][0]
    wb = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(wb.read_bytes())
    data[t["offset"]] ^= 0x01  # code 0 <-> 1 of the first weight: still a valid package
    wb.write_bytes(bytes(data))
    s = GenerationSession(pkg, units=["reference"])
    list(s.generate(IDS[:5], max_new_tokens=2))
    assert s.stats.decode_engine == "fused"
    assert "stored table refused" in (s.stats.decode_note or "") and "weight.bin" in (s.stats.decode_note or "")
    with pytest.raises(InputError, match="sha256 differs"):
        GenerationSession(pkg, units=["reference"], decode_engine="stored")


def test_a_foreign_table_is_refused(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    pkg = _copy(tiny_packages["fp16"], tmp_path)
    shutil.copyfile(assets_dir(tiny_packages["fp32"]) / ASSET, assets_dir(pkg) / ASSET)
    s = GenerationSession(pkg, units=["reference"])
    assert s._engine is not None and s._engine.decode_engine == "fused"
    assert "model.mlmodel is not the specification" in (s._engine.decode_note or "")


def test_a_table_reaching_outside_its_buffers_is_refused(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    """A crafted table (its spec and weights untouched, so their hashes match) must not steer the kernel
    outside its memory: each instruction's operands are checked against the buffers at load."""
    pkg = _copy(tiny_packages["fp16"], tmp_path)
    table = open_table(pkg)
    assert table is not None
    from bitnet_coreml.executor.fused_store import _layout

    ref = table.header["decode"]["instructions"]
    raw = bytearray(table.path.read_bytes())
    width = _layout().WIDTH
    for field, value in ((_layout().OUT + 1, 1 << 40), (_layout().A, 999)):  # an offset, then a buffer id
        patched = bytearray(raw)
        at = table.data_start + ref["offset"] + 8 * (3 * width + field)  # row 3
        patched[at:at + 8] = int(value).to_bytes(8, "little", signed=True)
        table.path.write_bytes(bytes(patched))
        s = GenerationSession(pkg, units=["reference"])
        assert s._engine is not None and s._engine.decode_engine == "fused"
        assert "instruction 3" in (s._engine.decode_note or ""), s._engine.decode_note
    table.path.write_bytes(bytes(raw))
    assert ReferenceEngine(pkg, decode_engine="stored").decode_engine == "stored"


def test_a_table_asking_for_too_much_memory_is_refused(tiny_packages: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _copy(tiny_packages["fp16"], tmp_path)
    monkeypatch.setenv("BITNET_COREML_MEMORY_BUDGET", "4096")  # bytes: less than the tiny model's arena
    s = GenerationSession(pkg, units=["reference"], decode_engine="auto")
    assert s._engine is not None and s._engine.decode_engine != "stored"
    assert "over the memory budget" in (s._engine.decode_note or ""), s._engine.decode_note


def test_a_malformed_header_is_refused(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    import struct

    pkg = _copy(tiny_packages["fp16"], tmp_path)
    path = assets_dir(pkg) / ASSET
    raw = path.read_bytes()
    magic, fmt, n = struct.unpack("<8sIQ", raw[:20])
    header = json.loads(raw[20:20 + n])
    del header["stateful"]["context"]
    head = json.dumps(header).encode()
    path.write_bytes(raw[:8] + struct.pack("<IQ", fmt, len(head)) + head)
    s = GenerationSession(pkg, units=["reference"])  # the facts come from the spec, the engine translates
    assert s.info.context == 64 and s._engine is not None and s._engine.decode_engine == "fused"
    assert "malformed header" in (s._engine.decode_note or ""), s._engine.decode_note


def test_a_package_without_a_table_translates(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    pkg = _copy(tiny_packages["fp16"], tmp_path)
    (assets_dir(pkg) / ASSET).unlink()
    assert open_table(pkg) is None
    s = GenerationSession(pkg, units=["reference"])
    assert s._engine is not None and s._engine.decode_engine == "fused"
    with pytest.raises(InputError, match="no stored decode table"):
        GenerationSession(pkg, units=["reference"], decode_engine="stored")


def test_the_package_still_loads_in_coremltools(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    import coremltools as ct

    pkg = _copy(tiny_packages["fp16"], tmp_path)  # MLModel(path) rewrites Manifest.json: a copy
    m = ct.models.MLModel(str(pkg), skip_model_load=True)
    assert m.get_spec().WhichOneof("Type") == "mlProgram"


_CHILD = r"""
import json, runpy, sys
sys.argv = ["bitnet-coreml", "generate", sys.argv[1], "--ids", sys.argv[2], "-n", "4", "--units", "reference", "--json"]
try:
    runpy.run_module("bitnet_coreml.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
sys.stderr.write("\nMODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})) + "\n")
sys.exit(code)
"""


def _child_modules(pkg: Path) -> tuple[dict, set[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(pkg), ",".join(str(i) for i in IDS[:5])],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return json.loads(res.stdout), set(json.loads(line[len("MODULES "):]))


def test_cli_generate_loads_no_heavy_library(tiny_packages: dict[str, Path]) -> None:
    doc, mods = _child_modules(tiny_packages["fp16"])
    assert doc["decode_engine"] == "stored" and len(doc["new_ids"]) == 4
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_no_numba_once_the_kernel_is_c(tiny_packages: dict[str, Path], native_kernel: Any) -> None:
    """With the C kernel built (``make setup``; the fixture), generate loads neither numba nor llvmlite."""
    _, mods = _child_modules(tiny_packages["fp16"])
    assert not mods & {"numba", "llvmlite"}, sorted(mods & {"numba", "llvmlite"})
