"""Import: ONNX files, Hugging Face BitNet checkpoint folders and BitNet GGUF files into onnx-ir models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx_ir as ir

from bitnet_coreml._files import regular_file
from bitnet_coreml.errors import ModelLoadError
from bitnet_coreml.frontend.convertible import dynamic_inputs, fix_dynamic_inputs
from bitnet_coreml.frontend.onnx_import import load_onnx

__all__ = ["load", "load_onnx", "is_checkpoint_dir", "is_gguf", "builds_graph", "source_problem", "source_config",
           "source_assets", "seq_len_note", "SOURCES_ALLOWED"]

DEFAULT_SEQ_LEN = 64
# The input formats, said once: a new format adds its test here (and in ``load``), and every command,
# the pipeline spec and the stateful checks follow.
SOURCE_SUFFIXES = (".onnx", ".gguf")
SOURCES_ALLOWED = "an .onnx file, a .gguf file or a Hugging Face checkpoint folder"


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """A ``*.gguf`` file (llama.cpp's format): imported by ``frontend.gguf_model``."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and not p.is_dir()


def builds_graph(path: str | os.PathLike[str]) -> bool:
    """True for sources whose graph the importer builds at a chosen ``seq_len`` (checkpoint folder, GGUF file)."""
    return is_checkpoint_dir(path) or is_gguf(path)


def source_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a model source, judged from its kind alone (``None``: it may be one; ``load`` decides)."""
    p = Path(path)
    if p.is_dir():
        return None if (p / "config.json").is_file() else f"folder '{p}' has no config.json; allowed: {SOURCES_ALLOWED}"
    if p.is_file() and p.suffix.lower() not in SOURCE_SUFFIXES:
        return f"'{p}' is not an .onnx or .gguf file; allowed: {SOURCES_ALLOWED}"
    return None


def source_config(path: str | os.PathLike[str], *, allow_dequant: bool = False) -> Any:
    """The decoder configuration (``hf_config.BitNetConfig``) of a checkpoint folder or a BitNet GGUF file."""
    if is_gguf(path):
        from bitnet_coreml.frontend.gguf_model import open_gguf

        return open_gguf(path, allow_dequant=allow_dequant)[0]
    from bitnet_coreml.frontend.hf_config import read_config

    return read_config(Path(path))


def seq_len_note(path: str | os.PathLike[str], seq_len: int | None) -> str | None:
    """The note a command prints when a checkpoint or GGUF gets the default sequence length (None otherwise)."""
    if seq_len is not None or not builds_graph(path):
        return None
    return (f"{Path(path).name}: no --seq-len given; the graph takes {DEFAULT_SEQ_LEN} tokens (the default; "
            "Core ML needs a fixed length). Give --seq-len N for another length")


def source_assets(path: str | os.PathLike[str]) -> tuple[Mapping[str, bytes], list[str]]:
    """Files a package converted from ``path`` should carry (``package.assets``), with notes on what was done.

    A GGUF file: its tokenizer rebuilt as ``tokenizer.json`` (``frontend.gguf_tokenizer``) and a
    ``generation_config.json`` with its bos/eos ids. A Hugging Face checkpoint folder with a
    ``tokenizer.json``: it and ``tokenizer_config.json`` / ``generation_config.json`` as they are
    (``package.assets.CHECKPOINT_ASSETS``), what ``generate`` reads; nothing for a folder without one.
    A GGUF's files are built when first read (checked now, so the note is known).
    """
    if Path(path).is_dir():
        from bitnet_coreml.package.assets import checkpoint_assets

        found = checkpoint_assets(path)
        if "tokenizer.json" not in found:
            return {}, []
        return found, [f"{', '.join(sorted(found))} from the checkpoint written to the package"]
    if not is_gguf(path):
        return {}, []
    from bitnet_coreml.frontend.gguf_file import scan
    from bitnet_coreml.frontend.gguf_tokenizer import generation_config, tokenizer_builder

    meta = scan(path).metadata
    build, how = tokenizer_builder(meta)
    if build is None:
        return {}, [f"no tokenizer written to the package: {how}"]
    return (_LazyAssets({"tokenizer.json": build, "generation_config.json": lambda: generation_config(meta)}),
            [f"tokenizer.json from the GGUF ({how}) written to the package"])


class _LazyAssets(Mapping[str, bytes]):
    """Asset files built when first read: a GGUF's tokenizer is rebuilt when the package is written, after the
    conversion's memory peak, not held through it."""

    def __init__(self, builders: dict[str, Callable[[], bytes]]) -> None:
        self._builders, self._built = builders, {}

    def __getitem__(self, name: str) -> bytes:
        if name not in self._built:
            self._built[name] = self._builders[name]()
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def load(path: str | os.PathLike[str], *, seq_len: int | None = None, embed_dtype: str = "float32",
         allow_dequant: bool = False) -> ir.Model:
    """Load a model from an ``.onnx`` file, a Hugging Face BitNet checkpoint folder or a BitNet ``.gguf`` file.

    ``seq_len`` fixes the sequence length of a checkpoint's graph (Core ML wants fixed shapes), and
    of an ONNX graph exported with dynamic axes (``frontend.convertible``: a dynamic batch becomes 1;
    an ONNX file with fixed shapes ignores it); ``embed_dtype`` (``"float32"`` or ``"float16"``) is
    the dtype a checkpoint's bf16 embedding and lm_head are declared in (fp16 halves the memory of an
    fp16 build and is exact for bf16 values in fp16's range); ONNX files ignore it. ``allow_dequant``
    lets a GGUF file's tensors of other ggml types (and ternary layers whose block scales vary within
    a row) be dequantised instead of refused (see ``frontend.gguf_model``).
    """
    p = Path(path)
    if is_gguf(p):
        if not p.is_file():
            raise ModelLoadError(f"{p}: no such file")
        from bitnet_coreml.frontend.gguf_model import load_gguf

        return load_gguf(p, seq_len=seq_len or DEFAULT_SEQ_LEN, embed_dtype=embed_dtype, allow_dequant=allow_dequant)
    if p.is_dir():
        if (p / "config.json").exists():
            regular_file(p / "config.json", "config.json", error=ModelLoadError)
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{p}: is a folder without config.json; expected an .onnx file or a Hugging Face BitNet checkpoint folder"
            )
        from bitnet_coreml.frontend.hf_checkpoint import load_checkpoint

        return load_checkpoint(p, seq_len=DEFAULT_SEQ_LEN if seq_len is None else seq_len, embed_dtype=embed_dtype)
    model = load_onnx(p)
    if seq_len is not None and dynamic_inputs(model):
        fix_dynamic_inputs(model, seq_len, str(p))
    return model
