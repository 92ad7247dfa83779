"""Import: ONNX files and Hugging Face BitNet checkpoint folders into onnx-ir models."""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend.onnx_import import load_onnx

__all__ = ["load", "load_onnx", "is_checkpoint_dir"]

DEFAULT_SEQ_LEN = 64


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load(path: str | os.PathLike[str], *, seq_len: int | None = None, embed_dtype: str = "float32") -> ir.Model:
    """Load a model from an ``.onnx`` file or a Hugging Face BitNet checkpoint folder.

    ``seq_len`` fixes the sequence length of a checkpoint's graph (Core ML wants fixed shapes);
    ``embed_dtype`` (``"float32"`` or ``"float16"``) is the dtype a checkpoint's bf16 embedding and
    lm_head are declared in (fp16 halves the memory of an fp16 build and is exact for bf16 values in
    fp16's range). ONNX files carry their own shapes and dtypes and ignore both.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{p}: is a folder without config.json; expected an .onnx file or a Hugging Face BitNet checkpoint folder"
            )
        from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint  # noqa: PLC0415

        return load_checkpoint(p, seq_len=seq_len or DEFAULT_SEQ_LEN, embed_dtype=embed_dtype)
    return load_onnx(p)
