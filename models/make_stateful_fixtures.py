"""Oracles for stateful packages: transformers' BitNetForCausalLM with its DynamicCache, per step.

For every checkpoint folder under ``models/hf/`` this loads the folder with
``BitNetForCausalLM.from_pretrained(dtype=torch.float32)`` (as ``make_hf_fixtures.py`` does for the
``logits`` oracle) and writes ``models/hf_stateful/<folder>.npz``:

- ``input_ids`` int64 ``[1, P + N]``: a seeded random prompt of ``P`` tokens and ``N`` continuation tokens
- ``prefill_logits`` ``[P, V]``: one call over the prompt with an empty ``DynamicCache``
- ``decode_logits`` ``[N, V]``: then ``N`` one-token calls on the same cache, teacher-forced
  (token ``P+i`` of ``input_ids`` at step ``i``)
- ``greedy_tokens`` int64 ``[N]`` and ``greedy_logits`` ``[N, V]``: greedy generation from the prompt
  (prefill, then each step feeds the previous argmax)
- ``full_logits`` ``[P + N, V]``: one forward over all tokens without a cache (a consistency check the
  script asserts: the cached steps must agree with it)

Tests read these arrays; they never import torch. Run in the export venv:
``.venv-export/bin/python models/make_stateful_fixtures.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_hf_fixtures import _save_npz  # noqa: E402  (atomic .npz write)

PREFILL = 16
STEPS = 32
SEED = 14


def make_one(folder: Path, out: Path) -> dict[str, float]:
    from transformers import BitNetForCausalLM, DynamicCache

    model = BitNetForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(torch.float32)
    vocab = int(model.config.vocab_size)
    ids = np.random.default_rng(SEED).integers(0, vocab, (1, PREFILL + STEPS)).astype(np.int64)
    t = torch.from_numpy(ids)
    with torch.no_grad():
        full = model(input_ids=t, use_cache=False).logits[0].float().numpy()
        cache = DynamicCache()
        prefill = model(input_ids=t[:, :PREFILL], past_key_values=cache, use_cache=True).logits[0].float().numpy()
        steps = [model(input_ids=t[:, PREFILL + i:PREFILL + i + 1], past_key_values=cache,
                       use_cache=True).logits[0, -1].float().numpy() for i in range(STEPS)]
        decode = np.stack(steps)
        cache = DynamicCache()
        last = model(input_ids=t[:, :PREFILL], past_key_values=cache, use_cache=True).logits[0, -1]
        greedy, greedy_logits = [], []
        for _ in range(STEPS):
            tok = int(last.argmax())
            greedy.append(tok)
            last = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
            greedy_logits.append(last.float().numpy())
    cached = np.concatenate([prefill, decode])
    err = float(np.abs(cached - full).max() / np.abs(full).max())
    if err > 1e-5:
        raise RuntimeError(f"{folder.name}: DynamicCache steps differ from the full forward (rel max {err:.3g})")
    _save_npz(out, input_ids=ids, prefill_logits=prefill.astype(np.float32), decode_logits=decode.astype(np.float32),
              greedy_tokens=np.asarray(greedy, np.int64), greedy_logits=np.stack(greedy_logits).astype(np.float32),
              full_logits=full.astype(np.float32))
    return {"cached_vs_full_rel_max": err}


def main(root: Path = HERE) -> int:
    out_dir = root / "hf_stateful"
    out_dir.mkdir(exist_ok=True)
    report = {}
    for folder in sorted(p for p in (root / "hf").iterdir() if (p / "config.json").is_file()):
        report[folder.name] = make_one(folder, out_dir / f"{folder.name}.npz")
    (out_dir / "REPORT.json").write_text(json.dumps({"prefill": PREFILL, "steps": STEPS, "seed": SEED,
                                                     "folders": report}, indent=1, sort_keys=True) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
