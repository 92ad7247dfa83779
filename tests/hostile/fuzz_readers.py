"""Property-based fuzzing of the ONNX, safetensors and config readers with mutated bytes of bundled files.

Run as ``python -m tests.hostile.fuzz_readers PROFILE`` (``test_fuzz.py`` does, in a subprocess): after
the imports, the address space is capped at what the process already maps plus 1 GiB, so an example
that allocates more fails with ``MemoryError``; each example has a 20 s timer. The property: reading a
mutated file either succeeds or raises one of the project's own errors (``BitnetCoremlError``), never
anything else (which the CLI would report as an internal error), never hangs, never takes > 1 GiB.
"""

from __future__ import annotations

import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
ONNX = REPO / "models" / "bitnet_external.onnx"  # graph only (81 kB); weights in the .data file beside it
CKPT = REPO / "models" / "hf" / "bitnet-tiny-packed"
EXTRA_BYTES = 1 << 30
EXAMPLE_TIMEOUT_S = 20

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("slow", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw: Any, data: bytes, hot: int) -> bytes:
    """``data`` with 1-8 edits: byte sets, bit flips, varint-sized runs, insertions, deletions, a truncation.

    Half the edits land in the first ``hot`` bytes (headers, graph structure), where they matter most.
    """
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        if not b:
            break
        limit = min(hot, len(b)) if draw(st.booleans()) else len(b)
        pos = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["set", "flip", "run", "insert", "delete", "truncate"]))
        if kind == "set":
            b[pos] = draw(st.integers(0, 255))
        elif kind == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "run":  # e.g. a length or varint turned huge
            b[pos:pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                   b"\x80\x80\x80\x80"]))
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
        else:
            del b[pos:]
    return bytes(b)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout(f"an example ran longer than {EXAMPLE_TIMEOUT_S} s")


def _run(fn: Any) -> None:
    """Call ``fn``; the project's own errors are an allowed outcome, anything else propagates."""
    from bitnet_coreml.errors import BitnetCoremlError

    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_TIMEOUT_S)
    try:
        fn()
    except BitnetCoremlError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def fuzz_onnx(work: Path) -> None:
    from bitnet_coreml.frontend import load

    folder = work / "onnx"
    folder.mkdir()
    shutil.copyfile(ONNX.with_name(ONNX.name + ".data"), folder / (ONNX.name + ".data"))
    original = ONNX.read_bytes()

    @given(mutated(original, hot=4096))
    def prop(data: bytes) -> None:
        p = folder / ONNX.name
        p.write_bytes(data)

        def read() -> None:
            m = load(p)
            for v in m.graph.initializers.values():  # external data: offsets and lengths are used here
                if v.const_value is not None:
                    v.const_value.numpy()
        _run(read)

    prop()


def fuzz_checkpoint(work: Path, which: str) -> None:
    from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint

    name = "model.safetensors" if which == "safetensors" else "config.json"
    original = (CKPT / name).read_bytes()

    @given(mutated(original, hot=2048))
    def prop(data: bytes) -> None:
        folder = work / f"ckpt-{which}"
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(CKPT, folder)
        (folder / name).write_bytes(data)

        def read() -> None:
            m = load_checkpoint(folder, seq_len=8)
            for v in m.graph.initializers.values():  # lazy tensors: read what the header promised
                if v.const_value is not None:
                    v.const_value.numpy()
        _run(read)

    prop()


def _cap_address_space() -> None:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    now = pages * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (now + EXTRA_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> None:
    profile = sys.argv[1] if len(sys.argv) > 1 else "default"
    settings.load_profile(profile)
    import onnx_ir  # noqa: F401
    import onnxscript  # noqa: F401

    import bitnet_coreml.frontend.hf_checkpoint  # noqa: F401  (imports before the cap: they are not the readers' memory)

    signal.signal(signal.SIGALRM, _alarm)
    _cap_address_space()
    with tempfile.TemporaryDirectory(prefix="bitnet-fuzz-") as tmp:
        work = Path(tmp)
        fuzz_onnx(work)
        fuzz_checkpoint(work, "safetensors")
        fuzz_checkpoint(work, "config")
    print("fuzz ok:", profile)


if __name__ == "__main__":
    main()
