"""An exact denoiser for Gaussian-mixture data: the oracle the sampler and ELBO tests compare against."""

from __future__ import annotations

import torch

from gentool.diffusion.schedules import Schedule


class GMMDenoiser(torch.nn.Module):
    """Optimal eps-prediction E[eps | x_t] (ddpm) or velocity E[x1 - x0 | x_t] (flow) for data
    sum_k pi_k N(mu_k, s^2 I), exactly, in closed form."""

    def __init__(self, mu: torch.Tensor, s: float, schedule: Schedule | None = None, weights=None):
        super().__init__()
        self.mu, self.s, self.schedule = mu.double(), s, schedule
        self.logw = (torch.ones(len(mu)) / len(mu) if weights is None else torch.as_tensor(weights)).double().log()

    def _posterior_means(self, x, scale, noise_scale):
        """E[x1 | x] and E[z | x] for x = scale * x1 + noise_scale * z, z ~ N(0, I) (jointly Gaussian per component)."""
        x = x.double()
        var = scale ** 2 * self.s ** 2 + noise_scale ** 2                                 # (B, 1)
        diff = x[:, None, :] - scale[:, None] * self.mu[None]                            # (B, K, D)
        logp = self.logw[None] - 0.5 * (diff ** 2).sum(-1) / var - x.shape[1] / 2 * var.log()   # (B, K)
        w = logp.softmax(-1)[..., None]
        x1 = (w * (self.mu[None] + (scale * self.s ** 2 / var)[:, None] * diff)).sum(1)
        z = (w * (noise_scale / var)[:, None] * diff).sum(1)
        return x1, z

    def forward(self, x, t, y=None):
        b = x.shape[0]
        if self.schedule is not None:  # ddpm eps-prediction; t = (i + 1) / T
            i = (t * self.schedule.steps).round().long() - 1
            a = self.schedule.abar[i].double().view(b, 1)
            return self._posterior_means(x, a.sqrt(), (1 - a).sqrt())[1].float()
        tt = t.double().view(b, 1)   # flow: x_t = t x1 + (1 - t) x0, velocity E[x1 - x0 | x_t]
        x1, x0 = self._posterior_means(x, tt, 1 - tt)
        return (x1 - x0).float()
