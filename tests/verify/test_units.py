"""verify on compute units: each requested unit runs through the runtime (probe, retries) and a unit
that does not answer fails parity (exit 1), it is not only logged.

Core ML cannot run on Linux, so the failing unit is a real reference unit wrapped by the tests' fault
injection (``tests/support/faults.py``) and handed to ``verify`` as a requested unit: the verify code
path (Predictor per unit, probe subprocess, unit failure -> parity failure) is the one Core ML units take.
The oracle of every comparison is ONNX Runtime on the source graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.errors import InputError, ParityError
from bitnet_coreml.runtime import ReferenceUnit
from bitnet_coreml.verify import verify
from tests.convert.graphs import chain_model
from tests.support.faults import Fault, FaultPlan, installed

linux_only = pytest.mark.skipif(sys.platform == "darwin", reason="pins the Linux behaviour: no Core ML units here")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from bitnet_coreml.convert import ConvertOptions, convert

    d = tmp_path_factory.mktemp("units")
    src = d / "chain.onnx"
    onnx.save(chain_model(seed=5, d=32, n=64)[0], src)
    convert(src, d / "chain.mlpackage", ConvertOptions(check=False))
    return src, d / "chain.mlpackage"


@linux_only
def test_default_notes_the_core_ml_units_this_machine_lacks(pair: tuple[Path, Path]) -> None:
    rep = verify(*pair)
    assert rep.passed and {c.runner for c in rep.comparisons} == {"reference-executor"}
    assert [s.split(":")[0:2] for s in rep.skipped] == [["coreml", "CPU_AND_NE"], ["coreml", "CPU_AND_GPU"],
                                                        ["coreml", "CPU_ONLY"]]
    assert all("not run" in s and "only on macOS" in s for s in rep.skipped)
    assert rep.unit_failures == []


def test_a_requested_unit_that_answers_is_compared(pair: tuple[Path, Path]) -> None:
    rep = verify(*pair, units=["reference"])
    assert rep.passed
    ours = [c for c in rep.comparisons if c.runner == "reference"]
    assert ours and all(c.cosine > 0.999 for c in ours)


def test_a_requested_unit_that_fails_fails_parity(pair: tuple[Path, Path]) -> None:
    plan = FaultPlan([Fault("ane", "raise", error="DeviceInitError")])
    rep = verify(*pair, units=plan.wrap([ReferenceUnit("ane")]), raise_on_failure=False)
    assert not rep.passed
    assert all(c.passed for c in rep.comparisons)  # the reference executor matched: the unit alone fails it
    assert rep.unit_failures == [
        "ane: chain.mlpackage: no compute unit answered (ane: injected fault on unit ane: DeviceInitError)"]
    assert plan.fired("ane") == 1  # a device failure is not retried on the same unit
    with pytest.raises(ParityError, match="ane: .*injected fault on unit ane"):
        verify(*pair, units=FaultPlan([Fault("ane", "raise", error="DeviceInitError")]).wrap([ReferenceUnit("ane")]))


def test_a_requested_unit_goes_through_the_probe(pair: tuple[Path, Path]) -> None:
    """The unit's probe child is killed at its first prediction: the unit fails, as a Core ML unit would."""
    plan = FaultPlan([Fault("ane", "kill_probe")])
    rep = verify(*pair, units=plan.wrap([ReferenceUnit("ane", probe=True)]), raise_on_failure=False)
    assert not rep.passed and plan.fired("ane", "kill_probe") == 1
    assert len(rep.unit_failures) == 1 and "killed by SIGKILL" in rep.unit_failures[0]


def test_a_transient_error_is_retried_and_parity_passes(pair: tuple[Path, Path]) -> None:
    plan = FaultPlan([Fault("ane", "raise", error="OperationError", count=1)])
    rep = verify(*pair, units=plan.wrap([ReferenceUnit("ane")]))
    assert rep.passed and "ane" in {c.runner for c in rep.comparisons} and plan.fired("ane") == 1


def test_cli_exit_1_when_a_requested_unit_fails(pair: tuple[Path, Path]) -> None:
    src, pkg = map(str, pair)
    ok = CliRunner().invoke(main, ["verify", src, pkg, "--units", "reference", "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert "reference" in {c["runner"] for c in json.loads(ok.stdout)["comparisons"]}
    with installed("reference:raise:error=DeviceInitError"):
        r = CliRunner().invoke(main, ["verify", src, pkg, "--units", "reference"])
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        "error: parity failed: reference: chain.mlpackage: no compute unit answered (reference: injected fault on "
        "unit reference: DeviceInitError)"]


@linux_only
def test_cli_a_core_ml_unit_asked_for_by_name_off_macos_fails(pair: tuple[Path, Path]) -> None:
    r = CliRunner().invoke(main, ["verify", *map(str, pair), "--units", "ane", "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert not doc["passed"] and doc["unit_failures"][0].startswith("coreml:CPU_AND_NE: ")
    assert "only on macOS" in doc["unit_failures"][0]


def test_units_on_a_stateful_package_are_refused(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import bitnet_coreml.verify as v
    from bitnet_coreml.package.stateful import META

    monkeypatch.setattr(v, "package_meta", lambda p: ({META: "{}"}, None))
    with pytest.raises(InputError, match="is stateful"):
        verify(*pair, units=["reference"])


def test_units_on_a_chunked_folder_are_refused_and_the_default_notes_it(tmp_path: Path) -> None:
    from tests.chunks.conftest import TINY, convert

    if not TINY.is_dir():
        pytest.skip("bundled checkpoint models/hf/bitnet-tiny-packed missing")
    folder = convert(TINY, tmp_path / "tiny2", "--chunks", "2")
    r = CliRunner().invoke(main, ["verify", str(TINY), str(folder), "--units", "reference"])
    assert r.exit_code == 2 and "is a chunked model folder" in r.stderr and len(r.stderr.splitlines()) == 1
    rep = verify(TINY, folder, raise_on_failure=False)
    assert rep.unit_failures == [] and any("chunked model folder" in s for s in rep.skipped)
