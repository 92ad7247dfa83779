"""`bitnet-coreml info` and `bitnet-coreml check`: output, exit codes, JSON schema, bundled models."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "schemas" / "check-report.schema.json").read_text())
MODELS = ROOT / "models"
BUNDLED = sorted(MODELS.glob("*.onnx")) + sorted(
    p for p in (MODELS / "hf").glob("*") if (p / "config.json").is_file())  # ONNX files and HF checkpoint folders


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _report(out: str) -> dict:  # type: ignore[type-arg]
    d = json.loads(out)
    jsonschema.validate(d, SCHEMA)
    return d  # type: ignore[no-any-return]


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks what info says off macOS")
def test_info_off_macos_says_why_and_prints_the_table() -> None:
    code, out, _ = _run("info")
    assert code == 0
    flat = " ".join(out.split())
    assert "Core ML is unavailable here" in flat and "only on macOS" in flat
    assert "A17 Pro" in out and "M4" in out and "Apple M1" in out and "package_bytes" in out
    code, out, _ = _run("info", "--json")
    d = json.loads(out)
    assert d["platform"]["coreml_available"] is False and "macOS" in d["platform"]["coreml_reason"]
    assert {c["name"] for c in d["capabilities"]["chips"]} >= {"A11", "A17 Pro", "M1", "M4 Max"}


def test_info_bad_capability_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[[chip]]\nname = 'X'\nspeed = 1\n")
    code, out, err = _run("info", "--capabilities", str(p))
    assert code == 2 and err.count("\n") == 1 and "unknown key 'speed'" in err and str(p) in err


def test_check_fits_json(mlp: str) -> None:
    code, out, _ = _run("check", mlp, "--target", "macos", "--chip", "M1", "--json")
    d = _report(out)
    assert code == 0 and d["ok"] and d["target"]["chip"] == "M1" and d["target"]["ane_generation"] == 4
    assert d["size"]["params_ternary"] == 3 * 32 * 64  # gate, up (64x32) and down (32x64)
    assert sum(d["unit_counts"].values()) == len(d["units"])


def test_check_human_output(mlp: str) -> None:
    code, out, _ = _run("check", mlp, "--target", "ios", "--chip", "A17Pro")
    assert code == 0
    assert "Weights (weight.bin estimate)" in out and "Fallback plan" in out and "compatibility score" in out


def test_check_strict_turns_warnings_into_failure(mlp: str) -> None:
    code, out, _ = _run("check", mlp, "--target", "ios", "--chip", "A16", "--min-os", "16", "--json")
    assert code == 0
    code, out, _ = _run("check", mlp, "--target", "ios", "--strict", "--json", "--precision", "fp32")
    d = _report(out)
    assert code == 1 and d["strict"] and not d["violations"] and d["warnings"]


def test_check_violation_exit_1(mlp: str, tmp_path: Path) -> None:
    caps = tmp_path / "caps.toml"
    caps.write_text("[limits.package_bytes]\nios = 1000\nsource = 'tiny test limit'\n")
    code, out, _ = _run("check", mlp, "--target", "ios", "--capabilities", str(caps), "--json")
    d = _report(out)
    assert code == 1 and not d["ok"] and d["violations"][0]["rule"] == "package_size"
    assert d["capability_files"][-1] == str(caps) and d["score"] == 0
    code, out, _ = _run("check", mlp, "--target", "ios", "--min-os", "15", "--json")
    assert code == 1 and _report(out)["violations"][0]["rule"] == "min_os_features"
    # --embed-bits outside 4, 6, 8 is a usage error (exit 2), not a failed check
    code, _, err = _run("check", mlp, "--target", "ios", "--embed-bits", "3", "--json")
    assert code == 2 and "'3' is not one of '4', '6', '8'" in err


@pytest.mark.parametrize("args, needle", [
    (["--chip", "Z80"], "unknown chip 'Z80'"),
    (["--chip", "M2"], "is a macos chip"),
    (["--min-os", "12"], "older than every supported target"),
    (["--min-os", "x"], "is not an OS version"),
    (["--min-os", "macOS14"], "names macOS but the target is ios"),
    (["--capabilities", "/nonexistent/caps.toml"], "capability file not found"),
])
def test_check_bad_input_exit_2(mlp: str, args: list[str], needle: str) -> None:
    code, out, err = _run("check", mlp, "--target", "ios", *args)
    assert code == 2 and needle in err and err.startswith("error: ") and "Traceback" not in err


def test_check_missing_model_exit_2(tmp_path: Path) -> None:
    code, _, err = _run("check", str(tmp_path / "nope.onnx"), "--target", "macos")
    assert code == 2 and "nope.onnx" in err


def test_check_usage_error_exit_2(mlp: str) -> None:
    assert _run("check", mlp, "--target", "android")[0] == 2
    assert _run("check", mlp, "--embed-bits", "2")[0] == 2


# --- bundled models -----------------------------------------------------------------------------------

needs_models = pytest.mark.skipif(not BUNDLED, reason="no bundled models under models/")


@pytest.fixture(scope="module")
def bundled() -> dict:  # type: ignore[type-arg]
    from bitnet_coreml.frontend import load
    from bitnet_coreml.passes import run_default_passes

    out = {}
    for m in BUNDLED:
        g = load(m)
        run_default_passes(g)
        out[m.name] = g
    return out


@needs_models
@pytest.mark.parametrize("platform_, chip", [("macos", c) for c in ("M1", "M1 Max", "M2", "M3", "M4", "M4 Pro")]
                         + [("ios", c) for c in ("A16", "A17Pro", "A18", "A18 Pro")])
def test_bundled_models_pass(bundled: dict, platform_: str, chip: str) -> None:  # type: ignore[type-arg]
    from bitnet_coreml.check import Target, run_check

    for name, g in bundled.items():
        r = run_check(g, Target(platform_, chip), source=name)
        jsonschema.validate(json.loads(json.dumps(r.to_dict(), default=str)), SCHEMA)
        assert r.ok and r.exit_code == 0, (name, r.violations)
        assert r.unit_counts["ANE"] > 0.9 * len(r.units)


@needs_models
def test_bundled_model_through_the_cli() -> None:
    code, out, _ = _run("check", str(BUNDLED[0]), "--target", "macos", "--chip", "M1", "--json")
    assert code == 0 and _report(out)["ok"]


@pytest.mark.skipif(not (MODELS / "bitnet_bigvocab.onnx").exists(), reason="bundled big-vocabulary model missing")
def test_bundled_big_vocabulary_is_flagged_and_fixed_by_split() -> None:
    code, out, _ = _run("check", str(MODELS / "bitnet_bigvocab.onnx"), "--target", "ios", "--chip", "A17Pro", "--json")
    d = _report(out)
    dims = [f for f in d["fixed"] if f["rule"] == "dim_over_16384"]
    assert code == 0 and len(dims) == 2  # the embedding and the LM head
    assert all(f["actual"] > 16384 and "split" in f["fixed_by"] for f in dims)
    assert {s["op_type"] for s in d["splits"]} == {"Gather", "MatMul"}
