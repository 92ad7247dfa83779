"""Write tiny Hugging Face BitNet checkpoint folders (config.json + model.safetensors) and their oracles.

Fixtures for the checkpoint importer (``bitnet_coreml.frontend`` loading a HF folder). Each folder is
written by transformers' own ``save_pretrained`` from a briefly trained, ternarised
``BitNetForCausalLM`` (as the bundled ONNX models: seeded Markov corpus, quantisation-aware training,
``bitnet_export.train_float_model``; random-init logits have top-2 gaps below fp16 noise, so an fp16
top-1 criterion would measure nothing on them); its ``logits.npz`` holds ``input_ids`` and the logits transformers computes when
it loads that folder back with ``BitNetForCausalLM.from_pretrained`` (its BitNet quantizer replaces the
linears on load, so the oracle is what transformers makes of the files):

- ``logits``: loaded with ``dtype=torch.float32`` (weights upcast exactly), transformers' own forward.
  This is the oracle for an fp32 executor.
- ``logits_native``: loaded in the checkpoint's own dtype (bf16 for the packed fixture), as a user
  would get by default.

Before writing the oracle the script proves the loaded model really holds the saved weights: with the
same eager BitLinear helpers on both sides, the loaded model's logits must equal the in-memory
model's bit for bit.

Run via ``models/make_models.py`` (``make models``) or directly:
``.venv-export/bin/python models/make_hf_fixtures.py``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitnet_export import (
    ModelSpec,
    TrainSpec,
    eager_bitlinear_helpers,
    make_input_ids,
    parity,
    random_float_model,
    ternarise_model,
    train_float_model,
)

log = logging.getLogger("make_hf_fixtures")

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class HFFixture:
    """One checkpoint folder: model shape, BitNet quantization_config, storage dtype, weight form."""

    folder: str
    linear_class: str  # bitlinear | autobitlinear
    weights: str  # packed (uint8 [out/4, in]) | ternary (float {-1,0,1} [out, in])
    dtype: str  # bfloat16 | float32
    tie_word_embeddings: bool
    spec: ModelSpec
    note: str
    train: TrainSpec | None = None  # None: random init (the GGUF fixture patches random_float_model itself)


_SHAPE = dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172, seq=16)

FIXTURES: tuple[HFFixture, ...] = (
    HFFixture(
        folder="bitnet-tiny-packed",
        linear_class="bitlinear",
        weights="packed",
        dtype="bfloat16",
        tie_word_embeddings=True,
        spec=ModelSpec(name="bitnet-tiny-packed", form="packed", seed=10, **_SHAPE),  # type: ignore[arg-type]
        # training seed 14, not 10: at 10, one activation at position 14 of logits.npz lies within float32
        # rounding of a .5 boundary of the 8-bit activation quantisation; the converted fp32 graph (ORT and
        # the executor alike) rounds it the other way than torch, moving those logits by up to 0.056. At 13
        # the stateful fp16 package differs from the stateless one by 1 fp16 ulp in one row (0.0078). The
        # tests now absorb both kinds of flip (tests/support/flips.py; all pass on fixtures trained at 10
        # and 13, flagging 1-2 positions); 14 stays so that the committed fixtures and the numbers measured
        # on them (docs/benchmarks/stateful.md) do not change.
        train=TrainSpec(states=_SHAPE["vocab"], seed=14),
        note="the microsoft/bitnet-b1.58-2B-4T layout: bf16, packed uint8 weights, weight_scale divides, "
        "tied embeddings (no lm_head.weight in the file)",
    ),
    HFFixture(
        folder="bitnet-tiny-autobitlinear",
        linear_class="autobitlinear",
        weights="ternary",
        dtype="float32",
        tie_word_embeddings=False,
        spec=ModelSpec(name="bitnet-tiny-autobitlinear", form="offline", seed=11, **_SHAPE),  # type: ignore[arg-type]
        train=TrainSpec(states=_SHAPE["vocab"], seed=11),
        note="offline AutoBitLinear as save_pretrained writes it: float weights in {-1,0,1}, "
        "weight_scale multiplies, separate lm_head",
    ),
    HFFixture(
        folder="bitnet-tiny-autobitlinear-packed",
        linear_class="autobitlinear",
        weights="packed",
        dtype="bfloat16",
        tie_word_embeddings=True,
        spec=ModelSpec(name="bitnet-tiny-autobitlinear-packed", form="packed", seed=12, **_SHAPE),  # type: ignore[arg-type]
        train=TrainSpec(states=_SHAPE["vocab"], seed=12),
        note="packed uint8 weights under linear_class autobitlinear (transformers unpacks them on load): "
        "same bytes layout as bitnet-tiny-packed but weight_scale MULTIPLIES (it is 1/s here)",
    ),
)


def _build(fx: HFFixture) -> tuple[Any, dict[str, Any] | None]:
    """In-memory model with the linears already replaced as transformers' quantizer would on load.

    Also returns the training summary (None for an untrained fixture).
    """
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    stats: dict[str, Any] | None = None
    if fx.train is not None:
        model, _, stats = train_float_model(fx.spec, fx.train, tie_word_embeddings=fx.tie_word_embeddings)
    else:
        model = random_float_model(fx.spec, tie_word_embeddings=fx.tie_word_embeddings)
    model = checkpoint_layers(model, dtype=fx.dtype, linear_class=fx.linear_class, weights=fx.weights)
    n_bit = sum(isinstance(m, (AutoBitLinear, BitLinear)) for m in model.modules())
    assert n_bit == 7 * fx.spec.layers, n_bit
    return model, stats


def checkpoint_layers(model: Any, *, dtype: str, linear_class: str, weights: str) -> Any:
    """A float BitNetForCausalLM cast to ``dtype`` with its linears as transformers' quantizer loads them."""
    from transformers.integrations.bitnet import BitLinear
    from transformers.utils.quantization_config import BitNetQuantConfig

    torch_dtype = getattr(torch, dtype)
    rope = model.model.rotary_emb
    inv_freq, orig_inv_freq = rope.inv_freq.clone(), rope.original_inv_freq.clone()
    model = model.to(torch_dtype)
    # from_pretrained keeps the RoPE frequencies (non-persistent buffers) in float32 whatever the
    # dtype; .to() would round them to bf16 and the in-memory reference would drift from the load.
    rope.inv_freq, rope.original_inv_freq = inv_freq, orig_inv_freq
    if linear_class == "bitlinear":
        ternarise_model(model, "packed")
    elif weights == "ternary":
        ternarise_model(model, "offline")
    else:
        # autobitlinear + packed storage: the packed bytes of BitLinear with the multiply convention.
        ternarise_model(model, "packed")
        for mod in model.modules():
            if isinstance(mod, BitLinear):
                with torch.no_grad():
                    mod.weight_scale.copy_((1.0 / mod.weight_scale.float()).to(torch_dtype))
    model.config.quantization_config = BitNetQuantConfig(linear_class=linear_class, quantization_mode="offline")
    return model


def _eager_packed_autobitlinear_forward(model: Any, ids: np.ndarray) -> np.ndarray:
    """In-memory reference for the autobitlinear-packed fixture: unpack, multiply by weight_scale.

    Its in-memory modules are BitLinear (which divides); what transformers loads is AutoBitLinear
    (which multiplies by the stored 1/s), so compute the reference with AutoBitLinear modules.
    """
    from bitnet_export import _unpack_weights_eager
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear

    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, BitLinear):
            new = AutoBitLinear(mod.in_features, mod.out_features, bias=False, dtype=mod.dtype, online_quant=False)
            with torch.no_grad():
                new.weight.copy_(_unpack_weights_eager(mod.weight, mod.dtype))
                new.weight_scale.copy_(mod.weight_scale)
            new.requires_grad_(False)
            ref.set_submodule(name, new)
    return _forward(ref, ids)


def _forward(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), use_cache=False).logits
    return out.float().numpy()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def make_fixture(fx: HFFixture, root: Path, adjust: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Write the folder ``root/fx.folder``; ``adjust(model)`` may edit the built model before it is saved."""
    from safetensors import safe_open
    from transformers import BitNetForCausalLM

    model, train_stats = _build(fx)
    if adjust is not None:
        adjust(model)
    ids = make_input_ids(fx.spec)
    with eager_bitlinear_helpers():
        if fx.linear_class == "autobitlinear" and fx.weights == "packed":
            mem = _eager_packed_autobitlinear_forward(model, ids)
        else:
            mem = _forward(model, ids)

    final = root / fx.folder
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fx.folder}-", dir=root))
    try:
        model.save_pretrained(tmp)
        # The oracle: what transformers computes from the files (its quantizer builds the layers).
        loaded_native = BitNetForCausalLM.from_pretrained(tmp).eval()
        loaded_fp32 = BitNetForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        # transformers 5.24 leaves the non-BitNet tensors of a packed *autobitlinear* checkpoint in
        # the file's bf16 under dtype=float32 (only the unpacked linears follow dtype): cast the rest.
        mixed = sorted({str(p.dtype) for p in loaded_fp32.parameters()})
        loaded_fp32 = loaded_fp32.to(torch.float32)
        with eager_bitlinear_helpers():
            same = _forward(loaded_native, ids)
        load_check = parity(mem, same)
        if load_check["max_abs"] != 0.0:
            raise RuntimeError(f"{fx.folder}: reloaded model differs from the in-memory one: {load_check}")
        native = _forward(loaded_native, ids)  # transformers' own (torch.compile'd) helpers
        fp32 = _forward(loaded_fp32, ids)
        kinds = sorted({type(m).__name__ for m in loaded_native.modules() if "BitLinear" in type(m).__name__})
        _save_npz(tmp / "logits.npz", input_ids=ids, logits=fp32.astype(np.float32),
                  logits_native=native.astype(np.float32))
        with safe_open(str(tmp / "model.safetensors"), "np" if fx.dtype == "float32" else "pt") as fh:
            tensors = {k: [fh.get_slice(k).get_dtype(), list(fh.get_slice(k).get_shape())] for k in fh.keys()}
        cfg = json.loads((tmp / "config.json").read_text())
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return {
        "folder": f"hf/{fx.folder}",
        "linear_class": fx.linear_class,
        "quantization_mode": "offline",
        "weights": fx.weights,
        "dtype": fx.dtype,
        "tie_word_embeddings": fx.tie_word_embeddings,
        "note": fx.note,
        **({"training": {**fx.train.to_dict(), **{k: round(v, 4) for k, v in train_stats.items()}}}
           if fx.train is not None and train_stats is not None else {}),
        "config": {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "rms_norm_eps")},
        "quantization_config": cfg.get("quantization_config"),
        "loaded_linear_classes": kinds,
        "fp32_load_param_dtypes_before_cast": mixed,
        "tensor_count": len(tensors),
        "tensors_sample": {k: v for k, v in tensors.items() if k.startswith("model.layers.0.self_attn.q_proj")
                           or k in ("model.embed_tokens.weight", "lm_head.weight")},
        "has_lm_head": "lm_head.weight" in tensors,
        "reload_vs_in_memory_eager": load_check,
        "native_vs_fp32": parity(fp32, native),
        "files_bytes": {p.name: p.stat().st_size for p in sorted(final.iterdir())},
    }


def make_all(root: Path | None = None) -> list[dict[str, Any]]:
    root = (root or HERE / "hf").resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for fx in FIXTURES:
        log.info("writing %s", fx.folder)
        results.append(make_fixture(fx, root))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for r in make_all():
        print(json.dumps(r, indent=1))
