"""One spelling of OS versions, targets, compute units and embed bits (issue 19 item 5, issue 13).

Oracles: coremltools' own ``ct.target`` (AvailableTarget) and ``ct.ComputeUnit`` members, and the rows
of the capability database, each written independently of ``bitnet_coreml.vocab``.
"""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

import pytest
from click.testing import CliRunner

from bitnet_coreml import vocab
from bitnet_coreml.cli import main
from bitnet_coreml.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "platform", "name", "version"), [
    ("iOS17", None, "iOS17", "17"),
    ("ios17", None, "iOS17", "17"),
    ("iOS 17", None, "iOS17", "17"),
    ("17", "ios", "iOS17", "17"),
    ("17.0", "ios", "iOS17", "17"),
    ("macOS14.4", None, "macOS14", "14.4"),
    ("macos14", "macos", "macOS14", "14"),
    ("14.4", "macos", "macOS14", "14.4"),
    ("macOS26", None, "macOS26", "26"),
])
def test_every_form_users_type_is_read_and_printed_one_way(text: str, platform: str | None, name: str,
                                                           version: str) -> None:
    parsed = vocab.parse_os(text, platform)
    assert (parsed.name, parsed.version) == (name, version)


def test_conflicting_target_and_min_os_are_refused() -> None:
    with pytest.raises(InputError, match="names iOS but the target is macos"):
        vocab.resolve_target("macos", "iOS17")
    assert vocab.resolve_target(None, "macOS14")[0] == "macos"
    assert vocab.resolve_target(None, None) == ("ios", None)


def test_os_table_matches_coremltools_and_the_capability_database() -> None:
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    for o in vocab.OS_VERSIONS:
        assert getattr(ct.target, o.name).value == o.spec_version, o.name
        assert getattr(ct.target, f"iOS{o.ios}").value == o.spec_version
    rows = tomllib.loads((ROOT / "bitnet_coreml" / "data" / "capabilities.toml").read_text())["os"]
    db = {(r["platform"], r["version"]): r["spec_version"] for r in rows}
    assert db == {(o.platform, str(o.major)): o.spec_version for o in vocab.OS_VERSIONS}


def test_compute_units_in_every_spelling() -> None:
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    for unit, ct_name in vocab.COREML_UNITS.items():
        assert hasattr(ct.ComputeUnit, ct_name)
        assert vocab.parse_unit(ct_name) == unit
        assert vocab.parse_unit(unit.upper()) == unit
    assert vocab.parse_units("ANE, CPU_AND_GPU,cpu,reference") == ("ane", "gpu", "cpu", "reference")
    with pytest.raises(InputError, match="unknown compute unit 'tpu'"):
        vocab.parse_unit("tpu")


def test_commands_accept_the_same_forms_and_default_the_same_target(tmp_path: Path) -> None:
    model = str(ROOT / "models" / "bitnet_offline.onnx")
    r = CliRunner().invoke(main, ["check", model, "--min-os", "macOS14.4", "--json"])
    assert r.exit_code == 0, r.output
    assert '"platform": "macos"' in r.stdout
    r = CliRunner().invoke(main, ["check", model, "--json"])  # no --target: ios, as in convert
    assert r.exit_code == 0 and '"platform": "ios"' in r.stdout
    for cmd in (["check", model], ["convert", model, "-o", str(tmp_path / "x.mlpackage")]):
        bad = CliRunner().invoke(main, [*cmd, "--target", "macos", "--min-os", "iOS17"])
        assert bad.exit_code == 2 and "names iOS but the target is macos" in bad.stderr, bad.output
    out = tmp_path / "m.mlpackage"
    r = CliRunner().invoke(main, ["convert", model, "-o", str(out), "--min-os", "macOS14.4", "--json"])
    assert r.exit_code == 0, r.output
    assert '"deployment_target": "macOS14"' in r.stdout


def test_embed_bits_outside_the_offered_set_is_a_usage_error() -> None:
    model = str(ROOT / "models" / "bitnet_offline.onnx")
    for bits in ("1", "2", "3"):
        r = CliRunner().invoke(main, ["check", model, "--embed-bits", bits])
        assert r.exit_code == 2, (bits, r.output)
    with pytest.raises(InputError, match="allowed: 4, 6, 8"):
        vocab.parse_embed_bits(3)
