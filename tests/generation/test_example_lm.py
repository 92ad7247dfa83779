"""The bundled example LM: greedy generation matches transformers' generate() token for token.

Oracle: ``models/example_lm_reference.json``, written by ``models/make_example_lm.py`` from
transformers' own ``generate()`` on the checkpoint folder (torch fp32, ``do_sample=False``, 64 new
tokens for 8 prompts) with the per-step top-1 logit and top-1 minus top-2 margin. The fp32 package
must reproduce every sequence; the fp16 package at least 7 of 8, and a sequence that differs may
only do so after a step whose reference margin is within the fp16 tie rule (``verify.TIE_FP16_STEPS``
fp16 steps at the logit's magnitude).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bitnet_coreml.generation import GenerationSession, TextTokenizer
from bitnet_coreml.package.assets import read_assets
from bitnet_coreml.verify import TIE_FP16_STEPS, _fp16_step
from tests.support.packages import PackageCache

ROOT = Path(__file__).resolve().parents[2]
LM = ROOT / "models" / "example-lm"
REF_PATH = ROOT / "models" / "example_lm_reference.json"
pytestmark = pytest.mark.skipif(not REF_PATH.is_file(), reason="bundled example LM missing (make models)")
REF = json.loads(REF_PATH.read_text()) if REF_PATH.is_file() else {}
SEQS = REF.get("generate", {}).get("sequences", [])


@pytest.fixture(scope="module")
def lm_packages(converted: PackageCache) -> dict[str, Path]:
    return {prec: converted.get(LM, stateful=True, context=128, prefill=16, precision=prec, check=False)
            for prec in ("fp32", "fp16")}


def test_tokenizer_matches_transformers() -> None:
    tok = TextTokenizer.from_dir(LM)
    for seq in SEQS:
        assert tok.encode(seq["prompt"]) == seq["prompt_ids"]
        assert tok.decode(seq["new_ids"]) == seq["text"]
    assert tok.eos_ids == (json.loads((LM / "generation_config.json").read_text())["eos_token_id"],)


# Converting the LM twice and generating 2 x 8 x 64 tokens takes minutes on a loaded 2-core machine.
@pytest.mark.slow
def test_tokenizer_travels_in_the_package(lm_packages: dict[str, Path]) -> None:
    assets = read_assets(lm_packages["fp16"])
    assert assets["tokenizer.json"] == (LM / "tokenizer.json").read_bytes()
    assert assets["generation_config.json"] == (LM / "generation_config.json").read_bytes()
    eos = json.loads((LM / "generation_config.json").read_text())["eos_token_id"]
    packaged = TextTokenizer.from_package(lm_packages["fp16"])
    assert packaged is not None and packaged.eos_ids == (eos,)


def _generate(pkg: Path) -> list[list[int]]:
    s = GenerationSession(pkg, units=["reference"])
    return [list(s.generate(seq["prompt"], max_new_tokens=len(seq["new_ids"]))) for seq in SEQS]


@pytest.mark.slow
def test_fp32_package_reproduces_transformers_generate(lm_packages: dict[str, Path]) -> None:
    got = _generate(lm_packages["fp32"])
    for seq, ids in zip(SEQS, got, strict=True):
        assert ids == seq["new_ids"], f"prompt {seq['prompt']!r}"


@pytest.mark.slow
def test_fp16_package_differs_only_after_fp16_ties(lm_packages: dict[str, Path]) -> None:
    got = _generate(lm_packages["fp16"])
    same = 0
    for seq, ids in zip(SEQS, got, strict=True):
        want = seq["new_ids"]
        if ids == want:
            same += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ids, want, strict=False)) if a != b)
        tol = TIE_FP16_STEPS * float(_fp16_step(np.asarray(seq["top1_logits"][k])))
        assert seq["top2_margins"][k] <= tol, (f"prompt {seq['prompt']!r} diverges at step {k} where transformers' "
                                               f"top-2 margin {seq['top2_margins'][k]:.4g} exceeds the fp16 tie rule {tol:.4g}")
    assert same >= 7
