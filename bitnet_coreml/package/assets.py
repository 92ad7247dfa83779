"""Files that travel inside a ``.mlpackage`` beside the model: tokenizer, generation config, ...

One convention, one module: assets live at ``Data/com.bitnet-coreml/assets/<name>`` and are
registered in the package's ``Manifest.json`` as one item (author ``com.bitnet-coreml``, name
``assets``), the way Core ML registers its own ``weights`` folder, so Core ML's package handling
(coremltools' ``ModelPackage``, Xcode) sees a valid package with one more item. Nothing else in the
project reads or writes that folder: use :func:`write_assets` and :func:`read_assets`.

* :func:`write_assets` adds or replaces assets (other assets stay). The new folder is built beside the
  old one and renamed into place, then the manifest is replaced atomically, so a killed writer leaves
  either the old or the new set. The manifest item id is derived from its path (as in
  ``writer.deterministic_manifest``), so writing the same assets twice gives byte-identical packages.
* :func:`read_assets` only reads files: it never opens the package through coremltools (whose
  ``ModelPackage`` rewrites ``Manifest.json`` even when only reading) and never writes.

Asset names are plain file names (no folders, no leading dot): ``tokenizer.json``,
``generation_config.json``, ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from bitnet_coreml.errors import InputError, ModelLoadError

AUTHOR = "com.bitnet-coreml"
ITEM_NAME = "assets"
ITEM_PATH = f"{AUTHOR}/{ITEM_NAME}"  # relative to the package's Data/ folder, as in Manifest.json
_DESCRIPTION = "bitnet-coreml assets (tokenizer, generation config)"
_NS = uuid.UUID("6f1c5a52-7a0e-4d53-9d0a-2b1f1e0c6b11")  # same namespace as the writer's item ids
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
# The files of a Hugging Face checkpoint folder that `convert --stateful` carries into the package.
CHECKPOINT_ASSETS = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def assets_dir(package_dir: str | os.PathLike[str]) -> Path:
    """Where the assets of ``package_dir`` live (whether or not it exists)."""
    return Path(package_dir) / "Data" / ITEM_PATH


def _check_package(package_dir: Path) -> Path:
    manifest = package_dir / "Manifest.json"
    if not manifest.is_file():
        raise ModelLoadError(f"{package_dir}: not an .mlpackage (no Manifest.json)")
    return manifest


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"asset name {name!r}: must be a plain file name (letters, digits, '_.+-', "
                         f"no folders, not starting with '.', at most 128 characters)")


def checkpoint_assets(folder: str | os.PathLike[str]) -> dict[str, bytes]:
    """The :data:`CHECKPOINT_ASSETS` present in a checkpoint folder (name -> bytes).

    A symlink is followed only inside the folder (or a Hugging Face snapshot's ``blobs/``): a linked
    ``tokenizer.json`` must not copy a file from elsewhere into the package.
    """
    from bitnet_coreml._files import inside, read_bytes

    root = Path(folder)
    found = {}
    for name in CHECKPOINT_ASSETS:
        p = root / name
        if p.is_file():
            inside(root, p, name)
            found[name] = read_bytes(p, name)
    return found


def write_assets(package_dir: str | os.PathLike[str], assets: Mapping[str, bytes]) -> Path:
    """Add or replace ``assets`` (name -> content) in the package at ``package_dir``; returns the folder."""
    root = Path(package_dir)
    manifest = _check_package(root)
    for name, data in assets.items():
        _check_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"asset {name!r}: content must be bytes, got {type(data).__name__}")
    final = assets_dir(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = final.parent / f".{ITEM_NAME}.tmp-{tag}"
    old = final.parent / f".{ITEM_NAME}.old-{tag}"
    try:
        staging.mkdir()
        if final.is_dir():
            for p in sorted(final.iterdir()):
                if p.is_file() and not p.is_symlink() and p.name not in assets:
                    shutil.copyfile(p, staging / p.name)
        for name in sorted(assets):
            (staging / name).write_bytes(bytes(assets[name]))
        for p in [staging, *staging.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _register(manifest)
    return final


def _register(manifest: Path) -> None:
    data = json.loads(manifest.read_text())
    entries = data.setdefault("itemInfoEntries", {})
    for key in [k for k, v in entries.items() if v.get("path") == ITEM_PATH]:
        del entries[key]
    entries[str(uuid.uuid5(_NS, ITEM_PATH)).upper()] = {
        "author": AUTHOR, "description": _DESCRIPTION, "name": ITEM_NAME, "path": ITEM_PATH}
    data["itemInfoEntries"] = {k: entries[k] for k in sorted(entries)}
    tmp = manifest.with_name(f"{manifest.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, manifest)


def read_assets(package_dir: str | os.PathLike[str]) -> dict[str, bytes]:
    """Name -> content of every asset in the package (empty when it has none); never writes."""
    root = Path(package_dir)
    _check_package(root)
    folder = assets_dir(root)
    if not folder.is_dir():
        return {}
    out: dict[str, bytes] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            raise ModelLoadError(f"{p}: package assets must be plain files, not symbolic links")
        if p.is_file() and _NAME_RE.match(p.name):
            out[p.name] = p.read_bytes()
    return out


def read_asset(package_dir: str | os.PathLike[str], name: str) -> bytes | None:
    """The content of one asset, or None when the package does not carry it; never writes."""
    _check_name(name)
    _check_package(Path(package_dir))
    p = assets_dir(package_dir) / name
    if p.is_symlink():
        raise ModelLoadError(f"{p}: package assets must be plain files, not symbolic links")
    return p.read_bytes() if p.is_file() else None
