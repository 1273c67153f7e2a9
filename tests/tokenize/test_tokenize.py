import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gentool.data.shards import open_shards
from gentool.data.tokenizer import load_tokenizer
from gentool.errors import UsageProblem
from gentool.tokenize import bundled_corpus, encode_corpus, parse_ids, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "tok"
    train_tokenizer(["builtin:shakespeare/comedies"], out, vocab_size=400)
    return out


def test_round_trip_bundled_corpus_and_byte_fallback(tok):
    t = load_tokenizer(tok)
    text = (bundled_corpus() / "comedies" / "twelfth_night.txt").read_text()
    assert t.decode(t.encode(text)) == text
    exotic = "naïve café — 東京 🙂\ttabs  and  spaces\n\n"
    ids = t.encode(exotic)
    assert t.decode(ids) == exotic and max(ids) < t.vocab_size
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)


def test_encode_manifest_counts_and_worker_independence(tok, tmp_path):
    a = encode_corpus(["builtin:shakespeare/comedies"], tok, tmp_path / "a", workers=1, shard_tokens=20000)
    b = encode_corpus(["builtin:shakespeare/comedies"], tok, tmp_path / "b", workers=2, shard_tokens=20000)
    assert a.id == b.id  # byte-identical shards whatever the worker count
    splits = a.contents["splits"]
    assert len(splits["train"]["shards"]) > 1 and splits["val"]["documents"] > 0
    text_bytes = sum(len(f.read_bytes()) for f in (bundled_corpus() / "comedies").glob("*.txt"))
    assert 0.9 * text_bytes < splits["train"]["bytes"] + splits["val"]["bytes"] <= text_bytes
    train = open_shards(tmp_path / "a", "train")
    assert len(train) == splits["train"]["tokens"] and train.tokens(0, 10).dtype == np.int64
    assert train.arrays[0].dtype == np.uint16 and isinstance(train.arrays[0], np.memmap)
    whole = train.tokens(0, len(train))
    assert (whole == 2).sum() == splits["train"]["documents"]  # one EOS per document
    t = load_tokenizer(tok)
    first_doc = whole[: int(np.argmax(whole == 2))]
    assert t.decode(first_doc.tolist()) in (bundled_corpus() / "comedies" / "as_you_like_it.txt").read_text()


def test_jsonl_and_stdin_documents(tok, tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"doc {i} ünï"}) for i in range(40)) + "\n")
    m = encode_corpus([str(data)], tok, tmp_path / "j", val_fraction=0.25)
    docs = sum(s["documents"] for s in m.contents["splits"].values())
    assert docs == 40
    r = cli("tokenize", "encode", "-", "--tokenizer", tok, "-o", tmp_path / "s", input="to be\n\nor not\n")
    assert r.exit_code == 0, r.output
    r = cli("tokenize", "decode", tmp_path / "s", "--tokenizer", tok, "--split", "train")
    assert r.exit_code == 0 and "to be" in r.stdout


def test_bad_inputs(tok, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    cases = [
        (["tokenize", "train", tmp_path / "missing.txt", "-o", tmp_path / "o1"], 2, "no such file"),
        (["tokenize", "train", tmp_path, "--glob", "*.md", "-o", tmp_path / "o2"], 2, "no files matching"),
        (["tokenize", "train", empty, "-o", tmp_path / "o3"], 2, "holds no text"),
        (["tokenize", "train", "builtin:shakespeare/comedies", "--vocab-size", "500000", "-o", tmp_path / "o4"], 2,
         "vocab"),
        (["tokenize", "encode", empty, "--tokenizer", tok, "-o", tmp_path / "o5"], 2, "holds no text"),
        (["tokenize", "encode", empty, "--tokenizer", empty, "-o", tmp_path / "o6"], 2, "not a gentool artifact"),
        (["tokenize", "train", "builtin:shakespeare/comedies", "-o", tok], 2, "output exists"),
    ]
    for args, code, msg in cases:
        r = cli(*args)
        assert r.exit_code == code, (args, r.output)
        assert msg in r.output.lower(), (msg, r.output)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]
    assert leftovers == [], leftovers


def test_invalid_utf8_is_replaced_with_a_warning(tok, tmp_path, cli):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff\xfe world\n\nsecond doc\n")
    r = cli("tokenize", "encode", f, "--tokenizer", tok, "-o", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["invalid_utf8_replaced"] == 2
    assert "replaced 2 invalid UTF-8" in r.stderr


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.lists(st.integers(0, 10**6)).map(lambda xs: " ".join(map(str, xs))),
                 st.lists(st.integers(0, 10**6)).map(json.dumps), st.text(max_size=30)))
def test_fuzz_id_parser(text):
    try:
        ids = parse_ids(text)
    except UsageProblem:
        return
    assert all(isinstance(i, int) for i in ids)
