"""Tokenizer training and corpus encoding into token shards (the `gentool tokenize` area).

Text is read as UTF-8; invalid bytes are replaced by U+FFFD and counted (a warning says how many), never fatal.
Documents: one per blank-line-separated block of a text file (default), one per file (`file`), or one per JSONL
record's text field (`jsonl`, the default for .jsonl files). Documents are separated by EOS in the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from gentool import console
from gentool.artifacts import check_output, create_artifact, input_ref, read_artifact
from gentool.data.tokenizer import SPECIAL_IDS, Tokenizer, file_id
from gentool.errors import GentoolError, UsageProblem

BUILTIN = "builtin:"


def bundled_corpus(name: str = "shakespeare") -> Path:
    path = Path(__file__).parent / "data" / "bundled" / name
    if not path.is_dir():
        raise UsageProblem(f"no bundled corpus {name!r}", hint="use builtin:shakespeare, "
                           "builtin:shakespeare/tragedies or builtin:shakespeare/comedies")
    return path


def expand_inputs(inputs: list[str], glob: str = "*.txt") -> list[Path | str]:
    """Files, directories (recursively, filtered by glob), `-` for stdin, builtin:NAME for bundled text."""
    out: list[Path | str] = []
    if not inputs:
        raise UsageProblem("no input given", hint="pass text files, directories, - for stdin, or builtin:shakespeare")
    for item in inputs:
        if item == "-":
            out.append("-")
            continue
        p = bundled_corpus(item[len(BUILTIN):]) if item.startswith(BUILTIN) else Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob(glob) if f.is_file())
            if not files:
                raise UsageProblem(f"no files matching {glob!r} in the directory", path=p, hint="use --glob")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise UsageProblem("no such file or directory", path=p)
    return out


def read_text(source: Path | str) -> tuple[str, int]:
    """(text, number of invalid UTF-8 sequences replaced)."""
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.count("\ufffd".encode())
    return text, bad


def iter_documents(sources: list[Path | str], unit: str, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(document text, invalid bytes replaced) in a deterministic order."""
    for src in sources:
        kind = unit if unit != "auto" else ("jsonl" if str(src).endswith(".jsonl") else "blank-line")
        text, bad = read_text(src)
        if kind == "file":
            if text:
                yield text, bad
        elif kind == "blank-line":
            first = True
            for block in text.replace("\r\n", "\n").split("\n\n"):
                block = block.strip("\n")
                if block.strip():
                    yield block, bad if first else 0
                    first = False
        elif kind == "jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise GentoolError(f"line {lineno}: not a JSON object with a {text_field!r} field", path=src,
                                       hint="fix the line or pass --text-field") from None
                if isinstance(doc, str) and doc:
                    yield doc, 0
        else:
            raise UsageProblem(f"unknown document unit {unit!r}", hint="use auto, file, blank-line or jsonl")


# --- training --------------------------------------------------------------------------------------------------------

def train_tokenizer(inputs: list[str], out: Path, *, vocab_size: int = 4096, model_type: str = "bpe",
                    character_coverage: float = 1.0, byte_fallback: bool = True, user_symbols: list[str] = (),
                    input_sentence_size: int = 2_000_000, glob: str = "*.txt", seed: int = 0, force: bool = False):
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise UsageProblem(f"unknown --model-type {model_type!r}", hint="use bpe or unigram")
    check_output(out, force=force)
    sources = expand_inputs(inputs, glob)
    t0 = time.time()
    config = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
                  byte_fallback=byte_fallback, user_defined_symbols=list(user_symbols),
                  input_sentence_size=input_sentence_size, seed=seed, normalization="identity")
    with tempfile.TemporaryDirectory() as tmp, \
            create_artifact(out, "tokenizer", force=force, config=config,
                            inputs=[input_ref("corpus", s) for s in sources]) as art:
        corpus = Path(tmp) / "corpus.txt"
        n_bytes, n_lines, bad = 0, 0, 0
        with open(corpus, "w", encoding="utf-8") as f:
            for src in sources:
                text, b = read_text(src)
                bad += b
                for line in text.splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        n_lines += 1
                        n_bytes += len(line.encode())
        if n_lines == 0:
            raise UsageProblem("the input holds no text", path=", ".join(map(str, sources))[:200],
                               hint="pass non-empty text files")
        if bad:
            console.warn(f"replaced {bad} invalid UTF-8 sequences with U+FFFD")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(art.dir / "tokenizer"), vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage, byte_fallback=byte_fallback,
                unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
                pad_id=SPECIAL_IDS["pad"], user_defined_symbols=list(user_symbols) or None,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
                num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            hint = ("raise --vocab-size (byte fallback alone needs 260 ids)" if "smaller than required" in msg
                    else "lower --vocab-size or give more text" if "vocab" in msg.lower() else "check the input text")
            raise UsageProblem(f"SentencePiece training failed: {msg}", hint=hint) from None
        tok = Tokenizer(art.dir / "tokenizer.model")
        art.contents.update(vocab_size=tok.vocab_size, special_tokens=dict(SPECIAL_IDS), byte_fallback=byte_fallback,
                            tokenizer_id=tok.sha256)
        art.metrics.update(sentences_used=min(n_lines, input_sentence_size), bytes_used=n_bytes,
                           seconds=round(time.time() - t0, 3), invalid_utf8_replaced=bad)
    return art.manifest


# --- encoding --------------------------------------------------------------------------------------------------------

_worker_tok: Tokenizer | None = None


def _init_worker(model_file: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(model_file)


def _encode_batch(docs: list[str]) -> list[np.ndarray]:
    assert _worker_tok is not None
    return [np.asarray(ids, dtype=np.uint32) for ids in _worker_tok.encode_batch(docs)]


def _is_val(index: int, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class _ShardWriter:
    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.dir, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        self.buf.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        self.bytes += n_bytes
        while self.buffered >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def flush(self, limit: int | None = None) -> None:
        from gentool.data.shards import write_shard

        if not self.buf:
            return
        flat = np.concatenate(self.buf).astype(self.dtype)
        take = len(flat) if limit is None else limit
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        write_shard(self.dir / name, flat[:take])
        self.shards.append(name)
        rest = flat[take:]
        self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def summary(self) -> dict:
        return {"shards": self.shards, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes}


def encode_corpus(inputs: list[str], tokenizer: Path, out: Path, *, val_fraction: float = 0.05, split_seed: int = 0,
                  unit: str = "auto", text_field: str = "text", shard_tokens: int = 1 << 24, workers: int = 0,
                  glob: str = "*.txt", force: bool = False):
    from gentool.data.shards import dtype_for_vocab

    if not 0 <= val_fraction < 1:
        raise UsageProblem("--val-fraction must be in [0, 1)")
    check_output(out, force=force)
    tok_manifest = read_artifact(tokenizer, "tokenizer")
    model_file = tok_manifest.path / "tokenizer.model"
    tok = Tokenizer(model_file)
    sources = expand_inputs(inputs, glob)
    workers = workers or os.cpu_count() or 1
    dtype = dtype_for_vocab(tok.vocab_size)
    config = dict(dtype=dtype.name, shard_tokens=shard_tokens, val_fraction=val_fraction, split_seed=split_seed,
                  document_unit=unit, text_field=text_field, separator="eos")
    t0 = time.time()
    with create_artifact(out, "token-shards", force=force, config=config,
                         inputs=[input_ref("tokenizer", tok_manifest)] + [input_ref("corpus", s) for s in sources]
                         ) as art:
        writers = {s: _ShardWriter(art.dir, s, shard_tokens, dtype) for s in ("train", "val")}
        eos = np.asarray([tok.eos_id], dtype=np.uint32)
        bad = 0
        index = 0
        pool = get_context("spawn").Pool(workers, _init_worker, (str(model_file),)) if workers > 1 else None
        if pool is None:
            _init_worker(str(model_file))
        try:
            batches: list[list[str]] = []
            batch: list[str] = []
            size = 0
            total = 0

            def drain() -> None:
                nonlocal index
                results = pool.map(_encode_batch, batches) if pool else [_encode_batch(b) for b in batches]
                for docs, encoded in zip(batches, results):
                    for text, ids in zip(docs, encoded):
                        split = "val" if _is_val(index, split_seed, val_fraction) else "train"
                        writers[split].add(np.concatenate([ids, eos]), len(text.encode()))
                        index += 1
                batches.clear()

            with console.progress("encoding", None) as bar:
                for text, b in iter_documents(sources, unit, text_field):
                    bad += b
                    batch.append(text)
                    size += len(text)
                    if size >= 1 << 20:
                        batches.append(batch)
                        total += size
                        batch, size = [], 0
                        if len(batches) >= 2 * workers:  # bounded memory: a few MB in flight per worker
                            drain()
                            bar.update(completed=total / 1e6, MB=round(total / 1e6, 1))
                if batch:
                    batches.append(batch)
                drain()
        finally:
            if pool is not None:
                pool.terminate()
        for w in writers.values():
            w.flush()
        if writers["train"].tokens == 0:
            raise UsageProblem("the input holds no text", hint="pass non-empty text files")
        if bad:
            console.warn(f"replaced {bad} invalid UTF-8 sequences with U+FFFD")
        seconds = time.time() - t0
        n_bytes = sum(w.bytes for w in writers.values())
        art.contents.update(tokenizer_id=tok.sha256, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                            bos_id=tok.bos_id, dtype=dtype.name,
                            splits={s: w.summary() for s, w in writers.items()})
        art.metrics.update(seconds=round(seconds, 3), mb_per_s=round(n_bytes / 1e6 / max(seconds, 1e-9), 3),
                           workers=workers, invalid_utf8_replaced=bad)
    return art.manifest


def parse_ids(text: str) -> list[int]:
    """Token ids from whitespace/comma-separated integers or a JSON list."""
    text = text.strip()
    if not text:
        return []
    try:
        values = json.loads(text) if text.startswith("[") else [int(x) for x in text.replace(",", " ").split()]
    except (json.JSONDecodeError, ValueError):
        raise UsageProblem("token ids must be integers (whitespace-separated or a JSON list)") from None
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UsageProblem("token ids must be a flat list of integers")
    return values
