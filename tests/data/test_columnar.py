"""Parquet, datasets directories and compressed text as `tokenize encode` input: the same tokens as plain text."""

import gzip
import json

import numpy as np
import pytest

from gentool.data.shards import open_shards
from gentool.data.text import bundled_corpus
from gentool.tokenize import encode_corpus

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def docs():
    files = sorted((bundled_corpus() / "comedies").glob("*.txt"))[:2]
    return [d.strip("\n") for f in files for d in f.read_text().split("\n\n") if d.strip()]


def _tokens(path, split):
    s = open_shards(path, split)
    return s.tokens(0, len(s))


def _same_shards(a, b):
    assert a.contents["splits"] == b.contents["splits"] or all(
        a.contents["splits"][s][k] == b.contents["splits"][s][k] for s in ("train", "val")
        for k in ("tokens", "documents", "bytes"))
    for split in ("train", "val"):
        np.testing.assert_array_equal(_tokens(a.path, split), _tokens(b.path, split))


def test_parquet_shards_and_compressed_jsonl_give_the_tokens_of_jsonl(tiny_tokenizer, tmp_path, docs, cli):
    plain = tmp_path / "d.jsonl"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ref = encode_corpus([str(plain)], tiny_tokenizer, tmp_path / "ref", workers=1)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    _same_shards(ref, encode_corpus([str(gz)], tiny_tokenizer, tmp_path / "gz", workers=2))
    zstandard = pytest.importorskip("zstandard")
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    _same_shards(ref, encode_corpus([str(zst)], tiny_tokenizer, tmp_path / "zst", workers=1))

    shards = tmp_path / "pq"
    shards.mkdir()
    half = len(docs) // 2  # two files, many small row groups, an extra column, a null and an empty cell
    for i, part in enumerate([docs[:half], docs[half:]]):
        cells = part + ([None, ""] if i == 0 else [])
        table = pa.table({"id": list(range(len(cells))), "content": cells})
        pq.write_table(table, shards / f"part-{i}.parquet", row_group_size=7)
    r = cli("tokenize", "encode", shards, "--glob", "*.parquet", "--tokenizer", tiny_tokenizer, "-o",
            tmp_path / "p", "--text-field", "content", "--workers", "3", "--json")
    assert r.exit_code == 0, r.output
    assert "skipped 2 rows" in r.stderr
    from gentool.artifacts import read_artifact
    _same_shards(ref, read_artifact(tmp_path / "p", "token-shards"))
    r = cli("tokenize", "encode", str(shards / "*.parquet"), "--tokenizer", tiny_tokenizer, "-o", tmp_path / "g",
            "--text-field", "content", "--workers", "1")
    assert r.exit_code == 0, r.output
    _same_shards(ref, read_artifact(tmp_path / "g", "token-shards"))


def test_datasets_directory(tiny_tokenizer, tmp_path, docs, cli):
    datasets = pytest.importorskip("datasets")
    plain = tmp_path / "d.txt"
    plain.write_text("\n\n".join(docs) + "\n")
    ref = encode_corpus([str(plain)], tiny_tokenizer, tmp_path / "ref", workers=1)
    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "ds"), max_shard_size="20KB")
    assert len(list((tmp_path / "ds").glob("*.arrow"))) > 1
    r = cli("tokenize", "encode", tmp_path / "ds", "--tokenizer", tiny_tokenizer, "-o", tmp_path / "a",
            "--workers", "2")
    assert r.exit_code == 0, r.output
    from gentool.artifacts import read_artifact
    _same_shards(ref, read_artifact(tmp_path / "a", "token-shards"))
    r = cli("tokenize", "train", tmp_path / "ds", "-o", tmp_path / "tok", "--vocab-size", "400")
    assert r.exit_code == 0, r.output


def test_bad_column_stores_are_one_line_and_write_nothing(tiny_tokenizer, tmp_path, cli):
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"body": ["a b c"] * 5, "n": [1] * 5}), good)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(good.read_bytes()[:-12])
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    d = datasets.Dataset.from_dict({"text": ["x"]})
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
    cases = {
        "no text column": (good, "no column 'text' (columns: body, n)"),
        "corrupt footer": (corrupt, "cannot read the file as Parquet"),
        "not text": (numbers, "holds int64, not text"),
        "a DatasetDict": (tmp_path / "dd", "DatasetDict, not one split"),
    }
    for name, (path, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        r = cli("tokenize", "encode", path, "--tokenizer", tiny_tokenizer, "-o", out, "--workers", "1")
        assert r.exit_code in (1, 2), (name, r.output)
        assert message in r.stderr and "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
    bad_gz = tmp_path / "bad.txt.gz"
    bad_gz.write_bytes(gzip.compress(b"to be or not to be\n" * 100)[:-20])
    r = cli("tokenize", "encode", bad_gz, "--tokenizer", tiny_tokenizer, "-o", tmp_path / "z", "--workers", "1")
    assert r.exit_code == 1 and "cannot decompress" in r.stderr and not (tmp_path / "z").exists(), r.output


def test_missing_pyarrow_names_the_extra(tiny_tokenizer, tmp_path, cli, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **k)

    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    r = cli("tokenize", "encode", f, "--tokenizer", tiny_tokenizer, "-o", tmp_path / "o", "--workers", "1")
    assert r.exit_code == 2 and "gentool[data]" in r.stderr, r.output
