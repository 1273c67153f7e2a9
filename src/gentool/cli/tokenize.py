"""`gentool tokenize train|encode|decode`: SentencePiece tokenizers and token shards."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gentool.cli._options import Force, Json, Output, Seed, examples

app = typer.Typer(name="tokenize", help="Train a tokenizer, encode text into token shards, decode ids.",
                  no_args_is_help=True)
Inputs = Annotated[list[str], typer.Argument(help="Text files, directories (recursive), - for stdin, or "
                                                  "builtin:shakespeare (the bundled corpus).")]
Glob = Annotated[str, typer.Option("--glob", help="File pattern inside directories.")]


@app.command(epilog=examples("gentool tokenize train builtin:shakespeare -o tok --vocab-size 2048",
                             "cat notes/*.txt | gentool tokenize train - -o tok --model-type unigram"))
def train(
    inputs: Inputs,
    output: Output,
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=1, help="Vocabulary size.")] = 4096,
    model_type: Annotated[str, typer.Option("--model-type", help="bpe or unigram.")] = "bpe",
    character_coverage: Annotated[float, typer.Option(min=0, max=1,
                                                      help="Share of characters covered by pieces (the rarest "
                                                           "others fall back to bytes).")] = 0.9995,
    byte_fallback: Annotated[bool, typer.Option(help="Unknown characters become UTF-8 byte tokens.")] = True,
    user_symbols: Annotated[str | None, typer.Option("--user-symbols", help="Comma-separated symbols kept "
                                                                            "whole.")] = None,
    input_sentence_size: Annotated[int, typer.Option(min=1, help="Lines sampled (uniformly) for training at most; "
                                                                 "0: all.")] = 2_000_000,
    glob: Glob = "*.txt",
    seed: Seed = 0,
    force: Force = False,
    json_: Json = False,
) -> None:
    """Train a SentencePiece tokenizer (unk=0 bos=1 eos=2 pad=3).

    Text is read as UTF-8; invalid bytes are replaced by U+FFFD with a warning that counts them. Normalisation is
    the identity and byte fallback is on, so decode(encode(text)) == text for any text.
    """
    from gentool import console
    from gentool.tokenize import train_tokenizer

    symbols = [s for s in (user_symbols or "").split(",") if s]
    m = train_tokenizer(inputs, output, vocab_size=vocab_size, model_type=model_type,
                        character_coverage=character_coverage, byte_fallback=byte_fallback, user_symbols=symbols,
                        input_sentence_size=input_sentence_size, glob=glob, seed=seed, force=force)
    console.log(f"wrote {output}")
    console.emit(m.to_dict() if json_ else {"output": str(output), **m.contents, **m.metrics}, as_json=json_)


@app.command(epilog=examples("gentool tokenize encode builtin:shakespeare --tokenizer tok -o tokens",
                             "gentool tokenize encode data.jsonl --tokenizer tok -o tokens --text-field body",
                             "gentool tokenize encode 'fineweb/*.parquet' --tokenizer tok -o tokens",
                             "gentool tokenize encode chats.jsonl --tokenizer ckpt -o sft --max-len 1024"))
def encode(
    inputs: Inputs,
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="Tokenizer artifact, or a checkpoint's "
                                            "tokenizer.model / tokenizer.json (or its directory).")],
    output: Output,
    val_fraction: Annotated[float, typer.Option(min=0, max=1, help="Share of documents in the val split.")] = 0.05,
    split_seed: Annotated[int, typer.Option(min=0, help="Seed of the train/val split.")] = 0,
    document: Annotated[str, typer.Option("--document", help="auto (JSONL records for .jsonl, else blank-line "
                                                             "blocks), file, blank-line or jsonl.")] = "auto",
    text_field: Annotated[str, typer.Option(help="JSONL field or Parquet/Arrow column holding the text.")] = "text",
    shard_tokens: Annotated[int, typer.Option(min=1, help="Tokens per shard file.")] = 1 << 24,
    workers: Annotated[int, typer.Option(min=0, help="Encoding processes (0: all cores); the result does not depend "
                                                     "on it.")] = 0,
    glob: Glob = "*.txt",
    format_: Annotated[str, typer.Option("--format", help="auto (from the JSONL keys), text, chat, "
                                                          "prompt-completion or preference.")] = "auto",
    train_on: Annotated[str | None, typer.Option(help="Loss mask: assistant (chats), completion or all.")] = None,
    max_len: Annotated[int | None, typer.Option(min=2, help="Examples' token limit (chat/pairs).")] = None,
    overlong: Annotated[str, typer.Option(help="Over --max-len: truncate or drop (counted).")] = "truncate",
    force: Force = False,
    json_: Json = False,
) -> None:
    """Encode text, chats or preference pairs into train/val token shards.

    Text documents end with EOS. Chat, prompt-completion and preference JSONL (--format, auto-detected from the
    keys) become example shards with a loss mask, or pairs kept together (gentool.tokenize_examples).

    Streams the corpus with bounded memory across all cores; the split is by document and deterministic. The
    manifest counts documents, tokens and UTF-8 bytes per split (for bits per byte). Invalid UTF-8 bytes are
    replaced by U+FFFD with a warning that counts them. Inputs may be gzip or zstd compressed (.gz, .zst), Parquet
    (a document per row, a row group at a time) or a directory written by datasets' save_to_disk (Parquet and zstd
    need pip install 'gentool[data]'); null or empty cells are skipped and counted.
    """
    from gentool import console
    from gentool.tokenize import encode_corpus
    from gentool.tokenize_examples import detect_format, encode_examples

    fmt = detect_format(inputs, format_, glob, text_field, train_on=train_on, max_len=max_len, overlong=overlong)
    if fmt != "text":
        m = encode_examples(inputs, tokenizer, output, fmt=fmt, train_on=train_on, max_len=max_len,
                            overlong=overlong, val_fraction=val_fraction, split_seed=split_seed, force=force,
                            glob="*.jsonl" if glob == "*.txt" else glob)
        console.log(f"wrote {output}")
        return console.emit(m.to_dict() if json_ else {"output": str(output), **{k: v for k, v in m.contents.items()
                            if k != "splits"}}, as_json=json_)
    m = encode_corpus(inputs, tokenizer, output, val_fraction=val_fraction, split_seed=split_seed, unit=document,
                      text_field=text_field, shard_tokens=shard_tokens, workers=workers, glob=glob, force=force)
    console.log(f"wrote {output}")
    if json_:
        console.emit(m.to_dict(), as_json=True)
    else:
        rows = {f"{s}_{k}": v[k] for s, v in m.contents["splits"].items() for k in ("documents", "tokens", "bytes")}
        console.emit({"output": str(output), **rows, "mb_per_s": m.metrics["mb_per_s"]}, as_json=False)


@app.command(epilog=examples("gentool tokenize decode tokens --tokenizer tok --split val --count 200",
                             "echo '[310, 297, 1200]' | gentool tokenize decode - --tokenizer tok"))
def decode(
    source: Annotated[str, typer.Argument(help="A token-shards directory, or - for ids on stdin.")] = "-",
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", "-t", help="Tokenizer artifact (or an "
                                                                             "LM checkpoint).")] = None,
    split: Annotated[str, typer.Option(help="Split of a shards artifact.")] = "val",
    start: Annotated[int, typer.Option(min=0, help="First token of the slice.")] = 0,
    count: Annotated[int, typer.Option(min=0, help="Tokens in the slice (0: to the end).")] = 0,
) -> None:
    """Decode token ids (a shard slice or ids on stdin) to text on stdout."""
    from gentool.data.tokenizer import load_tokenizer
    from gentool.errors import UsageProblem
    from gentool.tokenize import parse_ids

    if tokenizer is None:
        raise UsageProblem("--tokenizer is required", hint="pass the tokenizer artifact the ids came from")
    tok = load_tokenizer(tokenizer)
    if source == "-":
        ids = parse_ids(sys.stdin.read())
    else:
        from gentool.data.shards import open_shards

        shards = open_shards(source, split)
        if shards.tokenizer_id != tok.sha256:
            raise UsageProblem("the shards were encoded with another tokenizer", path=source,
                               hint="pass the tokenizer artifact used by `tokenize encode`")
        if start >= len(shards) and len(shards):
            raise UsageProblem(f"--start {start} is past the end of the {split} split ({len(shards):,} tokens)",
                               path=source, hint=f"use --start below {len(shards)}")
        ids = shards.tokens(start, min(start + count, len(shards)) if count else len(shards)).tolist()
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise UsageProblem(f"token id {bad[0]} is outside the vocabulary (size {tok.vocab_size})")
    sys.stdout.write(tok.decode(ids))
    sys.stdout.flush()
