"""The fused decode's C kernel (``executor/_vm.c``): building it once, finding it, calling it with ctypes.

``make setup`` runs ``python -m bitnet_coreml.executor.native build``: the C compiler (``$CC``, else
``cc``) compiles ``_vm.c`` (with the ``_vm_ops.h`` it includes) with :data:`FLAGS` for this machine into
``_vm_native-<hash>.so`` next to this module (or in ``$BITNET_COREML_NATIVE_DIR``), where ``<hash>``
covers the C sources, the layout header generated from ``executor/_layout.py``, the compiler command
and flags, and this CPU's feature flags: a library built from another source, layout or machine has
another name and is never loaded. The compiler writes to a temporary path that is renamed into place,
so a reader never sees half a file; older builds are removed.

At run time :func:`load` returns the kernel when the current library exists, else ``None`` and why
(``executor/fused.py`` then uses the numba kernel, ``executor/_vm.py``). Nothing here compiles at
import or load time, and nothing imports numba.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bitnet_coreml.executor._layout import c_header

__all__ = ["DIR_ENV", "FLAGS", "NativeKernel", "build", "library_dir", "library_path", "load"]

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_vm.c"
OPS = HERE / "_vm_ops.h"  # the building blocks _vm.c includes
HEADER = "_vm_layout.h"
# -ffp-contract=off: no fused multiply-add the source does not ask for (fmaf), so the sums round as written
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")
_PREFIX = "_vm_native-"
DIR_ENV = "BITNET_COREML_NATIVE_DIR"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux: /proc/cpuinfo), part of the build's hash (-march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_hash() -> str:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), OPS.read_bytes(), c_header().encode(), " ".join(_compiler() + list(FLAGS)).encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def library_dir() -> Path:
    """Where libraries are built and looked for: ``$BITNET_COREML_NATIVE_DIR``, else next to this module."""
    env = os.environ.get(DIR_ENV)
    return Path(env) if env else HERE


def library_path(directory: Path | None = None) -> Path:
    """Where the library built from the current source for this machine lives."""
    return (directory or library_dir()) / f"{_PREFIX}{build_hash()}.so"


def build(directory: Path | None = None) -> Path:
    """Compile ``_vm.c`` into :func:`library_path` (a no-op when it is there); returns the path.

    Raises ``RuntimeError`` with the compiler's message when the compiler is missing or fails.
    """
    dest = library_path(directory)
    if dest.is_file():
        return dest
    cc = _compiler()
    if shutil.which(cc[0]) is None:
        raise RuntimeError(f"no C compiler: {cc[0]!r} not found (set CC, or install gcc / clang)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vm-build-") as tmp:
        (Path(tmp) / HEADER).write_text(c_header())
        out = Path(tmp) / dest.name
        cmd = [*cc, *FLAGS, "-I", tmp, "-o", str(out), str(SOURCE), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
        fd, part = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        os.close(fd)
        shutil.copyfile(out, part)
        os.replace(part, dest)
    for old in dest.parent.glob(f"{_PREFIX}*.so"):
        if old != dest:
            old.unlink(missing_ok=True)
    return dest


class NativeKernel:
    """The loaded library: :meth:`run` walks an instruction table as ``executor/_vm.py``'s ``run``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        self._run = lib.vm_run
        self._run.argtypes = [vp, i64, vp, vp, vp, ctypes.POINTER(i64)]
        self._run.restype = i64
        self.lib = lib
        lib.vm_pairwise_sum.argtypes = [vp, i64]
        lib.vm_pairwise_sum.restype = ctypes.c_float
        lib.vm_extreme.argtypes = [vp, i64, i64]
        lib.vm_extreme.restype = ctypes.c_float
        lib.vm_mm_nt.argtypes = [vp, vp, vp, i64, i64, i64, i64]
        lib.vm_mm_nt.restype = None
        lib.vm_mm_nn.argtypes = [vp, vp, vp, i64, i64, i64, i64]
        lib.vm_mm_nn.restype = ctypes.c_int
        lib.vm_tern_f32.argtypes = [vp, i64, i64, i64, vp, i64, vp]
        lib.vm_tern_f32.restype = None
        lib.vm_exp_shifted.argtypes = [vp, ctypes.c_float, vp, i64]
        lib.vm_exp_shifted.restype = None
        lib.vm_has_vnni.restype = ctypes.c_int
        self.has_vnni = bool(lib.vm_has_vnni())

    def run(self, prog: np.ndarray, bufs: np.ndarray, terns: np.ndarray, halves: np.ndarray) -> tuple[int, int]:
        """Every instruction of ``prog`` (int64 ``[n, WIDTH]``, C-contiguous); ``(error code, instruction)``."""
        pc = ctypes.c_int64(-1)  # per call: ctypes releases the GIL, calls may run side by side
        err = self._run(prog.ctypes.data, prog.shape[0], bufs.ctypes.data, terns.ctypes.data, halves.ctypes.data,
                        ctypes.byref(pc))
        if err == -1:
            raise MemoryError(f"fused decode: out of memory at instruction {pc.value}")
        if err < 0:
            raise RuntimeError(f"fused decode: instruction {pc.value} meets an fp16 buffer it does not read")
        return int(err), int(pc.value)

    # the kernel's building blocks, for the tests (float32 C-contiguous arrays)
    def pairwise_sum(self, x: np.ndarray) -> np.float32:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.float32(self.lib.vm_pairwise_sum(x.ctypes.data, x.size))

    def extreme(self, x: np.ndarray, smallest: bool) -> np.float32:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.float32(self.lib.vm_extreme(x.ctypes.data, x.size, int(smallest)))

    def exp_shifted(self, x: np.ndarray, m: float) -> np.ndarray:
        """``exp(x - m)`` in float32 as softmax computes it (contiguous ``x``)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        self.lib.vm_exp_shifted(x.ctypes.data, ctypes.c_float(m), out.ctypes.data, x.size)
        return out

    def mm_nt(self, x: np.ndarray, y: np.ndarray, out: np.ndarray, mode: int) -> None:
        """``out = x @ y.T`` (all C-contiguous float32)."""
        self.lib.vm_mm_nt(x.ctypes.data, y.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], y.shape[0], mode)

    def tern_f32(self, codes: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """``out = x @ w.T`` for the 2-bit codes ``[N, K/4]`` of ``w`` (uint8; float32 x ``[M, K]``, out ``[M, N]``)."""
        self.lib.vm_tern_f32(codes.ctypes.data, codes.shape[0], codes.shape[1], x.shape[1], x.ctypes.data, x.shape[0],
                             out.ctypes.data)

    def mm_nn(self, x: np.ndarray, y: np.ndarray, out: np.ndarray, mode: int) -> None:
        """``out = x @ y`` (all C-contiguous float32)."""
        if self.lib.vm_mm_nn(x.ctypes.data, y.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], y.shape[1], mode):
            raise MemoryError("mm_nn: out of memory")


_LOADED: dict[Path, NativeKernel] = {}


def load(path: Path | None = None) -> tuple[NativeKernel | None, str]:
    """``(kernel, "")`` when the library for the current source and machine is built, else ``(None, why)``."""
    try:
        lib = path or library_path()
    except OSError as e:
        return None, f"C source unreadable ({e})"
    if lib in _LOADED:
        return _LOADED[lib], ""
    if not lib.is_file():
        return None, (f"native kernel not built for this source and machine ({lib.name} missing: run `make setup` "
                      "or `python -m bitnet_coreml.executor.native build`)")
    try:
        k = NativeKernel(lib)
    except (OSError, AttributeError) as e:
        return None, f"native kernel {lib.name} does not load ({e})"
    _LOADED[lib] = k
    return k, ""


def main(argv: list[str] | None = None) -> int:
    """``python -m bitnet_coreml.executor.native build [DIR]``: compile the kernel (exit 3 if the compiler fails)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("build", "path"):
        print("usage: python -m bitnet_coreml.executor.native build [DIR] | path", file=sys.stderr)
        return 2
    if args[0] == "path":
        print(library_path())
        return 0
    try:
        path = build(Path(args[1]) if len(args) > 1 else None)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
