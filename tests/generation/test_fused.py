"""The fused decode kernel (``executor/fused.py``) against the interpreter, transformers and numpy.

Oracles: the interpreter's own ``decode`` (numpy, op by op: an independent implementation) run on
its own copy of the same state, step by step; transformers' logits of the tiny checkpoint (torch
fp32, ``logits.npz``); numpy's float32 sum for the kernel's pairwise summation; numpy's float64
products for the attention kernels.

The kernel and the interpreter sum the attention scores in different orders (the kernel's dot
products in SIMD lanes, the interpreter's through BLAS), so results agree to float32 rounding, not
bit for bit. Bounds asserted and what was measured (2026-12-05, AVX-512 machine):

- fp32 packages: logits within 16 float32 steps (``np.spacing``) of the step's largest |logit|, the KV
  cache within 16 float32 steps of its largest |value|. Measured: tiny fp32 over 40 steps 2.5 steps
  (1.5e-7 at |logit| <= 0.65), KV 4 steps (1.2e-7); example LM fp32 over 24 steps 4 steps (1.9e-6).
- fp16 packages: logits within one fp16 step of the step's largest |logit| (a float32 sum in another
  order rounds to the neighbouring fp16 value), the KV cache within one fp16 step of its largest
  |value|. Measured: tiny fp16 exactly one step (4.9e-4) in 5 of 40 steps, KV 0; example LM fp16:
  0 (bit-identical) over 24 steps. On the 200M benchmark package (not a test: 100 MB) 16 steps
  differed by up to 5.2e-2 = 26 fp16 steps (2% of max |logit|): a changed float32 rounding flips
  BitLinear's int8 activation rounding in some later layer; argmax equal in every step.
- greedy tokens: identical under both engines on every package here (argmax at every step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.errors import InputError
from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.executor.chunked import open_executor
from bitnet_coreml.executor.fused import fuse
from bitnet_coreml.generation import GenerationSession
from tests.generation.conftest import TINY
from tests.support.flips import close_except_flips

ORACLE = np.load(TINY / "logits.npz")
IDS = [int(i) for i in ORACLE["input_ids"][0]]
# the fused decode runs on the C kernel here (auto picks it when built: the fixture makes sure it is)
pytestmark = pytest.mark.usefixtures("native_kernel")


class _Numba:
    """The numba kernel's building blocks under the C kernel's method names (``native.NativeKernel``)."""

    @staticmethod
    def pairwise_sum(x: np.ndarray) -> np.float32:
        from bitnet_coreml.executor._vm import pairwise_sum

        return pairwise_sum(x)

    @staticmethod
    def extreme(x: np.ndarray, smallest: bool) -> np.float32:
        from bitnet_coreml.executor._vm import _extreme

        return _extreme(x, smallest)

    @staticmethod
    def mm_nt(x: np.ndarray, y: np.ndarray, out: np.ndarray, mode: int) -> None:
        from bitnet_coreml.executor._vm import _mm_nt

        _mm_nt(x, y, out, mode)

    @staticmethod
    def tern_f32(codes: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        from bitnet_coreml.executor._vm import _tern_f32

        _tern_f32(codes, x, out)

    @staticmethod
    def mm_nn(x: np.ndarray, y: np.ndarray, out: np.ndarray, mode: int) -> None:
        from bitnet_coreml.executor._vm import _mm_nn

        _mm_nn(x, y, out, mode)


@pytest.fixture(params=["numba", "native"])
def kern(request: pytest.FixtureRequest, native_kernel: Any) -> Any:
    return _Numba() if request.param == "numba" else native_kernel


def _steps(pkg: Path, n: int, *, fp32: bool = False) -> tuple[list[np.ndarray], list[np.ndarray], float, float]:
    """Greedy decode ``n`` steps after one prefill, interpreter and fused kernel each on its own state."""
    dec = open_executor(pkg, fp32=fp32, function_name="decode")
    pre = dec.function("prefill")
    fused, why = fuse(dec)
    assert fused is not None, why
    p = pre.input_specs["input_ids"].shape[1]
    states = [dec.make_state(), dec.make_state()]
    prompt = (IDS * 4)[:p + 1]  # the tiny checkpoint's ids: inside every vocabulary here
    ids = np.array([prompt[:p]], np.int32)
    for s in states:
        pre.predict({"input_ids": ids, "position": np.array([0], np.int32)}, s)
    ref, got = [], []
    tok = prompt[p]
    for i in range(n):
        inputs = {"input_ids": np.array([[tok]], np.int32), "position": np.array([p + i], np.int32)}
        ref.append(dec.predict(inputs, states[0])["logits"].reshape(-1))
        got.append(fused.predict(inputs, states[1])["logits"].reshape(-1))
        tok = int(np.argmax(ref[-1]))
    kv = max(float(np.max(np.abs(states[0]._values[k] - states[1]._values[k]))) for k in states[0].names)
    kv_max = max(float(np.max(np.abs(states[0]._values[k]))) for k in states[0].names)
    return ref, got, kv, kv_max


def _assert_close(ref: list[np.ndarray], got: list[np.ndarray], kv: float, kv_max: float, prec: str) -> None:
    """Argmax equal at every step; logits and KV cache within the module docstring's rounding bounds."""
    step = (lambda v: float(np.spacing(np.float16(v)))) if prec == "fp16" else \
        (lambda v: 16 * float(np.spacing(np.float32(v))))
    for r, g in zip(ref, got, strict=True):
        assert int(np.argmax(g)) == int(np.argmax(r))
        np.testing.assert_allclose(g, r, rtol=0, atol=step(np.max(np.abs(r))))
    assert kv <= step(kv_max)


@pytest.mark.parametrize("prec", ["fp16", "fp32"])
def test_fused_decode_follows_the_interpreter_on_the_tiny_packages(tiny_packages: dict[str, Path], prec: str) -> None:
    _assert_close(*_steps(tiny_packages[prec], 40), prec)


def test_fused_decode_follows_the_interpreter_on_the_example_lm(lm_fp16: Path) -> None:
    _assert_close(*_steps(lm_fp16, 24), "fp16")


def test_fused_decode_reproduces_transformers(tiny_packages: dict[str, Path], tiny_ort_logits: np.ndarray,
                                              record_property: Any) -> None:
    """Within 2e-4 of torch, or of ONNX Runtime where an activation rounding flips (tests/support/flips.py)."""
    flagged = 0
    for engine in ("stored", "fused"):  # the kernel on the package's stored table, and translated at load
        s = GenerationSession(tiny_packages["fp32"], units=["reference"], decode_engine=engine)
        rows = [s.prefill(IDS[:8])] + [s.feed(t) for t in IDS[8:]]
        assert s._engine is not None and s._engine.decode_engine == engine
        flagged = max(flagged, close_except_flips(np.stack(rows), ORACLE["logits"][0][7:], 2e-4,
                                                  lambda r: tiny_ort_logits[7:][r], max_flagged=len(IDS) // 4))
    record_property("flagged_positions", flagged)


@pytest.mark.parametrize("prec", ["fp16", "fp32"])
def test_greedy_tokens_equal_with_either_engine(tiny_packages: dict[str, Path], prec: str) -> None:
    runs = {}
    for engine in ("auto", "fused", "interpreter"):
        s = GenerationSession(tiny_packages[prec], units=["reference"], decode_engine=engine)
        runs[engine] = list(s.generate(IDS[:5], max_new_tokens=40))
        assert s.stats.decode_engine == ("stored" if engine == "auto" else engine)
    assert runs["auto"] == runs["fused"] == runs["interpreter"]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 127, 128, 129, 255, 256, 1000, 1024, 2816, 5003])
def test_kernel_sum_is_numpys_pairwise_sum(n: int, kern: Any) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * np.float32(1e3)
    assert np.float32(kern.pairwise_sum(x)).view(np.uint32) == np.float32(np.sum(x)).view(np.uint32)


def test_an_op_it_does_not_translate_keeps_the_interpreter(monkeypatch: pytest.MonkeyPatch,
                                                           tiny_packages: dict[str, Path]) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp32)])
    def prog(x):  # type: ignore[no-untyped-def]
        return mb.sin(x=x)

    fused, why = fuse(ReferenceExecutor(prog))
    assert fused is None and why is not None and "sin" in why

    import bitnet_coreml.executor.fused as fused_mod
    import bitnet_coreml.executor.fused_store as store_mod

    monkeypatch.setattr(fused_mod, "fuse", lambda ex: (None, "op 'x': sin is not fused"))
    monkeypatch.setattr(store_mod, "open_table", lambda pkg: None)  # as a package without a stored table
    s = GenerationSession(tiny_packages["fp16"], units=["reference"])
    list(s.generate(IDS[:5], max_new_tokens=2))
    assert s.stats.decode_engine == "interpreter" and "sin is not fused" in (s.stats.decode_note or "")
    with pytest.raises(InputError, match="fused decode path cannot run"):
        GenerationSession(tiny_packages["fp16"], units=["reference"], decode_engine="fused")


def test_cli_says_which_engine_ran(tiny_packages: dict[str, Path]) -> None:
    ids = ",".join(str(i) for i in IDS[:5])
    for engine, want in (("auto", "stored"), ("fused", "fused"), ("interpreter", "interpreter")):
        res = CliRunner().invoke(main, ["generate", str(tiny_packages["fp16"]), "--ids", ids, "-n", "4",
                                        "--units", "reference", "--engine", engine, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["decode_engine"] == want
    res = CliRunner().invoke(main, ["generate", str(tiny_packages["fp16"]), "--ids", ids, "-n", "2",
                                    "--units", "reference", "--engine", "turbo"])
    assert res.exit_code == 2


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1024, 2816])
def test_kernel_extremes_are_numpys(n: int, kern: Any) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert kern.extreme(x, False) == np.max(x) and kern.extreme(x, True) == np.min(x)
    x[n // 2] = np.nan
    assert np.isnan(kern.extreme(x, False)) and np.isnan(kern.extreme(x, True))


@pytest.mark.parametrize(("m", "k", "n"), [(4, 64, 512), (4, 64, 37), (3, 17, 5), (1, 128, 9)])
def test_attention_kernels_are_float32_products(m: int, k: int, n: int, kern: Any) -> None:
    """Scores ``x @ y.T`` and context ``p @ v`` against float64 numpy, within the float32 error bound
    of a k-term dot product in any order (k * 2**-24 * sum|x_j y_j|, Higham's gamma_k)."""
    from bitnet_coreml.executor._layout import R_NONE

    rng = np.random.default_rng(k * n + m)
    x, y = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    p, v = rng.random((m, n)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    for a, b, nt in ((x, y, True), (p, v.T, False)):
        out = np.full((m, b.shape[0]), np.nan, np.float32)
        if nt:
            kern.mm_nt(a, b, out, R_NONE)
        else:
            kern.mm_nn(a, np.ascontiguousarray(v), out, R_NONE)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        bound = a.shape[1] * 2.0**-24 * (np.abs(a64) @ np.abs(b64).T)
        assert np.all(np.abs(out - a64 @ b64.T) <= bound)


@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 33), (1, 256, 70), (8, 192, 17), (2, 100, 9), (1, 4, 3)])
def test_weight_only_ternary_matvec_is_a_float32_product(m: int, k: int, n: int, kern: Any) -> None:
    """Float activations times the 2-bit codes (weight-only linears) against float64 numpy on the
    weights decoded by hand, within the float32 error bound of a k-term dot product in any order
    (k * 2**-24 * sum|x_j w_j|, Higham's gamma_k; the products are exact, only the sums round)."""
    rng = np.random.default_rng(m * k + n)
    w = rng.integers(-1, 2, size=(n, k))
    kb = (k + 3) // 4
    fields = np.zeros((n, 4 * kb), np.uint8)
    fields[:, :k] = w + 1
    codes = (fields[:, 0::4] | fields[:, 1::4] << 2 | fields[:, 2::4] << 4 | fields[:, 3::4] << 6).astype(np.uint8)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    kern.tern_f32(np.ascontiguousarray(codes), x, out)
    x64 = x.astype(np.float64)
    bound = k * 2.0**-24 * (np.abs(x64) @ np.abs(w.T))
    assert np.all(np.abs(out - x64 @ w.T) <= bound)
