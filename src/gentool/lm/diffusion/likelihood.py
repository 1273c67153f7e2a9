"""Log-likelihood of a continuation given a context under a masked- or block-diffusion LM: minus its NELBO with
the context clean and only continuation tokens ever masked, Monte-Carlo as LLaDA (Nie et al. 2025, eq. 6) and
MDLM evaluate conditional likelihoods.

One draw: k of the continuation's n tokens masked, k uniform on 1..n, chosen uniformly; the bound is
(n / k) · sum over the masked tokens of -log p(x_l | x_t) (masked.nelbo_per_sequence's "count" estimator restricted
to the continuation; its expectation is the continuous-time NELBO for any schedule). A block LM does this per block
of its continuation part, in one forward over x_t and the clean sequence (block.block_nelbo_per_sequence); with
block size 1 it is the exact AR log-likelihood. `samples` draws run as one batch; the estimate is their mean and
its standard error the draws' sample std / sqrt(samples). The logprob is a lower bound on log p (−NELBO).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gentool.lm.diffusion.masked import mask_counts


@torch.no_grad()
def continuation_bound(model, ctx: list[int], cont: list[int], mask_id: int, *, samples: int,
                       block_size: int | None = None, generator: torch.Generator | None = None,
                       device: str = "cpu") -> tuple[float, float | None]:
    """(mean over `samples` draws of -NELBO of cont given ctx in nats, its standard error)."""
    x0 = torch.tensor(ctx + cont, device=device)[None].expand(samples, -1).contiguous()
    length, c = x0.shape[1], len(ctx)
    is_cont = torch.zeros(length, dtype=torch.bool, device=device)
    is_cont[c:] = True
    groups = [is_cont] if not block_size else [
        is_cont & (torch.arange(length, device=device) // block_size == b) for b in range(math.ceil(length / block_size))]
    groups = [g for g in groups if g.any()]
    xt, weight = x0.clone(), torch.zeros(samples, length, device=device)
    for g in groups:  # each group (the continuation, or its part in one block) with its own k
        n = int(g.sum())
        k = mask_counts(samples, 1, n, generator=generator, device=device)
        u = torch.rand(samples, length, generator=generator, device=device).masked_fill(~g, math.inf)
        ranks = u.argsort(-1).argsort(-1)
        chosen = ranks < k[:, None]
        xt = torch.where(chosen, torch.full_like(xt, mask_id), xt)
        weight = weight + chosen * (n / k)[:, None]
    logits = model(xt, block_size=block_size, clean_ids=x0) if block_size else model(xt)
    logits = logits.float().masked_fill(F.one_hot(torch.tensor(mask_id, device=device), logits.shape[-1]).bool(),
                                        -math.inf)  # SUBS: the mask is never predicted
    nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    draws = -(weight * nll).sum(-1).double()
    stderr = float(draws.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else None
    return float(draws.mean()), stderr
