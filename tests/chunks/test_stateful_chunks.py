"""Stateful chunked models: every piece holds the KV cache of its own layers and has prefill/decode; called in
order each step, they give the unchunked stateful package's logits bit for bit (reference executor), and
generation over the folder writes the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.executor.stateful import StatefulRun
from bitnet_coreml.generation import GenerationSession
from tests.chunks.conftest import LM, run_cli

OPTS = ("--stateful", "--context", 64, "--prefill", 8)


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chunks_stateful")
    out = {}
    for key, extra in (("full", ()), ("2", ("--chunks", 2)), ("3", ("--chunks", 3)), ("auto", ("--chunks", "auto"))):
        path = d / ("full.mlpackage" if key == "full" else f"lm{key}")
        code, _, err = run_cli("convert", LM, "-o", path, "--json", *OPTS, *extra)
        assert code == 0, err
        out[key] = path
    return out


@pytest.mark.parametrize("n", ["2", "3", "auto"])
def test_stateful_chunks_equal_unchunked(stateful: dict[str, Path], n: str) -> None:
    ids = np.random.default_rng(3).integers(0, 2048, size=(1, 21)).astype(np.int32)
    a, b = StatefulRun(stateful["full"]), StatefulRun(stateful[n])
    # two prefill chunks + decode steps, then more decode steps on the same cache
    for part in (ids[:, :19], ids[:, 19:]):
        la, lb = a.feed(part), b.feed(part)
        assert np.array_equal(la, lb), f"{n}: max |diff| {np.abs(la - lb).max()}"
    assert a.position == b.position == 21


def test_each_piece_holds_its_layers_states(stateful: dict[str, Path]) -> None:
    m = json.loads((stateful["2"] / "model.json").read_text())
    assert m["functions"] == ["decode", "prefill"] and m["default_function"] == "decode"
    # example-lm: 4 layers, tied table; 2 pieces balanced by bytes: embedding + layers 0-1 | layers 2-3 + lm_head
    assert [p["layers"] for p in m["pieces"]] == [[0, 2], [2, 4]]
    assert sorted(m["pieces"][0]["states"]) == ["k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]
    assert sorted(m["pieces"][1]["states"]) == ["k_cache_2", "k_cache_3", "v_cache_2", "v_cache_3"]
    assert m["stateful"]["context"] == 64 and m["stateful"]["prefill"] == 8 and len(m["stateful"]["states"]) == 8
    b = m["boundaries"][0]
    assert b["name"] == "hidden_states_2" and b["dtype"] == "float16"
    assert b["shape"] == {"prefill": [1, 8, 256], "decode": [1, 1, 256]}
    for p in m["pieces"]:
        assert {i["name"] for i in p["functions"]["decode"]["inputs"]} >= {"position"}


def test_generation_over_a_folder_writes_the_same_tokens(stateful: dict[str, Path]) -> None:
    prompt = "class Queue:\n    def __init__(self"
    want = list(GenerationSession(stateful["full"], units=["reference"]).generate(prompt, max_new_tokens=12))
    got = list(GenerationSession(stateful["3"], units=["reference"]).generate(prompt, max_new_tokens=12))
    assert got == want and len(want) == 12
    code, out, err = run_cli("generate", stateful["2"], "--prompt", prompt, "-n", 12, "--json")
    assert code == 0, err
    assert json.loads(out)["new_ids"] == want


def test_generation_batch_over_a_folder(stateful: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "def "}\n{"id": "b", "prompt": "class Queue:"}\n')
    ids = {}
    for key in ("full", "2"):
        code, _, err = run_cli("batch", stateful[key], prompts, "-o", tmp_path / f"job{key}", "--workers", 1,
                               "--max-new-tokens", 6, "--units", "reference", "--json")
        assert code == 0, err
        lines = (tmp_path / f"job{key}" / "generations.jsonl").read_text().splitlines()
        ids[key] = {json.loads(ln)["id"]: json.loads(ln)["new_ids"] for ln in lines}
    assert ids["2"] == ids["full"] and len(ids["full"]) == 2
