"""Scoring runs the output head only for positions some window scores; the NLLs are those of the full head."""

import torch
import torch.nn.functional as F

from gentool.config import config_from_preset
from gentool.evaluation.windows import plan_llamacpp, token_nlls, window_nll
from gentool.models.transformer import Transformer


def tiny():
    torch.manual_seed(0)
    m = Transformer(config_from_preset("tiny", vocab_size=300, max_position_embeddings=64))
    m.init_weights(0)
    return m.eval()


@torch.no_grad()
def test_first_skips_the_head_but_not_the_context():
    m = tiny()
    x = torch.randint(0, 300, (3, 40))
    full = window_nll(m, x)
    for first in (0, 1, 17, 38):
        torch.testing.assert_close(window_nll(m, x, first=first, chunk_rows=5), full[:, first:])


@torch.no_grad()
def test_llamacpp_protocol_equals_full_logits_reference():
    m = tiny()
    ids = torch.randint(0, 300, (200,))
    got = token_nlls(m, ids, window=32, stride=32, batch_size=3, protocol="llama.cpp", bos_id=1)
    want = []
    for w in plan_llamacpp(len(ids), 32):
        x = ids[w.start:w.end].clone()
        x[0] = 1
        nll = F.cross_entropy(m(x[None, :-1])[0], x[1:], reduction="none")
        want.append(nll[w.score_from - w.start - 1:])
    torch.testing.assert_close(got, torch.cat(want).double(), atol=1e-5, rtol=1e-5)
    mixed = token_nlls(m, ids, window=32, stride=10, batch_size=4)  # first window scores from 1, later ones 22
    assert len(mixed) == len(ids) - 1
