"""convert() and verify() end to end: package contents, determinism, atomicity, errors, CLI."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from click.testing import CliRunner

from bitnet_coreml._quiet import coremltools
from bitnet_coreml.cli import main
from bitnet_coreml.convert import ConvertOptions, convert
from bitnet_coreml.errors import InputError, ParityError, UnsupportedOpError
from bitnet_coreml.package.writer import package_files
from bitnet_coreml.verify import Thresholds, metrics, verify
from tests.convert.graphs import chain_model, mlp_model

ct = coremltools()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chain_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("src") / "chain.onnx"
    m, _ = chain_model(seed=11, d=64, n=128, per_channel=True)
    onnx.save(m, p)
    return p


def _files(pkg: Path) -> dict[str, bytes]:
    return {str(f.relative_to(pkg)): f.read_bytes() for f in sorted(pkg.rglob("*")) if f.is_file()}


def test_convert_writes_package_with_metadata(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "chain.mlpackage"
    r = convert(chain_onnx, out, ConvertOptions(check=False))
    assert out.is_dir() and r.package == str(out)
    m = ct.models.MLModel(str(out), skip_model_load=True)
    meta = dict(m.user_defined_metadata)
    assert meta["bitnet_coreml.source_sha256"] == hashlib.sha256(chain_onnx.read_bytes()).hexdigest()
    assert meta["bitnet_coreml.params_ternary"] == str(64 * 128 * 2)
    assert meta["bitnet_coreml.bitlinear_layers"] == "2"
    spec = m.get_spec()
    assert spec.description.metadata.author == ""
    assert spec.description.input[0].shortDescription and spec.description.output[0].shortDescription
    assert r.deployment_target == "iOS16" and spec.specificationVersion == 7
    # 2 ternary weights of 8192 values at 2 bits = 4096 B; the rest is gamma/alpha and blob headers
    assert r.weight_bytes <= 4096 + 4096


def test_conversion_is_deterministic(chain_onnx: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.mlpackage", tmp_path / "b.mlpackage"
    convert(chain_onnx, a, ConvertOptions(check=False))
    convert(chain_onnx, b, ConvertOptions(check=False))
    fa, fb = _files(a), _files(b)
    assert list(fa) == list(fb) and len(fa) >= 3
    for k in fa:
        assert fa[k] == fb[k], k


def test_overwrite_replaces_package(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.mlpackage"
    out.mkdir()
    (out / "junk").write_text("old")
    convert(chain_onnx, out, ConvertOptions(check=False, precision="fp32"))
    assert not (out / "junk").exists() and (out / "Manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["x.mlpackage"]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import bitnet_coreml.package.writer as w
    real = w.deterministic_manifest
    def die(pkg):
        real(pkg)  # the whole package exists at the temporary path; die before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    w.deterministic_manifest = die
    from bitnet_coreml.convert import convert, ConvertOptions
    convert(sys.argv[1], sys.argv[2], ConvertOptions(check=False))
""")


def test_killed_conversion_leaves_nothing_at_destination(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.mlpackage"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(chain_onnx), str(out)], cwd=REPO,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(n.startswith(".killed.mlpackage.tmp-") for n in leftovers)
    convert(chain_onnx, out, ConvertOptions(check=False))  # the next run cleans the dead process's temp
    assert [p.name for p in tmp_path.iterdir()] == ["killed.mlpackage"]


# one-input float ops of the default domain that a Core ML converter is unlikely to cover
_RARE_UNARY = ["Det", "Unique", "Bernoulli", "RandomNormalLike", "Hardmax", "Shrink"]


def _unsupported_pair() -> list[str]:
    from bitnet_coreml.lower.registry import supported_ops

    have = set(supported_ops())
    missing = [op for op in _RARE_UNARY if op not in have]
    if len(missing) < 2:
        pytest.skip("every candidate op has a lowering now; nothing unsupported to test with")
    return missing[:2]


def _with_unsupported_ops(tmp_path: Path, ops: list[str]) -> Path:
    nodes = [oh.make_node(op, ["x"], [f"y{i}"], name=f"n{i}") for i, op in enumerate(ops)]
    nodes.append(oh.make_node("Relu", ["x"], ["r"], name="relu"))
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 3])],
                      [oh.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in range(len(ops))]
                      + [oh.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [3, 3])])
    p = tmp_path / "bad.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10), p)
    return p


def test_unsupported_ops_listed_at_once_and_nothing_written(tmp_path: Path) -> None:
    ops = _unsupported_pair()
    src = _with_unsupported_ops(tmp_path, ops)
    out = tmp_path / "bad.mlpackage"
    with pytest.raises(UnsupportedOpError) as e:
        convert(src, out, ConvertOptions(check=False))
    assert ops[0] in str(e.value) and ops[1] in str(e.value) and "2 unsupported" in str(e.value)
    assert not out.exists()
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--no-check"])
    assert r.exit_code == 2 and ops[0] in r.output and ops[1] in r.output and "Traceback" not in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_bad_options_are_input_errors(chain_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="embed-bits"):
        ConvertOptions(embed_bits=3)
    with pytest.raises(InputError, match="iOS15"):
        ConvertOptions(min_os="iOS15")
    with pytest.raises(InputError, match=r"\.mlpackage"):
        convert(chain_onnx, tmp_path / "x.mlmodel", ConvertOptions(check=False))


def test_min_os_override(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.mlpackage"
    r = convert(chain_onnx, out, ConvertOptions(check=False, min_os="macOS14"))
    assert r.deployment_target == "macOS14"
    assert ct.models.MLModel(str(out), skip_model_load=True).get_spec().specificationVersion == 8


def test_metrics_by_hand() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    got = np.array([[1.0, 2.0, 2.0], [3.0, 1.0, 0.5]])
    m = metrics(ref, got)
    assert m["max_abs"] == 1.0
    assert m["top1"] == 0.5  # row 0: argmax 2 vs 1
    assert m["top5"] == 1.0
    assert m["rel_l2"] == pytest.approx(np.sqrt(1.25) / np.sqrt(24))
    assert m["cosine"] == pytest.approx(float(ref.ravel() @ got.ravel()) / np.sqrt(24) / np.sqrt(19.25))


def test_verify_passes_and_fails(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.mlpackage"
    convert(chain_onnx, out, ConvertOptions(check=False, precision="fp32"))
    rep = verify(chain_onnx, out)
    assert rep.passed and rep.comparisons[0].cosine >= 0.9999
    other = tmp_path / "other.onnx"
    onnx.save(chain_model(seed=12, d=64, n=128, per_channel=True)[0], other)
    with pytest.raises(ParityError, match="cosine"):
        verify(other, out)
    rep = verify(other, out, thresholds=Thresholds(cosine=-1.0, top1=0.0), raise_on_failure=True)
    assert rep.passed
    r = CliRunner().invoke(main, ["verify", str(other), str(out), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["passed"] is False
    r = CliRunner().invoke(main, ["verify", str(chain_onnx), str(out), "--json"])
    assert r.exit_code == 0, r.output


def test_cli_convert_json(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.mlpackage"
    r = CliRunner().invoke(main, ["convert", str(chain_onnx), "-o", str(out), "--no-check", "--verify", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["parity"]["passed"] and d["package_bytes"] == sum(package_files(out).values())


def test_fp16_rescale_reported_in_metadata(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(alpha=300.0)[0], src)
    out = tmp_path / "mlp.mlpackage"
    r = convert(src, out, ConvertOptions(check=False, verify=True))
    assert len(r.fp16["rescaled"]) == 1 and r.parity is not None and r.parity["passed"]
    meta = dict(ct.models.MLModel(str(out), skip_model_load=True).user_defined_metadata)
    assert json.loads(meta["bitnet_coreml.fp16_safety"])["rescaled"][0]["factor"].startswith("2^-")


@pytest.mark.parametrize("min_os", [None, "iOS18"])
def test_embed_bits_palettizes_non_ternary_weights(tmp_path: Path, min_os: str | None) -> None:
    rng = np.random.default_rng(0)
    e = rng.standard_normal((300, 256)).astype(np.float32)
    g = oh.make_graph([oh.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
                       oh.make_node("MatMul", ["h", "W"], ["logits"], name="head")], "g",
                      [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 8])],
                      [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 8, 300])],
                      [nh.from_array(e, "E"), nh.from_array(e.T.copy(), "W")])
    src = tmp_path / "lm.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10), src)
    plain = convert(src, tmp_path / "p.mlpackage", ConvertOptions(check=False, min_os=min_os))
    small = convert(src, tmp_path / "s.mlpackage", ConvertOptions(check=False, embed_bits=4, verify=True, min_os=min_os))
    assert len(small.embed["weights"]) == 2
    assert 0 < small.embed["max_rel_l2"] < 0.15  # 16 levels of a Gaussian: ~10% relative L2
    assert small.weight_bytes < plain.weight_bytes / 3.5  # 4 bits vs 16
    assert small.parity is not None and small.parity["comparisons"][0]["cosine"] > 0.98


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction runs only on macOS")
def test_verify_runs_core_ml_per_compute_unit(chain_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "mac.mlpackage"
    convert(chain_onnx, out, ConvertOptions(check=False))
    rep = verify(chain_onnx, out)
    runners = {c.runner for c in rep.comparisons}
    assert "reference-executor" in runners and any(r.startswith("coreml:") for r in runners)
    assert rep.passed


@pytest.mark.parametrize("embed_bits", [None, 4])
def test_ios18_target_uses_ios18_lut_form(chain_onnx: Path, tmp_path: Path, embed_bits: int | None) -> None:
    out = tmp_path / "i18.mlpackage"
    r = convert(chain_onnx, out, ConvertOptions(check=False, min_os="iOS18", embed_bits=embed_bits))
    assert r.deployment_target == "iOS18"
    assert ct.models.MLModel(str(out), skip_model_load=True).get_spec().specificationVersion == 9
    assert verify(chain_onnx, out).passed
    assert r.weight_bytes <= 4096 + 4096  # still 2 bits per ternary weight
