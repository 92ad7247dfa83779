"""``bitnet-coreml predict``: outputs, unit report, JSON, bad input (exit 2), exhaustion (exit 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from tests.support.faults import installed

from .conftest import numpy_oracle

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the Core ML units are available and answer first; this test pins the Linux chain")


def run(args: list[str], faults: str | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """The shipped CLI in-process; ``faults`` (the tests' plan syntax) installs faulty units first."""
    if faults is None:
        return CliRunner().invoke(main, args, env=env)
    with installed(faults):
        return CliRunner().invoke(main, args, env=env)


@pytest.fixture()
def npz(tmp_path: Path, tiny_inputs: dict) -> Path:
    path = tmp_path / "x.npz"
    np.savez(path, **tiny_inputs)
    return path


def reference(package: Path, inputs: dict) -> dict:
    from bitnet_coreml.executor import ReferenceExecutor

    return ReferenceExecutor(package).predict(inputs)


@linux_only
def test_predict_json_reports_units_and_writes_outputs(tiny_package: Path, npz: Path, tmp_path: Path,
                                                       tiny_inputs: dict) -> None:
    out = tmp_path / "sub" / "y.npz"
    r = run(["predict", str(tiny_package), "--input", str(npz), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["unit"] == "reference"
    assert set(doc["skipped"]) == {"ane", "gpu", "cpu"}
    assert all("only on macOS" in why for why in doc["skipped"].values())
    assert doc["recovery_stats"]["units"]["reference"]["successes"] == 1
    assert doc["outputs"] == {"out": {"shape": [2, 4], "dtype": "float32"}}
    with np.load(out) as z:
        got = z["out"]
    assert np.array_equal(got, reference(tiny_package, tiny_inputs)["out"])
    np.testing.assert_allclose(got, numpy_oracle(tiny_inputs["x"], tiny_inputs["y"]), atol=5e-3, rtol=5e-3)
    assert [p.name for p in out.parent.iterdir()] == ["y.npz"]  # no temp file left behind


@linux_only
def test_predict_human_output(tiny_package: Path, npz: Path) -> None:
    r = run(["predict", str(tiny_package), "--input", str(npz), "--units", "cpu,reference"])
    assert r.exit_code == 0, r.stderr
    assert "answered by reference" in r.stdout and "power target: balanced" in r.stdout


def test_injected_fault_is_retried_and_counted(tiny_package: Path, npz: Path) -> None:
    r = run(["predict", str(tiny_package), "--input", str(npz), "--units", "reference", "--json"],
            faults="reference:raise:error=OperationError,count=2")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [a["outcome"] for a in doc["attempts"]] == ["retried", "retried", "answered"]
    assert doc["recovery_stats"]["units"]["reference"]["retries"] == 2


def test_the_shipped_cli_reads_no_fault_variable(tiny_package: Path, npz: Path) -> None:
    """The old test switch in the environment changes nothing: the unit answers, nothing is retried."""
    r = run(["predict", str(tiny_package), "--input", str(npz), "--units", "reference", "--json"],
            env={"BITNET_COREML_FAULTS": "reference:raise:error=OperationError"})
    assert r.exit_code == 0, r.stderr
    assert [a["outcome"] for a in json.loads(r.stdout)["attempts"]] == ["answered"]


def test_exhausted_exits_3(tiny_package: Path, npz: Path) -> None:
    r = run(["predict", str(tiny_package), "--input", str(npz), "--units", "reference", "--retries", "1"],
            faults="reference:raise:error=OperationError")
    assert r.exit_code == 3
    assert r.stderr.count("\n") == 1 and "no compute unit answered" in r.stderr and "gave up after 1 retry" in r.stderr


def _bad(tmp_path: Path, arrays: dict) -> Path:
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize(("arrays", "match"), [
    ({"x": np.zeros((2, 3), np.float32)}, "missing y"),
    ({"x": np.zeros((2, 5), np.float32), "y": np.zeros((2, 4), np.float32)}, "input 'x' has shape [2, 5]"),
    ({"x": np.zeros((2, 3), np.float32), "y": np.zeros((2, 4), np.int64)}, "input 'y' has dtype int64"),
    ({"x": np.array([[0, np.nan, 0]] * 2, np.float32), "y": np.zeros((2, 4), np.float32)}, "bad.npz: input 'x' contains 2 NaN/infinite"),
])
def test_bad_inputs_exit_2_with_one_line(tiny_package: Path, tmp_path: Path, arrays: dict, match: str) -> None:
    r = run(["predict", str(tiny_package), "--input", str(_bad(tmp_path, arrays))])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and match in r.stderr
    assert "Traceback" not in r.stderr


def test_strict_refuses_arrays_the_package_does_not_take(tiny_package: Path, tmp_path: Path) -> None:
    arrays = {"x": np.zeros((2, 3), np.float32), "y": np.zeros((2, 4), np.float32), "mask": np.ones(2)}
    r = run(["predict", str(tiny_package), "--input", str(_bad(tmp_path, arrays)), "--strict"])
    match = "unexpected mask"
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and match in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_packages_and_files_exit_2(tmp_path: Path, npz: Path, tiny_package: Path) -> None:
    corrupt = tmp_path / "corrupt.mlpackage"
    corrupt.mkdir()
    (corrupt / "Manifest.json").write_text("garbage")
    import shutil

    no_weights = tmp_path / "noweights.mlpackage"
    shutil.copytree(tiny_package, no_weights)
    for f in (no_weights / "Data" / "com.apple.CoreML" / "weights").iterdir():
        f.write_bytes(b"")  # the description reads fine; the program's weights do not
    bad_spec = tmp_path / "badspec.mlpackage"
    shutil.copytree(tiny_package, bad_spec)
    (bad_spec / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"garbage")
    not_npz = tmp_path / "x.npz.txt"
    not_npz.write_text("not a zip")
    cases = [
        (["predict", str(tmp_path / "missing.mlpackage"), "--input", str(npz)], "does not exist"),
        (["predict", str(corrupt), "--input", str(npz)], "Manifest.json: not valid JSON"),
        (["predict", str(bad_spec), "--input", str(npz)], "model.mlmodel: not a Core ML model specification"),
        (["predict", str(no_weights), "--input", str(npz), "--units", "reference"], "weight.bin"),
        (["predict", str(tiny_package), "--input", str(tmp_path / "none.npz")], "no such file"),
        (["predict", str(tiny_package), "--input", str(not_npz)], "not a readable .npz"),
        (["predict", str(tiny_package), "--input", str(npz), "--units", "ane,tpu"], "unknown compute unit 'tpu'"),
        (["predict", str(tiny_package), "--input", str(npz), "--retries", "-1"], "max_retry_attempts=-1"),
    ]
    for args, match in cases:
        r = run(args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and match in r.stderr, (match, r.stderr)


@linux_only
def test_bundled_model_matches_the_reference_executor(tmp_path: Path) -> None:
    from bitnet_coreml.convert import ConvertOptions, convert

    src = ROOT / "models" / "bitnet_offline.onnx"
    inputs_npz = ROOT / "models" / "bitnet_offline.npz"
    if not src.is_file() or not inputs_npz.is_file():
        pytest.skip(f"bundled model {src.name} (and its .npz) not present in this checkout")
    pkg = tmp_path / "offline.mlpackage"
    # The pre-conversion check is the check stage's subject, not this test's: convert without it.
    convert(src, pkg, ConvertOptions(check=False))
    with np.load(inputs_npz) as z:
        names = z.files
        inputs = {k: z[k] for k in names}
    from bitnet_coreml.executor import ReferenceExecutor

    ex = ReferenceExecutor(pkg)
    feed = {k: v for k, v in inputs.items() if k in ex.input_specs}
    assert feed, f"{inputs_npz.name} holds none of the package inputs {list(ex.input_specs)}"
    np.savez(tmp_path / "in.npz", **feed)
    out = tmp_path / "out.npz"
    r = run(["predict", str(pkg), "--input", str(tmp_path / "in.npz"), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["unit"] == "reference"
    assert {k: ("only on macOS" in v) for k, v in doc["skipped"].items()} == {"ane": True, "gpu": True, "cpu": True}
    direct = ex.predict({k: v.astype(ex.input_specs[k].dtype) for k, v in feed.items()})
    with np.load(out) as z:
        assert sorted(z.files) == sorted(direct)
        for k in direct:
            assert np.array_equal(z[k], direct[k])


def test_a_bug_in_a_unit_is_one_line_exit_3_and_not_retried(tiny_package: Path, npz: Path) -> None:
    """A unit raising KeyError (a bug, not a device failure): no retry, no next unit, one line; --debug: traceback."""
    args = ["predict", str(tiny_package), "--input", str(npz), "--units", "reference,cpu", "--retries", "3"]
    with installed("reference:raise:error=KeyError") as plan:
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 3
    assert r.stderr.splitlines() == ["error: internal error in reference: KeyError: 'injected fault on unit reference: "
                                     "KeyError' (rerun with --debug for the traceback)"]
    assert plan.fired("reference") == 1  # retries 3 allowed; the bug was not retried
    with installed("reference:raise:error=KeyError") as plan:
        r = CliRunner().invoke(main, ["--debug", *args])
    assert r.exit_code == 3 and plan.fired("reference") == 1
    assert "Traceback (most recent call last)" in r.stderr and "KeyError: 'injected fault on unit reference" in r.stderr
    assert "in predict" in r.stderr  # the frame that raised it: the unit's call, kept as the cause
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: internal error in reference: KeyError")


def test_a_known_foreign_failure_is_retried_and_an_unknown_class_is_a_bug(tiny_package: Path, npz: Path) -> None:
    """RuntimeError (what Core ML's native proxy raises) is retried; an AssertionError is not."""
    args = ["predict", str(tiny_package), "--input", str(npz), "--units", "reference", "--json"]
    with installed("reference:raise:error=RuntimeError,count=1") as plan:
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.stderr
    assert [a["outcome"] for a in json.loads(r.stdout)["attempts"]] == ["retried", "answered"]
    assert plan.fired("reference") == 1
    with installed("reference:raise:error=AssertionError") as plan:
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 3 and plan.fired("reference") == 1
    assert json.loads(r.stdout)["error"] == "InternalError"
