"""Reading the user's files safely: one place for the rules every reader follows.

- **Special files** (named pipes, devices, sockets) are refused *before* they are opened: opening a
  FIFO for reading blocks until someone writes, and a device can stream forever.
- **Documents** (JSON, TOML, text) have a size limit and a nesting limit: a ``RecursionError`` in a
  parser is a refusal naming the file, never a crash.
- **Containment**: a path another file names (external data, a shard, a package's manifest entry)
  must resolve inside the folder it belongs to; a symlink is followed only when its target is inside
  that folder or, for a Hugging Face cache snapshot (``.../models--org--name/snapshots/<rev>/``),
  inside that cache repository's ``blobs/``.
- **Declared sizes** (an array's shape in a header, a tensor's dims, a sequence length) are checked
  against the bytes actually present and against a memory budget *before* anything is allocated.
- **Arrays** come from ``.npz`` files through :func:`load_npz`: headers first (no object dtypes, so
  nothing is ever unpickled; shapes checked against the member's size and the budget), data second.

Every refusal is an :class:`~bitnet_coreml.errors.InputError` (or the subclass the caller passes)
whose one line names the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover  (Python 3.10: the tomli backport, a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

MAX_DOCUMENT_BYTES = 64 << 20  # config.json, index files, manifests, pipeline and capability files
MEMORY_BUDGET_ENV = "BITNET_COREML_MEMORY_BUDGET"
BUDGET_FRACTION = 0.5  # of min(physical memory, address-space limit)

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _fail(error: type[InputError], msg: str) -> InputError:
    return error(msg)


def regular_file(path: str | os.PathLike[str], what: str = "file", *,
                 error: type[InputError] = InputError) -> os.stat_result:
    """``stat`` of ``path`` if it is a regular file (symlinks followed); refuse anything else before opening it."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _fail(error, f"{p}: no such file ({what})") from None
    except OSError as e:
        raise _fail(error, f"{p}: cannot read ({e.strerror or e}) ({what})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(error, f"{p}: is a folder, expected a {what}")
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise _fail(error, f"{p}: is {kind}, not a regular file; refusing to read it as a {what}")
    return st


def refuse_special(path: str | os.PathLike[str], what: str = "file", *, error: type[InputError] = InputError) -> None:
    """Refuse a named pipe, device or socket at ``path`` (a missing path or a folder is left to the caller)."""
    try:
        st = os.stat(path)
    except OSError:
        return
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise _fail(error, f"{path}: is {kind}, not a regular file; refusing to read it as a {what}")


def read_bytes(path: str | os.PathLike[str], what: str, *, limit: int = MAX_DOCUMENT_BYTES,
               error: type[InputError] = InputError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    st = regular_file(path, what, error=error)
    if st.st_size > limit:
        raise _fail(error, f"{path}: {st.st_size} bytes is too large for a {what} (limit {limit})")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise _fail(error, f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise _fail(error, f"{path}: too large for a {what} (limit {limit} bytes)")
    return data


def read_text(path: str | os.PathLike[str], what: str, *, limit: int = MAX_DOCUMENT_BYTES,
              error: type[InputError] = InputError) -> str:
    """A UTF-8 text file (see :func:`read_bytes`)."""
    data = read_bytes(path, what, limit=limit, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(error, f"{path}: not UTF-8 text (byte {e.start}); expected a {what}") from None


def parse_json(text: str | bytes, where: str, *, error: type[InputError] = InputError) -> Any:
    """``json.loads`` whose every failure (syntax, nesting, huge numbers) is one refusal naming ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _fail(error, f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int too long to convert
        raise _fail(error, f"{where}: not valid JSON ({' '.join(str(e).split())[:200]})") from None


def load_json(path: str | os.PathLike[str], what: str, *, limit: int = MAX_DOCUMENT_BYTES,
              error: type[InputError] = InputError) -> Any:
    return parse_json(read_text(path, what, limit=limit, error=error), str(path), error=error)


def load_toml(path: str | os.PathLike[str], what: str, *, limit: int = MAX_DOCUMENT_BYTES,
              error: type[InputError] = InputError) -> dict[str, Any]:
    text = read_text(path, what, limit=limit, error=error)
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise _fail(error, f"{path}: TOML nested too deeply") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise _fail(error, f"{path}: not valid TOML: {' '.join(str(e).split())[:200]}") from None


# --- containment ----------------------------------------------------------------------------------


def hf_cache_blobs(folder: Path) -> Path | None:
    """``.../models--org--name/blobs`` when ``folder`` is a snapshot of a Hugging Face cache repository."""
    f = folder.absolute()
    if f.parent.name == "snapshots" and f.parent.parent.name.startswith(("models--", "datasets--")):
        return f.parent.parent / "blobs"
    return None


def _within(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def inside(folder: str | os.PathLike[str], path: str | os.PathLike[str], what: str, *,
           error: type[InputError] = InputError) -> Path:
    """``path`` resolved; refused unless it lies inside ``folder`` (or a HF snapshot's ``blobs/``)."""
    base = Path(folder)
    target = Path(path).resolve()
    roots = [base.resolve()]
    blobs = hf_cache_blobs(base)
    if blobs is not None:
        roots.append(blobs.resolve())
    if not any(_within(target, r) for r in roots):
        via = " through a symlink" if Path(path).is_symlink() or target != Path(path).absolute() else ""
        raise _fail(error, f"{path}: {what} resolves outside {base}{via} ({target}); refused")
    return target


# --- memory budget --------------------------------------------------------------------------------


_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read through one reused 1 MiB buffer: no per-chunk allocation, and
    (unlike hashing a memory map) no page of the file counted in this process's resident memory."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def memory_budget() -> int:
    """Bytes one declared allocation may take: ``BITNET_COREML_MEMORY_BUDGET``, else half of the smaller
    of physical memory and this process's address-space limit."""
    env = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise InputError(f"{MEMORY_BUDGET_ENV}={env!r}: expected a number of bytes") from None
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 1 << 36
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    limit = phys if soft in (resource.RLIM_INFINITY, -1) else min(phys, soft)
    return int(limit * BUDGET_FRACTION)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_budget(nbytes: int, what: str, *, error: type[InputError] = InputError) -> None:
    """Refuse a declared allocation of ``nbytes`` over :func:`memory_budget`, before it is made."""
    budget = memory_budget()
    if nbytes > budget:
        raise _fail(error, f"{what} needs {human_bytes(nbytes)}, over the memory budget of {human_bytes(budget)} "
                           f"(set {MEMORY_BUDGET_ENV} to raise it)")


# --- .npz arrays ----------------------------------------------------------------------------------


def read_npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran_order, dtype) from an open ``.npy`` stream positioned at its start; reads no data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)  # type: ignore[no-any-return]
    return np.lib.format.read_array_header_2_0(f)  # type: ignore[no-any-return]


def npz_headers(path: str | os.PathLike[str], what: str = "input", *,
                budget: bool = True) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Name -> (shape, dtype) of every array in an ``.npz``, validated without reading any data.

    Refuses: special files, a single ``.npy``, non-zip files, object (pickled) dtypes, and shapes whose
    byte size disagrees with the member's stored size or (with ``budget``; a dataset streamed row by
    row checks its rows instead) exceeds the memory budget.
    """
    p = Path(path)
    regular_file(p, f".npz {what} file")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    if magic == b"\x93NUMPY":
        raise InputError(f"{p}: is a single .npy array, not an .npz; save with np.savez(path, name=array)")
    out: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"{p}: array {name!r}"
                with zf.open(info) as f:
                    try:
                        shape, _fortran, dtype = read_npy_header(f)
                    except (ValueError, SyntaxError, TypeError) as e:
                        raise InputError(f"{where}: not a valid .npy header ({' '.join(str(e).split())[:200]})") from None
                    header_len = f.tell()
                if dtype.hasobject:
                    raise InputError(f"{where} holds Python objects (a pickled array); only numeric arrays are "
                                     "read, nothing is unpickled")
                if any(int(d) < 0 for d in shape):
                    raise InputError(f"{where}: negative dimension in shape {list(shape)}")
                nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
                if nbytes != info.file_size - header_len:
                    raise InputError(f"{where}: header declares shape {list(shape)} {dtype} ({nbytes} bytes) but "
                                     f"the file holds {max(info.file_size - header_len, 0)} bytes of data")
                if budget:
                    check_budget(nbytes, f"{where} (shape {list(shape)})")
                out[name] = (tuple(int(d) for d in shape), dtype)
    except zipfile.BadZipFile as e:
        raise InputError(f"{p}: not a readable .npz file (not a zip archive: {e})") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{p}: cannot read as .npz ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return out


def load_npz(path: str | os.PathLike[str], what: str = "input") -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, after :func:`npz_headers` has validated it; never unpickles."""
    npz_headers(path, what)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
