"""``lower/state.py``'s weight passes on hand-built MIL programs: equal large constants within a
function merge (``merge_equal_weights``), equal constants across functions share one ``weight_id``."""

from __future__ import annotations

import numpy as np

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.lower.state import merge_equal_weights, share_weights


def _function(a: np.ndarray, b: np.ndarray, c: np.ndarray):  # type: ignore[no-untyped-def]
    coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types

    n = a.shape[0]
    with Function({"x": mb.placeholder(shape=(1, n), dtype=types.fp32)}) as f:
        x = f.inputs["x"]
        ys = [mb.matmul(x=x, y=mb.const(val=w, name=f"w{i}"), name=f"y{i}") for i, w in enumerate((a, b, c))]
        # every op named: an unnamed one advances coremltools' process-wide name counter, which the
        # names of ops its passes add in later conversions (guard_negative_gather_indices) depend on
        f.set_outputs([mb.add(x=mb.add(x=ys[0], y=ys[1], name="sum01"), y=ys[2], name="out")])
    return f


def test_equal_large_constants_merge_within_a_function() -> None:
    from coremltools.converters.mil.mil import Program

    rng = np.random.default_rng(0)
    a = rng.standard_normal((320, 320)).astype(np.float32)  # 102400 elements: above the 100,000 threshold
    other = a.copy()
    other[-1, -1] += 1  # same leading bytes, different value: must stay
    prog = Program()
    prog.add_function("main", _function(a, a.copy(), other))
    assert merge_equal_weights(prog) == 1
    prog.validate(check_essential_scope=False)
    ops = prog.functions["main"].operations
    consts = {op.name: op.outputs[0] for op in ops if op.op_type == "const" and np.size(op.outputs[0].val) > 1}
    assert set(consts) == {"w0", "w2"}
    matmuls = [op for op in ops if op.op_type == "matmul"]
    assert [m.y.name for m in matmuls] == ["w0", "w0", "w2"]
    # below the threshold nothing is merged (coremltools' const_deduplication handles those)
    small = Program()
    s = a[:128]
    small.add_function("main", _function(s.T.copy(), s.T.copy(), s.T.copy()))
    assert merge_equal_weights(small) == 0


def test_constants_equal_across_functions_share_a_weight_id() -> None:
    from coremltools.converters.mil.mil import Program

    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    prog = Program()
    prog.add_function("f", _function(a, b, b))
    prog.add_function("g", _function(a.copy(), b.copy(), a * 2))
    assert share_weights(prog) == 2  # a (f, g) and b (f twice, g)
    ids = {(fn, op.name): op.weight_id for fn, func in prog.functions.items() for op in func.operations
           if op.op_type == "const" and np.size(op.outputs[0].val) > 1}
    assert ids[("f", "w0")] == ids[("g", "w0")] is not None
    assert ids[("f", "w1")] == ids[("f", "w2")] == ids[("g", "w1")] is not None
    assert ids[("f", "w0")] != ids[("f", "w1")] and ids[("g", "w2")] is None
