import torch

from gentool.config import config_from_preset
from gentool.evaluation.logprobs import masked_sums, next_token_logprobs, token_logprobs
from gentool.models.transformer import Transformer


def test_next_token_logprobs_equal_a_full_log_softmax_in_chunks():
    model = Transformer(config_from_preset("tiny", vocab_size=100))
    model.init_weights(seed=0)
    x = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = next_token_logprobs(model, x, chunk_rows=5)
        want = torch.log_softmax(model(x[:, :-1]).double(), -1).gather(-1, x[:, 1:, None])[..., 0]
    assert got.dtype == torch.float32 and got.shape == (2, 16)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_ignored_targets_score_zero_and_masked_sums_count():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, -100, 3, 2]])
    lp = token_logprobs(logits, targets)
    assert lp[0, 1] == 0 and (lp[0, [0, 2, 3]] < 0).all()
    total, n = masked_sums(lp, targets >= 0)
    torch.testing.assert_close(total, lp.sum(-1))
    assert n.item() == 3


def test_a_large_vocabulary_keeps_float32_accuracy():
    """Over 50k logits a float32 log-sum-exp is good to ~1e-6 relative when reduced the vectorised way; cross-entropy
    over a transposed (B, V, T) view sums serially and was 10x worse (2e-4 per token on SmolLM2's vocabulary, 2e-3
    on a multiple-choice continuation), more than lm-eval's 1e-4 tolerance on a log-likelihood."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 50000, generator=g) * 4 + 10
    targets = torch.randint(0, 50000, (2, 16), generator=g)
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() < 5e-5
