"""Bits per byte are the scored tokens' nats over the UTF-8 bytes those same tokens stand for, for every way of
giving data: shards, text files and stdin, whole or cut by --max-tokens."""

import json
import math
import shutil

import pytest

from gentool.config import config_from_preset
from gentool.data.shards import open_shards
from gentool.data.tokenizer import load_tokenizer
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York;\n" * 40


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("bpb")
    cfg = config_from_preset("tiny", vocab_size=400, max_position_embeddings=64)
    m = Transformer(cfg)
    m.init_weights(0)
    (d / "lm").mkdir()
    save_lm(m, cfg, d / "lm")
    shutil.copy(tiny_tokenizer / "tokenizer.model", d / "lm" / "tokenizer.model")
    (d / "text.txt").write_text(TEXT)
    return d


def scored_bytes(tok, ids):
    """The UTF-8 bytes a token stream stands for, piece by piece (byte-fallback pieces are one byte each)."""
    total = 0
    for i in ids:
        piece = tok.sp.id_to_piece(int(i))
        if tok.sp.is_control(int(i)):
            continue
        total += 1 if tok.sp.is_byte(int(i)) else len(piece.replace("\u2581", " ").encode())
    return total


def run(cli, *args, **kw):
    r = cli("perplexity", *args, "--json", "--device", "cpu", "--window", "64", **kw)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("max_tokens", [None, 37, 150])
def test_text_and_stdin(cli, lm, tiny_tokenizer, max_tokens):
    tok = load_tokenizer(tiny_tokenizer / "tokenizer.model")
    ids = tok.encode(TEXT, bos=True)
    cut = ["--max-tokens", str(max_tokens)] if max_tokens else []
    expected_bytes = len(TEXT.encode()) if max_tokens is None else scored_bytes(tok, ids[:max_tokens + 1])
    for args, kw in (((lm / "lm", lm / "text.txt", *cut), {}), ((lm / "lm", "-", *cut), {"input": TEXT})):
        res = run(cli, *args, **kw)
        assert res["tokens"] == (len(ids) - 1 if max_tokens is None else max_tokens)
        assert res["bytes"] == expected_bytes
        assert res["bits_per_byte"] == pytest.approx(res["nll"] * res["tokens"] / math.log(2) / expected_bytes,
                                                     rel=1e-9)


@pytest.mark.parametrize("max_tokens", [None, 200])
def test_shards(cli, lm, tiny_tokens, tiny_tokenizer, max_tokens):
    tok = load_tokenizer(tiny_tokenizer / "tokenizer.model")
    shards = open_shards(tiny_tokens, "val")
    cut = ["--max-tokens", str(max_tokens)] if max_tokens else []
    res = run(cli, lm / "lm", tiny_tokens, *cut)
    n = len(shards) if max_tokens is None else max_tokens
    expected = shards.bytes if max_tokens is None else scored_bytes(tok, shards.tokens(0, n))
    assert res["tokens"] == n and res["bytes"] == expected
    assert res["bits_per_byte"] == pytest.approx(res["nll"] * n / math.log(2) / expected, rel=1e-9)
    if max_tokens is None:  # the manifest's byte count is what the tokens decode to, piece by piece
        assert scored_bytes(tok, shards.tokens(0, len(shards))) == shards.bytes


def test_a_cut_does_not_change_bits_per_byte_much(cli, lm):
    """The old bug: dividing a cut's nats by the whole file's bytes made bits per byte ~100x too small."""
    whole, cut = run(cli, lm / "lm", lm / "text.txt"), run(cli, lm / "lm", lm / "text.txt", "--max-tokens", "60")
    assert 0.7 < cut["bits_per_byte"] / whole["bits_per_byte"] < 1.4


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.txt", "no such file"),
    (lambda d: d, "is a directory, not a token-shards artifact or a text file"),
])
def test_missing_and_directory_data(cli, lm, tmp_path, make, words):
    r = cli("perplexity", lm / "lm", make(tmp_path), "--device", "cpu")
    assert r.exit_code == 2 and words in r.stderr and "internal error" not in r.stderr
