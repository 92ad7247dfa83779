"""The subprocess probe: spawn, healthy answer, killed by a signal, hang past the timeout.

On Linux the probed unit is a real reference unit (Core ML units are unavailable and never probed);
the kill and hang come from the tests' faulty probe child (``tests/support/faulty_probe.py``),
which runs the real probe and replaces only its first prediction.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml import errors as E
from bitnet_coreml.runtime import FallbackStrategy, Predictor, ReferenceUnit
from bitnet_coreml.runtime.probe import run_probe
from tests.support.faults import Fault, FaultPlan, make_predictor, probe_entry


def test_healthy_probe_reports_outputs(tiny_package: Path) -> None:
    res = run_probe(tiny_package, "reference", ["reference"], timeout_s=60)
    assert res.ok and res.returncode == 0 and res.error is None
    assert res.detail["outputs"] == {"out": [2, 4]}


def test_probe_killed_by_signal_is_a_model_error(tiny_package: Path) -> None:
    res = run_probe(tiny_package, "reference", ["reference"], timeout_s=60, entry=probe_entry("kill"))
    assert not res.ok and res.returncode == -9
    assert isinstance(res.error, E.ModelError)
    assert "killed by SIGKILL" in str(res.error)


def test_hung_probe_times_out(tiny_package: Path) -> None:
    res = run_probe(tiny_package, "reference", ["reference"], timeout_s=5.0,
                    entry=probe_entry("hang:30"))
    assert not res.ok and isinstance(res.error, E.TimeoutFailure)
    assert res.seconds < 30


def test_probe_of_a_missing_package_reports_the_error(tmp_path: Path) -> None:
    res = run_probe(tmp_path / "missing.mlpackage", "reference", ["reference"], timeout_s=60)
    assert not res.ok and res.returncode == 1
    assert isinstance(res.error, E.DeviceInitError) and "does not exist" in str(res.error)


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS the Core ML units must report unavailability")
def test_probe_of_a_coreml_unit_off_macos_says_why(tiny_package: Path) -> None:
    res = run_probe(tiny_package, "ane", ["ane"], timeout_s=60)
    assert not res.ok and isinstance(res.error, E.PlatformUnavailableError)
    assert "only on macOS" in str(res.error)


def test_predictor_moves_on_when_a_probe_dies(tiny_package: Path, tiny_inputs: dict) -> None:
    coreml = [] if sys.platform == "darwin" else ["ane", "gpu", "cpu"]  # unavailable, never probed, off macOS
    units = [*coreml, ReferenceUnit("ref-a", probe=True), ReferenceUnit("ref-b", probe=True)]
    faults = FaultPlan([Fault("ref-a", "kill_probe")])
    p = make_predictor(faults, tiny_package, FallbackStrategy(), units=units)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-b"
    assert "killed by SIGKILL" in res.skipped["ref-a"]
    res2 = p.predict(tiny_inputs)  # no new probe: ref-a stays failed, ref-b stays trusted
    assert res2.unit == "ref-b" and res2.skipped["ref-a"].startswith("failed earlier")
    assert faults.fired("ref-a", "kill_probe") == 1
    info = {u["name"]: u for u in p.system_info()["units"]}
    assert info["ref-a"]["probe"]["ok"] is False and info["ref-b"]["probe"]["ok"] is True
    s = p.get_recovery_stats()
    assert (s.units["ref-a"].failures_by_type, s.units["ref-a"].fallbacks, s.units["ref-a"].skips) == \
        ({"ModelError": 1}, 1, 1)
    assert s.units["ref-b"].successes == 2
    assert np.isfinite(res.outputs["out"]).all()


def test_predictor_moves_on_when_a_probe_hangs(tiny_package: Path, tiny_inputs: dict) -> None:
    units = [ReferenceUnit("ref-a", probe=True), ReferenceUnit("ref-b")]
    faults = FaultPlan([Fault("ref-a", "hang_probe", seconds=30)])
    p = make_predictor(faults, tiny_package, FallbackStrategy(probe_timeout_s=5.0), units=units)
    res = p.predict(tiny_inputs)
    assert res.unit == "ref-b" and "probe did not finish within 5 s" in res.skipped["ref-a"]


def test_probe_runs_once_per_process_for_a_package_and_unit(tiny_package: Path, tiny_inputs: dict) -> None:
    first = Predictor(tiny_package, units=[ReferenceUnit("probed", probe=True)])
    second = Predictor(tiny_package, units=[ReferenceUnit("probed", probe=True)])
    assert first.predict(tiny_inputs).unit == second.predict(tiny_inputs).unit == "probed"
    a, b = (p.system_info()["units"][0]["probe"] for p in (first, second))
    assert a["ok"] and a == b  # the same result (same timing): the second predictor spawned no probe


def test_a_bug_in_the_probe_child_is_a_bug_in_the_parent(tiny_package: Path, tiny_inputs: dict) -> None:
    """Not a failed unit to fall back from: exit 3 as an internal error, the child's traceback kept."""
    res = run_probe(tiny_package, "reference", ["reference"], timeout_s=60, entry=probe_entry("bug"))
    assert not res.ok and res.returncode == 1 and isinstance(res.error, E.InternalError)
    assert res.error.one_line() == ("internal error in reference probe: KeyError: 'injected bug in the probe' "
                                    "(rerun with --debug for the traceback)")
    notes = "".join(getattr(res.error.__cause__, "__notes__", []))
    assert "in the probe child:" in notes and "Traceback (most recent call last)" in notes and "misbehave" in notes
    units = [ReferenceUnit("ref-a", probe=True), ReferenceUnit("ref-b")]
    p = make_predictor(FaultPlan([Fault("ref-a", "bug_probe")]), tiny_package, FallbackStrategy(), units=units)
    with pytest.raises(E.InternalError, match="internal error in ref-a probe: KeyError"):
        p.predict(tiny_inputs)
    assert "ref-b" not in p.get_recovery_stats().units  # the next unit never covered for the bug
