import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gentool.tokenize as T
from gentool.data.shards import open_shards
from gentool.data.tokenizer import load_tokenizer
from gentool.errors import UsageProblem
from gentool.tokenize import bundled_corpus, encode_corpus, parse_ids, train_tokenizer

COMEDIES = "builtin:shakespeare/comedies"


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def leftovers(directory):
    """Anything a failed command left behind: outputs or their temporary siblings."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((".o", "o")))


def test_round_trip_bundled_corpus_and_byte_fallback(tok):
    t = load_tokenizer(tok)
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (0, 1, 2, 3, 400)
    assert t.sha256.startswith("sha256:") and len(t.sha256) == 71
    for f in sorted(bundled_corpus().rglob("*.txt")):  # tragedies were not seen in training
        text = f.read_text(encoding="utf-8")
        assert t.decode(t.encode(text)) == text, f
    exotic = "naïve café — 東京 🙂 ∮ E⋅da\ttabs  and  spaces\r\n\n  \x00\u2028end"
    ids = t.encode(exotic)
    assert t.decode(ids) == exotic and max(ids) < t.vocab_size
    assert any(t.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback was used
    assert t.encode("to be", bos=True, eos=True)[0] == 1 and t.encode("to be", eos=True)[-1] == 2


def test_training_options(tmp_path):
    m = train_tokenizer([COMEDIES], tmp_path / "u", vocab_size=350, model_type="unigram",
                        user_symbols=["<scene>", "ROSALIND"], input_sentence_size=500, seed=3)
    assert m.contents["model_type"] == "unigram" and m.contents["special_tokens"] == {"unk": 0, "bos": 1, "eos": 2,
                                                                                      "pad": 3}
    assert m.metrics["lines_used"] == 500 < m.metrics["lines"]
    t = load_tokenizer(tmp_path / "u")
    ids = t.encode("<scene>ROSALIND speaks")
    assert [t.id_to_piece(i) for i in ids[:2]] == ["<scene>", "ROSALIND"]
    assert m.contents["tokenizer_id"] == t.sha256
    again = train_tokenizer([COMEDIES], tmp_path / "u2", vocab_size=350, model_type="unigram",
                            user_symbols=["<scene>", "ROSALIND"], input_sentence_size=500, seed=3)
    assert again.contents["tokenizer_id"] == m.contents["tokenizer_id"]  # same seed, same tokenizer


def test_encode_manifest_counts_and_worker_independence(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "BATCH_CHARS", 20000)  # many tasks, so three workers finish out of order
    a = encode_corpus([COMEDIES], tok, tmp_path / "a", workers=1, shard_tokens=20000)
    b = encode_corpus([COMEDIES], tok, tmp_path / "b", workers=3, shard_tokens=20000)
    assert a.id == b.id  # byte-identical shards whatever the worker count
    splits = a.contents["splits"]
    assert a.contents["tokenizer_id"] == load_tokenizer(tok).sha256 and a.contents["eos_id"] == 2
    assert len(splits["train"]["shards"]) > 1 and splits["val"]["documents"] > 0
    files = sorted((bundled_corpus() / "comedies").glob("*.txt"))
    docs = [d for f in files for d in f.read_text().split("\n\n") if d.strip()]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(docs)
    assert 0.02 < splits["val"]["documents"] / len(docs) < 0.08  # --val-fraction 0.05
    doc_bytes = sum(len(d.strip("\n").encode()) for d in docs)
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == doc_bytes
    t = load_tokenizer(tok)
    for split in ("train", "val"):
        s = open_shards(tmp_path / "a", split)
        assert len(s) == splits[split]["tokens"] and s.documents == splits[split]["documents"]
        whole = s.tokens(0, len(s))
        assert (whole == 2).sum() == splits[split]["documents"] and whole[-1] == 2  # one EOS per document
        assert len(t.decode(whole.tolist()).encode()) == splits[split]["bytes"]  # EOS decodes to nothing
    train = open_shards(tmp_path / "a", "train")
    assert train.arrays[0].dtype == np.uint16 and isinstance(train.arrays[0], np.memmap)
    first = train.tokens(0, int(np.argmax(train.tokens(0, 5000) == 2)))
    assert t.decode(first.tolist()) in files[0].read_text()
    c = encode_corpus([COMEDIES], tok, tmp_path / "c", workers=1, shard_tokens=20000, split_seed=1)
    assert c.contents["splits"]["val"]["documents"] != splits["val"]["documents"] or c.id != a.id


def test_long_documents_are_encoded_in_segments_with_the_same_ids(tok, tmp_path):
    whole = encode_corpus([COMEDIES], tok, tmp_path / "w", unit="file", val_fraction=0, workers=1)
    seg = encode_corpus([COMEDIES], tok, tmp_path / "s", unit="file", val_fraction=0, workers=2, segment_chars=3000)
    assert seg.id == whole.id and whole.contents["splits"]["train"]["documents"] == 4
    t = load_tokenizer(tok)
    text = "".join(f.read_text() for f in sorted((bundled_corpus() / "comedies").glob("*.txt")))
    ids = open_shards(tmp_path / "s").tokens(0, 10**9)
    assert t.decode(ids.tolist()) == text  # the whole corpus, exactly, in order


def test_jsonl_and_stdin_documents(tok, tmp_path, cli):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"doc {i} ünï"}) for i in range(40)) + "\n")
    m = encode_corpus([str(data)], tok, tmp_path / "j", val_fraction=0.25, workers=1)
    assert sum(s["documents"] for s in m.contents["splits"].values()) == 40
    body = tmp_path / "b.jsonl"
    body.write_text(json.dumps({"body": "x y"}) + "\n")
    r = cli("tokenize", "encode", body, "--tokenizer", tok, "-o", tmp_path / "b", "--text-field", "body",
            "--val-fraction", "0", "--workers", "1")
    assert r.exit_code == 0, r.output
    r = cli("tokenize", "encode", "-", "--tokenizer", tok, "-o", tmp_path / "s", "--workers", "1",
            "--val-fraction", "0", input="to be\n\nor not\n")
    assert r.exit_code == 0, r.output
    assert "train_documents" in r.stdout
    r = cli("tokenize", "decode", tmp_path / "s", "--tokenizer", tok, "--split", "train")
    assert r.exit_code == 0 and r.stdout == "to beor not"
    r = cli("tokenize", "decode", tmp_path / "s", "--tokenizer", tok, "--split", "train", "--start", "1",
            "--count", "3")
    ids = open_shards(tmp_path / "s").tokens(1, 4).tolist()
    assert r.exit_code == 0 and r.stdout == load_tokenizer(tok).decode(ids)


def test_decode_ids_from_stdin(tok, cli):
    t = load_tokenizer(tok)
    text = "O Romeo, Romeo! 🙂"
    ids = t.encode(text)
    for given_ in (" ".join(map(str, ids)), json.dumps(ids), ",".join(map(str, ids)) + "\n"):
        r = cli("tokenize", "decode", "-", "--tokenizer", tok, input=given_)
        assert r.exit_code == 0 and r.stdout == text, r.output
    for bad, msg in (("1 2 x", "not a token id"), ("[1, 2.5]", "flat JSON list"), ("[1, 2", "not valid JSON"),
                     ("5 400", "outside the vocabulary"), ("-1", "outside the vocabulary")):
        r = cli("tokenize", "decode", "-", "--tokenizer", tok, input=bad)
        assert r.exit_code == 2 and msg in r.output, (bad, r.output)
    r = cli("tokenize", "decode", "-", input="1 2")
    assert r.exit_code == 2 and "--tokenizer" in r.output


def test_bad_inputs(tok, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n  \n")
    other = tmp_path / "tok2"
    train_tokenizer([str(bundled_corpus() / "comedies" / "twelfth_night.txt")], other, vocab_size=350)
    encode_corpus([COMEDIES], tok, tmp_path / "shards", workers=1)
    cases = [
        (["tokenize", "train", tmp_path / "missing.txt", "-o", tmp_path / "o1"], 2, "no such file"),
        (["tokenize", "train", empty, "--glob", "*.md", "-o", tmp_path / "o2"], 2, "no files matching"),
        (["tokenize", "train", empty, "-o", tmp_path / "o3"], 2, "holds no text"),
        (["tokenize", "train", COMEDIES, "--vocab-size", "500000", "-o", tmp_path / "o4"], 2,
         "is more than this corpus supports"),
        (["tokenize", "train", COMEDIES, "--vocab-size", "100", "-o", tmp_path / "o4"], 2, "too small"),
        (["tokenize", "train", COMEDIES, "--model-type", "wordpiece", "-o", tmp_path / "o4"], 2, "model-type"),
        (["tokenize", "train", "-", "-o", tmp_path / "o4"], 2, "holds no text"),  # empty stdin
        (["tokenize", "train", "builtin:nope", "-o", tmp_path / "o4"], 2, "no bundled corpus"),
        (["tokenize", "encode", empty, "--tokenizer", tok, "-o", tmp_path / "o5"], 2, "holds no text"),
        (["tokenize", "encode", COMEDIES, "--tokenizer", empty, "-o", tmp_path / "o6"], 2,
         "no tokenizer.model or tokenizer.json"),
        (["tokenize", "encode", COMEDIES, "--tokenizer", tmp_path / "shards", "-o", tmp_path / "o6"], 2,
         "no tokenizer.model or tokenizer.json"),
        (["tokenize", "encode", COMEDIES, "--tokenizer", tok, "-o", tmp_path / "o6", "--val-fraction", "1"], 2,
         "val-fraction"),
        (["tokenize", "encode", COMEDIES, "--tokenizer", tok, "-o", tmp_path / "o6", "--document", "x"], 2,
         "unknown --document"),
        (["tokenize", "train", COMEDIES, "-o", tok], 2, "output exists"),
        (["tokenize", "encode", COMEDIES, "--tokenizer", tok, "-o", tok], 2, "the output is the input"),
        (["tokenize", "encode", COMEDIES, "--tokenizer", tok, "-o", tok, "--force"], 2, "the output is the input"),
        (["tokenize", "train", empty, "-o", empty / "tok", "--force"], 2, "the output lies inside the input"),
        (["tokenize", "decode", tmp_path / "shards", "--tokenizer", other], 2, "another tokenizer"),
        (["tokenize", "decode", tmp_path / "shards", "--tokenizer", tok, "--split", "test"], 2, "no 'test' split"),
    ]
    for args, code, msg in cases:
        r = cli(*args)
        assert r.exit_code == code, (args, r.output)
        assert msg in r.output, (msg, r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert leftovers(tmp_path) == []
    assert load_tokenizer(tok).vocab_size == 400  # the refused --force-less run left the output alone


def test_interrupt_in_process_leaves_nothing(tok, tmp_path, cli, monkeypatch):
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = T._ShardWriter.add
    monkeypatch.setattr(T._ShardWriter, "add", interrupted)
    monkeypatch.setattr(T, "BATCH_CHARS", 20000)
    r = cli("tokenize", "encode", COMEDIES, "--tokenizer", tok, "-o", tmp_path / "out", "--workers", "2")
    assert r.exit_code == 130 and "interrupted" in r.output
    assert leftovers(tmp_path) == []


def test_ctrl_c_mid_encode_leaves_no_partial_artifact(tok, tmp_path):
    """A real SIGINT while encoding from a stdin that is still open, with a worker pool running."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "gentool", "tokenize", "encode", "-", "--tokenizer", str(tok),
                             "-o", str(out), "--workers", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"},
                            # a shell without job control starts background jobs with Ctrl-C ignored, and Python
                            # keeps an inherited SIG_IGN: give the child the disposition a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write(b"some text\n\n" * 1000)
    proc.stdin.flush()
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # the pool is starting or blocked on stdin: either way mid-encode
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"interrupted" in err and b"Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_invalid_utf8_is_replaced_with_a_warning(tok, tmp_path, cli):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff\xfe world\n\nsecond doc\n")
    r = cli("tokenize", "encode", f, "--tokenizer", tok, "-o", tmp_path / "s", "--json", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["invalid_utf8_replaced"] == 2
    assert "replaced 2 invalid UTF-8" in r.stderr
    r = cli("tokenize", "train", f, "-o", tmp_path / "t", "--vocab-size", "273")
    assert r.exit_code == 0 and "replaced 2 invalid UTF-8" in r.stderr, r.output


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(-10**6, 10**20), max_size=20),
       seps=st.lists(st.sampled_from([" ", "\n", "\t", ",", ", ", " ,\n"]), min_size=1, max_size=3))
def test_fuzz_id_parser_round_trips(ids, seps):
    text = "".join(f"{i}{seps[k % len(seps)]}" for k, i in enumerate(ids))
    assert parse_ids(text) == ids
    assert parse_ids(json.dumps(ids)) == ids
    assert parse_ids(" \n" + json.dumps(ids, indent=1) + "\n") == ids


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.text(alphabet="0123456789 ,-+[]\n.e\"", max_size=30)))
def test_fuzz_id_parser_takes_integers_or_says_why(text):
    try:
        ids = parse_ids(text)
    except UsageProblem as e:
        assert "token id" in str(e)
        return
    assert all(type(i) is int for i in ids)
    assert len(ids) <= len(text)
    if not text.strip().startswith("["):
        assert " ".join(map(str, ids)) == " ".join(str(int(w)) for w in text.replace(",", " ").split())
