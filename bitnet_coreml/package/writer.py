"""Writing ``.mlpackage`` directories: atomically, deterministically, with our metadata.

Atomic: the package is saved to a hidden temporary directory beside the destination and renamed
into place, so a killed conversion never leaves a half-written package at the destination (a
stale temporary directory of a dead process is removed by the next save to the same destination).

Deterministic: coremltools writes random UUIDs as item identifiers into ``Manifest.json``; they are
replaced by UUIDs derived from each item's path. The model spec is re-serialised with protobuf's
deterministic (sorted) map order, since a plain ``SerializeToString`` writes the metadata map in
hash order, which differs between processes; coremltools' conversion-date entry is dropped (it
would differ between days). So converting the same input twice gives byte-identical packages.

The ``author`` field stays empty: the package belongs to whoever converted it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import InputError

log = logging.getLogger(__name__)

_NS = uuid.UUID("6f1c5a52-7a0e-4d53-9d0a-2b1f1e0c6b11")  # namespace of our manifest item ids
_TMP_MARK = ".tmp-"


def describe(mlmodel: Any, *, short_description: str, metadata: Mapping[str, str],
             input_descriptions: Mapping[str, str], output_descriptions: Mapping[str, str]) -> None:
    """Set the description, metadata and per-feature descriptions of ``mlmodel`` (in place)."""
    mlmodel.short_description = short_description
    mlmodel.author = ""
    for k in sorted(metadata):
        mlmodel.user_defined_metadata[k] = str(metadata[k])
    for name, text in input_descriptions.items():
        mlmodel.input_description[name] = text
    for name, text in output_descriptions.items():
        mlmodel.output_description[name] = text


def deterministic_manifest(package: Path) -> None:
    """Replace the random item identifiers of ``package``/Manifest.json by ones derived from paths."""
    path = package / "Manifest.json"
    data = json.loads(path.read_text())
    entries = data.get("itemInfoEntries", {})
    remap = {old: str(uuid.uuid5(_NS, info["path"])).upper() for old, info in entries.items()}
    data["itemInfoEntries"] = {remap[old]: entries[old] for old in sorted(entries, key=lambda o: remap[o])}
    if data.get("rootModelIdentifier") in remap:
        data["rootModelIdentifier"] = remap[data["rootModelIdentifier"]]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")
    os.replace(tmp, path)


# coremltools stamps the conversion day into the metadata; identical input must give identical bytes.
_VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)


def deterministic_spec(package: Path) -> None:
    """Rewrite ``package``'s model spec with sorted map entries and no conversion date."""
    from coremltools.proto import Model_pb2  # coremltools is already loaded by the caller

    manifest = json.loads((package / "Manifest.json").read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    path = package / "Data" / root
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    for key in _VOLATILE_METADATA:
        if key in spec.description.metadata.userDefined:
            del spec.description.metadata.userDefined[key]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(spec.SerializeToString(deterministic=True))
    os.replace(tmp, path)


def _normalise_modes(root: Path) -> None:
    # coremltools creates files through mkstemp (mode 0600); give the package ordinary permissions.
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(dest: Path) -> None:
    """Remove what killed writers of ``dest`` left beside it (hidden temporary folders of dead processes)."""
    prefix = f".{dest.name}{_TMP_MARK}"
    for p in dest.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0].split(".")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def temp_path_for(dest: Path) -> Path:
    """The hidden temporary path beside ``dest`` that this process writes to."""
    # coremltools insists on the .mlpackage extension, so the temporary name keeps it.
    return dest.parent / f".{dest.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}.mlpackage"


def replace_with(tmp: Path, dest: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dest``; an existing ``dest`` is moved aside first, removed last."""
    if dest.exists():
        old = dest.parent / f".{dest.name}{_TMP_MARK}{os.getpid()}-old{dest.suffix}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def save_package(mlmodel: Any, dest: str | os.PathLike[str], *, overwrite: bool = True,
                 assets: Mapping[str, bytes] | None = None, finish: Callable[[Path], None] | None = None) -> Path:
    """Save ``mlmodel`` to ``dest`` (.mlpackage) atomically and deterministically; returns ``dest``.

    ``assets`` (name -> bytes, see :mod:`bitnet_coreml.package.assets`) are written into the package
    before it is renamed into place; then ``finish(temp package)`` runs (assets made from the written
    package itself, such as the stored decode table: ``executor/fused_store.py``).
    """
    dest = Path(dest)
    if dest.suffix != ".mlpackage":
        raise InputError(f"{dest}: output must end in .mlpackage (an ML Program package)")
    if not dest.parent.is_dir():
        raise InputError(f"{dest}: the folder {dest.parent} does not exist")
    if dest.exists() and not overwrite:
        raise InputError(f"{dest}: already exists (pass overwrite to replace it)")
    remove_stale_temps(dest)
    tmp = temp_path_for(dest)
    try:
        mlmodel.save(str(tmp))
        deterministic_manifest(tmp)
        deterministic_spec(tmp)
        if assets:
            from bitnet_coreml.package.assets import write_assets

            write_assets(tmp, assets)
        if finish is not None:
            finish(tmp)
        _normalise_modes(tmp)
        replace_with(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", dest)
    return dest


def package_files(package: str | os.PathLike[str]) -> dict[str, int]:
    """Relative path -> size in bytes of every file in ``package``."""
    root = Path(package)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def weight_bytes(package: str | os.PathLike[str]) -> int:
    """Bytes of the weight files (``Data/com.apple.CoreML/weights``) of ``package``."""
    return sum(size for rel, size in package_files(package).items() if "/weights/" in f"/{rel}")
