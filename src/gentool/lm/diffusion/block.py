"""Block diffusion (BD3-LM, Arriola et al. 2025): autoregressive over blocks of B tokens, masked diffusion inside
each block, so a model interpolates between the AR model (B = 1) and MDLM (B = the sequence length).

    -log p(x) <= sum_b NELBO_MDLM(x^b | x^{<b}),    x^b = tokens [b·B, (b+1)·B)

The network is the train-lm transformer with block-causal attention (bidirectional inside a block, causal across
blocks) and one extra vocabulary entry, the mask. Training runs the noised sequence x_t and the clean x0 through the
network together (models/transformer.py's two-stream mask), so each block's loss conditions on the clean earlier
blocks in one forward pass. Training draws a time t per block (antithetic over the batch's blocks), masks each
token of the block with probability t and weighs the cross-entropy at the masks by 1/t, with t clipped to BD3-LM's
range for the block size (a variance reduction that makes the training loss a reweighted objective rather than
the bound; --mask-range LO:HI sets it). The bound itself (validation, `perplexity`) is estimated with the count
estimator of masked.nelbo_per_sequence per block: k masks, k uniform on 1..B, weight B/k.

Block size 1 trains with t = 1, every token masked with weight 1: the loss is exactly the NLL of the AR model the
same weights define (p(x_l | x_<l) read at a [MASK] in position l, causal attention), and block size = the sequence
length is exactly MDLM's objective (tests/lm/test_block_lm.py checks both).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from gentool.artifacts.probe import BLOCK_LM
from gentool.data.shards import TokenShards
from gentool.errors import UsageProblem
from gentool.lm.diffusion.masked import (MaskedLMTask, MaskSchedule, count_weights, discrete_times, mask_counts,
                                         mask_exactly)
from gentool.lm.train import LMRunOptions, Objective, run_train_lm

FULL = (1e-3, 1.0)  # the NELBO's times (MDLM's eps); the count estimator needs no eps


def default_mask_range(block_size: int, seq_len: int) -> tuple[float, float]:
    """Training mask rates t: every token masked for B = 1 (the loss is then the exact AR NLL), the full range for
    B = L (MDLM's objective), otherwise BD3-LM's clipped ranges (Table 8 of the paper: [0.45, 0.95] for B <= 4,
    [0.3, 0.8] for larger blocks)."""
    if block_size == 1:
        return 1.0, 1.0
    if block_size >= seq_len:
        return FULL
    return (0.45, 0.95) if block_size <= 4 else (0.3, 0.8)


def block_nelbo_per_sequence(model, x0: torch.Tensor, mask_id: int, schedule: MaskSchedule, *, block_size: int,
                             estimator: str = "count", t_range: tuple[float, float] = FULL, steps: int | None = None,
                             antithetic: bool = True, generator: torch.Generator | None = None,
                             scored: torch.Tensor | None = None) -> torch.Tensor:
    """One draw of the block NELBO in nats for each sequence of x0 (N, L), all blocks in one forward pass over x_t
    and x0, each block with its own draw (antithetic over the batch's blocks):

    - "count" (the bound's estimates): k masks, k uniform on 1..B, weight B/k (masked.nelbo_per_sequence);
    - "time" (training): each token masked with probability t, t uniform on `t_range`, weight 1/t; a clipped
      t_range is BD3-LM's reweighted training objective, t_range (1, 1) with B = 1 the exact AR NLL;
    - `steps`: the discrete-time bound of the log-linear schedule (t on the grid i/T, weight 1/t).
    `scored` (N, L) bool: only those positions are masked, the others are clean context (masked.nelbo_per_sequence;
    per block: k uniform on 1..c over its c scored positions, weight c/k, a block with none adds nothing)."""
    n, length = x0.shape
    nb = length // block_size
    if steps is None and estimator == "count" and scored is not None:
        c = scored.view(n * nb, block_size).sum(-1)
        k = mask_counts(n * nb, 1, c, antithetic=antithetic, generator=generator, device=x0.device)
        w = count_weights(c, k).view(n, nb)
        xt = mask_exactly(x0.view(n, nb, block_size), k.view(n, nb), mask_id, generator,
                          scored.view(n, nb, block_size)).view(n, length)
    elif steps is None and estimator == "count":
        k = mask_counts(n * nb, 1, block_size, antithetic=antithetic, generator=generator, device=x0.device)
        w = (block_size / k).view(n, nb)
        xt = mask_exactly(x0.view(n, nb, block_size), k.view(n, nb), mask_id, generator).view(n, length)
    else:  # log-linear schedule: mask rate t, weight 1/t (= T(alpha(s) - alpha(t)) / (1 - alpha(t)) on the grid)
        assert schedule.kind == "loglinear", "block diffusion uses the log-linear schedule"
        if steps is None:
            t = block_times(n * nb, *t_range, antithetic=antithetic, generator=generator, device=x0.device)
        else:
            t, _ = discrete_times(n * nb, steps, generator=generator, device=x0.device)
        w = schedule.weight(t).view(n, nb)
        p_mask = (1 - schedule.alpha(t)).view(n, nb).repeat_interleave(block_size, dim=1)     # (N, L)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        xt = torch.where(u < p_mask, torch.full_like(x0, mask_id), x0)
        if scored is not None:
            xt = torch.where(scored, xt, x0)
    masked = xt == mask_id
    logits = model(xt, block_size=block_size, clean_ids=x0)                      # (N, L, V)
    logits = logits.float().masked_fill(
        F.one_hot(torch.tensor(mask_id, device=x0.device), logits.shape[-1]).bool(), -math.inf)  # SUBS
    nll = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")          # (N, L)
    return (w.repeat_interleave(block_size, dim=1) * nll * masked).sum(dim=1)


def block_times(n: int, lo: float, hi: float, *, antithetic: bool = True, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """n times in [lo, hi]; antithetic draws spread one uniform over n evenly spaced strata (masked.sample_times)."""
    if antithetic:
        u = (torch.rand((), generator=generator, device=device) + torch.arange(n, device=device) / n) % 1.0
    else:
        u = torch.rand(n, generator=generator, device=device)
    return lo + (hi - lo) * u


def parse_mask_range(spec: str | None) -> tuple[float, float] | None:
    """--mask-range LO:HI."""
    if spec is None:
        return None
    try:
        lo, hi = (float(x) for x in spec.split(":"))
    except ValueError:
        raise UsageProblem(f"--mask-range {spec!r} is not LO:HI", hint="e.g. --mask-range 0.3:0.8") from None
    return lo, hi


def check_block_size(block_size: int, seq_len: int) -> None:
    if block_size < 1 or seq_len % block_size:
        divisors = [d for d in (1, 2, 4, 8, 16, 32, 64) if seq_len % d == 0 and d < seq_len]
        raise UsageProblem(f"--block-size {block_size} does not divide the sequence length {seq_len}",
                           hint="choose a divisor of --seq-len, e.g. " + ", ".join(map(str, divisors[-3:] or [1])))


class BlockLMTask(MaskedLMTask):
    """MaskedLMTask's windows and data order; the block loss with clipped mask rates, the block NELBO to validate."""

    def __init__(self, train: TokenShards, val: TokenShards | None, config, *, block_size: int,
                 mask_range: tuple[float, float], **kw: Any):
        super().__init__(train, val, config, schedule="loglinear", **kw)
        self.block_size, self.mask_range = block_size, mask_range
        self.per_sequence = functools.partial(block_nelbo_per_sequence, block_size=block_size)
        # two streams: the non-embedding matmuls run over 2L tokens, the output head over L, attention block-causal
        q, L = config.num_attention_heads * config.head_dim, self.seq_len
        per_token = config.train_flops_per_token(L) + 6 * config.n_params(non_embedding=True) \
            + 6 * config.num_hidden_layers * L * q
        self.flops_per_micro = float(per_token * self.tokens_per_micro)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, int]) -> torch.Tensor:
        x0, noise_seed = batch
        g = torch.Generator(device=x0.device).manual_seed(noise_seed)
        nats = block_nelbo_per_sequence(model, x0, self.mask_id, self.schedule, block_size=self.block_size,
                                        estimator="time", t_range=self.mask_range, generator=g)
        return nats.sum() / x0.numel()


class BlockObjective(Objective):
    """train-lm's loop with the block-diffusion objective; a diffusion-checkpoint of family block-lm."""

    kind = "diffusion-checkpoint"
    causal = False
    extra_vocab = 1
    allows_init = False

    def __init__(self, block_size: int, seq_len: int, mask_range: tuple[float, float] | None = None):
        check_block_size(block_size, seq_len)
        lo, hi = mask_range or default_mask_range(block_size, seq_len)
        if not 0 < lo <= hi <= 1:
            raise UsageProblem(f"--mask-range {lo}:{hi} is not inside (0, 1]", hint="e.g. --mask-range 0.3:0.8")
        self.block_size, self.mask_range = block_size, (float(lo), float(hi))

    def task(self, train: TokenShards, val: TokenShards | None, config, **kw: Any) -> BlockLMTask:
        return BlockLMTask(train, val, config, mask_id=train.vocab_size, block_size=self.block_size,
                           mask_range=self.mask_range, **kw)

    def recipe(self, shards: TokenShards) -> dict[str, Any]:
        return {"family": BLOCK_LM, "mask_id": shards.vocab_size, "block_size": self.block_size,
                "mask_range": list(self.mask_range)}

    def contents(self, shards: TokenShards, config, seq_len: int) -> dict[str, Any]:
        return {"family": BLOCK_LM, "data_shape": {"seq_len": seq_len, "vocab_size": config.vocab_size,
                                                   "mask_id": shards.vocab_size, "block_size": self.block_size},
                "schedule": "loglinear", "mask_range": list(self.mask_range),
                "flops_formula": "12N+6Vd+12LTd (noised and clean streams)"}


def train_block_lm(opts: LMRunOptions, block_size: int, mask_range: tuple[float, float] | None = None
                   ) -> dict[str, Any]:
    """`gentool train-diffusion TOKENS --kind block-lm --block-size B`."""
    return run_train_lm(opts, BlockObjective(block_size, opts.seq_len, mask_range))
