"""`bitnet-coreml report`: the numbers on the page equal check --json, verify --json and the package metadata."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bitnet_coreml.executor import ReferenceExecutor, op_families
from bitnet_coreml.lower.program import safe_name
from tests.report.conftest import MODEL, NPZ, ROOT, Built, run_cli

SCHEMA = json.loads((ROOT / "docs" / "schemas" / "report.schema.json").read_text())


class _Fields(HTMLParser):
    """data-field -> (data-value or text) and every data-value, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.values: list[str] = []
        self.units: dict[str, str] = {}
        self.sections: list[str] = []
        self._open: str | None = None
        self._unit: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-section" in a:
            self.sections.append(str(a["data-section"]))
        if "data-value" in a:
            self.values.append(str(a["data-value"]))
        if "data-field" in a:
            if "data-value" in a:
                self.fields[str(a["data-field"])] = str(a["data-value"])
            else:
                self._open = str(a["data-field"])
        self._unit = a.get("data-unit")

    def handle_data(self, data: str) -> None:
        if self._open and data.strip():
            self.fields[self._open] = data.strip()
            self._open = None
        if self._unit and data.strip():
            self.units[self._unit] = data.strip()
            self._unit = None


def _page(built: Built) -> _Fields:
    p = _Fields()
    p.feed(built.html.read_text())
    return p


def _meta(pkg: Path) -> dict[str, str]:
    from bitnet_coreml.verify import package_meta

    return package_meta(pkg)[0]


def test_json_follows_its_schema(built: Built) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(built.data, SCHEMA)


def test_page_and_json_equal_check_json(built: Built) -> None:
    code, out, _ = run_cli("check", MODEL, "--target", "macos", "--chip", "M1", "--json")
    assert code == 0
    check = json.loads(out)
    s, u = built.data["summary"], built.data["units"]
    assert s["check"]["score"] == check["score"]
    assert s["check"]["ok"] is check["ok"] and s["check"]["verdict"] == "fits"
    assert s["check"]["warnings"] == [w["message"] for w in check["warnings"]]
    assert u["unit_counts"] == check["unit_counts"] and u["fallback_plan"] == check["fallback_plan"]
    ops = [(o["node"], o["op_type"], o["unit"], o["reason"]) for layer in u["layers"] for o in layer["ops"]]
    # node names as the converter gives them (MIL-legal: safe_name), every op in the same order
    assert ops == [(safe_name(o["node"]), o["op_type"], o["unit"], o["reason"]) for o in check["units"]]
    page = _page(built)
    assert float(page.fields["check_score"]) == check["score"]
    assert page.fields["check_verdict"] == "fits"
    assert {k: int(v) for k, v in page.units.items()} == check["unit_counts"]


def test_page_and_json_equal_verify_json(built: Built) -> None:
    code, out, _ = run_cli("verify", MODEL, built.package, "--input", NPZ, "--json")
    assert code == 0
    verify = json.loads(out)
    rep = built.data["parity"]["report"]
    assert rep == verify  # the same inputs, the same comparisons, bit for bit
    head = next(c for c in verify["comparisons"]
                if c["runner"] == "reference-executor" and c["reference"] == "onnxruntime")
    page = _page(built)
    assert float(page.fields["parity_cosine"]) == head["cosine"]
    assert float(page.fields["parity_top1"]) == head["top1"]
    assert page.fields["parity_verdict"] == ("passed" if verify["passed"] else "failed")
    for c in verify["comparisons"]:  # every verify number appears in the page's verify table
        assert repr(c["cosine"]) in page.values or str(c["cosine"]) in page.values


def test_page_and_json_equal_package_metadata(built: Built) -> None:
    meta = _meta(built.package)
    s = built.data["summary"]
    assert s["params_ternary"] == int(meta["bitnet_coreml.params_ternary"])
    assert s["params_other"] == int(meta["bitnet_coreml.params_other"])
    assert s["deployment_target"] == meta["bitnet_coreml.deployment_target"]
    assert s["precision"] == meta["bitnet_coreml.precision"]
    page = _page(built)
    assert page.fields["params_ternary"] == f"{int(meta['bitnet_coreml.params_ternary']):,}"
    assert page.fields["params_other"] == f"{int(meta['bitnet_coreml.params_other']):,}"
    assert page.fields["deployment_target"] == meta["bitnet_coreml.deployment_target"]
    files = sum(p.stat().st_size for p in built.package.rglob("*") if p.is_file())
    assert int(page.fields["package_bytes"]) == files == s["package_bytes"]
    weights = sum(p.stat().st_size for p in (built.package / "Data" / "com.apple.CoreML" / "weights").rglob("*")
                  if p.is_file())
    assert int(page.fields["weight_bytes"]) == weights
    fp16 = json.loads(meta["bitnet_coreml.fp16_safety"])
    assert built.data["fp16"]["layers"] == fp16["layers"]
    assert max(r["max_abs"] for r in fp16["layers"]) == fp16["calibration_max_abs"]


def test_page_states_the_sources_sha256_as_hashlib_computes_it(built: Built) -> None:
    import hashlib

    digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()  # one file, no external data
    page = _page(built)
    assert page.fields["source_sha256"] == digest == built.data["summary"]["source_sha256"]
    assert built.data["summary"]["source_check"] == {"sha256": digest, "matches": True,
                                                     "verdict": "matches the package's record"}
    assert page.fields["source_check"] == "matches the package's record"


def test_a_different_source_file_is_named(built: Built, tmp_path: Path) -> None:
    """The same graph saved again with another doc string: it runs, but it is not the file the package was made
    from, and the report says so (the summary, and a note naming both hashes)."""
    import hashlib

    m = onnx.load(str(MODEL))
    m.doc_string = "edited"
    other = tmp_path / "other.onnx"
    onnx.save(m, str(other))
    code, out, err = run_cli("report", built.package, "--source", other, "--json")
    assert code == 0, err
    d = json.loads(out)
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert d["summary"]["source_check"]["sha256"] == digest and d["summary"]["source_check"]["matches"] is False
    assert any(digest in n and "not the file this package was converted from" in n for n in d["notes"])


def test_bytes_by_kind_by_hand(built: Built) -> None:
    """2-bit codes of every ternary weight, fp16 embedding + LM head, the rest: counted from the ONNX file."""
    m = onnx.load(str(MODEL))
    inits = {i.name: i for i in m.graph.initializer}
    k = built.data["summary"]["bytes_by_kind"]
    ternary = [i for i in inits.values() if len(i.dims) == 2 and 1024 not in i.dims]  # the 14 BitLinear weights
    assert len(ternary) == built.data["summary"]["bitlinear_layers"]
    assert k["ternary_2bit"] == sum(math.ceil(math.prod(t.dims) * 2 / 8) for t in ternary)
    tables = [i for i in inits.values() if len(i.dims) == 2 and 1024 in i.dims and 128 in i.dims]
    assert len(tables) == 2  # embedding [1024, 128] and lm_head [128, 1024], not tied in this export
    assert k["embeddings"] == sum(math.prod(t.dims) for t in tables) * 2 and k["embedding_bits"] == [16]
    assert k["ternary_2bit"] + k["embeddings"] + k["other"] == k["total"]
    page = _page(built)
    assert int(page.fields["bytes_ternary"]) == k["ternary_2bit"]
    assert int(page.fields["bytes_embeddings"]) == k["embeddings"]


def test_fp16_layer_maxima_against_onnxruntime(built: Built) -> None:
    """Each layer's largest |value| is that value's max-abs in ONNX Runtime on the calibration input."""
    m = onnx.load(str(MODEL))
    rows = [r for r in built.data["fp16"]["layers"] if r["value"]]
    names = {o for n in m.graph.node for o in n.output}
    assert all(r["value"] in names for r in rows)
    m.graph.output.extend([onnx.helper.make_empty_tensor_value_info(r["value"]) for r in rows])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    with np.load(NPZ) as z:
        feeds = {i.name: z[i.name] for i in sess.get_inputs()}
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    for r in rows:
        assert float(np.abs(got[r["value"]]).max()) == pytest.approx(r["max_abs"], rel=1e-5)
    assert [r["layer"] for r in built.data["fp16"]["layers"]] == ["embedding", "layer 0", "layer 1", "head"]


def test_parity_by_depth(built: Built) -> None:
    p = built.data["parity"]
    labels = [d["label"] for d in p["depth"]]
    assert labels == ["layer 0 attention", "layer 0 MLP", "layer 1 attention", "layer 1 MLP", "output logits"]
    assert all(0.999 < d["cosine"] <= 1.0 for d in p["depth"])
    head = next(c for c in p["report"]["comparisons"] if c["reference"] == "onnxruntime")
    assert p["depth"][-1]["cosine"] == head["cosine"] and p["depth"][-1]["max_abs"] == head["max_abs"]
    worst = p["worst_positions"]
    assert len(worst) == 5 and worst == sorted(worst, key=lambda w: (w["cosine"], -w["max_abs"]))
    assert max(w["max_abs"] for w in worst) == head["max_abs"]  # the worst position holds the global max


def test_timing_and_memory(built: Built) -> None:
    t = built.data["timing"]
    assert t["available"] and set(t["by_family"]) <= set(op_families())
    assert sum(t["by_family"].values()) <= t["seconds"]
    size = built.data["size"]
    assert size["device"] == "Apple M1" and size["device_limit_bytes"] == 1024 * 2**20
    assert size["peak_estimate_bytes"] == size["weight_bytes"] + size["activation_peak_bytes"]
    # the logits [1, 16, 1024] fp16 are alive at the end of a call: the peak is at least that
    assert size["activation_peak_bytes"] >= 16 * 1024 * 2


def test_trace_captures_values_and_keeps_predict_unchanged(built: Built) -> None:
    ex = ReferenceExecutor(str(built.package))
    with np.load(NPZ) as z:
        ids = z["input_ids"].astype(np.int32)
    plain = ex.predict({"input_ids": ids})
    last = ex._block.steps[-1].ctx.name
    tr = ex.trace({"input_ids": ids}, capture=[last], profile=True)
    np.testing.assert_array_equal(tr.outputs["logits"], plain["logits"])
    np.testing.assert_array_equal(tr.values[last].astype(np.float32), plain["logits"].astype(np.float32))
    assert sum(tr.calls.values()) == ex.num_steps
    np.testing.assert_array_equal(ex.predict({"input_ids": ids})["logits"], plain["logits"])


def test_without_source_uses_the_package_metadata(built: Built, tmp_path: Path) -> None:
    code, out, _ = run_cli("report", built.package, "--json")
    assert code == 0
    d = json.loads(out)
    jsonschema.validate(d, SCHEMA)
    assert d["summary"]["check"]["score"] == built.data["summary"]["check"]["score"]
    assert d["units"] == built.data["units"]  # per-op units stored in the package by the converter's check
    assert not d["parity"]["available"] and not d["timing"]["available"]
    html = tmp_path / "r.html"
    code, out, _ = run_cli("report", built.package, "--input", NPZ, "-o", html)
    assert code == 0 and out.strip() == str(html) and "Op timings need" not in html.read_text()


@pytest.mark.parametrize("args, message", [
    (["{missing}", "-o", "{tmp}/r.html"], "no such package"),
    (["{pkg}", "-o", "{tmp}/r.txt"], "must end in .html"),
    (["{pkg}", "-o", "{tmp}/nope/r.html"], "does not exist"),
    (["{pkg}"], "give -o"),
    (["{pkg}", "--input", "{tmp}/none.npz", "-o", "{tmp}/r.html"], "--input"),
    (["{pkg}", "--source", "{tmp}/none.onnx", "-o", "{tmp}/r.html"], "--source"),
])
def test_bad_input_is_one_line_exit_2(built: Built, tmp_path: Path, args: list[str], message: str) -> None:
    fill = {"missing": str(tmp_path / "x.mlpackage"), "tmp": str(tmp_path), "pkg": str(built.package)}
    code, out, err = run_cli("report", *[a.format(**fill) for a in args])
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.html"))


def test_checkpoint_package_parity_by_depth_and_no_check(tmp_path: Path) -> None:
    """A checkpoint folder converted fp16 without a check: the residual stream is found in the package
    (the converter's fp16 embedding import adds a node and renames ops) and the report says there is no check."""
    ckpt = ROOT / "models" / "hf" / "bitnet-tiny-packed"
    pkg, html = tmp_path / "hf.mlpackage", tmp_path / "hf.html"
    code, out, err = run_cli("convert", ckpt, "-o", pkg, "--seq-len", "16", "--no-check", "--report", html)
    assert code == 0, err
    assert f"report: {html}" in out and html.is_file()
    code, out, err = run_cli("report", pkg, "--source", ckpt, "--json")
    assert code == 0, err
    d = json.loads(out)
    labels = [x["label"] for x in d["parity"]["depth"]]
    assert labels == ["layer 0 attention", "layer 0 MLP", "layer 1 attention", "layer 1 MLP", "output logits"]
    assert all(x["cosine"] > 0.999 for x in d["parity"]["depth"])
    assert d["summary"]["check"]["verdict"] == "not checked" and not d["units"]["available"]
    assert any("without a check" in n for n in d["notes"])
