"""Pipeline builds with the real converter and verifier: incremental skips, rebuilds, failures, atomicity.

The bundled ``bitnet_offline`` model is copied into a temporary folder so the tests can change it.
Whether an entry was rebuilt is read from the package's bytes on disk and the result status, and
parity comes from the verifier against ONNX Runtime (the independent oracle).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.jobs.buildstate import MANIFEST_NAME
from bitnet_coreml.jobs.pipeline import PipelineReport, run_pipeline

MODELS = Path(__file__).resolve().parents[2] / "models"


def _pipeline(tmp: Path, with_failing: bool) -> Path:
    for name in ("a", "b"):
        shutil.copy(MODELS / "bitnet_offline.onnx", tmp / f"{name}.onnx")
    shutil.copy(MODELS / "bitnet_offline.npz", tmp / "inputs.npz")
    # fp16 never reproduces fp32 exactly, so cosine 1.0 cannot be met: c always fails its parity.
    failing = '''
[[model]]
name = "c"
source = "a.onnx"
verify = { inputs = "inputs.npz", min_cosine = 1.0 }
''' if with_failing else ""
    p = tmp / "p.toml"
    p.write_text(f'''
output_dir = "out"
[defaults]
check = "warn"
targets = [{{ os = "macOS", min_os = "14", chip = "M1" }}]
verify = {{ inputs = "inputs.npz", min_cosine = 0.999 }}
{failing}
[[model]]
name = "a"
source = "a.onnx"
[[model]]
name = "b"
source = "b.onnx"
''')
    return p


def _status(report: object) -> dict[str, str]:
    return {r.model: r.status for r in report.results}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One CLI build of a, b and the failing c; then the pipeline without c, for the incremental tests."""
    tmp = tmp_path_factory.mktemp("pipe")
    p = _pipeline(tmp, with_failing=True)
    result = CliRunner().invoke(main, ["pipeline", "run", str(p), "--json"])
    d = json.loads(result.stdout)
    by = {r["model"]: r for r in d["results"]}
    # c fails first in the file; a and b are still built, and the run exits 1.
    assert result.exit_code == 1, result.output
    assert {k: v["status"] for k, v in by.items()} == {"c": "failed", "a": "built", "b": "built"}, by
    assert "cosine" in by["c"]["reason"] and "< 1.0" in by["c"]["reason"]
    assert not (tmp / "out" / "c-macos14-m1.mlpackage").exists()  # a failed package is not installed
    assert json.loads((tmp / "out" / "c-macos14-m1.report.json").read_text())["status"] == "failed"
    return tmp, _pipeline(tmp, with_failing=False)


def test_first_build_writes_packages_reports_and_manifest(built: tuple[Path, Path]) -> None:
    tmp, _ = built
    out = tmp / "out"
    for name in ("a", "b"):
        assert (out / f"{name}-macos14-m1.mlpackage" / "Manifest.json").is_file()
        rep = json.loads((out / f"{name}-macos14-m1.report.json").read_text())
        assert rep["status"] == "built" and rep["parity"]["passed"]
        assert rep["convert"]["bitlinear_layers"] > 0
        assert rep["check"]["policy"] == "warn"
        page = (out / f"{name}-macos14-m1.report.html").read_text()  # the HTML report beside the package
        assert f"{name}-macos14-m1.mlpackage" in page and 'data-section="parity"' in page
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["entries"]) == {"a@macos14-m1", "b@macos14-m1"}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_unchanged_is_skipped_and_changed_source_rebuilds_only_it(built: tuple[Path, Path]) -> None:
    tmp, p = built
    report = run_pipeline(p)
    assert _status(report) == {"a": "skipped", "b": "skipped"}
    # Same graph, different bytes (a doc string): the content hash changes, so b alone is rebuilt.
    m = onnx.load(str(tmp / "b.onnx"))
    m.doc_string = "edited"
    onnx.save(m, str(tmp / "b.onnx"))
    report = run_pipeline(p)
    assert _status(report) == {"a": "skipped", "b": "built"}
    # Timestamps alone do not rebuild (content hashes decide).
    (tmp / "a.onnx").touch()
    assert _status(run_pipeline(p)) == {"a": "skipped", "b": "skipped"}


@pytest.mark.slow
def test_force_rebuilds_everything(built: tuple[Path, Path]) -> None:
    _, p = built
    result = CliRunner().invoke(main, ["pipeline", "run", str(p), "--force", "--json"])
    assert result.exit_code == 0
    assert [r["status"] for r in json.loads(result.stdout)["results"]] == ["built", "built"]


def test_damaged_package_or_interrupted_build_is_not_trusted(built: tuple[Path, Path]) -> None:
    tmp, p = built
    out = tmp / "out"
    weights = next((out / "a-macos14-m1.mlpackage").rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-8])  # a damaged package must be rebuilt, not skipped
    stale = out / ".tmp-999-a-macos14-m1.mlpackage"  # what a killed build leaves behind
    stale.mkdir()
    (stale / "partial").write_text("x")
    report = run_pipeline(p)
    assert _status(report) == {"a": "built", "b": "skipped"}
    assert not stale.exists()


@pytest.mark.slow
def test_sigkill_during_a_build_leaves_nothing_trusted(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    p = _pipeline(tmp_path, with_failing=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bitnet_coreml.cli", "pipeline", "run", str(p), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill while the first package is being written into its temp folder.
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(x.name.startswith(".tmp-") for x in out.iterdir())):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (out / "a-macos14-m1.mlpackage").exists()
    assert not (out / MANIFEST_NAME).exists() or "a@macos14-m1" not in json.loads((out / MANIFEST_NAME).read_text())["entries"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["status"] for r in json.loads(result.stdout)["results"]] == ["built", "built"]
    assert not [x for x in out.iterdir() if x.name.startswith(".tmp-")]


def test_converter_bug_in_one_entry_does_not_stop_the_others(built: tuple[Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import bitnet_coreml.convert as convert_mod

    tmp, p = built
    real = convert_mod.convert

    def convert(source: Path, out: Path, options: object, **kw: object) -> object:
        if out.name.endswith("-z-macos14-m1.mlpackage"):  # the temp folder of entry z
            raise RuntimeError("injected converter bug")
        return real(source, out, options, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_mod, "convert", convert)
    p2 = tmp / "p2.toml"
    p2.write_text(p.read_text() + '\n[[model]]\nname = "z"\nsource = "a.onnx"\n')
    report = run_pipeline(p2)
    assert _status(report) == {"a": "skipped", "b": "skipped", "z": "error"}
    z = next(r for r in report.results if r.model == "z")
    assert z.reason == "internal error: RuntimeError: injected converter bug" and report.exit_code == 3
    assert not (tmp / "out" / "z-macos14-m1.mlpackage").exists()


def _build_tiny_checkpoint_entry(tmp_path: Path, name: str, entry: str, min_os: str) -> PipelineReport:
    """Build one fp32 pipeline entry ``name`` from the bundled tiny packed checkpoint, with ``entry``'s extra keys.

    fp32: the random-weight checkpoint's near-tied logits make fp16's top-1 a coin flip on a few tokens.
    """
    ckpt = MODELS / "hf" / "bitnet-tiny-packed"
    if not ckpt.is_dir():
        pytest.skip("bundled checkpoint models/hf/bitnet-tiny-packed missing")
    p = tmp_path / "p.toml"
    p.write_text(f'''
output_dir = "out"
[[model]]
name = "{name}"
source = "{ckpt.as_posix()}"
{entry}
precision = "fp32"
check = "warn"
targets = [{{ os = "macOS", min_os = "{min_os}" }}]
''')
    report = run_pipeline(p)
    assert _status(report) == {name: "built"}, [(r.model, r.reason) for r in report.results]
    return report


def test_checkpoint_entry_with_seq_len_builds_that_input_length(tmp_path: Path) -> None:
    _build_tiny_checkpoint_entry(tmp_path, "tiny", "seq_len = 16", "14")
    pkg = tmp_path / "out" / "tiny-macos14.mlpackage"
    from bitnet_coreml._quiet import coremltools

    spec = coremltools().models.MLModel(str(pkg), skip_model_load=True).get_spec()
    [inp] = spec.description.input
    assert (inp.name, list(inp.type.multiArrayType.shape)) == ("input_ids", [1, 16])
    assert [o.name for o in spec.description.output] == ["logits"]
    rep = json.loads((tmp_path / "out" / "tiny-macos14.report.json").read_text())
    assert rep["parity"]["passed"] and rep["parity"]["comparisons"]  # verified at the same length


def test_stateful_entry_is_built_and_verified(tmp_path: Path) -> None:
    """A stateful entry with verify on: prefill + teacher-forced decode steps against the checkpoint."""
    _build_tiny_checkpoint_entry(tmp_path, "lm", "stateful = { context = 32, prefill = 8 }", "15")
    rep = json.loads((tmp_path / "out" / "lm-macos15.report.json").read_text())
    parity = rep["parity"]
    assert parity["passed"] and parity["comparisons"]
    assert any("decode" in json.dumps(c) for c in parity["comparisons"])  # the decode steps were compared


def test_a_failing_rebuild_keeps_the_last_good_package(tmp_path: Path) -> None:
    p = _pipeline(tmp_path, with_failing=False)
    assert _status(run_pipeline(p)) == {"a": "built", "b": "built"}
    out = tmp_path / "out"
    good = {f.relative_to(out).as_posix(): f.read_bytes() for f in (out / "a-macos14-m1.mlpackage").rglob("*")
            if f.is_file()}
    good_report = (out / "a-macos14-m1.report.json").read_text()
    # Tighten a's gate beyond what fp16 can meet: the rebuild fails its parity.
    p.write_text(p.read_text().replace('name = "a"\nsource = "a.onnx"',
                                       'name = "a"\nsource = "a.onnx"\nverify = { inputs = "inputs.npz", min_cosine = 1.0 }'))
    report = run_pipeline(p)
    a = next(r for r in report.results if r.model == "a")
    assert a.status == "failed" and report.exit_code == 1 and "is kept" in a.reason
    kept = {f.relative_to(out).as_posix(): f.read_bytes() for f in (out / "a-macos14-m1.mlpackage").rglob("*")
            if f.is_file()}
    assert kept == good
    assert (out / "a-macos14-m1.report.json").read_text() == good_report
    assert json.loads((out / "a-macos14-m1.failed.report.json").read_text())["status"] == "failed"
    # The manifest still vouches for the kept package, under its old inputs: the next run tries again.
    assert "a@macos14-m1" in json.loads((out / MANIFEST_NAME).read_text())["entries"]
    assert _status(run_pipeline(p))["a"] == "failed"
