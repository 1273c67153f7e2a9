"""The discrete-time negative ELBO of a DDPM (Ho et al. 2020, eq. 5), in nats per example or bits per dimension:

    NELBO = KL(q(x_T | x_0) || N(0, I))                                   prior
          + sum_{t=2..T} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))      diffusion
          - log p(x_0 | x_1)                                              decoder

p(x_{t-1} | x_t) = N(posterior mean at x0_hat, beta_tilde_t I) for t >= 2 (so each KL is a squared mean error), and the
decoder N(x0_hat(x_1), beta_1 I) is discretised to the 256 bins of 8-bit data scaled to [-1, 1] (bin width 2/255,
the edge bins open-ended), or left continuous for real-valued data. The sum over t is exact (all T terms, one
denoiser call each), or an unbiased stratified estimate with `t_samples`; the x_t are Monte-Carlo draws.
"""

from __future__ import annotations

import math

import torch

from gentool.diffusion.objectives import DiffusionSpec, to_x0_eps
from gentool.diffusion.schedules import Schedule


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                                  levels: int = 256) -> torch.Tensor:
    """log P(bin of x) under N(mean, std^2), for x on the grid {-1, ..., 1} of `levels` values; elementwise."""
    half = 1.0 / (levels - 1)
    upper = torch.where(x > 1 - 1e-3, torch.ones_like(x), _std_normal_cdf((x + half - mean) / std))
    lower = torch.where(x < -1 + 1e-3, torch.zeros_like(x), _std_normal_cdf((x - half - mean) / std))
    mass = upper - lower
    # far in a tail the difference of CDFs underflows: fall back to the density times the bin width
    log_density = -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi) + math.log(2 * half)
    return torch.where(mass > 1e-12, torch.log(mass.clamp_min(1e-30)), log_density)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))


@torch.no_grad()
def nelbo_terms(model, spec: DiffusionSpec, x0: torch.Tensor, y: torch.Tensor | None = None, *,
                levels: int | None = 256, t_samples: int | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per-example terms in nats: prior, diffusion (sum over t = 2..T), decoder (-log p(x0 | x1)); (B,) each."""
    if spec.family != "ddpm":
        raise ValueError("the discrete-time ELBO is defined for ddpm checkpoints")
    sch: Schedule = spec.schedule_obj()
    x0 = x0.float()
    b, dims = x0.shape[0], tuple(range(1, x0.dim()))
    dev = x0.device

    def randn() -> torch.Tensor:
        return torch.randn(x0.shape, generator=generator, device=dev)

    def x0_hat(xt: torch.Tensor, i: int) -> torch.Tensor:
        ii = torch.full((b,), i, device=dev, dtype=torch.long)
        return to_x0_eps(model(xt, sch.time_input(ii), y).float(), xt, ii, sch, spec.parameterization)[0]

    a_T = float(sch.abar[-1])
    prior = 0.5 * (a_T * x0 ** 2 + (1 - a_T) - 1 - math.log(1 - a_T)).sum(dims)
    T = sch.steps
    if t_samples is None or t_samples >= T - 1:
        idx, weight = list(range(1, T)), 1.0
    else:  # one uniform draw per stratum of the T-1 diffusion terms
        edges = torch.linspace(1, T, t_samples + 1)
        u = torch.rand(t_samples, generator=generator).to(edges)
        idx = sorted({int(edges[k] + u[k] * (edges[k + 1] - edges[k])) for k in range(t_samples)})
        idx = [min(max(i, 1), T - 1) for i in idx]
        weight = (T - 1) / len(idx)
    diffusion = torch.zeros(b, device=dev)
    for i in idx:
        ii = torch.full((b,), i, device=dev, dtype=torch.long)
        xt = sch.q_sample(x0, ii, randn())
        mean_q, var = sch.posterior(x0, xt, ii)
        mean_p, _ = sch.posterior(x0_hat(xt, i), xt, ii)
        diffusion += ((mean_q - mean_p) ** 2 / (2 * var)).sum(dims)
    diffusion *= weight
    x1 = sch.q_sample(x0, torch.zeros(b, device=dev, dtype=torch.long), randn())
    mean = x0_hat(x1, 0)
    var = torch.tensor(float(sch.betas[0]), device=dev)
    if levels:
        decoder = -discretized_gaussian_log_prob(x0, mean, var.sqrt(), levels).sum(dims)
    else:
        decoder = -gaussian_log_prob(x0, mean, var).sum(dims)
    return {"prior": prior, "diffusion": diffusion, "decoder": decoder}
