"""The capability database: bundled values vs the seed/ANE_FACTS tables, coremltools' targets, user files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitnet_coreml.check.capabilities import chip_key, iter_sources, load_capabilities
from bitnet_coreml.errors import ConfigError, InputError

# Copied by hand from the seed's "Apple Neural Engine Support" table: gen -> (TOPS, types, budget MB, chips).
SEED_ANE = {
    6: (15.8, {"fp16", "int8", "int16", "uint8"}, 256, ["A16", "M3"]),
    5: (11.5, {"fp16", "int8", "int16", "uint8"}, 192, ["A15", "M2"]),
    4: (10.9, {"fp16", "int8", "int16"}, 128, ["A14", "M1"]),
    3: (5.8, {"fp16", "int8", "int16"}, 64, ["A13"]),
    2: (0.6, {"fp16"}, 32, ["A12"]),
    1: (0.1, {"fp16"}, 16, ["A11"]),
}
# Seed "Capability Matrix": device -> (nn, matrix, conv, graph api, memory MB)
SEED_MATRIX = {
    "Apple M4": ("full", "full", "full", True, 4096), "Apple M3": ("full", "full", "full", True, 4096),
    "Apple M2": ("full", "full", "full", True, 2048), "Apple M1": ("full", "full", "full", True, 1024),
    "AMD Radeon": ("full", "full", "limited", False, 1024), "Intel Iris": ("limited", "full", "limited", False, 512),
}


@pytest.fixture(scope="module")
def db():  # type: ignore[no-untyped-def]
    return load_capabilities()


def test_every_row_has_a_source(db) -> None:  # type: ignore[no-untyped-def]
    rows = list(iter_sources(db))
    assert len(rows) > 50
    for row, src in rows:
        assert src.strip(), f"{row} has no source"


def test_ane_generations_match_the_seed_table(db) -> None:  # type: ignore[no-untyped-def]
    assert set(db.generations) == set(SEED_ANE)
    for gid, (tops, types, budget, chips) in SEED_ANE.items():
        g = db.generation(gid)
        assert g.tops == tops and set(g.data_types) == types and g.model_size_budget_mb == budget
        for c in chips:  # chips the seed names carry the row's TOPS
            assert db.chip(c).ane_generation == gid and db.chip(c).tops == tops


def test_unnamed_chips_have_unknown_tops_and_say_what_they_rest_on(db) -> None:  # type: ignore[no-untyped-def]
    for name in ("A17 Pro", "A18", "A18 Pro", "M4", "M1 Pro", "M2 Max", "M3 Ultra", "M4 Max"):
        c = db.chip(name)
        assert c.tops is None, name
        assert "seed" in c.source and ("not" in c.source or "newest" in c.source or "+" in c.source)


def test_required_chips_present(db) -> None:  # type: ignore[no-untyped-def]
    names = {c.name for c in db.chips.values()}
    for a in ("A11", "A12", "A13", "A14", "A15", "A16", "A17 Pro", "A18", "A18 Pro"):
        assert a in names
    for m in ("M1", "M2", "M3", "M4"):
        for v in ("", " Pro", " Max"):
            assert m + v in names


def test_int8_compute_only_a17pro_m4_and_newer(db) -> None:  # type: ignore[no-untyped-def]
    yes = {c.name for c in db.chips.values() if c.int8_compute}
    assert yes == {"A17 Pro", "A18", "A18 Pro", "M4", "M4 Pro", "M4 Max"}


def test_device_matrix_matches_the_seed(db) -> None:  # type: ignore[no-untyped-def]
    assert set(db.devices) == set(SEED_MATRIX)
    for name, (nn, mm, conv, graph, mem) in SEED_MATRIX.items():
        d = db.device(name)
        assert (d.neural_networks, d.matrix_ops, d.convolution, d.graph_api, d.memory_limit_mb) == (nn, mm, conv, graph, mem)


def test_os_rows_match_coremltools_targets(db) -> None:  # type: ignore[no-untyped-def]
    from bitnet_coreml._quiet import coremltools

    ct = coremltools()
    for o in db.os_versions:
        name = ("iOS" if o.platform == "ios" else "macOS") + o.version
        assert getattr(ct.target, name).value == o.spec_version, name
        assert hasattr(ct.target, o.mil_opset)


def test_limits_from_ane_facts(db) -> None:  # type: ignore[no-untyped-def]
    assert db.limit("package_bytes")["macos"] == 2_147_483_648
    assert db.limit("package_bytes")["ios"] == 1_000_000_000
    assert db.limit("package_bytes").severity == "error"
    assert db.limit("ane_generation_budget").severity == "warning"
    assert db.limit("max_dimension")["value"] == 16384
    assert db.limit("max_rank")["value"] == 5
    assert db.limit("max_channels")["value"] == 65536
    assert db.limit("lut_bits")["values"] == [1, 2, 4, 6, 8]
    assert db.limit("fp16_range")["max"] == 65504.0


@pytest.mark.parametrize("spelling", ["A17Pro", "a17 pro", "A17-Pro", "Apple A17 Pro", "a17_pro"])
def test_chip_spellings(db, spelling: str) -> None:  # type: ignore[no-untyped-def]
    assert db.chip(spelling).name == "A17 Pro"
    assert chip_key(spelling) == "a17pro"


def test_unknown_chip_lists_known(db) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=r"unknown chip 'Z9'.*A17 Pro"):
        db.chip("Z9")


def test_os_lookup(db) -> None:  # type: ignore[no-untyped-def]
    assert db.os_version("macos", "14.4").version == "14"
    assert db.os_version("ios", "17").spec_version == 8
    with pytest.raises(InputError, match="older than every OS"):
        db.os_version("ios", "14")
    with pytest.raises(InputError, match="bad OS version"):
        db.os_version("ios", "sixteen")
    assert db.lowest_os("ios", 7).version == "16"
    assert db.lowest_os("macos", 7).version == "13"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "caps.toml"
    p.write_text(text)
    return p


def test_user_file_adds_and_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, """
[[chip]]
name = "M4 Ultra"
platforms = ["macos"]
ane_generation = 6
source = "my lab notes"

[[chip]]
name = "a17pro"
tops = 35.0
source = "vendor sheet"

[limits.package_bytes]
ios = 1000000
source = "test limit"
""")
    db = load_capabilities(p)
    assert db.chip("M4 Ultra").ane_generation == 6
    a17 = db.chip("A17 Pro")
    assert a17.tops == 35.0 and a17.int8_compute is True and a17.source == "vendor sheet"
    assert db.limit("package_bytes")["ios"] == 1_000_000
    assert db.limit("package_bytes")["macos"] == 2_147_483_648  # untouched field kept
    assert db.files[-1] == str(p)
    assert load_capabilities().limit("package_bytes")["ios"] == 1_000_000_000  # bundled not mutated


@pytest.mark.parametrize("text, match", [
    ("[[chip]]\nname='A16'\ntopz=3\n", r"caps.toml: chip\[0\]: unknown key 'topz'"),
    ("[[chip]]\nname='A16'\ntops='fast'\n", r"chip\[0\]\.tops: expected number, got str"),
    ("[[chip]]\nname='X1'\nplatforms=['ios']\n", r"chip 'X1': missing required key 'source'"),
    ("[[chip]]\nname='X1'\nplatforms=['ios']\nane_generation=9\nsource='s'\n", r"ane_generation: 9 is not a known generation"),
    ("[[chip]]\nname='X1'\nplatforms=['watchos']\nsource='s'\n", r"'watchos' not one of ios, macos"),
    ("[[chip]]\nname='X1'\nplatforms=['ios']\nsource='s'\n[[chip]]\nname='x 1'\nplatforms=['ios']\nsource='s'\n",
     r"duplicate chip x1"),
    ("[[gpu]]\nname='x'\n", r"unknown section 'gpu'"),
    ("[limits.max_rank]\nvalue='5'\n", r"limits.max_rank.value: expected int"),
    ("[limits.speed]\nvalue=1\n", r"unknown limit 'speed'"),
    ("[limits.max_rank]\nseverity='fatal'\n", r"severity: 'fatal' not one of error, warning"),
    ("schema_version = 2\n", r"schema_version 2 is not supported"),
    ("[[chip]]\nplatforms=['ios']\n", r"missing key 'name'"),
    ("this is = not toml [", r"not valid TOML"),
])
def test_user_file_errors(tmp_path: Path, text: str, match: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        load_capabilities(p)


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="capability file not found"):
        load_capabilities(tmp_path / "nope.toml")
