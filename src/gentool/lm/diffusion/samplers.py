"""Samplers for masked- and block-diffusion LMs, on one loop over a canvas of tokens in which [MASK]s are filled.

A canvas z (B, N) holds fixed tokens (a prompt, context) and masks; `denoise` fills the masks in `steps` steps
with one of four rules, and counts network calls (NFE):

- ancestral: MDLM's ancestral sampler. From t to s < t each mask unmasks with probability
  (alpha(s) - alpha(t)) / (1 - alpha(t)) and takes a token drawn from p(x0 | z). The network has no time input,
  so its output only changes when z does: with `cache` (MDLM's caching sampler, made lazy) the network is called
  only in a step where something unmasks and z changed since the last call, so NFE <= the number of masks; the
  random draws do not depend on it, so the samples equal those without caching.
- confidence / margin: confidence-ordered unmasking (MaskGIT; LLaDA's low-confidence remasking; Dream's top-k
  margin). Each step draws a token for every mask and keeps the k most confident, k spreading the masks evenly
  over the steps; confidence is the drawn token's probability (confidence) or the gap between the two most
  likely tokens (margin). A step that would unmask nothing is skipped, so NFE <= min(steps, masks).
- remdm[:ETA]: ReMDM (Wang et al. 2025) with the max-capped schedule: the ancestral step, and each generated
  token is remasked with probability sigma_t = min(ETA, (1 - alpha(s)) / alpha(t)) (default ETA 0.02), masks
  unmasking with (alpha(s) - (1 - sigma_t) alpha(t)) / (1 - alpha(t)) so the marginals stay those of the
  forward process. Fixed tokens are never remasked.

`generate_blocks` runs a block model block by block with a static KV cache of the finished blocks (or, for
checking, without one: the whole prefix each call), to any length: past the context it keeps the last half of it.
Legend: B batch, N canvas length, V vocabulary including the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gentool.errors import UsageProblem
from gentool.lm.diffusion.masked import MaskSchedule

SAMPLERS = ("ancestral", "confidence", "margin", "remdm")
Logits = Callable[[torch.Tensor], torch.Tensor]  # canvas (B, N) -> logits (B, N, V)


@dataclass(frozen=True)
class Sampler:
    name: str = "ancestral"
    eta: float = 0.02  # remdm: the cap on the remasking probability

    def __str__(self) -> str:
        return f"remdm:{self.eta:g}" if self.name == "remdm" else self.name


def parse_sampler(spec: str | None) -> Sampler:
    """--sampler for masked and block LMs: ancestral (default), confidence, margin, remdm or remdm:ETA."""
    name, _, arg = (spec or "ancestral").partition(":")
    hint = "masked and block diffusion LMs take --sampler " + ", ".join(SAMPLERS[:-1]) + " or remdm[:ETA]"
    if name not in SAMPLERS or (arg and name != "remdm"):
        raise UsageProblem(f"--sampler {spec} cannot sample a diffusion language model", hint=hint)
    try:
        eta = float(arg) if arg else Sampler.eta
    except ValueError:
        raise UsageProblem(f"--sampler {spec}: {arg!r} is not a number", hint=hint) from None
    if not 0 <= eta <= 1:
        raise UsageProblem(f"--sampler {spec}: the remasking cap must be in [0, 1]", hint=hint)
    return Sampler(name, eta)


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, N)
    nfe: int              # network calls


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


def _probs(logits: torch.Tensor, mask_id: int, temperature: float, top_k: int | None,
           top_p: float | None) -> torch.Tensor:
    logits = logits.double()
    logits[..., mask_id] = -math.inf  # SUBS: the mask is never predicted
    return filter_probs(F.softmax(logits / max(temperature, 1e-6), dim=-1), top_k, top_p)


@torch.no_grad()
def denoise(f: Logits, z: torch.Tensor, mask_id: int, schedule: MaskSchedule = MaskSchedule(), *, steps: int,
            sampler: Sampler = Sampler(), cache: bool = True, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, generator: torch.Generator | None = None) -> SampleResult:
    """Fill the masks of z (B, N) in `steps` steps; the other tokens stay. f maps a canvas to its logits."""
    z = z.clone()
    fixed = z != mask_id
    nfe, probs, stale = 0, None, True
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for k in range(steps):
        masked = z == mask_id
        if sampler.name in ("confidence", "margin"):
            left = masked.sum(1)                                             # (B,)
            take = -(-left // (steps - k))                                   # ceil: the masks spread evenly
            if not take.any():
                break
            where = masked.nonzero(as_tuple=True)  # draws and ranks at the masked positions only: (n, V)
            logits = f(z)[where]
            nfe += 1
            x = _categorical(_probs(logits, mask_id, temperature, top_k, top_p), generator)
            probs = _probs(logits, mask_id, temperature if temperature > 0 else 1.0, top_k, top_p)  # greedy: ranks
            if sampler.name == "confidence":
                conf = probs.gather(-1, x[:, None])[:, 0]
            else:
                top2 = probs.topk(2, dim=-1).values
                conf = top2[:, 0] - top2[:, 1]
            conf_BN = torch.full(z.shape, -math.inf, dtype=conf.dtype, device=z.device)
            conf_BN[where] = conf
            rank = conf_BN.argsort(dim=1, descending=True).argsort(dim=1)
            x_BN = z.clone()
            x_BN[where] = x
            z = torch.where(masked & (rank < take[:, None]), x_BN, z)
            continue
        a_t, a_s = schedule.alpha(times[k]).item(), schedule.alpha(times[k + 1]).item()
        sigma = min(sampler.eta, (1 - a_s) / a_t) if sampler.name == "remdm" and a_t > 0 else 0.0
        p_unmask = (a_s - (1 - sigma) * a_t) / (1 - a_t) if k < steps - 1 else 1.0
        u = torch.rand(z.shape, generator=generator, dtype=torch.float64, device=z.device)
        unmask = masked & (u < p_unmask)
        if not cache or (unmask.any() and stale):  # the caching sampler calls only when needed
            # probabilities of the masked positions only (later steps unmask a subset of them; a remask sets stale)
            row = torch.full(z.shape, -1, dtype=torch.long, device=z.device)
            row[masked] = torch.arange(int(masked.sum()), device=z.device)
            probs = _probs(f(z)[masked], mask_id, temperature, top_k, top_p)
            nfe, stale = nfe + 1, False
        if unmask.any():
            z = z.clone()
            z[unmask] = _categorical(probs[row[unmask]], generator)
            stale = True
        if sigma > 0:  # ReMDM: generated tokens go back to [MASK] with probability sigma (disjoint from unmask)
            remask = ~fixed & ~masked & (u < sigma)
            if remask.any():
                z, stale = torch.where(remask, torch.full_like(z, mask_id), z), True
    return SampleResult(z, nfe)


def sample(model, z: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, steps: int, **kw) -> SampleResult:
    """A masked LM over one canvas (B, N): every call sees the whole canvas."""
    return denoise(lambda c: model(c), z, mask_id, schedule, steps=steps, **kw)


@torch.no_grad()
def sample_blocks(model, prompt: torch.Tensor, new_tokens: int, mask_id: int, schedule: MaskSchedule, *,
                  context: int, block: int, steps: int, should_stop: Callable[[torch.Tensor], bool] | None = None,
                  **kw) -> SampleResult:
    """A masked LM past its window (semi-autoregressive): blocks of `block` masks appended to the last
    `context - block` tokens, each filled in `steps` steps."""
    assert 0 < block <= context
    out, nfe, remaining = prompt.clone(), 0, new_tokens
    while remaining > 0:
        n = min(block, remaining)
        ctx = out[:, max(0, out.shape[1] - (context - n)):]
        z = torch.cat([ctx, torch.full((out.shape[0], n), mask_id, dtype=out.dtype, device=out.device)], dim=1)
        res = sample(model, z, mask_id, schedule, steps=steps, **kw)
        out = torch.cat([out, res.tokens[:, -n:]], dim=1)
        nfe += res.nfe
        remaining -= n
        if should_stop is not None and should_stop(out[:, prompt.shape[1]:]):
            break
    return SampleResult(out, nfe)


@torch.no_grad()
def generate_blocks(model, prompt: torch.Tensor, new_tokens: int, mask_id: int, block_size: int, *, context: int,
                    steps: int, kv_cache: bool = True, should_stop: Callable[[torch.Tensor], bool] | None = None,
                    **kw) -> SampleResult:
    """A block model (BD3-LM) after `prompt` (B, P): block by block, `steps` denoising steps each.

    The block holding position P starts with the prompt's tail unmasked. With `kv_cache` the first call of each
    block also writes the clean tokens finished since the last call into the static cache, fused with the block's
    first denoising pass (no extra calls); the block's own keys and values are overwritten when it is finished.
    Past `context` positions, the window restarts from the last half of the context (block-aligned)."""
    bk, bsz = block_size, prompt.shape[0]
    seq, target = prompt.clone(), prompt.shape[1] + new_tokens
    offset = cached = 0  # absolute index of position 0 (a multiple of bk); end of the cached clean tokens
    nfe = 0
    if kv_cache:
        model.setup_cache(bsz, context)
    try:
        while seq.shape[1] < target:
            start = seq.shape[1]
            b0 = start // bk * bk                                          # the block being generated
            if b0 + bk - offset > context:
                offset = cached = b0 - (context // 2) // bk * bk
            canvas = torch.cat([seq[:, b0:], torch.full((bsz, b0 + bk - start), mask_id, dtype=seq.dtype,
                                                        device=seq.device)], dim=1)
            if kv_cache:
                def f(c, b0=b0):
                    nonlocal cached
                    ids = torch.cat([seq[:, cached:b0], c], dim=1)
                    pos = torch.arange(cached - offset, b0 + bk - offset, device=seq.device)
                    cached = b0
                    return model(ids, input_pos=pos, block_size=bk)[:, -bk:]
            else:
                def f(c, b0=b0):
                    return model(torch.cat([seq[:, offset:b0], c], dim=1), block_size=bk)[:, -bk:]
            res = denoise(f, canvas, mask_id, steps=steps, **kw)
            nfe += res.nfe
            seq = torch.cat([seq[:, :b0], res.tokens], dim=1)
            if should_stop is not None and should_stop(seq[:, prompt.shape[1]:]):
                break
    finally:
        if kv_cache:
            model.reset_cache()
    return SampleResult(seq[:, :target], nfe)
