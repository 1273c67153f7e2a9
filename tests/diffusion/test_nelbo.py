"""The discrete-time NELBO: a hand-computed case, the decomposition against a Monte-Carlo oracle of the full
log-ratio, and the discretised decoder's normalisation."""

import math

import pytest
import torch

from gentool.diffusion.nelbo import discretized_gaussian_log_prob, nelbo_terms
from gentool.diffusion.objectives import DiffusionSpec, to_x0_eps


class ScaledInput(torch.nn.Module):
    """A fixed 'denoiser': eps_hat = c * x * t (any deterministic function works for the identity)."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t, y=None):
        return self.c * x * t.view(-1, *([1] * (x.dim() - 1)))


def test_hand_computed_single_step():
    """T = 1 and eps_hat = 0: prior KL = 0.5 (a x0^2 + (1 - a) - 1 - log(1 - a)); the decoder mean is
    x1 / sqrt(a) = x0 + sqrt(b / a) eps, so E[-log N(x0; mean, b)] = 0.5 log(2 pi b) + 0.5 / a."""
    spec = DiffusionSpec("ddpm", "eps", "linear", 1)
    b = float(spec.schedule_obj().betas[0])      # linear with T = 1: beta_1 = min(1000 * 1e-4, 0.999) = 0.1
    assert b == pytest.approx(0.1)
    a = 1 - b
    x0 = torch.full((40_000, 1), 0.8)
    terms = nelbo_terms(ScaledInput(0.0), spec, x0, levels=None, generator=torch.Generator().manual_seed(0))
    prior = 0.5 * (a * 0.64 + (1 - a) - 1 - math.log(1 - a))
    decoder = 0.5 * math.log(2 * math.pi * b) + 0.5 / a
    assert terms["prior"][0].item() == pytest.approx(prior, rel=1e-5)
    assert terms["diffusion"].abs().max() == 0
    assert terms["decoder"].mean().item() == pytest.approx(decoder, abs=0.02)


def test_decomposition_equals_monte_carlo_of_the_log_ratio():
    """sum of terms == E_q[log q(x_{1:T} | x0) - log p(x_{0:T})], the latter sampled along forward chains with
    each density written out independently (torch.distributions)."""
    from torch.distributions import Normal

    T, n = 3, 200_000
    spec = DiffusionSpec("ddpm", "eps", "linear", T)
    sch = spec.schedule_obj()
    model = ScaledInput(0.7)
    x0 = torch.tensor([[0.5], [-1.2]]).repeat_interleave(n, 0).double()
    g = torch.Generator().manual_seed(0)
    analytic = nelbo_terms(model, spec, x0.float(), levels=None, generator=g)
    total = sum(v for v in analytic.values()).double().view(2, n).mean(1)

    betas, alphas = sch.betas, sch.alphas
    xs = [x0]
    log_q = torch.zeros_like(x0)
    for t in range(T):  # forward chain
        nxt = alphas[t].sqrt() * xs[-1] + betas[t].sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        log_q += Normal(alphas[t].sqrt() * xs[-1], betas[t].sqrt()).log_prob(nxt)
        xs.append(nxt)
    log_p = Normal(0.0, 1.0).log_prob(xs[T])
    for t in range(T, 0, -1):  # reverse model p(x_{t-1} | x_t)
        i = torch.full((x0.shape[0],), t - 1)
        x0_hat, _ = to_x0_eps(model(xs[t], sch.time_input(i)), xs[t], i, sch, "eps")
        mean, var = sch.posterior(x0_hat, xs[t], i)
        var = var if t > 1 else betas[0].expand_as(var)
        log_p += Normal(mean, var.sqrt()).log_prob(xs[t - 1])
    mc = (log_q - log_p).view(2, n).mean(1)
    torch.testing.assert_close(total, mc, atol=0.02, rtol=0.01)


def test_stratified_estimate_is_close_to_the_full_sum():
    spec = DiffusionSpec("ddpm", "eps", "cosine", 100)
    x0 = torch.randn(2000, 2)
    full = nelbo_terms(ScaledInput(0.3), spec, x0, levels=None, generator=torch.Generator().manual_seed(0))
    est = [nelbo_terms(ScaledInput(0.3), spec, x0, levels=None, t_samples=25,
                       generator=torch.Generator().manual_seed(s))["diffusion"].mean() for s in range(8)]
    assert torch.stack(est).mean().item() == pytest.approx(full["diffusion"].mean().item(), rel=0.1)


def test_discretized_decoder_sums_to_one():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64).view(256, 1)  # float32 bin edges overlap by ~1e-8
    for mean, std in ((0.3, 0.05), (-0.99, 0.01), (1.2, 0.5), (0.0, 1e-4)):
        lp = discretized_gaussian_log_prob(grid, torch.tensor(mean).double(), torch.tensor(std).double())
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
