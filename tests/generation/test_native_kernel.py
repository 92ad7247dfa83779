"""The fused decode's C kernel (``executor/_vm.c``, built and loaded by ``executor/native.py``).

Oracles: the numba kernel (``executor/_vm.py``, an independent implementation of the same instruction
table, LLVM-compiled) run on its own copy of the same state: the C kernel must give the same bits,
logits and KV cache, at every step; the interpreter / transformers / numpy comparisons of
``test_fused.py`` run on the C kernel too. Building: the library's name carries the hash of its
source, a stale build is replaced, a failing compiler is one line and exit 3; a missing library
leaves the numba kernel running, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.executor import native
from bitnet_coreml.executor.chunked import open_executor
from bitnet_coreml.executor.fused import fuse
from bitnet_coreml.generation import GenerationSession
from tests.generation.conftest import TINY

IDS = [int(i) for i in np.load(TINY / "logits.npz")["input_ids"][0]]


def _bits(a: np.ndarray) -> np.ndarray:
    """The float32 bits of ``a``'s values (an fp16 KV state, as the C kernel holds one, widened: exact)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _kernels(pkg: Path) -> tuple[Any, Any, list[Any]]:
    """The package's decode executor, its prefill function and the decode fused on (numba, C)."""
    dec = open_executor(pkg, function_name="decode")
    fns = []
    for k in ("numba", "native"):
        f, why = fuse(dec, k)
        assert f is not None and f.kernel == k, why
        fns.append(f)
    return dec, dec.function("prefill"), fns


def _both(pkg: Path, n: int) -> tuple[int, int]:
    """Greedy decode ``n`` steps after one prefill with each kernel on its own state; returns the
    (steps whose logits differ in any bit, KV caches that differ in any bit)."""
    dec, pre, fns = _kernels(pkg)
    p = pre.input_specs["input_ids"].shape[1]
    states = [dec.make_state(), dec.make_state()]
    prompt = (IDS * 4)[:p + 1]
    for s in states:
        pre.predict({"input_ids": np.array([prompt[:p]], np.int32), "position": np.array([0], np.int32)}, s)
    tok, differ = prompt[p], 0
    for i in range(n):
        inputs = {"input_ids": np.array([[tok]], np.int32), "position": np.array([p + i], np.int32)}
        a, b = (f.predict(inputs, s)["logits"] for f, s in zip(fns, states, strict=True))
        differ += not np.array_equal(_bits(a), _bits(b))
        tok = int(np.argmax(a.reshape(-1)))
    kv = sum(not np.array_equal(_bits(states[0]._values[k]), _bits(states[1]._values[k])) for k in states[0].names)
    return differ, kv


@pytest.mark.parametrize("prec", ["fp16", "fp32"])
def test_c_kernel_equals_the_numba_kernel_bit_for_bit(tiny_packages: dict[str, Path], prec: str,
                                                      native_kernel: Any) -> None:
    assert _both(tiny_packages[prec], 40) == (0, 0)


def test_c_kernel_equals_the_numba_kernel_on_the_example_lm(lm_fp16: Path, native_kernel: Any) -> None:
    assert _both(lm_fp16, 24) == (0, 0)


def test_the_fp16_cache_is_shared_with_the_interpreter(tiny_packages: dict[str, Path], native_kernel: Any) -> None:
    """The C kernel holds an fp16 package's KV cache in fp16; an interpreter prefill between decode calls
    reads (widened) and replaces it, and the next decode call takes it back: every logit and the final
    cache equal those of the numba kernel, whose cache stays float32."""
    dec = open_executor(tiny_packages["fp16"], function_name="decode")
    pre = dec.function("prefill")
    p = pre.input_specs["input_ids"].shape[1]
    runs = []
    for k in ("numba", "native"):
        f, why = fuse(dec, k)
        assert f is not None, why
        assert f.state_dtype == (np.float16 if k == "native" else np.float32)
        s, logits, pos = dec.make_state(), [], 0
        for chunk in range(2):  # prefill, 3 decode calls, prefill again (the interpreter), 3 decode calls
            ids = [IDS[(chunk * 7 + j) % len(IDS)] for j in range(p)]
            logits.append(pre.predict({"input_ids": np.array([ids], np.int32),
                                       "position": np.array([pos], np.int32)}, s)["logits"])
            pos += p
            for _ in range(3):
                tok = int(np.argmax(np.asarray(logits[-1]).reshape(-1, logits[-1].shape[-1])[-1]))
                logits.append(f.predict({"input_ids": np.array([[tok]], np.int32),
                                         "position": np.array([pos], np.int32)}, s)["logits"])
                pos += 1
        assert s._values[s.names[0]].dtype == f.state_dtype
        runs.append((logits, {n: s.read_state(n) for n in s.names}))
    (la, ka), (lb, kb) = runs
    assert all(np.array_equal(_bits(a), _bits(b)) for a, b in zip(la, lb, strict=True))
    assert all(np.array_equal(_bits(ka[n]), _bits(kb[n])) for n in ka)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="the portable build is tested on x86-64 Linux")
def test_the_portable_c_paths_equal_the_numba_kernel(tiny_packages: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Built for baseline x86-64 (no AVX-512, VNNI, F16C or FMA): the C fallbacks of every vector path
    (lane-emulated dot products, bit-level fp16 rounding and widening, the scalar integer matmul, the
    scalar float ternary matvec) give the same bits too."""
    monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64" if f == "-march=native" else f for f in native.FLAGS))
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path))
    native.build(tmp_path)
    kernel, why = native.load()
    assert kernel is not None and not kernel.has_vnni, why
    assert _both(tiny_packages["fp16"], 12) == (0, 0)
    assert all(_tern_f32_same(kernel, *mkn) for mkn in ((1, 2560, 40), (8, 192, 17), (2, 100, 9)))


def test_build_names_the_library_by_its_source_and_replaces_stale_ones(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "_vm_native-0123456789abcdef.so"
    stale.write_bytes(b"an older build")
    path = native.build(tmp_path)
    assert path.name == f"_vm_native-{native.build_hash()}.so" and path.is_file()
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
    mtime = path.stat().st_mtime_ns
    assert native.build(tmp_path) == path and path.stat().st_mtime_ns == mtime  # current: not rebuilt
    kernel, why = native.load(path)
    assert kernel is not None, why
    x = np.arange(1000, dtype=np.float32)
    assert kernel.pairwise_sum(x) == np.sum(x)
    edited = tmp_path / "_vm.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.library_path(tmp_path) != path  # another source: another name, never the old library


def test_a_failing_compiler_is_one_line_and_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CC", "false")
    assert native.main(["build", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: compiling _vm.c failed") and not list(tmp_path.glob("*.so"))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native.main(["build", str(tmp_path)]) == 3
    assert "no C compiler" in capsys.readouterr().err


def test_without_the_library_the_numba_kernel_runs_and_says_why(tiny_packages: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 native_kernel: Any) -> None:
    runs = {}
    for case in ("native", "missing"):
        if case == "missing":
            monkeypatch.setenv(native.DIR_ENV, str(tmp_path))  # an empty folder: no library for this source
        s = GenerationSession(tiny_packages["fp16"], units=["reference"])
        runs[case] = list(s.generate(IDS[:5], max_new_tokens=8))
        assert s.stats.decode_engine in ("fused", "stored")  # translated at load, or the package's stored table
        note = s.stats.decode_note or ""
        if case == "native":
            assert "native C kernel" in note and "numba" not in note
        else:
            assert "numba kernel" in note and "make setup" in note
    assert runs["native"] == runs["missing"]


def test_the_c_kernel_path_loads_no_numba(tiny_packages: dict[str, Path], native_kernel: Any) -> None:
    """Loading the package's stored decode function and running decode calls on the C kernel keeps numba
    and llvmlite out of the process; the logits are those of the numba kernel in this process."""
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from bitnet_coreml.executor.fused_store import open_table\n"
        "f, states = open_table(sys.argv[1]).load()\n"
        "st = type('S', (), {})()\n"
        "st._values = {n: np.zeros(shape, np.float32) for n, shape in states}\n"
        "out = [f.predict({'input_ids': np.array([[t]], np.int32), 'position': np.array([i], np.int32)}, st)"
        "['logits'].astype(np.float32).reshape(-1).tolist() for i, t in enumerate(json.loads(sys.argv[2]))]\n"
        "print(json.dumps({'kernel': f.kernel, 'logits': out, 'mods': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('numba', 'llvmlite'))}))\n"
    )
    ids = IDS[:6]
    res = subprocess.run([sys.executable, "-c", code, str(tiny_packages["fp16"]), json.dumps(ids)],
                         capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["kernel"] == "native" and doc["mods"] == []
    from bitnet_coreml.executor.fused_store import open_table

    table = open_table(tiny_packages["fp16"])
    assert table is not None
    f, states = table.load()
    f2 = type(f)(f._p, f._out_dtypes, fp32=f._fp32, ops=f.ops, kernel_name="numba")
    st = type("S", (), {})()
    st._values = {n: np.zeros(shape, np.float32) for n, shape in states}
    for i, t in enumerate(ids):
        want = f2.predict({"input_ids": np.array([[t]], np.int32), "position": np.array([i], np.int32)}, st)
        assert np.array_equal(_bits(want["logits"].reshape(-1)), _bits(np.array(doc["logits"][i], np.float32)))


def test_the_kernel_can_be_chosen_by_environment(monkeypatch: pytest.MonkeyPatch, native_kernel: Any) -> None:
    from bitnet_coreml.errors import InputError
    from bitnet_coreml.executor.fused import KERNEL_ENV, kernel

    for name in ("numba", "native"):
        monkeypatch.setenv(KERNEL_ENV, name)
        assert kernel()[1] == name
    monkeypatch.setenv(KERNEL_ENV, "turbo")
    with pytest.raises(InputError, match="BITNET_COREML_KERNEL='turbo': allowed auto, native, numba"):
        kernel()


def test_an_id_outside_the_vocabulary_is_refused_at_the_same_instruction(tiny_packages: dict[str, Path],
                                                                         native_kernel: Any) -> None:
    from bitnet_coreml.errors import InputError

    dec = open_executor(tiny_packages["fp16"], function_name="decode")
    messages = []
    for k in ("numba", "native"):
        f, why = fuse(dec, k)
        assert f is not None, why
        with pytest.raises(InputError, match="gather index out of range at instruction") as e:
            f.predict({"input_ids": np.array([[100_000]], np.int32), "position": np.array([3], np.int32)},
                      dec.make_state())
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_an_fp16_buffer_where_the_kernel_reads_float32_is_an_error(native_kernel: Any) -> None:
    """The C kernel refuses (rather than misreads) an fp16 buffer anywhere but the two places it handles."""
    from bitnet_coreml.executor import _layout as L

    row = np.zeros((1, L.WIDTH), np.int64)
    row[0, L.OP], row[0, L.D:L.D + 4] = L.ADD, (1, 1, 1, 4)
    row[0, L.A], row[0, L.B] = 1, 0  # A reads buffer 1, which holds fp16 bits
    row[0, L.OUT + 5] = row[0, L.A + 5] = row[0, L.B + 5] = 1
    arena, half = np.zeros(8, np.float32), np.zeros(8, np.float16)  # 16 bytes: 4 float32 when read as kind 0
    bufs = np.array([[arena.ctypes.data, arena.size, 0], [half.ctypes.data, half.size, 1]], np.int64)
    with pytest.raises(RuntimeError, match="instruction 0 meets an fp16 buffer"):
        native_kernel.run(row, bufs, np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int64))
    bufs[1, 2] = 0  # the same table on float32 buffers runs
    assert native_kernel.run(row, bufs, np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int64)) == (0, -1)


def test_softmax_exp_is_the_c_librarys_expf(native_kernel: Any) -> None:
    """``exp(x - m)`` of the C kernel's softmax (8 at a time on glibc) against the C library's own
    ``expf`` (what the numba kernel calls), bit for bit, over the whole range and its edges."""
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.argtypes, libm.expf.restype = [ctypes.c_float], ctypes.c_float
    rng = np.random.default_rng(15)
    x = np.concatenate([rng.uniform(-110, 90, 200_000), rng.uniform(-1, 1, 50_000) * 10.0 ** rng.uniform(-30, 2, 50_000),
                        [0.0, -0.0, -103.9, -103.97, -103.98, -104.0, -104.1, 88.0, 88.7, 88.8, -np.inf, np.inf, np.nan,
                         -1e30, 1e30]]).astype(np.float32)
    for m in (0.0, 3.5, -7.25):
        got = native_kernel.exp_shifted(x, m)
        d = x - np.float32(m)
        want = np.array([0.0 if v < -104.0 else libm.expf(float(v)) for v in d], np.float32)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize(("m", "k", "n"), [(4, 64, 512), (3, 128, 37), (2, 64, 15), (1, 72, 20), (4, 192, 33)])
def test_attention_products_equal_the_numba_kernels_bit_for_bit(m: int, k: int, n: int, native_kernel: Any) -> None:
    """The scores (16 keys at a time on AVX-512 when k is a multiple of 64) and the context, against the
    numba kernel's ``_mm_nt`` / ``_mm_nn`` on the same float32 data: the same bits, -0.0 included."""
    from bitnet_coreml.executor._layout import R_F16, R_NONE
    from bitnet_coreml.executor._vm import _mm_nn, _mm_nt

    rng = np.random.default_rng(m * k + n)
    x, y = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    y[:, : k // 2] = 0.0  # signed zeros through the sums
    x[0, :] = -0.0
    p, v = rng.random((m, n)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    for mode in (R_NONE, R_F16):
        a, b = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
        native_kernel.mm_nt(x, y, a, mode)
        _mm_nt(x, y, b, mode)
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        c, d = np.empty((m, k), np.float32), np.empty((m, k), np.float32)
        native_kernel.mm_nn(p, v, c, mode)
        _mm_nn(p, v, d, mode)
        assert np.array_equal(c.view(np.uint32), d.view(np.uint32))


def _tern_f32_same(kernel: Any, m: int, k: int, n: int) -> bool:
    """Random codes times float activations (-0.0, inf, NaN among them) on ``kernel`` and on the numba
    kernel's ``_tern_f32``: True when the outputs have the same bits, NaN for NaN (which operand's NaN
    an add passes on is the compiler's choice: the baseline x86-64 build gives +NaN where numba gives
    the -NaN of inf * 0, so a NaN's sign and payload are not compared)."""
    from bitnet_coreml.executor._vm import _tern_f32

    rng = np.random.default_rng(m * k + n)
    codes = rng.integers(0, 3, size=(n, (k + 3) // 4 * 4)).astype(np.uint8)
    codes = (codes[:, 0::4] | codes[:, 1::4] << 2 | codes[:, 2::4] << 4 | codes[:, 3::4] << 6).astype(np.uint8)
    x = rng.standard_normal((m, k)).astype(np.float32) * np.float32(1e3)
    x[0, : k // 2] = -0.0
    if m > 1:
        x[1, 0], x[1, -1] = np.inf, np.nan
    a, b = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
    kernel.tern_f32(np.ascontiguousarray(codes), x, a)
    _tern_f32(np.ascontiguousarray(codes), x, b)
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 33), (1, 2560, 40), (8, 192, 17), (2, 100, 9), (3, 4, 5)])
def test_weight_only_ternary_matvec_equals_the_numba_kernels_bit_for_bit(m: int, k: int, n: int,
                                                                         native_kernel: Any) -> None:
    """Float activations times the 2-bit codes (64 lanes, a fixed tree, the tail in order) against the
    numba kernel's ``_tern_f32`` on the same data: the same bits, -0.0 and inf included, NaN for NaN."""
    assert _tern_f32_same(native_kernel, m, k, n)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_llama_weight_only_decode_is_torchs_greedy_and_equal_on_both_kernels(converted: Any, precision: str,
                                                                             native_kernel: Any) -> None:
    """A llama GGUF (weight-only ternary linears, float activations): the fused decode on each kernel
    gives torch's greedy tokens (``models/gguf/llama-logits.npz``) and the same logits bits and KV cache."""
    from tests.frontend.test_gguf_llama import FILES, ORACLE

    if not ORACLE.is_file():
        pytest.skip("models/gguf llama fixtures missing (make models)")
    with np.load(ORACLE) as z:
        prompt, greedy = z["prompt"].astype(np.int32), z["greedy_tokens"].tolist()
    p = prompt.shape[1]
    pkg = converted.get(FILES["TQ2_0"], stateful=True, context=64, prefill=p, check=False, precision=precision)
    dec, pre, fns = _kernels(pkg)
    states = [dec.make_state(), dec.make_state()]
    last = [pre.predict({"input_ids": prompt, "position": np.array([0], np.int32)}, s)["logits"] for s in states]
    toks: list[list[int]] = [[], []]
    for i in range(len(greedy)):
        outs = []
        for r in range(2):
            toks[r].append(int(np.argmax(np.asarray(last[r]).reshape(-1, last[r].shape[-1])[-1])))
            inputs = {"input_ids": np.array([[toks[r][-1]]], np.int32), "position": np.array([p + i], np.int32)}
            outs.append(fns[r].predict(inputs, states[r])["logits"])
        assert np.array_equal(_bits(outs[0]), _bits(outs[1])), f"step {i}"
        last = outs
    assert toks[0] == greedy and toks[1] == greedy
    assert all(np.array_equal(_bits(states[0]._values[k]), _bits(states[1]._values[k])) for k in states[0].names)
