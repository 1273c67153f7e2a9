"""Continuation scoring: the batched, cache-sharing scorer equals one plain forward pass per request, and the
tokenization and rolling windows follow lm-evaluation-harness."""

import random

import pytest
import torch

from gentool.config import config_from_preset
from gentool.evaluation.continuation import encode_pair, rolling_windows, score_continuations
from gentool.models.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    m = Transformer(config_from_preset("tiny", vocab_size=50, max_position_embeddings=32)).eval()
    m.init_weights(seed=1)
    return m


def naive(model, ctx, cont, max_len):
    """lm-eval's `_loglikelihood_tokens` for one request: (ctx + cont)[-(max_len + 1):][:-1], one forward."""
    inp = (ctx + cont)[-(max_len + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).double(), -1)[0, -len(cont):]
    tok = torch.tensor(cont)
    return logp.gather(-1, tok[:, None])[:, 0], bool((logp.argmax(-1) == tok).all())


def test_batched_shared_context_scores_equal_one_pass_per_request(model):
    rnd = random.Random(0)
    reqs = []
    for _ in range(7):  # multiple-choice questions: one context, several choices of different lengths
        ctx = [rnd.randrange(50) for _ in range(rnd.randint(1, 12))]
        reqs += [(ctx, [rnd.randrange(50) for _ in range(rnd.randint(1, 5))]) for _ in range(rnd.randint(2, 4))]
    reqs.append(([rnd.randrange(50) for _ in range(40)], [3, 4, 5]))   # longer than the context: cut on the left
    greedy_ctx = [7, 8, 9]
    with torch.no_grad():
        g = int(model(torch.tensor([greedy_ctx]))[0, -1].argmax())
    reqs.append((greedy_ctx, [g]))
    for bs in (1, 3, 64):
        got = score_continuations(model, reqs, batch_size=bs, max_len=32)
        for (ctx, cont), s in zip(reqs, got):
            want, greedy = naive(model, ctx, cont, 32)
            assert s.logprob == pytest.approx(want.sum().item(), abs=1e-4)
            torch.testing.assert_close(torch.tensor(s.token_logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)
            assert s.greedy == greedy
        assert got[-1].greedy


class Chars:
    """A character tokenizer whose merges depend on the neighbours ("ab" is one token), like BPE."""
    bos_id, eos_id = None, 0

    def encode(self, text, bos=False):
        out, i = [], 0
        while i < len(text):
            if text[i:i + 2] == "ab":
                out.append(1)
                i += 2
            else:
                out.append(2 + ord(text[i]) % 40)
                i += 1
        return out


def test_encode_pair_splits_the_whole_encoding_and_moves_trailing_spaces():
    tok = Chars()
    ctx, cont = encode_pair(tok, "xa ", "bz")
    assert ctx == tok.encode("xa") and cont == tok.encode(" bz")
    ctx, cont = encode_pair(tok, "xa", "bz")    # "ab" merges across the boundary: lm-eval splits by length
    assert ctx == tok.encode("xa") and cont == tok.encode("xabz")[2:] == tok.encode("z")
    assert encode_pair(tok, "", "q") == ([0], tok.encode("q"))   # empty context: EOS (no BOS) stands for it


def test_rolling_windows_score_every_token_once_with_bounded_inputs():
    toks = list(range(10, 33))
    for max_len in (1, 4, 7, 30):
        wins = rolling_windows(toks, 1, max_len)
        assert [t for _, c in wins for t in c] == toks
        for ctx, cont in wins:
            assert len(ctx) + len(cont) - 1 <= max_len and len(ctx) >= 1
        assert wins[0][0] == [1]
