"""Crash-safe file writing and content hashing shared by pipelines and batch jobs.

Everything a job writes goes to a temporary name in the destination's own folder and is renamed into
place, so a reader (or a later resumed run) sees either the old file or the complete new one, never a
half-written one. Arrays are written as ``.npz`` with fixed zip timestamps so that identical outputs
are byte-identical files: batch resumability and crash tests compare output checksums.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bitnet_coreml._files import sha256_file
from bitnet_coreml._json import json_default

# Zip's epoch; np.savez stamps the wall clock into every member, which would make equal outputs differ.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Finished artifacts get the permissions a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_COUNTER = itertools.count()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_tree(root: Path) -> Iterable[Path]:
    """Files under ``root`` (or ``root`` itself), in a stable order."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def sha256_tree(root: str | os.PathLike[str], stat_cache: dict[str, Any] | None = None) -> str:
    """Content hash of a file or a folder (relative paths + bytes of every file).

    ``stat_cache`` maps a file's path to ``{"size", "mtime_ns", "sha256"}``; a file whose size and
    mtime are unchanged reuses its recorded hash (so skipping an unchanged multi-GB model stays
    fast) and the cache is updated in place for files that were hashed.
    """
    root = Path(root)
    h = hashlib.sha256()
    for path in iter_tree(root):
        rel = path.relative_to(root).as_posix() if path != root else path.name
        h.update(rel.encode() + b"\0")
        h.update(_cached_file_hash(path, stat_cache).encode() + b"\n")
    return h.hexdigest()


def _cached_file_hash(path: Path, stat_cache: dict[str, Any] | None) -> str:
    if stat_cache is None:
        return sha256_file(path)
    st = path.stat()
    key = str(path.resolve())
    hit = stat_cache.get(key)
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    digest = sha256_file(path)
    stat_cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Deterministic, uncompressed ``.npz`` bytes (readable by ``np.load``), keys in sorted order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name unique to this process and call (mkstemp's random names cost more than the write itself
    # for small outputs); O_EXCL still refuses to reuse a name.
    tmp = str(path.parent / f".tmp-{path.name}.{os.getpid()}.{next(_COUNTER)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _silent_unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, fsync: bool = True) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n"
    atomic_write_bytes(path, text.encode(), fsync=fsync)


def replace_tree(src: Path, dst: Path) -> None:
    """Move a finished folder (or file) ``src`` to ``dst``, replacing what was there.

    A folder cannot be swapped in one ``rename`` when ``dst`` exists, so the old one is first renamed
    aside; at every instant ``dst`` is either absent, the old tree or the new tree, and a tree that is
    present under ``dst`` is always complete.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_file() or not dst.exists():
        if dst.is_dir() and src.is_file():
            shutil.rmtree(dst)
        os.replace(src, dst)
        return
    aside = dst.with_name(f".old-{dst.name}.{os.getpid()}")
    os.replace(dst, aside)
    os.replace(src, dst)
    remove_path(aside)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _silent_unlink(path)


def _silent_unlink(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_dir(folder: Path, busy_message: str) -> int | None:
    """Take an exclusive lock on ``folder`` (released when the process dies, even by SIGKILL).

    Two jobs writing one manifest would corrupt it; the second one is refused with ``busy_message``.
    Returns the descriptor to ``os.close`` when done (None where ``fcntl`` does not exist).
    """
    from bitnet_coreml.errors import InputError  # keep this module dependency-free

    try:
        import fcntl  # POSIX only
    except ImportError:  # pragma: no cover - Windows
        return None
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(f"{folder}: {busy_message}") from None
    return fd
