"""Streaming text input: files, directories, stdin and the bundled corpus, read as UTF-8 in bounded memory.

Invalid UTF-8 is replaced by U+FFFD and counted (callers warn with the count); it is never fatal. Files are read
in blocks cut at newlines, so memory is bounded by the block size and the longest line, not by the file size.

Documents (`unit`): `blank-line` (blocks separated by empty lines, CRLF read as LF, whitespace-only blocks
dropped), `file` (a whole file), `jsonl` (one JSON record per line, its text field), `auto` (jsonl for *.jsonl,
else blank-line). Files ending in .gz or .zst are decompressed as they are read (`x.jsonl.gz` is JSONL). Parquet
files and Hugging Face `datasets` directories are one document per row of the text column, whatever the unit
(`data/columnar.py`). A long document is yielded as line-aligned segments of about `segment_chars` characters:
gentool's tokenizers have no piece that spans a newline, so encoding the segments one by one gives the same ids
as encoding the whole document.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gentool.data import columnar
from gentool.errors import GentoolError, UsageProblem

BUILTIN = "builtin:"
BLOCK = 1 << 20
SEGMENT_CHARS = 1 << 20
_REPL = "\ufffd".encode()


def bundled_corpus(name: str = "shakespeare") -> Path:
    """The bundled text corpus (`shakespeare`, or `shakespeare/tragedies`, `shakespeare/comedies`)."""
    path = Path(__file__).parent / "bundled" / name
    if not name or ".." in Path(name).parts or not path.is_dir():
        raise UsageProblem(f"no bundled corpus {name!r}", hint="use builtin:shakespeare, "
                           "builtin:shakespeare/tragedies or builtin:shakespeare/comedies")
    return path


def expand_inputs(inputs: list[str], glob: str = "*.txt") -> list[Path | str]:
    """Files, directories (recursively, filtered by glob, sorted), `-` for stdin, builtin:NAME for bundled text, a
    `datasets` directory (one source), and a quoted glob pattern such as 'shards/*.parquet' (matches sorted)."""
    out: list[Path | str] = []
    if not inputs:
        raise UsageProblem("no input given", hint="pass text files, directories, - for stdin, or builtin:shakespeare")
    for item in map(str, inputs):
        if item == "-":
            if "-" in out:
                raise UsageProblem("stdin (-) given twice")
            out.append("-")
            continue
        p = bundled_corpus(item[len(BUILTIN):]) if item.startswith(BUILTIN) else Path(item)
        if not p.exists() and any(c in item for c in "*?[") and not item.startswith(BUILTIN):
            anchor = Path(item).anchor or "."
            files = sorted(f for f in Path(anchor).glob(str(Path(item).relative_to(anchor))) if f.is_file())
            if not files:
                raise UsageProblem("no files match the pattern", path=item)
            out.extend(files)
        elif columnar.is_datasets_dir(p):
            out.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob(glob) if f.is_file())
            if not files:
                found = sorted({_suffix(f) for f in p.rglob("*") if f.is_file() and _suffix(f) in READABLE})
                raise UsageProblem(f"no files matching {glob!r} in the directory", path=p,
                                   hint=f"pass another --glob, e.g. --glob '*{found[0] if found else '.md'}'")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise UsageProblem("no such file or directory", path=p)
    return out


READABLE = (".txt", ".md", ".jsonl", ".json", ".parquet", ".pq", ".gz", ".zst")


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix


def _compression(source: Path | str) -> str | None:
    name = str(source).lower()
    return "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else None


def _open(source: Path | str) -> BinaryIO:
    if source == "-":
        return sys.stdin.buffer
    try:
        f = open(source, "rb")
    except OSError as e:
        raise UsageProblem(f"cannot read ({e.strerror})", path=source) from None
    kind = _compression(source)
    if kind == "gzip":
        import gzip
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            f.close()
            raise UsageProblem("reading .zst files needs zstandard", hint="pip install 'gentool[data]'") from None
        import io
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, closefd=True))  # type: ignore
    return f


def document_kind(source: Path | str, unit: str) -> str:
    """How a source is read: `column` (Parquet, datasets directory), or the document unit (auto resolved by the
    name without its compression suffix)."""
    if source != "-" and (columnar.is_parquet(source) or Path(source).is_dir()):
        return "column"
    if unit != "auto":
        return unit
    name = str(source).lower().removesuffix(".gz").removesuffix(".zst")
    return "jsonl" if name.endswith(".jsonl") else "blank-line"


def compressed_or_columnar(source: Path | str) -> bool:
    """The file's size on disk is not its text's size (progress totals skip it)."""
    return source != "-" and (_compression(source) is not None or document_kind(source, "auto") == "column")


@dataclass
class TextStats:
    """What reading saw: invalid UTF-8 sequences replaced by U+FFFD."""

    invalid_utf8: int = 0
    skipped_rows: int = 0  # null or empty cells of a column store's text column


def iter_blocks(source: Path | str, stats: TextStats, block: int | None = None) -> Iterator[str]:
    """Decoded text in blocks of about `block` bytes, each ending with a newline (the last one may not). A newline
    byte never occurs inside a UTF-8 sequence, so decoding block by block is exact."""
    f = _open(source)
    block = block or BLOCK
    try:
        parts: list[bytes] = []
        while data := _read_block(f, block, source):
            cut = data.rfind(b"\n") + 1
            if not cut:  # no newline yet: memory grows with the line, not the file
                parts.append(data)
                continue
            parts.append(data[:cut])
            yield _decode(b"".join(parts), stats)
            parts = [data[cut:]] if cut < len(data) else []
        if parts:
            yield _decode(b"".join(parts), stats)
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _read_block(f: BinaryIO, block: int, source: Path | str) -> bytes:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    if "zstandard" in sys.modules:
        errors += (sys.modules["zstandard"].ZstdError,)
    try:
        return f.read1(block)
    except errors as e:  # a damaged gzip/zstd stream (an unreadable plain file fails at open)
        raise GentoolError(f"cannot decompress ({str(e)[:120]})", path=source,
                           hint="the file is damaged or truncated; write it again") from None


def _decode(data: bytes, stats: TextStats) -> str:
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        stats.invalid_utf8 += text.count("\ufffd") - data.count(_REPL)
    return text


def iter_lines(source: Path | str, stats: TextStats) -> Iterator[str]:
    """Lines with their newline (only LF ends a line; the last line may lack it)."""
    for text in iter_blocks(source, stats):
        lines = text.split("\n")
        last = lines.pop()
        for line in lines:
            yield line + "\n"
        if last:
            yield last


def iter_segments(sources: list[Path | str], unit: str = "auto", text_field: str = "text",
                  stats: TextStats | None = None, segment_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """(segment, last) for every document in order; `last` marks the final segment of a document."""
    if unit not in ("auto", "file", "blank-line", "jsonl"):
        raise UsageProblem(f"unknown document unit {unit!r}", hint="use auto, file, blank-line or jsonl")
    stats = stats if stats is not None else TextStats()
    segment_chars = segment_chars or SEGMENT_CHARS
    for src in sources:
        kind = document_kind(src, unit)
        if kind == "column":
            yield from columnar.iter_column_documents(Path(src), text_field, stats)
        elif kind == "jsonl":
            yield from _jsonl_documents(src, text_field, stats)
        elif kind == "file":
            yield from _file_document(src, stats, segment_chars)
        else:
            yield from _blank_line_documents(src, stats, segment_chars)


def _file_document(src: Path | str, stats: TextStats, segment_chars: int) -> Iterator[tuple[str, bool]]:
    buf: list[str] = []
    size, started = 0, False
    for text in iter_blocks(src, stats):
        buf.append(text)
        size += len(text)
        if size >= segment_chars and text.endswith("\n"):
            yield "".join(buf), False
            buf, size, started = [], 0, True
    if buf or started:
        yield "".join(buf), True


_BLANK = re.compile(r"\n\n+")


def _blank_line_documents(src: Path | str, stats: TextStats, segment_chars: int) -> Iterator[tuple[str, bool]]:
    """Documents separated by empty lines. Works on whole blocks (no per-line Python loop): the stream is read as
    if preceded by a newline, and every run of two or more newlines separates documents."""
    buf: list[str] = []
    state = {"size": 0, "started": False}

    def finish() -> Iterator[tuple[str, bool]]:
        text = "".join(buf).removesuffix("\n")
        if state["started"] or text.strip():
            yield text, True
        buf.clear()
        state.update(size=0, started=False)

    for text in iter_blocks(src, stats):
        if "\r" in text:
            text = text.replace("\r\n", "\n")  # a block ends with LF, so no CRLF is split between blocks
        if text.startswith("\n"):  # the previous block (or the file start) ended with a newline: an empty line
            yield from finish()
            text = text.lstrip("\n")
        parts = _BLANK.split(text)
        for part in parts[:-1]:
            buf.append(part)
            yield from finish()
        buf.append(parts[-1])
        state["size"] += len(parts[-1])
        if state["size"] >= segment_chars and parts[-1].endswith("\n") and (state["started"] or
                                                                          any(s.strip() for s in buf)):
            # a long document goes out in segments cut before a newline (kept for the next segment)
            yield "".join(buf)[:-1], False
            buf[:] = ["\n"]
            state.update(size=1, started=True)
    yield from finish()


def _jsonl_documents(src: Path | str, text_field: str, stats: TextStats) -> Iterator[tuple[str, bool]]:
    for lineno, line in enumerate(iter_lines(src, stats), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            raise GentoolError(f"line {lineno}: not a JSON object with a {text_field!r} field", path=src,
                               hint="fix the line, or name the field with --text-field") from None
        if not isinstance(doc, str):
            raise GentoolError(f"line {lineno}: field {text_field!r} is not a string", path=src,
                               hint="fix the line, or name the field with --text-field")
        if doc:
            yield doc, True


def iter_training_lines(sources: list[Path | str], stats: TextStats, text_field: str = "text") -> Iterator[str]:
    """Non-blank lines without their line ending (what SentencePiece trains on); of JSONL and column stores, the
    lines of the text field."""
    for src in sources:
        kind = document_kind(src, "auto")
        if kind in ("column", "jsonl"):
            docs = columnar.iter_column_documents(Path(src), text_field, stats) if kind == "column" else \
                _jsonl_documents(src, text_field, stats)
            for doc, _ in docs:
                yield from (line for line in doc.splitlines() if line.strip())
            continue
        for line in iter_lines(src, stats):
            line = line.rstrip("\r\n")
            if line.strip():
                yield line
