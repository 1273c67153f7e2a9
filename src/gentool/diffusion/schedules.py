"""Discrete-time DDPM noise schedules and their closed forms (Ho et al. 2020; cosine: Nichol & Dhariwal 2021).

Timesteps are 0-based indices i = 0..T-1 standing for the paper's t = i + 1. Every table is float64 for accuracy
and cast where used. The forward marginal is q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); the posterior
q(x_{t-1} | x_t, x_0) = N(mean_t, beta_tilde_t I) with

    mean_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t          (abar_0 := 1, so beta_tilde_1 = 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("linear", "cosine")


def make_betas(kind: str, steps: int) -> torch.Tensor:
    """beta_1..beta_T. Linear: 1e-4..0.02 rescaled to keep the total noise of the 1000-step original;
    cosine: abar(t) = cos^2((t/T + s)/(1 + s) pi/2) with s = 0.008, betas clipped at 0.999."""
    if kind == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), steps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {kind!r} (linear or cosine)")


@dataclass
class Schedule:
    kind: str = "linear"
    steps: int = 1000

    def __post_init__(self):
        self.betas = make_betas(self.kind, self.steps)                 # (T,)
        self.alphas = 1 - self.betas
        self.abar = torch.cumprod(self.alphas, 0)                       # (T,)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.post_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)
        self.post_c0 = self.abar_prev.sqrt() * self.betas / (1 - self.abar)
        self.post_ct = self.alphas.sqrt() * (1 - self.abar_prev) / (1 - self.abar)

    def to_dict(self) -> dict:
        return {"type": self.kind, "steps": self.steps}

    @staticmethod
    def _take(table: torch.Tensor, i: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[i] shaped to broadcast against `like` (B, ...)."""
        return table.to(like.device)[i].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def time_input(self, i: torch.Tensor) -> torch.Tensor:
        """What the network sees as time: (i + 1) / T in (0, 1]."""
        return (i.float() + 1) / self.steps

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self._take(self.abar, i, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._take(self.post_c0, i, x0) * x0 + self._take(self.post_ct, i, xt) * xt
        return mean, self._take(self.post_var, i, xt)

    def snr(self) -> torch.Tensor:
        return self.abar / (1 - self.abar)
