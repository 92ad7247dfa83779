"""Chunked model folders (``convert --chunks``): the layout, the ``model.json`` manifest, and opening one safely.

A chunked model is a folder::

    OUT/
      model.json            the manifest (below)
      chunk_00.mlpackage    the first piece (token ids in; the embedding and the first layers)
      chunk_01.mlpackage    ...
      chunk_NN.mlpackage    the last piece (the last layers and the lm_head; logits out)

``model.json`` (``format`` ``bitnet-coreml/chunked``, ``version`` 1): the source and its sha256, precision,
target, ``stateful`` (the whole model's ``StatefulInfo`` or null), ``functions`` (the names every piece has;
``main`` for a stateless model), ``pieces`` in calling order (``path`` relative to the folder, ``sha256`` of the
package's files, ``bytes``, the decoder ``layers`` ``[first, stop)`` it holds, whether it holds the
``embedding`` / ``lm_head``, its ``states``, and per function its ``inputs`` / ``outputs`` as name, shape, dtype),
and ``boundaries``: the tensors passed from piece ``k`` to piece ``k + 1`` (name, dtype, shape per function).

:func:`open_chunked` refuses (``InputError``, exit 2, one line) a folder whose manifest is unreadable, names a
path outside the folder, lacks a piece, holds a piece whose sha256 differs from the manifest, or whose pieces'
boundary tensors disagree (with the manifest or with each other, read from the packages themselves).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import InputError

__all__ = ["FORMAT", "MANIFEST", "VERSION", "ChunkedModel", "is_chunked", "open_chunked", "piece_name",
           "piece_sha256", "stateful_parts", "write_manifest"]

MANIFEST = "model.json"
FORMAT = "bitnet-coreml/chunked"
VERSION = 1


def piece_name(k: int) -> str:
    return f"chunk_{k:02d}.mlpackage"


def is_chunked(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding ``model.json`` (a chunked model), never for an ``.mlpackage``."""
    p = Path(path)
    return p.is_dir() and p.suffix != ".mlpackage" and (p / MANIFEST).is_file()


def piece_sha256(package: str | os.PathLike[str]) -> str:
    """sha256 of a package's files (relative paths + bytes, sorted): what the manifest records per piece."""
    from bitnet_coreml.jobs._io import sha256_tree

    return sha256_tree(package)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    import json

    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class ChunkedModel:
    """An opened, validated chunked model folder."""

    folder: Path
    manifest: dict[str, Any]
    pieces: tuple[Path, ...]

    @property
    def functions(self) -> list[str]:
        return list(self.manifest["functions"])

    @property
    def default_function(self) -> str:
        return str(self.manifest.get("default_function") or self.functions[0])

    @property
    def boundaries(self) -> list[dict[str, Any]]:
        return list(self.manifest["boundaries"])

    @property
    def stateful(self) -> dict[str, Any] | None:
        return self.manifest.get("stateful")

    @property
    def source_sha256(self) -> str:
        return str(self.manifest.get("source_sha256", ""))

    def inputs(self, function: str | None = None) -> list[dict[str, Any]]:
        """The model's inputs: every piece input that is not a boundary tensor (token ids, position)."""
        fn = function or self.default_function
        inner = {b["name"] for b in self.boundaries}
        seen: dict[str, dict[str, Any]] = {}
        for p in self.manifest["pieces"]:
            for i in p["functions"][fn]["inputs"]:
                if i["name"] not in inner:
                    seen.setdefault(i["name"], i)
        return list(seen.values())

    def outputs(self, function: str | None = None) -> list[dict[str, Any]]:
        fn = function or self.default_function
        return list(self.manifest["pieces"][-1]["functions"][fn]["outputs"])


def stateful_parts(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(the package whose spec describes the logits and the stateful facts, the package holding the assets) of a
    package (itself twice) or of a chunked model folder (its last piece, its first piece)."""
    p = Path(path)
    if not is_chunked(p):
        return p, p
    cm = open_chunked(p)
    return cm.pieces[-1], cm.pieces[0]


def _bad(folder: Path, msg: str) -> InputError:
    return InputError(f"{folder}: chunked model refused: {msg}")


def _features(entry: Any, where: str, folder: Path) -> list[tuple[str, tuple[int, ...], str]]:
    try:
        return [(str(x["name"]), tuple(int(d) for d in x["shape"]), str(x["dtype"])) for x in entry]
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(folder, f"{MANIFEST}: {where} is not a list of {{name, shape, dtype}}: {e}") from None


def _check_pieces(folder: Path, m: dict[str, Any]) -> list[Path]:
    from bitnet_coreml._files import inside

    pieces = m.get("pieces")
    if not isinstance(pieces, list) or not pieces:
        raise _bad(folder, f"{MANIFEST} lists no pieces")
    paths = []
    for k, p in enumerate(pieces):
        rel = p.get("path") if isinstance(p, dict) else None
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise _bad(folder, f"{MANIFEST}: piece {k} path {rel!r} is not a plain path inside the folder")
        path = folder / rel
        inside(folder, path, f"piece {k} of {MANIFEST}")
        if not (path / "Manifest.json").is_file():
            raise _bad(folder, f"piece {k} {rel} is missing (no {rel}/Manifest.json)")
        paths.append(path)
    return paths


def _check_boundaries(folder: Path, m: dict[str, Any], specs: list[dict[str, dict[str, Any]]]) -> None:
    """Piece k's outputs and piece k+1's inputs carry each boundary with the manifest's shape and dtype."""
    bounds = m.get("boundaries")
    pieces = m["pieces"]
    if not isinstance(bounds, list) or len(bounds) != len(pieces) - 1:
        raise _bad(folder, f"{MANIFEST}: {len(pieces)} pieces need {len(pieces) - 1} boundary tensor(s), "
                           f"found {len(bounds) if isinstance(bounds, list) else bounds!r}")
    for k, b in enumerate(bounds):
        for fn, shape in dict(b.get("shape", {})).items():
            want = (str(b.get("name")), tuple(int(d) for d in shape), str(b.get("dtype")))
            for side, j, key in (("output", k, "outputs"), ("input", k + 1, "inputs")):
                declared = _features(pieces[j]["functions"].get(fn, {}).get(key, []), f"piece {j} {fn} {key}", folder)
                actual = specs[j].get(fn, {}).get(key, {})
                got_decl = next((f for f in declared if f[0] == want[0]), None)
                got = actual.get(want[0])
                if got_decl != want or got != want[1:]:
                    seen = f"{list(got)}" if got else "absent"
                    raise _bad(folder, f"boundary {want[0]} ({fn}) between pieces {k} and {k + 1}: piece {j}'s "
                                       f"{side} is {seen} in {pieces[j]['path']}, the manifest says "
                                       f"{list(want[1])} {want[2]}")


def _piece_specs(path: Path) -> dict[str, dict[str, Any]]:
    """Per function of the package at ``path``: {"inputs": {name: (shape, dtype)}, "outputs": {...}}."""
    from bitnet_coreml._quiet import coremltools
    from bitnet_coreml.package.reader import read_package_spec
    from bitnet_coreml.package.stateful import function_specs

    coremltools()
    out: dict[str, dict[str, Any]] = {}
    for f in function_specs(read_package_spec(path).spec):
        out[f["name"]] = {key: {x["name"]: (tuple(x.get("shape", ())), x.get("dtype")) for x in f[key]}
                          for key in ("inputs", "outputs")}
    return out


def open_chunked(path: str | os.PathLike[str], *, verify_sha: bool = True) -> ChunkedModel:
    """Open and validate a chunked model folder (see the module docstring)."""
    from bitnet_coreml._files import load_json

    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise InputError(f"{folder}: not a chunked model folder (no {MANIFEST})")
    m = load_json(folder / MANIFEST, "chunked model manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(folder, f"{MANIFEST} is not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise _bad(folder, f"{MANIFEST} version {m.get('version')!r}; this bitnet-coreml reads version {VERSION}")
    if not isinstance(m.get("functions"), list) or not m["functions"]:
        raise _bad(folder, f"{MANIFEST} names no functions")
    paths = _check_pieces(folder, m)
    if verify_sha:
        for k, (p, entry) in enumerate(zip(paths, m["pieces"], strict=True)):
            got = piece_sha256(p)
            if got != entry.get("sha256"):
                raise _bad(folder, f"piece {k} {entry['path']} has sha256 {got[:16]}..., the manifest records "
                                   f"{str(entry.get('sha256'))[:16]}... (changed or corrupt)")
    try:
        specs = [_piece_specs(p) for p in paths]
    except InputError as e:
        raise _bad(folder, str(e)) from None
    _check_boundaries(folder, m, specs)
    return ChunkedModel(folder, m, tuple(paths))
