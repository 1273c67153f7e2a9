"""SFT: packed examples do not see each other (block-diagonal causal attention, positions reset), and the loss
is the mean NLL of the masked tokens."""

import numpy as np
import pytest
import torch

from gentool.config import LMConfig
from gentool.lm.sft import fill_rows, nll, pack
from gentool.models.transformer import Transformer


def _model(kv=2):
    cfg = LMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
                   intermediate_size=64, max_position_embeddings=64)
    m = Transformer(cfg)
    m.init_weights(0)
    return m.eval()


def _examples(rng, n):
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 12))
        ids = rng.integers(4, 50, size=k)
        mask = np.zeros(k, bool)
        mask[int(rng.integers(1, k)):] = True
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("kv", [4, 2])
def test_packed_loss_equals_each_example_alone(kv):
    model = _model(kv)
    rng = np.random.default_rng(0)
    exs = _examples(rng, 7)
    it = iter(exs * 2)
    rows = fill_rows(lambda: next(it), 3, 24)
    assert all(len(r) >= 2 for r in rows) and all(sum(len(x) for x, _ in r) <= 24 for r in rows)
    batch = pack(rows, 24, pad_id=0)
    with torch.no_grad():
        logp = __import__("gentool.evaluation.logprobs", fromlist=["x"]).next_token_logprobs(
            model, batch[0], document_ids=batch[1][:, :-1])
        at = 0
        for r, row in enumerate(rows):
            at = 0
            for ids, mask in row:
                alone = pack([[(ids, mask)]], len(ids), 0)
                s, n = nll(model, alone)
                packed = -(logp[r, at:at + len(ids) - 1] * batch[2][r, at:at + len(ids) - 1]).sum()
                assert n.item() == mask[1:].sum()
                assert abs(packed.item() - s.item()) < 1e-5 * max(1.0, abs(s.item()))
                at += len(ids)


def test_positions_restart_per_example():
    model = _model()
    ids = torch.randint(4, 50, (1, 10))
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        h = model.hidden_states(ids, document_ids=doc)
        second = model.hidden_states(ids[:, 4:])
    torch.testing.assert_close(h[:, 4:], second, atol=1e-5, rtol=1e-5)


def test_loss_is_mean_over_masked_targets():
    model = _model()
    rng = np.random.default_rng(1)
    exs = _examples(rng, 2)
    batch = pack([[exs[0]], [exs[1]]], 12, 0)
    with torch.no_grad():
        logits = model(batch[0][:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[0][:, 1:].masked_fill(~batch[2], -100),
                                           ignore_index=-100)
    s, n = nll(model, batch)
    assert abs((s / n).item() - ce.item()) < 1e-5


def test_fill_rows_packs_a_finite_list():
    """The validation examples are a finite list: packing them must stop when they run out (it raised
    StopIteration when the rows outnumbered what the examples filled)."""
    exs = _examples(np.random.default_rng(2), 6)
    it = iter(exs)
    rows = [r for r in fill_rows(lambda: next(it, None), len(exs), 24) if r]
    assert [x for r in rows for x, _ in r] == [x for x, _ in exs] and len(rows) < len(exs)
