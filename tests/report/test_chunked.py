"""`bitnet-coreml report FOLDER`: a chunked model folder's report equals verify --json, the pieces' files and metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema

from tests.report.conftest import MODEL, NPZ, Built, run_cli
from tests.report.test_report import SCHEMA, _meta, _page


def _files(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_chunked_json_follows_its_schema(chunked: Built) -> None:
    jsonschema.validate(chunked.data, SCHEMA)


def test_pieces_equal_the_folder_and_each_pieces_metadata(chunked: Built) -> None:
    manifest = json.loads((chunked.package / "model.json").read_text())
    ch = chunked.data["chunks"]
    assert ch["count"] == 2 == len(manifest["pieces"])
    assert [p["path"] for p in ch["pieces"]] == [p["path"] for p in manifest["pieces"]]
    for piece in ch["pieces"]:
        pkg = chunked.package / piece["path"]
        meta = _meta(pkg)
        check = json.loads(meta["bitnet_coreml.check"])
        chunk = json.loads(meta["bitnet_coreml.chunk"])
        assert piece["package_bytes"] == _files(pkg)
        assert piece["weight_bytes"] == _files(pkg / "Data" / "com.apple.CoreML" / "weights")
        assert piece["check"]["score"] == round(float(check["score"]), 6) and piece["check"]["ok"] is True
        assert piece["unit_counts"] == check["unit_counts"]
        assert piece["label"] == chunk["label"] and piece["layers"] == chunk["units"]
    s = chunked.data["summary"]
    assert s["package_bytes"] == sum(_files(chunked.package / p["path"]) for p in manifest["pieces"])
    assert s["bytes_by_kind"]["total"] == s["package_bytes"]
    assert s["check"]["score"] == min(p["check"]["score"] for p in ch["pieces"]) and s["check"]["verdict"] == "fits"
    counts = [p["unit_counts"] for p in ch["pieces"]]
    assert chunked.data["units"]["unit_counts"] == {u: sum(c[u] for c in counts) for u in ("ANE", "GPU", "CPU")}
    page = _page(chunked)
    assert "pieces" in page.sections
    assert int(page.fields["package_bytes"]) == s["package_bytes"]


def test_units_are_one_strip_per_piece_in_the_models_layer_numbering(chunked: Built) -> None:
    rows = chunked.data["units"]["layers"]
    assert [r["layer"] for r in rows] == ["piece 1: embedding", "piece 1: layer 0", "piece 2: layer 1", "piece 2: head"]
    for k, piece in enumerate(chunked.data["chunks"]["pieces"]):
        stored = json.loads(_meta(chunked.package / piece["path"])["bitnet_coreml.check"])["units"]["ops"]
        mine = [(o["node"], o["op_type"]) for r in rows if r["layer"].startswith(f"piece {k + 1}:") for o in r["ops"]]
        assert mine == [(n, t) for n, t, _ in stored]


def test_chunked_parity_equals_verify_json(chunked: Built) -> None:
    code, out, _ = run_cli("verify", MODEL, chunked.package, "--input", NPZ, "--json")
    assert code == 0
    verify = json.loads(out)
    assert chunked.data["parity"]["report"] == verify
    head = next(c for c in verify["comparisons"]
                if c["runner"] == "reference-executor" and c["reference"] == "onnxruntime")
    assert chunked.data["parity"]["depth"][-1]["cosine"] == head["cosine"]
    page = _page(chunked)
    assert float(page.fields["parity_cosine"]) == head["cosine"]
    assert chunked.data["summary"]["source_check"]["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert chunked.data["summary"]["source_check"]["matches"] is True
    timing = chunked.data["timing"]
    assert timing["available"] and sum(timing["calls"].values()) > 0
