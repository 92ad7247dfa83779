"""Text <-> token ids for generation: Hugging Face ``tokenizers`` reading ``tokenizer.json``.

No transformers at run time. The tokenizer comes from a package's assets (``convert --stateful``
copies ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` into it, see
``package/assets.py``) or from a checkpoint folder (``--tokenizer DIR``). The end-of-sequence ids
come from ``generation_config.json`` (``eos_token_id``: an id or a list), else from the
``eos_token`` of ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitnet_coreml.errors import InputError, ModelLoadError
from bitnet_coreml.package.assets import CHECKPOINT_ASSETS, checkpoint_assets, read_asset


def _json(data: bytes | None, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return []


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # AddedToken form
        return str(value["content"])
    return None


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids generation stops at."""

    tokenizer: Any
    where: str
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_files(cls, files: dict[str, bytes], where: str) -> TextTokenizer:
        """Build from ``{file name: bytes}`` (a package's assets or a folder's files)."""
        from tokenizers import Tokenizer

        raw = files.get("tokenizer.json")
        if raw is None:
            raise InputError(f"{where}: no tokenizer.json (give --tokenizer DIR with a tokenizer.json, or --ids)")
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise ModelLoadError(f"{where}/tokenizer.json: not a tokenizers file: {' '.join(str(e).split())}") from None
        gen = _json(files.get("generation_config.json"), f"{where}/generation_config.json")
        cfg = _json(files.get("tokenizer_config.json"), f"{where}/tokenizer_config.json")
        eos = _ids(gen.get("eos_token_id"))
        if not eos:
            text = _token_text(cfg.get("eos_token"))
            tid = tok.token_to_id(text) if text else None
            eos = [tid] if tid is not None else []
        bos = _ids(gen.get("bos_token_id"))
        if not bos:
            text = _token_text(cfg.get("bos_token"))
            tid = tok.token_to_id(text) if text else None
            bos = [tid] if tid is not None else []
        return cls(tokenizer=tok, where=where, eos_ids=tuple(eos), bos_id=bos[0] if bos else None,
                   generation_config=gen)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> TextTokenizer:
        """The tokenizer of a checkpoint folder (``tokenizer.json`` and the optional configs)."""
        root = Path(folder)
        if not root.is_dir():
            raise InputError(f"{root}: --tokenizer must be a folder holding tokenizer.json")
        return cls.from_files(checkpoint_assets(root), str(root))

    @classmethod
    def from_package(cls, package: str | os.PathLike[str]) -> TextTokenizer | None:
        """The tokenizer a package carries in its assets, or None when it carries none."""
        # only these assets (another, such as the stored decode table, is never read into memory here)
        files = {n: b for n in CHECKPOINT_ASSETS if (b := read_asset(package, n)) is not None}
        if "tokenizer.json" not in files:
            return None
        return cls.from_files(files, f"{package} (assets)")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's own special-token template (BOS where it adds one)."""
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


class TextStream:
    """Incremental detokenisation with stop strings: the text a user is shown, as tokens arrive.

    - **Incomplete UTF-8 is held back.** A byte-level token can end inside a multi-byte character; the
      tokenizer decodes such a tail to U+FFFD until a later token completes it. The *complete* text is
      the decode without its trailing run of U+FFFD; the run is released once a later token adds other
      text after it (then it was not a character being completed but invalid bytes, or U+FFFD itself)
      or at :meth:`flush` (the generation ended: what is left is shown as the tokenizer decodes it).
    - **Stop strings are matched on the complete text only**, so a stop string containing U+FFFD matches
      a U+FFFD the user would see (the character itself, or the replacement of bytes that never became a
      character), never a character still being completed. The text ends before the first match.
    - While streaming, a complete tail that could begin a stop string is held back too.

    :attr:`text` is what may be shown so far; :attr:`stopped` says a stop string was found.
    """

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.complete = ""  # the decode of ``ids`` without a tail that may still change
        self.text = ""  # what may be shown: ``complete`` up to a stop string, minus a possible stop prefix
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text it releases (often empty)."""
        self.ids.append(token)
        return self._release(self.tokenizer.decode(self.ids).rstrip("\ufffd"), final=False)

    def flush(self) -> str:
        """The generation ended: release everything (up to a stop string); returns what that adds."""
        return self._release(self.tokenizer.decode(self.ids), final=True)

    def _release(self, done: str, final: bool) -> str:
        if self.stopped:
            return ""
        if done.startswith(self.complete):  # (else the decode of earlier tokens changed: wait for it)
            self.complete = done
        kept, self.stopped = cut_at_stop(self.complete, self.stops)
        end = len(kept) if self.stopped or final else len(kept) - self._stop_start(kept)
        if end <= len(self.text):
            return ""
        delta = kept[len(self.text):end]
        self.text = kept[:end]
        return delta

    def _stop_start(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string (held back while streaming)."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any of ``stops`` (excluded), and whether one occurred."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
