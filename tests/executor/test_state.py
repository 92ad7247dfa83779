"""A KV-cache style stateful program (read_state / slice_update / coreml_update_state) over several calls vs numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.executor import ReferenceExecutor, StateError
from tests.executor._helpers import MB, TYPES, ct, rand

mb = MB
types = TYPES
H, S, D, E = 2, 8, 4, 8  # heads, cache length, head dim, model dim


def _weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rand((H * D, E), seed=1, lo=-0.5, hi=0.5), rand((H * D, E), seed=2, lo=-0.5, hi=0.5), \
        rand((H * D, E), seed=3, lo=-0.5, hi=0.5)


def _program():  # type: ignore[no-untyped-def]
    wq, wk, wv = _weights()

    @mb.program(
        input_specs=[
            mb.TensorSpec(shape=(1, 1, E), dtype=types.fp16),
            mb.TensorSpec(shape=(1,), dtype=types.int32),
            mb.StateTensorSpec(shape=(1, H, S, D), dtype=types.fp16),
            mb.StateTensorSpec(shape=(1, H, S, D), dtype=types.fp16),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(x, pos, k_cache, v_cache):  # type: ignore[no-untyped-def]
        def heads(w):  # type: ignore[no-untyped-def]
            y = mb.linear(x=x, weight=w.astype(np.float16))  # (1, 1, H*D)
            return mb.transpose(x=mb.reshape(x=y, shape=[1, 1, H, D]), perm=[0, 2, 1, 3])  # (1, H, 1, D)

        q, k, v = heads(wq), heads(wk), heads(wv)
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, zero, pos, zero], axis=0)
        end = mb.concat(values=[np.array([1], np.int32), np.array([H], np.int32), mb.add(x=pos, y=1),
                                np.array([D], np.int32)], axis=0)
        caches = []
        for cache, new in ((k_cache, k), (v_cache, v)):
            full = mb.slice_update(x=mb.read_state(input=cache), update=new, begin=begin, end=end)
            mb.coreml_update_state(state=cache, value=full)
            caches.append(full)
        # attend to positions <= pos
        mask = mb.less_equal(x=np.arange(S, dtype=np.int32).reshape(1, 1, 1, S), y=pos)
        att = mb.scaled_dot_product_attention(query=q, key=caches[0], value=caches[1], attn_mask=mask)
        return mb.reshape(x=mb.transpose(x=att, perm=[0, 2, 1, 3]), shape=[1, 1, H * D], name="out")

    return prog


def _numpy_steps(xs: list[np.ndarray]) -> list[np.ndarray]:
    wq, wk, wv = (w.astype(np.float16).astype(np.float64) for w in _weights())
    kc = np.zeros((H, S, D))
    vc = np.zeros((H, S, D))
    outs = []
    for pos, x in enumerate(xs):
        xd = x.astype(np.float64).reshape(E)
        q, k, v = ((w @ xd).reshape(H, D) for w in (wq, wk, wv))
        kc[:, pos] = k
        vc[:, pos] = v
        s = np.einsum("hd,hsd->hs", q, kc[:, : pos + 1]) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append(np.einsum("hs,hsd->hd", p, vc[:, : pos + 1]).reshape(1, 1, H * D))
    return outs


@pytest.mark.parametrize("source", ["program", "package"])
def test_kv_cache_over_several_calls(source: str, tmp_path: Path) -> None:
    prog = _program()
    if source == "package":
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
        path = tmp_path / "kv.mlpackage"
        model.save(str(path))
        ex = ReferenceExecutor(path)
    else:
        ex = ReferenceExecutor(prog)
    assert set(ex.state_specs) == {"k_cache", "v_cache"}
    state = ex.make_state()
    xs = [rand((1, 1, E), np.float16, seed=10 + i) for i in range(5)]
    refs = _numpy_steps(xs)
    for pos, (x, ref) in enumerate(zip(xs, refs, strict=False)):
        (out,) = ex.predict({"x": x, "pos": np.array([pos], np.int32)}, state=state).values()
        np.testing.assert_allclose(out.astype(np.float64), ref, rtol=1e-2, atol=1e-2)
    k = state.read_state("k_cache")
    assert k.dtype == np.float16
    assert np.all(k[:, :, 5:] == 0) and np.any(k[:, :, 4] != 0)


def test_state_required_and_writable() -> None:
    ex = ReferenceExecutor(_program())
    x = rand((1, 1, E), np.float16)
    with pytest.raises(StateError, match="stateful"):
        ex.predict({"x": x, "pos": np.array([0], np.int32)})
    st = ex.make_state()
    # a pre-filled cache is attended to: write position 0 by hand, then predict at position 1
    st.write_state("k_cache", np.ones((1, H, S, D), np.float16))
    st.write_state("v_cache", np.full((1, H, S, D), 3.0, np.float16))
    ex.predict({"x": x, "pos": np.array([1], np.int32)}, state=st)
    v = st.read_state("v_cache")
    assert np.all(v[:, :, 0] == 3.0) and np.all(v[:, :, 2:] == 3.0)
    with pytest.raises(StateError):
        st.read_state("nope")
