"""``bitnet-coreml generate``: streaming, JSON, injected faults (in-process CLI), bad input (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.generation import GenerationSession
from bitnet_coreml.package.assets import write_assets
from tests.generation.conftest import TINY
from tests.support.faults import installed

IDS = "5,17,301,44,9"


def run(args: list[str], faults: str | None = None):  # type: ignore[no-untyped-def]
    """``generate`` in-process; ``faults`` (the tests' plan syntax) installs faulty engines first."""
    if faults is None:
        return CliRunner().invoke(main, ["generate", *args])
    with installed(faults):
        return CliRunner().invoke(main, ["generate", *args])


def _oracle(pkg: Path, n: int) -> list[int]:
    s = GenerationSession(pkg, units=["reference"])
    return list(s.generate([int(i) for i in IDS.split(",")], max_new_tokens=n))


def test_ids_json_and_an_injected_fault(tiny_packages: dict[str, Path]) -> None:
    pkg = tiny_packages["fp16"]
    want = _oracle(pkg, 6)
    r = run([str(pkg), "--ids", IDS, "-n", "6", "--units", "reference", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["new_ids"] == want and doc["unit"] == "reference" and doc["prompt_ids"] == [5, 17, 301, 44, 9]
    assert doc["ttft_s"] > 0 and doc["decode_tok_s"] > 0 and doc["stop_reason"] == "max_new_tokens"
    # a transient error at decode step 3 is retried on the same unit: same tokens, one retry recorded
    r = run([str(pkg), "--ids", IDS, "-n", "6", "--units", "reference", "--json"],
            faults="reference:raise:error=OperationError,count=1,after=3")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["new_ids"] == want
    assert doc["recovery_stats"]["units"]["reference"]["retries"] == 1
    # human form: ids on stdout, rates and the unit on stderr
    r = run([str(pkg), "--ids", IDS, "-n", "3", "--units", "reference"])
    assert r.exit_code == 0
    assert r.stdout.split() == [str(t) for t in want[:3]]
    assert "[reference, stored decode]" in r.stderr and "tok/s" in r.stderr


def test_text_prompt_with_a_tokenizer_from_the_package(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    """A character-level tokenizer over the tiny model's 512 ids, carried as a package asset.

    Every id decodes to one whole character: the tiny checkpoint is trained on a Markov chain over all
    512 ids, and a byte-level vocabulary would decode what it generates to mostly partial UTF-8 bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0x100, 0x100 + 512 - (0x7F - 0x21))]
    tok = Tokenizer(models.WordLevel(vocab={ch: i for i, ch in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    pkg = tmp_path / "with_tok.mlpackage"
    shutil.copytree(tiny_packages["fp16"], pkg)
    r = run([str(pkg), "--prompt", "hi", "--units", "reference"])
    assert r.exit_code == 2 and "carries no tokenizer" in r.stderr
    write_assets(pkg, {"tokenizer.json": tok.to_str().encode()})
    prompt_ids = tok.encode("hello").ids
    want = _oracle_ids(pkg, prompt_ids, 8)
    r = run([str(pkg), "--prompt", "hello", "-n", "8", "--units", "reference", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["prompt_ids"] == prompt_ids and doc["new_ids"] == want
    assert doc["text"] == tok.decode(want)
    # --stop cuts the text before the stop string and ends the generation
    stop = doc["text"][3:5]
    r = run([str(pkg), "--prompt", "hello", "-n", "8", "--units", "reference", "--stop", stop])
    assert r.exit_code == 0
    assert r.stdout.rstrip("\n") == doc["text"][:doc["text"].find(stop)]


def _oracle_ids(pkg: Path, ids: list[int], n: int) -> list[int]:
    return list(GenerationSession(pkg, units=["reference"]).generate(ids, max_new_tokens=n))


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", ""], "the prompt is empty"),
    (["--ids", "1,x"], "not comma-separated integers"),
    (["--ids", "1,99999"], "unknown token id(s) [99999]"),
    (["--ids", "1,2", "-n", "63"], "exceed the package's context of 64"),
    (["--prompt", "hi"], "carries no tokenizer"),
    (["--ids", "1", "--prompt", "x"], "exactly one of"),
    (["--ids", "1", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--ids", "1", "--tokenizer", "/nonexistent"], "--tokenizer must be a folder"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_packages: dict[str, Path], args: list[str], message: str) -> None:
    r = run([str(tiny_packages["fp16"]), *args, "--units", "reference"])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_stateless_package_names_convert_stateful(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    r = run([str(tiny_packages["stateless"]), "--ids", "1,2"])
    assert r.exit_code == 2 and "--stateful" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run([str(tmp_path / "missing.mlpackage"), "--ids", "1,2"])
    assert r.exit_code == 2 and "not an .mlpackage" in r.stderr


def test_tokenizer_folder_for_a_package_without_one(tiny_packages: dict[str, Path]) -> None:
    r = run([str(tiny_packages["fp16"]), "--prompt", "x", "--tokenizer", str(TINY), "--units", "reference"])
    assert r.exit_code == 2 and "no tokenizer.json" in r.stderr
