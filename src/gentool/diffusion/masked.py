"""Masked (absorbing-state) discrete diffusion for language, as in MDLM (Sahoo et al. 2024).

Legend: B batch, L sequence length, V vocabulary including the mask token (mask_id = V - 1 by convention).

Forward process: each token of x0 is replaced by [MASK] independently with probability 1 - alpha(t), t in [0, 1].
SUBS parametrisation: the denoiser never predicts [MASK] (its logit is -inf) and copies unmasked tokens through, so
the negative ELBO reduces to a weighted cross-entropy over the masked positions:

    NELBO = E_t [ w(t) * sum_{l masked} -log p_theta(x0_l | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t))

(log-linear schedule alpha(t) = 1 - t gives w(t) = 1/t). With T discrete steps the weight becomes
T * (alpha(s) - alpha(t)) / (1 - alpha(t)) at t = i/T, s = (i-1)/T, a looser bound that tends to the continuous one.
The model is any callable mapping (B, L) token ids to (B, L, V) logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Denoiser = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskSchedule:
    """alpha(t): the probability that a token is still unmasked at time t (alpha(0) = 1, alpha(1) = 0)."""

    kind: str = "loglinear"  # loglinear | cosine

    def __post_init__(self):
        if self.kind not in ("loglinear", "cosine"):
            raise ValueError(f"unknown mask schedule {self.kind!r} (loglinear or cosine)")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t if self.kind == "loglinear" else torch.cos(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), the continuous-time NELBO weight."""
        if self.kind == "loglinear":
            return 1 / t
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1 - torch.cos(0.5 * math.pi * t))


def sample_times(n: int, *, antithetic: bool = True, eps: float = 1e-3, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """n times in [eps, 1]; antithetic (low-discrepancy) draws spread one uniform over n evenly spaced strata."""
    if antithetic:
        u = (torch.rand((), generator=generator, device=device) + torch.arange(n, device=device) / n) % 1.0
    else:
        u = torch.rand(n, generator=generator, device=device)
    return eps + (1 - eps) * u


def discrete_times(n: int, steps: int, *, generator: torch.Generator | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) pairs on the grid i/T with i uniform in 1..T."""
    i = torch.randint(1, steps + 1, (n,), generator=generator, device=device).float()
    return i / steps, (i - 1) / steps


def corrupt(x0: torch.Tensor, t: torch.Tensor, mask_id: int, schedule: MaskSchedule,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask each token of x0 (B, L) with probability 1 - alpha(t) (t is (B,))."""
    p_mask = (1 - schedule.alpha(t))[:, None]
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    return torch.where(u < p_mask, torch.full_like(x0, mask_id), x0)


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log p_theta(x0 | x_t) (B, L, V) with the mask never predicted and unmasked tokens copied through."""
    logits = logits.float().clone()
    logits[..., mask_id] = -math.inf
    logp = F.log_softmax(logits, dim=-1)
    keep = xt != mask_id
    if keep.any():
        copied = torch.full_like(logp, -math.inf).scatter_(-1, xt.unsqueeze(-1), 0.0)
        logp = torch.where(keep.unsqueeze(-1), copied, logp)
    return logp


def nelbo_per_sequence(model: Denoiser, x0: torch.Tensor, mask_id: int, schedule: MaskSchedule, *,
                       steps: int | None = None, antithetic: bool = True, generator: torch.Generator | None = None,
                       eps: float = 1e-3) -> torch.Tensor:
    """One Monte-Carlo draw of the NELBO in nats for each sequence of x0 (B, L); continuous time unless `steps`."""
    n = x0.shape[0]
    if steps is None:
        t = sample_times(n, antithetic=antithetic, eps=eps, generator=generator, device=x0.device)
        w = schedule.weight(t)
    else:
        t, s = discrete_times(n, steps, generator=generator, device=x0.device)
        w = steps * (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))
    xt = corrupt(x0, t, mask_id, schedule, generator)
    masked = xt == mask_id
    logits = model(xt)
    # cross-entropy only where masked; the mask logit is excluded (SUBS) by setting it to -inf
    logits = logits.float().masked_fill(
        F.one_hot(torch.tensor(mask_id, device=x0.device), logits.shape[-1]).bool(), -math.inf)
    nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (B, L)
    return w * (nll * masked).sum(dim=1)


def masked_diffusion_loss(model: Denoiser, x0: torch.Tensor, mask_id: int, schedule: MaskSchedule, *,
                          generator: torch.Generator | None = None, antithetic: bool = True) -> torch.Tensor:
    """Training loss: the NELBO in nats per token, averaged over the batch."""
    return nelbo_per_sequence(model, x0, mask_id, schedule, antithetic=antithetic, generator=generator).sum() \
        / x0.numel()


@torch.no_grad()
def estimate_nelbo(model: Denoiser, windows: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, samples: int = 1,
                   steps: int | None = None, batch_size: int = 8, generator: torch.Generator | None = None
                   ) -> tuple[float, float, int]:
    """(mean NELBO in nats/token, Monte-Carlo standard error, tokens) over windows (N, L), `samples` draws each."""
    per_token = []
    for _ in range(samples):
        for i in range(0, windows.shape[0], batch_size):
            x0 = windows[i:i + batch_size]
            nats = nelbo_per_sequence(model, x0, mask_id, schedule, steps=steps, generator=generator)
            per_token.append(nats.double().cpu() / x0.shape[1])
    values = torch.cat(per_token)
    mean = values.mean().item()
    stderr = (values.std(unbiased=True) / math.sqrt(values.numel())).item() if values.numel() > 1 else math.nan
    return mean, stderr, windows.numel()


def filter_probs(probs: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k / nucleus filtering of (..., V) probabilities, renormalised (float64 stays float64)."""
    if top_k is not None and 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p is not None and 0 < top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1) / sorted_p.sum(-1, keepdim=True)
        drop_sorted = cum - sorted_p / sorted_p.sum(-1, keepdim=True) >= top_p  # keep the first token always
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64: float32 Gumbel noise truncates the tail and lowers the effective temperature
    (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models")."""
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64, device=probs.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (probs.double().log() + gumbel).argmax(-1)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, L)
    nfe: int              # network calls


@torch.no_grad()
def sample(model: Denoiser, z: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, steps: int,
           cache: bool = True, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> SampleResult:
    """Ancestral unmasking from z (B, L): masked positions are generated, the others (a prompt) kept.

    From t to s < t each masked position unmasks with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) and then
    takes a token drawn from p_theta(x0 | z). Without time conditioning the network's output only changes when z
    does, so with `cache` a step where nothing unmasked reuses the last probabilities (MDLM's caching sampler).
    Random draws are identical with and without caching, so both give the same samples under one seed.
    """
    z = z.clone()
    nfe = 0
    probs = None
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    changed = True
    for k in range(steps):
        t, s = times[k], times[k + 1]
        if probs is None or changed or not cache:
            logits = model(z).double()
            nfe += 1
            logits[..., mask_id] = -math.inf
            probs = filter_probs(F.softmax(logits / max(temperature, 1e-6), dim=-1), top_k, top_p)
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        p_unmask = ((a_s - a_t) / (1 - a_t)).item() if k < steps - 1 else 1.0
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64, device=z.device)
        candidate = _categorical(probs, generator)
        unmask = (z == mask_id) & (u < p_unmask)
        changed = bool(unmask.any())
        z = torch.where(unmask, candidate, z)
    return SampleResult(z, nfe)


@torch.no_grad()
def sample_blocks(model: Denoiser, prompt: torch.Tensor, new_tokens: int, mask_id: int, schedule: MaskSchedule, *,
                  context: int, block: int, steps: int, **kwargs) -> SampleResult:
    """Semi-autoregressive generation of long texts: blocks of `block` masked tokens appended to the last
    `context - block` tokens and unmasked with `steps` steps each."""
    assert 0 < block <= context
    out = prompt.clone()
    nfe = 0
    remaining = new_tokens
    while remaining > 0:
        n = min(block, remaining)
        ctx = out[:, max(0, out.shape[1] - (context - n)):]
        z = torch.cat([ctx, torch.full((out.shape[0], n), mask_id, dtype=out.dtype, device=out.device)], dim=1)
        res = sample(model, z, mask_id, schedule, steps=steps, **kwargs)
        out = torch.cat([out, res.tokens[:, -n:]], dim=1)
        nfe += res.nfe
        remaining -= n
    return SampleResult(out, nfe)
