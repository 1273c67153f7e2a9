"""Token shards: memory-mapped reading equals what was written, across shard boundaries, in uint16 and uint32."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gentool.artifacts import create_artifact
from gentool.data.shards import dtype_for_vocab, mmap_tokens, open_shards, write_shard
from gentool.errors import GentoolError, UsageProblem


def make_shards(out, vocab_size, lengths, seed=0):
    rng = np.random.default_rng(seed)
    dtype = dtype_for_vocab(vocab_size)
    chunks = [rng.integers(0, vocab_size, n).astype(dtype) for n in lengths]
    if len(chunks[-1]):
        chunks[-1][-1] = vocab_size - 1  # the largest id must survive the round trip
    with create_artifact(out, "token-shards") as art:
        names = []
        for i, c in enumerate(chunks):
            names.append(f"train-{i:05d}.safetensors")
            write_shard(art.dir / names[-1], c)
        art.contents.update(tokenizer_id="sha256:" + "0" * 64, vocab_size=vocab_size, eos_id=2, dtype=dtype.name,
                            splits={"train": {"shards": names, "documents": 7, "tokens": sum(lengths), "bytes": 99}})
    return np.concatenate(chunks).astype(np.int64)


@pytest.mark.parametrize("vocab_size, dtype", [(65536, np.uint16), (65537, np.uint32), (100_000, np.uint32)])
def test_dtype_follows_vocab(tmp_path, vocab_size, dtype):
    ref = make_shards(tmp_path / "s", vocab_size, [5, 0, 9])
    s = open_shards(tmp_path / "s", "train")
    assert all(a.dtype == dtype for a in s.arrays) and np.array_equal(s.tokens(0, len(s)), ref)
    assert ref.max() == vocab_size - 1


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6), start=st.integers(-5, 250),
       size=st.integers(0, 250))
def test_slices_across_shard_boundaries(tmp_path_factory, lengths, start, size):
    out = tmp_path_factory.mktemp("s") / "s"
    ref = make_shards(out, 1000, lengths)
    s = open_shards(out, "train")
    assert len(s) == len(ref) == s.contents["splits"]["train"]["tokens"]
    got = s.tokens(start, start + size)
    assert got.dtype == np.int64 and np.array_equal(got, ref[max(0, start):max(0, start + size)])


def test_manifest_facts_and_errors(tmp_path):
    make_shards(tmp_path / "s", 300, [10, 10])
    s = open_shards(tmp_path / "s")
    assert (s.vocab_size, s.eos_id, s.documents, s.bytes) == (300, 2, 7, 99)
    assert s.tokenizer_id.startswith("sha256:") and isinstance(s.arrays[0], np.memmap)
    with pytest.raises(UsageProblem, match="no 'val' split"):
        open_shards(tmp_path / "s", "val")
    shard = tmp_path / "s" / "train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[:-4]))  # truncated
    with pytest.raises(GentoolError, match="size"):
        open_shards(tmp_path / "s")
    with pytest.raises(GentoolError, match="not a valid token shard"):
        mmap_tokens(shard)
    header = json.dumps({"tokens": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    shard.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(GentoolError, match="not a valid token shard"):
        mmap_tokens(shard)


TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n\n" * 40


@pytest.fixture
def encoded_here(tmp_path, monkeypatch, tiny_tokenizer):
    """Shards encoded from tmp/a with relative paths (`--tokenizer tok -o tokens`), as a user types them."""
    import shutil

    from gentool.tokenize import encode_corpus

    a = tmp_path / "a"
    a.mkdir()
    shutil.copytree(tiny_tokenizer, a / "tok")
    (a / "text.txt").write_text(TEXT)
    monkeypatch.chdir(a)
    encode_corpus(["text.txt"], Path("tok"), Path("tokens"), workers=1, val_fraction=0)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    return a


def test_the_tokenizer_is_found_relative_to_the_shards_from_any_directory(encoded_here):
    shards = open_shards(encoded_here / "tokens")
    assert shards.contents["tokenizer_file"] == "../tok/tokenizer.model"
    assert shards.tokenizer_file() == (encoded_here / "tok" / "tokenizer.model").resolve()


def test_a_tokenizer_changed_since_encoding_is_an_error(encoded_here, tmp_path):
    model = encoded_here / "tok" / "tokenizer.model"
    model.write_bytes(model.read_bytes() + b"\0")  # retrained in place, say
    with pytest.raises(GentoolError, match="tokenizer changed since these shards were encoded"):
        open_shards(encoded_here / "tokens").tokenizer_file()
    model.unlink()
    with pytest.raises(GentoolError, match="tokenizer these shards were encoded with is gone"):
        open_shards(encoded_here / "tokens").tokenizer_file()


def test_old_manifests_use_the_typed_path_where_it_resolves(encoded_here, monkeypatch):
    shards = open_shards(encoded_here / "tokens")
    del shards.contents["tokenizer_file"]  # an older gentool's manifest: the tokenizer input's path as typed
    assert shards.manifest.inputs[0]["path"] == "tok"
    assert shards.tokenizer_file() is None  # from tmp/b "tok" is nothing
    monkeypatch.chdir(encoded_here)
    assert shards.tokenizer_file().resolve() == (encoded_here / "tok" / "tokenizer.model").resolve()


def test_shards_moved_alone_or_with_their_tokenizer_still_find_it(encoded_here, tmp_path):
    import shutil

    shutil.copytree(encoded_here / "tokens", tmp_path / "c" / "tokens")  # alone: the absolute path
    want = (encoded_here / "tok" / "tokenizer.model").resolve()
    assert open_shards(tmp_path / "c" / "tokens").tokenizer_file() == want
    shutil.move(encoded_here, tmp_path / "d")  # together: the relative one
    want = (tmp_path / "d" / "tok" / "tokenizer.model").resolve()
    assert open_shards(tmp_path / "d" / "tokens").tokenizer_file() == want
