"""The fused decode table stored inside a stateful package, and loading it without coremltools.

``executor/fused.py`` translates a package's compiled ``decode`` function into an instruction table
(:class:`~bitnet_coreml.executor.fused._Program`). Making it needs coremltools and the MIL program
(~90 MiB of libraries and the program's objects before any weight); running it needs neither.
``convert --stateful`` therefore writes the translation into the package as the asset
:data:`ASSET` (``package/assets.py``), and generation loads it from there:

* a header (JSON) with the format version, the kernel's instruction-set fingerprint, the sha256 and
  size of the package's specification and of every weight file it refers to, everything generation
  needs about the package (its ``StatefulInfo``, the functions' inputs / outputs, the vocabulary size),
  and where each part of the program lies;
* the instructions (int64 rows), the arena's constants (offsets and float32 values) and the large
  float32 constants that are not stored in a weight file as they are;
* **no weight**: each 2-bit ternary weight and each fp16 weight is an offset into the package's
  ``weight.bin`` (found by content at write time). At load the ternary codes are memory-mapped as
  they are (no copy) and each fp16 weight is read once into the kernel's blocked layout
  (``executor/half.py``) with plain reads, so its bytes are never resident twice.

A table is refused (:class:`StaleTable`, with the reason; the caller translates the program as before)
when its format or the kernel's instruction set differ, or when the specification or a weight file
is not byte for byte the one it was made from (sha256). Packages without the asset work as before.

The file is deterministic (sorted JSON, no time stamps), so a package stays byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml._files import sha256_file
from bitnet_coreml.errors import ModelLoadError

__all__ = ["ASSET", "FORMAT", "StaleTable", "StoredTable", "Translation", "open_table", "table_bytes", "translate",
           "write_table"]

ASSET = "fused-decode.bin"  # the asset's name (Data/com.bitnet-coreml/assets/<ASSET>)
FORMAT = 1
_MAGIC = b"BNCFUSED"
_HEAD = struct.Struct("<8sIQ")  # magic, format, header bytes
_ALIGN = 64
_MAX_HEADER = 1 << 26
_HALF_BLOCK_KEY = "half_block"


class StaleTable(Exception):
    """The package's stored table cannot be used (the message says why); translate the program instead."""


def _layout() -> Any:
    from bitnet_coreml.executor import _layout as layout  # numba-free: the table's layout constants

    return layout


def isa_fingerprint() -> str:
    """The kernel's instruction set: the row width and every opcode / field constant of ``executor/_layout.py``."""
    consts = sorted((k, int(v)) for k, v in vars(_layout()).items()
                    if k.isupper() and isinstance(v, int) and not isinstance(v, bool))
    return hashlib.sha256(json.dumps(consts).encode()).hexdigest()[:16]


def _rel(pkg: Path, p: Path) -> str:
    return p.resolve().relative_to(pkg.resolve()).as_posix()


# --- writing (convert time: coremltools and the MIL program are loaded anyway) ------------------------

def _blob_locations(spec: Any, spec_file: Path) -> tuple[list[Path], list[np.ndarray], dict[int, list[tuple[int, int]]]]:
    """Weight files of ``spec``, each memory-mapped (uint8), and ``bytes -> [(file index, data offset)]`` of every
    blob in them."""
    from bitnet_coreml.package.reader import _MODEL_PATH, _blob_values, _check_record

    files: list[Path] = []
    maps: list[np.ndarray] = []
    by_size: dict[int, list[tuple[int, int]]] = {}
    records: dict[str, set[int]] = {}
    for blob in _blob_values(spec):
        records.setdefault(str(blob.fileName), set()).add(int(blob.offset))
    for name in sorted(records):
        rel = name[len(_MODEL_PATH):] if name.startswith(_MODEL_PATH) else name
        f = spec_file.parent / rel
        files.append(f)
        size = f.stat().st_size
        maps.append(np.memmap(f, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8))
        with open(f, "rb") as fh:
            for off in sorted(records[name]):
                nbytes, data_off = _check_record(fh, f, off, size)
                by_size.setdefault(nbytes, []).append((len(files) - 1, data_off))
    return files, maps, by_size


def _where(arr: np.ndarray, maps: list[np.ndarray], by_size: dict[int, list[tuple[int, int]]]) -> tuple[int, int] | None:
    """``(file index, data offset)`` of a blob holding exactly ``arr``'s bytes (compared, not hashed), or None."""
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    head = raw[:64]
    for fi, off in by_size.get(raw.size, []):
        m = maps[fi]
        if np.array_equal(m[off:off + head.size], head) and np.array_equal(m[off:off + raw.size], raw):
            return fi, off
    return None


class _Sections:
    """The data after the header: arrays at 64-byte aligned offsets (relative to the data start)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, arr: np.ndarray) -> dict[str, Any]:
        arr = np.ascontiguousarray(arr)
        ref = {"offset": self.size, "dtype": arr.dtype.str, "shape": list(arr.shape)}
        data = arr.tobytes()
        pad = -len(data) % _ALIGN
        self.parts.append(data + b"\0" * pad)
        self.size += len(data) + pad
        return ref


def _val(v: Any) -> list[int]:
    return [int(v.buf), int(v.off), *(int(d) for d in v.shape)]


def _decode_executor(ps: Any) -> Any:
    """The reference executor of the package's ``decode`` function alone (its ``prefill`` is never loaded)."""
    from bitnet_coreml.executor.blobs import load_lazily
    from bitnet_coreml.executor.executor import ReferenceExecutor
    from bitnet_coreml.executor.shared import SharedPackage, blob_keys
    from bitnet_coreml.package.stateful import DECODE

    spec = type(ps.spec)()
    spec.CopyFrom(ps.spec)
    for name in [n for n in spec.mlProgram.functions if n != DECODE]:
        del spec.mlProgram.functions[name]
    keep = [f for f in spec.description.functions if f.name == DECODE]
    del spec.description.functions[:]
    spec.description.functions.extend(keep)
    lazy = load_lazily(spec, ps.weights_dir)
    if lazy is None:
        return ReferenceExecutor(ps.path, function_name=DECODE)
    prog, blobs = lazy
    shared = SharedPackage(prog, DECODE, str(ps.path), blob_keys(spec), blobs=blobs)
    return ReferenceExecutor(None, function_name=DECODE, _shared=shared)


@dataclass
class Translation:
    """A decode function translated (``fused._build``) with the facts the header records, or why it was not."""

    program: Any  # fused._Program, None when it does not translate
    why: str | None
    ops: int = 0
    fp32: bool = False
    out_dtypes: dict[str, Any] | None = None


def translate(source: Any) -> Translation:
    """Translate the ``decode`` function of ``source``: a MIL program held in memory (convert) or a
    :class:`~bitnet_coreml.package.reader.PackageSpec` (its decode function alone is loaded)."""
    from bitnet_coreml.executor.fused import _build, _Unsupported
    from bitnet_coreml.package.stateful import DECODE

    if hasattr(source, "spec_file"):
        ex = _decode_executor(source)
    else:
        from bitnet_coreml.executor.executor import ReferenceExecutor

        ex = ReferenceExecutor(source, function_name=DECODE)
    try:
        p = _build(ex)
    except _Unsupported as e:
        return Translation(None, f"the decode function does not translate ({e})")
    return Translation(p, None, len(ex._block.steps), bool(ex.fp32), dict(zip(ex._outputs, ex._output_dtypes, strict=True)))


def table_bytes(package: str | os.PathLike[str], translation: Translation | None = None,
                spec: Any = None) -> tuple[bytes | None, str]:
    """The stored-table asset of the stateful package at ``package`` (its decode function translated), or
    ``(None, why not)``. ``translation``: made by the caller from the MIL program it still holds (convert:
    nothing is read back), else the decode function is loaded from the package (coremltools). ``spec``:
    the specification the caller has just written to ``package`` (convert: not parsed again)."""
    from bitnet_coreml.executor.half import BLOCK
    from bitnet_coreml.package.reader import PackageSpec, read_package_spec, root_spec_path
    from bitnet_coreml.package.stateful import DECODE, function_specs, stateful_info

    pkg = Path(package)
    if spec is not None:
        spec_file = root_spec_path(pkg)
        ps = PackageSpec(pkg, spec, spec_file, spec_file.parent / "weights")
    else:
        ps = read_package_spec(pkg)
    info = stateful_info(ps.spec)
    if info is None:
        return None, "not a stateful package"
    tr = translation if translation is not None else translate(ps)
    p = tr.program
    if p is None:
        return None, str(tr.why)
    files, maps, by_size = _blob_locations(ps.spec, ps.spec_file)
    sec = _Sections()
    terns, halves, big = [], [], []
    for codes in p.terns:
        loc = _where(codes, maps, by_size)
        if loc is None:
            return None, f"a ternary weight of shape {list(codes.shape)} is not stored as such in the weight file"
        terns.append({"file": loc[0], "offset": loc[1], "shape": [int(d) for d in codes.shape]})
    for blocks, n in zip(p.halves, p.half_rows, strict=True):
        nb, k, b = blocks.shape
        if b != BLOCK:
            return None, f"an fp16 weight in blocks of {b} rows (the loader writes {BLOCK})"
        # the [N, K] fp16 weight: its rows are the blocks' columns (zero rows pad the last block)
        loc = _where(blocks.transpose(0, 2, 1).reshape(nb * b, k)[:n], maps, by_size)
        if loc is None:
            return None, f"an fp16 weight of shape {[n, k]} is not stored as such in the weight file"
        halves.append({"file": loc[0], "offset": loc[1], "shape": [n, k]})
    for arr in p.big:
        loc = _where(arr, maps, by_size)
        big.append({"file": loc[0], "offset": loc[1], "size": int(arr.size)} if loc is not None
                   else {"inline": sec.add(arr)})
    offs = np.array([(off, vals.size) for off, vals in p.init], dtype=np.int64).reshape(-1, 2)
    vals = np.concatenate([v for _, v in p.init]).astype(np.float32) if p.init else np.zeros(0, np.float32)
    specs = function_specs(ps.spec)
    decode_out: list[dict[str, Any]] = next((f["outputs"] for f in specs if f["name"] == DECODE), [])
    vocab = int(decode_out[0]["shape"][-1]) if decode_out and decode_out[0].get("shape") else None
    header = {
        "format": FORMAT,
        "kernel": {"isa": isa_fingerprint(), _HALF_BLOCK_KEY: BLOCK},
        "package": {"spec": {"path": _rel(pkg, ps.spec_file), "sha256": sha256_file(ps.spec_file),
                             "size": ps.spec_file.stat().st_size},
                    "weights": [{"path": _rel(pkg, f), "sha256": sha256_file(f), "size": f.stat().st_size}
                                for f in files]},
        "stateful": info.to_dict(),
        "functions": specs,
        "vocab_size": vocab,
        "decode": {
            "ops": tr.ops, "fp32": tr.fp32,
            "instructions": sec.add(p.prog.astype(np.int64)),
            "arena": {"size": int(p.arena.size), "init_at": sec.add(offs), "init_values": sec.add(vals)},
            "big": big, "terns": terns, "halves": halves,
            "inputs": [[n, *_val(v)] for n, v in p.inputs], "outputs": [[n, *_val(v)] for n, v in p.outputs],
            "states": [[n, list(s)] for n, s in zip(p.states, p.state_shapes, strict=True)],
            "out_dtypes": {n: (None if d is None else np.dtype(d).str) for n, d in (tr.out_dtypes or {}).items()},
        },
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-(_HEAD.size + len(head)) % _ALIGN)
    return _HEAD.pack(_MAGIC, FORMAT, len(head)) + head + b"".join(sec.parts), (
        f"stored decode table: {p.prog.shape[0]} instructions, {len(terns)} ternary + {len(halves)} fp16 weights "
        f"referenced in the weight file")


def write_table(package: str | os.PathLike[str], translation: Translation | None = None, spec: Any = None) -> str:
    """Write the stored-table asset into ``package`` (atomically, ``assets.write_assets``); returns a note.
    ``translation``, ``spec``: as for :func:`table_bytes`."""
    from bitnet_coreml.package.assets import write_assets

    data, note = table_bytes(package, translation, spec)
    if data is None:
        return f"no stored decode table ({note}): generation will translate the program at load"
    write_assets(package, {ASSET: data})
    return note


# --- loading (generation: no coremltools, no MIL program) -------------------------------------------

@dataclass
class StoredTable:
    """A package's stored table, its header checked against the package's specification."""

    package: Path
    path: Path
    header: dict[str, Any]
    data_start: int

    @property
    def vocab_size(self) -> int | None:
        v = self.header.get("vocab_size")
        return int(v) if v is not None else None

    def stateful_info(self) -> Any:
        from bitnet_coreml.package.stateful import StatefulInfo

        return StatefulInfo.from_dict(self.header["stateful"])

    def _file(self, rel: str) -> Path:
        from bitnet_coreml._files import inside

        return inside(self.package, self.package / rel, f"stored table's file {rel!r}", error=ModelLoadError)

    def _array(self, fh: Any, ref: dict[str, Any]) -> np.ndarray:
        dtype = np.dtype(ref["dtype"])
        shape = tuple(int(d) for d in ref["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        fh.seek(self.data_start + int(ref["offset"]))
        out = np.empty(count, dtype=dtype)
        if fh.readinto(out.data) != out.nbytes:
            raise StaleTable(f"{self.path.name} is truncated")
        return out.reshape(shape)

    def check_weights(self) -> list[Path]:
        """The weight files, each checked against its recorded size and sha256 (StaleTable otherwise)."""
        out = []
        for w in self.header["package"]["weights"]:
            f = self._file(w["path"])
            if not f.is_file() or f.stat().st_size != int(w["size"]) or sha256_file(f) != w["sha256"]:
                raise StaleTable(f"{w['path']} is not the weight file the table was made from (sha256 differs)")
            out.append(f)
        return out

    def load(self) -> tuple[Any, list[tuple[str, tuple[int, ...]]]]:
        """``(FusedFunction, [(state name, shape)])`` of the stored decode function (weights checked first;
        StaleTable for a table that does not fit its package or reaches outside its buffers)."""
        from bitnet_coreml.executor.fused import _Unsupported

        try:
            return self._load()
        except _Unsupported as e:  # no kernel to run it (neither the C library nor numba)
            raise StaleTable(str(e)) from None
        except (KeyError, IndexError, TypeError, ValueError, OSError) as e:
            raise StaleTable(f"{self.path.name} does not fit the package ({type(e).__name__}: {e})") from None

    def _check_budget(self, d: dict[str, Any]) -> None:
        """What the header asks to allocate (arena, states, sections read, fp16 weights re-laid out) against the
        memory budget (``_files.memory_budget``), before anything is allocated."""
        from bitnet_coreml._files import human_bytes, memory_budget

        def count(shape: Any) -> int:
            return int(np.prod([int(x) for x in shape], dtype=np.int64)) if len(shape) else 1

        refs = [d["instructions"], d["arena"]["init_at"], d["arena"]["init_values"]] + \
            [b["inline"] for b in d["big"] if "inline" in b]
        total = 4 * int(d["arena"]["size"]) + sum(4 * count(s) for _, s in d["states"]) \
            + sum(np.dtype(r["dtype"]).itemsize * count(r["shape"]) for r in refs) \
            + sum(2 * count(h["shape"]) for h in d["halves"])
        if total > memory_budget():
            raise StaleTable(f"{self.path.name} asks for {human_bytes(total)}, over the memory budget of "
                             f"{human_bytes(memory_budget())}")

    def _load(self) -> tuple[Any, list[tuple[str, tuple[int, ...]]]]:
        from bitnet_coreml.executor.fused import FusedFunction, _Program, _Val

        d = self.header["decode"]
        self._check_budget(d)
        files = self.check_weights()
        maps = []
        for f in files:
            with open(f, "rb") as fh:
                maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))  # kept alive by its views
        block = int(self.header["kernel"][_HALF_BLOCK_KEY])
        with open(self.path, "rb") as fh:
            prog = self._array(fh, d["instructions"])
            arena = np.zeros(max(int(d["arena"]["size"]), 1), dtype=np.float32)
            at, vals = self._array(fh, d["arena"]["init_at"]), self._array(fh, d["arena"]["init_values"])
            init, pos = [], 0
            for off, n in at.tolist():
                init.append((off, vals[pos:pos + n]))
                arena[off:off + n] = vals[pos:pos + n]
                pos += n
            big = [self._array(fh, b["inline"]).reshape(-1) if "inline" in b
                   else np.frombuffer(maps[b["file"]], np.float32, int(b["size"]), int(b["offset"]))
                   for b in d["big"]]
        terns = [np.frombuffer(maps[t["file"]], np.uint8, int(np.prod(t["shape"])), int(t["offset"])).reshape(t["shape"])
                 for t in d["terns"]]
        halves = [_blocked(files[h["file"]], int(h["offset"]), int(h["shape"][0]), int(h["shape"][1]), block)
                  for h in d["halves"]]

        def val(row: list[Any]) -> tuple[str, Any]:
            return row[0], _Val(int(row[1]), int(row[2]), tuple(int(x) for x in row[3:]))

        states = [(n, tuple(int(x) for x in s)) for n, s in d["states"]]
        p = _Program(np.ascontiguousarray(prog, dtype=np.int64), arena, big, terns, halves,
                     [val(r) for r in d["inputs"]], [val(r) for r in d["outputs"]], [n for n, _ in states], init,
                     [s for _, s in states], [int(h["shape"][0]) for h in d["halves"]])
        sizes = [arena.size] + [int(np.prod(s, dtype=np.int64)) for _, s in states] + [b.size for b in big]
        check_program(p.prog, sizes, [t.shape for t in terns], [h.shape for h in halves], p.half_rows)
        for name, v in p.inputs + p.outputs:
            if v.buf >= len(sizes) or v.off < 0 or v.off + max(v.size, 1) > sizes[v.buf]:
                raise StaleTable(f"{self.path.name}: {name!r} lies outside its buffer")
        out_dtypes = {n: (None if t is None else np.dtype(t)) for n, t in d["out_dtypes"].items()}
        return FusedFunction(p, out_dtypes, fp32=bool(d["fp32"]), ops=int(d["ops"])), states


def _extent(buf: int, off: int, dims: Any, strides: Any, sizes: list[int]) -> bool:
    """True when every element ``off + sum(i_j * strides_j)``, ``0 <= i_j < dims_j``, lies inside buffer ``buf``."""
    if not 0 <= buf < len(sizes):
        return False
    lo = hi = off
    for dim, st in zip(dims, strides, strict=True):
        if dim <= 0:
            return dim == 0 and all(x >= 0 for x in dims)  # nothing is read or written
        span = (dim - 1) * st
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    return 0 <= lo and hi < sizes[buf]


def check_program(prog: np.ndarray, sizes: list[int], terns: list[tuple[int, ...]], halves: list[tuple[int, ...]],
                  half_rows: list[int]) -> None:
    """Refuse (StaleTable) a table whose instructions would read or write outside their buffers or weights.

    The table comes from a file: every operand each opcode touches (as the kernel reads it, ``_vm.run``) must
    lie inside its buffer (``sizes``: element counts of the arena, the states, the large constants), every
    weight index name an existing weight of the shape the product needs. Run-time values (gather indices,
    cache positions) are checked by the kernel itself.
    """
    L = _layout()
    if prog.ndim != 2 or prog.shape[1] != L.WIDTH:
        raise StaleTable(f"instruction table of shape {list(prog.shape)}; rows are {L.WIDTH} wide")
    modes = {L.R_NONE, L.R_F16, L.R_INT, L.R_BOOL, L.R_UINT}

    def operand(ins: list[int], base: int, dims: Any, strides: Any = None) -> bool:
        st = strides if strides is not None else ins[base + 2:base + 6]
        return _extent(ins[base], ins[base + 1], dims, st, sizes)

    for pc, ins in enumerate(prog.tolist()):
        op, mode = ins[L.OP], ins[L.RND]
        d = ins[L.D:L.D + 4]
        n = d[0] * d[1] * d[2] * d[3]
        prm = ins[L.P:L.P + 10]
        ok = mode in modes and min(d) >= 0 and 0 <= prm[9] <= 32
        if not ok:
            pass
        elif op <= L.TERNARY_LAST:
            used = [L.OUT, L.A] + ([L.B] if op <= L.BINARY_LAST or op == L.RSQRT else []) \
                + ([L.B, L.C] if op > L.UNARY_LAST else [])
            if prm[8]:  # the contiguous fast path: A (and B when 1) over n values, other operands scalars
                ok = all(operand(ins, b, (n if b in (L.OUT, L.A) or (b == L.B and prm[8] == 1 and op <= L.BINARY_LAST)
                                          else 1,), (1,)) for b in used)
            ok = ok and all(operand(ins, b, d) for b in used)
        elif op <= L.SOFTMAX:
            outer = d[:3]
            ok = prm[0] >= 1 and operand(ins, L.A, outer + [prm[0]]) and \
                operand(ins, L.OUT, outer + ([prm[0]] if op == L.SOFTMAX else [1]))
        elif op in (L.MM_TERN, L.MM_HALF):
            m, k, nn, w = prm[:4]
            if op == L.MM_TERN:
                ok = 0 <= w < len(terns) and k % 4 == 0 and tuple(terns[w]) == (nn, k // 4)
            else:
                ok = 0 <= w < len(halves) and halves[w][1] == k and half_rows[w] == nn
            ok = ok and min(m, k, nn) >= 1 and operand(ins, L.A, (m * k,), (1,)) \
                and operand(ins, L.A, (m, k), (ins[L.A + 4], ins[L.A + 5])) and operand(ins, L.OUT, (m * nn,), (1,))
        elif op == L.MATMUL:
            k, ska, skb = prm[:3]
            ok = k >= 1 and operand(ins, L.A, d[:3] + [k], list(ins[L.A + 2:L.A + 5]) + [ska]) \
                and operand(ins, L.B, d[:2] + [k, d[3]], list(ins[L.B + 2:L.B + 4]) + [skb, ins[L.B + 5]]) \
                and operand(ins, L.OUT, d)
        elif op in (L.GATHER, L.GATHER_HALF):
            rows, width = prm[:2]
            ok = rows >= 1 and width >= 1 and operand(ins, L.A, d[:3] + [1]) \
                and operand(ins, L.OUT, (d[0] * d[1] * d[2] * width,), (1,))
            if op == L.GATHER_HALF:
                w = prm[2]
                ok = ok and 0 <= w < len(halves) and halves[w][1] == width and rows <= half_rows[w]
            else:
                ok = ok and operand(ins, L.B, (rows, width), (ins[L.B + 4], ins[L.B + 5]))
        elif op == L.SCATTER:
            ok = min(prm[:4]) >= 0 and operand(ins, L.OUT, prm[:4]) and operand(ins, L.A, d) \
                and operand(ins, L.B, (4,), (ins[L.B + 5],)) and operand(ins, L.C, (4,), (ins[L.C + 5],))
        else:
            ok = False
        if not ok:
            raise StaleTable(f"instruction {pc} (opcode {op}) reaches outside its buffers or weights")


def _blocked(f: Path, offset: int, n: int, k: int, block: int) -> np.ndarray:
    """The ``[N, K]`` fp16 weight at ``offset`` of ``f`` as ``[ceil(N/B), K, B]`` uint16 (``executor/half.py``'s
    layout), read ``B`` rows at a time with plain reads: its bytes land in memory once, in that layout."""
    nb = -(-n // block)
    out = np.zeros((nb, k, block), dtype=np.uint16)
    rows = np.empty((block, k), dtype=np.uint16)
    with open(f, "rb") as fh:
        fh.seek(offset)
        for b in range(nb):
            m = min(block, n - b * block)
            if fh.readinto(rows[:m].data) != m * k * 2:
                raise StaleTable(f"{f.name} is shorter than the table says")
            out[b, :, :m] = rows[:m].T
    return out


def open_table(package: str | os.PathLike[str]) -> StoredTable | None:
    """The stored table of ``package`` (header and specification checked), None when it has none.

    Raises :class:`StaleTable` when the table cannot be used (format, kernel, or a specification that
    is not the one it was made from); the weight files are checked by :meth:`StoredTable.load`.
    """
    from bitnet_coreml.package.assets import assets_dir
    from bitnet_coreml.package.reader import root_spec_path

    pkg = Path(package)
    path = assets_dir(pkg) / ASSET
    if not path.is_file() or path.is_symlink():
        return None
    with open(path, "rb") as fh:
        raw = fh.read(_HEAD.size)
        if len(raw) < _HEAD.size:
            raise StaleTable(f"{ASSET} is truncated")
        magic, fmt, n = _HEAD.unpack(raw)
        if magic != _MAGIC:
            raise StaleTable(f"{ASSET} is not a stored decode table")
        if fmt != FORMAT:
            raise StaleTable(f"{ASSET} has format {fmt}; this version reads format {FORMAT} (re-run convert)")
        if n > _MAX_HEADER:
            raise StaleTable(f"{ASSET}: header of {n} bytes")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise StaleTable(f"{ASSET}: unreadable header ({e})") from None
    try:
        if header["kernel"]["isa"] != isa_fingerprint():
            raise StaleTable("it was made for another version of the decode kernel's instruction set (re-run convert)")
        spec = header["package"]["spec"]
        spec_file = root_spec_path(pkg)
        if _rel(pkg, spec_file) != spec["path"] or spec_file.stat().st_size != int(spec["size"]) \
                or sha256_file(spec_file) != spec["sha256"]:
            raise StaleTable(f"{spec['path']} is not the specification the table was made from (sha256 differs)")
        table = StoredTable(pkg, path, header, _HEAD.size + n)
        _ = (table.stateful_info(), table.vocab_size)  # the facts the session reads, checked here
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StaleTable(f"{ASSET}: malformed header ({type(e).__name__}: {e})") from None
    return table
