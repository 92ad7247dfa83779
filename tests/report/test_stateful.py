"""The report of a stateful (KV cache) package: the state's bytes, their growth with context, no source needed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np

from bitnet_coreml.package.writer import describe, save_package
from tests.executor.test_state import D, E, H, S, _program, ct
from tests.report.conftest import ROOT, run_cli

SCHEMA = json.loads((ROOT / "docs" / "schemas" / "report.schema.json").read_text())


def test_kv_cache_section_of_a_stateful_package(tmp_path: Path) -> None:
    mlmodel = ct.convert(_program(), convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                         compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    describe(mlmodel, short_description="kv test", metadata={"bitnet_coreml.version": "test",
                                                            "bitnet_coreml.source": "kv.onnx",
                                                            "bitnet_coreml.precision": "fp16"},
             input_descriptions={}, output_descriptions={})
    pkg = save_package(mlmodel, tmp_path / "kv.mlpackage")
    npz = tmp_path / "in.npz"
    names = [i.name for i in mlmodel.get_spec().description.input]
    x_name, pos_name = names
    np.savez(npz, **{x_name: np.ones((1, 1, E), np.float16), pos_name: np.array([0], np.int32)})
    html = tmp_path / "kv.html"
    code, out, err = run_cli("report", pkg, "--input", npz, "-o", html, "--json")
    assert code == 0, err
    d = json.loads(out)
    jsonschema.validate(d, SCHEMA)
    state = d["size"]["state"]
    per_cache = 1 * H * S * D * 2  # fp16
    assert state["bytes"] == 2 * per_cache and state["context_length"] == S
    assert state["bytes_per_token"] == 2 * per_cache / S
    assert d["size"]["peak_estimate_bytes"] == d["size"]["weight_bytes"] + d["size"]["activation_peak_bytes"] \
        + 2 * per_cache
    assert d["timing"]["available"] and not d["parity"]["available"]
    assert d["summary"]["check"]["verdict"] == "not checked"
    page = html.read_text()
    assert "KV cache against context length" in page and f"KV cache (state) at {S} tokens" in page


def test_report_of_a_stateful_conversion_reads_the_context_from_the_package(tmp_path: Path) -> None:
    """`convert --stateful --report`: the KV cache section from the package's own states and context."""
    ckpt = ROOT / "models" / "hf" / "bitnet-tiny-packed"
    pkg, html = tmp_path / "st.mlpackage", tmp_path / "st.html"
    code, _, err = run_cli("convert", ckpt, "-o", pkg, "--stateful", "--context", "64", "--prefill", "16",
                           "--report", html)
    assert code == 0, err
    code, out, err = run_cli("report", pkg, "--source", ckpt, "--json")
    assert code == 0, err
    d = json.loads(out)
    jsonschema.validate(d, SCHEMA)
    st = d["size"]["state"]
    assert st["context_length"] == 64 and st["bytes"] == sum(st["states"].values())
    assert not d["parity"]["available"] and "stateful" in d["parity"]["why_unavailable"]
    assert d["units"]["available"] and d["summary"]["check"]["verdict"] == "fits"
    assert "KV cache against context length" in html.read_text()
