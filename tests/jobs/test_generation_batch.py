"""``bitnet-coreml batch`` over a .jsonl of prompts with a stateful package (jobs/generation.py).

Package: the bundled example LM (``models/example-lm``) converted ``--stateful`` in fp32. Oracle:
transformers' own greedy ``generate()`` on the checkpoint (``models/example_lm_reference.json``,
written by ``models/make_example_lm.py``) and the ``tokenizers`` library's decode of its ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from bitnet_coreml.cli import main
from bitnet_coreml.jobs.generation import GENERATIONS, run_generation_batch
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
LM = ROOT / "models" / "example-lm"
REF_PATH = ROOT / "models" / "example_lm_reference.json"
pytestmark = pytest.mark.skipif(not REF_PATH.is_file(), reason="bundled example LM missing (make models)")
SEQS = json.loads(REF_PATH.read_text())["generate"]["sequences"] if REF_PATH.is_file() else []


@pytest.fixture(scope="module")
def lm(converted: PackageCache) -> Path:
    pkg = converted.get(LM, stateful=True, context=128, prefill=16, precision="fp32", check=False)
    return pkg


def _prompts(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _untimed(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("ttft_s", "prefill_tok_s", "decode_tok_s", "seconds")}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_greedy_batch_matches_transformers_and_resumes(lm: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.jsonl", [
        {"id": "text", "prompt": SEQS[0]["prompt"]},
        {"ids": SEQS[1]["prompt_ids"], "max_new_tokens": 5},
        {"id": "long", "prompt": "x " * 400},  # more tokens than the context: this item fails, the job goes on
        {"id": "stop", "prompt": SEQS[2]["prompt"], "max_new_tokens": 30, "stop": "\n"},
    ])
    out = tmp_path / "job"
    s = run_generation_batch(lm, prompts, out, units=("reference",), max_new_tokens=8)
    assert (s["run"]["ok"], s["run"]["failed"], s["job"]["complete"]) == (3, 1, False)
    assert "context of 128 tokens" in s["run"]["failures"][0]["error"]
    docs = {d["id"]: d for d in _lines(out / GENERATIONS)}
    assert list(docs) == ["text", "1", "stop"]  # dataset order; the failed item left out
    tok = Tokenizer.from_file(str(LM / "tokenizer.json"))
    first = docs["text"]
    assert first["prompt_ids"] == SEQS[0]["prompt_ids"]
    assert first["new_ids"] == SEQS[0]["new_ids"][:8]
    assert first["text"] == tok.decode(SEQS[0]["new_ids"][:8])
    assert first["unit"] == "reference" and first["stop_reason"] == "max_new_tokens"
    assert first["ttft_s"] > 0 and first["decode_tok_s"] > 0
    assert docs["1"]["new_ids"] == SEQS[1]["new_ids"][:5] and docs["1"]["prompt"] is None
    # the stop string: generation ends at the token completing it, the text ends before it
    ref_text = tok.decode(SEQS[2]["new_ids"][:30])
    assert "\n" in ref_text
    stop = docs["stop"]
    assert stop["stop_reason"] == "stop" and stop["text"] == ref_text[:ref_text.index("\n")]
    assert stop["new_ids"] == SEQS[2]["new_ids"][:len(stop["new_ids"])] and len(stop["new_ids"]) < 30

    # resume: a lost output is redone, the finished items are skipped, the result is the same
    before = _lines(out / GENERATIONS)
    (out / "outputs" / "text.json").unlink()
    again = run_generation_batch(lm, prompts, out, units=("reference",), max_new_tokens=8)
    assert (again["run"]["ok"], again["run"]["skipped_done"], again["run"]["failed"]) == (1, 2, 1)
    after = _lines(out / GENERATIONS)
    assert after[1:] == before[1:]  # the skipped items' documents as they were
    assert [_untimed(d) for d in after] == [_untimed(d) for d in before]
    with pytest.raises(Exception, match="different job"):  # another default changes the results: refused
        run_generation_batch(lm, prompts, out, units=("reference",), max_new_tokens=9)


def test_cli_generation_batch_and_exit_codes(lm: Path, tmp_path: Path) -> None:
    prompts = _prompts(tmp_path / "p.jsonl", [{"ids": SEQS[3]["prompt_ids"], "max_new_tokens": 4}])
    args = ["batch", str(lm), str(prompts), "-o", str(tmp_path / "job"), "--units", "reference", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["generations"]["items"] == 1 and summary["job"]["complete"]
    assert _lines(tmp_path / "job" / GENERATIONS)[0]["new_ids"] == SEQS[3]["new_ids"][:4]


@pytest.mark.parametrize(("content", "expect"), [
    ('{"prompt": "a"}\nnot json\n', "p.jsonl:2: not valid JSON"),
    ('{"max_new_tokens": 3}\n', 'p.jsonl:1: give exactly one of "prompt"'),
    ('{"prompt": "a", "ids": [1]}\n', 'p.jsonl:1: give exactly one of "prompt"'),
    ('{"prompt": "a", "temprature": 1}\n', "p.jsonl:1: unknown key(s) 'temprature'; allowed: id, prompt"),
    ('{"prompt": "a", "temperature": "hot"}\n', 'p.jsonl:1: "temperature" \'hot\'; allowed: a number'),
    ('{"prompt": "a", "top_p": 0}\n', "p.jsonl:1: top-p 0: must be in (0, 1]"),
    ('{"ids": [1, -2]}\n', 'p.jsonl:1: "ids" must be a non-empty list of token ids'),
    ('{"prompt": ""}\n', 'p.jsonl:1: "prompt" must be a non-empty string'),
    ('[1, 2]\n', "p.jsonl:1: expected a JSON object"),
    ("\n", "no prompts (empty .jsonl)"),
])
def test_bad_prompt_files_are_exit_2_in_one_line(lm: Path, tmp_path: Path, content: str, expect: str) -> None:
    (tmp_path / "p.jsonl").write_text(content)
    r = CliRunner().invoke(main, ["batch", str(lm), str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "job")])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "job").exists()  # nothing started


def test_generation_batch_refuses_other_datasets_and_formats(lm: Path, tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"")
    r = CliRunner().invoke(main, ["batch", str(lm), str(tmp_path / "x.npz"), "-o", str(tmp_path / "job")])
    assert r.exit_code == 2 and "a stateful package runs generation batches over a .jsonl" in r.stderr
    _prompts(tmp_path / "p.jsonl", [{"prompt": "a"}])
    r = CliRunner().invoke(main, ["batch", str(lm), str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "job"),
                                  "--output-format", "parquet"])
    assert r.exit_code == 2 and "--output-format parquet" in r.stderr and len(r.stderr.strip().splitlines()) == 1
