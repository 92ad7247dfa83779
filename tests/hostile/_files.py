"""Crafted checkpoint folders, prediction data, packages, pipeline and capability files for the hostile corpus."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# --- checkpoint folders ---------------------------------------------------------------------------


def checkpoint(bundled: Path, dst: Path) -> Path:
    shutil.copytree(bundled, dst)
    return dst


def edit_config(folder: Path, **changes: Any) -> Path:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))
    return folder


_DROP = object()
DROP = _DROP


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def _st_split(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(path: Path, header: dict[str, Any], body: bytes, *, claimed_len: int | None = None) -> None:
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h) if claimed_len is None else claimed_len) + h + body)


def st_first_tensor(header: dict[str, Any]) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def st_lie(folder: Path, how: str) -> Path:
    """Make model.safetensors lie about its header length, a tensor's offsets or its dtype."""
    p = folder / "model.safetensors"
    header, body = _st_split(p)
    name = "model.embed_tokens.weight"
    if how == "length":
        h = json.dumps(header).encode()
        _st_join(p, header, body, claimed_len=len(h) + len(body) + 4096)
    elif how == "offsets":
        header[name]["data_offsets"][1] = len(body) + (1 << 30)
        _st_join(p, header, body)
    elif how == "dtype":
        header[name]["dtype"] = "F64"
        _st_join(p, header, body)
    elif how == "huge_shape":
        header[name]["shape"] = [1 << 40, 1 << 40]
        _st_join(p, header, body)
    return folder


# --- prediction data ------------------------------------------------------------------------------


def npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def pickled_npz(path: Path) -> Path:
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = {"a": 1}, [1, 2]
    np.savez(path, input_ids=arr)
    return path


def npy_header(shape: tuple[int, ...], dtype: str = "<i4") -> bytes:
    """The bytes of an .npy file whose header declares ``shape`` but that holds almost no data."""
    d = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = (-(10 + len(d) + 1)) % 64
    d = d + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d.encode() + b"\0" * 64


def huge_npz(path: Path, name: str = "input_ids") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.npy", npy_header((1 << 40, 8)))
    return path


def huge_npy_folder(folder: Path) -> Path:
    folder.mkdir()
    with zipfile.ZipFile(folder / "item0.npz", "w") as z:
        z.writestr("input_ids.npy", npy_header((1 << 40, 8)))
    return folder


# --- packages -------------------------------------------------------------------------------------

_SPEC = "com.apple.CoreML/model.mlmodel"


def package_copy(pkg: Path, dst: Path) -> Path:
    shutil.copytree(pkg, dst, symlinks=True)
    return dst


def manifest_path(pkg: Path, new_path: str) -> Path:
    m = pkg / "Manifest.json"
    doc = json.loads(m.read_text())
    for entry in doc["itemInfoEntries"].values():
        if entry["path"] == _SPEC:
            entry["path"] = new_path
    m.write_text(json.dumps(doc, indent=4))
    return pkg


def spec_symlink(pkg: Path, outside: Path) -> Path:
    spec = pkg / "Data" / _SPEC
    target = outside / "stolen.mlmodel"
    shutil.copyfile(spec, target)
    spec.unlink()
    os.symlink(target, spec)
    return pkg


def truncate_weights(pkg: Path) -> Path:
    w = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 3])
    return pkg


def garbage_spec(pkg: Path) -> Path:
    (pkg / "Data" / _SPEC).write_bytes(bytes(range(256)) * 8)
    return pkg


def tree_digest(root: Path) -> dict[str, str]:
    """Every file's bytes (and every symlink's target) under ``root``: the 'input package unchanged' oracle."""
    import hashlib

    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
