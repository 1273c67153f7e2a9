"""Column stores as text input: Parquet files and Hugging Face `datasets` directories (`save_to_disk`'s Arrow files).

Both are read one record batch at a time (a Parquet row group is cut into batches of BATCH_ROWS rows; an Arrow
stream file is memory-mapped and read batch by batch), so memory is bounded by a batch, not by the corpus. Each row
is one document: the string in the text column. A null or empty cell is skipped and counted; a column of another
type is refused. pyarrow comes with the `data` extra.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gentool.errors import GentoolError, UsageProblem

BATCH_ROWS = 1024
PARQUET_SUFFIXES = (".parquet", ".pq")


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UsageProblem("reading Parquet or Arrow needs pyarrow", hint="pip install 'gentool[data]'") from None
    return pyarrow


def is_parquet(path: Path | str) -> bool:
    return str(path).lower().endswith(PARQUET_SUFFIXES)


def is_datasets_dir(path: Path) -> bool:
    """A directory written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def datasets_arrow_files(path: Path) -> list[Path]:
    """The Arrow files of one saved `datasets.Dataset`, in order (refuses a DatasetDict or a damaged state.json)."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        raise UsageProblem("this is a datasets DatasetDict, not one split", path=path,
                           hint="pass one split's directory" + (f", e.g. {path / str(splits[0])}" if splits else ""))
    try:
        files = [path / entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise GentoolError("state.json does not list the dataset's Arrow files", path=path,
                           hint="save the dataset again with datasets' save_to_disk") from None
    for f in files:
        if f.parent != path or not f.is_file():
            raise GentoolError(f"state.json names a missing Arrow file {f.name!r}", path=path,
                               hint="copy the whole directory that save_to_disk wrote")
    return files


def _batches(path: Path, field: str) -> Iterator:
    pa = _pyarrow()
    try:
        if is_parquet(path):
            pf = pa.parquet.ParquetFile(path)
            _check_field(pf.schema_arrow, field, path)
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=[field])
        else:
            with pa.memory_map(str(path)) as source:
                reader = _open_arrow(pa, source)
                _check_field(reader.schema, field, path)
                batches = reader if isinstance(reader, pa.ipc.RecordBatchStreamReader) else (
                    reader.get_batch(i) for i in range(reader.num_record_batches))
                for batch in batches:
                    yield batch.select([field])
    except (pa.ArrowException, OSError) as e:
        raise GentoolError(f"cannot read the file as {'Parquet' if is_parquet(path) else 'Arrow'} "
                           f"({str(e).splitlines()[0][:160]})", path=path,
                           hint="the file is damaged or of another format; write it again") from None


def _open_arrow(pa, source):
    """datasets writes the Arrow IPC stream format; the file format is accepted too."""
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source)


def _check_field(schema, field: str, path: Path) -> None:
    if field not in schema.names:
        shown = ", ".join(schema.names[:8]) + (" …" if len(schema.names) > 8 else "")
        raise UsageProblem(f"no column {field!r} (columns: {shown or 'none'})", path=path,
                           hint="name the text column with --text-field")
    kind = schema.field(field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise UsageProblem(f"column {field!r} holds {kind}, not text", path=path,
                           hint="name the text column with --text-field")


def iter_column_documents(path: Path, field: str, stats) -> Iterator[tuple[str, bool]]:
    """(document, True) for every non-empty cell of the text column, in file order. `path` is a Parquet file or a
    datasets directory; `stats.skipped_rows` counts null and empty cells."""
    files = datasets_arrow_files(path) if path.is_dir() else [path]
    for f in files:
        for batch in _batches(f, field):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text, True
                else:
                    stats.skipped_rows += 1
