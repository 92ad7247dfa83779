"""Streaming text and stop strings over tokens that end inside UTF-8 characters (``TextStream``, ``generate``).

The rules (``generation/tokenizer.py`` TextStream, README ``generate``): an incomplete UTF-8 tail is held
back while streaming; stop strings are matched on the complete text, so a stop string containing U+FFFD
matches only a U+FFFD the user would see (invalid bytes, or the character itself), never a character still
being completed. Oracles: expected deltas written out by hand, and Python's own UTF-8 decoder
(``bytes.decode(errors="replace")``) on the bytes of the generated ids for the command over the tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from bitnet_coreml.cli import main
from bitnet_coreml.generation import TextStream, TextTokenizer
from bitnet_coreml.package.assets import write_assets

FFFD = "\ufffd"


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what a byte-level BPE vocabulary is written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_CHAR = _byte_chars()
CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHAR)}


def _tokenizer(extra: list[bytes] = ()) -> tuple[TextTokenizer, dict[int, bytes]]:
    """Byte-level BPE: ids 0..255 are the bytes, then one token per entry of ``extra`` (several bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    assert set(BYTE_CHAR) == set(pre_tokenizers.ByteLevel.alphabet())
    pieces = [bytes([b]) for b in range(256)] + list(extra)
    vocab = {"".join(BYTE_CHAR[b] for b in p): i for i, p in enumerate(pieces)}
    assert len(vocab) == len(pieces)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return TextTokenizer(tokenizer=tok, where="test"), dict(enumerate(pieces))


TOK, _ = _tokenizer([b"a\xc3"])  # id 256: "a" and the first byte of a two-byte character
A_C3 = 256


def _ids(data: bytes) -> list[int]:
    return list(data)  # ids 0..255 are the bytes themselves


def _push(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(i) for i in ids]


def test_an_incomplete_character_is_held_until_it_completes() -> None:
    s = TextStream(TOK)
    assert _push(s, _ids("aé€b".encode())) == ["a", "", "é", "", "", "€", "b"]
    assert s.flush() == "" and s.text == "aé€b" and not s.stopped


def test_only_the_incomplete_tail_of_a_token_is_held() -> None:
    s = TextStream(TOK)
    assert _push(s, [A_C3, 0xA9, ord("x")]) == ["a", "é", "x"]  # "a" + C3 in one token, then A9


def test_a_tail_that_never_completes_is_released_as_the_tokenizer_decodes_it() -> None:
    s = TextStream(TOK)
    assert _push(s, [ord("a"), 0xC3]) == ["a", ""]
    assert s.flush() == FFFD and s.text == "a" + FFFD
    s = TextStream(TOK)  # invalid bytes followed by text: released with that text
    assert _push(s, [ord("a"), 0xC3, ord("b")]) == ["a", "", FFFD + "b"]


def test_stop_strings_match_complete_text_and_a_possible_start_is_held() -> None:
    s = TextStream(TOK, ["é"])
    assert _push(s, _ids(b"xa\xc3\xa9y")[:4]) == ["x", "a", "", ""] and s.stopped and s.text == "xa"
    assert s.push(ord("y")) == "" and s.flush() == "" and s.text == "xa"
    s = TextStream(TOK, ["END"])  # "E", "EN" could start END: held; "ENd" cannot
    assert _push(s, _ids(b"xENd")) == ["x", "", "", "ENd"]
    s = TextStream(TOK, ["END"])
    assert _push(s, _ids(b"xEND")) == ["x", "", "", ""] and s.stopped and s.text == "x"
    s = TextStream(TOK, ["EN"])  # the generation ends with a possible start: released by flush
    assert _push(s, _ids(b"xE")) == ["x", ""] and s.flush() == "E" and s.text == "xE" and not s.stopped
    s = TextStream(TOK, ["abc", "bd!"])  # "ab" may start either; then "bd" may start bd!: "a" is released
    assert _push(s, _ids(b"xabd?")) == ["x", "", "", "a", "bd?"] and not s.stopped


def test_a_stop_string_with_fffd_matches_only_a_fffd_the_user_sees() -> None:
    s = TextStream(TOK, [FFFD])  # é arrives in two tokens: its first byte alone is never a match
    assert _push(s, _ids("aé".encode())) == ["a", "", "é"] and s.flush() == "" and not s.stopped
    s = TextStream(TOK, [FFFD])  # C3 followed by "b": invalid bytes, shown as U+FFFD: a match
    assert _push(s, [ord("a"), 0xC3, ord("b")]) == ["a", "", ""] and s.stopped and s.text == "a"
    s = TextStream(TOK, [FFFD])  # the generation ends inside a character: that U+FFFD is shown: a match
    assert _push(s, [ord("a"), 0xC3]) == ["a", ""] and s.flush() == "" and s.stopped and s.text == "a"
    s = TextStream(TOK, ["b" + FFFD])  # the character U+FFFD itself (EF BF BD)
    assert _push(s, _ids(b"ab\xef\xbf\xbdz")) == ["a", "", "", "", "", ""] and s.stopped and s.text == "a"


def _expected(pieces: dict[int, bytes], ids: list[int], stop: str | None) -> tuple[str, int, bool]:
    """(text, tokens generated, stopped) by the rules above, with Python's UTF-8 decoder as the oracle."""
    def shown(k: int, final: bool) -> str:
        t = b"".join(pieces[i] for i in ids[:k]).decode("utf-8", errors="replace")
        return t if final else t.rstrip(FFFD)

    for k in range(1, len(ids) + 1):
        t = shown(k, final=False)
        if stop and stop in t:
            return t[:t.find(stop)], k, True
    t = shown(len(ids), final=True)
    if stop and stop in t:
        return t[:t.find(stop)], len(ids), True
    return t, len(ids), False


def test_generate_streams_and_stops_on_the_tiny_model(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    """A byte-level tokenizer over the tiny model's 512 ids (256 bytes + 256 two-byte tokens): what it
    generates is mostly partial and invalid UTF-8."""
    tok, pieces = _tokenizer([bytes([0xC3 + i % 4, 0x80 + i // 4]) for i in range(256)])
    pkg = tmp_path / "bytes.mlpackage"
    shutil.copytree(tiny_packages["fp16"], pkg)
    write_assets(pkg, {"tokenizer.json": tok.tokenizer.to_str().encode()})
    args = ["generate", str(pkg), "--ids", "5,17,301,44,9", "-n", "24", "--units", "reference"]
    doc = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    ids = doc["new_ids"]
    assert len(ids) == 24 and doc["stop_reason"] == "max_new_tokens"
    text, _, _ = _expected(pieces, ids, None)
    assert doc["text"] == text and FFFD in text  # the case this test is for: invalid bytes in the output
    streamed = CliRunner().invoke(main, args)
    assert streamed.exit_code == 0 and streamed.stdout == text + "\n"
    for stop in (FFFD, text[len(text) // 2:len(text) // 2 + 2]):
        want, k, stopped = _expected(pieces, ids, stop)
        r = CliRunner().invoke(main, [*args, "--stop", stop, "--json"])
        got = json.loads(r.stdout)
        assert (got["text"], got["new_ids"], got["stop_reason"]) == (want, ids[:k], "stop" if stopped else
                                                                      "max_new_tokens")
        r = CliRunner().invoke(main, [*args, "--stop", stop])
        assert r.exit_code == 0 and r.stdout == want + "\n"


def test_an_empty_stop_string_is_ignored() -> None:
    s = TextStream(TOK, [""])
    assert _push(s, _ids(b"ab")) == ["a", "b"] and s.flush() == "" and not s.stopped
