"""``bitnet-coreml generate PACKAGE --prompt TEXT``: stream generated text from a stateful package.

Text goes to stdout as it is produced; time to first token, prefill and decode rates and the unit
that answered go to stderr (``--json``: one JSON document on stdout with all of it and the token
ids). When a unit fails mid-sequence the session rebuilds the state on the next unit of ``--units``
and the text does not change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bitnet_coreml.commands._common import echo_json
from bitnet_coreml.errors import InputError


def _parse_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError("--ids: empty; give comma-separated token ids, e.g. --ids 1,2,3")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--ids {text!r}: not comma-separated integers, e.g. --ids 1,2,3") from None


def _prompt(prompt: str | None, prompt_file: Path | None, ids: str | None) -> str | list[int]:
    given = [x is not None for x in (prompt, prompt_file, ids)]
    if sum(given) != 1:
        raise InputError("give exactly one of --prompt TEXT, --prompt-file FILE or --ids 1,2,3")
    if ids is not None:
        return _parse_ids(ids)
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise InputError(f"--prompt-file {prompt_file}: no such file")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--prompt-file {prompt_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    assert prompt is not None
    if not prompt:
        raise InputError("the prompt is empty" + (f" ({prompt_file})" if prompt_file else ""))
    return prompt


def _rate(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "-"


@click.command(name="generate")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="Prompt text (encoded with the package's tokenizer).")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a UTF-8 file.")
@click.option("--ids", default=None, help="Prompt as comma-separated token ids (no tokenizer needed).")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; > 0: sample.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k best tokens (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1: off).")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="> 1 discourages repeats.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler: same seed, same tokens.")
@click.option("--stop", multiple=True, help="Stop once the new text contains this string (repeatable).")
@click.option("--units", default="ane,gpu,cpu,reference", show_default=True,
              help="Unit chain, comma separated, from: ane, gpu, cpu, reference.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Folder with tokenizer.json, for a package that carries none.")
@click.option("--fp32", is_flag=True, help="Reference executor: compute fp16 ops in fp32 (no fp16 rounding).")
@click.option("--engine", "decode_engine", type=click.Choice(["auto", "stored", "fused", "interpreter"]), default="auto",
              show_default=True, help="Reference unit's decode: the fused kernel on the package's stored table "
              "(stored: no coremltools, prefill as decode steps), else translated at load (fused), else the op-by-op "
              "interpreter; auto takes the first that works.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (text, ids, timings, recovery) on stdout.")
def generate(package: Path, prompt: str | None, prompt_file: Path | None, ids: str | None, max_new_tokens: int,
             temperature: float, top_k: int, top_p: float, repetition_penalty: float, seed: int | None,
             stop: tuple[str, ...], units: str, tokenizer_dir: Path | None, fp32: bool, decode_engine: str, as_json: bool) -> None:
    """Generate text from a stateful PACKAGE (`convert --stateful`), streaming it to stdout."""
    from bitnet_coreml.generation import GenerationSession, SamplingConfig, TextStream
    from bitnet_coreml.runtime import ComputeUnit, FallbackStrategy

    source = _prompt(prompt, prompt_file, ids)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    strategy = FallbackStrategy(units=tuple(ComputeUnit.parse(u) for u in units.split(",") if u.strip()))
    session = GenerationSession(package, tokenizer=tokenizer_dir, fp32=fp32, strategy=strategy,
                                decode_engine=decode_engine)
    if isinstance(source, str) and session.tokenizer is None:
        raise InputError(f"{package}: carries no tokenizer; give --tokenizer DIR (a folder with tokenizer.json) "
                         "or the prompt as token ids with --ids")
    # the text shown: incomplete UTF-8 and a possible start of a stop string held back, cut before a stop
    # string (matched on complete text; generation/tokenizer.py TextStream)
    stream = TextStream(session.tokenizer, stop) if session.tokenizer is not None else None
    new: list[int] = []
    text = ""  # what was written to stdout
    for tok in session.generate(source, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, text=stream):
        new.append(tok)
        if stream is None:
            if not as_json:
                click.echo(f"{tok} ", nl=False)
        elif len(stream.text) > len(text):
            if not as_json:
                click.echo(stream.text[len(text):], nl=False)
                sys.stdout.flush()
            text = stream.text
    if stream is not None and len(stream.text) > len(text):  # what the end of the generation released
        if not as_json:
            click.echo(stream.text[len(text):], nl=False)
        text = stream.text
    st = session.stats
    doc: dict[str, Any] = {
        "package": str(package), "unit": st.unit, "decode_engine": st.decode_engine,
        "decode_engine_note": st.decode_note, "prompt_ids": session.tokens[:st.prompt_tokens],
        "new_ids": new, "text": text if stream is not None else None, "stop_reason": st.stop_reason,
        "ttft_s": st.ttft_s, "prefill_s": st.prefill_s, "prefill_tok_s": st.prefill_tok_s,
        "decode_s": st.decode_s, "decode_tok_s": st.decode_tok_s, "load_s": session.load_s,
        "recoveries": st.recoveries, "recovery_stats": session.get_recovery_stats().to_dict(),
        "sampling": vars(sampling),
    }
    if as_json:
        echo_json(doc)
        return
    click.echo("")
    ttft = f"{st.ttft_s * 1e3:.0f} ms" if st.ttft_s is not None else "-"
    unit = f"{st.unit}, {st.decode_engine} decode" if st.decode_engine else st.unit
    click.echo(f"[{unit}] {st.prompt_tokens} prompt tokens, {len(new)} new ({st.stop_reason}); "
               f"time to first token {ttft}, prefill {_rate(st.prefill_tok_s)} tok/s, "
               f"decode {_rate(st.decode_tok_s)} tok/s", err=True)
    if st.decode_note and st.decode_engine != "stored":
        click.echo(f"decode: {st.decode_engine} ({st.decode_note})", err=True)
    for r in st.recoveries:
        if "from" in r:
            click.echo(f"recovered: {r['from']} failed at token {r['at_token']} ({r['reason']})", err=True)
