"""Hostile GGUF files: refused with exit 2 and one line, in bounded time and memory.

Each file is built byte by byte (the header layout of the GGUF spec: magic, version, tensor and
metadata counts, key/value pairs, tensor infos, alignment padding, data), so every field can lie.
The whole corpus runs through ``bitnet-coreml inspect`` in one subprocess under an address-space
limit (``RLIMIT_AS``, 1 GiB) and a timeout; each file must end with exit code 2, exactly one line on
stderr naming the file, no traceback, and the message of the check that caught it (so a file is not
"refused" by some later, accidental failure).
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "models" / "gguf" / "bitnet-tq2_0.gguf"
MEMORY_CAP = 1 << 30
TIMEOUT_S = 240

U8, U32, F32, STR, ARR, U64 = 0, 4, 6, 8, 9, 10
F32_T, TQ2_T = 0, 35


def _s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def ti(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<II", ttype, 0)[:4] + struct.pack("<Q", offset))


ARCH = kv("general.architecture", STR, _s("bitnet"))
NORM = ti("output_norm.weight", [4], F32_T, 0)


def gguf(kvs: list[bytes], tis: list[bytes], data: bytes = b"\0" * 16, *, version: int = 3,
         n_tensors: int | None = None, n_kv: int | None = None, magic: bytes = b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tis)
    return head + b"\0" * (-len(head) % 32) + data


def corpus() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the message the refusal must contain)."""
    fixture = FIXTURE.read_bytes()
    big = 1 << 62
    return {
        "empty": (b"", "too short"),
        "bad magic": (gguf([ARCH], [NORM], magic=b"GGML"), "does not start with the GGUF magic"),
        "version 99": (gguf([ARCH], [NORM], version=99), "GGUF version 99"),
        "truncated in metadata": (fixture[:3000], "truncated or corrupt"),
        "truncated in tensor infos": (fixture[:fixture.index(b"blk.1.ffn_down") + 8], "truncated or corrupt"),
        "truncated in data": (fixture[:-100], "but the file ends at"),
        "tensor count 2^40": (gguf([ARCH], [NORM], n_tensors=1 << 40), "announces 1099511627776 tensors"),
        "kv count 2^50": (gguf([ARCH], [NORM], n_kv=1 << 50), "metadata entries"),
        "kv count beyond the file": (gguf([ARCH], [NORM], n_kv=1000), "truncated or corrupt"),
        "array of 2^60 u8": (gguf([ARCH, kv("x", ARR, struct.pack("<IQ", U8, 1 << 60))], [NORM]),
                             "has 1152921504606846976 elements"),
        "array of 2^20 strings in a small file": (gguf([ARCH, kv("x", ARR, struct.pack("<IQ", STR, 1 << 20))], [NORM]),
                                                  "needs 8388608 bytes"),
        "array nested 3 deep": (gguf([ARCH, kv("x", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", ARR, 1)
                                                + struct.pack("<IQ", U8, 1) + b"\0")], [NORM]), "nests arrays"),
        "key length 2^62": (gguf([struct.pack("<Q", big) + b"k"], [NORM], n_kv=1), "bytes long"),
        "string value 2^40": (gguf([ARCH, kv("x", STR, struct.pack("<Q", 1 << 40))], [NORM]), "bytes long"),
        "string value past the end": (gguf([ARCH, kv("x", STR, struct.pack("<Q", 10_000) + b"abc")], [NORM]),
                                      "needs 10000 bytes"),
        "key not utf-8": (gguf([ARCH, kv(b"\xff\xfe", U32, struct.pack("<I", 1))], [NORM]), "not UTF-8"),
        "array string not utf-8": (gguf([ARCH, kv("x", ARR, struct.pack("<IQ", STR, 3) + _s("a") + _s(b"\xc3")
                                                   + _s(b"\xa9"))], [NORM]), "'x'[1] is not UTF-8"),
        "unknown value type": (gguf([ARCH, kv("x", 77, b"\0" * 8)], [NORM]), "value type 77"),
        "duplicate key": (gguf([ARCH, ARCH], [NORM]), "appears twice"),
        "unknown tensor type": (gguf([ARCH], [ti("output_norm.weight", [4], 999, 0)]), "unknown type 999"),
        "9 dimensions": (gguf([ARCH], [ti("t", [1] * 9, F32_T, 0)]), "has 9 dimensions"),
        "zero dimension": (gguf([ARCH], [ti("t", [4, 0], F32_T, 0)]), "has dimension 0"),
        "dimension 2^62": (gguf([ARCH], [ti("t", [big], F32_T, 0)]), "has dimension"),
        "elements 2^60": (gguf([ARCH], [ti("t", [1 << 30, 1 << 30], F32_T, 0)]), "elements (limit"),
        "offset beyond the file": (gguf([ARCH], [ti("output_norm.weight", [4], F32_T, 1 << 40)]),
                                   "but the file ends at"),
        "offset not aligned": (gguf([ARCH], [ti("output_norm.weight", [4], F32_T, 4)]),
                               "not a multiple of the alignment 32"),
        "alignment 3": (gguf([ARCH, kv("general.alignment", U32, struct.pack("<I", 3))], [NORM]),
                        "general.alignment = 3"),
        "alignment a string": (gguf([ARCH, kv("general.alignment", STR, _s("x"))], [NORM]),
                               "general.alignment = 'x'"),
        "duplicate tensor": (gguf([ARCH], [NORM, NORM], b"\0" * 64), "appears twice"),
        "overlapping tensors": (gguf([ARCH], [NORM, ti("b", [8], F32_T, 0)], b"\0" * 64), "overlap"),
        "row not a multiple of the block": (gguf([ARCH], [ti("t", [100, 4], TQ2_T, 0)], b"\0" * 4096),
                                            "not a multiple of the type's block of 256"),
        "block_count 2^31": (_with_block_count(fixture), "block_count = 2147483648 but the file holds only"),
    }


def _with_block_count(fixture: bytes) -> bytes:
    """The fixture with its uint32 ``bitnet.block_count`` value replaced by 2^31 (same length)."""
    key = _s("bitnet.block_count") + struct.pack("<I", U32)
    at = fixture.index(key) + len(key)
    return fixture[:at] + struct.pack("<I", 1 << 31) + fixture[at + 4:]


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


@pytest.mark.skipif(not FIXTURE.is_file(), reason="models/gguf fixtures missing (make models)")
def test_hostile_gguf_files_are_refused_with_exit_2_and_one_line(tmp_path: Path) -> None:
    cases = corpus()
    files = {}
    for i, (name, (data, _)) in enumerate(cases.items()):
        files[name] = tmp_path / f"case{i:02d}.gguf"
        files[name].write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.frontend.gguf_hostile_driver", *map(str, files.values())],
                          capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=_cap, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["file"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    for name, (_, message) in cases.items():
        r = results[str(files[name])]
        lines = r["stderr"].strip().splitlines()
        assert r["code"] == 2, (name, r)
        assert len(lines) == 1 and "Traceback" not in r["stderr"], (name, r["stderr"])
        assert str(files[name]) in lines[0] and message in lines[0], (name, lines[0])


def test_the_cli_itself_exits_2_under_the_memory_cap(tmp_path: Path) -> None:
    p = tmp_path / "huge-array.gguf"
    p.write_bytes(gguf([ARCH, kv("x", ARR, struct.pack("<IQ", U8, 1 << 60))], [NORM]))
    proc = subprocess.run([sys.executable, "-m", "bitnet_coreml.cli", "inspect", str(p)], capture_output=True,
                          text=True, timeout=TIMEOUT_S, preexec_fn=_cap, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "elements (limit" in proc.stderr
