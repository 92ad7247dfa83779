"""``convert --stateful``: the package's functions, states and shared weights, run by the executor.

Oracles: ONNX Runtime on the stateless checkpoint graph (a full causal forward over the same tokens:
every position's logits at once) and the executor's own prefill for the continuation check.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitnet_coreml.convert import ConvertOptions, convert
from bitnet_coreml.errors import InputError
from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint
from bitnet_coreml.package.stateful import check_position, function_specs, stateful_info
from bitnet_coreml.passes.ort import ort_session
from tests.support.flips import equal_except_rounding
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "models" / "hf" / "bitnet-tiny-packed"
CONTEXT, PREFILL = 64, 16


@pytest.fixture(scope="module")
def packages(converted: PackageCache) -> dict[str, Path]:
    out = {prec: converted.get(CKPT, stateful=True, context=CONTEXT, prefill=PREFILL, precision=prec)
           for prec in ("fp16", "fp32")}
    out["stateless"] = converted.get(CKPT, seq_len=PREFILL)
    return out


def _ids(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 512, (1, n)).astype(np.int32)


def _run(pkg: Path, ids: np.ndarray, *, prefill_chunks: int = 1) -> np.ndarray:
    """Logits of every token: ``prefill_chunks`` prefill calls of P tokens, then decode one by one."""
    dec = ReferenceExecutor(pkg)
    pre = dec.function("prefill")
    state = dec.make_state()
    rows = []
    for c in range(prefill_chunks):
        chunk = ids[:, c * PREFILL:(c + 1) * PREFILL]
        rows.append(pre.predict({"input_ids": chunk, "position": np.array([c * PREFILL], np.int32)}, state)["logits"][0])
    for t in range(prefill_chunks * PREFILL, ids.shape[1]):
        rows.append(dec.predict({"input_ids": ids[:, t:t + 1], "position": np.array([t], np.int32)}, state)["logits"][0])
    return np.concatenate(rows, 0).astype(np.float64)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_spec_lists_functions_and_states(packages: dict[str, Path]) -> None:
    import coremltools as ct

    spec = ct.models.MLModel(str(packages["fp16"]), skip_model_load=True).get_spec()
    assert spec.specificationVersion >= 9  # iOS18: states and multifunction
    assert spec.description.defaultFunctionName == "decode"
    fns = {f["name"]: f for f in function_specs(spec)}
    assert set(fns) == {"prefill", "decode"}
    assert {i["name"]: (i["shape"], i["dtype"]) for i in fns["prefill"]["inputs"]} == {
        "input_ids": ([1, PREFILL], "int32"), "position": ([1], "int32")}
    assert {i["name"]: i["shape"] for i in fns["decode"]["inputs"]} == {"input_ids": [1, 1], "position": [1]}
    assert fns["decode"]["outputs"][0]["shape"] == [1, 1, 512]
    states = {s["name"]: (s["shape"], s["dtype"]) for s in fns["decode"]["states"]}
    # config: 2 layers, 2 kv heads, head_dim 16
    assert states == {f"{k}_cache_{i}": ([1, 2, CONTEXT, 16], "float16") for i in range(2) for k in "kv"}
    info = stateful_info(packages["fp16"])
    assert info is not None and info.context == CONTEXT and info.prefill == PREFILL
    assert info.states == {n: s for n, (s, _) in states.items()}
    assert stateful_info(packages["stateless"]) is None


def test_weights_stored_once(packages: dict[str, Path]) -> None:
    from bitnet_coreml.package.writer import weight_bytes

    plain = weight_bytes(packages["stateless"])
    assert weight_bytes(packages["fp16"]) <= 1.02 * plain


@pytest.mark.parametrize("prec,cos_min", [("fp32", 0.99999), ("fp16", 0.999)])
def test_prefill_then_decode_matches_full_forward(packages: dict[str, Path], prec: str, cos_min: float) -> None:
    n = PREFILL + 32
    ids = _ids(n)
    ref = ort_session(load_checkpoint(CKPT, seq_len=n)).run(None, {"input_ids": ids.astype(np.int64)})[0][0]
    got = _run(packages[prec], ids)
    c = _cos(got, ref.astype(np.float64))
    assert c.min() >= cos_min, c.min()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if prec == "fp32" else 0.97)


def test_continuation_is_exact(packages: dict[str, Path]) -> None:
    # prefill(A) + decode(B...) == prefill(A) + prefill(B) within fp16 rounding of the logits
    ids = _ids(2 * PREFILL, seed=3)
    a = _run(packages["fp16"], ids, prefill_chunks=1)[PREFILL:]
    b = _run(packages["fp16"], ids, prefill_chunks=2)[PREFILL:]
    assert np.abs(a - b).max() <= 4 * 2.0 ** -10 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_positions_up_to_context_minus_one(packages: dict[str, Path]) -> None:
    dec = ReferenceExecutor(packages["fp16"])
    state = dec.make_state()
    out = dec.predict({"input_ids": _ids(1), "position": np.array([CONTEXT - 1], np.int32)}, state)["logits"]
    assert np.isfinite(out).all()
    # the token written at the last slot is the only one visible: same logits as at position 0 ... of
    # a different RoPE angle, so just check the slot was written
    assert np.abs(state.read_state("k_cache_0")[0, :, CONTEXT - 1]).max() > 0
    info = stateful_info(packages["fp16"])
    assert info is not None
    check_position(info, "decode", CONTEXT - 1)
    check_position(info, "prefill", CONTEXT - PREFILL)
    with pytest.raises(InputError, match="context is 64"):
        check_position(info, "decode", CONTEXT)
    with pytest.raises(InputError, match="allowed positions for prefill: 0..48"):
        check_position(info, "prefill", CONTEXT - PREFILL + 1)


def test_functions_share_decoded_weights_and_state(packages: dict[str, Path]) -> None:
    dec = ReferenceExecutor(packages["fp16"])
    pre = ReferenceExecutor(packages["fp16"], function_name="prefill")
    assert pre._shared is dec._shared and dec.function_names == ["decode", "prefill"]

    def big(ex: ReferenceExecutor) -> set[int]:
        return {id(v) for st in ex._block.steps for v in st.consts.values()
                if isinstance(v, np.ndarray) and v.size >= 1024}

    assert big(dec) and big(dec) == big(pre)  # the same arrays, decoded once
    state = pre.make_state()
    pre.predict({"input_ids": _ids(PREFILL), "position": np.array([0], np.int32)}, state)
    written = state.read_state("v_cache_1")
    assert np.abs(written[0, :, :PREFILL]).max() > 0 and not written[0, :, PREFILL:].any()
    dec.predict({"input_ids": _ids(1), "position": np.array([PREFILL], np.int32)}, state)
    after = state.read_state("v_cache_1")
    assert np.array_equal(after[0, :, :PREFILL], written[0, :, :PREFILL]) and after[0, :, PREFILL].any()


def test_onnx_source_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="stateful conversion needs a Hugging Face BitNet checkpoint folder"):
        convert(ROOT / "models" / "bitnet_packed.onnx", tmp_path / "x.mlpackage", ConvertOptions(stateful=True))
    assert not (tmp_path / "x.mlpackage").exists()


def test_bad_sizes_refused() -> None:
    with pytest.raises(InputError, match="--prefill 128 is larger than --context 64"):
        ConvertOptions(stateful=True, context=64, prefill=128)
    with pytest.raises(InputError, match="--prefill-logits"):
        ConvertOptions(stateful=True, prefill_logits="first")


def test_cli_convert_predict_verify(packages: dict[str, Path], tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from bitnet_coreml.cli import main

    out = tmp_path / "c.mlpackage"
    r = CliRunner().invoke(main, ["convert", str(CKPT), "-o", str(out), "--stateful", "--context", "50", "--prefill",
                                  "8", "--prefill-logits", "last", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["stateful"]["context"] == 64  # 50 rounded up to a multiple of 32
    assert d["stateful"]["prefill_logits"] == "last" and any("rounded up to 64" in n for n in d["notes"])
    ids = _ids(20, seed=5)
    npz = tmp_path / "in.npz"
    np.savez(npz, input_ids=ids, position=np.array([4], np.int32))
    r = CliRunner().invoke(main, ["predict", str(out), "-i", str(npz), "-o", str(tmp_path / "o.npz"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["next_position"] == 24
    with np.load(tmp_path / "o.npz") as z:
        # two prefill chunks (last logits only) + 4 decode steps
        assert z["logits"].shape == (1, 6, 512)
    # the same tokens all through decode give, at the chunk ends and the decode steps, the same logits
    r = CliRunner().invoke(main, ["predict", str(out), "-i", str(npz), "-o", str(tmp_path / "d.npz"),
                                  "--function", "decode"])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o.npz") as a, np.load(tmp_path / "d.npz") as b:
        rows = b["logits"][0, [7, 15, 16, 17, 18, 19]]
        assert np.abs(a["logits"][0] - rows).max() <= 4 * 2.0 ** -10 * np.abs(rows).max()
    np.savez(npz, input_ids=_ids(61), position=np.array([4], np.int32))
    r = CliRunner().invoke(main, ["predict", str(out), "-i", str(npz)])
    assert r.exit_code == 2 and "context is 64" in r.output
    r = CliRunner().invoke(main, ["predict", str(packages["stateless"]), "-i", str(npz), "--function", "decode"])
    assert r.exit_code == 2 and "not a stateful package" in r.output
    r = CliRunner().invoke(main, ["verify", str(CKPT), str(packages["fp32"]), "--steps", "8", "--json"])
    assert r.exit_code == 0, r.output
    assert [c["output"] for c in json.loads(r.output)["comparisons"]] == [
        f"logits[prefill {PREFILL}]", "logits[decode x8, worst step]"]
    r = CliRunner().invoke(main, ["convert", str(CKPT), "-o", str(tmp_path / "x.mlpackage"), "--stateful",
                                  "--context", "64", "--prefill", "128"])
    assert r.exit_code == 2 and "--prefill 128 is larger than --context 64" in r.output


def test_describe_package_for_inspect(packages: dict[str, Path]) -> None:
    from bitnet_coreml.package.stateful import describe_package

    d = describe_package(packages["fp16"])
    assert d["spec_version"] >= 9 and d["default_function"] == "decode"
    assert [f["name"] for f in d["functions"]] == ["prefill", "decode"] or \
        sorted(f["name"] for f in d["functions"]) == ["decode", "prefill"]
    assert d["state_bytes"] == 4 * 2 * CONTEXT * 16 * 2  # 4 states [1, 2, 64, 16] fp16
    assert d["stateful"]["context"] == CONTEXT
    plain = describe_package(packages["stateless"])
    assert plain["stateful"] is None and plain["state_bytes"] == 0
    assert [f["name"] for f in plain["functions"]] == ["main"]


def test_stateful_conversion_is_deterministic(packages: dict[str, Path], tmp_path: Path) -> None:
    import coremltools  # noqa: F401  (loads the MIL builder)
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types

    from bitnet_coreml.package.writer import package_files

    # unnamed MIL ops made before (here, or by the user's own coremltools work) advance coremltools'
    # process-wide name counter; the package must not depend on it
    with Function({"x": mb.placeholder(shape=(1, 4), dtype=types.fp32)}) as f:
        f.set_outputs([mb.cast(x=mb.add(x=mb.add(x=f.inputs["x"], y=1.0), y=2.0), dtype="fp16")])
    again = tmp_path / "again.mlpackage"
    convert(CKPT, again, ConvertOptions(stateful=True, context=CONTEXT, prefill=PREFILL, precision="fp16"))
    first = packages["fp16"]
    assert package_files(again) == package_files(first)
    for rel in package_files(first):
        if rel != "Manifest.json":  # coremltools rewrites the manifest whenever it opens a package
            assert (again / rel).read_bytes() == (first / rel).read_bytes(), (rel, package_files(first))


def test_predict_walks_the_unit_chain(packages: dict[str, Path], tmp_path: Path) -> None:
    """Core ML units are skipped off macOS with a note; the reference executor answers the same logits."""
    import json

    from click.testing import CliRunner

    from bitnet_coreml.cli import main

    npz = tmp_path / "in.npz"
    np.savez(npz, input_ids=_ids(20, seed=3))
    outs = {}
    for units in ("reference", "ane,gpu,reference"):
        r = CliRunner().invoke(main, ["predict", str(packages["fp32"]), "-i", str(npz), "-o", str(tmp_path / "o.npz"),
                                      "--units", units, "--json"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        with np.load(tmp_path / "o.npz") as z:
            outs[units] = z["logits"]
        if sys.platform != "darwin":
            assert doc["unit"] == "reference"
            if units != "reference":
                assert [n.split(":")[0] for n in doc["notes"]] == ["ane skipped", "gpu skipped"]
                assert all("macOS" in n for n in doc["notes"])
    if sys.platform != "darwin":
        np.testing.assert_array_equal(outs["reference"], outs["ane,gpu,reference"])
    r = CliRunner().invoke(main, ["predict", str(packages["fp32"]), "-i", str(npz), "--units", "gpu"])
    if sys.platform != "darwin":
        assert r.exit_code == 3 and "no compute unit could run it" in r.output


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS: Core ML runs the stateful package")
@pytest.mark.parametrize("unit", ["cpu", "gpu", "ane"])
def test_predict_on_core_ml_matches_transformers(packages: dict[str, Path], tmp_path: Path,
                                                 unit: str) -> None:  # pragma: no cover - macOS only
    import json

    from click.testing import CliRunner

    from bitnet_coreml.cli import main

    oracle = ROOT / "models" / "hf_stateful" / "bitnet-tiny-packed.npz"
    with np.load(oracle) as z:  # transformers' BitNetForCausalLM, fp32, one forward over 48 tokens
        ids, want = z["input_ids"].astype(np.int32), z["full_logits"]
    npz = tmp_path / "in.npz"
    np.savez(npz, input_ids=ids)
    r = CliRunner().invoke(main, ["predict", str(packages["fp32"]), "-i", str(npz), "-o", str(tmp_path / "o.npz"),
                                  "--units", unit, "--json"])
    assert r.exit_code == 0, r.output
    if json.loads(r.stdout)["unit"] != unit:
        pytest.skip(f"{unit} could not run the package here: {json.loads(r.stdout)['notes']}")
    with np.load(tmp_path / "o.npz") as z:
        got = z["logits"][0].astype(np.float64)
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() >= (0.9999 if unit == "cpu" else 0.999)


def test_fp32_kept_attention_stays_fp32_in_both_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          record_property: Any) -> None:
    """Nodes the fp16-safety analysis keeps in fp32 (measured on the stateless graph) are found by name in
    both functions' graphs and built in fp32 there; the logits then still equal the stateless package's."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    import bitnet_coreml.lower.fp16 as fp16

    kept = {f"model_layers_1_self_attn_{n}" for n in ("scores", "masked_scores", "probs")}
    measure = fp16.make_fp16_safe

    def plan_with_fp32_attention(model, feeds):  # type: ignore[no-untyped-def]
        plan = measure(model, feeds)
        assert kept <= {n.name for n in model.graph}
        plan.fp32_nodes |= kept
        return plan

    monkeypatch.setattr(fp16, "make_fp16_safe", plan_with_fp32_attention)
    pkg, plain = tmp_path / "s.mlpackage", tmp_path / "plain.mlpackage"
    r = convert(CKPT, pkg, ConvertOptions(stateful=True, context=CONTEXT, prefill=PREFILL))
    assert not [n for n in r.notes if "not found by name" in n]
    assert {f"{f}: 3 node(s) kept in fp32: {', '.join(sorted(kept))}" for f in ("prefill", "decode")} <= set(r.notes)
    spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
    for name, fn in spec.mlProgram.functions.items():
        ops = next(iter(fn.block_specializations.values())).operations
        soft = [op.outputs[0].type.tensorType.dataType for op in ops if op.type == "softmax"]
        assert sorted(soft) == [MIL_pb2.DataType.FLOAT16, MIL_pb2.DataType.FLOAT32], name  # layer 0 fp16, 1 fp32
    z = np.load(ROOT / "models" / "hf_stateful" / "bitnet-tiny-packed.npz")
    ids = z["input_ids"].astype(np.int32)
    from bitnet_coreml.executor.stateful import StatefulRun

    got = StatefulRun(pkg).feed(ids)[0]
    convert(CKPT, plain, ConvertOptions(seq_len=ids.shape[1]))
    want = ReferenceExecutor(plain).predict({"input_ids": ids})["logits"][0]
    ref = np.concatenate([z["prefill_logits"], z["decode_logits"]]).astype(np.float64)
    flagged = equal_except_rounding(got, want, ref, max_flagged=len(ref) // 8)  # bit-identical but fp16 roundings
    record_property("flagged_positions", flagged)
    assert _cos(got.astype(np.float64), ref).min() >= 0.999
