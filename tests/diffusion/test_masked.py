import math

import pytest
import torch

from gentool.lm.diffusion.masked import (MaskSchedule, estimate_nelbo, masked_diffusion_loss, nelbo_per_sequence,
                                         subs_log_probs)
from gentool.lm.diffusion.samplers import filter_probs, sample, sample_blocks

V, MASK = 5, 4  # tokens 0..3 plus the mask


def oracle(probs):
    """A denoiser that predicts the i.i.d. data distribution exactly, ignoring context."""
    logits = torch.log(torch.tensor(probs + [1e-9]))

    def model(z):
        return logits.expand(*z.shape, V).clone()

    return model


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
@pytest.mark.parametrize("steps", [None, 10])
def test_nelbo_of_exact_model_equals_data_entropy(schedule, steps):
    p = [0.5, 0.25, 0.125, 0.125]
    entropy = -sum(q * math.log(q) for q in p)
    g = torch.Generator().manual_seed(0)
    data = torch.multinomial(torch.tensor(p), 64 * 32, replacement=True, generator=g).view(64, 32)
    mean, stderr, tokens = estimate_nelbo(oracle(p), data, MASK, MaskSchedule(schedule), samples=8, steps=steps,
                                          generator=g)
    empirical = -torch.log(torch.tensor(p))[data].mean().item()  # the entropy of this finite sample
    assert tokens == data.numel()
    assert 0 < stderr < 0.05
    assert abs(mean - empirical) < 4 * stderr, (mean, empirical, entropy, stderr)


def test_subs_never_predicts_mask_and_copies_unmasked():
    logits = torch.randn(2, 6, V)
    xt = torch.tensor([[0, MASK, 2, MASK, 3, 1], [MASK] * 6])
    logp = subs_log_probs(logits, xt, MASK)
    assert torch.all(logp[..., MASK] == -math.inf)
    keep = xt != MASK
    assert torch.all(logp[keep].argmax(-1) == xt[keep]) and torch.allclose(logp[keep].exp().sum(-1), torch.ones(4))
    assert torch.allclose(logp[~keep].exp().sum(-1), torch.ones(8), atol=1e-6)


def test_loss_is_finite_and_differentiable():
    emb = torch.nn.Embedding(V, V)
    x0 = torch.randint(0, 4, (8, 16))
    loss = masked_diffusion_loss(lambda z: emb(z), x0, MASK, MaskSchedule(), generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and emb.weight.grad.abs().sum() > 0


def _context_model():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, V)

    def model(z):  # output depends on the whole sequence, like a bidirectional transformer
        return emb(z) + emb(z).mean(dim=1, keepdim=True)

    return model


def test_caching_sampler_matches_uncached_with_fewer_calls():
    model = _context_model()
    z = torch.full((3, 8), MASK)
    runs = {c: sample(model, z, MASK, MaskSchedule(), steps=64, cache=c, generator=torch.Generator().manual_seed(7))
            for c in (True, False)}
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert runs[False].nfe == 64 and runs[True].nfe < 64
    assert not (runs[True].tokens == MASK).any()


def test_seeded_sampling_reproducible_and_prompt_kept():
    model = _context_model()
    z = torch.tensor([[1, MASK, MASK, 2, MASK, MASK]])
    a = sample(model, z, MASK, MaskSchedule(), steps=4, generator=torch.Generator().manual_seed(3)).tokens
    b = sample(model, z, MASK, MaskSchedule(), steps=4, generator=torch.Generator().manual_seed(3)).tokens
    assert torch.equal(a, b) and a[0, 0] == 1 and a[0, 3] == 2 and not (a == MASK).any()


def test_semi_autoregressive_blocks():
    model = _context_model()
    out = sample_blocks(model, torch.tensor([[1, 2]]), 10, MASK, MaskSchedule(), context=6, block=4, steps=3,
                        generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (1, 12) and out.tokens[0, :2].tolist() == [1, 2] and not (out.tokens == MASK).any()
    assert out.nfe <= 3 * 3


def test_filter_probs_matches_naive():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)
    assert torch.allclose(filter_probs(probs, top_k=2), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]], dtype=torch.float64))
    # nucleus 0.7: 0.5 + 0.2 reaches it, so the first two survive
    assert torch.allclose(filter_probs(probs, top_p=0.7), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(filter_probs(probs, top_p=0.3), torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))


def test_count_estimator_is_unbiased_and_less_noisy_than_per_token_masking():
    """Both draws estimate the same continuous-time NELBO; drawing the number of masks k and weighing by L/k has
    a smaller variance than masking each token with probability t and weighing by 1/t."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, V)

    def model(z):  # a model that uses context, so that the bound depends on what is masked
        return emb(z) + emb(z).mean(dim=1, keepdim=True)

    x0 = torch.randint(0, 4, (1, 16)).expand(4000, 16)
    with torch.no_grad():
        draws = {e: nelbo_per_sequence(model, x0, MASK, MaskSchedule(), estimator=e,
                                       generator=torch.Generator().manual_seed(2)).double() for e in ("count", "time")}
    (mc, vc), (mt, vt) = [(d.mean().item(), d.var().item()) for d in draws.values()]
    assert abs(mc - mt) < 4 * math.sqrt(vc / 4000 + vt / 4000), (mc, mt)
    assert vc < vt / 3, (vc, vt)
