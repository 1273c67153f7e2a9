"""`tokenize encode` with encoding threads gives exactly the ids of a plain SentencePiece loop over the documents."""

import numpy as np
import pytest
import sentencepiece as spm

import gentool.tokenize as T
from gentool.data.shards import open_shards
from gentool.tokenize import bundled_corpus, encode_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "tok"
    train_tokenizer(["builtin:shakespeare/comedies"], out, vocab_size=400)
    return out


@pytest.mark.parametrize("workers", [1, 3])
def test_shards_equal_a_plain_sentencepiece_loop(tok, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(T, "BATCH_CHARS", 5000)  # many batches in flight, finishing out of order
    files = sorted((bundled_corpus() / "tragedies").glob("*.txt"))[:2]
    encode_corpus([str(f) for f in files], tok, tmp_path / "s", val_fraction=0, workers=workers)
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    want = [i for f in files for d in f.read_text().split("\n\n") if d.strip()
            for i in sp.encode(d.strip("\n")) + [sp.eos_id()]]
    got = open_shards(tmp_path / "s").tokens(0, 10**9)
    assert got.tolist() == want


def test_empty_segments_and_eos_placement(tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    texts, lasts = ["to be", "", "or not", "", ""], [False, True, True, False, True]
    from gentool.data.tokenizer import Tokenizer

    flat, counts, nbytes = T._encode_batch(T._batch_encoder(Tokenizer(tok / "tokenizer.model")), texts, lasts, 2,
                                           "<u2")
    want = [sp.encode(t) + [2] * last for t, last in zip(texts, lasts)]
    assert counts.tolist() == [len(w) for w in want] and flat.tolist() == sum(want, [])
    assert nbytes.tolist() == [5, 0, 6, 0, 0] and flat.dtype == np.uint16
