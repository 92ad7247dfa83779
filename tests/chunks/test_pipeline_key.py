"""The pipeline key ``chunks``: a model entry built as a chunked model folder, verified, and skipped when unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bitnet_coreml.executor import ReferenceExecutor
from bitnet_coreml.executor.chunked import ChunkedExecutor
from tests.chunks.conftest import TINY, run_cli


def test_pipeline_builds_a_chunked_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(f'version = 1\noutput_dir = "out"\n[[model]]\nname = "tiny"\nsource = "{TINY}"\n'
                    'seq_len = 16\nchunks = 2\ntargets = [{ os = "macOS" }]\n')
    code, out, err = run_cli("pipeline", "run", toml, "--json")
    assert code == 0, err + out
    folder = tmp_path / "out" / "tiny-macos"
    assert (folder / "model.json").is_file() and (folder / "chunk_01.mlpackage").is_dir()
    report = json.loads((tmp_path / "out" / "tiny-macos.report.json").read_text())
    assert report["status"] == "built" and report["parity"]["passed"]
    x = {"input_ids": np.random.default_rng(2).integers(0, 512, size=(1, 16)).astype(np.int32)}
    assert np.array_equal(ChunkedExecutor(folder).predict(x)["logits"],
                          ReferenceExecutor(str(tiny["full"])).predict(x)["logits"])
    code, out, err = run_cli("pipeline", "run", toml, "--json")
    assert code == 0 and "skipped" in out, err


def test_pipeline_refuses_bad_chunks(tmp_path: Path) -> None:
    for value, words in (('"many"', "chunks: 'many' is not allowed"), ("0", "chunks: 0 is not allowed")):
        toml = tmp_path / "p.toml"
        toml.write_text(f'version = 1\noutput_dir = "out"\n[[model]]\nname = "tiny"\nsource = "{TINY}"\n'
                        f'chunks = {value}\ntargets = [{{ os = "macOS" }}]\n')
        code, _, err = run_cli("pipeline", "run", toml)
        assert code == 2 and words in err, err
    toml.write_text(f'version = 1\noutput_dir = "out"\n[[model]]\nname = "tiny"\nsource = "{TINY}"\nchunks = 2\n'
                    'output = "x.mlpackage"\ntargets = [{ os = "macOS" }]\n')
    code, _, err = run_cli("pipeline", "run", toml)
    assert code == 2 and "not allowed with chunks" in err, err
