"""Tokenizer training and corpus encoding into token shards (the `gentool tokenize` area).

Text is read as UTF-8; invalid bytes are replaced by U+FFFD and counted (a warning says how many), never fatal.
Documents (see gentool.data.text): blank-line-separated blocks of a text file (default), whole files (`file`), or
JSONL records' text field (`jsonl`, the default for .jsonl files); each ends with EOS in the shards.

Encoding is a pipeline: the main thread reads and batches segments, a pool of threads encodes batches
(SentencePiece releases the GIL; at most IN_FLIGHT per worker queued), and the main thread writes results in
submission order. The train/val split hashes each document's index, so the shards are byte-identical whatever the
worker count.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gentool import console
from gentool.artifacts import check_output, create_artifact, input_ref, read_artifact
from gentool.data.text import (TextStats, bundled_corpus, compressed_or_columnar, expand_inputs, iter_segments,
                               iter_training_lines)
from gentool.data.tokenizer import SPECIAL_IDS, Tokenizer
from gentool.errors import UsageProblem

__all__ = ["bundled_corpus", "encode_corpus", "parse_ids", "train_tokenizer", "val_mask"]

# --- training --------------------------------------------------------------------------------------------------------

def train_tokenizer(inputs: list[str], out: Path, *, vocab_size: int = 4096, model_type: str = "bpe",
                    character_coverage: float = 0.9995, byte_fallback: bool = True, user_symbols: list[str] = (),
                    input_sentence_size: int = 2_000_000, glob: str = "*.txt", seed: int = 0, force: bool = False):
    """Train a SentencePiece tokenizer on the non-blank lines of the inputs (streamed; SentencePiece keeps a
    uniform sample of `input_sentence_size` lines, so memory does not grow with the corpus).

    Same inputs, options, seed and core count give a byte-identical tokenizer.model (the model records its thread
    count, and unigram's EM sums depend on it)."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise UsageProblem(f"unknown --model-type {model_type!r}", hint="use bpe or unigram")
    if not 0 < character_coverage <= 1:
        raise UsageProblem("--character-coverage must be in (0, 1]")
    if 0 < input_sentence_size <= 100:
        raise UsageProblem("--input-sentence-size must be 0 (all lines) or more than 100")
    if vocab_size < 1:
        raise UsageProblem("--vocab-size must be positive")
    if any(s in ("", "<unk>", "<s>", "</s>", "<pad>") for s in user_symbols):
        raise UsageProblem("a --user-symbols entry is empty or a special token")
    check_output(out, force=force, sources=inputs)
    sources = expand_inputs(inputs, glob)
    t0 = time.time()
    threads = os.cpu_count() or 1
    config = {"model_type": model_type, "vocab_size": vocab_size, "character_coverage": character_coverage,
              "byte_fallback": byte_fallback, "user_defined_symbols": list(user_symbols),
              "input_sentence_size": input_sentence_size, "seed": seed, "normalization": "identity",
              "num_threads": threads}
    stats = TextStats()
    seen = {"lines": 0, "bytes": 0}
    failure: list[BaseException] = []

    def lines():
        try:
            for line in iter_training_lines(sources, stats):
                seen["lines"] += 1
                seen["bytes"] += len(line.encode())
                yield line
        except BaseException as e:  # SentencePiece would turn it into a RuntimeError: keep it to re-raise
            failure.append(e)
            raise

    with create_artifact(out, "tokenizer", force=force, config=config,
                         inputs=[input_ref("corpus", s) for s in sources]) as art:
        spm.set_random_generator_seed(seed)
        model = io.BytesIO()  # not model_prefix: the model would record the (temporary) path and differ per run
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage, byte_fallback=byte_fallback,
                unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
                pad_id=SPECIAL_IDS["pad"], user_defined_symbols=list(user_symbols) or None,
                input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
                num_threads=threads, minloglevel=2)
        except RuntimeError as e:
            if failure:
                raise failure[0] from None
            if seen["lines"] == 0:
                raise UsageProblem("the input holds no text", path=", ".join(map(str, sources))[:200],
                                   hint="pass non-empty text files") from None
            raise _training_error(str(e)) from None
        if failure:
            raise failure[0]
        if stats.invalid_utf8:
            console.warn(f"replaced {stats.invalid_utf8} invalid UTF-8 sequences with U+FFFD")
        (art.dir / "tokenizer.model").write_bytes(model.getvalue())
        tok = Tokenizer(art.dir / "tokenizer.model")
        with open(art.dir / "tokenizer.vocab", "w", encoding="utf-8") as f:  # for people: piece<TAB>score
            f.writelines(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):g}\n" for i in range(tok.vocab_size))
        art.contents.update(vocab_size=tok.vocab_size, special_tokens=dict(SPECIAL_IDS), byte_fallback=byte_fallback,
                            model_type=model_type, tokenizer_id=tok.sha256)
        art.metrics.update(lines=seen["lines"], lines_used=min(seen["lines"], input_sentence_size or seen["lines"]),
                           bytes=seen["bytes"], seconds=round(time.time() - t0, 3),
                           invalid_utf8_replaced=stats.invalid_utf8)
    return art.manifest


def _training_error(message: str) -> UsageProblem:
    """SentencePiece's failure as one line saying what to change."""
    msg = message.strip().splitlines()[0] if message.strip() else "unknown error"
    msg = re.sub(r"^INTERNAL: \S+ \[.*?\] ", "", msg).strip() or msg
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        return UsageProblem(f"--vocab-size {m[1]} is more than this corpus supports ({m[2]} at most)",
                            hint=f"use --vocab-size {m[2]} or less, or give more text")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return UsageProblem(f"--vocab-size {m[1]} is too small: the special tokens, bytes and characters need "
                            f"{m[2]} ids", hint=f"use --vocab-size {m[2]} or more, or lower --character-coverage")
    return UsageProblem(f"SentencePiece training failed: {msg}", hint="check the input text and options")


# --- encoding --------------------------------------------------------------------------------------------------------

BATCH_CHARS = 1 << 18   # text per encoding task
IN_FLIGHT = 4           # tasks per worker queued at most: bounds memory whatever the corpus size


def _batch_encoder(tok):
    """texts -> one int array per text, without special tokens. SentencePiece releases the GIL while it encodes and
    returns int32 buffers (no Python int per token), so a few threads encode in parallel in one process; a Hugging
    Face tokenizer.json encodes through its own batch call (which releases the GIL too)."""
    if isinstance(tok, Tokenizer):
        return lambda texts: tok.sp.encode(texts, num_threads=1, out_type="numpy")
    return lambda texts: [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(texts)]


def _encode_batch(encode, texts: list[str], lasts: list[bool], eos: int, dtype: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode segments; EOS follows each document's last segment. (flat tokens, tokens per segment, UTF-8 bytes
    per segment)."""
    ids = encode(texts)
    last = np.fromiter(lasts, dtype=bool, count=len(lasts))
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    flat = np.insert(flat, np.cumsum(lens)[last], eos).astype(np.dtype(dtype), copy=False)
    nbytes = np.fromiter((len(t.encode()) for t in texts), dtype=np.int64, count=len(texts))
    return flat, lens + last, nbytes


def val_mask(doc_index: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which documents go to val: a hash (splitmix64) of (seed, document index) below `fraction`. Depends on
    nothing else, so the split is the same whatever the batching or worker count."""
    with np.errstate(over="ignore"):
        z = doc_index.astype(np.uint64) + np.uint64((seed + 1) * 0x9E3779B97F4A7C15 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


class _ShardWriter:
    """Appends tokens to `SPLIT-NNNNN.safetensors` files of `shard_tokens` tokens each (the last one shorter)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.dir, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[str] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, tokens: np.ndarray, documents: int, n_bytes: int) -> None:
        self.buf.append(tokens)
        self.buffered += len(tokens)
        self.tokens += len(tokens)
        self.documents += documents
        self.bytes += n_bytes
        while self.buffered >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def flush(self, limit: int | None = None) -> None:
        from gentool.data.shards import write_shard

        if not self.buf:
            return
        flat = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        take = len(flat) if limit is None else limit
        name = f"{self.split}-{len(self.shards):05d}.safetensors"
        write_shard(self.dir / name, flat[:take])
        self.shards.append(name)
        rest = flat[take:]
        self.buf, self.buffered = ([rest.copy()] if len(rest) else []), len(rest)

    def summary(self) -> dict:
        return {"shards": self.shards, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes}


def _batches(segments: Iterator[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool], int]]:
    texts: list[str] = []
    lasts: list[bool] = []
    size = 0
    for text, last in segments:
        texts.append(text)
        lasts.append(last)
        size += len(text)
        if size >= BATCH_CHARS:
            yield texts, lasts, size
            texts, lasts, size = [], [], 0
    if texts:
        yield texts, lasts, size


def _signals_to_main_thread() -> None:
    """Block Ctrl-C and SIGTERM in an encoding thread: a signal delivered to it would wait, unhandled, until the
    main thread (perhaps blocked reading stdin) ran Python again."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def encode_corpus(inputs: list[str], tokenizer: Path, out: Path, *, val_fraction: float = 0.05, split_seed: int = 0,
                  unit: str = "auto", text_field: str = "text", shard_tokens: int = 1 << 24, workers: int = 0,
                  glob: str = "*.txt", force: bool = False, segment_chars: int | None = None):
    """Encode text into a token-shards artifact, streaming: memory is bounded by the tasks in flight (IN_FLIGHT
    per worker, BATCH_CHARS each) plus one shard buffer per split, whatever the corpus size."""
    from gentool.data.shards import dtype_for_vocab

    if not 0 <= val_fraction < 1:
        raise UsageProblem("--val-fraction must be in [0, 1)")
    if shard_tokens < 1:
        raise UsageProblem("--shard-tokens must be positive")
    if workers < 0:
        raise UsageProblem("--workers must be 0 (all cores) or more")
    if unit not in ("auto", "file", "blank-line", "jsonl"):
        raise UsageProblem(f"unknown --document {unit!r}", hint="use auto, file, blank-line or jsonl")
    check_output(out, force=force, sources=[*inputs, tokenizer])
    tok, tok_ref = _encoding_tokenizer(Path(tokenizer))
    if tok.eos_id is None:
        raise UsageProblem("the tokenizer has no EOS token", path=tokenizer, hint="train one with gentool tokenize "
                           "train")
    sources = expand_inputs(inputs, glob)
    workers = workers or os.cpu_count() or 1
    dtype = dtype_for_vocab(tok.vocab_size)
    config = {"dtype": dtype.name, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
              "split_seed": split_seed, "document_unit": unit, "text_field": text_field, "separator": "eos"}
    sized = [s for s in sources if isinstance(s, Path) and not compressed_or_columnar(s)]
    total_bytes = sum(s.stat().st_size for s in sized) if len(sized) == len(sources) else None
    stats = TextStats()
    t0 = time.time()
    with create_artifact(out, "token-shards", force=force, config=config,
                         inputs=[tok_ref] + [input_ref("corpus", s) for s in sources]
                         ) as art:
        writers = {s: _ShardWriter(art.dir, s, shard_tokens, dtype) for s in ("train", "val")}
        pending: deque = deque()
        next_doc = 0

        def collect() -> int:
            nonlocal next_doc
            future, lasts = pending.popleft()
            flat, counts, nbytes = future.result()
            lasts = np.asarray(lasts, dtype=bool)
            doc = next_doc + np.cumsum(lasts) - lasts  # document index of every segment
            next_doc += int(lasts.sum())
            is_val = val_mask(doc, split_seed, val_fraction)
            for split, mask in (("train", ~is_val), ("val", is_val)):
                if mask.any():
                    tokens = flat if mask.all() else flat[np.repeat(mask, counts)]
                    writers[split].add(tokens, int(lasts[mask].sum()), int(nbytes[mask].sum()))
            return int(nbytes.sum())

        # Threads, not processes: the encoder runs without the GIL, so `workers` threads encode in parallel while
        # this one reads ahead and writes; nothing is pickled and nothing is forked.
        pool = ThreadPoolExecutor(workers, thread_name_prefix="encode", initializer=_signals_to_main_thread)
        encode = _batch_encoder(tok)
        try:
            with console.progress("encoding (MB)", total_bytes and round(total_bytes / 1e6, 1)) as bar:
                done = 0
                for texts, lasts, _ in _batches(iter_segments(sources, unit, text_field, stats, segment_chars)):
                    pending.append((pool.submit(_encode_batch, encode, texts, lasts, tok.eos_id, dtype.str), lasts))
                    while len(pending) >= IN_FLIGHT * workers:
                        done += collect()
                        bar.update(completed=round(done / 1e6, 1))
                while pending:
                    done += collect()
        finally:  # on an error or Ctrl-C: drop queued tasks; running ones end within one batch
            pool.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.flush()
        if next_doc == 0:
            raise UsageProblem("the input holds no text", path=", ".join(map(str, sources))[:200],
                               hint="pass non-empty text files")
        if writers["train"].documents == 0:
            raise UsageProblem(f"the train split is empty ({next_doc} documents, all in val)",
                               hint="lower --val-fraction or give more documents")
        if val_fraction > 0 and writers["val"].documents == 0:
            console.warn(f"the val split is empty ({next_doc} documents): give more documents or a larger "
                         "--val-fraction, or use --document blank-line")
        if stats.invalid_utf8:
            console.warn(f"replaced {stats.invalid_utf8} invalid UTF-8 sequences with U+FFFD")
        if stats.skipped_rows:
            console.warn(f"skipped {stats.skipped_rows} rows whose {text_field!r} cell is null or empty")
        seconds = time.time() - t0
        n_bytes = sum(w.bytes for w in writers.values())
        art.contents.update(tokenizer_id=tok.sha256, tokenizer_file=_relative_to(tok.path, out),
                            tokenizer_file_absolute=str(Path(tok.path).resolve()),
                            vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                            bos_id=tok.bos_id, pad_id=tok.pad_id, unk_id=tok.unk_id, dtype=dtype.name,
                            splits={s: w.summary() for s, w in writers.items()})
        art.metrics.update(seconds=round(seconds, 3), mb_per_s=round(n_bytes / 1e6 / max(seconds, 1e-9), 3),
                           workers=workers, invalid_utf8_replaced=stats.invalid_utf8,
                           skipped_rows=stats.skipped_rows)
    return art.manifest


def _encoding_tokenizer(path: Path):
    """(tokenizer, its `inputs` entry): a tokenizer artifact (its manifest verified), or the tokenizer.model /
    tokenizer.json of any checkpoint (gentool's, one imported from GGUF, a Hugging Face directory), or that file."""
    from gentool.artifacts import probe
    from gentool.data.tokenizer import load_tokenizer

    if path.is_dir() and probe(path).kind == "tokenizer":
        manifest = read_artifact(path, "tokenizer")
        return Tokenizer(manifest.path / "tokenizer.model"), input_ref("tokenizer", manifest)
    tok = load_tokenizer(path)
    return tok, input_ref("tokenizer", tok.path)


def _relative_to(file: Path, directory: Path) -> str:
    """`file` as the shards' manifest records it: relative to the shards directory (both resolved), so it is found
    from any working directory and when the two move together; absolute where no relative path exists."""
    try:
        return os.path.relpath(Path(file).resolve(), Path(directory).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(file).resolve())


_ID = re.compile(r"[+-]?[0-9]+")


def parse_ids(text: str) -> list[int]:
    """Token ids from a JSON list, or integers separated by whitespace and/or commas."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageProblem(f"token ids are not valid JSON ({e.msg} at character {e.pos})",
                               hint="pass a JSON list of integers, or integers separated by spaces") from None
        if not isinstance(values, list) or not all(type(v) is int for v in values):
            raise UsageProblem("token ids must be a flat JSON list of integers", hint="e.g. [72, 101, 108]")
        return values
    words = text.replace(",", " ").split()
    for w in words:
        if not _ID.fullmatch(w):
            raise UsageProblem(f"not a token id: {w[:20]!r}",
                               hint="pass integers separated by spaces, or a JSON list of integers")
    return [int(w) for w in words]
